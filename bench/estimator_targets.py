"""The estimator benchmark's verdicts: each target a ``{check, value, met}`` judged from the rows
of :mod:`bench.estimators`."""

from __future__ import annotations

DEFAULT_ROW = "rlr h=2 rest=lr L=3 baseline=state"  # the default RLR's row


def default_rlr_targets(by: dict[str, dict], reward: str, limit: float = 3.0) -> list[dict]:
    """The default RLR's own checks: unbiased (|bias| <= limit SE) on this reward, variance at
    least 30x below LR's at equal samples, and (fidelity reward) err_1s within 3x truncated BP K'=1's."""
    d = by.get(DEFAULT_ROW)
    if d is None:
        return []
    out = [{"check": f"default RLR: |bias| <= {limit} SE ({reward})", "value": f"{d['bias_over_se']:.2f}",
            "met": d["bias_over_se"] <= limit}]
    lr = by.get("lr (=ddpo step 1)")
    if lr:
        factor = lr["variance"] / d["variance"]
        out.append({"check": f"default RLR: variance >= 30x below LR at equal samples ({reward})",
                    "value": f"{factor:.3g}x", "met": factor >= 30})
    trunc = by.get("truncated-bp K'=1")
    if trunc and reward == "fidelity":
        ratio = d["err_1s"] / trunc["err_1s"]
        out.append({"check": "default RLR: err_1s no worse than 3x truncated BP K'=1's (fidelity reward)",
                    "value": f"{ratio:.3g}x ({d['err_1s']:.3g} vs {trunc['err_1s']:.3g})", "met": ratio <= 3})
    return out


def issue_targets(rows: list[dict], limit: float = 3.0, reward: str = "fidelity") -> list[dict]:
    """The benchmark's targets, judged from the rows; one verdict per check.

    - every RLR setting that claims unbiasedness (rest lr or zo) within ``limit`` SE of the
      reference (zo: of the parameter-smoothed objective, which the reference is not);
    - truncated BP biased by more than ``limit`` SE, a bias that does not shrink with n;
    - RLR's per-sample variance at least 2x below the all-steps likelihood ratio's (which is
      DDPO's first inner step: DDPO's later epochs reweight the same terms), factor per setting;
    - RLR's peak memory within 1.5x of truncated BP through h+1 steps.
    """
    by = {r["estimator"]: r for r in rows}
    lr_var = by.get("lr (=ddpo step 1)", {}).get("variance")
    out = default_rlr_targets(by, reward, limit)
    for r in rows:
        name = r["estimator"]
        if name.startswith("rlr"):
            h = int(name.split("h=")[1].split()[0])
            unbiased_claim = "rest=none" not in name
            if unbiased_claim:
                out.append({"check": f"{name}: |bias| <= {limit} SE", "value": f"{r['bias_over_se']:.2f}",
                            "met": r["bias_over_se"] <= limit})
            if lr_var:
                factor = lr_var / r["variance"]
                out.append({"check": f"{name}: variance >= 2x below LR/DDPO", "value": f"{factor:.3g}x",
                            "met": factor >= 2.0})
            suffix = " no-ckpt" if name.endswith("no-ckpt") else ""
            trunc = by.get(f"truncated-bp K'={h + 1}{suffix}")
            if trunc and trunc["mem_mb"] > 0:
                ratio = r["mem_mb"] / trunc["mem_mb"]
                out.append({"check": f"{name}: memory <= 1.5x truncated K'={h + 1}{suffix}", "value": f"{ratio:.2f}x",
                            "met": ratio <= 1.5})
        elif name.startswith("truncated-bp"):
            first, *_, last = r["bias_norm_by_n"].values()
            out.append({"check": f"{name}: bias > {limit} SE and not shrinking",
                        "value": f"{r['bias_over_se']:.1f} SE, ||bias|| {first:.3g} -> {last:.3g}",
                        "met": r["bias_over_se"] > limit and last > 0.5 * first})
    return out
