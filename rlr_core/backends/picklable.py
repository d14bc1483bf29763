"""Backends that can be sent to another process (the CPU round process, ``rlr_core.training.round_process``).

transformers (5.x) installs forward hooks on a text encoder the first time it is asked for its
hidden states (``transformers.utils.output_capturing``: SDXL's and SD3's CLIPs are, FLUX's CLIP
and T5 too). Those hooks are local functions, which ``pickle`` cannot write, so a backend whose
text encoders have run once could no longer be sent to the round process
("Can't pickle local object 'install_output_capuring_hook.<locals>.output_capturing_hook'").

:func:`without_capture_hooks` gives a copy of a module without those hooks that shares every
parameter and buffer with the original (only the module objects are new; the original keeps its
hooks, so a forward running in another thread is not disturbed). transformers installs the hooks
again on the copy's first forward in the other process, but only for model classes it has seen
constructed there (``_CAN_RECORD_REGISTRY``, filled in ``PreTrainedModel.__init__``, which
unpickling skips): :func:`register_capture` fills it in for unpickled modules (the backends'
``__setstate__``), else ``output_hidden_states=True`` silently gives ``hidden_states=None``.
"""

from __future__ import annotations

import copy
import itertools

import torch

_HOOK_OWNER = "install_output_capuring_hook"  # sic: transformers' spelling
_INSTALLED_FLAG = "_output_capturing_hooks_installed"


def _is_capture_hook(fn) -> bool:
    return getattr(fn, "__qualname__", "").startswith(_HOOK_OWNER)


def has_capture_hooks(module: torch.nn.Module) -> bool:
    return any(_is_capture_hook(fn) for m in module.modules() for fn in m._forward_hooks.values())


def without_capture_hooks(module: torch.nn.Module | None) -> torch.nn.Module | None:
    """``module`` itself when it has no capture hooks; else a copy without them (tensors shared)."""
    if module is None or not has_capture_hooks(module):
        return module
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    clean = copy.deepcopy(module, memo)
    for m in clean.modules():
        for hook_id in [h for h, fn in m._forward_hooks.items() if _is_capture_hook(fn)]:
            m._forward_hooks.pop(hook_id, None)
            m._forward_hooks_with_kwargs.pop(hook_id, None)
            m._forward_hooks_always_called.pop(hook_id, None)
        if _INSTALLED_FLAG in m.__dict__:
            delattr(m, _INSTALLED_FLAG)
    return clean


def picklable_pipeline(pipe, names: tuple[str, ...], **replace):
    """A shallow copy of a diffusers pipeline with the components ``names`` hook-free (see above)
    and the components in ``replace`` swapped (e.g. the backend's own transformer for the base's)."""
    out = copy.copy(pipe)
    for name in names:
        object.__setattr__(out, name, without_capture_hooks(getattr(pipe, name, None)))
    for name, value in replace.items():
        object.__setattr__(out, name, value)
    return out


def register_capture(*modules: torch.nn.Module | None) -> None:
    """Tell transformers which outputs the (unpickled) text encoders ``modules`` can record."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # an older transformers: no capture hooks, nothing to register
        return
    for module in modules:
        if module is None:
            continue
        for m in module.modules():
            can_record = getattr(m, "_can_record_outputs", None)
            if can_record is not None and not _CAN_RECORD_REGISTRY.get(m):
                _CAN_RECORD_REGISTRY[m] = can_record
