"""Drive the whole feedback loop through the app's API, without a browser.

    python app.py &                                   # the app, on http://127.0.0.1:7860/
    python examples/api_loop.py --rounds 2            # generate, rate, compare, train, repeat

A simulated rater (``rlr_core.shapesworld.raters``: it sees images through the perception model
and has a taste, here "bold": large, warm-coloured shapes on dark backgrounds) plays the
person. Each round: draw samples of a few prompts, rate them, answer the comparisons the app
asks for, train a round and wait for it; then draw fresh samples with fixed seeds and report
the rater's mean preference score, which should rise as the model learns the taste.

Only ``gradio_client`` talks to the app; the rater needs this repository's perception model.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from gradio_client import Client
from PIL import Image

PROMPTS = ["a circle", "a square", "a triangle", "a shape"]
EVAL_SEEDS = [1001, 1002]
# A short RLR round: batch 8 (the leave-one-out baseline needs company), no guidance while
# training (twice as fast; the adapter carries over to guided sampling).
ROUND = {"estimator": "rlr", "steps": 8, "batch_size": 8, "sampling_steps": 6, "guidance": 1.0,
         "learning_rate": 3e-3, "samples_per_prompt": 2}


def decode(sample: dict) -> torch.Tensor:
    """A sample's image (3, 32, 32) in [0, 1] from its base64 PNG."""
    image = Image.open(io.BytesIO(base64.b64decode(sample["image_png_b64"]))).convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def batch(samples: Sequence[dict]) -> torch.Tensor:
    return torch.stack([decode(s) for s in samples])


def generate(client: Client, prompt: str, n: int, seed: int, steps: int, preview: bool = False) -> list[dict]:
    """Samples of the active version; ``preview``: drawn only, stored nowhere (for measuring)."""
    return client.predict(prompt, n, seed, steps, 3.0, None, preview, api_name="/generate")


def rate_all(client: Client, rater, rater_id: str, samples: list[dict]) -> None:
    stars = rater.rate(batch(samples), [s["prompt"] for s in samples])
    for sample, k in zip(samples, stars):
        client.predict(sample["sample_id"], int(k), rater_id, api_name="/rate")


def compare_some(client: Client, rater, rater_id: str, n: int) -> int:
    """Answer up to n of the pairs the app picks (before/after pairs first, then active selection)."""
    done = 0
    for _ in range(n):
        shown = time.time()
        pair = client.predict(rater_id, api_name="/next_pair")
        if not pair:
            break
        left, right = decode(pair["left"])[None], decode(pair["right"])[None]
        outcome = rater.compare(left, right, [pair["prompt"]])[0]
        client.predict(pair["left"]["sample_id"], pair["right"]["sample_id"], outcome, rater_id,
                       time.time() - shown, api_name="/compare")
        done += 1
    return done


def train(client: Client, settings: dict, admin_password: str = "", poll: float = 1.0,
          log: Callable[[str], None] = print) -> dict:
    """Start a round and wait for it; returns its final status."""
    client.predict(settings, admin_password, api_name="/train_start")
    last = None
    while True:
        status = client.predict(api_name="/train_status")
        if status["message"] != last:
            log(f"  [{status['state']} {status['progress']:.0%}] {status['message']}")
            last = status["message"]
        if status["state"] in ("finished", "failed", "stopped"):
            return status
        time.sleep(poll)


@torch.no_grad()
def preference_scores(client: Client, rater, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                      n: int = 2) -> torch.Tensor:
    """The rater's latent score of each fresh sample drawn with fixed seeds (same noise every time).
    Drawn in preview mode: measuring stores nothing, so it changes nothing the app learns from."""
    scores = []
    for prompt in prompts:
        for seed in seeds:
            samples = generate(client, prompt, n, seed, steps, preview=True)
            scores.append(rater.score(batch(samples), [s["prompt"] for s in samples]))
    return torch.cat(scores)


def preference_score(client: Client, rater, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                     n: int = 2) -> float:
    """The mean of :func:`preference_scores`."""
    return float(preference_scores(client, rater, prompts, seeds, steps, n).mean())


def guard(client: Client, admin_password: str = "", log: Callable[[str], None] = print) -> str | None:
    """What the Versions tab offers: if the blind pairs flag the active version (worse than its
    parent), roll back to the best-judged version in one call. Returns the flagged name, if any."""
    versions = client.predict(api_name="/versions")
    active = next(v for v in versions if v["active"])
    best = next((v for v in versions if v["best_judged"]), None)
    if not active["flagged"] or best is None:
        return None
    client.predict(admin_password, best["version_id"], api_name="/rollback")
    log(f"  {active['name']} is flagged ({active['wins_vs_parent']}-{active['losses_vs_parent']} vs its parent): "
        f"rolled back to {best['name']}")
    return active["name"]


def run_loop(client: Client, rater, rounds: int = 2, rater_id: str = "sim-bold", samples_per_prompt: int = 4,
             comparisons: int = 12, round_settings: dict | None = None, steps: int = 10, seed: int = 0,
             admin_password: str = "", log: Callable[[str], None] = print, judge_after: int = 4,
             use_guard: bool = False, on_score: Callable[[int, torch.Tensor], None] | None = None) -> list[float]:
    """The loop; returns the preference score before the first round and after each round.
    ``judge_after``: blind before/after pairs answered right after each round; ``use_guard``:
    roll back a flagged version (:func:`guard`) before training on it and before scoring;
    ``on_score(round, per-sample scores)``: each measurement in full (e.g. for standard errors)."""
    settings = {**ROUND, "sample_steps": steps, **(round_settings or {})}

    def measure(r: int) -> float:
        each = preference_scores(client, rater, PROMPTS, EVAL_SEEDS, steps)
        if on_score is not None:
            on_score(r, each)
        return float(each.mean())

    scores = [measure(0)]
    log(f"preference score before training: {scores[0]:.3f}")
    for r in range(rounds):
        for i, prompt in enumerate(PROMPTS):
            rate_all(client, rater, rater_id, generate(client, prompt, samples_per_prompt, seed + 100 * r + i, steps))
        n = compare_some(client, rater, rater_id, comparisons)
        log(f"round {r + 1}: rated {len(PROMPTS) * samples_per_prompt} samples, answered {n} comparisons")
        if use_guard:
            guard(client, admin_password, log)
        status = train(client, {**settings, "seed": seed + r}, admin_password, log=log)
        if status["state"] != "finished":
            raise RuntimeError(f"round {r + 1} ended {status['state']}: {status.get('error')}")
        compare_some(client, rater, rater_id, judge_after)  # the blind before/after pairs of the new version
        if use_guard:
            guard(client, admin_password, log)
        scores.append(measure(r + 1))
        wins = [v for v in client.predict(api_name="/versions") if v["active"]][0]
        log(f"round {r + 1}: {status['version_name']}, preference score {scores[-1]:.3f}, "
            f"human-judged win rate over its parent: {wins['win_rate_vs_parent']}")
    return scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:7860/")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--admin-password", default="", help="only for a public app")
    args = p.parse_args()
    torch.set_num_threads(1)
    # The simulated rater comes from this repository (run from anywhere: python examples/api_loop.py).
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from rlr_core.shapesworld import raters as simulated_raters
    from rlr_core.shapesworld.perception import load

    rater = simulated_raters.bold_taste(load(), seed=0)
    client = Client(args.url, verbose=False)
    scores = run_loop(client, rater, rounds=args.rounds, admin_password=args.admin_password)
    print("preference scores:", " -> ".join(f"{s:.3f}" for s in scores))


if __name__ == "__main__":
    main()
