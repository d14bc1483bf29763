"""bench/loop.py's verdicts: the checks it writes as targets, on runs whose answers are known."""

from __future__ import annotations

import json
from pathlib import Path

from bench.loop import ARMS, cache_path, load_runs, partial_path
from bench.loop_report import guard_confusion, markdown, run_checks, summarise, versions_markdown


def row(r: int, scores: list[float], fidelity: float, flagged: bool = False, new_fidelity: float | None = None,
        version_id: int | None = None, held_out: float | None = None) -> dict:
    """A measured round; ``held_out`` (default: ``fidelity``) is the held-out prompts' pixel fidelity."""
    held = fidelity if held_out is None else held_out
    out = {"round": r, "version": f"v{r}", "version_id": version_id if version_id is not None else r + 1,
           "scores": scores, "score": sum(scores) / len(scores), "fidelity": (fidelity + held) / 2,
           "fidelity_rated": fidelity, "fidelity_held_out": held, "quality": 0.8}
    if r:
        new = new_fidelity if new_fidelity is not None else fidelity
        out.update(active_version=f"v{r}", guard_flagged=flagged, guard_fidelity=0.9, guard_fidelity_parent=0.95,
                   round_wall_s=100.0, blind_wins_losses_ties=[3, 1, 0],
                   new_version={"score": out["score"], "fidelity": (new + held) / 2, "fidelity_rated": new,
                                "fidelity_held_out": held, "quality": 0.8})
    return out


BASE = [0.40, 0.42, 0.38, 0.41, 0.39, 0.40]


def test_a_clean_rise_that_keeps_fidelity_meets_every_check():
    up = [x + 0.1 + 0.002 * i for i, x in enumerate(BASE)]
    run = {"arm": "default", "taste": "bold", "seed": 0,
           "rounds": [row(0, BASE, 0.91), row(1, up, 0.90), row(2, [x + 0.01 for x in up], 0.89)]}
    checks = run_checks(run)
    assert checks["rise_ok"] and checks["fidelity_ok"] and checks["last_ok"]
    assert checks["unflagged_fidelity_losses"] == []
    assert "| default | bold | 0 | 2 |" in markdown([run])
    run["rounds"][2].update(guard_flagged=True, guard_drop_rated=0.01, guard_drop_held_out=0.08)
    versions = versions_markdown([run]).splitlines()
    assert len(versions) == 2 + 2  # a row per new version, not the base
    assert versions[2].startswith("| bold | 0 | 1 | v1 | ") and "| kept 0.900 vs 0.950 |  |" in versions[2]
    assert "| **flagged** 0.900 vs 0.950 | 0.010 / 0.080 |" in versions[3]
    # a run that scaled a flagged version back: one more column, filled where it did
    run["rounds"][1].update(guard_strength=0.5, guard_full_fidelity=0.8)
    run["rounds"][2].update(guard_strength=1.0)
    versions = versions_markdown([run]).splitlines()
    header = [c.strip() for c in versions[0].split("|")]
    column = header.index("scaled back to (guard as trained)")
    assert all(len(line.split("|")) == len(header) for line in versions)
    assert [line.split("|")[column].strip() for line in versions[2:]] == ["0.5 (as trained: 0.800)", ""]


def test_a_noisy_rise_a_fidelity_loss_and_an_unflagged_bad_version_are_caught():
    noisy = [x + d for x, d in zip(BASE, [0.2, -0.2, 0.2, -0.2, 0.2, -0.18])]
    run = {"arm": "tbp1", "taste": "bold", "seed": 0,
           "rounds": [row(0, BASE, 0.91), row(1, noisy, 0.80, new_fidelity=0.80)]}
    checks = run_checks(run)
    assert not checks["rise_ok"]  # +0.003 against a paired SE of about 0.09
    assert not checks["fidelity_ok"] and checks["fidelity_drops"] == [0.11]
    assert checks["unflagged_fidelity_losses"] == [1]
    flagged = {**run, "rounds": [row(0, BASE, 0.91), row(1, BASE, 0.91, flagged=True, new_fidelity=0.7,
                                                         version_id=1)]}
    assert run_checks(flagged)["unflagged_fidelity_losses"] == []  # the guard caught it


