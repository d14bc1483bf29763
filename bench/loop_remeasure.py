"""Give loop runs measured before the benchmark kept each image's fidelity their per-image data.

    python -m bench.loop_remeasure --cache runs/loop_held24 --threads 2

``bench/loop.py`` now keeps each measured image's pixel fidelity (``fidelity_images``), from which
``bench/loop_report.py`` gives every fidelity drop its paired standard error. Runs made before
that have only the means. For each finished run in ``--cache`` whose app data folder was kept
(``--keep-data``), this serves the app on a copy of that folder (the kept one stays as the run left
it), redraws every version that was active after a round (what the fidelity target checks), on
the benchmark's own fixed noise
(:func:`bench.loop.measure`), and adds ``fidelity_images`` to each row, but only where the redrawn
means equal the recorded ones: the images are then the ones the run judged, not new ones.
A row whose means differ keeps no per-image data, and the run says so (``remeasure_mismatch``).
Then summarise the cache again with ``python -m bench.loop ... --from-cache``.

``--replicate N --json FILE``: a miss by less than a standard error could be noise. For every
version a run made active that lost more than 0.05 on the held-out prompts, this draws the same
held-out prompts on N fresh seeds (``REPLICATION_SEEDS``, none the benchmark's) for that version
and the base, and reports the drop there: an independent second reading of the loss, and the
pooled one over both sets of images, each with its paired standard error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.common import machine, save_json_atomic, write_json

TOLERANCE = 1e-3  # the recorded means are rounded to 4 places
REPLICATION_SEEDS = [2101, 2102, 2103, 2104, 2105, 2106, 2107, 2108]  # fresh noise for --replicate


@contextlib.contextmanager
def app_on_copy(data: Path) -> Iterator[tuple[Any, dict[str, int]]]:
    """The app served on a copy of a kept data folder (the kept one stays as the run left it):
    an API client, and the version ids by name."""
    import gradio_client

    from app.config import AppConfig
    from app.server import serve
    from rlr_core.backends.builtin import BuiltinBackend

    with tempfile.TemporaryDirectory(prefix="rlr-remeasure-") as tmp:
        copy = Path(tmp) / "data"
        shutil.copytree(data, copy)
        with serve(AppConfig(data_dir=copy, port=0), BuiltinBackend.load()) as app:
            client = gradio_client.Client(app.url, verbose=False)
            yield client, {v["name"]: v["version_id"] for v in client.predict(api_name="/versions")}


def rows_to_measure(run: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(a measured dict, the name of the version it measured) for every row of the run without
    per-image data that measured a version active after some round (each round's active version,
    and a new version that went live; one a guard kept out is not redrawn: about 3 minutes a
    version on 2 cores)."""
    active = {r.get("active_version") or r["version"] for r in run["rounds"]}
    todo = []
    for r in run["rounds"]:
        if "fidelity_images" not in r:
            todo.append((r, r.get("active_version") or r["version"]))
        new = r.get("new_version")
        if new is not None and "fidelity_images" not in new and r["version"] in active:
            todo.append((new, r["version"]))
    return todo


def same_means(recorded: dict[str, Any], redrawn: dict[str, Any]) -> bool:
    return all(abs(recorded[k] - redrawn[k]) <= TOLERANCE for k in ("fidelity_rated", "fidelity_held_out"))


def remeasure(run_file: Path, data: Path, base_cache: dict[str, Any]) -> int:
    """Adds per-image fidelity to one cached run; returns how many rows got it. Every run starts
    from the same base model and the benchmark draws it on the same noise, so the base's redrawn
    fidelity is kept in ``base_cache`` and drawn once (its score depends on the taste, its
    fidelity does not)."""
    from bench.loop import load_example, measure
    from rlr_core.shapesworld import raters
    from rlr_core.shapesworld.perception import load

    run = json.loads(run_file.read_text())
    todo = rows_to_measure(run)
    if not todo:
        return 0
    example = load_example()
    rater = raters.RATERS[run["taste"]](load(), seed=run["seed"])
    base_name = run["rounds"][0]["version"]
    added, redrawn_by_name, mismatched = 0, {n: m for n, m in base_cache.items() if n == base_name}, []
    with app_on_copy(data) as (client, ids):
        for row, name in tqdm(todo, desc=run_file.stem, unit="version"):
            if name not in redrawn_by_name:
                redrawn_by_name[name] = measure(client, example, rater, ids[name])
            redrawn = redrawn_by_name[name]
            if same_means(row, redrawn):
                row["fidelity_images"] = redrawn["fidelity_images"]
                added += 1
            else:
                mismatched.append({"version": name, "recorded": [row["fidelity_rated"], row["fidelity_held_out"]],
                                   "redrawn": [redrawn["fidelity_rated"], redrawn["fidelity_held_out"]]})
    if base_name in redrawn_by_name:
        base_cache[base_name] = redrawn_by_name[base_name]
    if mismatched:
        run["remeasure_mismatch"] = mismatched
    save_json_atomic(run_file, run)
    return added


