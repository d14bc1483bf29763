"""What the reward proxy needs from its encoders, and the one fingerprint of their weights.

An image encoder maps images (or clips) in [0, 1] to fixed-size features, differentiably; a
prompt encoder maps prompts to fixed-size features. A saved proxy records its image encoder's
``spec`` (the string that rebuilds it), name, size and :func:`weights_fingerprint`, and refuses
to load with any other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn


class ImageEncoder(Protocol):
    """Frozen image features: (B, 3, H, W) floats in [0, 1] -> (B, dim), differentiable in images."""

    name: str
    spec: str  # what rlr_core.feedback.encoders.make_image_encoder rebuilds it from
    dim: int

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...

    def fingerprint(self) -> str:
        """Changes whenever the encoder's weights change (a saved proxy is tied to them)."""
        ...

    def to(self, device: str | torch.device) -> ImageEncoder:
        """Move the encoder's model to ``device`` in place; returns the encoder."""
        ...


class PromptEncoder(Protocol):
    """Fixed-size prompt features: list of prompts -> (B, dim). ``config()`` rebuilds it."""

    dim: int

    def encode(self, prompts: Sequence[str]) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 (16 hex digits) of every parameter and buffer as loaded. Loading the same model in
    another dtype gives another fingerprint (its features differ slightly too)."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class FrozenModelEncoder:
    """Shared by the encoders whose features come from one frozen module, ``model``: it moves with
    :meth:`to`, and the encoder's fingerprint is that module's weights' (computed once)."""

    model: nn.Module
    _fingerprint: str | None = None

    def to(self, device: str | torch.device):
        self.model.to(device)
        return self

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint
