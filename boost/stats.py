"""Small statistics for reports: binomial intervals, rank correlation, mean and spread over seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for ``z=1.96``); (0, 1) for ``n == 0``."""
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get mean ranks); None when either side is constant or n < 2."""
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    m = math.fsum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom.
_T95 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
        2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
        2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)  # fmt: skip


def t_critical95(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom (a table up to
    30; above, the Cornish-Fisher expansion around the normal quantile, within 1e-4 there)."""
    if df < 1:
        raise ValueError(f"need df >= 1, got {df}")
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))  # fmt: skip


def t_interval95(values: Sequence[float]) -> tuple[float, float]:
    """The 95% Student-t confidence interval of the mean of ``values`` (e.g. paired differences over
    seeds); needs at least two values."""
    if len(values) < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {len(values)}")
    m, s = mean_std(values)
    half = t_critical95(len(values) - 1) * s / math.sqrt(len(values))
    return m - half, m + half


# ---- aggregates over environments, as rliable reports them (Agarwal et al., 2021) ------------------


def interquartile_mean(values: Sequence[float]) -> float:
    """The mean of the middle half of ``values`` (sorted; a value straddling a quartile counts by its
    fraction inside, so any n works): the interquartile mean (IQM)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("the interquartile mean of no values")
    lo, hi = n / 4, 3 * n / 4
    total = math.fsum(v * max(0.0, min(i + 1, hi) - max(i, lo)) for i, v in enumerate(ordered))
    return total / (hi - lo)


def probability_of_improvement(
    x_by_stratum: Sequence[Sequence[float]], y_by_stratum: Sequence[Sequence[float]]
) -> float:
    """P(X > Y): per stratum (environment) the Mann-Whitney probability that a run of X scores above a
    run of Y (ties count 1/2), averaged over strata."""
    if len(x_by_stratum) != len(y_by_stratum) or not x_by_stratum:
        raise ValueError("need the same, non-zero number of strata for X and Y")
    per = []
    for xs, ys in zip(x_by_stratum, y_by_stratum):
        if not xs or not ys:
            raise ValueError("every stratum needs at least one run of X and of Y")
        wins = math.fsum(1.0 if x > y else 0.5 if x == y else 0.0 for x in xs for y in ys)
        per.append(wins / (len(xs) * len(ys)))
    return math.fsum(per) / len(per)


def stratified_bootstrap_ci95(
    samples: Sequence[Sequence[Sequence[float]]], statistic, reps: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """The 95% percentile interval of ``statistic(*samples)`` when each stratum's runs of each sample
    are redrawn with replacement (strata fixed, as rliable's stratified bootstrap).

    ``samples``: one entry per compared method, each a list of strata, each a list of run scores;
    ``statistic(*resampled)`` returns a float.
    """
    import random

    rng = random.Random(seed)
    draws = []
    for _ in range(reps):
        redrawn = [[[rng.choice(runs) for _ in runs] for runs in strata] for strata in samples]
        draws.append(statistic(*redrawn))
    draws.sort()
    return draws[int(0.025 * (reps - 1))], draws[int(math.ceil(0.975 * (reps - 1)))]
