"""One set of round defaults per model: the Train tab's form, ``/train_start`` with nothing set,
auto-train's first round and the command line (``python -m rlr_core.training``) give the same
round, on every backend family (rlr_core/training/defaults.py's ``FAMILY_DEFAULTS``); and the
command line reads its flags as the app reads its settings."""

from __future__ import annotations

import pytest

from app.config import AppConfig
from app.round_config import DEFAULTS, FAMILY_DEFAULTS, RoundConfig, defaults_for
from app.tabs.train import FORM_IDS
from app.ui import create_app
from rlr_core.training import cli
from rlr_core.training.defaults import BUILTIN_IMAGE_DEFAULTS


def same_training(app_config: RoundConfig, argv: list[str], defaults) -> None:
    """The command line with ``argv`` trains what the app's round does (prompts and seed aside:
    the app fills in its own)."""
    from_cli = cli.train_config(cli.parse_args([*argv, "--out", "unused"]), defaults)
    t = app_config.training
    assert (from_cli.estimator, from_cli.steps, from_cli.batch, from_cli.lr, from_cli.lora_rank, from_cli.sampler,
            from_cli.finetune, from_cli.anchor_kl, from_cli.kl_reference) == (
                t.estimator, t.steps, t.batch, t.lr, t.lora_rank, t.sampler, t.finetune, t.anchor_kl, t.kl_reference)


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
    if family == "flux":
        from tests.tiny_flow import save_tiny_flux

        return load_backend(save_tiny_flux(folder / "tiny-flux"))
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
        same_training(from_api, [], defaults_for(backend))  # the CLI's main() reads defaults_for(backend)
        assert services.round_defaults == {**DEFAULTS, **FAMILY_DEFAULTS[family]}
        assert from_api.training.estimator.options.get("block", 2) != "auto"  # h = 2, not sized from RAM
        if family in ("stable-diffusion", "animatediff"):
            assert (from_api.training.lr, from_api.training.batch) == (3e-4, 2)
        if family == "stable-diffusion-xl":
            assert (from_api.training.lr, from_api.training.batch, from_api.samples.guidance) == (1e-4, 2, 5.0)
        if family == "stable-diffusion-3":  # Flow-GRPO's SD3.5-M settings
            assert (from_api.training.lr, from_api.training.sampler.steps, from_api.training.sampler.guidance,
                    from_api.training.lora_rank) == (3e-4, 10, 4.5, 32)
        if family == "flux":  # Flow-GRPO's FLUX.1-dev settings
            assert (from_api.training.lr, from_api.training.sampler.steps, from_api.training.sampler.guidance,
                    from_api.training.lora_rank, from_api.samples.steps, from_api.samples.guidance) == (
                        3e-4, 6, 3.5, 64, 28, 3.5)
    finally:
        services.close()


@pytest.mark.parametrize("settings,argv", [
    ({}, []),
    ({"kl_coef": 0}, ["--kl-coef", "0"]),  # a flag given wins over the model's default, 0 too
    ({"block": "auto", "rest": "zo"}, ["--block", "auto", "--rest", "zo"]),
    ({"estimator": "truncated-bp"}, ["--estimator", "truncated-bp"]),  # K' = the round default, 3
    ({"estimator": "truncated-bp", "sampling_steps": 4, "truncation": 9},  # K' cut to the chain's 4 steps
     ["--estimator", "truncated-bp", "--sampling-steps", "4", "--truncate", "9"]),
    ({"estimator": "ddpo", "steps": 3, "batch_size": 4, "learning_rate": 1e-3, "lora_rank": 8, "guidance": 2.0},
     ["--estimator", "ddpo", "--steps", "3", "--batch", "4", "--lr", "1e-3", "--lora-rank", "8", "--guidance", "2"]),
    ({"estimator": "full-bp", "kl_coef": 0.5}, ["--estimator", "full-bp", "--kl-coef", "0.5"]),
    ({"kl_reference": "base", "anchor_kl": 2.0}, ["--kl-reference", "base", "--anchor-kl", "2"]),
])
def test_the_command_line_reads_its_flags_as_the_app_reads_its_settings(settings, argv):
    same_training(RoundConfig.parse(settings, BUILTIN_IMAGE_DEFAULTS), argv, BUILTIN_IMAGE_DEFAULTS)
