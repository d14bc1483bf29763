"""Which guard rule reads the loop's losses best? The guard replayed on the versions a loop made.

``bench/loop.py`` judges every new version from the pixels on its own images (64 of the rated
prompts, 64 of held-out prompts neither the rounds nor the guard see) and records the guard's
verdict as it ran. The guard's rule can change which version is active and so the whole run
after it; but whether a rule flags a version that lost fidelity can be read off the same
versions. This screen redraws the guard's probes (the round's prompts and the backend's
held-out prompts, each prompt from its fixed seed, as the guard draws them) with more images
per prompt than the guard uses, reads them with the guard's judge and with the pixel judge, and
counts, for each rule, how many of the versions that lost more than the threshold on the
benchmark's images it flags, and how many of those that did not.

Rules (each against the parent and the base model, like the guard):

- ``pooled``: the mean over the probe prompts (each prompt weighs the same);
- ``split``: ``pooled``, or either group apart (the round's prompts, the held-out ones);
- ``held-out``: ``pooled``, or the held-out group apart;
- ``attributes``: the mean over every attribute the prompts name (a fully specified prompt weighs
  as many attributes as it names, a one-word prompt one).

Each at 2 images per prompt (the guard's own: the 2-image verdicts replay the guard as it ran,
a check of the replay) and at 4 (two more from a second seed).

``--held-out N`` (default: 8, as a default round probes) replays the guard with more held-out
probe prompts: the backend's first N, then ``extra_held_out`` ones drawn from the grammar (each names kind and colour
and at least two of size, position and background, as the backend's do; none is a prompt the
loop benchmark judges or an anchor prompt). The 2-image verdicts then no longer replay the guard
as it ran; they say what a guard with N held-out probes would have read.

The runs' data folders come from ``bench/loop.py --keep-data`` (CACHE/data):

    python -m bench.guard_rules --runs runs/loop_split \\
        --json bench/results/guard_rules.json
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from app import fidelity_guard
from app.generation import GenerationSettings, draw
from app.models import ModelRegistry
from bench.common import machine, save_json_atomic, write_json
from bench.guard_probes import PixelJudge
from bench.loop_report import fidelity_drop
from feedback_store import FeedbackStore
from rlr_core.backends.builtin import BuiltinBackend
from rlr_core.shapesworld import world as sw

IMAGES = 4  # per probe prompt; the rules also read the guard's own 2 (PROBE_IMAGES)
EXTRA_SEED = 2027  # the extra held-out prompts, drawn once
THRESHOLD = 0.05
Scores = dict[str, list[float]]  # prompt -> the judge's accuracy per image


@torch.no_grad()
def probe_scores(backend: BuiltinBackend, judges: dict[str, Any], prompts: Sequence[str],
                 settings: GenerationSettings) -> dict[str, Scores]:
    """Per judge, per prompt, each image's accuracy. The first ``PROBE_IMAGES`` of a prompt are
    the guard's own (its seed, drawn as the guard draws them: a run of equal row seeds is drawn
    as if alone), the rest from a second seed, so the 2-image rules replay the verdict as run."""
    extra = IMAGES - fidelity_guard.PROBE_IMAGES
    texts = [p for p in prompts for _ in range(IMAGES)]
    row_seeds = [s for p in prompts for s in [fidelity_guard.probe_seed(p)] * fidelity_guard.PROBE_IMAGES
                 + [fidelity_guard.probe_seed(p, fidelity_guard.PROBE_SEED + 1)] * extra]
    images = draw(backend, texts, fidelity_guard.PROBE_SEED, settings, row_seeds=row_seeds)
    out = {}
    for name, judge in judges.items():
        acc = judge.accuracy(images, texts).float().view(len(prompts), IMAGES).tolist()
        out[name] = dict(zip(prompts, acc))
    return out


def per_prompt(scores: Scores, images: int) -> dict[str, float]:
    return {p: sum(v[:images]) / images for p, v in scores.items()}


def rules(judge: Any, held_out: Sequence[str], weights: dict[str, float]) -> dict[str, Callable[..., bool]]:
    """Each rule: (new, parent, base per-prompt scores) -> flagged. The first three are the
    guard's own verdict (:func:`app.fidelity_guard.verdict`), with and without its groups."""
    def verdict(new, parent, base, groups: bool) -> fidelity_guard.Verdict:
        return fidelity_guard.verdict(judge, new, parent, base, THRESHOLD, held_out=held_out if groups else ())

    def held_out_lost(v: fidelity_guard.Verdict) -> bool:
        return any(group == "held_out" for _, _, _, group in v.counted_drops())

    def by_attributes(new, parent, base) -> bool:
        drops = (fidelity_guard.paired_drop(ref, new, weights)[0] for ref in (parent, base))
        return max(drops) > THRESHOLD

    return {
        "pooled": lambda n, pa, b: verdict(n, pa, b, groups=False).flagged,
        "split": lambda n, pa, b: verdict(n, pa, b, groups=True).flagged,
        "held-out": lambda n, pa, b: verdict(n, pa, b, groups=False).flagged or held_out_lost(
            verdict(n, pa, b, groups=True)),
        "attributes": by_attributes,
    }


