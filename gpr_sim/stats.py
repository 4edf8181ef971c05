"""Every confidence interval of the repository: one result type, one quantile function, one formula each.

| function | estimate | interval | for |
|---|---|---|---|
| `mean_interval` | mean(x) | normal (CLT): z s / sqrt(n) | many independent units (sessions, rows) |
| `t_interval` | mean(x) | Student t, n - 1 df: t s / sqrt(n) | a few units (training seeds) |
| `ratio_of_means` | sum(num) / sum(den) | normal, delta method | ratio metrics over sessions (CTR = clicks / impressions) |
| `welch_interval` | mean(x) - mean(y) | Student t, Welch-Satterthwaite df | two independent groups |
| `relative_change` | mean(x) / ref - 1 | Student t, Welch-Satterthwaite df, delta method | seeds against one reference estimate with its own CI |
| `paired_difference` | mean(x - y) | Student t on the per-unit differences | the same units under two treatments (common random numbers) |
| `paired_ratio_difference` | ratio(x) - ratio(y) | Student t on the per-unit delta-method differences | a ratio or mean metric, the same units under two treatments |
| `welch_ratio_difference` | ratio(x) - ratio(y) | Student t, Welch-Satterthwaite df, delta method | a ratio or mean metric, two independent groups |
| `bootstrap_sums`, `percentile_interval`, `bootstrap_ratio` | plug-in | percentile bootstrap | any smooth statistic of column sums |

All of them return an `Estimate` and take ``level``, the two-sided coverage in (0, 1). Quantiles come from
``scipy.stats`` (`critical_value`). Bad input raises ``ValueError``: an empty sample, a level outside (0, 1),
NaN or inf values (``nan_policy="propagate"`` instead gives a NaN interval, for tables where a missing
value of one unit makes the cell unknown). Data that cannot carry an interval is not an error: with one
unit the value comes with a NaN interval (one training seed says nothing about how much training varies),
and a ratio whose denominator sums to zero is NaN (no impressions: no CTR).

Why a t interval over seeds and a normal one over sessions: with three seeds, s / sqrt(3) is itself a
noisy estimate and the normal quantile 1.96 would cover far less than 95%; t_{0.975, 2} = 4.30 accounts
for that. With thousands of sessions the two quantiles agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np
from scipy import stats as sps

CI_SUFFIXES = ("", "_ci_low", "_ci_high")
"""column suffixes of an estimate in flat tables and ``metrics.jsonl``: the value and its interval"""
NAN_POLICIES = ("raise", "propagate")
"""what a sample function does with NaN or inf values: raise ``ValueError``, or return a NaN interval"""
_BOOTSTRAP_CHUNK_ELEMS = 1 << 22  # resampling weights held at once (B_chunk x n), ~32 MB


class Estimate(NamedTuple):
    """A point estimate with its two-sided interval; ``ci_low`` / ``ci_high`` are NaN when n < 2."""

    value: float
    ci_low: float
    ci_high: float
    std_err: float = math.nan
    """standard error (for the bootstrap: the std of the replicates)"""
    n: int = 0
    """independent units the estimate is over (sessions, rows, seeds)"""
    name: str = ""

    def columns(self, key: str) -> dict[str, float]:
        """``{key: value, key_ci_low: ci_low, key_ci_high: ci_high}``: the flat columns of tables and logs."""
        return {f"{key}{s}": v for s, v in zip(CI_SUFFIXES, self[:3])}


def nan_estimate(n: int = 0, name: str = "", value: float = math.nan) -> Estimate:
    """An estimate without an interval (``value`` NaN unless given)."""
    return Estimate(float(value), math.nan, math.nan, math.nan, n, name)


@dataclass(frozen=True)
class CIConfig:
    """How intervals over sessions or logged rows are computed; built from the estimators' keyword arguments."""

    method: str = "normal"
    """"normal" (CLT / delta method on the per-unit terms) or "bootstrap" (percentile, resampling units)."""
    level: float = 0.95
    """Coverage of the two-sided interval, in (0, 1)."""
    n_bootstrap: int = 1000
    """Bootstrap replicates, >= 2; only used by the bootstrap."""

    def __post_init__(self) -> None:
        if self.method not in ("normal", "bootstrap"):
            raise ValueError(f"ci (CIConfig.method) must be 'normal' or 'bootstrap', got {self.method!r}")
        check_level(self.level)
        if self.n_bootstrap < 2:
            raise ValueError(f"n_bootstrap must be >= 2, got {self.n_bootstrap}")


