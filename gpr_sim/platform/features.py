"""What the token builder reads from the platform's catalog: per-ad features and the interest estimate.

A platform ranks ads with what advertisers told it (the bid, the goods' value, the budget) and with what it
learned from a user's history. ``PlatformFeatures`` packs that observable side of the catalog
(``gpr_sim.platform.view.Catalog``) into tensors on one device, so ``gpr_sim.schema.build_tokens`` can put
it into the U and I tokens (the schema's docstring gives the columns) without touching the ``World``.

Per-ad features (``AD_FEATURES``, one row per ad, the columns of an I token):

| column | value | why |
|---|---|---|
| ``log_bid`` | standardised log target CPA (the oCPM bid) | eCPM = bid x pCTR x pCVR: the bid is half the value of an ad |
| ``is_new`` | 1 for an ad younger than ``new_ad_days``, else 0 | a new ad's estimates are noisier |
| ``log_age`` | standardised log(1 + age in days) | the finer-grained age |
| ``log_value`` | standardised log mean order value (GMV per conversion) | the GMV term of the reward |
| ``log_budget`` | standardised log daily budget share of the ad's advertiser | how long the advertiser can bid in a day |
| ``paced`` | 1 if the ad's advertiser paces its budget, else 0 | paced advertisers bid through the whole day |

Standardisation: (x - mean) / std over the catalog's ads (population std; a constant column becomes 0),
computed in float64 on the CPU from the catalog alone, so the same catalog gives the same features on
every device and in every process. Nothing here reads a hidden field (the ``Catalog`` holds none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gpr_sim.platform.view import Catalog, catalog_of, estimate_interest
from gpr_sim.world.catalog import World

AD_FEATURES = ("log_bid", "is_new", "log_age", "log_value", "log_budget", "paced")
"""column names of ``PlatformFeatures.ad_features`` (the module docstring's table)"""
AD_FEATURE_DIM = len(AD_FEATURES)
"""F_i: per-ad feature columns of an I token"""


def standardise(x: Tensor) -> Tensor:
    """(N,) float64 -> (x - mean) / std over the N entries (population std; 0 where the column is constant)."""
    std = x.std(unbiased=False) if x.numel() > 1 else x.new_zeros(())
    centred = x - x.mean()
    return centred / std if float(std) > 1e-12 else torch.zeros_like(centred)


@dataclass(frozen=True)
class PlatformFeatures:
    """The catalog side of the token layout: per-ad features (I tokens) and the content embeddings the U
    token's interest estimate averages (``estimate_interest``), on one device.

    Build with ``from_catalog`` (or ``from_world``, which keeps only the world's observable side), move with
    ``to``; the token builder reads ``ad_features`` and ``interest``.
    """

    catalog: Catalog  # the platform's catalog (content embeddings for the interest estimate)
    ad_features: Tensor  # (num_ads, F_i) float32, columns AD_FEATURES

    def __post_init__(self) -> None:
        want = (self.catalog.num_ads, AD_FEATURE_DIM)
        if tuple(self.ad_features.shape) != want:
            raise ValueError(
                f"ad_features must be {want} (num_ads, F_i), got {tuple(self.ad_features.shape)}"
            )
        if self.ad_features.device != self.catalog.device:
            raise ValueError(
                f"ad_features on {self.ad_features.device}, catalog on {self.catalog.device}: build with from_catalog"
            )

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> PlatformFeatures:
        """Per-ad features of ``catalog`` (module docstring), on the catalog's device."""
        cpu = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
        adv = catalog.ad_advertiser.detach().cpu()
        columns = {
            "log_bid": standardise(cpu(catalog.ad_bid).log()),
            "is_new": cpu(catalog.ad_is_new),
            "log_age": standardise(cpu(catalog.ad_age_days).clamp_min(0.0).log1p()),
            "log_value": standardise(cpu(catalog.ad_value_mean).log()),
            "log_budget": standardise(cpu(catalog.advertiser_budget_share)[adv].log()),
            "paced": cpu(catalog.advertiser_paced)[adv],
        }
        feats = torch.stack([columns[name] for name in AD_FEATURES], 1).float()  # (num_ads, F_i)
        return cls(catalog, feats.to(catalog.device))

    @classmethod
    def from_world(cls, world: World) -> PlatformFeatures:
        """``from_catalog`` of the world's observable side (``catalog_of``): no hidden field is read."""
        return cls.from_catalog(catalog_of(world))

    @property
    def emb_dim(self) -> int:
        """D: columns of the interest estimate in the U token."""
        return self.catalog.emb_dim

    @property
    def num_ads(self) -> int:
        return self.catalog.num_ads

    @property
    def device(self) -> torch.device:
        return self.catalog.device

    def to(self, device: str | torch.device) -> PlatformFeatures:
        return PlatformFeatures(self.catalog.to(device), self.ad_features.to(device))

    def interest(self, organic: Tensor, ad_history: Tensor, ad_events: Tensor) -> Tensor:
        """(N, D) the platform's interest estimate of each user from its history (``estimate_interest``)."""
        return estimate_interest(self.catalog, organic, ad_history, ad_events)

    def of_ads(self, ads: Tensor) -> Tensor:
        """(..., F_i) features of ad ids ``ads`` (...,), zeros where the id is -1 (padding)."""
        feats = self.ad_features[ads.clamp_min(0)]
        return feats * (ads >= 0)[..., None].to(feats.dtype)


__all__ = ["AD_FEATURES", "AD_FEATURE_DIM", "PlatformFeatures", "standardise"]