def extra_held_out(n: int, exclude: Sequence[str], anchors: Sequence[str] = (), seed: int = EXTRA_SEED) -> list[str]:
    """``n`` prompts in the style of the backend's held-out ones, none in ``exclude`` and none that
    an anchor prompt fits (the anchor KL holds those still, so they would show no loss)."""
    rng, out = random.Random(seed), []
    scenes = sw.all_scenes(include_held_out=False)
    taken = set(exclude)
    anchored = [sw.parse_caption(a) for a in anchors]
    while len(out) < n:
        partial = sw.random_partial(rng, rng.choice(scenes), 0.0,
                                    {"size": 0.4, "position": 0.3, "background": 0.5})
        text = sw.caption(partial).replace("a orange", "an orange")  # as the backend's own are written
        fits_an_anchor = any(all(getattr(a, k) == v for k, v in partial.specified().items()) for a in anchored)
        if len(partial.specified()) >= 4 and text not in taken and not fits_an_anchor:
            taken.add(text)
            out.append(text)
    return out


GUARD_HELD_OUT = 8  # the held-out probes of a default round (16 probe prompts, 8 of them the round's own)


def held_out_probes(base_backend: BuiltinBackend, n: int) -> list[str]:
    """The backend's first ``n`` held-out prompts, then extra ones when it has fewer. The
    backend's 9th to 24th were drawn this way once (``extra_held_out(16, ...)`` with its first 8)."""
    own = list(base_backend.held_out_prompts)
    if n <= len(own):
        return own[:n]
    from bench.loop import HELD_OUT, RATE_PROMPTS

    exclude = [*own, *HELD_OUT, *RATE_PROMPTS, *base_backend.anchor_prompts]
    return own + extra_held_out(n - len(own), exclude, base_backend.anchor_prompts)


