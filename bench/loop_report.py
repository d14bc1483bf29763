"""bench/loop.py's verdicts and pictures: the targets checked on each run, the guard scored against
the pixels, the per-arm table and targets, the per-round markdown and the Pareto plot.

Kept apart from the runner so the checks can be tested on runs whose answers are known
(``tests/test_bench_loop.py``) without starting an app."""

from __future__ import annotations

import statistics
from typing import Any

from app.fidelity_guard import paired_drop

FIDELITY_TOLERANCE = 0.05
# fidelity is checked on each group of prompts apart: the short ones the rater rates, and the fully
# specified held-out ones nobody rates (runs measured before the split, with 16 held-out images of
# 80, are checked on the mean of all)
FIDELITY_GROUPS = ("fidelity_rated", "fidelity_held_out")


def fidelity_drop(base: dict[str, Any], version: dict[str, Any]) -> float:
    """The larger of the groups' pixel-fidelity drops from ``base`` to ``version``."""
    split = all(g in base and g in version for g in FIDELITY_GROUPS)
    groups = FIDELITY_GROUPS if split else ("fidelity",)
    return round(max(base[g] - version[g] for g in groups), 4)


def fidelity_drop_se(base: dict[str, Any], version: dict[str, Any]) -> float | None:
    """The paired standard error of :func:`fidelity_drop` (its larger group's), image by image on
    the same noise; None for runs measured before the images' fidelity was kept."""
    if not all(k in base and k in version for k in ("fidelity_images", *FIDELITY_GROUPS)):
        return None
    group = max(FIDELITY_GROUPS, key=lambda g: base[g] - version[g]).removeprefix("fidelity_")
    pairs = [(b, a) for b, a in zip(base["fidelity_images"][group], version["fidelity_images"][group])
             if b is not None and a is not None]
    return round(paired_se([a for _, a in pairs], [b for b, _ in pairs]), 4)


def paired_se(a: list[float], b: list[float]) -> float:
    """The standard error of mean(a - b) from the paired differences (the guard's own rule)."""
    return paired_drop(dict(enumerate(b)), dict(enumerate(a)))[1]


def run_checks(run: dict[str, Any]) -> dict[str, Any]:
    """The targets checked on one run: the round-1 rise, fidelity at every round, the last round."""
    rows = run["rounds"]
    base = rows[0]
    rise = rows[1]["score"] - base["score"]
    rise_se = paired_se(rows[1]["scores"], base["scores"])
    drops = [fidelity_drop(base, r) for r in rows[1:]]
    last, earlier = rows[-1], rows[1:-1]
    best = max(earlier, key=lambda r: r["score"]) if earlier else base
    last_se = paired_se(last["scores"], best["scores"]) if last["version_id"] != best["version_id"] else 0.0
    unflagged_losses = [r["round"] for r in rows[1:] if not r["guard_flagged"]
                        and fidelity_drop(base, r["new_version"]) > FIDELITY_TOLERANCE]
    return {"rise_round1": round(rise, 4), "rise_se": round(rise_se, 4), "rise_ok": rise > 0 and rise >= 3 * rise_se,
            "fidelity_drops": drops, "fidelity_drop_se": [fidelity_drop_se(base, r) for r in rows[1:]],
            "fidelity_ok": all(d <= FIDELITY_TOLERANCE for d in drops),
            "last_minus_best_earlier": round(last["score"] - best["score"], 4), "last_se": round(last_se, 4),
            "last_ok": last["score"] >= best["score"] - last_se, "unflagged_fidelity_losses": unflagged_losses,
            "round_wall_s": [r["round_wall_s"] for r in rows[1:]]}


def guard_confusion(runs: list[dict[str, Any]], threshold: float = FIDELITY_TOLERANCE) -> dict[str, Any]:
    """How the guard's verdicts on every new version compare with the pixels (a loss: more than
    ``threshold`` below the base's pixel fidelity): as run, and as the rule on the point estimate
    of the mean of all probes alone (a drop past the threshold: no standard errors, no groups of
    probes judged apart) would have judged the same scores; and,
    where the run redrew them (``guard_on_pixels``), against the pixel judge's verdict on the
    guard's own probe images ("on_its_probes": a loss is a version the same rule flags there)."""
    from app import fidelity_guard

    counts = {rule: {"losses": 0, "losses_flagged": 0, "faithful": 0, "faithful_flagged": 0}
              for rule in ("as_run", "point_estimate")}
    for run in runs:
        base = run["rounds"][0]
        for r in run["rounds"][1:]:
            if r.get("guard_fidelity") is None:
                continue
            parent = r["guard_fidelity_parent"]
            drop = max(parent, r.get("guard_fidelity_base") or parent) - r["guard_fidelity"]
            point = fidelity_guard.beyond(drop, 0.0, threshold, significance=0.0)  # the app's rule, no SE
            kind = "losses" if fidelity_drop(base, r["new_version"]) > threshold else "faithful"
            for rule, flagged in (("as_run", r["guard_flagged"]), ("point_estimate", point)):
                counts[rule][kind] += 1
                counts[rule][f"{kind}_flagged"] += int(flagged)
            if r.get("guard_on_pixels"):  # the guard's own probes, read by the pixel judge (bench/guard_probes.py)
                kind = "losses" if r["guard_on_pixels"]["fidelity_flagged"] else "faithful"
                probes = counts.setdefault("on_its_probes", {"losses": 0, "losses_flagged": 0, "faithful": 0,
                                                             "faithful_flagged": 0})
                probes[kind] += 1
                probes[f"{kind}_flagged"] += int(r["guard_flagged"])
    return counts


