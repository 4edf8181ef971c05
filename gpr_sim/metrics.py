"""Business metrics of the simulated marketplace, with confidence intervals over sessions.

A session (one episode: one user's visit) is the independent unit. Requests inside a session share the
user, their fatigue and their drifting interests, so impressions are *not* independent draws; treating
them as such gives intervals that are too narrow. Everything here therefore works on one row per session:

| column | meaning |
|---|---|
| `length` | requests served in the session |
| `impressions`, `clicks` | ads shown and clicked |
| `conversions`, `gmv` | conversions and their order value, delayed ones included (`delayed_*` say how many) |
| `revenue` | price charged to advertisers (= advertiser costs = platform revenue) |
| `reward` | the env's reward summed over the session |
| `terminated` | the user left (else the session was truncated at its step limit) |
| `new_*`, `old_*` | impressions, clicks, conversions, gmv and revenue of new / old ads (cold start) |
| `activity_tier` | the user's activity tier, 1..5 |
| `expected_clicks`, `expected_conversions`, `expected_gmv` | the same outcomes' conditional expectations given what was shown (below) |

Ratio metrics (CTR, CVR, CTCVR, eCPM, ROI) are ratios of session sums, sum(num) / sum(den), with a
delta-method interval (``gpr_sim.stats.ratio_of_means``); per-session means (GMV, revenue, reward,
length) get the CLT interval (``gpr_sim.stats.mean_interval``). ``ci="bootstrap"`` instead resamples
sessions (``gpr_sim.stats.bootstrap_sums``: one set of resamples shared by every metric) with an explicit
``np.random.Generator``. An empty group of sessions (a stratum nobody fell into) gives NaN, not an error.

``SessionAccumulator`` builds the session rows from a batched env's per-step outcomes, on the env's
device, with no host sync until ``records()``.

**Expected outcomes** (the `*_expected` metrics; a simulator's evaluator only, labelled: they read the true
funnel). Conversions are rare and order values heavy-tailed, so realised CTCVR and GMV need millions of sessions
for a 1% interval. Each impression's click, conversion and order value are drawn from true probabilities the
simulator knows at that step (``Outcome.p_click``, ``p_conversion``, the ad's mean order value), so the session sums
of p_click, p_click x p_conversion and p_click x p_conversion x mean order value estimate the same expected totals
as the realised counts (each step's term is the conditional expectation of the realised one given everything
before the draw, so the sums differ from the realised sums by a zero-mean martingale) with the draw's noise
removed: conditional Monte Carlo. Sessions, their lengths and what is shown stay realised; delayed conversions are
counted at their impression (every one is reported within its session).

Probabilistic classifiers (the platform's pCTR / pCVR models, ``gpr_sim.platform.funnel``) are judged by
``auc`` (rank formula), ``log_loss`` and calibration (``reliability_table``, ``expected_calibration_error``);
``classifier_report`` bundles them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from gpr_sim.stats import (
    CIConfig,
    Estimate,
    bootstrap_sums,
    mean_interval,
    nan_estimate,
    percentile_interval,
    ratio_of_means,
)
from gpr_sim.world.config import check_range

# ----------------------------------------------------------------------------- metric definitions


@dataclass(frozen=True)
class Metric:
    """A metric over sessions: ``scale x sum(numerator) / sum(denominator)``, or a per-session mean."""

    name: str
    """key in the summary dict (without the prefix)"""
    numerator: str
    """session column summed in the numerator"""
    denominator: str | None = None
    """session column summed in the denominator; None = number of sessions (a per-session mean)"""
    scale: float = 1.0
    """constant factor (1000 for eCPM)"""

    def __post_init__(self) -> None:
        if not self.name or not self.numerator or self.denominator == "":
            raise ValueError(f"Metric name, numerator and denominator must be non-empty, got {self!r}")
        check_range("scale", self.scale, 0.0, 1e12, lo_open=True)


METRICS: tuple[Metric, ...] = (
    Metric("ctr", "clicks", "impressions"),
    Metric("cvr", "conversions", "clicks"),
    Metric("ctcvr", "conversions", "impressions"),
    Metric("ecpm", "revenue", "impressions", 1000.0),  # realised: 1000 x price per impression
    Metric("roi", "gmv", "revenue"),  # advertiser ROI = GMV / costs
    Metric("gmv_per_session", "gmv"),
    Metric("revenue_per_session", "revenue"),
    Metric("reward_per_session", "reward"),
    Metric("session_length", "length"),
    Metric("impressions_per_session", "impressions"),
    Metric("clicks_per_session", "clicks"),
    Metric("conversions_per_session", "conversions"),
    Metric("fill_rate", "impressions", "length"),  # impressions per request
    Metric("exit_rate", "terminated"),  # share of sessions the user left (the rest hit max_steps)
    # the conditional expectations of the realised funnel (module doc, "Expected outcomes"): same means, less noise
    Metric("ctr_expected", "expected_clicks", "impressions"),
    Metric("cvr_expected", "expected_conversions", "expected_clicks"),
    Metric("ctcvr_expected", "expected_conversions", "impressions"),
    Metric("roi_expected", "expected_gmv", "revenue"),
    Metric("gmv_per_session_expected", "expected_gmv"),
    Metric("conversions_per_session_expected", "expected_conversions"),
)
"""Everything ``summarize`` reports by default."""

AD_COLUMNS = ("impressions", "clicks", "conversions", "gmv", "revenue")
"""Session columns that ``SessionAccumulator`` also splits by ad age (``new_*`` / ``old_*``)."""

AD_METRICS: tuple[Metric, ...] = tuple(
    m for m in METRICS if {m.numerator, m.denominator} <= {*AD_COLUMNS, None}
)
"""The metrics defined for one group of ads within sessions (new or old ads): no length, reward, fill rate."""


# ----------------------------------------------------------------------------- intervals


def bootstrap_ci(
    columns: Mapping[str, np.ndarray],
    metrics: Sequence[Metric],
    rng: np.random.Generator,
    level: float = 0.95,
    n_bootstrap: int = 1000,
) -> dict[str, Estimate]:
    """Percentile bootstrap over sessions; every metric is evaluated on the same resamples.

    Args:
        columns: session column name -> (n,) values.
        metrics: what to estimate.
        rng: the only source of randomness.
        level: two-sided coverage in (0, 1).
        n_bootstrap: number of resamples.

    Returns:
        metric name -> Estimate (value = the plug-in estimate, std_err = std of the replicates).
    """
    CIConfig("bootstrap", level, n_bootstrap)
    names = sorted({m.numerator for m in metrics} | {m.denominator for m in metrics if m.denominator})
    data = np.stack([np.asarray(columns[c], dtype=np.float64) for c in names], axis=1)  # (n, C)
    n = data.shape[0]
    if n == 0:
        return {m.name: nan_estimate(0, m.name) for m in metrics}
    sums = bootstrap_sums(data, rng, n_bootstrap)  # (B, C): resampled session sums of every column
    col = {c: i for i, c in enumerate(names)}
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for m in metrics:
            den = sums[:, col[m.denominator]] if m.denominator else float(n)
            reps = m.scale * sums[:, col[m.numerator]] / den  # (B,)
            out[m.name] = percentile_interval(reps, _point(columns, m), level, n, m.name)
    return out


def _point(columns: Mapping[str, np.ndarray], m: Metric) -> float:
    num = np.asarray(columns[m.numerator], dtype=np.float64)
    den = np.asarray(columns[m.denominator], dtype=np.float64) if m.denominator else np.ones_like(num)
    if len(num) == 0 or den.sum() == 0:
        return float("nan")
    return float(m.scale * num.sum() / den.sum())


def estimate(
    columns: Mapping[str, np.ndarray],
    metrics: Sequence[Metric] = METRICS,
    *,
    ci: str = "normal",
    level: float = 0.95,
    n_bootstrap: int = 1000,
    rng: np.random.Generator | None = None,
) -> dict[str, Estimate]:
    """Every metric of ``metrics`` with its interval: metric name -> Estimate.

    ``ci="normal"``: delta method for ratios, CLT for means. ``ci="bootstrap"`` needs ``rng``.
    """
    CIConfig(ci, level, n_bootstrap)
    if ci == "bootstrap":
        if rng is None:
            raise ValueError("ci='bootstrap' needs rng=np.random.Generator (no global RNG is used)")
        return bootstrap_ci(columns, metrics, rng, level, n_bootstrap)
    out = {}
    for m in metrics:
        num = np.asarray(columns[m.numerator], dtype=np.float64)
        if len(num) == 0:  # an empty stratum: no sessions, no value
            out[m.name] = nan_estimate(0, m.name)
            continue
        if m.denominator:
            e = ratio_of_means(num, np.asarray(columns[m.denominator], dtype=np.float64), level)
        else:
            e = mean_interval(num, level)
        out[m.name] = Estimate(*(m.scale * v for v in e[:4]), e.n, m.name)
    return out


def summarize(
    sessions: pd.DataFrame,
    metrics: Sequence[Metric] = METRICS,
    *,
    prefix: str = "sim/",
    ci: str = "normal",
    level: float = 0.95,
    n_bootstrap: int = 1000,
    rng: np.random.Generator | None = None,
) -> dict[str, float]:
    """One flat dict: ``{prefix}{metric}``, ``..._ci_low``, ``..._ci_high`` for every metric, and ``{prefix}sessions``."""
    ests = estimate(sessions, metrics, ci=ci, level=level, n_bootstrap=n_bootstrap, rng=rng)
    flat: dict[str, float] = {f"{prefix}sessions": int(len(sessions))}
    for name, e in ests.items():
        flat.update(e.columns(f"{prefix}{name}"))
    return flat


def ad_view(sessions: pd.DataFrame, group: str) -> pd.DataFrame:
    """Sessions with ``{group}_impressions`` etc. renamed to ``impressions`` etc. (group: "new" or "old")."""
    if group not in ("new", "old"):
        raise ValueError(f"group={group!r} is invalid: expected 'new' or 'old'")
    return pd.DataFrame({c: sessions[f"{group}_{c}"].to_numpy() for c in AD_COLUMNS})


def summarize_strata(
    sessions: pd.DataFrame,
    *,
    prefix: str = "sim/",
    ci: str = "normal",
    level: float = 0.95,
    n_bootstrap: int = 1000,
    rng: np.random.Generator | None = None,
) -> pd.DataFrame:
    """Metrics per user activity tier (1..5, all metrics) and per ad age group (new / old, ``AD_METRICS``).

    Tiers split sessions; the ad groups split each session's counts, so every session contributes to
    both groups (a session without new-ad impressions adds 0 to both sums of a new-ad ratio). Returns one
    row per stratum: ``stratum`` ("activity_tier" or "ad_age"), ``group`` ("1".."5" or "new"/"old") and
    the flat metric columns of ``summarize``.
    """
    kw = dict(prefix=prefix, ci=ci, level=level, n_bootstrap=n_bootstrap, rng=rng)
    rows = []
    for tier in range(1, 6):
        part = sessions[sessions["activity_tier"] == tier]
        rows.append({"stratum": "activity_tier", "group": str(tier), **summarize(part, **kw)})
    for group in ("new", "old"):
        rows.append(
            {"stratum": "ad_age", "group": group, **summarize(ad_view(sessions, group), AD_METRICS, **kw)}
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- streaming accumulation

SUM_COLUMNS = (
    "length",
    "impressions",
    "clicks",
    "conversions",
    "delayed_conversions",
    "gmv",
    "delayed_gmv",
    "revenue",
    "reward",
    "invalid",
    "budget_capped",
    "new_impressions",
    "new_clicks",
    "new_conversions",
    "new_gmv",
    "new_revenue",
    "expected_clicks",
    "expected_conversions",
    "expected_gmv",
)
"""Per-session sums, in the column order of ``SessionAccumulator.running``."""
_LAST = ("user_id", "activity_tier", "terminated")  # taken from the session's last step
_FIELDS = SUM_COLUMNS + _LAST
SESSION_COLUMNS = (
    ("slot", "session", "user_id", "activity_tier", "terminated")
    + SUM_COLUMNS
    + tuple(f"old_{c}" for c in AD_COLUMNS)
)
"""Columns of ``SessionAccumulator.records()``, in order."""
PAIR_KEY = ("slot", "session")
"""What pairs sessions across runs of one market: env slot and the slot's session index (0 = the first session
after ``reset``, with a fresh accumulator). Two runs reset with the same seed draw the k-th session of a slot
from the same random streams (user, clicks, exits...) when that slot's earlier sessions had the same lengths,
always for k = 0 (``agents.evaluation.paired``)."""


class SessionAccumulator:
    """Per-session sums of a batched env's step outcomes, kept on the env's device.

    Each env slot records its first ``sessions_per_slot`` completed sessions (later ones are ignored),
    so the sample does not favour short sessions the way "stop after n sessions" would. With
    ``fresh=False`` (created mid-run), each slot's first completed session started before the
    accumulator existed and is skipped.

    Conversions and GMV include delayed ones, in the step they are reported; the ``new_*`` / ``old_*``
    split counts only conversions reported at once (a delayed conversion's ad is not in the outcome),
    so with ``conversion_delay_mean > 0`` the ad-age groups undercount conversions and GMV. The
    ``expected_*`` sums (module doc, "Expected outcomes") read the step's true ``p_click`` and ``p_conversion``
    (zero where nothing was shown) and ``ad_value_mean`` of the shown ads.

    Args:
        num_envs: N, env slots.
        user_activity: (num_users,) activity tier of every user (``world.user_activity``).
        sessions_per_slot: sessions recorded per slot (the buffer is (N, sessions_per_slot)).
        fresh: True when every slot's current session starts now (created right after ``reset``).
        ad_value_mean: (num_ads,) mean order value of every ad's conversion (``world.ad_value_mean``: the
            simulator's truth, read for ``expected_gmv`` only).
    """

    def __init__(
        self,
        num_envs: int,
        user_activity: torch.Tensor,
        sessions_per_slot: int,
        fresh: bool = True,
        *,
        ad_value_mean: torch.Tensor,
    ):
        for name, v in (("num_envs", num_envs), ("sessions_per_slot", sessions_per_slot)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is out of range: expected an integer >= 1")
        self.user_activity = user_activity
        self.ad_value_mean = ad_value_mean.double()
        dev = user_activity.device
        self.num_envs, self.sessions_per_slot = num_envs, sessions_per_slot
        self.running = torch.zeros(num_envs, len(SUM_COLUMNS), dtype=torch.float64, device=dev)  # (N, F_sum)
        self.buffer = torch.zeros(num_envs, sessions_per_slot, len(_FIELDS), dtype=torch.float64, device=dev)
        self.count = torch.zeros(num_envs, dtype=torch.int64, device=dev)  # sessions recorded per slot
        self.valid = torch.full((num_envs,), bool(fresh), dtype=torch.bool, device=dev)  # session began here
        self._k = torch.arange(sessions_per_slot, device=dev)

    def update(
        self,
        outcome: Mapping[str, torch.Tensor] | tuple,
        terminated: torch.Tensor,
        truncated: torch.Tensor,
        user_id: torch.Tensor | None = None,
    ) -> None:
        """Add one step of every slot; close the sessions that ended.

        Args:
            outcome: the step's ``Outcome`` or an info dict with its keys ((N, S) per slot, (N,) per request).
            terminated: (N,) bool, the user left.
            truncated: (N,) bool, the session hit its step limit.
            user_id: (N,) user of the request; defaults to ``outcome["user_id"]`` (the vector env's info).
        """
        out = outcome._asdict() if hasattr(outcome, "_asdict") else outcome
        if user_id is None:
            user_id = out["user_id"]
        imp = out["impression"].bool()
        new = out["is_new_ad"].bool() & imp
        click, conv = out["click"].bool(), out["conversion"].bool()
        gmv, rev = out["gmv"].double(), out["revenue"].double()
        p_click = out["p_click"].double() * imp  # (N, S), given the impression
        p_conversion = p_click * out["p_conversion"].double()  # P(click and conversion)
        value = self.ad_value_mean[
            out["ad_id"].clamp_min(0)
        ]  # (N, S); -1 (nothing shown) reads ad 0, times 0
        step = torch.stack(
            [
                torch.ones_like(gmv[:, 0]),
                imp.sum(1).double(),
                click.sum(1).double(),
                conv.sum(1).double() + out["delayed_conversion"].double(),
                out["delayed_conversion"].double(),
                gmv.sum(1) + out["delayed_gmv"].double(),
                out["delayed_gmv"].double(),
                rev.sum(1),
                out["reward"].double(),
                out["invalid"].double(),
                out["budget_capped"].double(),
                new.sum(1).double(),
                (click & new).sum(1).double(),
                (conv & new).sum(1).double(),
                (gmv * new).sum(1),
                (rev * new).sum(1),
                p_click.sum(1),
                p_conversion.sum(1),
                (p_conversion * value).sum(1),
            ],
            dim=1,
        )  # (N, F_sum)
        self.running += step
        done = terminated.bool() | truncated.bool()
        last = torch.stack(
            [user_id.double(), self.user_activity[user_id].double(), terminated.double()], dim=1
        )  # (N, 3)
        row = torch.cat([self.running, last], dim=1)  # (N, F)
        put = (done & self.valid)[:, None] & (self._k[None, :] == self.count[:, None])  # (N, k)
        self.buffer = torch.where(put[..., None], row[:, None, :], self.buffer)
        self.count += (done & self.valid).long()
        self.valid |= done
        self.running *= (~done)[:, None]

    def complete(self) -> torch.Tensor:
        """() bool on the device: every slot has recorded ``sessions_per_slot`` sessions."""
        return (self.count >= self.sessions_per_slot).all()

    def num_sessions(self) -> torch.Tensor:
        """() int64 on the device: sessions recorded so far."""
        return self.count.clamp(max=self.sessions_per_slot).sum()

    def records(self) -> pd.DataFrame:
        """One row per recorded session (columns ``SESSION_COLUMNS``), ordered by (slot, session). Syncs once."""
        k = self.sessions_per_slot
        filled = self._k[None, :] < self.count.clamp(max=k)[:, None]  # (N, k)
        rows = self.buffer[filled].cpu().numpy()  # (n, F), row-major: slot, then session
        idx = torch.nonzero(filled).cpu().numpy()
        df = pd.DataFrame(rows, columns=list(_FIELDS))
        df.insert(0, "slot", idx[:, 0])
        df.insert(1, "session", idx[:, 1])
        ints = [
            "user_id",
            "activity_tier",
            "length",
            "impressions",
            "clicks",
            "conversions",
            "delayed_conversions",
            "invalid",
            "budget_capped",
            "new_impressions",
            "new_clicks",
            "new_conversions",
        ]
        df[ints] = df[ints].astype(np.int64)
        df["terminated"] = df["terminated"].astype(bool)
        df["old_impressions"] = df["impressions"] - df["new_impressions"]
        df["old_clicks"] = df["clicks"] - df["new_clicks"]
        df["old_conversions"] = df["conversions"] - df["delayed_conversions"] - df["new_conversions"]
        df["old_gmv"] = df["gmv"] - df["delayed_gmv"] - df["new_gmv"]
        df["old_revenue"] = df["revenue"] - df["new_revenue"]
        return df[list(SESSION_COLUMNS)]


# ----------------------------------------------------------------------------- probabilistic classifiers


def _binary(p, y) -> tuple[np.ndarray, np.ndarray]:
    """Predicted probabilities and 0/1 labels as equal-length float64 arrays, checked."""
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"predictions ({p.size}) and labels ({y.size}) differ in length")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("predictions must be finite probabilities in [0, 1]")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return p, y


def auc(scores, labels) -> float:
    """Area under the ROC curve by the rank (Mann-Whitney) formula; ties count one half.

    AUC = (sum of the positives' mid-ranks - n1 (n1 + 1) / 2) / (n1 n0): the probability that a random
    positive scores above a random negative. NaN when either class is empty. A constant predictor gets
    exactly 0.5 (every pair is a tie).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(s)  # mid-ranks of ties
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def log_loss(p, labels, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``p`` (clipped to [eps, 1 - eps]) against 0/1 labels."""
    p, y = _binary(p, labels)
    if p.size == 0:
        return float("nan")
    q = np.clip(p, eps, 1.0 - eps)
    return float(-(y * np.log(q) + (1.0 - y) * np.log1p(-q)).mean())


def reliability_table(p, labels, bins: int = 10) -> pd.DataFrame:
    """Mean predicted probability against the observed rate in ``bins`` equal-count bins of the prediction.

    Equal-count (quantile) bins rather than equal-width ones: click and conversion probabilities sit
    near 0, where equal-width bins would put almost every example into the first bin and leave the
    others empty. Columns: ``count``, ``mean_predicted``, ``observed`` (one row per non-empty bin, in
    increasing prediction).
    """
    p, y = _binary(p, labels)
    check_range("bins", bins, 1, 1 << 20)
    order = np.argsort(p, kind="stable")
    rows = [
        {"count": idx.size, "mean_predicted": float(p[idx].mean()), "observed": float(y[idx].mean())}
        for idx in np.array_split(order, min(bins, max(p.size, 1)))
        if idx.size
    ]
    return pd.DataFrame(rows, columns=["count", "mean_predicted", "observed"])


def expected_calibration_error(table: pd.DataFrame) -> float:
    """ECE of a ``reliability_table``: sum over bins of (count / n) |mean predicted - observed|; NaN if empty."""
    n = table["count"].sum()
    if n == 0:
        return float("nan")
    gap = (table["mean_predicted"] - table["observed"]).abs()
    return float((table["count"] * gap).sum() / n)


def classifier_report(p, labels, bins: int = 10) -> dict:
    """AUC, log-loss, ECE and the reliability table (as records) of probabilities against 0/1 labels.

    Also ``n`` (examples), ``positives`` and ``mean_predicted`` (the calibration-in-the-large check:
    compare with ``positives / n``).
    """
    p, y = _binary(p, labels)
    table = reliability_table(p, y, bins)
    return {
        "n": int(y.size),
        "positives": int(y.sum()),
        "mean_predicted": float(p.mean()) if p.size else float("nan"),
        "auc": auc(p, y),
        "log_loss": log_loss(p, y),
        "ece": expected_calibration_error(table),
        "reliability": table.to_dict("records"),
    }
