"""Prompt fidelity guarded in every round: the judges, the in-round watch, the after-round verdict,
the rounds' settings, auto-train's defaults, and the Train tab after a restart."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from app import fidelity_guard
from app.errors import AppError
from app.fidelity_guard import FidelityWatch, beyond, paired_drop, probe_prompts, verdict
from app.round_config import RoundConfig
from app.safeguards import fidelity_flags, judge
from rlr_core.sampler import SamplerSettings
from rlr_core.shapesworld import clips
from rlr_core.shapesworld import world as sw
from rlr_core.training import lora

TINY = {"steps": 1, "batch_size": 2, "sampling_steps": 4, "samples_per_prompt": 1, "sample_steps": 4, "seed": 0}


def renders(captions: list[str], seed: int = 0) -> torch.Tensor:
    rng, pyrng = np.random.default_rng(seed), random.Random(seed)
    arrays = [sw.render(sw.parse_caption(c).complete(pyrng), rng) for c in captions]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


# --- the judges ----------------------------------------------------------------------------------

def test_the_builtin_judge_scores_what_the_prompt_names_and_is_differentiable(builtin_backend):
    judge_ = builtin_backend.fidelity_judge()
    assert judge_.differentiable and not judge_.relative
    prompt = "a small red circle on the left"
    right = renders([prompt] * 4)
    wrong = renders(["a large blue square on the right"] * 4)
    s_right, s_wrong = judge_.score(right, [prompt] * 4), judge_.score(wrong, [prompt] * 4)
    assert bool(((s_right >= 0) & (s_right <= 1)).all()) and float(s_right.min()) > 0.9
    assert float(s_wrong.max()) < 0.2
    images = wrong.clone().requires_grad_(True)
    judge_.score(images, [prompt] * 4).sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    assert judge_.judges(prompt) and not judge_.judges("a shape")


def test_the_builtin_judge_counts_only_sure_readings(builtin_backend):
    from rlr_core.fidelity import _attribute_accuracy, _attribute_read_back

    judge_ = builtin_backend.fidelity_judge()
    assert judge_.confidence == 0.99
    prompt = "a small red circle on the left"
    assert judge_.accuracy(renders([prompt] * 4), [prompt] * 4).tolist() == [1.0] * 4  # renders read surely
    # the named kind is the most likely (p ~ 0.90) but not sure; the size is sure (p ~ 0.9999)
    kinds, sizes = sw.ATTRIBUTES["kind"], sw.ATTRIBUTES["size"]
    logits = {"kind": torch.tensor([[5.0 if k == "circle" else 2.0 for k in kinds]]),
              "size": torch.tensor([[10.0 if s == "small" else 0.0 for s in sizes]])}
    wanted = [{"kind": "circle", "size": "small"}]

    def accuracy(wanted_, confidence):
        return _attribute_accuracy(_attribute_read_back(logits, wanted_, sw.ATTRIBUTES, confidence)).tolist()

    assert accuracy(wanted, 0.0) == [1.0]  # most likely value: read
    assert accuracy(wanted, 0.99) == [0.5]  # sure readings only
    assert accuracy([{"kind": "square"}], 0.0) == [0.0]


def speck_images(prompts: list[str], half_extent: float = 1.5, seed: int = 0) -> torch.Tensor:
    """Each prompt's colours and background with its shape shrunk to a speck of ``half_extent`` px."""
    from rlr_core.shapesworld.presence import _image

    rng, pyrng = np.random.default_rng(seed), random.Random(seed)
    scenes = [sw.parse_caption(p).complete(pyrng) for p in prompts]
    arrays = [_image(rng, s, half_extent, sw.POSITIONS[s.position], 16.0) for s in scenes]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def test_the_builtin_judge_reads_no_shape_from_a_speck(builtin_backend):
    """The perception model alone reads a speck of the right colour in the right place as the shape
    asked for; with the presence model only the background is read back."""
    from rlr_core.fidelity import ShapesFidelity

    judge_ = builtin_backend.fidelity_judge()
    prompt = "a small red circle on the left, black background"  # 5 attributes, 1 of them the background
    specks = speck_images([prompt] * 6)
    assert judge_.presence is not None and "+presence" in judge_.reading
    assert [r for r in judge_.read_back(specks, [prompt] * 6)] == [
        {"kind": False, "colour": False, "size": False, "position": False, "background": True}] * 6
    assert judge_.accuracy(specks, [prompt] * 6).tolist() == pytest.approx([0.2] * 6)
    blind = ShapesFidelity(judge_.model, presence=None)
    blind.presence = None  # the same heads without the presence model
    assert float(blind.accuracy(specks, [prompt] * 6).mean()) > 0.5  # the blind spot it closes
    # the differentiable score falls with the speck too, and carries gradients through both models
    shapes = renders([prompt] * 6)
    assert float(judge_.score(specks, [prompt] * 6).mean()) < float(judge_.score(shapes, [prompt] * 6).mean()) - 0.5
    images = specks.clone().requires_grad_(True)
    judge_.score(images, [prompt] * 6).sum().backward()
    assert float(images.grad.abs().sum()) > 0