def summarise(runs: list[dict[str, Any]], default_arm: str,
              idle: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], []).append(run)
    table = []
    for arm, arm_runs in by_arm.items():
        n_rounds = min(len(r["rounds"]) for r in arm_runs)
        for taste in sorted({r["taste"] for r in arm_runs}):
            these = [r for r in arm_runs if r["taste"] == taste]
            row: dict[str, Any] = {"arm": arm, "taste": taste, "seeds": len(these)}
            for i in range(n_rounds):
                row[f"score_{i}"] = round(statistics.mean(r["rounds"][i]["score"] for r in these), 3)
                row[f"fidelity_{i}"] = round(statistics.mean(r["rounds"][i]["fidelity"] for r in these), 3)
                for group in FIDELITY_GROUPS:  # each group apart, where the runs measured it
                    if all(group in r["rounds"][i] for r in these):
                        row[f"{group}_{i}"] = round(statistics.mean(r["rounds"][i][group] for r in these), 3)
            for i in range(1, n_rounds):  # the round's new version, also where the guard kept it inactive
                for key in ("score", "fidelity", "quality"):
                    row[f"new_{key}_{i}"] = round(statistics.mean(r["rounds"][i]["new_version"][key] for r in these), 3)
            row["quality_last"] = round(statistics.mean(r["rounds"][n_rounds - 1]["quality"] for r in these), 3)
            row["flagged"] = sum(x["guard_flagged"] for r in these for x in r["rounds"][1:])
            walls = [x["round_wall_s"] for r in these for x in r["rounds"][1:]]
            row["round_s"] = round(statistics.mean(walls), 1)
            table.append(row)
    checks = {f"{r['arm']}/{r['taste']}/{r['seed']}": run_checks(r) for r in runs}
    default = {k: c for k, c in checks.items() if k.startswith(f"{default_arm}/")}
    tastes = sorted({r["taste"] for r in runs if r["arm"] == default_arm})
    seeds_per_taste = {t: sum(r["arm"] == default_arm and r["taste"] == t for r in runs) for t in tastes}
    walls = {arm: max(x["round_wall_s"] for r in arm_runs for x in r["rounds"][1:]) for arm, arm_runs in by_arm.items()}
    unflagged = {k: c["unflagged_fidelity_losses"] for k, c in checks.items() if c["unflagged_fidelity_losses"]}
    targets = [
        {"check": f"{default_arm}: tastes x seeds measured (>= 2 tastes, >= 3 seeds each)",
         "value": seeds_per_taste, "met": len(tastes) >= 2 and all(n >= 3 for n in seeds_per_taste.values())},
        {"check": f"{default_arm}: score rises >= 3 SE in round 1, every run",
         "value": {k: [c["rise_round1"], c["rise_se"]] for k, c in default.items()},
         "met": bool(default) and all(c["rise_ok"] for c in default.values())},
        {"check": f"{default_arm}: pixel-judged fidelity within {FIDELITY_TOLERANCE} of the base at every round, "
                  "on rated and on held-out prompts, every run (the larger drop)",
         "value": {k: c["fidelity_drops"] for k, c in default.items()},
         "met": bool(default) and all(c["fidelity_ok"] for c in default.values())},
        {"check": f"{default_arm}: score after the last round >= best earlier round's - 1 SE, every run",
         "value": {k: [c["last_minus_best_earlier"], c["last_se"]] for k, c in default.items()},
         "met": bool(default) and all(c["last_ok"] for c in default.values())},
        {"check": f"no arm loses more than {FIDELITY_TOLERANCE} pixel fidelity in a new version without the guard "
                  "flagging it",
         "value": unflagged or "none", "met": not unflagged},
    ]
    idle_walls = [x["round_wall_s"] for r in idle or [] if r["arm"] == default_arm for x in r["rounds"][1:]]
    if idle_walls:  # runs alone on the machine, 2 torch threads (--idle-cache)
        targets.append({"check": f"a {default_arm} round takes <= 120 s on 2 idle cores (s, each round measured)",
                        "value": idle_walls, "met": max(idle_walls) <= 120})
    else:
        targets.append({"check": f"a {default_arm} round takes <= 120 s on 2 idle cores",
                        "value": "not measured on idle cores (--idle-cache)", "met": False})
    # two runs shared the 2 cores, 1 thread each: upper bounds of what a person waits
    return {"table": table, "checks": checks, "targets": targets, "longest_round_s_per_arm_shared_cores": walls,
            "guard_against_pixels": guard_confusion(runs)}


