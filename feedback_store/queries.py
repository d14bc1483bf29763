"""Read-only queries the UI and the reward proxy need. All take a sqlite-utils Database."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlite_utils import Database

# Outcome -> label for "left beats right" (Bradley-Terry target); skip has none.
OUTCOME_LABEL: dict[str, float] = {"left": 1.0, "right": 0.0, "tie-both-good": 0.5, "tie-both-bad": 0.5}
RECENT_WINDOW = 20  # a rater's last N comparisons count as "recent" for prompt diversity


@dataclasses.dataclass(frozen=True)
class PairCandidate:
    """Two samples of one prompt that a rater has not compared yet."""

    left_id: int
    right_id: int
    prompt: str
    prompt_id: int
    left_version: int | None
    right_version: int | None
    # Image files relative to ``image_root``: a Path is built only for the pair that is used
    # (joining paths for every candidate was a tenth of the server's time under a crowd).
    image_root: Path
    left_file: str
    right_file: str
    recent_prompt_count: int  # comparisons of this prompt among the rater's last RECENT_WINDOW

    @property
    def left_path(self) -> Path:
        return self.image_root / self.left_file

    @property
    def right_path(self) -> Path:
        return self.image_root / self.right_file

    def swapped(self) -> PairCandidate:
        return dataclasses.replace(self, left_id=self.right_id, right_id=self.left_id,
                                   left_version=self.right_version, right_version=self.left_version,
                                   left_file=self.right_file, right_file=self.left_file)


@dataclasses.dataclass
class PreferenceRecords:
    """Training data for a reward proxy, keyed by sample id."""

    samples: dict[int, dict[str, Any]]  # id -> {"prompt": str, "path": Path}
    comparisons: list[tuple[int, int, float]]  # (left, right, P(left beats right) label)
    ratings: list[tuple[int, int]]  # (sample, stars)


def unrated_sample_ids(db: Database, rater_id: str, limit: int, model_version_id: int | None) -> list[int]:
    where = "AND s.model_version_id = :version" if model_version_id is not None else ""
    sql = f"""
        SELECT s.id FROM samples s
        WHERE NOT EXISTS (SELECT 1 FROM ratings r WHERE r.sample_id = s.id AND r.rater_id = :rater)
        {where}
        ORDER BY s.model_version_id IS NULL, s.model_version_id DESC,
                 (SELECT count(*) FROM ratings r2 WHERE r2.sample_id = s.id), s.id
        LIMIT :limit"""
    params = {"rater": rater_id, "limit": int(limit), "version": model_version_id}
    return [row["id"] for row in db.query(sql, params)]


def pair_candidates(db: Database, rater_id: str, image_root: Path, prompt: str | None,
                    per_prompt: int = 48) -> list[PairCandidate]:
    """Uncompared same-prompt pairs among the newest ``per_prompt`` samples of each prompt."""
    where = "AND p.text = :prompt" if prompt is not None else ""
    sql = f"""
        WITH recent AS (
            SELECT s.id, s.prompt_id, s.model_version_id, s.image_path,
                   ROW_NUMBER() OVER (PARTITION BY s.prompt_id ORDER BY s.id DESC) AS rn
            FROM samples s)
        SELECT a.id AS a_id, b.id AS b_id, a.prompt_id, p.text AS prompt,
               a.model_version_id AS a_v, b.model_version_id AS b_v,
               a.image_path AS a_path, b.image_path AS b_path
        FROM recent a JOIN recent b ON a.prompt_id = b.prompt_id AND a.id < b.id
        JOIN prompts p ON p.id = a.prompt_id
        WHERE a.rn <= :per_prompt AND b.rn <= :per_prompt {where}
          AND NOT EXISTS (SELECT 1 FROM comparisons c WHERE c.rater_id = :rater
                          AND min(c.left_id, c.right_id) = a.id AND max(c.left_id, c.right_id) = b.id)
        ORDER BY a.id, b.id"""
    rows = list(db.query(sql, {"rater": rater_id, "per_prompt": per_prompt, "prompt": prompt}))
    recent = Counter(row["prompt_id"] for row in db.query(
        """SELECT s.prompt_id FROM (SELECT left_id FROM comparisons WHERE rater_id = ?
                                    ORDER BY id DESC LIMIT ?) c JOIN samples s ON s.id = c.left_id""",
        [rater_id, RECENT_WINDOW]))
    return [PairCandidate(r["a_id"], r["b_id"], r["prompt"], r["prompt_id"], r["a_v"], r["b_v"], image_root,
                          r["a_path"], r["b_path"], recent[r["prompt_id"]]) for r in rows]


def default_pair_scores(cands: Sequence[PairCandidate], rng: random.Random) -> list[float]:
    """No proxy yet: prefer pairs across model versions (they measure progress), then prompts
    the rater has seen least recently; break ties at random."""
    return [(1.0 if c.left_version != c.right_version else 0.0) - 0.1 * c.recent_prompt_count
            + 0.05 * rng.random() for c in cands]


def _mean(values: Sequence[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def noise_key(seed: int | None, settings: dict[str, Any]) -> tuple | None:
    """What decides a sample's starting noise (seed, batch size, batch index, steps); None without a seed."""
    if seed is None:
        return None
    return (seed, settings.get("batch_size"), settings.get("batch_index"), settings.get("steps"))


