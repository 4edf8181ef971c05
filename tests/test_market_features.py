"""The E token's market features (``gpr_sim.platform.market``): hand-worked ledger values, live tokens ==
logged tokens, no hidden state read, the dense_dim rule, old checkpoints and logs, and the cached rollout /
incremental decoder equal to the full forward with the market columns on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import envs  # noqa: F401  (registers ads-v0)
from agents.collection import collect
from agents.policies import make_policy
from agents.pretraining.checkpoint import checkpoint_data, load_init
from agents.rl.rollout import SLOT_BITS, Roller
from envs import make_vec_env
from envs.market import BatchedMarket
from gpr_sim.data.logs import read_logs, write_logs
from gpr_sim.model import GPRConfig, GPRModel, IncrementalDecoder
from gpr_sim.platform.features import PlatformFeatures
from gpr_sim.platform.market import MARKET_FEATURE_DIM, MARKET_FEATURES, market_features
from gpr_sim.platform.view import HIDDEN_WORLD_FIELDS
from gpr_sim.schema import (
    SchemaConfig,
    TokenBatch,
    check_dense_dim,
    dense_dim,
    tokens_from_logs,
    tokens_from_obs,
)
from gpr_sim.tokenizer.compare import CompareConfig
from gpr_sim.tokenizer.world import fit_world_tokenizer
from gpr_sim.world import MarketState, preset
from gpr_sim.world.core import budget_day
from tests.test_incremental import full_request
from tests.test_model_gpr import random_trie
from tests.test_schema import CFG, assert_same, world_table
from tests.test_schema_features import stepped_market

FU, FE = 7, 8


def _ledger(world, tick: int, budget, spent, paced) -> tuple:
    """A world whose advertisers have pacing flags ``paced`` and a market at ``tick`` with these budgets."""
    world = dataclasses.replace(world, advertiser_paced=torch.tensor(paced))
    b = torch.tensor(budget, dtype=torch.float64)
    s = torch.tensor(spent, dtype=torch.float64)
    return world, MarketState(torch.tensor(tick), b, s, s.clone())


def test_features_by_hand():
    world = BatchedMarket(CFG, num_envs=1).world  # steps_per_day 200, pacing_slack 0.1, reserve 5 eCPM
    assert (CFG.steps_per_day, CFG.pacing_slack, CFG.reserve_ecpm) == (200, 0.1, 5.0)
    # tick 100: day_fraction = 101 / 200 = 0.505, a paced advertiser is on schedule while spent <= 0.605 B.
    # adv 0 unpaced, 0.7 left: eligible. adv 1 paced, spent 0.7 > 0.605: throttled. adv 2 paced, 0.5: eligible.
    # adv 3 unpaced, 0.001 left < the reserve price 0.005: ran dry. adv 4 overdelivered 1.2 of 1: dry, share 1.
    w, m = _ledger(world, 100, [1.0] * 5, [0.3, 0.7, 0.5, 0.999, 1.2], [False, True, True, False, False])
    f = market_features(w, m)
    assert MARKET_FEATURES == ("eligible_share", "throttled_share", "spent_share", "day_progress")
    assert f.dtype == torch.float32 and f.shape == (MARKET_FEATURE_DIM,)
    want = [2 / 5, 1 / 5, (0.3 + 0.7 + 0.5 + 0.999 + 1.0) / 5, 0.505]
    assert_close(f, torch.tensor(want, dtype=torch.float32))
    # tick 200 opens a new budget day: the spend resets, everybody may bid, the day is 1/200 through
    f = market_features(*_ledger(world, 200, [1.0] * 5, [0.3, 0.7, 0.5, 0.999, 1.2], [True] * 5))
    assert f.tolist() == pytest.approx([1.0, 0.0, 0.0, 1 / 200])


def test_eligible_share_is_the_auction_eligibility():
    """The first feature counts the advertisers the auction lets bid (``eligible_ads``: one pacing rule),
    the second those pacing holds back: on a market whose budgets bind after 40 greedy-ish steps."""
    market, _ = stepped_market(num_envs=16, steps=40)
    world = market.world
    f = market.market_features()
    day = budget_day(world, market.market)
    assert torch.equal(market.eligible_ads(), day.active[world.ad_advertiser])
    assert f[0].item() == pytest.approx(day.active.double().mean().item())
    assert f[1].item() == pytest.approx((day.has_budget & ~day.active).double().mean().item())
    assert 0 < f[0] < 1  # some advertiser is out: the feature is informative here


def test_features_read_no_hidden_state():
    market, _ = stepped_market(num_envs=16, steps=30)
    world = market.world
    gen = torch.Generator().manual_seed(5)
    hidden = {
        n: torch.randn(getattr(world, n).shape, generator=gen).to(getattr(world, n).dtype)
        for n in HIDDEN_WORLD_FIELDS
    }
    other = dataclasses.replace(world, **hidden)
    assert torch.equal(market_features(world, market.market), market_features(other, market.market))


def test_dense_dim_rule():
    assert dense_dim(CFG, False, market_features=True) == FU + FE + MARKET_FEATURE_DIM == 19
    assert dense_dim(CFG, True, market_features=True) == dense_dim(CFG, True) + 4 == 7 + 16 + 6 + 8 + 4
    assert dense_dim(CFG, True) == 37  # the default keeps the layout before market features
    check_dense_dim(41, CFG, True, "run", market_features=True)
    with pytest.raises(ValueError, match="run: model dense_dim=37, .* and with market features has F=41"):
        check_dense_dim(37, CFG, True, "run", market_features=True)


def test_market_columns_come_last_in_the_e_row_only():
    market, obs = stepped_market(num_envs=8, steps=5)
    table, cfg = world_table(CFG), SchemaConfig.from_world(CFG)
    feats = PlatformFeatures.from_world(market.world)
    m = market.market_features()
    with_m = tokens_from_obs(obs, table, cfg, features=feats, market=m)
    without = tokens_from_obs(obs, table, cfg, features=feats)
    f = dense_dim(CFG, True)
    assert with_m.dense_features.shape[-1] == f + MARKET_FEATURE_DIM
    assert torch.equal(with_m.dense_features[..., :f], without.dense_features)  # the rest is unchanged
    assert torch.equal(with_m.dense_features[:, -1, f:], m.expand(8, -1))  # E: the market
    assert not with_m.dense_features[:, :-1, f:].any()  # U / O / I: zeros
    for name in TokenBatch._fields[:-1]:
        assert torch.equal(getattr(with_m, name), getattr(without, name)), name
    per_row = tokens_from_obs(obs, table, cfg, features=feats, market=m.expand(8, -1))
    assert_same(per_row, with_m)
    with pytest.raises(ValueError, match=r"market must be \(B, F_m\) = \(8, 4\)"):
        tokens_from_obs(obs, table, cfg, market=torch.zeros(8, 3))


def test_live_tokens_equal_the_tokens_of_their_log(tmp_path):
    """A collection's log rebuilds, bit for bit, the tokens the policy saw (with the market of each step)."""
    world = dataclasses.replace(CFG, steps_per_day=6)  # a budget day ends within the collection
    env = make_vec_env("ads-v0", 8, config=world, device="cpu")
    table, cfg = world_table(world), SchemaConfig.from_world(world)
    feats = PlatformFeatures.from_world(env.unwrapped.world)

    def live(env_, obs, out):
        tokens = tokens_from_obs(obs, table, cfg, features=feats, market=env_.unwrapped.market_features())
        return tokens._asdict()

    policy = make_policy("cascade-privileged", env, 0)
    columns, extra = collect(env, policy, seed=3, steps=9, hook=live, progress=False)
    days = columns["market"][:, 3]  # day progress: two budget days in nine steps
    assert days.min() < days.max() and len(np.unique(columns["market"], axis=0)) > 2
    path = write_logs(columns, tmp_path / "log.parquet", world_config=world, seed=3, policy="cascade")
    df, _ = read_logs(path)
    logged = tokens_from_logs(df, table, cfg, features=feats, market=True)
    assert_same(logged, TokenBatch(**{k: torch.as_tensor(v) for k, v in extra.items()}))
    # the layout without market features reads the same log, and an old log (no column) only that way
    old = df.drop(columns=["market"])
    assert_same(
        tokens_from_logs(old, table, cfg, features=feats), tokens_from_logs(df, table, cfg, features=feats)
    )
    with pytest.raises(
        ValueError, match=r"lack column\(s\) \['market'\] that the layout with market features"
    ):
        tokens_from_logs(old, table, cfg, features=feats, market=True)


