"""World configuration: one frozen dataclass, validated on construction, with named presets.

Every field documents its unit and role. Invalid values raise ``ValueError`` naming the field and
the allowed range, so a typo in a notebook or on the command line fails at once instead of producing
a silently strange market.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

_INF = math.inf

BUDGET_SETTLEMENTS = ("in_order", "overdeliver")
"""the values of ``WorldConfig.budget_settlement`` (``gpr_sim.world.core.settlement`` maps each to its rule)"""
LEGACY_BUDGET_SETTLEMENT = "in_order"
"""the rule of every world saved before ``budget_settlement`` existed (``from_dict`` fills it in): a log
re-simulated by ``agents.ope`` or a run resumed from then meets its budgets as it did"""


def check_range(
    name: str, value: float, lo: float = -_INF, hi: float = _INF, *, lo_open: bool = False
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``lo <= value <= hi`` (``lo < value`` if ``lo_open``)."""
    bad_type = isinstance(value, bool) or not isinstance(value, (int, float))
    below = value <= lo if lo_open else value < lo
    if bad_type or math.isnan(value) or below or value > hi:
        left = "(" if lo_open else "["
        raise ValueError(f"{name}={value!r} is out of range: expected a number in {left}{lo}, {hi}]")


@dataclass(frozen=True)
class RewardConfig:
    """Weights of the per-step reward: a weighted sum of the value signals of one request.

    The platform's classic objective is revenue; adding GMV weights advertiser value, and the stay
    bonus weights user engagement (a request that does not end the session).
    """

    revenue: float = 1.0
    """weight of the price charged to advertisers (platform revenue), per currency unit"""
    gmv: float = 0.02
    """weight of attributed order value (advertiser GMV), per currency unit"""
    click: float = 0.0
    """weight per click"""
    conversion: float = 0.0
    """weight per conversion"""
    stay: float = 0.0
    """bonus per request after which the user stays in the session (engagement)"""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_range(f"reward.{f.name}", getattr(self, f.name), -1e6, 1e6)


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a simulated ad marketplace. Presets: ``small()`` and ``large()``."""

    # --- content taxonomy and catalog -------------------------------------------------------
    emb_dim: int = 16
    """dimension of the shared content-embedding space (stand-in for multimodal embeddings)"""
    num_categories: int = 8
    """top-level content categories; advertisers' industries are categories too"""
    subcategories_per_category: int = 4
    """sub-categories under each category"""
    category_spread: float = 0.55
    """noise scale of a sub-category centre around its category centre (unit-norm space)"""
    item_spread: float = 0.35
    """noise scale of an item embedding around its sub-category centre"""
    num_organic: int = 2000
    """organic items (short videos, articles) users consume between ad requests"""
    num_ads: int = 500
    """ads in the catalog"""
    num_advertisers: int = 50
    """advertisers; each ad belongs to one"""
    # --- advertisers ------------------------------------------------------------------------
    target_cpa_mean: float = 30.0
    """mean oCPM target cost per conversion (the bid), currency units"""
    target_cpa_sigma: float = 1.2
    """log-normal sigma of target CPA across advertisers (spread of bids)"""
    budget_per_1k_requests: float = 1.5
    """mean daily budget of an advertiser per 1000 requests of market traffic (scaled by batch size)"""
    budget_sigma: float = 0.7
    """log-normal sigma of budgets across advertisers"""
    pacing_fraction: float = 0.7
    """share of advertisers that use spend-ratio pacing (throttle when ahead of schedule)"""
    pacing_slack: float = 0.1
    """paced advertisers may run this far ahead of the even-spend schedule before being throttled"""
    steps_per_day: int = 200
    """market steps (one batched request each) in one budget day; budgets reset at day boundaries"""
    budget_settlement: str = "overdeliver"
    """how a step's charges meet the budgets (``BUDGET_SETTLEMENTS``): "overdeliver" (the default since
    2026-12-03) grants a charge while the spend before it is below the budget, so the day's last impression may
    overshoot by one price and the advertiser then leaves the auction (platforms check a budget counter before
    serving and bill delivered impressions past it: bounded overdelivery); "in_order" (the rule before, kept as
    a sensitivity setting) grants a charge only if it fits in what is left, so an advertiser whose leftover is
    above the reserve but below the price it meets stays eligible and is refused all day: 97-99% of the
    refused charges, 85% of the auctions a greedy cascade wins (benchmarks/RESULTS.md, "Budget dust")"""
    # --- ads --------------------------------------------------------------------------------
    quality_sigma: float = 0.4
    """std of creative quality (a click-logit offset)"""
    order_value_mean: float = 120.0
    """mean order value (GMV per conversion), currency units"""
    order_value_sigma: float = 0.5
    """log-normal sigma of mean order value across ads, and of GMV around an ad's mean"""
    max_ad_age_days: int = 60
    """ads were created uniformly within this many days before the simulation starts"""
    new_ad_days: int = 7
    """an ad younger than this counts as new (cold start: noisier platform estimates)"""
    # --- users ------------------------------------------------------------------------------
    num_users: int = 5000
    """size of the user population; each session samples one user, active users more often"""
    activity_weights: tuple[float, ...] = (0.35, 0.25, 0.2, 0.12, 0.08)
    """population share of activity tiers 1..5"""
    session_weight_per_tier: float = 0.6
    """how much more often a user one tier higher starts a session (multiplicative, 1 + this per tier)"""
    interest_categories: int = 2
    """number of categories mixed into a user's base interest"""
    # --- platform estimator ------------------------------------------------------------------
    estimate_noise: float = 0.25
    """std of the platform's per-ad logit bias on pCTR/pCVR (old ads)"""
    new_ad_noise_multiplier: float = 2.5
    """new ads' estimate bias is this many times larger (cold start)"""
    # --- auction ------------------------------------------------------------------------------
    num_candidates: int = 1
    """ads the policy proposes per request (action length); 1 gives a flat Discrete action"""
    num_slots: int = 1
    """ad slots filled per request by the auction (top eCPM candidates)"""
    reserve_ecpm: float = 5.0
    """reserve price as eCPM (currency per 1000 impressions); candidates below it are not shown"""
    competitor_ecpm_mean: float = 300.0
    """mean eCPM of the best external competing demand per request (log-normal; 0 = none). It acts as a
    per-request reserve: it sets the price when it is the runner-up and takes the slot when it wins"""
    competitor_ecpm_sigma: float = 0.8
    """log-normal sigma of the external competing eCPM"""
    # --- funnel -------------------------------------------------------------------------------
    ctr_bias: float = -3.6
    """base click logit"""
    ctr_match_weight: float = 2.2
    """click logit per unit of cosine match between user interest and ad content"""
    ctr_quality_weight: float = 1.0
    """click logit per unit of creative quality"""
    position_decay: float = 0.4
    """click logit lost per slot further down (slot 0 is the top)"""
    ctr_fatigue_weight: float = 0.35
    """click logit lost per unit of ad fatigue"""
    cvr_bias: float = -2.6
    """base conversion logit (given a click)"""
    cvr_match_weight: float = 1.0
    """conversion logit per unit of interest match"""
    conv_propensity_sigma: float = 0.5
    """std of users' latent conversion-propensity logit"""
    conversion_delay_mean: float = 0.0
    """mean delay of a conversion in requests (geometric); 0 = conversions are reported at once"""
    # --- user dynamics ------------------------------------------------------------------------
    organic_per_request: int = 2
    """organic items consumed between two ad requests"""
    organic_candidates: int = 8
    """random organic items the user chooses among for each consumption (interest-weighted)"""
    organic_temperature: float = 0.2
    """temperature of the user's organic choice (lower = follows interests more closely)"""
    interest_drift: float = 0.08
    """how far each consumed item pulls the interest vector"""
    interest_anchor: float = 0.05
    """pull back towards the user's base interest per request (keeps drift bounded)"""
    click_drift: float = 0.15
    """how far a clicked ad pulls the interest vector"""
    fatigue_decay: float = 0.8
    """fatigue is multiplied by this every request"""
    fatigue_per_ad: float = 0.1
    """fatigue added by any ad impression"""
    fatigue_irrelevance: float = 2.0
    """extra fatigue per impression times (1 - match): irrelevant ads tire more"""
    exit_bias: float = -3.4
    """base logit of leaving the session after a request"""
    exit_fatigue_weight: float = 0.8
    """exit logit per unit of fatigue"""
    exit_activity_weight: float = 0.25
    """exit logit lost per activity tier above 3 (active users stay longer)"""
    exit_tolerance_weight: float = 0.5
    """exit logit lost per unit of the user's ad tolerance"""
    max_steps: int = 30
    """requests per session before truncation"""
    minutes_per_request: float = 1.5
    """clock advance per request (for the hour-of-day context)"""
    # --- observations ------------------------------------------------------------------------
    organic_history: int = 16
    """organic items in the O-token history"""
    ad_history: int = 16
    """ads in the I-token history"""
    initial_ad_history: int = 8
    """ads pre-filled into the I-token history at session start (exposure before the session)"""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """reward weights"""

    def __post_init__(self) -> None:
        if isinstance(self.reward, dict):  # allow nested dicts from JSON
            object.__setattr__(self, "reward", RewardConfig(**self.reward))
        ints = {
            "emb_dim": (2, 1024),
            "num_categories": (1, 10_000),
            "subcategories_per_category": (1, 10_000),
            "num_organic": (1, 1 << 31),
            "num_ads": (1, 1 << 31),
            "num_advertisers": (1, 1 << 24),
            "steps_per_day": (1, 1 << 31),
            "max_ad_age_days": (1, 100_000),
            "new_ad_days": (0, 100_000),
            "num_users": (1, 1 << 31),
            "interest_categories": (1, 10_000),
            "num_candidates": (1, 1024),
            "num_slots": (1, 64),
            "organic_per_request": (0, 64),
            "organic_candidates": (1, 1024),
            "max_steps": (1, 1_000_000),
            "organic_history": (1, 4096),
            "ad_history": (1, 4096),
            "initial_ad_history": (0, 4096),
        }
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}={v!r} must be an integer in [{lo}, {hi}]")
            check_range(name, v, lo, hi)
        positive = [
            "category_spread",
            "item_spread",
            "target_cpa_mean",
            "budget_per_1k_requests",
            "order_value_mean",
            "organic_temperature",
            "minutes_per_request",
        ]
        for name in positive:
            check_range(name, getattr(self, name), 0.0, 1e9, lo_open=True)
        non_negative = [
            "target_cpa_sigma",
            "budget_sigma",
            "pacing_slack",
            "quality_sigma",
            "order_value_sigma",
            "estimate_noise",
            "competitor_ecpm_mean",
            "competitor_ecpm_sigma",
            "new_ad_noise_multiplier",
            "reserve_ecpm",
            "position_decay",
            "ctr_fatigue_weight",
            "conv_propensity_sigma",
            "conversion_delay_mean",
            "fatigue_per_ad",
            "fatigue_irrelevance",
            "exit_fatigue_weight",
            "session_weight_per_tier",
        ]
        for name in non_negative:
            check_range(name, getattr(self, name), 0.0, 1e9)
        for name in ["pacing_fraction", "interest_drift", "interest_anchor", "click_drift"]:
            check_range(name, getattr(self, name), 0.0, 1.0)
        check_range("fatigue_decay", self.fatigue_decay, 0.0, 1.0)
        for name in [
            "ctr_bias",
            "ctr_match_weight",
            "ctr_quality_weight",
            "cvr_bias",
            "cvr_match_weight",
            "exit_bias",
            "exit_activity_weight",
            "exit_tolerance_weight",
        ]:
            check_range(name, getattr(self, name), -100.0, 100.0)
        w = self.activity_weights
        if len(w) != 5 or any((not isinstance(x, (int, float))) or x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(
                f"activity_weights={w!r}: expected 5 non-negative numbers (tiers 1..5) with a positive sum"
            )
        if self.budget_settlement not in BUDGET_SETTLEMENTS:
            raise ValueError(
                f"budget_settlement={self.budget_settlement!r} is unknown: expected one of {BUDGET_SETTLEMENTS}"
            )
        if self.num_slots > self.num_candidates:
            raise ValueError(
                f"num_slots={self.num_slots} is out of range: expected at most num_candidates={self.num_candidates}"
            )
        if self.interest_categories > self.num_categories:
            raise ValueError(
                f"interest_categories={self.interest_categories} is out of range: expected at most "
                f"num_categories={self.num_categories}"
            )
        if self.initial_ad_history > self.ad_history:
            raise ValueError(
                f"initial_ad_history={self.initial_ad_history} is out of range: expected at most "
                f"ad_history={self.ad_history}"
            )

    @property
    def num_subcategories(self) -> int:
        return self.num_categories * self.subcategories_per_category

    def replace(self, **changes) -> WorldConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WorldConfig:
        """Inverse of ``to_dict``; unknown keys raise ``ValueError`` naming them; a missing ``budget_settlement``
        is the rule of its time (``LEGACY_BUDGET_SETTLEMENT``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown WorldConfig field(s): {unknown}")
        d = dict(d)
        d.setdefault("budget_settlement", LEGACY_BUDGET_SETTLEMENT)  # a config from before the field
        if "activity_weights" in d:
            d["activity_weights"] = tuple(d["activity_weights"])
        return cls(**d)

    @classmethod
    def small(cls, **changes) -> WorldConfig:
        """CPU-sized market: a few thousand items, simulates in seconds."""
        return cls(**changes)

    @classmethod
    def large(cls, **changes) -> WorldConfig:
        """GPU-sized market: 1M ads, 2M organic items, 10M users, 32-d embeddings."""
        base = dict(
            emb_dim=32,
            num_categories=64,
            subcategories_per_category=16,
            num_organic=2_000_000,
            num_ads=1_000_000,
            num_advertisers=50_000,
            num_users=10_000_000,
            steps_per_day=1000,
        )
        base.update(changes)
        return cls(**base)


PRESETS = {"small": WorldConfig.small, "large": WorldConfig.large}


def preset(name: str, **changes) -> WorldConfig:
    """Look up a preset by name (``small`` or ``large``), with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown: expected one of {sorted(PRESETS)}")
    return PRESETS[name](**changes)
