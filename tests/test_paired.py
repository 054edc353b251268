"""Paired comparison against the reference sampler (jobs/paired.py): the bootstrap interval against the closed form on
synthetic scores with a known mean difference and variance, its coverage, and the pairing on a crafted metadata
table."""
import math

import numpy as np
import pyarrow as pa
import pytest

from jobs.paired import bootstrap_interval, compare, flat_metrics, win_rate


def test_the_interval_matches_the_normal_closed_form_on_known_scores():
    """d ~ N(0.03, 0.05²), 400 groups: the percentile interval of the mean is x̄ ± z₀.₉₇₅·s/√n to within the
    bootstrap's own noise (here 5 % of the half-width)."""
    rng = np.random.default_rng(7)
    d = 0.03 + 0.05 * rng.standard_normal(400)
    lo, hi = bootstrap_interval(d, resamples=4000)
    half = 1.959964 * d.std(ddof=1) / math.sqrt(d.size)
    assert lo == pytest.approx(d.mean() - half, abs=0.05 * half)
    assert hi == pytest.approx(d.mean() + half, abs=0.05 * half)
    assert lo > 0  # 0.03 with this spread and n is a clear difference: the interval excludes 0


def test_the_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    trials, covered = 300, 0
    for k in range(trials):
        d = 0.3 + rng.standard_normal(60)
        lo, hi = bootstrap_interval(d, resamples=1000, seed=k)
        covered += lo <= 0.3 <= hi
    # the percentile bootstrap of a normal mean with n = 60: about 0.94; 300 trials put 0.90-0.98 at ±3 s.e.
    assert 0.90 <= covered / trials <= 0.98


def test_edge_cases_of_the_interval_and_the_win_rate():
    assert bootstrap_interval(np.array([0.25])) == (0.25, 0.25)
    with pytest.raises(ValueError, match="no paired differences"):
        bootstrap_interval(np.array([]))
    assert bootstrap_interval(np.full(5, 0.1)) == pytest.approx((0.1, 0.1))
    d = np.array([0.2, -0.1, 0.0, 0.3])
    assert win_rate(d, True) == pytest.approx(2.5 / 4) and win_rate(d, False) == pytest.approx(1.5 / 4)
    # the same resamples for the same input: a report does not change between two reads of one output
    x = np.random.default_rng(0).standard_normal(30)
    assert bootstrap_interval(x) == bootstrap_interval(x)


def test_pairs_are_formed_per_group_from_ok_scored_rows_only():
    rows = [
        # group g1: both ok
        ("g1", "standard", "ok", 0.20, 0.10), ("g1", "ivmixed", "ok", 0.25, 0.08), ("g1", "freeu", "ok", 0.20, 0.12),
        # g2: ivmixed failed (no pair for it); freeu ok
        ("g2", "standard", "ok", 0.30, 0.20), ("g2", "ivmixed", "failed", None, None),
        ("g2", "freeu", "ok", 0.28, 0.20),
        # g3: the reference's score is missing: no pair for anyone
        ("g3", "standard", "ok", None, None), ("g3", "ivmixed", "ok", 0.9, 0.9),
        # g4: ivmixed better on clipsim, worse on flicker (higher)
        ("g4", "standard", "ok", 0.10, 0.05), ("g4", "ivmixed", "ok", 0.16, 0.07),
        # rows outside A/B groups take no part
        (None, "standard", "ok", 0.99, 0.0), (None, "ivmixed", "ok", 0.0, 0.9),
    ]
    table = pa.table({k: [r[i] for r in rows] for i, k in
                      enumerate(("pair_id", "sampler", "status", "clipsim", "flicker"))})
    out = compare(table, "standard", {"clipsim": True, "flicker": False}, resamples=200)
    assert set(out) == {"ivmixed", "freeu"}
    iv = out["ivmixed"]
    assert iv["clipsim"].n == 2 and iv["clipsim"].mean == pytest.approx((0.05 + 0.06) / 2)
    assert iv["clipsim"].win_rate == 1.0
    assert iv["flicker"].mean == pytest.approx((-0.02 + 0.02) / 2) and iv["flicker"].win_rate == 0.5
    fu = out["freeu"]
    assert fu["clipsim"].n == 2 and fu["clipsim"].mean == pytest.approx((0.0 - 0.02) / 2)
    assert fu["clipsim"].win_rate == pytest.approx(0.25)  # one tie, one loss
    assert fu["flicker"].win_rate == pytest.approx(0.25)  # lower is better: 0.12 vs 0.10 loses, 0.20 ties
    m = flat_metrics(out, "standard")
    assert m["ivmixed.vs_standard.clipsim_diff"] == pytest.approx(0.055)
    assert m["ivmixed.vs_standard.clipsim_pairs"] == 2.0 and "freeu.vs_standard.flicker_win" in m
    # no reference rows: nothing to compare
    assert compare(table, "pag", {"clipsim": True}) == {}
