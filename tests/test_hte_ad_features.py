"""The HTE's candidate-ad features (``GPRConfig.hte_ad_features``, ``gpr_sim.model.hte``) and the served
policy's value ranking (``gpr:RUN`` option ``rank``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gpr_sim.model import GPRConfig, GPRModel
from gpr_sim.model.config import LEGACY_DEFAULTS
from gpr_sim.model.hte import HTE, path_ad_features
from gpr_sim.platform.features import AD_FEATURE_DIM, PlatformFeatures
from gpr_sim.schema import TokenBatch
from gpr_sim.tokenizer.ids import SemanticIdTable
from gpr_sim.tokenizer.world import WorldTokenizer
from gpr_sim.world.catalog import generate_world
from gpr_sim.world.config import WorldConfig

CFG = GPRConfig(level_sizes=(4, 4, 3), d_model=16, n_layers=1, n_heads=2, dense_dim=5, max_len=16)
F = AD_FEATURE_DIM


def _tokens(b: int, t: int = 6, seed: int = 0) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    type_ids = torch.tensor([0, 1, 1, 3, 3, 2]).expand(b, t).clone()
    codes = torch.randint(0, 3, (b, t, CFG.path_len), generator=g)
    return TokenBatch(
        token_ids=torch.randint(0, 9, (b, t), generator=g),
        type_ids=type_ids,
        positions=torch.arange(t).expand(b, t).clone(),
        padding_mask=torch.zeros(b, t, dtype=torch.bool),
        semantic_codes=codes,
        event_ids=torch.randint(0, 4, (b, t), generator=g),
        dense_features=torch.randn(b, t, CFG.dense_dim, generator=g),
    )


def _pair() -> tuple[GPRModel, GPRModel]:
    """A model without the candidate features and the same weights with them (input untrained)."""
    torch.manual_seed(0)
    off = GPRModel(CFG).eval()
    on = GPRModel(dataclasses.replace(CFG, hte_ad_features=F)).eval()
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert missing == ["hte.ad_proj.weight"] and unexpected == []
    return off, on


def test_untrained_feature_input_changes_nothing():
    off, on = _pair()
    ctx = torch.randn(3, 5, CFG.d_model)
    paths = torch.randint(0, 3, (3, 4, CFG.path_len))
    feats = torch.randn(3, 4, F)
    torch.testing.assert_close(on.path_values(ctx, paths, feats), off.path_values(ctx, paths), rtol=0, atol=0)
    torch.testing.assert_close(
        on.values(ctx, paths[:, 0], feats[:, 0]), off.values(ctx, paths[:, 0]), rtol=0, atol=0
    )
    tokens, target = _tokens(3), torch.randint(0, 3, (3, CFG.mtp_heads, CFG.path_len))
    g = torch.tensor([1.0, -2.0, 0.5])
    a = off.mtp_loss(tokens, target, value_target=g, generator=torch.Generator().manual_seed(1))
    b = on.mtp_loss(
        tokens, target, value_target=g, generator=torch.Generator().manual_seed(1), value_features=feats[:, 0]
    )
    torch.testing.assert_close(a.loss_value, b.loss_value, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)


def test_features_move_only_the_full_item_value():
    _, on = _pair()
    with torch.no_grad():
        on.hte.ad_proj.weight.normal_()
    ctx, paths = torch.randn(2, 5, CFG.d_model), torch.randint(0, 3, (2, 3, CFG.path_len))
    zero = on.path_values(ctx, paths, torch.zeros(2, 3, F))
    moved = on.path_values(ctx, paths, torch.randn(2, 3, F))
    # no bias: zero features (an organic or unknown path) equal no features
    torch.testing.assert_close(zero, on.path_values(ctx, paths), rtol=0, atol=0)
    torch.testing.assert_close(moved[..., :-1], zero[..., :-1], rtol=0, atol=0)  # prefixes name no ad
    assert (moved[..., -1] - zero[..., -1]).abs().min() > 0


def test_bad_feature_inputs_raise():
    off, on = _pair()
    ctx, paths = torch.randn(2, 5, CFG.d_model), torch.randint(0, 3, (2, 3, CFG.path_len))
    with pytest.raises(ValueError, match="hte_ad_features is 0"):
        off.path_values(ctx, paths, torch.zeros(2, 3, F))
    with pytest.raises(ValueError, match=r"ad_features must be \(2, 3, 6\) with full paths"):
        on.path_values(ctx, paths[..., :2], torch.zeros(2, 3, F))
    with pytest.raises(ValueError, match=r"ad_features must be \(2, 3, 6\)"):
        on.path_values(ctx, paths, torch.zeros(2, 3, F + 1))
    with pytest.raises(ValueError, match="hte_ad_features=6 is invalid with hte=False"):
        dataclasses.replace(CFG, hte=False, hte_ad_features=F)
    with pytest.raises(ValueError, match="hte_ad_features=-1 is out of range"):
        dataclasses.replace(CFG, hte_ad_features=-1)


def test_old_checkpoints_load_without_the_field():
    stored = CFG.to_dict()
    del stored["hte_ad_features"]  # a config written before the field
    cfg = GPRConfig.from_dict(stored)
    assert cfg.hte_ad_features == LEGACY_DEFAULTS["hte_ad_features"] == 0 and cfg == CFG
    old = GPRModel(CFG)
    GPRModel(cfg).load_state_dict(old.state_dict())  # strict: the same parameters, no ad_proj
    assert GPRModel(cfg).hte.ad_proj is None


@pytest.fixture(scope="module")
def world_and_features():
    world = generate_world(WorldConfig(), 0)
    return world, PlatformFeatures.from_world(world)


def test_lookup_maps_paths_to_their_ads_features(world_and_features):
    world, feats = world_and_features
    n_org, n_ads = world.config.num_organic, world.config.num_ads
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 6, (n_org + n_ads, 2), generator=g)  # 36 paths for 2500 items: many collide
    tok = WorldTokenizer(SemanticIdTable(codes, 6, num_organic=n_org))
    ads = torch.tensor([0, 7, n_ads - 1, 123])
    paths = tok.paths_of_ads(ads)  # (4, L'): the disambiguation digit tells colliding items apart
    torch.testing.assert_close(path_ad_features(tok, feats, paths), feats.ad_features[ads], rtol=0, atol=0)
    organic = tok.table.item_to_path[torch.tensor([0, n_org - 1])]
    unknown = paths[:1].clone()
    unknown[0, -1] = tok.level_sizes[-1]  # a digit past the last level's codes
    invalid = torch.full((1, tok.path_len), -1)
    bad = torch.cat([organic, unknown, invalid])
    torch.testing.assert_close(path_ad_features(tok, feats, bad), torch.zeros(4, F), rtol=0, atol=0)
    grid = torch.stack([paths, paths.flip(0)], 0)  # (2, 4, L'): any leading shape
    assert path_ad_features(tok, feats, grid).shape == (2, 4, F)
    assert path_ad_features(tok, None, paths) is None


def _r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(1 - (pred - y).square().mean() / y.var(unbiased=False))


def _fit_hte(cfg: GPRConfig, use_features: bool, seed: int) -> float:
    """Held-out R^2 of an HTE trained on value = the candidate's (standardised) log bid (test below)."""
    g = torch.Generator().manual_seed(seed)
    n = 1024
    feats = torch.randn(2 * n, F, generator=g)  # column 0: the candidate's log bid
    paths = torch.stack([torch.randint(0, k, (2 * n,), generator=g) for k in cfg.level_sizes], 1)
    ctx = torch.zeros(2 * n, 2, cfg.d_model)  # one request context for all
    y = feats[:, 0]
    torch.manual_seed(seed)
    hte = HTE(cfg)
    opt = torch.optim.Adam(hte.parameters(), lr=1e-2)
    train, test = slice(0, n), slice(n, 2 * n)

    def predict(rows: slice) -> torch.Tensor:
        f = feats[rows, None] if use_features else None
        return hte.forward_paths(ctx[rows], paths[rows, None], f)[:, 0, -1]

    for _ in range(300):
        opt.zero_grad()
        (predict(train) - y[train]).square().mean().backward()
        opt.step()
    with torch.no_grad():
        return _r2(predict(test), y[test])