def test_logs_reject_a_market_column_of_another_width_or_range(tmp_path):
    env = make_vec_env("ads-v0", 4, config=CFG, device="cpu")
    columns, _ = collect(env, make_policy("random", env, 0), seed=0, steps=2, progress=False)
    bad = dict(columns, market=np.full((8, MARKET_FEATURE_DIM), 2.0, dtype=np.float32))
    path = write_logs(bad, tmp_path / "range.parquet", world_config=CFG, seed=0, policy="random")
    with pytest.raises(ValueError, match=r"column market has 32 values outside \[0.0, 1.0\]"):
        read_logs(path)
    narrow = dict(columns, market=columns["market"][:, :3])
    path = write_logs(narrow, tmp_path / "width.parquet", world_config=CFG, seed=0, policy="random")
    with pytest.raises(ValueError, match="column market has 8 rows of length 3"):
        read_logs(path)


def test_config_records_the_layout_and_old_configs_read_without_it():
    cfg = GPRConfig(dense_dim=41, platform_features=True, market_features=True)
    assert GPRConfig.from_dict(cfg.to_dict()) == cfg
    old = GPRConfig(dense_dim=37, platform_features=True).to_dict()
    del old["market_features"]  # a checkpoint config from before the field
    assert GPRConfig.from_dict(old).market_features is False
    with pytest.raises(ValueError, match="market_features"):
        GPRConfig(market_features=1)


