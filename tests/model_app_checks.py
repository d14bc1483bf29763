"""The app-level checks every diffusers family shares: the app started with ``--model`` on a tiny
pipeline folder and driven through its public API (gradio_client).

``running_app`` starts the app on a folder (the app loads ``--model`` itself, as ``python app.py
--model ...`` does). ``ModelAppChecks`` holds the common flow: the start-up line and the family's
round defaults; generate, rate, compare; a round with RLR and one with DDPO, each new version's
samples in the rating queue; a version's exported LoRA loaded into a fresh plain pipeline gives the
app's images for the same seed. A family's test class subclasses it (its name starting with
``Test``) and gives only what differs as a ``FamilyApp`` in ``spec``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
PROMPT = "a red cat"
TINY_ROUND = {"steps": 1, "batch_size": 2, "sampling_steps": 3, "max_prompts": 2, "samples_per_prompt": 1,
              "sample_steps": 3, "seed": 0, "learning_rate": 0.05}


def call(client, endpoint: str, *args, **kwargs):
    return client.predict(*args, api_name=f"/{endpoint}", **kwargs)


def png(sample: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(sample["image_png_b64"]))).convert("RGB"))


def wait_round(client, timeout: float = 300) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        status = call(client, "train_status")
        if status["state"] not in ("running", "stopping", "queued"):
            return status
        time.sleep(0.5)
    raise AssertionError("the round did not finish in time")


@contextlib.contextmanager
def running_app(folder: Path, tmp_path_factory) -> Iterator:
    """The app on ``--model folder``, in-process on a free port, with its own temporary data folder."""
    from app.config import AppConfig
    from app.server import start

    # No backend passed: the app loads --model itself, as `python app.py --model ...` does.
    running = start(AppConfig(model=str(folder), data_dir=tmp_path_factory.mktemp("data"), port=0))
    try:
        yield running
    finally:
        running.close()


@dataclass(frozen=True)
class FamilyApp:
    """What one family's app test gives: its tiny folder, its plain pipeline, its defaults."""

    name: str  # the tiny folder's name, the first word of the start-up summary
    family: str  # its key in FAMILY_DEFAULTS
    save: Callable[[Path], Path]  # writes the tiny pipeline folder, returns it
    pipeline: type  # the plain diffusers pipeline class docs/own-model.md loads the export into
    guidance: float  # for generation and for the plain pipeline
    round: dict = field(default_factory=lambda: dict(TINY_ROUND))  # the tiny round's settings
    plain_kwargs: dict = field(default_factory=dict)  # what the plain pipeline call adds (eta, height/width)
    prepare: Callable | None = None  # what docs/own-model.md does to the loaded pipeline (its scheduler)


class ModelAppChecks:
    """The shared app-level flow; a subclass named ``Test...`` sets ``spec``."""

    spec: FamilyApp

    @pytest.fixture(scope="class")
    @classmethod
    def model_folder(cls, tmp_path_factory) -> Path:
        return cls.spec.save(tmp_path_factory.mktemp("models") / cls.spec.name)

    @pytest.fixture(scope="class")
    @classmethod
    def app(cls, model_folder, tmp_path_factory):
        with running_app(model_folder, tmp_path_factory) as running:
            yield running

    @pytest.fixture(scope="class")
    @classmethod
    def client(cls, app):
        return gradio_client.Client(app.url, verbose=False)

    def test_start_up_names_the_model_and_its_round_defaults(self, app):
        from app.round_config import DEFAULTS, FAMILY_DEFAULTS

        summary = app.services.model.device_summary()
        assert summary.startswith(f"{self.spec.name} on cpu, float32, 16x16"), summary
        assert app.services.round_defaults == {**DEFAULTS, **FAMILY_DEFAULTS[self.spec.family]}

    def test_generate_rate_compare(self, client):
        check_generate_rate_compare(client, self.spec.guidance)

    @pytest.mark.parametrize("estimator", ["rlr", "ddpo"])
    def test_a_round_trains_a_new_version_whose_samples_reappear(self, client, app, estimator):
        before = {v["version_id"] for v in call(client, "versions")}
        started = call(client, "train_start", {**self.spec.round, "estimator": estimator})
        assert started["settings"]["estimator"] == estimator
        status = wait_round(client)
        assert status["state"] == "finished", status
        check_new_version(client, app, before, estimator, self.spec.guidance)

    def test_exported_lora_loads_in_a_plain_pipeline(self, client, app, model_folder, tmp_path):
        def load():  # the lines of docs/own-model.md's section for the family
            pipe = self.spec.pipeline.from_pretrained(model_folder, dtype=torch.float32)
            if self.spec.prepare is not None:
                self.spec.prepare(pipe)
            return pipe

        check_exported_lora(client, app, load, self.spec.guidance, tmp_path, **self.spec.plain_kwargs)


