"""The token layout with platform features: columns by hand, logs == observations, the old layout kept bit
for bit, the dense_dim rule and its errors, and no hidden state in the tokens."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from envs.market import BatchedMarket
from gpr_sim.model import GPRConfig, GPRModel
from gpr_sim.platform import catalog_of, estimate_interest
from gpr_sim.platform.features import AD_FEATURE_DIM, PlatformFeatures
from gpr_sim.platform.market import market_features
from gpr_sim.platform.view import HIDDEN_SESSION_FIELDS, HIDDEN_WORLD_FIELDS
from gpr_sim.schema import (
    SchemaConfig,
    TokenBatch,
    build_tokens,
    check_dense_dim,
    dense_dim,
    tokens_from_logs,
    tokens_from_obs,
)
from gpr_sim.tokenizer import SemanticIdTable
from gpr_sim.world import observe
from tests.test_schema import CFG, TINY, assert_same, log_rows, tiny_obs, world_table

FIXTURE = Path(__file__).parent / "fixtures" / "schema" / "old_layout.pt"
D = CFG.emb_dim
FU, FE = 7, 8


def stepped_market(num_envs: int = 16, steps: int = 4) -> tuple[BatchedMarket, dict]:
    """A market after a few random steps: short and full histories, some clicks, some sessions restarted."""
    market = BatchedMarket(CFG, num_envs=num_envs, world_seed=0)
    obs = market.reset(seed=1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        obs, *_ = market.step(torch.randint(0, CFG.num_ads, (num_envs, 1), generator=gen))
    return market, obs


def test_dense_dim_rule():
    assert dense_dim(CFG, platform_features=False) == 15  # 7 user + 8 context: the layout before features
    assert dense_dim(CFG, platform_features=True) == FU + D + AD_FEATURE_DIM + FE == 7 + 16 + 6 + 8
    big = dataclasses.replace(CFG, emb_dim=32)
    assert dense_dim(big, platform_features=True) == 7 + 32 + 6 + 8


def test_columns_hold_profile_interest_ad_features_and_context():
    market, obs = stepped_market()
    feats = PlatformFeatures.from_world(market.world)
    table = world_table(CFG)
    cfg = SchemaConfig.from_world(CFG)
    b = tokens_from_obs(obs, table, cfg, features=feats)
    ho, hi = cfg.organic_len, cfg.ad_len
    dense = b.dense_features  # (B, T, F)
    assert dense.shape == (16, cfg.seq_len, dense_dim(CFG, True))
    u, i_cols = dense[:, 0], slice(FU + D, FU + D + AD_FEATURE_DIM)
    torch.testing.assert_close(u[:, :FU], obs["user"])
    est = estimate_interest(catalog_of(market.world), obs["organic"], obs["ad_history"], obs["ad_events"])
    assert (est.norm(dim=-1) > 0).all()  # every session has organic history: a real estimate
    assert torch.equal(u[:, FU : FU + D], est)
    assert u[:, FU + D :].abs().sum() == 0  # no ad or context columns on U
    ads = obs["ad_history"]
    i_slots = dense[:, 1 + ho : 1 + ho + hi]  # (B, Hi, F)
    valid = ads >= 0
    assert (~valid).any() and valid.any()
    assert torch.equal(i_slots[valid][:, i_cols], feats.ad_features[ads[valid]])
    assert i_slots[~valid].abs().sum() == 0  # padding: zero features
    assert (
        i_slots[..., : FU + D].abs().sum() == 0 and i_slots[..., FU + D + AD_FEATURE_DIM :].abs().sum() == 0
    )
    assert dense[:, 1 : 1 + ho].abs().sum() == 0  # O tokens: codes only
    assert torch.equal(dense[:, -1, -FE:], obs["context"]) and dense[:, -1, :-FE].abs().sum() == 0


def test_interest_reads_the_cut_history_the_tokens_hold():
    market, obs = stepped_market()
    feats = PlatformFeatures.from_world(market.world)
    cfg = SchemaConfig(organic_len=2, ad_len=2)  # shorter than the observation's histories
    b = tokens_from_obs(obs, world_table(CFG), cfg, features=feats)
    est = feats.interest(obs["organic"][:, -2:], obs["ad_history"][:, -2:], obs["ad_events"][:, -2:])
    assert torch.equal(b.dense_features[:, 0, FU : FU + D], est)


@pytest.mark.parametrize("strip_padding", [False, True])
def test_observation_and_its_logged_row_give_identical_tokens_with_features(strip_padding):
    market, obs = stepped_market()
    feats = PlatformFeatures.from_world(market.world)
    table = world_table(CFG)
    from_obs = tokens_from_obs(obs, table, features=feats)
    from_log = tokens_from_logs(
        log_rows(obs, strip_padding), table, SchemaConfig.from_world(CFG), features=feats
    )
    assert_same(from_obs, from_log)
    assert from_obs.dense_features.shape[-1] == dense_dim(CFG, True)


def test_without_features_the_layout_is_bit_identical_to_the_one_before_them():
    """Tokens of a fixed observation, saved by the builder before platform features existed."""
    saved = torch.load(FIXTURE, weights_only=True)
    table = SemanticIdTable(saved["codes"], codebook_size=4, num_organic=saved["num_organic"])
    cfg = SchemaConfig(organic_len=saved["organic_len"], ad_len=saved["ad_len"])
    want = TokenBatch(**saved["tokens"])
    assert want.dense_features.shape[-1] == 15
    assert_same(tokens_from_obs(saved["obs"], table, cfg), want)
    assert_same(tokens_from_obs(saved["obs"], table, cfg, features=None), want)
    assert_same(tokens_from_logs(log_rows(saved["obs"], True), table, cfg), want)


def test_the_model_refuses_tokens_of_the_other_layout():
    market, obs = stepped_market(num_envs=4, steps=1)
    table = world_table(CFG)
    feats = PlatformFeatures.from_world(market.world)
    with_f = tokens_from_obs(obs, table, features=feats)
    old = GPRModel(GPRConfig(level_sizes=table.level_sizes, d_model=16, n_layers=1, n_heads=2, max_len=32))
    with pytest.raises(
        ValueError, match=r"tokens have 37 dense feature columns, the model reads dense_dim=15"
    ):
        old.context(with_f)
    new_cfg = dataclasses.replace(old.cfg, dense_dim=dense_dim(CFG, True), platform_features=True)
    new = GPRModel(new_cfg).eval()
    with torch.no_grad():
        assert new.context(with_f).isfinite().all()
    with pytest.raises(ValueError, match="the model reads dense_dim=37 .trained with platform"):
        new.context(tokens_from_obs(obs, table))
    check_dense_dim(37, CFG, True, "run")  # fits: no error
    with pytest.raises(
        ValueError, match=r"run: model dense_dim=15, but this world's token layout with platform"
    ):
        check_dense_dim(15, CFG, True, "run")


def test_model_config_records_the_layout_and_reads_old_checkpoints():
    cfg = GPRConfig(dense_dim=37, platform_features=True)
    assert GPRConfig.from_dict(cfg.to_dict()) == cfg
    old = GPRConfig().to_dict()
    del old["platform_features"]  # a checkpoint config from before the field
    assert GPRConfig.from_dict(old) == GPRConfig()
    assert GPRConfig.from_dict(old).platform_features is False
    with pytest.raises(ValueError, match="platform_features"):
        GPRConfig(platform_features=1)


def test_features_on_another_device_or_of_another_catalog_are_refused():
    o = tiny_obs([0], [1], [2])
    world_feats = PlatformFeatures.from_world(BatchedMarket(CFG, num_envs=1).world)  # 80 ads, TINY has 2
    with pytest.raises(ValueError, match="features describe 80 ads, the table 2"):
        build_tokens(
            o["user_id"], o["user"], o["organic"], o["context"], o["ad_history"], o["ad_events"],
            TINY, SchemaConfig(1, 1), features=world_feats,
        )  # fmt: skip


def test_tokens_do_not_change_when_hidden_world_or_session_state_does():
    """Platform and market features included (the market's ledger is observable, so it is kept)."""
    market, _ = stepped_market()
    world, state = market.world, market.state
    table, cfg = world_table(CFG), SchemaConfig.from_world(CFG)
    ledger = market.market  # the spend ledger is the platform's own (observable): it stays as it is

    def tokens(w, st):
        feats = PlatformFeatures.from_world(w)
        return tokens_from_obs(observe(w, st), table, cfg, features=feats, market=market_features(w, ledger))

    before = tokens(world, state)
    gen = torch.Generator().manual_seed(5)

    def noise(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.bool:
            return torch.rand(t.shape, generator=gen) < 0.5
        if not t.dtype.is_floating_point:
            return torch.randint(0, 3, t.shape, generator=gen).to(t.dtype)
        return torch.randn(t.shape, generator=gen).to(t.dtype)

    hidden_world = dataclasses.replace(world, **{n: noise(getattr(world, n)) for n in HIDDEN_WORLD_FIELDS})
    hidden_state = state._replace(**{n: noise(getattr(state, n)) for n in HIDDEN_SESSION_FIELDS})
    assert_same(before, tokens(hidden_world, hidden_state))


@pytest.mark.gpu
def test_tokens_with_features_on_cuda_equal_the_cpu_tokens():
    market, obs = stepped_market(num_envs=8, steps=2)
    feats, table = PlatformFeatures.from_world(market.world), world_table(CFG)
    a = tokens_from_obs(obs, table, features=feats)
    gpu_table = copy.copy(table).to("cuda")  # SemanticIdTable.to moves in place
    b = tokens_from_obs({k: v.to("cuda") for k, v in obs.items()}, gpu_table, features=feats.to("cuda"))
    for name, x, y in zip(TokenBatch._fields, a, b.to("cpu")):
        torch.testing.assert_close(x, y, msg=name)  # interest: a GPU reduction may differ in the last bit
    with pytest.raises(ValueError, match="features.to"):
        tokens_from_obs({k: v.to("cuda") for k, v in obs.items()}, gpu_table, features=feats)
