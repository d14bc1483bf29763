"""One set of round defaults per model: the Train tab's form, ``/train_start`` with nothing set,
and auto-train's first round give the same round, on every backend family (app/round_config.py's
``FAMILY_DEFAULTS``)."""

from __future__ import annotations

import pytest

from app.config import AppConfig
from app.round_config import DEFAULTS, FAMILY_DEFAULTS, RoundConfig, defaults_for
from app.tabs.train import FORM_IDS
from app.ui import create_app


def load(family: str, folder, builtin_backend):
    from rlr_core.backends.latent import DiffusersLatentBackend
    from rlr_core.backends.loading import load_backend
    from tests.clip_model import clip_model_dir
    from tests.tiny_animatediff import save_tiny_animatediff
    from tests.tiny_sd import tiny_pipeline

    if family == "builtin-image":
        return builtin_backend
    if family == "builtin-clips":
        return load_backend(clip_model_dir())
    if family == "stable-diffusion":
        return DiffusersLatentBackend.from_pipeline(tiny_pipeline(), name="tiny-sd")
    if family == "stable-diffusion-xl":
        from tests.tiny_sdxl import save_tiny_sdxl

        return load_backend(save_tiny_sdxl(folder / "tiny-sdxl"))
    if family == "stable-diffusion-3":
        from tests.tiny_flow import save_tiny_sd3

        return load_backend(save_tiny_sd3(folder / "tiny-sd3"))
    return load_backend(save_tiny_animatediff(folder / "tiny-ad"))


@pytest.mark.parametrize("family", sorted(FAMILY_DEFAULTS))
def test_every_entry_point_starts_the_same_round(family, tmp_path, builtin_backend, capsys):
    backend = load(family, tmp_path, builtin_backend)
    assert backend.family == family
    demo, services = create_app(AppConfig(data_dir=tmp_path / "data", reward_encoder="auto"), backend)
    said = capsys.readouterr().out
    if not backend.prompt_rules:  # a model of one's own: start-up says which encoder "auto" chose and why
        assert "reward encoder: vae: no known CLIP is in the local cache" in said or "reward encoder: clip:" in said
    try:
        elements = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
        form = {name: elements[elem_id].value for name, elem_id in FORM_IDS.items()}
        from_tab = RoundConfig.parse(form, services.round_defaults)
        from_api = RoundConfig.parse({}, services.round_defaults)  # /train_start with nothing set
        from_auto = RoundConfig.parse({}, services.rounds.defaults)  # auto-train before any round
        assert from_tab == from_api == from_auto == RoundConfig.parse({}, defaults_for(backend))
        assert services.round_defaults == {**DEFAULTS, **FAMILY_DEFAULTS[family]}
        assert from_api.training.estimator.options.get("block", 2) != "auto"  # h = 2, not sized from RAM
        if family in ("stable-diffusion", "animatediff"):
            assert (from_api.training.lr, from_api.training.batch) == (3e-4, 2)
        if family == "stable-diffusion-xl":
            assert (from_api.training.lr, from_api.training.batch, from_api.samples.guidance) == (1e-4, 2, 5.0)
        if family == "stable-diffusion-3":  # Flow-GRPO's SD3.5-M settings
            assert (from_api.training.lr, from_api.training.sampler.steps, from_api.training.sampler.guidance,
                    from_api.training.lora_rank) == (3e-4, 10, 4.5, 32)
    finally:
        services.close()
