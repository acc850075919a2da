"""plumbing/intervals.py: 95% intervals for what the lab measures, written once for the lab, its claims
table and the README: Wilson's interval for a rate, Newcombe's for the difference of two independent rates,
a paired bootstrap for two models scored on the same items (and seeds), a rate over items and seeds (the
same two-level resampling, never narrower than Wilson's over the items), a t interval for a mean across
seeds, and the rule that turns an interval into a verdict.

A difference is read only when its interval excludes zero; inside the noise the verdict is "inconclusive".
"""

import math
import random

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
# Student's t 97.5% quantiles by degrees of freedom (1..30); beyond 30 the normal's is close enough.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def wilson(k, n, z=Z95):
    """(rate, low, high): k successes of n, with Wilson's score interval (right near 0% and 100%, where
    the textbook p +- z sqrt(p(1-p)/n) collapses to a point)."""
    if n <= 0:
        raise ValueError("a rate needs n > 0 items")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # the interval always holds p; min/max keep float rounding at 0/n and n/n from putting p outside it
    return p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def newcombe(k1, n1, k2, n2):
    """(difference p1 - p2, low, high) of two rates from independent samples: Newcombe's hybrid score
    interval (method 10), built from the two Wilson intervals."""
    p1, l1, u1 = wilson(k1, n1)
    p2, l2, u2 = wilson(k2, n2)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def mean_interval(values):
    """(mean, low, high) of values (one per seed) with a t interval; a single value has no interval."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, m, m
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    t = T975[n - 2] if n - 1 <= len(T975) else Z95
    return m, m - t * sd / math.sqrt(n), m + t * sd / math.sqrt(n)


def paired_bootstrap(a, b, n_boot=10_000, seed=0):
    """(mean of a - b, low, high) for two models scored on the same items: a[s][i] and b[s][i] are the
    scores of item i under seed s. Both levels are resampled: seeds, and items, the same draw of items for
    every seed and both models, since every seed scores the same test items. (Drawing items anew per seed
    would count a deterministic model's identical seeds as new items and narrow the interval by about
    sqrt(seeds).) Percentile interval."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)) or len({len(x) for x in a}) > 1:
        raise ValueError("paired scores need the same seeds and items on both sides, "
                         "and every seed the same items")
    diffs = [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]
    n_seeds, n_items = len(diffs), len(diffs[0])
    mean = sum(map(sum, diffs)) / (n_seeds * n_items)
    rng, stats = random.Random(seed), []
    for _ in range(n_boot):
        rows = [diffs[rng.randrange(n_seeds)] for _ in range(n_seeds)]
        items = [rng.randrange(n_items) for _ in range(n_items)]
        stats.append(sum(row[i] for row in rows for i in items) / (n_seeds * n_items))
    stats.sort()
    return mean, stats[int(0.025 * n_boot)], stats[int(0.975 * n_boot) - 1]


def item_rate(scores):
    """(rate, low, high) of one model's per-item scores (0/1, or in [0, 1]), scores[s][i] for item i under
    seed s, every seed scoring the same items. The noise has two sources: which items the test set holds,
    and which seed trained the model. Wilson's interval over the items (each item's mean over the seeds)
    measures the first, and is right near 0% and 100%; with several seeds the two-level bootstrap
    (paired_bootstrap against zero) adds the second. The interval is the wider of the two on each side.
    (Pooling seeds x items as independent trials would count a deterministic model's identical seeds as new
    items: about sqrt(seeds) too narrow.)"""
    if not scores or not scores[0] or len({len(x) for x in scores}) > 1:
        raise ValueError("a rate needs items, and every seed the same items")
    n_items = len(scores[0])
    per_item = [sum(col) / len(scores) for col in zip(*scores)]
    rate, low, high = wilson(sum(per_item), n_items)
    if len(scores) > 1:
        _, b_low, b_high = paired_bootstrap(scores, [[0] * n_items for _ in scores])
        low, high = min(low, b_low), max(high, b_high)
    return rate, low, high


def verdict(low, high):
    """The stated rule: "supported" if the interval of the effect (signed so that positive is the
    claim's direction) lies above zero, "contradicted" if below, else "inconclusive"."""
    if low > 0:
        return "supported"
    if high < 0:
        return "contradicted"
    return "inconclusive"