def test_a_loss_on_the_held_out_prompts_alone_fails_the_fidelity_check():
    """The rated prompts keep their fidelity, the unrated, fully specified ones lose 0.08: a loss."""
    run = {"arm": "default", "taste": "bold", "seed": 0,
           "rounds": [row(0, BASE, 0.91, held_out=0.93), row(1, BASE, 0.92, held_out=0.85)]}
    checks = run_checks(run)
    assert not checks["fidelity_ok"] and checks["fidelity_drops"] == [0.08]
    assert checks["unflagged_fidelity_losses"] == [1]
    assert guard_confusion([run])["as_run"]["losses"] == 1
    assert run_checks(run)["fidelity_drop_se"] == [None]  # measured before the images were kept
    # with each image's fidelity: the larger group's drop has the paired standard error of its images
    run["rounds"][0]["fidelity_images"] = {"rated": [1.0, None, 0.5, 1.0], "held_out": [1.0, 1.0, 0.75, 1.0]}
    run["rounds"][1]["fidelity_images"] = {"rated": [1.0, None, 1.0, 1.0], "held_out": [0.75, 1.0, 0.5, 1.0]}
    diffs = [0.25, 0.0, 0.25, 0.0]  # the held-out group's, base - version
    mean = sum(diffs) / 4
    expected = (sum((d - mean) ** 2 for d in diffs) / 3 / 4) ** 0.5
    assert run_checks(run)["fidelity_drop_se"] == [round(expected, 4)]
    # runs measured before the split (no fidelity_rated) are checked on the mean of all their images
    for r in run["rounds"]:
        del r["fidelity_rated"]
    assert run_checks(run)["fidelity_drops"] == [0.035]


def test_the_guard_is_scored_against_the_pixels_as_run_and_on_its_point_estimate():
    lost = {**row(1, BASE, 0.91, new_fidelity=0.80), "guard_fidelity": 0.85}  # 0.10 below 0.95, not flagged
    kept = {**row(2, BASE, 0.91, flagged=True, new_fidelity=0.90), "guard_fidelity": 0.93}  # 0.02 below
    run = {"arm": "default", "taste": "bold", "seed": 0, "rounds": [row(0, BASE, 0.91), lost, kept]}
    got = guard_confusion([run])
    assert got["as_run"] == {"losses": 1, "losses_flagged": 0, "faithful": 1, "faithful_flagged": 1}
    assert got["point_estimate"] == {"losses": 1, "losses_flagged": 1, "faithful": 1, "faithful_flagged": 0}
    assert "on_its_probes" not in got  # runs that did not redraw the guard's probes
    # on its own probes the pixels call the kept version's drop a loss, the passed one faithful
    lost["guard_on_pixels"], kept["guard_on_pixels"] = {"fidelity_flagged": False}, {"fidelity_flagged": True}
    assert guard_confusion([run])["on_its_probes"] == {"losses": 1, "losses_flagged": 1, "faithful": 1,
                                                       "faithful_flagged": 0}


def test_the_targets_need_two_tastes_and_three_seeds_of_the_default():
    runs = [{"arm": "default", "taste": t, "seed": s, "rounds": [row(0, BASE, 0.91), row(1, BASE, 0.91)]}
            for t in ("bold", "composition") for s in (0, 1)]
    targets = summarise(runs, "default")["targets"]
    coverage = next(t for t in targets if "tastes x seeds" in t["check"])
    assert not coverage["met"] and coverage["value"] == {"bold": 2, "composition": 2}
    rise = next(t for t in targets if "rises" in t["check"])
    assert not rise["met"]  # no rise at all


def test_every_arm_is_a_valid_set_of_round_settings():
    from app.round_config import BUILTIN_IMAGE_DEFAULTS, RoundConfig

    for settings in ARMS.values():
        RoundConfig.parse(settings, BUILTIN_IMAGE_DEFAULTS)  # raises on an unknown or bad value