def held_out_misses(run: dict[str, Any]) -> list[str]:
    """The active versions of a run that lost more than the tolerance on the held-out prompts."""
    from bench.loop_report import FIDELITY_TOLERANCE

    base = run["rounds"][0]["fidelity_held_out"]
    return sorted({r["active_version"] for r in run["rounds"][1:]
                   if base - r["fidelity_held_out"] > FIDELITY_TOLERANCE})


def drop_and_se(base: list[float], version: list[float]) -> dict[str, float]:
    """The mean drop from ``base`` to ``version`` (the same images' noise, in order) and its paired SE."""
    from app.fidelity_guard import paired_drop

    drop, se = paired_drop(dict(enumerate(base)), dict(enumerate(version)))
    return {"drop": round(drop, 4), "se": round(se, 4), "images": len(base)}


def replicate(run_file: Path, data: Path, seeds: list[int],
              base_cache: dict[str, list[float]]) -> list[dict[str, Any]]:
    """The held-out drop of each missing version on fresh seeds, beside the recorded one."""
    from bench.loop import HELD_OUT, _draw, load_example
    from rlr_core.shapesworld import pixel_judge

    run = json.loads(run_file.read_text())
    names = held_out_misses(run)
    if not names:
        return []
    rows = {r.get("active_version") or r["version"]: r for r in run["rounds"]}
    base_name = run["rounds"][0]["version"]
    example = load_example()
    out = []
    with app_on_copy(data) as (client, ids):

        def fresh(name: str) -> list[float]:
            images, prompts = _draw(client, example, HELD_OUT, seeds, ids[name])
            return [float(f) for f in pixel_judge.prompt_fidelity(pixel_judge.read(images), prompts)]

        if base_name not in base_cache:
            base_cache[base_name] = fresh(base_name)
        old_base = rows[base_name]["fidelity_images"]["held_out"]
        for name in tqdm(names, desc=run_file.stem, unit="version"):
            new, old = fresh(name), rows[name]["fidelity_images"]["held_out"]
            out.append({"run": run_file.stem, "version": name, "recorded": drop_and_se(old_base, old),
                        "fresh_seeds": drop_and_se(base_cache[base_name], new),
                        "pooled": drop_and_se(old_base + base_cache[base_name], old + new)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="a bench.loop cache made with --keep-data")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--replicate", type=int, default=0, metavar="N",
                   help="redraw the held-out prompts of each version that missed on N fresh seeds (at most 8)")
    p.add_argument("--json", default=None, help="where --replicate writes its readings")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    base_cache: dict[str, Any] = {}
    readings: list[dict[str, Any]] = []
    for run_file in sorted(cache.glob("*-rounds*.json")):
        if run_file.name.endswith(".partial.json"):
            continue
        data = cache / "data" / run_file.name.split("-rounds")[0]
        if not data.is_dir():
            print(f"{run_file.name}: no kept data folder ({data}), skipped", flush=True)
            continue
        if args.replicate:
            found = replicate(run_file, data, REPLICATION_SEEDS[:args.replicate], base_cache)
            for f in found:
                print(f"{f['run']} {f['version']}: held-out drop recorded {f['recorded']['drop']:.3f} "
                      f"± {f['recorded']['se']:.3f}, on fresh seeds {f['fresh_seeds']['drop']:.3f} "
                      f"± {f['fresh_seeds']['se']:.3f}, pooled {f['pooled']['drop']:.3f} ± {f['pooled']['se']:.3f}",
                      flush=True)
            readings += found
            continue
        added = remeasure(run_file, data, base_cache)
        mismatch = json.loads(run_file.read_text()).get("remeasure_mismatch", [])
        print(f"{run_file.name}: {added} row(s) given per-image fidelity, {len(mismatch)} redrawn differently",
              flush=True)
    if args.replicate and args.json:
        write_json(args.json, {"machine": machine(), "cache": str(cache), "seeds": REPLICATION_SEEDS[:args.replicate],
                               "versions": readings})


if __name__ == "__main__":
    main()