def is_before_after(left_version: int | None, right_version: int | None, left_key: tuple | None,
                    right_key: tuple | None, parents: dict[int, int | None]) -> bool:
    """The one definition of a before/after pair: a sample of a version and one of its parent drawn
    from the same noise (what a round draws after it trains: the same prompts and seed through both),
    so the pair differs only by the round."""
    if left_version is None or right_version is None or left_version == right_version:
        return False
    related = parents.get(left_version) == right_version or parents.get(right_version) == left_version
    return related and left_key is not None and left_key == right_key


def version_stats(db: Database) -> list[dict[str, Any]]:
    """Per model version: samples, ratings, mean stars, and the human win rate over its parent in
    blind before/after pairs (:func:`is_before_after`; ties count 1/2)."""
    versions = list(db.query("SELECT id, name, parent_id FROM model_versions ORDER BY id"))
    star_rows = db.query("""SELECT s.model_version_id AS v, count(DISTINCT s.id) AS n_samples,
                            count(r.id) AS n_ratings, avg(r.stars) AS mean_stars
                            FROM samples s LEFT JOIN ratings r ON r.sample_id = s.id
                            GROUP BY s.model_version_id""")
    stars = {row["v"]: row for row in star_rows}
    parents = {v["id"]: v["parent_id"] for v in versions}
    duels = [d for d in db.query("""SELECT c.outcome, sl.model_version_id AS lv, sr.model_version_id AS rv,
                                    sl.seed AS ls, sl.sampler_settings AS lset, sr.seed AS rs,
                                    sr.sampler_settings AS rset
                                    FROM comparisons c JOIN samples sl ON sl.id = c.left_id
                                    JOIN samples sr ON sr.id = c.right_id
                                    WHERE c.outcome != 'skip' AND sl.model_version_id != sr.model_version_id""")
             if is_before_after(d["lv"], d["rv"], noise_key(d["ls"], json.loads(d["lset"] or "{}")),
                                noise_key(d["rs"], json.loads(d["rset"] or "{}")), parents)]
    out = []
    for ver in versions:
        s = stars.get(ver["id"], {})
        wins = losses = ties = 0
        for d in duels:
            if ver["parent_id"] is None or {d["lv"], d["rv"]} != {ver["id"], ver["parent_id"]}:
                continue
            label = OUTCOME_LABEL[d["outcome"]]
            if label == 0.5:
                ties += 1
            elif (label == 1.0) == (d["lv"] == ver["id"]):
                wins += 1
            else:
                losses += 1
        n = wins + losses + ties
        out.append({"version_id": ver["id"], "name": ver["name"], "parent_id": ver["parent_id"],
                    "n_samples": s.get("n_samples", 0), "n_ratings": s.get("n_ratings", 0),
                    "mean_stars": s.get("mean_stars"), "comparisons_vs_parent": n,
                    "wins_vs_parent": wins, "losses_vs_parent": losses, "ties_vs_parent": ties,
                    "win_rate_vs_parent": (wins + 0.5 * ties) / n if n else None})
    return out


