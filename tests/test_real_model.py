"""The app on a diffusers model: ``--model`` pointing at a tiny random Stable Diffusion folder.

Through the public API (gradio_client): generate, rate, compare, the prompt lab with free-text
stage prompts, a round with RLR (block "auto") and one with DDPO, each new version's samples in
the rating queue; a version's exported LoRA loads into a fresh plain diffusers pipeline and gives
the app's images for the same seed. Bad ``--model`` values end with one line and exit code 2.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from tests.model_app_checks import (
    PROMPT,
    TINY_ROUND,
    call,
    check_exported_lora,
    check_generate_rate_compare,
    check_new_version,
    gradio_client,
    running_app,
    wait_round,
)
from tests.tiny_sd import save_tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def app(sd_folder, tmp_path_factory):
    with running_app(sd_folder, tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app.url, verbose=False)


def test_start_up_names_the_model_and_the_reward_features(app):
    summary = app.services.model.device_summary()
    assert summary.startswith("tiny-sd on cpu, float32, 16x16"), summary
    # --reward-encoder auto with no CLIP in the (empty) local cache: the model's own VAE latents.
    assert app.services.rounds.image_encoder.name == "vae-latent"


def test_generate_rate_compare_at_native_resolution(client):
    check_generate_rate_compare(client, 3.0)


def test_prompts_over_the_tokenizer_limit_are_refused_with_the_count(client, app):
    long_prompt = "a red cat with a blue dog"  # spelled letter by letter by the tiny tokenizer: 17 tokens
    with pytest.raises(gradio_client.exceptions.AppError, match="17 tokens long.*at most 14"):
        call(client, "generate", long_prompt, 1, 0, 3, 3.0)
    assert app.services.prompts.describe(long_prompt).startswith("⚠️ 17 / 14 tokens")
    assert app.services.prompts.describe(PROMPT) == "✓ 5 / 14 tokens"


def test_prompt_lab_takes_free_text_stage_prompts(client):
    stages = call(client, "split_prompt", PROMPT)
    assert stages == {"coarse": PROMPT, "mid": PROMPT, "fine": PROMPT}  # prefilled with the prompt itself
    saved = call(client, "save_stage_prompts", PROMPT, "a cat", "a red cat", PROMPT, "ann")
    assert saved["stage_prompts"] == {"coarse": "a cat", "mid": "a red cat", "fine": PROMPT}
    preview = call(client, "preview_stages", PROMPT, "a cat", "a red cat", PROMPT, 0.3, 0.6, 1, 3)
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in preview["plain"] + preview["staged"]]
    assert len(images) == 6 and all(im.size == (16, 16) for im in images)


@pytest.mark.parametrize("estimator", ["rlr", "ddpo"])
def test_a_round_trains_a_new_version_whose_samples_reappear(client, app, estimator):
    before = {v["version_id"] for v in call(client, "versions")}
    settings = {**TINY_ROUND, "estimator": estimator, "block": "auto"}
    started = call(client, "train_start", settings)
    if estimator == "rlr":  # the echo shows only the options the chosen estimator takes
        assert started["settings"]["block"] == "auto"
    status = wait_round(client)
    assert status["state"] == "finished", status
    assert status["prompts"][0]["stages"] == ["a cat", "a red cat", PROMPT]  # the lab's stage prompts trained
    check_new_version(client, app, before, estimator, 3.0)


def test_exported_lora_loads_in_a_plain_diffusers_pipeline(client, app, sd_folder, tmp_path):
    def load():  # the three lines of docs/own-model.md
        return StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)

    check_exported_lora(client, app, load, 3.0, tmp_path, eta=1.0)


# ---------------------------------------------------------------------------- bad --model values
def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """``python app.py`` in-process (it stops before serving when the model does not load)."""
    import importlib.util

    # app.py by path: the name "app" is the app/ package.
    spec = importlib.util.spec_from_file_location("app_main", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def bad_models(root: Path, sd_folder: Path) -> list[tuple[str, str]]:
    unet_only = root / "unet-only"
    unet_only.mkdir()
    (unet_only / "config.json").write_text((sd_folder / "unet" / "config.json").read_text())
    notes = root / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("hello")
    pickle_file = root / "model.ckpt"
    pickle_file.write_bytes(b"not loaded")
    junk = root / "junk.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, junk)
    return [
        (str(root / "nowhere"), "no such folder or file"),
        ("someone/not-cached-model", "not in the local Hugging Face cache.*hf download someone/not-cached-model"
                                     ".*built-in model \\(no --model\\) needs nothing"),
        (str(unet_only), "not a text-to-image pipeline.*a single model \\(UNet2DConditionModel\\)"),
        (str(notes), "not a text-to-image pipeline.*no model_index.json; it holds readme.txt"),
        (str(pickle_file), "must be .safetensors"),
        (str(junk), "could not load this single-file checkpoint"),
    ]


def test_each_bad_model_gives_one_line_and_exit_code_2(tmp_path, sd_folder, capsys, offline):
    import re

    for model, message in bad_models(tmp_path, sd_folder):
        code, err = run_main(["--model", model, "--data-dir", str(tmp_path / "data"), "--device", "cpu"], capsys)
        assert code == 2, (model, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --model "), (model, err)
        assert re.search(message, lines[0]), (model, lines[0])


def test_a_bad_reward_encoder_gives_one_line_and_exit_code_2(tmp_path, sd_folder, capsys, offline):
    code, err = run_main(["--model", str(sd_folder), "--reward-encoder", "clip:" + str(tmp_path / "no-clip"),
                          "--data-dir", str(tmp_path / "data"), "--device", "cpu"], capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("error: CLIP model") and "could not be read" in line, err


def test_the_process_exits_with_code_2(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "app.py", "--model", "someone/not-cached-model", "--data-dir",
                          str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: --model someone/not-cached-model: not in the local")
