"""The static marketplace: content taxonomy, organic items, advertisers, ads and the user population.

Generated once from a seed on the CPU (so the same seed gives the same world on every device) and
then moved to the simulation device. Everything here is read-only during simulation; what changes
(budgets spent, user sessions) lives in ``state.py``.

**World cache.** One pipeline generates the same world several times (log collection, the tokenizer fit,
each pre-training stage's data, the RL and evaluation envs), and the large preset takes tens of seconds
per generation on a CPU. ``generate_world`` therefore keeps the last ``WORLD_CACHE_SIZE`` CPU worlds of this
process, keyed by ``(config, seed)`` (``WorldConfig`` is frozen and hashable), and returns them moved to
the requested device. Worlds are read-only: no code writes into a ``World``'s tensors (they are shared by
every caller of the same key, and on the CPU with the cache itself), so a cached world equals a fresh one.
The price is host memory: about 2.4 GB per large-preset world, kept while it is one of the last two used;
``clear_world_cache`` frees it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpr_sim.world.config import WorldConfig

NUM_DEVICES = 3  # android, ios, desktop
USER_FEATURE_DIM = 7  # age, gender, device one-hot (3), city tier, activity tier
WORLD_CACHE_SIZE = 2
"""CPU worlds ``generate_world`` keeps per process (module doc: the world cache)"""


@dataclass(frozen=True)
class World:
    """All static tensors of a market. Leading dims: items, ads, advertisers or users."""

    config: WorldConfig
    category_emb: torch.Tensor  # (C, D) unit-norm category centres
    subcategory_emb: torch.Tensor  # (C*S, D) unit-norm sub-category centres
    organic_emb: torch.Tensor  # (num_organic, D) unit-norm content embeddings
    organic_subcategory: torch.Tensor  # (num_organic,) int64
    ad_emb: torch.Tensor  # (num_ads, D) unit-norm, same space as organic items
    ad_subcategory: torch.Tensor  # (num_ads,) int64
    ad_advertiser: torch.Tensor  # (num_ads,) int64
    ad_quality: torch.Tensor  # (num_ads,) creative quality (click-logit offset before weighting)
    ad_value_mean: torch.Tensor  # (num_ads,) mean GMV per conversion
    ad_age_days: torch.Tensor  # (num_ads,) days since creation at simulation start
    ad_is_new: torch.Tensor  # (num_ads,) bool, age < new_ad_days
    ad_bid: torch.Tensor  # (num_ads,) oCPM bid: the advertiser's target CPA (denormalised for speed)
    ad_ctr_bias: torch.Tensor  # (num_ads,) platform estimator's logit bias on pCTR
    ad_cvr_bias: torch.Tensor  # (num_ads,) platform estimator's logit bias on pCVR
    advertiser_industry: torch.Tensor  # (A,) int64 category
    advertiser_cpa: torch.Tensor  # (A,) oCPM target cost per conversion (the bid)
    advertiser_budget_share: torch.Tensor  # (A,) daily budget per 1000 requests of traffic
    advertiser_paced: torch.Tensor  # (A,) bool
    user_interest: torch.Tensor  # (U, D) unit-norm base interests
    user_features: torch.Tensor  # (U, USER_FEATURE_DIM) observable profile (U token)
    user_device: torch.Tensor  # (U,) int64 in [0, NUM_DEVICES)
    user_activity: torch.Tensor  # (U,) int64 tier 1..5
    user_conv_logit: torch.Tensor  # (U,) latent conversion propensity (hidden)
    user_tolerance: torch.Tensor  # (U,) latent ad tolerance (hidden)
    user_session_cdf: torch.Tensor  # (U,) float64 cumulative session-start probability

    @property
    def device(self) -> torch.device:
        return self.ad_emb.device

    def to(self, device: str | torch.device) -> World:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def _lognormal(n: int, mean: float, sigma: float, g: torch.Generator) -> torch.Tensor:
    """Log-normal samples with the given *mean* (not median)."""
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return (math.log(mean) - 0.5 * sigma**2 + sigma * z).exp().float()


def generate_world(config: WorldConfig, seed: int = 0, device: str | torch.device = "cpu") -> World:
    """Build a market from ``config`` and ``seed``. Same inputs -> identical tensors on any device.

    Served from the process's world cache when this (config, seed) was generated recently (module doc): the
    returned tensors may be shared with other callers and must not be written to.
    """
    if not isinstance(config, WorldConfig):
        raise ValueError(f"config must be a WorldConfig, got {type(config).__name__}")
    # the caller's own config object (an equal one may have filled the cache entry)
    return dataclasses.replace(_cpu_world(config, int(seed)), config=config).to(device)


def clear_world_cache() -> None:
    """Drop the cached worlds (``generate_world``), e.g. to free host memory after a large world's last use."""
    _cpu_world.cache_clear()