def test_the_clip_model_judge_reads_direction_and_speed():
    from rlr_core.backends.builtin_clips import BuiltinClipBackend
    from rlr_core.shapesworld.clip_perception import render_clips

    judge_ = BuiltinClipBackend.load().fidelity_judge()
    rng = np.random.default_rng(0)
    right = clips.parse_clip_caption("a red circle moving fast to the right")
    left = clips.parse_clip_caption("a red circle moving fast to the left")
    pyrng = random.Random(0)
    frames_right = render_clips([right.complete(pyrng) for _ in range(3)], rng)
    frames_left = render_clips([left.complete(pyrng) for _ in range(3)], rng)
    prompts = ["a red circle moving fast to the right"] * 3
    good, bad = judge_.score(frames_right, prompts), judge_.score(frames_left, prompts)
    assert float(good.min()) > float(bad.max())
    assert judge_.judges("a yellow triangle standing still") and not judge_.judges("a shape")


def test_stable_diffusion_is_judged_by_the_proxys_clip_or_not_at_all(tmp_path):
    from rlr_core.backends.latent import DiffusersLatentBackend
    from tests.test_encoders import save_tiny_clip
    from tests.tiny_sd import tiny_pipeline, tiny_tokenizer

    backend = DiffusersLatentBackend.from_pipeline(tiny_pipeline(), name="tiny-sd")
    assert backend.fidelity_judge(None) is None and backend.fidelity_judge("vae") is None
    folder = save_tiny_clip(tmp_path / "clip")
    tiny_tokenizer().save_pretrained(folder)
    judge_ = backend.fidelity_judge(f"clip:{folder}")
    assert judge_.relative and judge_.name == "clip-similarity"
    images = torch.rand(3, 3, 16, 16)
    scores = judge_.score(images, ["red", "a red", "cat"])
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 1)).all())
    clip_frames = torch.rand(2, 4, 3, 16, 16)  # AnimateDiff: every frame against the prompt
    assert judge_.score(clip_frames, ["red", "cat"]).shape == (2,)


# --- the verdict ---------------------------------------------------------------------------------

class _Judge:
    name, differentiable = "test", False

    def __init__(self, relative: bool = False):
        self.relative = relative

    def judges(self, prompt: str) -> bool:
        return prompt != "skip"


def test_the_verdict_flags_a_drop_against_the_parent_or_the_base():
    j = _Judge()
    kept = verdict(j, {"a": 0.90, "b": 0.90}, {"a": 0.92, "b": 0.92}, {"a": 0.93, "b": 0.93}, 0.05)
    assert not kept.flagged and kept.drop == pytest.approx(0.02)
    dropped = verdict(j, {"a": 0.80}, {"a": 0.90}, {"a": 0.90}, 0.05)
    assert dropped.flagged and "0.100 ± 0.000 below its parent" in dropped.note("v2")
    drifted = verdict(j, {"a": 0.86}, {"a": 0.89}, {"a": 0.93}, 0.05)  # small steps that add up
    assert drifted.flagged and "below the base model" in drifted.note("v3")
    assert not verdict(j, {"a": 0.1}, {"a": 0.9}, {"a": 0.9}, 0.0).flagged  # threshold 0: off
    rel = verdict(_Judge(relative=True), {"a": 0.19}, {"a": 0.20}, {"a": 0.25}, 0.05)
    assert rel.fidelity_base == 1.0 and rel.fidelity == pytest.approx(0.76) and rel.flagged


def test_the_verdict_reports_the_drops_standard_error_and_the_rule_can_ask_for_it():
    j, prompts = _Judge(), [f"p{i}" for i in range(16)]
    parent = dict.fromkeys(prompts, 1.0)
    # two prompts lost half their attributes, the rest kept all: 0.0625 below on average, with a
    # standard error of 0.043 from the per-prompt differences (the drop is within 2 SE of none)
    noisy = {p: 0.5 if i < 2 else 1.0 for i, p in enumerate(prompts)}
    v = verdict(j, noisy, parent, parent, 0.05)
    assert v.drop == pytest.approx(0.0625) and v.drop_se == pytest.approx(0.0427, abs=1e-4)
    assert v.flagged and "0.062 ± 0.043 below its parent" in v.note("v1")  # the point estimate decides
    assert v.metrics()["fidelity_drop_se"] == pytest.approx(0.0427, abs=1e-4)
    assert not beyond(v.drop, v.drop_se, 0.05, significance=2.0)  # asking for 2 SE lets it pass
    # the same mean drop spread over every prompt has no spread: past any number of SE
    spread = verdict(j, dict.fromkeys(prompts, 0.9375), parent, parent, 0.05)
    assert spread.drop_se == 0 and beyond(spread.drop, spread.drop_se, 0.05, significance=2.0)
    lost = verdict(j, {p: 0.5 if i < 4 else 1.0 for i, p in enumerate(prompts)}, parent, parent, 0.05)
    assert beyond(lost.drop, lost.drop_se, 0.05, significance=2.0)  # 0.125 against 2 x 0.056
    assert not beyond(0.04, 0.0, 0.05) and not beyond(0.5, 0.0, 0.0)  # under the threshold; threshold 0: off
    assert paired_drop({"a": 1.0}, {"a": 0.5, "b": 0.1}) == (0.5, 0.0)  # only shared prompts; one: no SE


def test_a_loss_on_the_held_out_probes_is_flagged_even_when_the_mean_of_all_hides_it():
    j = _Judge()
    rated, held = [f"r{i}" for i in range(12)], ["h1", "h2", "h3", "h4"]
    parent = dict.fromkeys(rated + held, 0.9)
    # the held-out prompts lost 0.15 each, the rated ones nothing: 0.0375 below on the mean of all
    new = {**dict.fromkeys(rated, 0.9), **dict.fromkeys(held, 0.75)}
    pooled = verdict(j, new, parent, parent, 0.05)
    assert pooled.drop == pytest.approx(0.0375) and not pooled.flagged
    apart = verdict(j, new, parent, parent, 0.05, held_out=held + ["unused"])
    assert apart.flagged and apart.flagged_against_parent and apart.drop == pytest.approx(0.0375)
    assert "0.150 ± 0.000 below its parent on prompts the round did not see (4 of 16 probe prompts)" in apart.note("v2")
    assert apart.metrics()["fidelity_drop_held_out"] == pytest.approx(0.15)
    assert apart.metrics()["fidelity_drop_rated"] == pytest.approx(0.0)
    # a small loss on the rated ones alone stays under the threshold, and so does the verdict
    small = verdict(j, {**dict.fromkeys(rated, 0.87), **dict.fromkeys(held, 0.9)}, parent, parent, 0.05, held_out=held)
    assert not small.flagged and small.note("v3").startswith("prompt fidelity kept")
    # the base model decides a group too: two small steps on the held-out ones add up
    base = {**parent, **dict.fromkeys(held, 0.95)}
    drifted = verdict(j, {**dict.fromkeys(rated, 0.9), **dict.fromkeys(held, 0.88)}, parent, base, 0.05, held_out=held)
    assert drifted.flagged_against_base and not drifted.flagged_against_parent
    # all probes in one group: no split
    assert verdict(j, new, parent, parent, 0.05, held_out=rated + held).groups == ()


def test_the_attributes_rule_weighs_every_named_attribute_alike(builtin_backend):
    j = builtin_backend.fidelity_judge()
    one_word = ["a circle", "a square", "a triangle", "a red shape", "a small shape", "a shape on the left",
                "a blue shape", "a large shape", "a shape on the right", "a green shape", "a yellow shape",
                "a shape in the center"]
    full = list(builtin_backend.held_out_prompts[8:12])
    weights = fidelity_guard.attribute_weights(j, one_word + full)
    assert {weights[p] for p in one_word} == {1.0}
    assert [weights[p] for p in full] == [float(len(sw.parse_caption(p).specified())) for p in full]
    assert fidelity_guard.attribute_weights(_Judge(), ["x", "y"]) == {"x": 1.0, "y": 1.0}  # no attributes: alike
    parent = dict.fromkeys(one_word + full, 0.9)
    # half the one-word prompts lost 0.15: 0.075 on the round's group, but few attributes
    new = {**parent, **dict.fromkeys(one_word[:6], 0.75)}
    split = verdict(j, new, parent, parent, 0.05, held_out=full)
    attributes = verdict(j, new, parent, parent, 0.05, held_out=full, rule="attributes")
    assert split.flagged and not attributes.flagged and attributes.groups == ()
    total = sum(weights.values())
    assert attributes.drop == pytest.approx(6 * 0.15 / total)
    assert "each attribute they name weighed alike" in attributes.note("v2")
    assert attributes.metrics()["fidelity_rule"] == "attributes"
    # the fully specified ones lost 0.15: they name most of the attributes
    lost = verdict(j, {**parent, **dict.fromkeys(full, 0.75)}, parent, parent, 0.05, rule="attributes")
    assert lost.flagged and lost.drop == pytest.approx(0.15 * sum(weights[p] for p in full) / total)
    assert lost.fidelity == pytest.approx(0.9 - lost.drop)
    # the weighted standard error: equal weights give the plain one, and it is the weighted formula
    before, after = {"a": 0.9, "b": 0.8, "c": 0.7}, {"a": 0.8, "b": 0.8, "c": 0.5}
    assert paired_drop(before, after, {"a": 1, "b": 1, "c": 1}) == pytest.approx(paired_drop(before, after))
    w = {"a": 1.0, "b": 2.0, "c": 5.0}
    d = np.array([0.1, 0.0, 0.2])
    wv = np.array([1.0, 2.0, 5.0])
    m = (wv * d).sum() / wv.sum()
    se = np.sqrt((wv ** 2 * (d - m) ** 2).sum() / wv.sum() ** 2 * 3 / 2)
    assert paired_drop(before, after, w) == pytest.approx((m, se))
    with pytest.raises(ValueError, match="unknown fidelity rule"):
        verdict(j, new, parent, parent, 0.05, rule="median")


def test_probes_are_the_rounds_prompts_their_stages_and_held_out_ones():
    got = probe_prompts(_Judge(), ["a", "skip", "b"], [["a", "c", "b"]], ["h1", "a", "h2", "h3", "h4"], limit=8)
    assert got == ["a", "b", "c", "h1", "h2", "h3", "h4"]
    few = probe_prompts(_Judge(), [f"p{i}" for i in range(10)], [], ["h1", "h2", "h3"], limit=8)
    assert few == ["p0", "p1", "p2", "p3", "p4", "p5", "h1", "h2"]  # a quarter held out


def test_more_probe_prompts_take_more_of_the_models_held_out_ones(builtin_backend):
    held = builtin_backend.held_out_prompts
    assert len(held) == len(set(held)) == 24
    own = ["a circle", "a square", "a triangle", "a shape on the left", "a small shape", "a blue shape",
           "a circle on a white background", "a triangle on the right"]
    j = builtin_backend.fidelity_judge()
    default = probe_prompts(j, own, [], held, RoundConfig.parse({}).fidelity_probe_prompts)
    assert default == own + list(held[:8])  # a default round: 8 of its own, 8 held out
    assert probe_prompts(j, own, [], held, 32) == own + list(held)


def test_a_fidelity_flag_counts_as_flagged_for_the_lineage():
    stats = [{"version_id": 1, "parent_id": None, "wins_vs_parent": 0, "losses_vs_parent": 0, "ties_vs_parent": 0},
             {"version_id": 2, "parent_id": 1, "wins_vs_parent": 3, "losses_vs_parent": 0, "ties_vs_parent": 0},
             {"version_id": 3, "parent_id": 2, "wins_vs_parent": 0, "losses_vs_parent": 0, "ties_vs_parent": 0}]
    versions = [{"id": 2, "metrics": {"fidelity_flagged": True, "fidelity_note": "v1 lost prompt fidelity"}},
                {"id": 3, "metrics": {}}]
    judged = judge(stats, fidelity_flags(versions))
    assert judged[2]["flagged"] and judged[2]["fidelity_flagged"]
    assert judged[2]["flag_reason"] == "v1 lost prompt fidelity"
    assert judged[3]["lineage_flagged"] and judged[1]["best_judged"]


# --- the in-round watch --------------------------------------------------------------------------

def test_the_watch_ends_the_round_with_the_last_good_adapter(builtin_backend):
    import copy

    backend = copy.deepcopy(builtin_backend)
    lora.add_lora(backend, rank=2, seed=0)
    judge_ = backend.fidelity_judge()
    prompts = ["a small red circle on the left", "a large blue square on the right, white background"]
    watch = FidelityWatch(backend, judge_, prompts, SamplerSettings(steps=6, guidance=3.0), threshold=0.05, every=2)
    params = lora.lora_parameters(backend)
    assert not watch.check(1)  # not a check step
    with torch.no_grad():
        for p in params:
            p.add_(1e-4 * torch.randn_like(p))  # a small, harmless move
    assert not watch.check(2) and watch.good_step == 2
    good = [p.detach().clone() for p in params]
    with torch.no_grad():
        for name, p in backend.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)  # wrecks the model
    assert watch.check(4)
    assert watch.stopped_at == 4 and watch.last < watch.reference - 0.05
    for p, g in zip(params, good):
        assert torch.equal(p.detach(), g)  # back to the adapter of step 2, exactly


