"""plumbing/intervals.py against values computed by hand or known from the literature.

    python -m pytest tests/test_intervals.py -q
"""

import math

import pytest

from plumbing.intervals import item_rate, mean_interval, newcombe, paired_bootstrap, verdict, wilson


def test_wilson_matches_the_closed_form_and_stays_inside_0_1():
    p, lo, hi = wilson(14, 40)
    z = 1.959963984540054
    centre = (0.35 + z * z / 80) / (1 + z * z / 40)
    half = z / (1 + z * z / 40) * math.sqrt(0.35 * 0.65 / 40 + z * z / 6400)
    assert (p, lo, hi) == pytest.approx((0.35, centre - half, centre + half))
    assert wilson(0, 40)[1] == 0.0 and 0.08 < wilson(0, 40)[2] < 0.09  # 0/40 is not "exactly 0%"
    assert wilson(40, 40)[2] == 1.0 and wilson(40, 40)[1] < 1
    for n in range(1, 800):  # at 0/n and n/n rounding once left p a hair outside (a negative error bar)
        for k in (0, n):
            p, lo, hi = wilson(k, n)
            assert lo <= p <= hi
    with pytest.raises(ValueError):
        wilson(0, 0)


def test_newcombe_reproduces_the_published_example():
    # Newcombe (1998), Table II, example (a): 56/70 vs 48/80 -> difference 0.2, interval 0.0524 to 0.3339
    d, lo, hi = newcombe(56, 70, 48, 80)
    assert d == pytest.approx(0.2) and lo == pytest.approx(0.0524, abs=1e-4) and hi == pytest.approx(0.3339, abs=1e-4)


def test_mean_interval_uses_students_t():
    m, lo, hi = mean_interval([1.0, 2.0, 3.0])  # sd 1, n 3: half-width t(2) / sqrt(3) = 4.303 / 1.732
    assert m == 2.0 and hi - m == pytest.approx(4.303 / math.sqrt(3), rel=1e-4) and m - lo == hi - m
    assert mean_interval([0.5]) == (0.5, 0.5, 0.5)


def test_paired_bootstrap_sees_what_the_items_share():
    a = [[1, 1, 0, 1, 0, 1, 1, 0] * 5]  # the same items, b right on a subset of a's
    b = [[1, 0, 0, 1, 0, 0, 1, 0] * 5]
    d, lo, hi = paired_bootstrap(a, b, n_boot=2000)
    assert d == pytest.approx(0.25) and 0 < lo < d < hi
    assert paired_bootstrap(a, a, n_boot=200) == (0.0, 0.0, 0.0)  # identical models: no difference at all
    with pytest.raises(ValueError, match="same seeds and items"):
        paired_bootstrap(a, [[1, 0]], n_boot=10)


def test_paired_bootstrap_identical_seeds_add_no_items():
    """A deterministic comparison (greedy base rungs) repeated over 3 seeds has the same 40 items, not 120:
    its interval is as wide as one seed's. Drawing items anew per seed narrowed it by about sqrt(3)."""
    a, b = [1, 1, 0, 1, 0, 1, 1, 0] * 5, [1, 0, 0, 1, 0, 0, 1, 1] * 5
    _, lo1, hi1 = paired_bootstrap([a], [b], n_boot=4000)
    _, lo3, hi3 = paired_bootstrap([a] * 3, [b] * 3, n_boot=4000)
    assert hi3 - lo3 == pytest.approx(hi1 - lo1, rel=0.1)
    with pytest.raises(ValueError, match="every seed the same items"):
        paired_bootstrap([a, a[:8]], [b, b[:8]], n_boot=10)


def test_item_rate_one_seed_is_wilson():
    a = [1, 1, 0, 1, 0, 1, 1, 0] * 5
    assert item_rate([a]) == wilson(25, 40)
    assert item_rate([[0] * 250]) == wilson(0, 250)  # 0%: the interval still reaches above 0


def test_item_rate_identical_seeds_add_no_items():
    """Three identical seeds (a greedy base model scored thrice) are one seed's 40 items, not 120: the
    interval is one seed's (within the bootstrap's jitter), where pooling narrowed it by about sqrt(3)."""
    a = [1, 1, 0, 1, 0, 1, 1, 0] * 5
    _, lo1, hi1 = item_rate([a])
    _, lo3, hi3 = item_rate([a] * 3)
    assert lo3 <= lo1 and hi3 >= hi1 and hi3 - lo3 == pytest.approx(hi1 - lo1, abs=0.02)
    pooled = wilson(75, 120)
    assert hi3 - lo3 > 1.5 * (pooled[2] - pooled[1])
    assert item_rate([[0] * 250] * 3) == wilson(0, 250)  # a bootstrap at 0% collapses; Wilson's does not


def test_item_rate_sees_seeds_that_disagree():
    """Seeds that disagree on every item (one learned the task, two did not) leave each item's mean at 1/3:
    Wilson's interval over the items alone is narrow; the seeds' spread makes the interval wide."""
    right, wrong = [1] * 100, [0] * 100
    rate, lo, hi = item_rate([right, wrong, wrong])
    assert rate == pytest.approx(1 / 3)
    assert lo == 0.0 and hi == 1.0
    assert wilson(100 / 3, 100)[2] < 0.45
    with pytest.raises(ValueError, match="every seed the same items"):
        item_rate([right, wrong[:5]])


def test_the_verdict_rule():
    assert verdict(0.01, 0.2) == "supported"
    assert verdict(-0.3, -0.01) == "contradicted"
    assert verdict(-0.1, 0.1) == verdict(0.0, 0.1) == "inconclusive"