def test_value_reads_the_bid_only_through_the_features():
    """The target is each candidate's log bid; paths and context are drawn independently of it.

    Without features no input carries information about the target, so no predictor beats the held-out
    mean: R^2 <= 0 up to the sampling covariance of 1024 independent rows (|corr| ~ 1/32, so R^2 < 0.1 with
    a wide margin). With them the target is linear in the input (head . ad_proj recovers column 0), so a
    trained HTE reaches R^2 near 1: required > 0.9, a gap of at least 0.8.
    """
    cfg = GPRConfig(level_sizes=(4, 4, 2), d_model=16, hte_ad_features=F)
    with_f, without = _fit_hte(cfg, True, 0), _fit_hte(cfg, False, 0)
    assert with_f > 0.9, with_f
    assert without < 0.1, without


# ----------------------------------------------------------------------------- the served policy's ranking


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from agents import pretrain
    from tests.helpers import TINY_PRETRAIN

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("gpr_run")
    pretrain.main(["--out", str(out), *TINY_PRETRAIN])  # platform features on: the HTE reads the candidate's
    return out


def _served(policy, obs, top_k: int):
    """The beam of ``policy`` on ``obs`` as the policy computes it: (context, BeamResult with top_k items)."""
    from gpr_sim.decoding import beam_search
    from gpr_sim.model.incremental import head_context_kv, request_major_step
    from gpr_sim.schema import tokens_from_obs

    market = policy.env.market_features() if policy.model.cfg.market_features else None
    tokens = tokens_from_obs(
        obs, policy.tokenizer.table, policy.schema, check=False, features=policy.features, market=market
    )
    policy.model.eval()
    with torch.no_grad():
        ctx = policy.model.context(tokens, torch.Generator().manual_seed(3))
        step = request_major_step(
            policy.model.ptd.level_logits_cached, head_context_kv(policy.model, ctx), len(ctx)
        )
        eligible = policy.env.eligible_ads()
        res = beam_search(
            step, policy.tokenizer.trie, batch_size=len(ctx), beam_width=policy.beam_width, top_k=top_k,
            eligible=eligible,
        )  # fmt: skip
    return ctx, res


