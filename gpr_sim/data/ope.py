"""Off-policy estimators: the value of an evaluation policy pi_e from a log collected by pi_b.

Inputs shared by every estimator (n logged rows, A actions):

| argument | shape          | meaning                                                                   |
|----------|----------------|---------------------------------------------------------------------------|
| `data`   | `LoggedBandit` | logged action, reward, behaviour propensity pi_b(a_i | x_i), position      |
| `pi_e`   | (n,) or (n, A) | pi_e(a_i | x_i) for the logged action, or pi_e's whole action distribution |
| `q_hat`  | (n, A)         | reward model: expected reward of every action in each logged context      |

For slate logs each row is one (request, slot) pair and every probability is the *marginal* probability
of the item at that slot. Every estimator is a mean of per-row terms (SNIPS a ratio of two means), so all
of them share one interval routine: a normal (CLT) interval on those terms, or a percentile bootstrap
that resamples rows (`ci="bootstrap"`, with an explicit `rng`).

Values are per logged row (per shown slot), except `independent_ips`, which is per request (the sum over
slots); `estimate_all` reports this in its `unit` column.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import pandas as pd

from gpr_sim.data.bandit import LoggedBandit, describe_rows
from gpr_sim.stats import CIConfig, Estimate, critical_value, percentile_interval, ratio_of_means

_BOOTSTRAP_CHUNK_ELEMS = 1 << 22  # resampled indices held at once; bounds memory at ~32 MB


class WeightStats(NamedTuple):
    """Importance-weight diagnostics; a mean weight far from 1 means wrong propensities or support."""

    mean_weight: float
    max_weight: float
    ess: float
    """Effective sample size (sum w)^2 / sum w^2: how many on-policy rows the log is worth."""
    clipped_frac: float


# ----------------------------------------------------------------------------- input checks


def _check_matrix(name: str, m: np.ndarray, data: LoggedBandit) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (len(data), data.n_actions):
        raise ValueError(
            f"{name} must have shape (n, n_actions) = {(len(data), data.n_actions)}, got {m.shape}"
        )
    bad = ~np.isfinite(m).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} must be finite; {describe_rows(bad)} contain NaN or inf")
    return m


def _check_dist(pi: np.ndarray, data: LoggedBandit) -> np.ndarray:
    pi = _check_matrix("pi_e", pi, data)
    bad = (pi < 0).any(axis=1) | ~np.isclose(pi.sum(axis=1), 1.0, rtol=0.0, atol=1e-5)
    if bad.any():
        raise ValueError(f"pi_e rows must be probability distributions; {describe_rows(bad)} are not")
    return pi


def _logged_prob(pi_e: np.ndarray, data: LoggedBandit) -> np.ndarray:
    """pi_e(a_i | x_i) for the logged actions, from either accepted shape of `pi_e`."""
    arr = np.asarray(pi_e, dtype=np.float64)
    if arr.ndim == 2:
        return _check_dist(arr, data)[np.arange(len(data)), data.action]
    if arr.shape != (len(data),):
        raise ValueError(f"pi_e must have shape (n,) = ({len(data)},) or (n, n_actions), got {arr.shape}")
    bad = ~((arr >= 0.0) & (arr <= 1.0))
    if bad.any():
        raise ValueError(f"pi_e must be probabilities in [0, 1]; {describe_rows(bad)} are not")
    return arr


def _weights(pi_logged: np.ndarray, data: LoggedBandit, clip: float | None) -> np.ndarray:
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 (or None for no clipping), got {clip}")
    w = pi_logged / data.propensity
    return w if clip is None else np.minimum(w, clip)


def _name(base: str, clip: float | None) -> str:
    return base if clip is None else f"{base}(clip={clip:g})"


# ----------------------------------------------------------------------------- intervals


def _interval(
    num: np.ndarray,
    den: np.ndarray,
    strata: np.ndarray,
    name: str,
    cfg: CIConfig,
    rng: np.random.Generator | None,
) -> Estimate:
    """Estimate = sum over strata of sum(num) / sum(den) within the stratum, with its interval.

    One stratum with den == 1 is a plain mean (DM, IPS, DR); den == w is SNIPS; strata == positions sums
    independent per-slot means. The bootstrap resamples rows within each stratum.
    """
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    parts = [ratio_of_means(num[g], den[g], cfg.level) for g in groups]  # delta method per stratum
    value = float(sum(p.value for p in parts))
    n = len(num)
    if cfg.method == "normal":
        std_err = float(np.sqrt(sum(p.std_err**2 for p in parts)))
        z = critical_value(cfg.level)
        return Estimate(value, value - z * std_err, value + z * std_err, std_err, n, name)

    if rng is None:
        raise ValueError("ci='bootstrap' needs rng=np.random.Generator (no global RNG is used)")
    reps = np.zeros(cfg.n_bootstrap)
    for g in groups:
        chunk = max(1, _BOOTSTRAP_CHUNK_ELEMS // len(g))
        for start in range(0, cfg.n_bootstrap, chunk):
            stop = min(start + chunk, cfg.n_bootstrap)
            idx = g[rng.integers(0, len(g), size=(stop - start, len(g)))]  # (B_chunk, n_g)
            with np.errstate(invalid="ignore", divide="ignore"):
                reps[start:stop] += num[idx].sum(axis=1) / den[idx].sum(axis=1)
    return percentile_interval(reps, value, cfg.level, n, name)  # drops SNIPS replicates with sum(w) == 0


def _mean_estimate(terms: np.ndarray, name: str, cfg: CIConfig, rng: np.random.Generator | None) -> Estimate:
    return _interval(terms, np.ones_like(terms), np.zeros(len(terms), dtype=np.int64), name, cfg, rng)


# ----------------------------------------------------------------------------- estimators


def direct_method(
    data: LoggedBandit,
    pi_e: np.ndarray,
    q_hat: np.ndarray,
    *,
    ci: str = "normal",
    level: float = 0.95,
    n_bootstrap: int = 1000,
    rng: np.random.Generator | None = None,
) -> Estimate:
    """Direct method: average the reward model under pi_e; unbiased only if q_hat is.

    Args:
        data: Logged rows.
        pi_e: (n, A) evaluation-policy action distribution in each logged context.
        q_hat: (n, A) modelled expected reward of every action in each logged context.
        ci, level, n_bootstrap, rng: Interval options, see `CIConfig`; the bootstrap needs `rng`.

    Returns:
        Estimate named "dm". The interval reflects context sampling only, not the model's bias.
    """
    cfg = CIConfig(ci, level, n_bootstrap)
    terms = (_check_dist(pi_e, data) * _check_matrix("q_hat", q_hat, data)).sum(axis=1)  # (n,)
    return _mean_estimate(terms, "dm", cfg, rng)


def ips(
    data: LoggedBandit,
    pi_e: np.ndarray,
    *,
    clip: float | None = None,
    ci: str = "normal",
    level: float = 0.95,
    n_bootstrap: int = 1000,
    rng: np.random.Generator | None = None,
) -> Estimate:
    """Inverse propensity scoring: mean of w_i r_i with w_i = pi_e(a_i|x_i) / pi_b(a_i|x_i).

    Unbiased when pi_b > 0 wherever pi_e > 0 and the propensities are right; clipping w at `clip`
    trades a downward bias (for non-negative rewards) for lower variance.

    Args:
        data: Logged rows.
        pi_e: (n,) pi_e of the logged actions, or the (n, A) distribution.
        clip: Upper bound on the weights, or None.
        ci, level, n_bootstrap, rng: Interval options, see `CIConfig`; the bootstrap needs `rng`.

    Returns:
        Estimate named "ips" (or "ips(clip=c)").
    """
    cfg = CIConfig(ci, level, n_bootstrap)
    w = _weights(_logged_prob(pi_e, data), data, clip)
    return _mean_estimate(w * data.reward, _name("ips", clip), cfg, rng)


def snips(
    data: LoggedBandit,
    pi_e: np.ndarray,
    *,
    ci: str = "normal",
    level: float = 0.95,
    n_bootstrap: int = 1000,
    rng: np.random.Generator | None = None,
) -> Estimate:
    """Self-normalised IPS: sum(w r) / sum(w); slightly biased, but bounded by the reward range.

    The normal interval uses the delta method on the ratio (influence terms w_i (r_i - V) / mean(w));
    the bootstrap recomputes the ratio sum(w r) / sum(w) on each resample of rows.

    Args:
        data: Logged rows.
        pi_e: (n,) pi_e of the logged actions, or the (n, A) distribution.
        ci, level, n_bootstrap, rng: Interval options, see `CIConfig`; the bootstrap needs `rng`.

    Returns:
        Estimate named "snips"; NaN value if every weight is zero.
    """
    cfg = CIConfig(ci, level, n_bootstrap)
    w = _weights(_logged_prob(pi_e, data), data, None)
    if not w.sum() > 0:
        nan = float("nan")
        return Estimate(nan, nan, nan, nan, len(data), "snips")
    return _interval(w * data.reward, w, np.zeros(len(data), dtype=np.int64), "snips", cfg, rng)


def doubly_robust(
    data: LoggedBandit,
    pi_e: np.ndarray,
    q_hat: np.ndarray,
    *,
    clip: float | None = None,
    ci: str = "normal",
    level: float = 0.95,
    n_bootstrap: int = 1000,
    rng: np.random.Generator | None = None,
) -> Estimate:
    """Doubly robust: DM plus an IPS correction of the model's residual on the logged action.

    Per row: sum_a pi_e(a|x_i) q_hat(x_i, a) + w_i (r_i - q_hat(x_i, a_i)). Unbiased if either the
    propensities or q_hat are right; a good q_hat shrinks the residual and so the variance.

    Args:
        data: Logged rows.
        pi_e: (n, A) evaluation-policy action distribution in each logged context.
        q_hat: (n, A) modelled expected reward of every action in each logged context.
        clip: Upper bound on the correction weights, or None.
        ci, level, n_bootstrap, rng: Interval options, see `CIConfig`; the bootstrap needs `rng`.

    Returns:
        Estimate named "dr" (or "dr(clip=c)").
    """
    cfg = CIConfig(ci, level, n_bootstrap)
    pi = _check_dist(pi_e, data)
    q = _check_matrix("q_hat", q_hat, data)
    rows = np.arange(len(data))
    w = _weights(pi[rows, data.action], data, clip)
    terms = (pi * q).sum(axis=1) + w * (data.reward - q[rows, data.action])  # (n,)
    return _mean_estimate(terms, _name("dr", clip), cfg, rng)


def independent_ips(
    data: LoggedBandit,
    pi_e: np.ndarray,
    *,
    clip: float | None = None,
    ci: str = "normal",
    level: float = 0.95,
    n_bootstrap: int = 1000,
    rng: np.random.Generator | None = None,
) -> Estimate:
    """Slate value per request (expected reward summed over slots) by independent per-slot IPS.

    Assumption (position-based model): the reward at slot k depends only on the context, k and the item
    at slot k, not on the other items in the slate. Then the slate value is sum_k V_k and each V_k is
    estimated by IPS over the rows at slot k, weighting by the *marginal* probabilities of the logged
    item at that slot under pi_e and pi_b (`pi_e` and `data.propensity`). Interactions between slots
    (cascades, substitutes) bias it.

    With `data.request_id`, the value is the mean over requests of the summed slot terms (a missing slot
    counts as zero reward) and the interval treats requests as the i.i.d. units, so correlation between
    slots of one request is accounted for. Without it, the value is sum_k mean_{rows at k}(w r) and the
    variances of the slots are added as if independent.

    Args:
        data: Logged (request, slot) rows.
        pi_e: (n,) marginal pi_e of the logged item at its slot, or the (n, A) marginal distribution.
        clip: Upper bound on the weights, or None.
        ci, level, n_bootstrap, rng: Interval options, see `CIConfig`; the bootstrap needs `rng`.

    Returns:
        Estimate named "independent_ips" whose `n` counts requests (or rows if there are no ids).
    """
    cfg = CIConfig(ci, level, n_bootstrap)
    terms = _weights(_logged_prob(pi_e, data), data, clip) * data.reward  # (n,)
    name = _name("independent_ips", clip)
    if data.request_id is not None:
        _, req = np.unique(data.request_id, return_inverse=True)
        per_request = np.bincount(req, weights=terms)  # (n_requests,)
        return _mean_estimate(per_request, name, cfg, rng)
    return _interval(terms, np.ones_like(terms), data.position, name, cfg, rng)


def weight_stats(data: LoggedBandit, pi_e: np.ndarray, clip: float | None = None) -> WeightStats:
    """Diagnostics of the importance weights w = pi_e / pi_b (before clipping, except `clipped_frac`).

    Args:
        data: Logged rows.
        pi_e: (n,) or (n, A), as for `ips`.
        clip: Clipping threshold whose effect to report, or None.

    Returns:
        `WeightStats`; E[w] = 1 under pi_b when pi_e is a distribution, so mean_weight is a sanity check.
    """
    w = _weights(_logged_prob(pi_e, data), data, None)
    ess = float(w.sum() ** 2 / (w**2).sum()) if (w > 0).any() else 0.0
    clipped = float((w > clip).mean()) if clip is not None else 0.0
    return WeightStats(float(w.mean()), float(w.max()), ess, clipped)


def position_breakdown(
    data: LoggedBandit,
    pi_e: np.ndarray,
    *,
    clip: float | None = None,
    ci: str = "normal",
    level: float = 0.95,
    n_bootstrap: int = 1000,
    rng: np.random.Generator | None = None,
) -> pd.DataFrame:
    """IPS per slot, to see where a policy gains or loses (same assumption as `independent_ips`).

    Args:
        data: Logged (request, slot) rows.
        pi_e: (n,) or (n, A) marginal probabilities, as for `independent_ips`.
        clip: Upper bound on the weights, or None.
        ci, level, n_bootstrap, rng: Interval options, see `CIConfig`; the bootstrap needs `rng`
            (consumed position by position).

    Returns:
        One row per position: position, n, logged (mean logged reward, i.e. pi_b's value), value, ci_low,
        ci_high, std_err (IPS for pi_e), mean_weight, ess.
    """
    pi_logged = _logged_prob(pi_e, data)
    rows = []
    for k in np.unique(data.position):
        at_k = data.position == k
        sub = data.subset(at_k)
        est = ips(sub, pi_logged[at_k], clip=clip, ci=ci, level=level, n_bootstrap=n_bootstrap, rng=rng)
        ws = weight_stats(sub, pi_logged[at_k])
        rows.append(
            {
                "position": int(k),
                "n": est.n,
                "logged": float(sub.reward.mean()),
                "value": est.value,
                "ci_low": est.ci_low,
                "ci_high": est.ci_high,
                "std_err": est.std_err,
                "mean_weight": ws.mean_weight,
                "ess": ws.ess,
            }
        )
    return pd.DataFrame(rows)


def estimate_all(
    data: LoggedBandit,
    pi_e: np.ndarray,
    q_hat: np.ndarray | None = None,
    *,
    clip: float | None = None,
    truth: float | Mapping[str, float] | None = None,
    ci: str = "normal",
    level: float = 0.95,
    n_bootstrap: int = 1000,
    rng: np.random.Generator | None = None,
) -> pd.DataFrame:
    """Run every estimator that the inputs allow and tabulate them.

    Always: "logged" (mean logged reward, pi_b's own value, as a do-nothing baseline), "ips", "snips".
    With `clip`: also "ips(clip=c)". With `q_hat` and an (n, A) `pi_e`: "dm", "dr" (and "dr(clip=c)").
    With more than one position: "independent_ips" (unit "request").

    Args:
        data: Logged rows.
        pi_e: (n,) pi_e of the logged actions, or the (n, A) distribution (needed for DM / DR).
        q_hat: (n, A) reward model, or None.
        clip: Weight clip for the extra clipped variants, or None.
        truth: The true value, to add `error` and `covered` columns: a float for the per-row unit, or a
            mapping {"row": v_row, "request": v_request}; units without a truth get NaN.
        ci, level, n_bootstrap, rng: Interval options, see `CIConfig`; the bootstrap needs `rng`
            (consumed estimator by estimator, in table order).

    Returns:
        DataFrame with columns name, unit, value, ci_low, ci_high, std_err, n (+ truth, error, covered).
    """
    kw = {"ci": ci, "level": level, "n_bootstrap": n_bootstrap, "rng": rng}
    ests = [
        _mean_estimate(data.reward, "logged", CIConfig(ci, level, n_bootstrap), rng),
        ips(data, pi_e, **kw),
        snips(data, pi_e, **kw),
    ]
    if clip is not None:
        ests.append(ips(data, pi_e, clip=clip, **kw))
    if q_hat is not None and np.ndim(pi_e) == 2:
        ests += [direct_method(data, pi_e, q_hat, **kw), doubly_robust(data, pi_e, q_hat, **kw)]
        if clip is not None:
            ests.append(doubly_robust(data, pi_e, q_hat, clip=clip, **kw))
    units = ["row"] * len(ests)
    if data.n_positions > 1:
        ests.append(independent_ips(data, pi_e, **kw))
        units.append("request")

    df = pd.DataFrame([e._asdict() for e in ests])
    df["unit"] = units
    df = df[["name", "unit", "value", "ci_low", "ci_high", "std_err", "n"]]
    if truth is not None:
        truths = truth if isinstance(truth, Mapping) else {"row": truth}
        df["truth"] = df["unit"].map(lambda u: truths.get(u, np.nan)).astype(np.float64)
        df["error"] = df["value"] - df["truth"]
        df["covered"] = (df["ci_low"] <= df["truth"]) & (df["truth"] <= df["ci_high"])
    return df
