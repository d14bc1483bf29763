"""The race's tables, its targets (the checks, ``{check, value, met}``) and its plot.

Scores per evaluation point (see :mod:`bench.race`): ``pixel`` (the targeted reward read by the
pixel judge), ``fidelity`` (perception, non-targeted attributes), ``quality`` (pixels),
``eval_reward`` (the perception reward trained on). "Equal samples" compares every arm at the
most samples every run reached, "equal time" at the most training seconds every run reached.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.common import print_table

Curve = list[dict]
KEYS = ("pixel", "fidelity", "quality", "eval_reward")


def mean_se(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0] if values else float("nan")), 0.0
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def fmt(values: list[float]) -> str:
    m, se = mean_se(values)
    return f"{m:.3f} +- {se:.3f}"


def at(run: Curve, key: str, limit: float) -> dict:
    """The run's last point with ``key`` (samples or train_seconds) at or below ``limit``."""
    return [pt for pt in run if pt[key] <= limit][-1]


def mean_curve(runs: list[Curve], key: str) -> tuple[list[float], list[float]]:
    n = min(len(r) for r in runs)
    return ([statistics.mean(r[i]["samples"] for r in runs) for i in range(n)],
            [statistics.mean(r[i][key] for r in runs) for i in range(n)])


def common_limits(curves: dict[str, list[Curve]]) -> tuple[int, float]:
    runs = [r for rs in curves.values() for r in rs]
    return int(min(r[-1]["samples"] for r in runs)), min(r[-1]["train_seconds"] for r in runs)


def sweep_rows(sweep: dict[tuple[str, float, int], Curve], best: dict[str, float]) -> list[dict]:
    rows = []
    for (arm, lr, seed), curve in sorted(sweep.items()):
        last = curve[-1]
        rows.append({"arm": arm, "lr": lr, "seed": seed, "samples": last["samples"],
                     **{f"final {k}": round(last[k], 4) for k in KEYS},
                     "diverged": "diverged" in last, "chosen": best.get(arm) == lr})
    return rows


def summary_rows(curves: dict[str, list[Curve]], best: dict[str, float]) -> list[dict]:
    n, t = common_limits(curves)
    rows = []
    for arm, runs in curves.items():
        rows.append({
            "arm": arm, "lr": best[arm], "seeds": len(runs), "samples": int(min(r[-1]["samples"] for r in runs)),
            "start pixel": fmt([r[0]["pixel"] for r in runs]), "final pixel": fmt([r[-1]["pixel"] for r in runs]),
            f"pixel @{n} samples": fmt([at(r, "samples", n)["pixel"] for r in runs]),
            f"pixel @{t:.0f} s": fmt([at(r, "train_seconds", t)["pixel"] for r in runs]),
            "start fidelity": fmt([r[0]["fidelity"] for r in runs]),
            "final fidelity": fmt([r[-1]["fidelity"] for r in runs]),
            "start quality": fmt([r[0]["quality"] for r in runs]),
            "final quality": fmt([r[-1]["quality"] for r in runs]),
            "final reward": fmt([r[-1]["eval_reward"] for r in runs]),
            "train seconds": round(statistics.mean(r[-1]["train_seconds"] for r in runs), 1),
            "diverged runs": sum("diverged" in r[-1] for r in runs)})
    return rows


def _versus(curves: dict[str, list[Curve]], other: str, key: str, limit: float, label: str) -> dict:
    ours = [at(r, key, limit)["pixel"] for r in curves["rlr"]]
    theirs = [at(r, key, limit)["pixel"] for r in curves[other]]
    (a, sa), (b, sb) = mean_se(ours), mean_se(theirs)
    return {"check": f"default RLR: pixel-judged score >= truncated BP's at equal {label}",
            "value": f"{a:.3f} vs {b:.3f} (SE {sa:.3f}, {sb:.3f}; {len(ours)} and {len(theirs)} seeds)",
            "met": a >= b}


def reach(runs: list[Curve], target: float) -> float | None:
    """Samples at which the seeds' mean pixel curve first reaches ``target`` (after the start)."""
    xs, ys = mean_curve(runs, "pixel")
    return next((x for x, y in zip(xs, ys) if x > 0 and y >= target), None)