def check_generate_rate_compare(client, guidance: float) -> None:
    """Two base samples at the native 16x16, each rated, then a pair compared."""
    samples = call(client, "generate", PROMPT, 2, 3, 3, guidance)
    assert [s["version"] for s in samples] == ["v0 (base)"] * 2
    assert all(png(s).shape == (16, 16, 3) for s in samples)
    assert not np.array_equal(png(samples[0]), png(samples[1]))
    for s, stars in zip(samples, (2, 4)):
        assert call(client, "rate", s["sample_id"], stars, "ann")["stars"] == stars
    pair = call(client, "next_pair", "bob")
    assert {pair["left"]["sample_id"], pair["right"]["sample_id"]} <= {s["sample_id"] for s in samples}
    out = call(client, "compare", pair["left"]["sample_id"], pair["right"]["sample_id"], "left", "bob")
    assert out["comparison_id"] >= 1


def check_new_version(client, app, before: set, estimator: str, guidance: float) -> None:
    """After a finished round: one new active version by ``estimator``, its samples in the rating
    queue and in generation, the reward proxy trained on the model's VAE latents."""
    versions = {v["version_id"]: v for v in call(client, "versions")}
    (new,) = set(versions) - before
    assert versions[new]["active"] and versions[new]["estimator"] == estimator
    queue = call(client, "samples_to_rate", "carl", 64)
    assert any(s["version_id"] == new for s in queue)  # the new version's samples wait to be rated
    assert call(client, "generate", PROMPT, 1, 3, 3, guidance)[0]["version_id"] == new
    proxy = json.loads((app.services.rounds.proxy_dir / "reward_proxy.json").read_text())
    assert proxy["image_encoder"]["spec"] == "vae"  # the proxy records the features it was trained on


def check_exported_lora(client, app, load_plain: Callable, guidance: float, tmp_path: Path, **plain_kwargs) -> None:
    """The last trained version's exported LoRA, loaded into ``load_plain()``'s fresh plain pipeline,
    gives the app's images for the same seed (and the PNGs the app serves), unlike the base model."""
    from app.generation import GenerationSettings, draw

    trained = [v for v in call(client, "versions") if v["weights_path"]]
    assert trained, "needs the rounds above"
    vid = trained[-1]["version_id"]
    with zipfile.ZipFile(call(client, "export_lora", vid)) as zf:
        zf.extractall(tmp_path / "lora")

    pipe = load_plain()
    pipe.load_lora_weights(tmp_path / "lora")
    seed, steps = 11, 3
    plain = pipe([PROMPT] * 2, num_inference_steps=steps, guidance_scale=guidance, **plain_kwargs,
                 generator=torch.Generator().manual_seed(seed), output_type="pt").images

    settings = GenerationSettings(steps=steps, guidance=guidance)
    with app.services.models.lock:
        ours = draw(app.services.models.backend(vid), [PROMPT] * 2, seed, settings)
        base = draw(app.services.models.backend(1), [PROMPT] * 2, seed, settings)
    assert (ours - plain).abs().max() <= 1e-4
    assert (ours - base).abs().max() > 1e-2  # the LoRA changes the images: the comparison means something

    call(client, "set_active_version", vid)  # the PNGs the app serves for that seed: the same pixels
    served = call(client, "generate", PROMPT, 2, seed, steps, guidance)
    expected = (plain.permute(0, 2, 3, 1).numpy() * 255).round()
    assert max(np.abs(png(s).astype(float) - e).max() for s, e in zip(served, expected)) <= 1
