"""Move a backend or a reward (objects holding torch modules and tensors) to another device.

Backends differ in what they hold (a UNet and a text encoder; a VAE too; cached conditioning),
so this walks the object's attributes: modules move with ``.to``, tensors are replaced, and
the project's own objects (and plain containers, and the project's objects a module keeps as
plain attributes) are walked into. Other library objects (a
diffusers scheduler, a tokenizer) are left alone: the sampling code moves their tensors to the
state's device itself.
"""

from __future__ import annotations

from typing import Any

import torch

OWN_PACKAGES = ("rlr_core", "app", "feedback_store")


def _own(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] in OWN_PACKAGES and hasattr(obj, "__dict__")


def move_to(obj: Any, device: str | torch.device) -> Any:
    """Move ``obj`` (in place where it can) to ``device``; returns the moved object."""
    return _move(obj, torch.device(device), set())


def _move(obj: Any, device: torch.device, seen: set[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if id(obj) in seen:
        return obj
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        obj.to(device)
        # Frozen helpers kept as plain attributes (e.g. the reward proxy's image encoder)
        for v in vars(obj).values():
            if _own(v) and not isinstance(v, torch.nn.Module):
                _move(v, device, seen)
        return obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _move(v, device, seen)
    elif isinstance(obj, list):
        obj[:] = [_move(v, device, seen) for v in obj]
    elif _own(obj):
        for k, v in vars(obj).items():
            moved = _move(v, device, seen)
            if moved is not v:
                object.__setattr__(obj, k, moved)  # frozen dataclasses too
    return obj