def test_runs_cut_short_are_summarised_only_when_asked_and_only_with_a_finished_round(tmp_path: Path):
    finished = {"arm": "default", "taste": "bold", "seed": 0, "complete": True,
                "rounds": [row(0, BASE, 0.91), row(1, BASE, 0.90), row(2, BASE, 0.90)]}
    one_round = {**finished, "seed": 1, "complete": False, "rounds": finished["rounds"][:2]}
    base_only = {**finished, "seed": 2, "complete": False, "rounds": finished["rounds"][:1]}
    cache_path(tmp_path, "default", "bold", 0, 2).write_text(json.dumps(finished))
    partial_path(tmp_path, "default", "bold", 1, 2).write_text(json.dumps(one_round))
    partial_path(tmp_path, "default", "bold", 2, 2).write_text(json.dumps(base_only))
    wanted = [("default", "bold", s) for s in (0, 1, 2)]
    assert [r["seed"] for r in load_runs(tmp_path, wanted, 2, partial=False)] == [0]
    runs = load_runs(tmp_path, wanted, 2, partial=True)
    assert [r["seed"] for r in runs] == [0, 1]
    table = summarise(runs, "default")["table"]
    assert "score_1" in table[0] and "score_2" not in table[0]  # the rounds every run reached
    assert table[0]["new_fidelity_1"] == 0.90
    assert table[0]["fidelity_rated_1"] == 0.90 and table[0]["fidelity_held_out_1"] == 0.90  # each group apart


def test_the_guards_probes_are_redrawn_and_read_from_the_pixels(tmp_path: Path, builtin_backend):
    import copy

    import torch

    from app.fidelity_guard import ProbeCache
    from app.generation import GenerationSettings
    from bench.guard_probes import PixelVerdicts, probe_set
    from rlr_core.fidelity import ShapesFidelity

    class Models:  # the app's version cache: 1 the base, 2 a version that draws noise
        def __init__(self):
            self.broken = copy.deepcopy(builtin_backend)
            torch.manual_seed(0)
            with torch.no_grad():
                for p in self.broken.denoiser.parameters():
                    p.add_(torch.randn_like(p) * 0.5)

        def backend(self, version_id: int):
            return builtin_backend if version_id == 1 else self.broken

    judge = ShapesFidelity()
    settings = GenerationSettings(steps=6, guidance=3.0)
    prompts = ["a red circle on the left", "a large blue square", "a shape"]  # the last names nothing
    cache = ProbeCache(tmp_path)
    for vid in (1, 2):
        cache.remember(vid, judge, {p: 0.5 for p in prompts}, settings)
    found = probe_set(tmp_path, 2, judge.name)
    assert found is not None and found[0] == prompts and found[1] == settings and found[2] == 2
    assert probe_set(tmp_path, 3, judge.name) is None and probe_set(tmp_path, 2, "clip-similarity") is None

    verdicts = PixelVerdicts(Models(), tmp_path, judge.name)
    same = verdicts.verdict(1, 1, 1, threshold=0.05)
    assert same["fidelity_judge"] == "pixel" and same["fidelity_probes"] == 2 and same["fidelity_drop"] == 0
    assert 0.5 < same["fidelity"] <= 1.0  # the base draws what these prompts ask for, mostly
    wrecked = verdicts.verdict(2, 1, 1, threshold=0.05)
    assert wrecked["fidelity_flagged"] and wrecked["fidelity_drop"] > 0.2, wrecked


def test_the_guard_rules_screen_reads_each_rule_as_documented():
    from bench.guard_probes import PixelJudge
    from bench.guard_rules import confusion, rules

    held = {"h1", "h2"}
    weights = {"r1": 1, "r2": 1, "r3": 1, "r4": 1, "h1": 4, "h2": 4}
    by_rule = rules(PixelJudge(), held, weights)
    parent = dict.fromkeys(weights, 0.9)
    # the held-out prompts lost 0.1, the rated ones nothing: 0.033 on the mean of the 6 prompts
    held_loss = {**parent, "h1": 0.8, "h2": 0.8}
    assert {r: f(held_loss, parent, parent) for r, f in by_rule.items()} == {
        "pooled": False, "split": True, "held-out": True, "attributes": True}  # 0.067 by attributes
    # one rated prompt lost 0.25: the rated group's mean falls 0.0625, the mean of all 0.042
    rated_loss = {**parent, "r1": 0.65}
    assert {r: f(rated_loss, parent, parent) for r, f in by_rule.items()} == {
        "pooled": False, "split": True, "held-out": False, "attributes": False}
    # against the base as well as the parent
    assert by_rule["pooled"](dict.fromkeys(weights, 0.86), parent, dict.fromkeys(weights, 0.95))
    rows = [{"pixel_loss": 0.08, "guard_as_run": False, "verdicts": {"pooled": True}},
            {"pixel_loss": 0.01, "guard_as_run": True, "verdicts": {"pooled": False}}]
    got = confusion(rows)
    assert got["pooled"] == {"losses": 1, "losses_flagged": 1, "faithful": 1, "faithful_flagged": 0}
    assert got["as run"] == {"losses": 1, "losses_flagged": 0, "faithful": 1, "faithful_flagged": 1}