@functools.lru_cache(maxsize=WORLD_CACHE_SIZE)
def _cpu_world(config: WorldConfig, seed: int) -> World:
    """The CPU world of ``(config, seed)`` (``generate_world``), computed once per cache entry."""
    cfg = config
    g = torch.Generator().manual_seed(int(seed))
    C, S, D = cfg.num_categories, cfg.subcategories_per_category, cfg.emb_dim
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731

    category = _unit(randn(C, D))
    sub_parent = torch.arange(C).repeat_interleave(S)  # (C*S,)
    subcategory = _unit(category[sub_parent] + cfg.category_spread * randn(C * S, D) / math.sqrt(D) * 2)

    # Organic items: sub-category popularity is Zipf-like so some content is mainstream.
    sub_pop = 1.0 / torch.arange(1, C * S + 1, dtype=torch.float64) ** 0.7
    sub_pop = sub_pop[torch.randperm(C * S, generator=g)]
    organic_sub = torch.multinomial(sub_pop, cfg.num_organic, replacement=True, generator=g)
    organic = _unit(subcategory[organic_sub] + cfg.item_spread * randn(cfg.num_organic, D) / math.sqrt(D) * 2)

    # Advertisers: an industry (category), a target CPA, a budget, maybe pacing.
    A = cfg.num_advertisers
    industry = torch.randint(0, C, (A,), generator=g)
    cpa = _lognormal(A, cfg.target_cpa_mean, cfg.target_cpa_sigma, g)
    budget = _lognormal(A, cfg.budget_per_1k_requests, cfg.budget_sigma, g)
    paced = torch.rand(A, generator=g) < cfg.pacing_fraction

    # Ads: belong to an advertiser, live in a sub-category of its industry.
    N = cfg.num_ads
    ad_adv = torch.randint(0, A, (N,), generator=g)
    ad_sub = industry[ad_adv] * S + torch.randint(0, S, (N,), generator=g)
    ad_emb = _unit(subcategory[ad_sub] + cfg.item_spread * randn(N, D) / math.sqrt(D) * 2)
    quality = cfg.quality_sigma * randn(N)
    value_mean = _lognormal(N, cfg.order_value_mean, cfg.order_value_sigma, g)
    age = torch.rand(N, generator=g) * cfg.max_ad_age_days
    is_new = age < cfg.new_ad_days
    noise = cfg.estimate_noise * torch.where(is_new, cfg.new_ad_noise_multiplier, 1.0)
    ctr_bias = noise * randn(N)
    cvr_bias = noise * randn(N)

    # Users: a base interest mixing a few categories, observable profile, hidden propensities.
    U = cfg.num_users
    cats = torch.randint(0, C, (U, cfg.interest_categories), generator=g)
    mix = torch.rand(U, cfg.interest_categories, generator=g) + 0.2
    subs = cats * S + torch.randint(0, S, cats.shape, generator=g)
    interest = _unit((mix[..., None] * subcategory[subs]).sum(1) + 0.3 * randn(U, D) / math.sqrt(D) * 2)
    activity_w = torch.tensor(cfg.activity_weights, dtype=torch.float64)
    activity = torch.multinomial(activity_w, U, replacement=True, generator=g) + 1
    age_bucket = torch.randint(0, 6, (U,), generator=g)
    gender = torch.randint(0, 2, (U,), generator=g)
    dev = torch.multinomial(torch.tensor([0.55, 0.35, 0.10]), U, replacement=True, generator=g)
    city = torch.randint(0, 4, (U,), generator=g)
    features = torch.cat(
        [
            (age_bucket.float() / 5.0)[:, None],
            gender.float()[:, None],
            F.one_hot(dev, NUM_DEVICES).float(),
            (city.float() / 3.0)[:, None],
            (activity.float() / 5.0)[:, None],
        ],
        dim=1,
    )
    conv_logit = cfg.conv_propensity_sigma * randn(U)
    tolerance = randn(U)
    session_w = (1.0 + cfg.session_weight_per_tier) ** (activity.double() - 1)
    session_cdf = torch.cumsum(session_w / session_w.sum(), 0)
    session_cdf[-1] = 1.0

    world = World(
        config=cfg,
        category_emb=category,
        subcategory_emb=subcategory,
        organic_emb=organic,
        organic_subcategory=organic_sub,
        ad_emb=ad_emb,
        ad_subcategory=ad_sub,
        ad_advertiser=ad_adv,
        ad_quality=quality,
        ad_value_mean=value_mean,
        ad_age_days=age,
        ad_is_new=is_new,
        ad_bid=cpa[ad_adv],
        ad_ctr_bias=ctr_bias,
        ad_cvr_bias=cvr_bias,
        advertiser_industry=industry,
        advertiser_cpa=cpa,
        advertiser_budget_share=budget,
        advertiser_paced=paced,
        user_interest=interest,
        user_features=features,
        user_device=dev,
        user_activity=activity,
        user_conv_logit=conv_logit,
        user_tolerance=tolerance,
        user_session_cdf=session_cdf,
    )
    return world
