"""Bootstrap intervals and paired tests (embedtune.stats) on synthetic per-query data."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from embedtune.stats import (
    bootstrap_ci,
    bootstrap_cis,
    mcnemar_pvalue,
    paired_bootstrap_pvalue,
    paired_bootstrap_pvalues,
    paired_pvalue,
)


def test_bootstrap_ci_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(123)
    p, n, sims = 0.7, 200, 200
    covered = 0
    for s in range(sims):
        hits = (rng.random(n) < p).astype(float)
        lo, hi = bootstrap_ci(hits, n_boot=1000, seed=s)
        assert lo <= hits.mean() <= hi
        covered += lo <= p <= hi
    assert 0.90 <= covered / sims <= 0.99


def test_bootstrap_ci_is_seeded_and_degenerate_data_gives_a_point():
    v = np.random.default_rng(0).random(50)
    assert bootstrap_ci(v, seed=3) == bootstrap_ci(v, seed=3)
    assert bootstrap_ci(np.ones(20)) == (1.0, 1.0)
    lo, hi = bootstrap_cis(np.stack([v, np.zeros(50)]))
    assert lo[0] < v.mean() < hi[0] and lo[1] == hi[1] == 0.0
    with pytest.raises(ValueError):
        bootstrap_ci(np.ones((2, 3)))


def test_paired_bootstrap_finds_a_planted_difference_and_not_a_model_against_itself():
    rng = np.random.default_rng(7)
    a = rng.random(500)  # e.g. reciprocal ranks
    b = np.clip(a + rng.normal(0.05, 0.1, 500), 0, 1)  # better by about 0.05 on average
    assert paired_bootstrap_pvalue(b, a) < 0.01
    assert paired_bootstrap_pvalue(a, b) < 0.01  # two-sided
    assert paired_bootstrap_pvalue(a, a) == 1.0
    noise = a + rng.normal(0, 0.1, 500)
    noise -= noise.mean() - a.mean()  # same mean, different queries
    assert paired_bootstrap_pvalue(noise, a) > 0.5
    ps = paired_bootstrap_pvalues(np.stack([b, a]), np.stack([a, a]))
    assert ps[0] == pytest.approx(paired_bootstrap_pvalue(b, a)) and ps[1] == 1.0


def test_mcnemar_exact():
    a = np.array([1] * 30 + [0] * 70)
    assert mcnemar_pvalue(a, a) == 1.0
    # 10 discordant queries, all in favour of b: p = 2 * 0.5**10
    b = a.copy()
    b[30:40] = 1
    assert mcnemar_pvalue(a, b) == pytest.approx(2 * 0.5**10)
    # 3 vs 5 discordant: two-sided binomial tail, by hand
    c = a.copy()
    c[:3] = 0
    c[30:35] = 1
    tail = sum(math.comb(8, i) for i in range(4)) / 2**8
    assert mcnemar_pvalue(a, c) == pytest.approx(2 * tail)
    # large n: no overflow or underflow
    big_a = np.zeros(4000)
    big_b = np.ones(4000)
    assert mcnemar_pvalue(big_a, big_b) < 1e-300
    half = np.arange(4000) % 2
    assert mcnemar_pvalue(half, 1 - half) == 1.0  # 2000 vs 2000 discordant
    assert paired_pvalue(a, b, "hit_at_10") == mcnemar_pvalue(a, b)


def test_fast_enough_for_a_real_leaderboard():
    rng = np.random.default_rng(0)
    rows = (rng.random((12, 2000)) < 0.7).astype(float)
    bootstrap_cis(rows[:1])  # build the cached resample matrix
    t = time.perf_counter()
    for _ in range(5):  # five metrics
        bootstrap_cis(rows)
        paired_bootstrap_pvalues(rows[1:], np.repeat(rows[:1], 11, axis=0))
    assert time.perf_counter() - t < 5.0  # ~0.1 s on a laptop; generous for a loaded CI machine
