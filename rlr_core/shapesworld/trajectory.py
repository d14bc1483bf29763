"""Motion as a moving frame of reference: a trajectory head and whole-pixel frame shifts.

A ShapesWorld clip is a still scene seen through a window that slides at a constant velocity.
So the clip model draws every clip in the shape's own frame of reference, where nothing moves
(the image layers and temporal layers do what they already do well: one still scene), and a
small learned head reads the velocity (pixels per frame) from the caption. Frame f is shifted
by ``(f - (F - 1) / 2) * velocity`` on its way out of the denoiser, and by the opposite on its
way in, so the network always sees the scene at rest.

The shifts move whole pixels (a circular roll), so white noise stays white noise of the same
variance at every step: a sub-pixel interpolation would blur the noise and change what the
denoiser sees at each timestep. The backward pass differentiates the shift like bilinear
interpolation would (the image's spatial gradient), so a reward can still change the velocity,
and with it a clip's speed and direction, through the head's weights.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import AttentionPooling
from diffusers.models.modeling_utils import ModelMixin


class TrajectoryHead(ModelMixin, ConfigMixin):
    """Caption encoding (B, L, D) -> velocity (B, 2): pixels per frame in x (right) and y (down)."""

    @register_to_config
    def __init__(self, embed_dim: int = 64, num_heads: int = 4, hidden_dim: int = 64):
        super().__init__()
        self.pool = AttentionPooling(num_heads, embed_dim)
        self.hidden = torch.nn.Linear(embed_dim, hidden_dim)
        self.velocity_out = torch.nn.Linear(hidden_dim, 2)  # a LoRA target: rewards move motion here
        torch.nn.init.zeros_(self.velocity_out.weight)  # starts still: the clip model it joins
        torch.nn.init.zeros_(self.velocity_out.bias)

    def forward(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(encoder_hidden_states)
        return self.velocity_out(torch.nn.functional.silu(self.hidden(pooled)))


def frame_offsets(velocity: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, 2) velocities -> (B, F, 2) offsets of each frame from the clip's middle, in pixels."""
    steps = torch.arange(num_frames, device=velocity.device, dtype=velocity.dtype) - (num_frames - 1) / 2
    return steps[None, :, None] * velocity[:, None, :]


def whole_pixel_offsets(velocity: torch.Tensor, num_frames: int) -> torch.Tensor:
    """:func:`frame_offsets` rounded to whole pixels (halves up: a slow clip's -3.5, ..., 3.5 become
    -3, ..., 4, one pixel per frame), with the unrounded offsets' gradient (straight through).
    Rounding once, here, makes the way out exactly undo the way in: rounding -o and o separately
    would not (-2.5 and 2.5 round to -2 and 3)."""
    offsets = frame_offsets(velocity, num_frames)
    return offsets + (torch.floor(offsets + 0.5) - offsets).detach()


def _roll(frames: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Circularly roll each image (N, C, H, W) by its own whole-pixel (dx, dy) in ``shifts`` (N, 2)."""
    n, _, h, w = frames.shape
    xs = (torch.arange(w, device=frames.device)[None, :] - shifts[:, :1]) % w  # (N, W) source columns
    ys = (torch.arange(h, device=frames.device)[None, :] - shifts[:, 1:]) % h  # (N, H) source rows
    rows = frames.gather(2, ys[:, None, :, None].expand(-1, frames.shape[1], -1, w))
    return rows.gather(3, xs[:, None, None, :].expand(-1, frames.shape[1], h, -1))


class _ShiftFrames(torch.autograd.Function):
    @staticmethod
    def forward(ctx, frames: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        shifts = torch.floor(offsets.detach() + 0.5).long()  # nearest whole pixel, halves up
        out = _roll(frames, shifts)
        ctx.save_for_backward(out, shifts)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out, shifts = ctx.saved_tensors
        grad_frames = _roll(grad_out, -shifts)
        # d out / d offset = -(spatial gradient of out): central differences, circular like the roll.
        dx = (out.roll(-1, dims=3) - out.roll(1, dims=3)) / 2
        dy = (out.roll(-1, dims=2) - out.roll(1, dims=2)) / 2
        grad_offsets = -torch.stack([(grad_out * dx).sum((1, 2, 3)), (grad_out * dy).sum((1, 2, 3))], dim=1)
        return grad_frames, grad_offsets


def shift_frames(frames: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Move image i of ``frames`` (N, C, H, W) by ``offsets[i]`` = (dx, dy) pixels, rounded to whole
    pixels (content at x moves to x + dx, wrapping round); differentiable in both arguments.
    Pass whole-pixel offsets (:func:`whole_pixel_offsets`) to undo a shift by shifting back."""
    return _ShiftFrames.apply(frames, offsets)