class _Scripted(_Judge):
    """Reads each prompt as ``now`` says; names as many attributes as the prompt has words after "a"."""

    def __init__(self, now: dict[str, float]):
        super().__init__()
        self.now = now

    def wanted(self, prompt: str) -> dict[str, str]:
        return {str(i): w for i, w in enumerate(prompt.split()[1:])}

    def accuracy(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([self.now[p] for p in prompts])


def test_the_watch_reads_a_drop_by_the_rounds_rule(builtin_backend):
    import copy

    backend = copy.deepcopy(builtin_backend)
    lora.add_lora(backend, rank=2, seed=0)
    one_word = [f"a p{i}" for i in range(6)]
    full = ["a b c d e f", "a g h i j k"]  # five attributes each
    reference = dict.fromkeys(one_word + full, 0.9)
    now = {**reference, **dict.fromkeys(one_word, 0.8)}  # 0.075 on the plain mean, 0.0375 per attribute
    blank = lambda backend, texts, *args, **kwargs: torch.zeros(len(texts), 3, 8, 8)  # noqa: E731
    settings = SamplerSettings(steps=4, guidance=3.0)
    watches = {rule: FidelityWatch(backend, _Scripted(now), one_word + full, settings, threshold=0.05, every=1,
                                   reference=reference, draw_fn=blank, rule=rule) for rule in ("split", "attributes")}
    assert watches["split"].check(1) and not watches["attributes"].check(1)
    assert watches["attributes"].last == pytest.approx(0.9 - 0.0375)


# --- rounds through the app -------------------------------------------------------------------------

@pytest.fixture()
def services(tmp_path, builtin_backend):
    from app.config import AppConfig
    from app.services import AppServices

    s = AppServices(AppConfig(data_dir=tmp_path / "data"), builtin_backend)
    yield s
    s.close()


def rate_some(services, rater: str = "ann") -> None:
    samples = services.generation.generate("a blue circle", 3, 0, 4, 3.0)
    ids = [x["sample_id"] for x in samples]
    for sid, stars in zip(ids, [1, 3, 5]):
        services.judgements.rate(sid, rater, stars)
    services.judgements.compare(ids[0], ids[2], "right", rater, 1.0)


def finish(services, timeout: float = 300) -> dict:
    assert services.worker.wait(timeout), "the round did not end"
    status = services.rounds.status()
    assert status["state"] == "finished", status
    return status


# A reward that ignores the prompt at a learning rate that overwrites the model; no regularisers.
WRECK = {**TINY, "steps": 3, "learning_rate": 0.5, "lora_rank": 8, "uncertainty_penalty": 0, "patience": 0,
         "fidelity_check_every": 0, "sample_steps": 10}


def test_a_round_that_wrecks_the_prompt_is_flagged_and_not_made_active(services):
    rate_some(services)
    base = services.model_versions.active()
    services.rounds.start(RoundConfig.parse({**WRECK, "fidelity_backoff": 0}))
    status = finish(services)
    assert status["fidelity_flagged"], status
    assert status["fidelity_parent"] - status["fidelity"] > 0.05
    assert "lost prompt fidelity" in status["fidelity_note"] and "stays active" in status["message"]
    assert services.model_versions.active() == base  # not made active
    row = next(v for v in services.model_versions.table() if v["version_id"] == status["version_id"])
    assert row["flagged"] and row["fidelity_flagged"] and row["metrics"]["fidelity_drop"] > 0.05
    assert services.rounds.best_judged_version() == base  # auto-train does not build on it
    services.model_versions.set_active(status["version_id"])  # the person can still choose it
    assert services.model_versions.active() == status["version_id"]


def test_a_flagged_round_scaled_back_until_it_keeps_fidelity_goes_live_at_that_scale(services):
    from app import fidelity_guard

    rate_some(services)
    base = services.model_versions.active()
    services.rounds.start(RoundConfig.parse({**WRECK, "learning_rate": 0.03, "fidelity_backoff": 6}))
    status = finish(services)
    metrics = services.store.get_model_version(status["version_id"])["metrics"]
    # wrecked at full strength; 1/64 of the change at most is as faithful as its parent
    assert metrics["fidelity_full_drop"] > 0.05 and 1 / 64 <= metrics["fidelity_strength"] <= 0.5, metrics
    assert not status["fidelity_flagged"] and services.model_versions.active() == status["version_id"] != base
    assert f"scaled back to {metrics['fidelity_strength']:g} of its round's change" in status["fidelity_note"]
    assert "at full strength it lost prompt fidelity" in status["fidelity_note"]
    # the version on disk is the scaled one: drawn again, it scores what the guard recorded
    folder = services.models.weights_path(status["version_id"])
    assert lora.read_version(folder)[0]["fidelity_strength"] == metrics["fidelity_strength"]
    probes = list(fidelity_guard.ProbeCache(services.data_dir).keys(status["version_id"]))
    prompts = [k.prompt for k in probes]
    again = fidelity_guard.measure(services.models.backend(status["version_id"]), services.fidelity_judge, prompts,
                                   probes[0].settings(), fidelity_guard.PROBE_IMAGES)
    assert fidelity_guard.mean(again) == pytest.approx(metrics["fidelity"], abs=1e-3)


def test_a_gentle_round_keeps_fidelity_and_goes_live(services):
    from app import fidelity_guard

    rate_some(services)
    parent = services.model_versions.active()
    services.rounds.start(RoundConfig.parse({**TINY, "learning_rate": 1e-6, "kl_coef": 0.5, "fidelity_weight": 1.0,
                                             "fidelity_probe_images": 3}))
    status = finish(services)
    assert not status["fidelity_flagged"] and abs(status["fidelity_drop"]) < 0.02, status
    assert services.model_versions.active() == status["version_id"]
    # the guard drew 3 images per probe prompt of the new version and of its parent, and cached them as such
    # (the parent's 2-image scores are the in-round watch's)
    cache = fidelity_guard.ProbeCache(services.data_dir)
    assert {k.per_prompt for k in cache.keys(status["version_id"])} == {3}
    assert 3 in {k.per_prompt for k in cache.keys(parent)}
    metrics = services.store.get_model_version(status["version_id"])["metrics"]
    assert metrics["fidelity_weight"] == 1.0 and metrics["fidelity_probes"] >= 8
    assert status["history"][0]["fidelity"] is not None  # the judge on the round's own samples, plotted


def test_auto_train_uses_the_models_defaults_where_the_last_settings_are_silent(services):
    rate_some(services)
    services.rounds.set_auto_train(1)
    # what an older app stored as the last settings: no estimator named
    services.state.update(extra={"last_settings": {k: v for k, v in TINY.items() if k != "seed"}})
    services.judgements.rate(services.generation.generate("a red square", 1, 1, 4, 3.0)[0]["sample_id"], "ann", 4)
    assert services.worker.status().active  # the judgement started a round
    status = finish(services)
    assert status["estimator"] == services.round_defaults["estimator"]
    assert services.store.training_rounds()[-1]["config"]["estimator"] == services.round_defaults["estimator"]
    assert services.rounds.next_estimator() == services.round_defaults["estimator"]


def test_the_train_tab_shows_the_last_round_after_a_restart(services, builtin_backend):
    from app.config import AppConfig
    from app.services import AppServices
    from app.tabs.train import plots, summary

    rate_some(services)
    services.rounds.start(RoundConfig.parse({**TINY, "steps": 2}))
    before = finish(services)
    services.close()
    again = AppServices(AppConfig(data_dir=services.data_dir), builtin_backend)
    try:
        status = again.rounds.status()
        assert status["state"] == "finished" and status["round_id"] == before["round_id"]
        assert [r["step"] for r in status["history"]] == [1, 2]
        rewards, spread, fidelity = plots(status["history"])
        assert len(rewards) == 4 and len(fidelity) == 2
        assert "Fidelity guard" in summary(status) and before["version_name"] in summary(status)
    finally:
        again.close()


def test_the_guard_settings_are_validated():
    with pytest.raises(AppError, match="fidelity threshold"):
        RoundConfig.parse({"fidelity_threshold": 2})
    with pytest.raises(AppError, match="KL coefficient"):
        RoundConfig.parse({"kl_coef": -1})
    for bad in (0, 17, 2.5, "many"):
        with pytest.raises(AppError, match="fidelity probe images"):
            RoundConfig.parse({"fidelity_probe_images": bad})
    assert RoundConfig.parse({"fidelity_probe_images": 4}).public()["fidelity_probe_images"] == 4
    for bad in (3, 65, "all"):
        with pytest.raises(AppError, match="fidelity probe prompts"):
            RoundConfig.parse({"fidelity_probe_prompts": bad})
    with pytest.raises(AppError, match="fidelity rule"):
        RoundConfig.parse({"fidelity_rule": "median"})
    chosen = RoundConfig.parse({"fidelity_probe_prompts": 32, "fidelity_rule": "attributes"})
    assert (chosen.fidelity_probe_prompts, chosen.fidelity_rule) == (32, "attributes")
    assert RoundConfig.parse(chosen.public()) == chosen
    config = RoundConfig.parse({"estimator": "ddpo", "kl_coef": 0.2})
    assert config.training.estimator.options == {"kl_coef": 0.2} and config.public()["kl_coef"] == 0.2


def test_probe_scores_are_cached_per_version_and_probe(tmp_path, builtin_backend):
    from app.fidelity_guard import CACHE_FILE, ProbeCache

    cache = ProbeCache(tmp_path)
    judge_ = builtin_backend.fidelity_judge()
    settings = SamplerSettings(steps=3, guidance=3.0)
    first = cache.scores(1, builtin_backend, judge_, ["a red circle", "a small blue square"], settings, 1)
    stored = (tmp_path / CACHE_FILE).read_text()
    again = cache.scores(1, builtin_backend, judge_, ["a red circle", "a small blue square"], settings, 1)
    assert again == first and (tmp_path / CACHE_FILE).read_text() == stored  # nothing drawn twice
    more = cache.scores(1, builtin_backend, judge_, ["a red circle", "a green triangle"], settings, 1)
    assert more["a red circle"] == first["a red circle"] and set(more) == {"a red circle", "a green triangle"}
    other = cache.scores(2, builtin_backend, judge_, ["a red circle"], SamplerSettings(steps=4, guidance=3.0), 1)
    assert set(other) == {"a red circle"}
    keys = cache.keys(1)  # what each score was measured on, read back
    assert sorted(k.prompt for k in keys) == ["a green triangle", "a red circle", "a small blue square"]
    assert {(k.per_prompt, k.steps, k.guidance, k.judge) for k in keys} == {(1, 3, 3.0, judge_.name)}
    assert keys[0].settings().steps == 3 and cache.keys(3) == []
    data = json.loads((tmp_path / CACHE_FILE).read_text())
    data["2"]["[1, 2]"] = 0.5  # a key another version of the app wrote is skipped, not a crash
    (tmp_path / CACHE_FILE).write_text(json.dumps(data))
    assert [k.prompt for k in cache.keys(2)] == ["a red circle"]
    (tmp_path / CACHE_FILE).write_text("not json")  # a damaged cache costs a redraw, not the round
    redrawn = cache.scores(1, builtin_backend, judge_, ["a red circle"], settings, 1)
    assert redrawn == {"a red circle": first["a red circle"]}  # the same noise, the same score


def test_a_probe_prompt_scores_the_same_whatever_is_probed_with_it(builtin_backend, tmp_path):
    """The guard caches a version's scores per prompt, so a prompt's noise must not depend on the
    other probes; and a fresh adapter (B = 0) is the parent, so the watch may start from the cache."""
    import copy

    from app.fidelity_guard import ProbeCache, measure

    judge_ = builtin_backend.fidelity_judge()
    settings = SamplerSettings(steps=4, guidance=3.0)
    prompts = ["a small red circle on the left", "a large blue square on the right, white background",
               "a green triangle in the center"]
    seen: list[tuple[list[str], torch.Tensor]] = []

    class Recording:  # the judge, keeping the images it was shown
        def accuracy(self, images, texts):
            seen.append((list(texts), images.clone()))
            return judge_.accuracy(images, texts)

    alone = measure(builtin_backend, Recording(), prompts[2:], settings, 2)
    together = measure(builtin_backend, Recording(), prompts, settings, 2)
    assert together[prompts[2]] == alone[prompts[2]]
    shown = [images[[i for i, t in enumerate(texts) if t == prompts[2]]] for texts, images in seen]
    assert len(shown) == 2 and len(shown[0]) == 2
    torch.testing.assert_close(shown[0], shown[1], rtol=0, atol=1e-5)  # the same noise, alone or with others
    cached = ProbeCache(tmp_path).scores(1, builtin_backend, judge_, prompts, settings, 2)
    assert cached == together
    backend = copy.deepcopy(builtin_backend)
    lora.add_lora(backend, rank=2, seed=0)
    fresh = FidelityWatch(backend, judge_, prompts, settings, threshold=0.05, every=2)
    from_cache = FidelityWatch(backend, judge_, prompts, settings, threshold=0.05, every=2, reference=cached)
    assert from_cache.reference == fresh.reference


def test_the_train_tab_says_what_the_builtin_guard_reads(builtin_backend):
    from app.tabs.train import guard_note

    note = guard_note(builtin_backend.fidelity_judge())
    assert "p ≥ 0.99" in note and "a speck is none" in note
    assert "not guarded" in guard_note(None)
