"""The prompt lab's stage previews and generation run the same sampler: same seed, same images."""

from __future__ import annotations

import torch

from app.config import AppConfig
from app.generation import GenerationSettings, draw
from app.services import AppServices
from rlr_core import dcot


def test_preview_rows_are_the_images_generation_draws(tmp_path, builtin_backend):
    prompt = "a large red circle on the left, black background"
    stages = dcot.split_prompt(prompt)
    mid = "a large circle on the left, black background"
    services = AppServices(AppConfig(data_dir=tmp_path), builtin_backend)
    try:
        out = services.prompt_lab.preview_stages(prompt, stages.coarse, mid, stages.fine, 0.3, 0.6, 11, 5, 3.0)
    finally:
        services.close()
    settings = GenerationSettings(steps=5, guidance=3.0)
    plain = draw(builtin_backend, [prompt], 11, settings)
    per_step = [[p] for p in dcot.step_prompts(dcot.StagePrompts(stages.coarse, mid, stages.fine), 5, (0.3, 0.6))]
    staged, _ = dcot.sample_staged(builtin_backend, per_step, 11, 3.0, settings.eta)
    # The last capture is the final step's prediction of x_0, which is the final image (sigma_1 = 0).
    torch.testing.assert_close(out["plain"][-1], plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["staged"][-1], staged[0], rtol=0, atol=1e-5)
    assert not torch.allclose(plain, staged)  # the stage prompts did change the image
    # Earlier captures are the chain's guesses so far: they differ from the final image.
    assert not torch.allclose(out["plain"][0], plain[0], atol=1e-3)