def markdown(runs: list[dict[str, Any]]) -> str:
    """Per run, per round: the active version's score, pixel fidelity and quality, and the new
    version's when the guard kept it inactive (docs/benchmarks.md quotes these tables)."""
    lines = ["| arm | taste | seed | round | version (active) | score | pixel fidelity | held-out fidelity | quality "
             "| guard (perception) | blind W-L-T | round s |", "|" + "---|" * 12]
    for run in runs:
        for r in run["rounds"]:
            new = r.get("new_version") or {}
            flagged = r.get("guard_flagged")
            guard = "" if r["round"] == 0 else (
                f"{'**flagged** ' if flagged else ''}{r['guard_fidelity']:.3f} vs {r['guard_fidelity_parent']:.3f}")
            kept_out = f" (new {r['version']}: {new['score']:.3f} / {new['fidelity']:.3f} / {new['quality']:.3f})" \
                if flagged else ""
            wlt = "-".join(map(str, r.get("blind_wins_losses_ties", []))) if r["round"] else ""
            lines.append(f"| {run['arm']} | {run['taste']} | {run['seed']} | {r['round']} | "
                         f"{r.get('active_version', r['version'])} | {r['score']:.3f}{kept_out} | "
                         f"{r['fidelity']:.3f} | {r['fidelity_held_out']:.3f} | {r['quality']:.3f} | {guard} | {wlt} | "
                         f"{r.get('round_wall_s', '')} |")
    return "\n".join(lines)


def versions_markdown(runs: list[dict[str, Any]]) -> str:
    """Every new version: the pixels on the benchmark's images, the guard's verdict as run (its
    judge on its probes, against the parent; the larger drop of each probe group, where recorded)
    and the pixel judge's verdict on the guard's own probe images (docs/benchmarks.md)."""
    def verdict(flagged: bool, new: float, parent: float) -> str:
        return f"{'**flagged**' if flagged else 'kept'} {new:.3f} vs {parent:.3f}"

    lines = ["| taste | seed | round | new version | score | fidelity, rated | fidelity, held-out | quality "
             "| guard (new vs parent) | guard drop, rated / held-out | pixels on its probes | active after | round s |",
             "|" + "---|" * 13]
    scaling = any(r.get("guard_strength") is not None for run in runs for r in run["rounds"][1:])
    for run in runs:
        for r in run["rounds"][1:]:
            new, pixels = r["new_version"], r.get("guard_on_pixels") or {}
            groups = ("" if r.get("guard_drop_rated") is None else
                      f"{r['guard_drop_rated']:.3f} / {r['guard_drop_held_out']:.3f}")
            on_pixels = (verdict(pixels["fidelity_flagged"], pixels["fidelity"], pixels["fidelity_parent"])
                         if pixels else "")
            scaled = " | " if scaling else ""  # a column only for runs that could scale a version back
            if (r.get("guard_strength") or 1) < 1:  # flagged as trained, then scaled back until it passed
                scaled = f"{r['guard_strength']:g} (as trained: {r['guard_full_fidelity']:.3f}) | "
            lines.append(f"| {run['taste']} | {run['seed']} | {r['round']} | {r['version']} | {new['score']:.3f} | "
                         f"{new['fidelity_rated']:.3f} | {new['fidelity_held_out']:.3f} | {new['quality']:.3f} | "
                         f"{verdict(r['guard_flagged'], r['guard_fidelity'], r['guard_fidelity_parent'])} | "
                         f"{groups} | {scaled}{on_pixels} | {r['active_version']} | "
                         f"{r['round_wall_s']} |")
    if scaling:
        lines[0] = lines[0].replace("| pixels on its probes",
                                    "| scaled back to (guard as trained) | pixels on its probes")
        lines[1] += "---|"
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tastes = sorted({r["taste"] for r in runs})
    fig, axes = plt.subplots(1, len(tastes), figsize=(6 * len(tastes), 4.5), squeeze=False)
    for ax, taste in zip(axes[0], tastes):
        for arm in sorted({r["arm"] for r in runs if r["taste"] == taste}):
            these = [r for r in runs if r["arm"] == arm and r["taste"] == taste]
            n = min(len(r["rounds"]) for r in these)
            xs = [statistics.mean(r["rounds"][i]["fidelity"] for r in these) for i in range(n)]
            ys = [statistics.mean(r["rounds"][i]["score"] for r in these) for i in range(n)]
            ax.plot(xs, ys, marker="o", label=f"{arm} ({len(these)} seeds)")
            for i, (x, y) in enumerate(zip(xs, ys)):
                ax.annotate(str(i), (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
        base = statistics.mean(r["rounds"][0]["fidelity"] for r in runs if r["taste"] == taste)
        ax.axvline(base - FIDELITY_TOLERANCE, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"taste: {taste} (numbers: rounds)")
        ax.set_xlabel("pixel-judged prompt fidelity")
        ax.set_ylabel("rater's score")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