def test_the_extra_held_out_probes_are_new_prompts_in_the_backends_style(builtin_backend):
    from bench.guard_rules import extra_held_out, held_out_probes
    from bench.loop import HELD_OUT, RATE_PROMPTS
    from rlr_core.shapesworld import world as sw

    own = list(builtin_backend.held_out_prompts)
    assert held_out_probes(builtin_backend, 8) == own[:8] and held_out_probes(builtin_backend, 24) == own
    exclude = [*own[:8], *HELD_OUT, *RATE_PROMPTS, *builtin_backend.anchor_prompts]
    assert own[8:] == extra_held_out(16, exclude, builtin_backend.anchor_prompts)  # the extra 16, drawn once
    held = held_out_probes(builtin_backend, 30)
    assert held[:24] == own and len(set(held)) == 30 and held == held_out_probes(builtin_backend, 30)
    extra = held[8:]
    judged_elsewhere = {*HELD_OUT, *RATE_PROMPTS, *builtin_backend.anchor_prompts}
    assert not judged_elsewhere & set(extra)  # the benchmark's own prompts stay its own
    judge = builtin_backend.fidelity_judge()
    for prompt in extra:
        named = sw.parse_caption(prompt).specified()
        assert {"kind", "colour"} <= set(named) and len(named) >= 4, prompt
        assert judge.judges(prompt) and builtin_backend.check_prompt(prompt) == prompt, prompt


def test_remeasuring_fills_the_active_versions_and_only_where_the_means_reproduce():
    from bench.loop_remeasure import rows_to_measure, same_means

    base = {"version": "v0", "fidelity_rated": 0.9, "fidelity_held_out": 0.92}
    kept = {"round": 1, "version": "v1", "active_version": "v1", "fidelity_rated": 0.91, "fidelity_held_out": 0.9,
            "new_version": {"fidelity_rated": 0.91, "fidelity_held_out": 0.9}}
    flagged = {"round": 2, "version": "v2", "active_version": "v1", "fidelity_rated": 0.91, "fidelity_held_out": 0.9,
               "new_version": {"fidelity_rated": 0.8, "fidelity_held_out": 0.7}}
    done = {"round": 3, "version": "v3", "active_version": "v1", "fidelity_images": {}, "fidelity_rated": 0.91,
            "fidelity_held_out": 0.9, "new_version": {"fidelity_rated": 0.85, "fidelity_held_out": 0.8}}
    todo = rows_to_measure({"rounds": [base, kept, flagged, done]})
    # every row's active version, and a new version only if it went live: v2 (kept out) is not redrawn
    assert [name for _, name in todo] == ["v0", "v1", "v1", "v1"]
    assert todo[2][0] is kept["new_version"] and todo[3][0] is flagged
    assert same_means(kept, {"fidelity_rated": 0.9104, "fidelity_held_out": 0.8996})
    assert not same_means(kept, {"fidelity_rated": 0.91, "fidelity_held_out": 0.88})


def test_the_replication_picks_the_active_versions_that_missed_on_held_out_prompts():
    from bench.loop_remeasure import drop_and_se, held_out_misses

    run = {"rounds": [{"version": "v0", "fidelity_held_out": 0.92},
                      {"active_version": "v1", "fidelity_held_out": 0.86},  # 0.06 below: a miss
                      {"active_version": "v1", "fidelity_held_out": 0.86},
                      {"active_version": "v2", "fidelity_held_out": 0.88}]}  # 0.04 below: within
    assert held_out_misses(run) == ["v1"]
    reading = drop_and_se([1.0, 1.0, 0.8, 0.8], [0.8, 1.0, 0.6, 0.8])
    # differences 0.2, 0, 0.2, 0: mean 0.1, sample sd 0.1155, se 0.0577
    assert reading == {"drop": 0.1, "se": 0.0577, "images": 4}