# ----------------------------------------------------------------------------- quantiles and input checks


def check_level(level: float) -> float:
    """``level`` as a float; raises ``ValueError`` unless it is a coverage strictly inside (0, 1)."""
    if isinstance(level, bool) or not isinstance(level, Real) or not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return float(level)


def critical_value(level: float, df: float = math.inf) -> float:
    """Two-sided critical value: the (1 + level) / 2 quantile of Student t with ``df`` degrees of freedom,
    the normal one for ``df = inf`` (1.959964 at 95%). A fractional df (Welch-Satterthwaite) is used as is."""
    level = check_level(level)
    if not df > 0:  # also rejects NaN
        raise ValueError(f"df must be > 0 (or inf), got {df}")
    p = 0.5 + level / 2.0
    return float(sps.norm.ppf(p) if math.isinf(df) else sps.t.ppf(p, df))


def _sample(x, name: str = "x", nan_policy: str = "raise") -> tuple[np.ndarray, bool]:
    """(x as a 1-d float64 array, whether every value is finite); raises on empty or, by policy, on NaN."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy={nan_policy!r} is invalid: expected one of {NAN_POLICIES}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty: an interval needs at least one value")
    finite = bool(np.isfinite(x).all())
    if not finite and nan_policy == "raise":
        raise ValueError(
            f"{name} holds NaN or inf at positions {np.flatnonzero(~np.isfinite(x))[:10].tolist()}"
        )
    return x, finite


def welch_df(var_a: float, df_a: float, var_b: float, df_b: float = math.inf) -> float:
    """Welch-Satterthwaite degrees of freedom of the sum of two independent variance estimates.

    df = (v_a + v_b)^2 / (v_a^2 / df_a + v_b^2 / df_b), with v = s^2 / n the variance of each mean and
    df its own degrees of freedom (n - 1; inf for a variance known as well as a normal CI implies).
    Between min(df_a, df_b) and df_a + df_b; inf when neither variance has sampling noise.
    """
    den = var_a**2 / df_a + var_b**2 / df_b
    return math.inf if den == 0 else (var_a + var_b) ** 2 / den


# ----------------------------------------------------------------------------- means and ratios


def ratio_of_means(num, den, level: float = 0.95, name: str = "ratio") -> Estimate:
    """sum(num) / sum(den) over independent units with a delta-method (ratio-of-means) normal interval.

    Linearising R = mean(num) / mean(den) around the means gives the per-unit influence terms
    (num_i - R den_i) / mean(den), whose sample variance / n is Var(R). With den == 1 this is the CLT
    interval of a mean.

    Args:
        num: (n,) per-unit numerator sums (e.g. clicks per session).
        den: (n,) per-unit denominator sums (e.g. impressions per session).
        level: two-sided coverage in (0, 1).
        name: the estimate's name.

    Returns:
        The ratio with its interval; NaN value when sum(den) == 0, NaN interval when n < 2.
    """
    check_level(level)
    num, _ = _sample(num, "num")
    den, _ = _sample(den, "den")
    if num.shape != den.shape:
        raise ValueError(f"num and den must be 1-d of one length, got shapes {num.shape} and {den.shape}")
    n = len(num)
    if den.sum() == 0:
        return nan_estimate(n, name)
    ratio = float(num.sum() / den.sum())
    if n < 2:
        return nan_estimate(n, name, ratio)
    influence = (num - ratio * den) / den.mean()  # (n,) linearised R around the means
    std_err = float(np.sqrt(influence.var(ddof=1) / n))
    half = critical_value(level) * std_err
    return Estimate(ratio, ratio - half, ratio + half, std_err, n, name)


def mean_interval(x, level: float = 0.95, *, nan_policy: str = "raise", name: str = "mean") -> Estimate:
    """mean(x) with the CLT interval mean +- z s / sqrt(n): for many independent units (sessions, rows)."""
    check_level(level)
    x, finite = _sample(x, nan_policy=nan_policy)
    if not finite:
        return nan_estimate(len(x), name, float(x.mean()))
    return ratio_of_means(x, np.ones_like(x), level, name)


def t_interval(x, level: float = 0.95, *, nan_policy: str = "raise", name: str = "mean") -> Estimate:
    """mean(x) with the Student t interval mean +- t_{(1 + level) / 2, n - 1} s / sqrt(n): for a few units
    (training seeds), where s itself is noisy. NaN interval when n < 2."""
    check_level(level)
    x, finite = _sample(x, nan_policy=nan_policy)
    n, mean = len(x), float(x.mean())
    if n < 2 or not finite:
        return nan_estimate(n, name, mean)
    std_err = float(x.std(ddof=1)) / math.sqrt(n)
    half = critical_value(level, n - 1) * std_err
    return Estimate(mean, mean - half, mean + half, std_err, n, name)


def paired_difference(x, y, level: float = 0.95, *, nan_policy: str = "raise") -> Estimate:
    """mean(x - y) over units seen under both treatments, with the t interval of the per-unit differences.

    Pairing (same users, seeds or random streams) removes what the units share from the variance: with
    x and y positively correlated, Var(x - y) = Var(x) + Var(y) - 2 Cov(x, y) is below the
    Var(x) + Var(y) of ``welch_interval``.

    Args:
        x, y: (n,) values of the same n units, in the same order.
        level: two-sided coverage in (0, 1).
        nan_policy: "raise" or "propagate" (NaN interval when any difference is not finite).
    """
    x, _ = _sample(x, "x", nan_policy)
    y, _ = _sample(y, "y", nan_policy)
    if x.shape != y.shape:
        raise ValueError(f"paired samples must have one length, got {len(x)} and {len(y)}")
    return t_interval(x - y, level, nan_policy=nan_policy, name="paired_difference")


def welch_interval(x, y, level: float = 0.95, *, nan_policy: str = "raise") -> Estimate:
    """mean(x) - mean(y) of two independent samples, Welch's t interval (unequal variances).

    se^2 = s_x^2 / n_x + s_y^2 / n_y with Welch-Satterthwaite df (`welch_df`). NaN interval when either
    sample has fewer than two values. ``n`` is n_x + n_y.
    """
    check_level(level)
    x, fx = _sample(x, "x", nan_policy)
    y, fy = _sample(y, "y", nan_policy)
    n, value = len(x) + len(y), float(x.mean() - y.mean())
    if min(len(x), len(y)) < 2 or not (fx and fy):
        return nan_estimate(n, "difference", value)
    va, vb = float(x.var(ddof=1)) / len(x), float(y.var(ddof=1)) / len(y)
    std_err = math.sqrt(va + vb)
    half = critical_value(level, welch_df(va, len(x) - 1, vb, len(y) - 1)) * std_err
    return Estimate(value, value - half, value + half, std_err, n, "difference")


def _influence(num, den, name: str) -> tuple[float, np.ndarray]:
    """(sum(num) / sum(den), the (n,) delta-method influence terms (num_i - R den_i) / mean(den)) of
    ``ratio_of_means``; ``den`` None is a mean (influence x_i - mean). NaN ratio when sum(den) == 0."""
    num, _ = _sample(num, f"{name} numerator")
    den = np.ones_like(num) if den is None else _sample(den, f"{name} denominator")[0]
    if num.shape != den.shape:
        raise ValueError(
            f"{name}: numerator and denominator must be 1-d of one length, got {num.shape} and {den.shape}"
        )
    if den.sum() == 0:
        return math.nan, np.full_like(num, math.nan)
    ratio = float(num.sum() / den.sum())
    return ratio, (num - ratio * den) / den.mean()


def paired_ratio_difference(num_x, den_x, num_y, den_y, level: float = 0.95) -> Estimate:
    """R_x - R_y, R = sum(num) / sum(den), over n units seen under both treatments (in the same order).

    The delta method linearises each ratio into per-unit influence terms (``ratio_of_means``); pairing
    differences them unit by unit, phi_i = infl_x_i - infl_y_i, so what the two treatments share on a unit
    (its user, its random draws) cancels: se^2 = var(phi) / n, with the t quantile on n - 1 df. With
    ``den_x`` and ``den_y`` None the metric is a mean and this is exactly ``paired_difference``.

    Args:
        num_x, den_x: (n,) per-unit numerator and denominator sums under treatment x (den None: a mean).
        num_y, den_y: the same n units under treatment y.
        level: two-sided coverage in (0, 1).

    Returns:
        The difference with its interval; NaN when either denominator sums to 0, NaN interval when n < 2.
    """
    check_level(level)
    rx, ix = _influence(num_x, den_x, "x")
    ry, iy = _influence(num_y, den_y, "y")
    if ix.shape != iy.shape:
        raise ValueError(f"paired samples must have one length, got {len(ix)} and {len(iy)}")
    n, value = len(ix), rx - ry
    if n < 2 or not math.isfinite(value):
        return nan_estimate(n, "paired_difference", value)
    std_err = float((ix - iy).std(ddof=1)) / math.sqrt(n)
    half = critical_value(level, n - 1) * std_err
    return Estimate(value, value - half, value + half, std_err, n, "paired_difference")


def welch_ratio_difference(num_x, den_x, num_y, den_y, level: float = 0.95) -> Estimate:
    """R_x - R_y, R = sum(num) / sum(den), of two independent samples: the unpaired counterpart of
    ``paired_ratio_difference``.

    se^2 = var(infl_x) / n_x + var(infl_y) / n_y (each ratio's delta-method variance, ``ratio_of_means``)
    with Welch-Satterthwaite df (``welch_df``). With ``den_x`` and ``den_y`` None this is exactly
    ``welch_interval``. ``n`` is n_x + n_y; NaN interval when either sample has fewer than two units.
    """
    check_level(level)
    rx, ix = _influence(num_x, den_x, "x")
    ry, iy = _influence(num_y, den_y, "y")
    n, value = len(ix) + len(iy), rx - ry
    if min(len(ix), len(iy)) < 2 or not math.isfinite(value):
        return nan_estimate(n, "difference", value)
    va, vb = float(ix.var(ddof=1)) / len(ix), float(iy.var(ddof=1)) / len(iy)
    std_err = math.sqrt(va + vb)
    half = critical_value(level, welch_df(va, len(ix) - 1, vb, len(iy) - 1)) * std_err
    return Estimate(value, value - half, value + half, std_err, n, "difference")


def relative_change(
    x,
    ref: float,
    ref_low: float,
    ref_high: float,
    *,
    ref_level: float = 0.95,
    level: float = 0.95,
    nan_policy: str = "raise",
) -> Estimate:
    """r = mean(x) / ref - 1: units ``x`` (seeds) against one independent reference estimate with its own CI.

    Delta method on the ratio of two independent estimates: with n = len(x), s^2 the variance of x (ddof
    1), se_ref = (ref_high - ref_low) / (2 z_{(1 + ref_level) / 2}) and R = mean(x) / ref,

        se^2 = a + b,   a = s^2 / (n ref^2)  (the units),   b = (R se_ref / ref)^2  (the reference's sampling)

    and the interval is r +- t_{(1 + level) / 2, df} se with the Welch-Satterthwaite df of a (n - 1 df) and
    b (a normal CI: infinite df), df = (n - 1) ((a + b) / a)^2: t_{n-1} when the reference is exact, normal
    when the units agree. NaN value when ref == 0; NaN interval with fewer than two units.
    """
    check_level(level)
    check_level(ref_level)
    x, finite = _sample(x, "x", nan_policy)
    ref_finite = all(math.isfinite(v) for v in (ref, ref_low, ref_high))
    if not ref_finite and nan_policy == "raise":
        raise ValueError(f"the reference must be finite, got {ref} [{ref_low}, {ref_high}]")
    n = len(x)
    if not math.isfinite(ref) or ref == 0:
        return nan_estimate(n, "relative_change")
    ratio = float(x.mean()) / ref
    if n < 2 or not (finite and ref_finite):
        return nan_estimate(n, "relative_change", ratio - 1)
    se_ref = (ref_high - ref_low) / (2 * critical_value(ref_level))
    a = float(x.var(ddof=1)) / (n * ref**2)
    b = (ratio * se_ref / ref) ** 2
    std_err = math.sqrt(a + b)
    half = critical_value(level, welch_df(a, n - 1, b)) * std_err
    return Estimate(ratio - 1, ratio - 1 - half, ratio - 1 + half, std_err, n, "relative_change")


# ----------------------------------------------------------------------------- percentile bootstrap


def bootstrap_sums(data, rng: np.random.Generator, n_bootstrap: int = 1000) -> np.ndarray:
    """Column sums of ``n_bootstrap`` resamples (with replacement) of the rows of ``data``.

    A resample is drawn as multinomial counts of the n rows, so a statistic of column sums (a mean, a
    ratio of sums) costs one (B, n) @ (n, C) product; chunked to bound memory. Every column sees the same
    resamples, so statistics computed from them share one bootstrap.

    Args:
        data: (n, C) values, one row per independent unit (session, logged row).
        rng: the only source of randomness.
        n_bootstrap: B, the number of resamples.

    Returns:
        (B, C) resampled column sums.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a np.random.Generator (no global RNG is used)")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, Integral) or n_bootstrap < 2:
        raise ValueError(f"n_bootstrap must be an integer >= 2, got {n_bootstrap!r}")
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] == 0:
        raise ValueError(f"data must be (n, C) with n >= 1, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError("data holds NaN or inf")
    n = data.shape[0]
    sums = np.empty((n_bootstrap, data.shape[1]))
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMS // n)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)  # (b, n) counts
        sums[start : start + b] = weights @ data  # (b, C)
    return sums


def percentile_interval(
    replicates, value: float, level: float = 0.95, n: int = 0, name: str = ""
) -> Estimate:
    """The percentile-bootstrap interval: the (1 -+ level) / 2 quantiles of the finite replicates.

    Args:
        replicates: (B,) the statistic on each resample (non-finite ones, e.g. a ratio whose resampled
            denominator is 0, are dropped).
        value: the plug-in estimate on the full sample.
        level: two-sided coverage in (0, 1).
        n: units of the full sample; NaN interval when n < 2 or fewer than two replicates are finite.
        name: the estimate's name.

    Returns:
        Estimate with std_err = the std of the replicates.
    """
    level = check_level(level)
    r = np.asarray(replicates, dtype=np.float64).ravel()
    r = r[np.isfinite(r)]
    if len(r) < 2 or n < 2:
        return nan_estimate(n, name, value)
    alpha = 1.0 - level
    low, high = np.quantile(r, [alpha / 2.0, 1.0 - alpha / 2.0])
    return Estimate(float(value), float(low), float(high), float(r.std(ddof=1)), n, name)


def bootstrap_ratio(
    num,
    den=None,
    *,
    rng: np.random.Generator,
    level: float = 0.95,
    n_bootstrap: int = 1000,
    name: str = "ratio",
) -> Estimate:
    """sum(num) / sum(den) (a mean when ``den`` is None) with a percentile-bootstrap interval over units.

    The bootstrap counterpart of `ratio_of_means` / `mean_interval`: same value, an interval that does not
    assume the estimate is normal (skewed metrics, few conversions).
    """
    check_level(level)
    num, _ = _sample(num, "num")
    den = np.ones_like(num) if den is None else _sample(den, "den")[0]
    if num.shape != den.shape:
        raise ValueError(f"num and den must be 1-d of one length, got shapes {num.shape} and {den.shape}")
    value = float(num.sum() / den.sum()) if den.sum() != 0 else math.nan
    sums = bootstrap_sums(np.stack([num, den], axis=1), rng, n_bootstrap)  # (B, 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = sums[:, 0] / sums[:, 1]
    return percentile_interval(reps, value, level, len(num), name)
