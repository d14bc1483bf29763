"""The plain diffusers sampling loop (``DDIMScheduler.step``) for the built-in model.

Nothing in the app samples with this: :mod:`rlr_core.sampler` is the one sampler. This loop is
the reference it is checked against: the tests require the same images from the same seed, and
``bench.fidelity`` times both, since sampling without a record must cost no more than this.
"""

from __future__ import annotations

import torch

from rlr_core.shapesworld.model import BuiltinModel
from rlr_core.shapesworld.world import IMAGE_SIZE


@torch.no_grad()
def encode_prompts(model: BuiltinModel, prompts: list[str]) -> torch.Tensor:
    device = next(model.text_encoder.parameters()).device
    ids = model.tokenizer(
        prompts, padding="max_length", max_length=model.tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids.to(device)
    return model.text_encoder(ids).last_hidden_state


@torch.no_grad()
def generate(
    model: BuiltinModel,
    prompts: list[str],
    steps: int = 20,
    guidance: float = 3.0,
    eta: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """Images (B, 3, 32, 32) in [0, 1] for ``prompts`` with DDIM and classifier-free guidance."""
    device = next(model.unet.parameters()).device
    generator = torch.Generator("cpu").manual_seed(seed)
    scheduler = model.scheduler
    scheduler.set_timesteps(steps)
    cond = encode_prompts(model, prompts)
    uncond = encode_prompts(model, [""] * len(prompts))
    x = torch.randn(len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(device)
    for t in scheduler.timesteps:
        if guidance == 1.0:
            out = model.unet(x, t, cond).sample
        else:
            both = model.unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
            out_u, out_c = both.chunk(2)
            out = out_u + guidance * (out_c - out_u)
        noise = torch.randn(x.shape, generator=generator).to(device)
        x = scheduler.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
    return ((x.clamp(-1, 1) + 1) / 2).cpu()