def rater_stats(db: Database) -> list[dict[str, Any]]:
    """Per rater: how much they answered and how (star histogram, outcome mix, response time)."""
    ratings: dict[str, list[int]] = defaultdict(list)
    for row in db.query("SELECT rater_id, stars FROM ratings"):
        ratings[row["rater_id"]].append(row["stars"])
    outcomes: dict[str, Counter] = defaultdict(Counter)
    times: dict[str, list[float]] = defaultdict(list)
    for row in db.query("SELECT rater_id, outcome, response_time_s FROM comparisons"):
        outcomes[row["rater_id"]][row["outcome"]] += 1
        if row["response_time_s"] is not None:
            times[row["rater_id"]].append(row["response_time_s"])
    out = []
    for rater in db.query("SELECT id, kind, name FROM raters ORDER BY id"):
        rid, stars, oc = rater["id"], ratings[rater["id"]], outcomes[rater["id"]]
        n_cmp = sum(oc.values())
        out.append({"rater_id": rid, "kind": rater["kind"], "name": rater["name"],
                    "n_ratings": len(stars), "mean_stars": _mean(stars),
                    "star_histogram": {k: stars.count(k) for k in range(1, 6)},
                    "n_comparisons": n_cmp, "outcomes": dict(oc),
                    "tie_rate": (oc["tie-both-good"] + oc["tie-both-bad"]) / n_cmp if n_cmp else None,
                    "skip_rate": oc["skip"] / n_cmp if n_cmp else None,
                    "median_response_time_s": statistics.median(times[rid]) if times[rid] else None})
    return out


def _winner(left: int, right: int, outcome: str) -> int | str:
    """A side-independent answer: the winning sample id, or 'tie'."""
    label = OUTCOME_LABEL[outcome]
    return "tie" if label == 0.5 else (left if label == 1.0 else right)


def rater_agreement(db: Database, min_overlap: int = 1) -> list[dict[str, Any]]:
    """For each pair of raters with overlapping items: agreement on stars (same samples) and on
    comparisons (same unordered pairs; ties are one answer, skips are left out)."""
    stars: dict[str, dict[int, int]] = defaultdict(dict)
    for row in db.query("SELECT rater_id, sample_id, stars FROM ratings"):
        stars[row["rater_id"]][row["sample_id"]] = row["stars"]
    picks: dict[str, dict[tuple[int, int], int | str]] = defaultdict(dict)
    for row in db.query("SELECT rater_id, left_id, right_id, outcome FROM comparisons WHERE outcome != 'skip'"):
        key = (min(row["left_id"], row["right_id"]), max(row["left_id"], row["right_id"]))
        picks[row["rater_id"]][key] = _winner(row["left_id"], row["right_id"], row["outcome"])
    out = []
    for a, b in itertools.combinations(sorted(set(stars) | set(picks)), 2):
        common = sorted(set(stars[a]) & set(stars[b]))
        diffs = [abs(stars[a][i] - stars[b][i]) for i in common]
        shared = set(picks[a]) & set(picks[b])
        if max(len(common), len(shared)) < min_overlap:
            continue
        out.append({"rater_a": a, "rater_b": b, "n_common_ratings": len(common),
                    "stars_mean_abs_diff": _mean(diffs),
                    "stars_exact_agreement": _mean([d == 0 for d in diffs]),
                    "stars_within_one": _mean([d <= 1 for d in diffs]),
                    "stars_correlation": _correlation([stars[a][i] for i in common],
                                                      [stars[b][i] for i in common]),
                    "n_common_pairs": len(shared),
                    "pair_agreement": _mean([picks[a][k] == picks[b][k] for k in shared])})
    return out