def test_an_old_checkpoint_initialises_a_market_model_with_identical_outputs(tmp_path):
    """``load_init``: the old dense weight fills the first columns, the market columns start at zero, so
    the new model on tokens with the market computes what the old one did on tokens without it."""
    market, obs = stepped_market(num_envs=6, steps=5)
    table, cfg = world_table(CFG), SchemaConfig.from_world(CFG)
    feats = PlatformFeatures.from_world(market.world)
    old_cfg = GPRConfig(
        level_sizes=table.level_sizes, d_model=16, n_layers=1, n_heads=2, max_len=cfg.seq_len,
        dense_dim=dense_dim(CFG, True), platform_features=True,
    )  # fmt: skip
    torch.manual_seed(0)
    old = GPRModel(old_cfg)
    with torch.no_grad():
        for p in old.parameters():
            p.normal_(0, 0.3)
    path = tmp_path / "old.pt"
    path.write_bytes(checkpoint_data(old, torch.optim.AdamW(old.parameters()), torch.Generator(), 3, "mtp"))
    stored = torch.load(path, weights_only=True)
    del stored["config"]["market_features"]  # as written before the field existed
    torch.save(stored, path)

    new_cfg = dataclasses.replace(old_cfg, dense_dim=dense_dim(CFG, True, True), market_features=True)
    new = GPRModel(new_cfg)
    assert load_init(path, new) == ["market_features"]
    w = new.hsd.dense.weight
    assert (
        torch.equal(w[:, : old_cfg.dense_dim], old.hsd.dense.weight) and not w[:, old_cfg.dense_dim :].any()
    )
    old.eval(), new.eval()
    noise = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = old.context(tokens_from_obs(obs, table, cfg, features=feats), noise=noise)
        b = new.context(
            tokens_from_obs(obs, table, cfg, features=feats, market=market.market_features()), noise=noise
        )
    assert torch.equal(a, b)
    # any other difference is still refused
    other = GPRModel(dataclasses.replace(new_cfg, d_model=32))
    with pytest.raises(ValueError, match="differs from this run's in"):
        load_init(path, other)


