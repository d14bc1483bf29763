"""Move a backend or a reward to another device (e.g. into a ZeroGPU worker).

Each object moves what it holds: backends (``DiffusionBackend.to``), the app's proxy reward and
its image encoder, fidelity judges and torch modules all have ``to``. Plain-function rewards
(the registry's) keep their judge where it is and move the images to it. Dicts and lists are
walked, so a bundle of them moves in one call.
"""

from __future__ import annotations

from typing import Any

import torch


def move_to(obj: Any, device: str | torch.device) -> Any:
    """Move ``obj`` (in place where it can) to ``device``; returns the moved object."""
    device = torch.device(device)
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = move_to(v, device)
        return obj
    if isinstance(obj, list):
        obj[:] = [move_to(v, device) for v in obj]
        return obj
    mover = getattr(obj, "to", None)
    if callable(mover):
        mover(device)
    return obj