def test_rank_logprob_is_the_beam_order_and_value_the_hte_order(run_dir):
    from agents.policies import make_policy
    from agents.policies.gpr import GPRPolicy, load_run_model
    from envs import make_vec_env

    env = make_vec_env("ads-v0", 8, preset="small", world_seed=0, device="cpu", validate_actions=False)
    obs, _ = env.reset(seed=0)
    obs = {k: torch.as_tensor(v) for k, v in obs.items()}
    default = GPRPolicy(env, run_dir, beam_width=6, seed=3)
    by_default = make_policy(f"gpr:{run_dir}", env, 3, beam_width=6)
    model, tok = load_run_model(run_dir)
    assert default.rank == GPRPolicy.from_model(env, model, tok).rank == "logprob"
    assert default.model.cfg.hte_ad_features == F
    by_logprob = make_policy(f"gpr:{run_dir}", env, 3, beam_width=6, rank="logprob")
    k = default.k
    # logprob: the beam's first k items, a row's best repeated in empty slots (the behaviour before `rank`)
    _, res = _served(default, obs, k)
    want = torch.where(res.items >= 0, res.items, res.items[:, :1].clamp_min(0))
    torch.testing.assert_close(by_logprob.act(obs).action, want, rtol=0, atol=0)
    torch.testing.assert_close(default.act(obs).action, want, rtol=0, atol=0)
    torch.testing.assert_close(by_default.act(obs).action, want, rtol=0, atol=0)
    # value: all beam_width items, the k of highest HTE value with the candidate's features
    by_value = make_policy(f"gpr:{run_dir}", env, 3, beam_width=6, rank="value")
    ctx, res = _served(by_value, obs, by_value.beam_width)
    with torch.no_grad():
        feats = path_ad_features(by_value.tokenizer, by_value.features, res.codes)
        v = by_value.model.path_values(ctx, res.codes.clamp_min(0), feats)[..., -1]
    v = v.masked_fill(res.items < 0, float("-inf"))
    top = res.items.gather(1, v.argsort(dim=1, descending=True, stable=True)[:, :k])
    want = torch.where(top >= 0, top, top[:, :1].clamp_min(0))
    torch.testing.assert_close(by_value.act(obs).action, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"rank='best' is unknown: expected one of \['logprob', 'value'\]"):
        GPRPolicy(env, run_dir, rank="best")


# ----------------------------------------------------------------------------- the RL rollout and update