def test_incremental_step_with_market_equals_the_full_forward():
    """The KV-cached step appends the E token of the next request, market columns included, and equals
    the full forward of that request (HSD + thinking), on the tokens of a real market."""
    market, obs = stepped_market(num_envs=4, steps=3)
    table, cfg = world_table(CFG), SchemaConfig.from_world(CFG)
    feats = PlatformFeatures.from_world(market.world)
    tokens = tokens_from_obs(obs, table, cfg, features=feats, market=market.market_features())
    mcfg = GPRConfig(
        level_sizes=table.level_sizes, d_model=32, n_layers=2, n_heads=2, max_len=cfg.seq_len + 2,
        dense_dim=dense_dim(CFG, True, True), platform_features=True, market_features=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPRModel(mcfg).eval()
    trie = random_trie(mcfg, n=50, seed=0)
    shown = torch.randint(0, CFG.num_ads, (4, 1), generator=torch.Generator().manual_seed(1))
    nxt, *_ = market.step(shown)  # the next request: its E row carries the market after the step
    e_row = tokens_from_obs(nxt, table, cfg, features=feats, market=market.market_features()).dense_features[
        :, -1
    ]
    assert not torch.equal(e_row[:, -MARKET_FEATURE_DIM:], tokens.dense_features[:, -1, -MARKET_FEATURE_DIM:])
    dec = IncrementalDecoder(model, trie, "eager", new_tokens=2)
    gen = torch.Generator().manual_seed(2)
    inputs = {
        "codes": table.item_to_path[table.ad_ids(shown[:, 0])],
        "items": table.ad_ids(shown[:, 0]),
        "events": torch.ones(4, 1, dtype=torch.int64),
        "context": e_row,
        "noise": torch.randn(4, mcfg.d_model, generator=gen),
    }
    with torch.no_grad():
        st = dec.prefill(tokens, **inputs)
        new = dec.new_request_tokens(st)
        assert torch.equal(new.dense_features[:, -1], e_row)
        th, _ = dec.hsd_think(st.layers, st.type_ids, st.padding_mask, st.think, new)
        full = full_request(tokens, new)
        want = model.ptd.thinking(model.hsd(full).hidden, full.padding_mask)
    assert_close(th, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def market_rollouts():
    """Two steps of the cached and the reference rollout of a model that reads market features."""
    world = preset("small", num_ads=120, num_organic=300, num_users=400, num_advertisers=10, steps_per_day=3)
    out = {}
    for cached in (True, False):
        env = make_vec_env("ads-v0", 12, config=world, device="cpu", validate_actions=False)
        tok = fit_world_tokenizer(
            env.unwrapped.world, "rq-kmeans", CompareConfig(num_levels=2, codebook_size=6, kmeans_iters=3)
        )
        schema = SchemaConfig.from_world(world)
        cfg = GPRConfig(
            level_sizes=tuple(tok.level_sizes), d_model=16, n_layers=1, n_heads=2, max_len=schema.seq_len,
            dense_dim=dense_dim(world, True, True), platform_features=True, market_features=True,
        )  # fmt: skip
        torch.manual_seed(0)
        model = GPRModel(cfg).eval()
        roller = Roller(env, tok, group_size=5, estimator="truth", arr_rate=1.0, seed=3, cached=cached)
        seen = []
        step = env.step

        def recording_step(actions, step=step, roller=roller, seen=seen):
            seen.append(roller.market.market_features().clone())  # the ledger this step's requests met
            return step(actions)

        env.step = recording_step
        buf, stats = roller.collect(model, 3)
        out[cached] = (model, buf, stats, seen)
    return out


def test_rollout_tokens_carry_the_market_and_cached_equals_the_reference(market_rollouts):
    model, fast, s_fast, seen = market_rollouts[True]
    _, ref, _, _ = market_rollouts[False]
    assert s_fast["rollout/rehearsed"] > 0
    assert len({tuple(m.tolist()) for m in seen}) == 3  # the market moved every step
    # every request of step t, real or rehearsed, carries the market of step t in its E row
    e_market = fast.tokens.dense_features[:, -1, -MARKET_FEATURE_DIM:]
    step_of = (fast.uid >> SLOT_BITS) // 2  # request ids: ((step x 2 + rehearsed) << SLOT_BITS) + slot
    assert torch.equal(e_market, torch.stack(seen)[step_of])
    assert torch.equal(fast.codes, ref.codes)
    assert_close(fast.old_log_prob, ref.old_log_prob, atol=1e-5, rtol=1e-5)
    assert_close(fast.old_values, ref.old_values, atol=1e-5, rtol=1e-5)
    # the rollout's log-probs are the teacher-forced full forward of the stored tokens (what the update reads)
    with torch.no_grad():
        ctx = model.context(fast.tokens, noise=fast.noise)
        k = fast.codes.shape[1]
        lp = model.log_prob(
            ctx.repeat_interleave(k, 0), fast.codes.flatten(0, 1), [m.flatten(0, 1) for m in fast.legal]
        )
    valid = fast.valid
    assert valid.float().mean() > 0.5
    assert_close(lp.view_as(fast.old_log_prob)[valid], fast.old_log_prob[valid], atol=1e-5, rtol=1e-5)