def _correlation(x: list[int], y: list[int]) -> float | None:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(statistics.correlation(x, y))


def preference_records(db: Database, image_root: Path, rater_ids: Sequence[str] | None) -> PreferenceRecords:
    filt, args = "", []
    if rater_ids is not None:
        filt = f"AND rater_id IN ({', '.join('?' for _ in rater_ids)})"
        args = list(rater_ids)
    comparisons = [(r["left_id"], r["right_id"], OUTCOME_LABEL[r["outcome"]]) for r in db.query(
        f"SELECT left_id, right_id, outcome FROM comparisons WHERE outcome != 'skip' {filt} ORDER BY id",
        args)]
    ratings = [(r["sample_id"], r["stars"]) for r in db.query(
        f"SELECT sample_id, stars FROM ratings WHERE 1 {filt} ORDER BY id", args)]
    ids = {i for c in comparisons for i in c[:2]} | {r[0] for r in ratings}
    samples: dict[int, dict[str, Any]] = {}
    if ids:
        for r in db.query(f"""SELECT s.id, s.image_path, p.text FROM samples s JOIN prompts p
                               ON p.id = s.prompt_id WHERE s.id IN ({', '.join(map(str, sorted(ids)))})"""):
            samples[r["id"]] = {"prompt": r["text"], "path": image_root / r["image_path"]}
    return PreferenceRecords(samples, comparisons, ratings)


def star_rating(db: Database, sample_id: int, rater_id: str) -> int | None:
    """This rater's stars for this sample, or None."""
    row = db.execute("SELECT stars FROM ratings WHERE sample_id = ? AND rater_id = ?",
                     [sample_id, rater_id]).fetchone()
    return row[0] if row else None


def comparison_counts(db: Database, rater_id: str | None) -> dict[str, int]:
    """Comparisons by this rater (0 without one) and by everyone."""
    mine = 0
    if rater_id:
        mine = db.execute("SELECT count(*) FROM comparisons WHERE rater_id = ?", [rater_id]).fetchone()[0]
    return {"my_comparisons": mine, "all_comparisons": db["comparisons"].count}


def noise_settings(db: Database, sample_ids: Sequence[int]) -> dict[int, tuple[int | None, dict[str, Any]]]:
    """sample id -> (seed, sampler settings): what decides a sample's starting noise."""
    if not sample_ids:
        return {}
    marks = ", ".join("?" for _ in sample_ids)
    rows = db.query(f"SELECT id, seed, sampler_settings FROM samples WHERE id IN ({marks})", list(sample_ids))
    return {row["id"]: (row["seed"], json.loads(row["sampler_settings"] or "{}")) for row in rows}


def saved_stage_prompts(db: Database) -> dict[str, dict[int, str]]:
    """prompt -> {stage: its latest stage prompt}, from the prompt edits, oldest prompt first."""
    latest: dict[str, dict[int, str]] = {}
    for row in db.query("SELECT original, edited, stage FROM prompt_edits WHERE stage IS NOT NULL ORDER BY id"):
        latest.setdefault(row["original"], {})[row["stage"]] = row["edited"]
    return latest


def prompts_people_used(db: Database) -> list[str]:
    """Prompts of samples people drew (not a round's own samples), most recently used first."""
    return [row["text"] for row in db.query(
        """SELECT p.text, max(s.id) AS last FROM samples s JOIN prompts p ON p.id = s.prompt_id
           WHERE json_extract(s.sampler_settings, '$.origin') IS NOT 'round'
           GROUP BY p.id ORDER BY last DESC""")]


def edited_prompts(db: Database) -> list[str]:
    """Prompts people rewrote (whole-prompt edits, not stage prompts), most recent first."""
    return [row["edited"] for row in db.query(
        "SELECT edited, max(id) AS last FROM prompt_edits WHERE stage IS NULL GROUP BY edited ORDER BY last DESC")]
