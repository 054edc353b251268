"""Paired comparison of each sampler with a reference sampler (config `lab.reference`; docs/lab.md).

The rows of one A/B group share prompt, seed and initial noise (docs/job.md "Quality scores, A/B pairs, report"), so a
sampler is compared with the reference group by group: for every score, the paired differences
d_g = score(sampler, g) − score(reference, g) over the groups where both videos are ok and scored, their mean, a
bootstrap 95 % percentile interval of that mean (Efron and Tibshirani, *An Introduction to the Bootstrap*, 1993,
chapter 13: groups resampled with replacement), and the win rate (the share of groups where the sampler scores
better, a tie counting half; "better" follows each score's direction). Only the driver calls this module; the numbers
are pure functions of the metadata.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

RESAMPLES = 2000  # bootstrap resamples: the interval's ends move by well under 1 % of its width between seeds
LEVEL = 0.95
# resampled means are formed in chunks of at most this many numbers (a million groups do not need 16 GB)
CHUNK_VALUES = 4_000_000


@dataclass(frozen=True)
class Difference:
    """One score of one sampler against the reference, over `n` paired groups."""

    n: int
    mean: float  # mean of score(sampler) − score(reference)
    lo: float  # bootstrap interval of the mean, LEVEL two-sided
    hi: float
    win_rate: float  # share of groups where the sampler is better; ties count half


def bootstrap_interval(d: np.ndarray, *, resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `d` from `resamples` resamples of its entries with replacement (a fixed
    seed: the same metadata gives the same report). One entry: its value at both ends."""
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n == 0:
        raise ValueError("bootstrap_interval: no paired differences")
    if n == 1:
        return float(d[0]), float(d[0])
    rng = np.random.default_rng(seed)
    per_chunk = max(1, CHUNK_VALUES // n)
    means = np.empty(resamples)
    for start in range(0, resamples, per_chunk):
        k = min(per_chunk, resamples - start)
        means[start : start + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def win_rate(d: np.ndarray, higher_is_better: bool) -> float:
    """Share of differences in the sampler's favour, a tie counting half."""
    d = np.asarray(d, dtype=np.float64)
    better = d > 0 if higher_is_better else d < 0
    return float((better.sum() + 0.5 * (d == 0).sum()) / d.size)


def _scores_by_group(rows: pa.Table, score: str) -> pa.Table:
    """(pair_id, value) of one sampler's ok rows in A/B groups (`rows`) with a finite score, one row per group (the
    mean, should a group hold the sampler twice: the join below then pairs each group once)."""
    sub = rows.select(["pair_id", score])
    sub = sub.filter(pc.invert(pc.is_null(sub[score])))
    values = sub[score].cast(pa.float64())
    sub = sub.set_column(1, score, values).filter(pc.is_finite(values))
    grouped = sub.group_by("pair_id").aggregate([(score, "mean")])
    return pa.table({"pair_id": grouped["pair_id"], "value": grouped[f"{score}_mean"]})


def compare(table: pa.Table, reference: str, directions: dict[str, bool], *, resamples: int = RESAMPLES,
            seed: int = 0) -> dict[str, dict[str, Difference]]:
    """{sampler: {score: Difference}} for every sampler that shares at least one scored group with `reference`
    (`directions`: score -> higher is better). Rows need `pair_id`, `sampler`, `status` and the score columns;
    rows outside A/B groups (no pair id) take no part."""
    needed = {"pair_id", "sampler", "status"}
    if table.num_rows == 0 or not needed <= set(table.column_names):
        return {}
    paired_ok = table.filter(pc.and_(pc.equal(table["status"], "ok"), pc.invert(pc.is_null(table["pair_id"]))))
    by_sampler = {s: paired_ok.filter(pc.equal(paired_ok["sampler"], s))
                  for s in pc.unique(paired_ok["sampler"].drop_null()).to_pylist() if s}
    samplers = sorted(s for s in by_sampler if s != reference)
    out: dict[str, dict[str, Difference]] = {}
    if reference not in by_sampler:
        return out
    for score, higher in directions.items():
        if score not in table.column_names or table[score].type == pa.null():
            continue
        ref = _scores_by_group(by_sampler[reference], score)
        if ref.num_rows == 0:
            continue
        for sampler in samplers:
            joined = _scores_by_group(by_sampler[sampler], score).join(ref, "pair_id", right_suffix="_ref",
                                                                       join_type="inner")
            if joined.num_rows == 0:
                continue
            d = (joined["value"].to_numpy() - joined["value_ref"].to_numpy()).astype(np.float64)
            lo, hi = bootstrap_interval(d, resamples=resamples, seed=seed)
            out.setdefault(sampler, {})[score] = Difference(int(d.size), float(d.mean()), lo, hi,
                                                            win_rate(d, higher))
    return out


def flat_metrics(paired: dict[str, dict[str, Difference]], reference: str) -> dict[str, float]:
    """MLflow metrics: `<sampler>.vs_<reference>.<score>_diff|_lo|_hi|_win|_pairs`."""
    out = {}
    for sampler, scores in paired.items():
        for score, d in scores.items():
            key = f"{sampler}.vs_{reference}.{score}"
            out.update({f"{key}_diff": d.mean, f"{key}_lo": d.lo, f"{key}_hi": d.hi, f"{key}_win": d.win_rate,
                        f"{key}_pairs": float(d.n)})
    return out