def targets(curves: dict[str, list[Curve]], skipped: dict[str, str]) -> list[dict]:
    """The checks on the composition reward; an arm that did not run is reported as such."""
    out: list[dict] = []

    def missing(check: str, *needed: str) -> None:
        why = "; ".join(f"{a} not run: {skipped.get(a, 'no finished race runs of it')}"
                        for a in needed if a not in curves)
        out.append({"check": check, "value": why, "met": False})

    n, t = common_limits(curves) if curves else (0, 0.0)
    eq_s, eq_t = f"samples ({n})", f"time ({t:.0f} s of training)"
    if "rlr" in curves and "truncated-bp" in curves:
        out += [_versus(curves, "truncated-bp", "samples", n, eq_s),
                _versus(curves, "truncated-bp", "train_seconds", t, eq_t)]
    else:
        missing("default RLR: pixel-judged score >= truncated BP's at equal samples", "rlr", "truncated-bp")
    check = "default RLR: reaches DDPO's final pixel-judged score with <= 1/4 of DDPO's samples"
    if "rlr" in curves and "ddpo" in curves:
        ddpo = curves["ddpo"]
        goal = statistics.mean(r[-1]["pixel"] for r in ddpo)
        gain = goal - statistics.mean(r[0]["pixel"] for r in ddpo)
        samples = min(r[-1]["samples"] for r in ddpo)
        got = reach(curves["rlr"], goal)
        value = "not reached" if got is None else f"{got:.0f} samples ({got / samples:.2f}x of {samples})"
        if gain <= 0:
            got, value = None, f"DDPO did not improve ({gain:+.3f}); RLR: {value}"
        out.append({"check": check, "value": f"DDPO final {goal:.3f}; {value}",
                    "met": got is not None and got <= samples / 4})
    else:
        missing(check, "rlr", "ddpo")
    check = "KL regulariser: fidelity (non-targeted) drops <= 0.05 and the pixel gain is >= half of RLR's without it"
    if "rlr" in curves and "rlr-kl" in curves:
        def gain(arm: str, key: str) -> float:
            return statistics.mean(r[-1][key] - r[0][key] for r in curves[arm])
        drop, g_kl, g = -gain("rlr-kl", "fidelity"), gain("rlr-kl", "pixel"), gain("rlr", "pixel")
        out.append({"check": check, "value": f"fidelity drop {drop:.3f} (without KL {-gain('rlr', 'fidelity'):.3f}); "
                                             f"pixel gain {g_kl:+.3f} with KL, {g:+.3f} without",
                    "met": drop <= 0.05 and g > 0 and g_kl >= g / 2})
    else:
        missing(check, "rlr", "rlr-kl")
    check = "DCoT: RLR with the stage window reaches the no-window arm's final pixel-judged score with fewer samples"
    if "rlr" in curves and "rlr-dcot" in curves:
        goal = statistics.mean(r[-1]["pixel"] for r in curves["rlr"])
        base_gain = goal - statistics.mean(r[0]["pixel"] for r in curves["rlr"])
        samples = min(r[-1]["samples"] for r in curves["rlr"])
        got = reach(curves["rlr-dcot"], goal)
        ratio = None if got is None else got / samples
        value = (f"no-window final {goal:.3f} (gain {base_gain:+.3f}) at {samples} samples; with window: "
                 + ("not reached" if got is None else f"{got:.0f} samples (ratio {ratio:.2f})"))
        out.append({"check": check, "value": value, "met": ratio is not None and ratio < 1 and base_gain > 0})
        # The stage prompts change the draw before any training (the arm's start differs), so the
        # same question on gains over each arm's own start: what the window and prompts add to learning.
        check = ("DCoT (gains): RLR with the stage window and prompts gains what the no-window arm gains "
                 "over its start with fewer samples")
        got = reach_gain(curves["rlr-dcot"], base_gain)
        ratio = None if got is None else got / samples
        value = (f"no-window gain {base_gain:+.3f}; with window and prompts: start "
                 f"{statistics.mean(r[0]['pixel'] for r in curves['rlr-dcot']):.3f}, "
                 + ("not reached" if got is None else f"{got:.0f} samples (ratio {ratio:.2f})"))
        if "rlr-window" in curves:
            w = reach_gain(curves["rlr-window"], base_gain)
            value += "; the window alone (plain prompts): " + ("not reached" if w is None else f"{w:.0f} samples")
        out.append({"check": check, "value": value, "met": ratio is not None and ratio < 1 and base_gain > 0})
    else:
        missing(check, "rlr", "rlr-dcot")
    return out


