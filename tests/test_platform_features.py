"""Per-ad platform features: hand-computed standardisation, only the observable catalog read, padding zero."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gpr_sim.platform import Catalog, catalog_of, estimate_interest
from gpr_sim.platform.features import AD_FEATURE_DIM, AD_FEATURES, PlatformFeatures, standardise
from gpr_sim.platform.view import HIDDEN_WORLD_FIELDS
from gpr_sim.world import WorldConfig
from gpr_sim.world.catalog import generate_world

S = math.sqrt(
    1.5
)  # standardised (-1, 0, 1) * d: mean 0, population std d sqrt(2/3) -> (-sqrt(3/2), 0, sqrt(3/2))


def hand_catalog() -> Catalog:
    """3 ads of 2 advertisers, numbers chosen so every log column is equally spaced or hand-solvable."""
    return Catalog(
        organic_emb=torch.eye(4)[:3],
        organic_subcategory=torch.zeros(3, dtype=torch.int64),
        ad_emb=torch.eye(4)[1:],
        ad_subcategory=torch.zeros(3, dtype=torch.int64),
        ad_advertiser=torch.tensor([0, 0, 1]),
        ad_value_mean=torch.tensor([50.0, 100.0, 200.0]),  # log: equally spaced by ln 2
        ad_age_days=torch.tensor([0.0, math.e - 1, math.e**2 - 1]),  # log1p: 0, 1, 2
        ad_is_new=torch.tensor([True, False, False]),
        ad_bid=torch.tensor([10.0, 20.0, 40.0]),  # log: equally spaced by ln 2
        advertiser_industry=torch.tensor([0, 1]),
        advertiser_cpa=torch.tensor([10.0, 40.0]),
        advertiser_budget_share=torch.tensor([1.0, 4.0]),
        advertiser_paced=torch.tensor([True, False]),
        user_features=torch.zeros(2, 7),
        user_device=torch.zeros(2, dtype=torch.int64),
        user_activity=torch.ones(2, dtype=torch.int64),
    )


def test_hand_computed_ad_features():
    f = PlatformFeatures.from_catalog(hand_catalog())
    assert AD_FEATURES == ("log_bid", "is_new", "log_age", "log_value", "log_budget", "paced")
    assert f.ad_features.shape == (3, AD_FEATURE_DIM) and f.ad_features.dtype == torch.float32
    # budgets per ad: 1, 1, 4 -> logs 0, 0, 2 ln 2: mean (2/3) ln 2, std (2 sqrt 2 / 3) ln 2
    # -> (-(2/3) / (2 sqrt 2 / 3), ..., (4/3) / (2 sqrt 2 / 3)) = (-1/sqrt 2, -1/sqrt 2, sqrt 2)
    r = 1 / math.sqrt(2)
    want = torch.tensor(
        [
            [-S, 1.0, -S, -S, -r, 1.0],
            [0.0, 0.0, 0.0, 0.0, -r, 1.0],
            [S, 0.0, S, S, 2 * r, 0.0],
        ]
    )
    torch.testing.assert_close(f.ad_features, want)


def test_standardise_constant_and_single_columns_are_zero():
    assert standardise(torch.full((4,), 3.0, dtype=torch.float64)).tolist() == [0.0] * 4
    assert standardise(torch.tensor([5.0], dtype=torch.float64)).tolist() == [0.0]


def test_of_ads_pads_with_zeros_and_interest_is_estimate_interest():
    cat = hand_catalog()
    f = PlatformFeatures.from_catalog(cat)
    ads = torch.tensor([[-1, 2, 0], [1, -1, -1]])
    got = f.of_ads(ads)  # (2, 3, F_i)
    assert got[0, 0].abs().sum() == 0 and got[1, 1:].abs().sum() == 0
    torch.testing.assert_close(got[0, 1], f.ad_features[2])
    torch.testing.assert_close(got[1, 0], f.ad_features[1])
    organic, events = torch.tensor([[0, -1], [2, 1]]), torch.tensor([[0, 2, 3], [2, 0, 0]])
    torch.testing.assert_close(f.interest(organic, ads, events), estimate_interest(cat, organic, ads, events))


def test_features_read_only_the_observable_catalog_and_are_deterministic():
    cfg = WorldConfig(num_ads=40, num_organic=50, num_users=10, num_advertisers=6)
    world = generate_world(cfg, seed=2)
    a = PlatformFeatures.from_world(world)
    gen = torch.Generator().manual_seed(0)
    perturbed = dataclasses.replace(
        world,
        **{
            name: torch.randn(getattr(world, name).shape, generator=gen).to(getattr(world, name).dtype)
            for name in HIDDEN_WORLD_FIELDS
        },
    )
    b = PlatformFeatures.from_world(perturbed)
    assert torch.equal(a.ad_features, b.ad_features)
    assert torch.equal(a.ad_features, PlatformFeatures.from_catalog(catalog_of(world)).ad_features)
    # standardised columns: mean 0, population std 1 over the catalog's ads
    for col in ("log_bid", "log_age", "log_value", "log_budget"):
        x = a.ad_features[:, AD_FEATURES.index(col)].double()
        assert abs(float(x.mean())) < 1e-6 and abs(float(x.std(unbiased=False)) - 1) < 1e-5, col
    assert a.emb_dim == cfg.emb_dim and a.num_ads == cfg.num_ads


def test_bad_shapes_are_refused():
    f = PlatformFeatures.from_catalog(hand_catalog())
    with pytest.raises(ValueError, match=r"ad_features must be \(3, 6\)"):
        PlatformFeatures(f.catalog, f.ad_features[:2])


@pytest.mark.gpu
def test_features_on_cuda_equal_the_cpu_ones():
    world = generate_world(WorldConfig(num_ads=40, num_organic=50, num_users=10, num_advertisers=6), seed=2)
    cpu = PlatformFeatures.from_world(world)
    gpu = PlatformFeatures.from_world(world.to("cuda"))  # standardised on the CPU either way
    assert gpu.device.type == "cuda"
    assert torch.equal(cpu.ad_features, gpu.ad_features.cpu())
    assert torch.equal(cpu.to("cuda").ad_features.cpu(), cpu.ad_features)
