"""Rounds must not make the model worse silently: judging versions from their blind pairs.

Every finished round draws blind before/after pairs (same prompt and noise, parent vs new
version). From the answers (wins, losses, ties; ties count one half):

- **Flagged**: the fidelity guard flagged it (``app/fidelity_guard.py``: it lost prompt
  fidelity against its parent or the base model), or the version's win rate over its parent
  is below one half with confidence: an
  exact one-sided binomial (sign) test on the decisive answers, ties left out, gives
  P(wins <= observed | win rate 1/2) below ``FLAG_ALPHA`` = 0.05 (``p_not_worse``). 6-15 is
  flagged (p = 0.039), 10-13 is not (p = 0.34), nor are 0-3 (p = 0.125): a bad round is called
  only when the pairs say so. ``win_rate_upper`` is the one-sided 95% Wilson upper bound of the
  win rate (ties count one half), shown beside it.
- **Judged strength**: the base scores 0; a version scores its parent's score plus the log-odds
  of its smoothed win rate over the parent, (wins + ties/2 + 1) / (n + 2) (Bradley-Terry strength
  added along the lineage; a version nobody judged yet scores what its parent does).
- **Best-judged**: the highest-scoring version whose lineage has no flagged version; on a tie
  the newest (so unjudged rounds still build on each other, as before). Auto-train continues
  from it rather than from the last version.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

FLAG_Z = 1.645  # one-sided 95%
FLAG_ALPHA = 0.05


def p_not_worse(wins: int, losses: int) -> float | None:
    """One-sided sign test: P(at most ``wins`` of the decisive answers | a fair coin); None without any."""
    n = wins + losses
    if n == 0:
        return None
    return sum(math.comb(n, k) for k in range(wins + 1)) / 2**n


def wilson_upper(successes: float, n: int, z: float = FLAG_Z) -> float | None:
    """The Wilson score interval's upper end for a rate of ``successes`` / ``n`` (None when n = 0)."""
    if n <= 0:
        return None
    p = successes / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + margin) / (1 + z * z / n))


def fidelity_flags(versions: Iterable[Mapping[str, Any]]) -> dict[int, str]:
    """Version id -> the fidelity guard's one-line reason, for versions it flagged
    (``model_versions`` rows; the guard writes its verdict into a version's metrics)."""
    return {v["id"]: v["metrics"].get("fidelity_note", "lost prompt fidelity")
            for v in versions if (v.get("metrics") or {}).get("fidelity_flagged")}


def judge(stats: Iterable[Mapping[str, Any]], fidelity: Mapping[int, str] | None = None) -> dict[int, dict[str, Any]]:
    """Per version id: ``win_rate_upper``, ``p_not_worse``, ``flagged``, ``flag_reason``,
    ``judged_score``, ``lineage_flagged`` and ``best_judged``.

    ``stats``: rows of ``FeedbackStore.version_stats()`` (version_id, parent_id, wins/losses/ties
    vs parent); ``fidelity``: :func:`fidelity_flags` (a version the fidelity guard flagged is
    flagged whatever its pairs say)."""
    fidelity = fidelity or {}
    rows = {r["version_id"]: r for r in stats}
    out: dict[int, dict[str, Any]] = {}

    def visit(vid: int) -> dict[str, Any]:
        if vid in out:
            return out[vid]
        r = rows[vid]
        parent = out_of(r["parent_id"])
        wins, losses, ties = r["wins_vs_parent"], r["losses_vs_parent"], r["ties_vs_parent"]
        n = wins + losses + ties
        has_parent = r["parent_id"] is not None
        upper = wilson_upper(wins + 0.5 * ties, n) if has_parent else None
        p = p_not_worse(wins, losses) if has_parent else None
        pairs_flagged = p is not None and p < FLAG_ALPHA
        flagged = pairs_flagged or vid in fidelity
        reason = fidelity.get(vid) if vid in fidelity else (
            f"its blind before/after pairs say it is worse than its parent ({wins}-{losses}, p = {p:.3f})"
            if pairs_flagged else None)
        smoothed = (wins + 0.5 * ties + 1) / (n + 2)
        score = (parent["judged_score"] + math.log(smoothed / (1 - smoothed))) if parent else 0.0
        out[vid] = {"win_rate_upper": upper, "p_not_worse": p, "flagged": flagged, "flag_reason": reason,
                    "fidelity_flagged": vid in fidelity, "judged_score": score,
                    "lineage_flagged": flagged or bool(parent and parent["lineage_flagged"]),
                    "best_judged": False}
        return out[vid]

    def out_of(parent_id: int | None) -> dict[str, Any] | None:
        return visit(parent_id) if parent_id is not None and parent_id in rows else None

    for vid in sorted(rows):
        visit(vid)
    best = best_judged(out)
    if best is not None:
        out[best]["best_judged"] = True
    return out


def best_judged(judged: Mapping[int, Mapping[str, Any]]) -> int | None:
    """The id of the best-judged version (see the module docstring); None when there are none."""
    clean = [vid for vid, j in judged.items() if not j["lineage_flagged"]]
    if not clean:
        return None
    return max(clean, key=lambda vid: (round(judged[vid]["judged_score"], 9), vid))