def reach_gain(runs: list[Curve], gain: float) -> float | None:
    """Samples at which the seeds' mean pixel curve first rises ``gain`` above its own start."""
    xs, ys = mean_curve(runs, "pixel")
    return next((x for x, y in zip(xs, ys) if x > 0 and y - ys[0] >= gain), None)


def dcot_breakdown(curves: dict[str, list[Curve]]) -> dict:
    """The DCoT arms beside plain RLR: what the stage prompts alone change at the start, and how
    many samples each needs to reach plain RLR's final pixel score (None: not reached)."""
    if "rlr" not in curves:
        return {}
    goal = statistics.mean(r[-1]["pixel"] for r in curves["rlr"])
    out = {}
    for arm in ("rlr", "rlr-window", "rlr-dcot"):
        if arm in curves:
            runs = curves[arm]
            out[arm] = {"seeds": len(runs), **{f"{when} {k}": round(statistics.mean(r[i][k] for r in runs), 4)
                                              for when, i in (("start", 0), ("final", -1))
                                              for k in ("pixel", "fidelity", "quality")},
                        "samples to reach plain RLR's final pixel": reach(runs, goal)}
    return out


def report(args: argparse.Namespace, sweep: dict, best: dict[str, float], curves: dict[str, list[Curve]],
           skipped: dict[str, str]) -> dict:
    """Print the tables and return what the JSON holds (sweep, summary, targets, skipped arms)."""
    partial = sum(len(r) < args.rounds // args.eval_every + 1 for rs in curves.values() for r in rs)
    title = (f"race: reward {args.reward} judged by pixels, {args.rounds} steps x batch {args.batch}, K={args.steps}, "
             f"LoRA rank {args.lora_rank}" + (f" ({partial} runs unfinished)" if partial else ""))
    sweep_table = sweep_rows(sweep, best)
    if sweep_table:
        print_table(sweep_table, list(sweep_table[0]), title="learning-rate sweep (one seed each)")
    summary = summary_rows(curves, best) if curves else []
    if summary:
        print_table(summary, list(summary[0]), title=title)
    checks = targets(curves, skipped)
    print_table(checks, ["check", "value", "met"], title="race targets")
    return {"title": title, "best_lr": best, "skipped_arms": skipped, "partial_runs": partial,
            "sweep": sweep_table, "summary": summary, "targets": checks, "dcot": dcot_breakdown(curves),
            "sweep_curves": {f"{a}-lr{lr:g}-seed{s}": c for (a, lr, s), c in sweep.items()}}


def plot(curves: dict[str, list[Curve]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("samples", "pixel", "targeted score (pixel judge) vs samples"),
              ("train_seconds", "pixel", "targeted score (pixel judge) vs training time (s)"),
              ("samples", "fidelity", "fidelity, non-targeted attributes (perception)"),
              ("samples", "quality", "image quality (pixels)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 4.2))
    for ax, (x_key, y_key, label) in zip(axes, panels):
        for arm, runs in curves.items():
            n = min(len(r) for r in runs)
            xs = np.array([[pt[x_key] for pt in r[:n]] for r in runs]).mean(0)
            ys = np.array([[pt[y_key] for pt in r[:n]] for r in runs])
            se = ys.std(0) / max(len(runs), 1) ** 0.5
            ax.plot(xs, ys.mean(0), label=f"{arm} ({len(runs)})", marker="o", ms=3)
            ax.fill_between(xs, ys.mean(0) - se, ys.mean(0) + se, alpha=0.2)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title + " (mean +- SE over seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