def test_rollout_and_update_read_the_candidates_features():
    """The critic values a rollout stores (``Roller``) and those the update recomputes (``path_terms``,
    ``PathTerms``) both read the sampled ads' features: equal to each other, and not to the values without."""
    from agents.rl.loop import PathTerms, path_terms
    from agents.rl.rollout import Roller
    from tests.test_rollout_incremental import _market

    torch.set_num_threads(1)
    env, tok, cfg = _market(6)
    cfg = dataclasses.replace(cfg, hte_ad_features=F)
    torch.manual_seed(0)
    model = GPRModel(cfg).eval()
    with torch.no_grad():
        model.hte.ad_proj.weight.normal_()  # a trained input: the features move the item value
    roller = Roller(env, tok, group_size=4, estimator="truth", arr_rate=0.0, seed=3)
    buf, _ = roller.collect(model, 1)
    lookup = roller.ad_lookup(model)
    with torch.no_grad():
        _, values = path_terms(model, buf, ad_lookup=lookup)
        _, module_values = PathTerms(model, ad_lookup=lookup)(buf)
        _, blind = path_terms(model, buf)
    torch.testing.assert_close(values, buf.old_values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module_values, values, rtol=0, atol=0)
    torch.testing.assert_close(blind[..., :-1], values[..., :-1], rtol=0, atol=0)
    assert (blind[..., -1] - values[..., -1]).abs().max() > 1e-3
    assert roller.ad_lookup(GPRModel(dataclasses.replace(cfg, hte_ad_features=0))) is None


def test_incremental_decoder_values_read_the_served_ads_features():
    """``IncrementalDecoder(ad_lookup=...)`` scores each decoded path's ad: the lookup sees the step's paths,
    untrained it changes nothing, trained it moves only the full-item value."""
    from gpr_sim.model import IncrementalDecoder
    from tests.test_incremental import CFG as INC_CFG
    from tests.test_incremental import LAYOUT, step_inputs
    from tests.test_model_gpr import random_trie
    from tests.test_model_hsd import make_tokens

    cfg = dataclasses.replace(INC_CFG, hte_ad_features=F)
    torch.manual_seed(0)
    model = GPRModel(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    trie = random_trie(cfg, n=50, seed=0)
    tokens = make_tokens(LAYOUT, 3, gen, cfg)
    inputs = step_inputs(3, 2, gen, cfg)
    seen = []

    def lookup(paths: torch.Tensor) -> torch.Tensor:  # features as a fixed function of the path
        seen.append(paths.clone())
        return paths.float().sum(-1, keepdim=True).expand(*paths.shape[:-1], F).sin()

    def values(ad_lookup):
        dec = IncrementalDecoder(model, trie, "eager", new_tokens=2, ad_lookup=ad_lookup)
        with torch.no_grad():
            return dec(dec.prefill(tokens, **inputs), 4, 3)

    blind = values(None)
    torch.testing.assert_close(values(lookup).values, blind.values, rtol=0, atol=0)  # zero-init
    assert torch.equal(seen[-1], blind.codes)  # the decoded paths, -1 rows included
    with torch.no_grad():
        model.hte.ad_proj.weight.normal_()
    moved = values(lookup)
    assert torch.equal(moved.codes, blind.codes)  # the value does not steer this beam search
    torch.testing.assert_close(moved.values[..., :-1], blind.values[..., :-1], rtol=0, atol=0)
    assert (moved.values[..., -1] - blind.values[..., -1]).abs().max() > 1e-3


def test_beam_value_fn_reads_features_at_the_full_item_only():
    _, on = _pair()
    with torch.no_grad():
        on.hte.ad_proj.weight.normal_()
    ctx = torch.randn(2, 5, CFG.d_model)
    feats = torch.randn(4, F)
    calls = []

    def lookup(paths: torch.Tensor) -> torch.Tensor:
        calls.append(paths.shape)
        return feats[: len(paths)]

    row = torch.tensor([0, 1, 1, 0])
    full = torch.randint(0, 3, (4, CFG.path_len))
    for cached in (False, True):
        _, value_fn = on.beam_fns(ctx, cached=cached, ad_lookup=lookup)
        with torch.no_grad():
            torch.testing.assert_close(value_fn(row, full), on.values(ctx[row], full, feats)[:, -1])
            torch.testing.assert_close(value_fn(row, full[:, :2]), on.values(ctx[row], full[:, :2])[:, -1])
    assert calls == [(4, CFG.path_len)] * 2  # never for a partial prefix