def screen_run(run: dict[str, Any], data_dir: Path, base_backend: BuiltinBackend,
               held: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every new version of one run: the benchmark's pixel loss, and each rule's verdict, with
    ``held`` as the guard's held-out probes (default: the backend's)."""
    store = FeedbackStore(data_dir)
    models = ModelRegistry(base_backend, store, cache_size=2)
    guard_judge = base_backend.fidelity_judge()
    judges = {"guard judge": guard_judge, "pixels": PixelJudge()}
    held = list(base_backend.held_out_prompts if held is None else held)
    base_row = run["rounds"][0]
    base_id = base_row["version_id"]
    defaults = run["round_defaults"]  # the guard draws as the round's samples are drawn
    settings = GenerationSettings(steps=defaults["sample_steps"], guidance=defaults["sample_guidance"])
    cache: dict[tuple[int, tuple[str, ...]], dict[str, Scores]] = {}

    def scores(version_id: int, prompts: list[str]) -> dict[str, Scores]:
        key = (version_id, tuple(prompts))
        if key not in cache:
            cache[key] = probe_scores(models.backend(version_id), judges, prompts, settings)
        return cache[key]

    out = []
    for r in run["rounds"][1:]:
        version = store.get_model_version(r["version_id"])
        own = version["config"]["prompts"]
        probes = fidelity_guard.probe_prompts(guard_judge, own, [], held,
                                              limit=max(fidelity_guard.MAX_PROBE_PROMPTS, len(own) + len(held)))
        weights = fidelity_guard.attribute_weights(guard_judge, probes)
        new, parent, base = (scores(v, probes) for v in (r["version_id"], version["parent_id"], base_id))
        verdicts = {}
        for name, judge in judges.items():
            by_rule = rules(judge, held, weights)
            for images in (2, IMAGES):
                n, pa, b = (per_prompt(s[name], images) for s in (new, parent, base))
                for rule, flagged in by_rule.items():
                    verdicts[f"{name} / {rule} / {images}"] = flagged(n, pa, b)
        out.append({"taste": run["taste"], "seed": run["seed"], "round": r["round"], "version_id": r["version_id"],
                    "pixel_loss": fidelity_drop(base_row, r["new_version"]), "guard_as_run": r["guard_flagged"],
                    "verdicts": verdicts})
    return out


def confusion(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per rule: versions that lost more than the threshold on the benchmark's images, and those
    flagged; the same for the faithful ones."""
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        kind = "losses" if row["pixel_loss"] > THRESHOLD else "faithful"
        for rule, flagged in {"as run": row["guard_as_run"], **row["verdicts"]}.items():
            c = out.setdefault(rule, {"losses": 0, "losses_flagged": 0, "faithful": 0, "faithful_flagged": 0})
            c[kind] += 1
            c[f"{kind}_flagged"] += int(flagged)
    return out


def find_data(run: dict[str, Any], data_root: Path) -> Path | None:
    """A run's data folder, as ``bench/loop.py --keep-data`` names it."""
    named = data_root / f"{run['arm']}-{run['taste']}-seed{run['seed']}"
    return named if named.exists() else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help="bench/loop.py's --cache folder (finished runs)")
    p.add_argument("--data", default=None,
                   help="the runs' data folders (default: RUNS/data, from bench/loop.py --keep-data)")
    p.add_argument("--json", default="bench/results/guard_rules.json")
    p.add_argument("--held-out", type=int, default=GUARD_HELD_OUT,
                   help="held-out probe prompts: the backend's first N (a default round probes 8), then extra "
                        "ones from the grammar")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base_backend = BuiltinBackend.load()
    held = held_out_probes(base_backend, args.held_out)
    runs = [json.loads(f.read_text()) for f in sorted(Path(args.runs).glob("*-rounds*.json"))
            if not f.name.endswith(".partial.json")]  # finished runs, as bench/loop.py names them
    rows = []
    data_root = Path(args.data) if args.data else Path(args.runs) / "data"
    # each run's rows, kept: a screen cut short resumes
    done = Path(args.runs) / ("guard_rules" if len(held) == GUARD_HELD_OUT else f"guard_rules_held{len(held)}")
    done.mkdir(exist_ok=True)
    for run in tqdm(runs, desc="runs"):
        kept = done / f"{run['arm']}-{run['taste']}-seed{run['seed']}.json"
        if kept.exists():
            rows += json.loads(kept.read_text())["versions"]
            continue
        data = find_data(run, data_root)
        if data is None:
            print(f"no data folder for {run['taste']} seed {run['seed']}: skipped")
            continue
        screened = screen_run(run, data, base_backend, held)
        save_json_atomic(kept, {"versions": screened})
        rows += screened
    table = confusion(rows)
    print(f"{'rule':<34} losses flagged   faithful flagged")
    for rule, c in table.items():
        print(f"{rule:<34} {c['losses_flagged']:>3} of {c['losses']:<3}"
              f"       {c['faithful_flagged']:>3} of {c['faithful']}")
    write_json(args.json, {"machine": machine(), "threshold": THRESHOLD, "images_per_prompt": IMAGES,
                           "held_out_prompts": held, "runs": args.runs, "confusion": table, "versions": rows})


if __name__ == "__main__":
    main()
