"""Mutable simulation state as tuples of tensors (pytrees), batch dimension first.

``SessionState`` holds one user session per env slot; ``MarketState`` holds what all slots share
(advertiser spend). Both are NamedTuples so they pass through ``torch.compile`` and can be indexed,
concatenated and ``torch.where``-merged field by field.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

PENDING_CONVERSIONS = 4  # delayed conversions a session can hold at once (overflow is reported at once)

# Event levels recorded in the I-token history.
EVENT_PAD, EVENT_IMPRESSION, EVENT_CLICK, EVENT_CONVERSION = 0, 1, 2, 3


class SessionState(NamedTuple):
    """One ongoing session per env slot. All tensors lead with N (env slots)."""

    seed: torch.Tensor  # (N,) int64 seed of the slot's random stream
    slot: torch.Tensor  # (N,) int64 slot index (part of the random key)
    counter: torch.Tensor  # (N,) int64 draw events so far (part of the random key)
    episode: torch.Tensor  # (N,) int64 sessions started in this slot
    user_id: torch.Tensor  # (N,) int64 index into the user population
    interest: torch.Tensor  # (N, D) current (drifted) interest, unit norm
    fatigue: torch.Tensor  # (N,) ad fatigue
    step: torch.Tensor  # (N,) int64 requests served in this session
    feed_pos: torch.Tensor  # (N,) int64 feed items seen (organic + ads)
    ad_load: torch.Tensor  # (N,) int64 ad impressions in this session
    hour: torch.Tensor  # (N,) float hour of day in [0, 24)
    organic_hist: torch.Tensor  # (N, Ho) int64 organic ids, most recent last, -1 = padding
    ad_hist: torch.Tensor  # (N, Hi) int64 ad ids, most recent last, -1 = padding
    ad_event: torch.Tensor  # (N, Hi) int64 deepest funnel event per history entry (EVENT_*)
    pend_ad: torch.Tensor  # (N, P) int64 ad of a delayed conversion, -1 = free
    pend_gmv: torch.Tensor  # (N, P) GMV of that conversion
    pend_due: torch.Tensor  # (N, P) int64 session step at which it is reported

    def select(self, index: torch.Tensor) -> SessionState:
        """Rows ``index`` of every field."""
        return SessionState(*(t[index] for t in self))

    def put(self, index: torch.Tensor, rows: SessionState) -> SessionState:
        """A copy with rows ``index`` replaced by ``rows``."""
        out = []
        for t, r in zip(self, rows):
            t = t.clone()
            t[index] = r
            out.append(t)
        return SessionState(*out)


class MarketState(NamedTuple):
    """What all env slots share: the advertisers' budgets."""

    tick: torch.Tensor  # () int64 market steps so far
    budget: torch.Tensor  # (A,) float64 daily budget in currency (scaled to the batch's traffic)
    spent_today: torch.Tensor  # (A,) float64 spend in the current budget day
    spent_total: torch.Tensor  # (A,) float64 spend since the market opened (for accounting)


class Outcome(NamedTuple):
    """Everything one request produced. (N, S) per slot, (N,) per request."""

    ad_id: torch.Tensor  # (N, S) int64 shown ad, -1 if the slot stayed empty
    advertiser_id: torch.Tensor  # (N, S) int64, -1 if empty
    impression: torch.Tensor  # (N, S) bool
    click: torch.Tensor  # (N, S) bool
    conversion: torch.Tensor  # (N, S) bool, conversions reported in this step
    gmv: torch.Tensor  # (N, S) float GMV reported in this step
    revenue: torch.Tensor  # (N, S) float price charged (GSP)
    p_click: torch.Tensor  # (N, S) true click probability of the shown ad
    p_conversion: torch.Tensor  # (N, S) true conversion probability (given a click)
    ecpm: torch.Tensor  # (N, S) platform-estimated eCPM that won the auction
    ecpm_true: torch.Tensor  # (N, S) eCPM under the true probabilities
    match: torch.Tensor  # (N, S) cosine match of the user's interest and the ad
    is_new_ad: torch.Tensor  # (N, S) bool
    invalid: torch.Tensor  # (N,) int64 candidates that were not valid ad ids
    budget_capped: torch.Tensor  # (N,) int64 slots dropped because a budget would be exceeded
    delayed_conversion: torch.Tensor  # (N,) int64 earlier conversions reported now
    delayed_gmv: torch.Tensor  # (N,) float their GMV
    reward: torch.Tensor  # (N,) float
    terminated: torch.Tensor  # (N,) bool: the user left
    truncated: torch.Tensor  # (N,) bool: the session hit max_steps
