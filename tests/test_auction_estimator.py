"""The auction's estimate: privileged by default bit for bit, a learned pCTR/pCVR when one is attached (the
winner follows its eCPM, ``score`` predicts the auction ``step`` runs), bad estimates fail clearly, and the
single env equals the vector env with the learned auction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from envs import AdsEnv, AdsVectorEnv, BatchedMarket, make_vec_env
from gpr_sim.platform import FunnelConfig, FunnelModel, catalog_of
from gpr_sim.world import WorldConfig, generate_world, initial, observe, open_market, transition
from gpr_sim.world.funnel import Probabilities, ecpm, platform_probabilities, true_probabilities

torch.set_num_threads(1)

CFG = WorldConfig.small(num_ads=60, num_organic=200, num_users=300, num_advertisers=10)
N = 16


def model_of(world, seed: int = 0) -> FunnelModel:
    torch.manual_seed(seed)  # an untrained model: its eCPM order differs from the privileged one
    return FunnelModel(FunnelConfig(hidden=16), catalog_of(world)).eval()


def sessions(world, n: int = N, seed: int = 3):
    seeds = torch.full((n,), seed, dtype=torch.int64)
    zeros = torch.zeros(n, dtype=torch.int64)
    return initial(world, seeds, torch.arange(n), zeros, zeros.clone()), open_market(world, n)


def test_default_auction_is_the_privileged_one_bit_for_bit():
    # estimate=None and the privileged probabilities passed in give the same rollout, every tensor equal;
    # so does the market's step with no auction model attached
    cfg = CFG.replace(num_candidates=3, num_slots=2, conversion_delay_mean=1.0)
    world = generate_world(cfg, 0)
    gen = torch.Generator().manual_seed(0)
    state_a, market_a = sessions(world)
    state_b, market_b = state_a, market_a
    market = BatchedMarket(cfg, N, world_seed=0)
    market.reset(seed=3)
    assert market.auction_estimator == "privileged"
    for _ in range(12):
        cand = torch.randint(-1, cfg.num_ads, (N, 3), generator=gen)
        ads = cand.clamp(min=0)
        state_a, market_a, out_a = transition(world, state_a, market_a, cand)
        est = platform_probabilities(world, ads, state_b.user_id)
        state_b, market_b, out_b = transition(world, state_b, market_b, cand, estimate=est)
        market.step(cand, autoreset=False)  # no autoreset: the sessions run on as in the core rollout
        for a, b in zip((*state_a, *market_a, *out_a), (*state_b, *market_b, *out_b)):
            assert torch.equal(a, b)
        for a, b in zip(state_a, market.state):
            assert torch.equal(a, b)


def test_the_winner_follows_the_learned_ecpm_where_the_orders_disagree():
    # no competitor and a tiny reserve: the higher eCPM wins the one slot. The estimate gives each row's
    # privileged loser twice the eCPM of its privileged winner (pCVR 1, pCTR = eCPM / (1000 x bid)).
    cfg = CFG.replace(competitor_ecpm_mean=0.0, reserve_ecpm=1e-6)
    world = generate_world(cfg, 0)
    state, market = sessions(world)
    cand = torch.stack([torch.arange(N), torch.arange(N) + 20], dim=1)  # (N, 2), distinct ads
    privileged = ecpm(world, cand, platform_probabilities(world, cand, state.user_id))
    p_winner = privileged.argmax(1)  # (N,)
    target = torch.full((N, 2), 1e-3)
    target[torch.arange(N), 1 - p_winner] = 2e-3  # learned eCPM: the privileged loser is worth twice as much
    p_click = target / (1000.0 * world.ad_bid[cand])
    est = Probabilities(p_click, torch.ones_like(p_click), torch.zeros_like(p_click))
    assert bool((p_click < 1).all())

    _, _, default = transition(world, state, market, cand)
    _, _, learned = transition(world, state, market, cand, estimate=est)
    assert torch.equal(default.ad_id[:, 0], cand.gather(1, p_winner[:, None])[:, 0])
    assert torch.equal(learned.ad_id[:, 0], cand.gather(1, (1 - p_winner)[:, None])[:, 0])
    # it pays the second price of the learned ranking: the runner-up's eCPM 1e-3 / 1000 per impression
    torch.testing.assert_close(learned.revenue[:, 0], torch.full((N,), 1e-6))
    torch.testing.assert_close(learned.ecpm[:, 0], torch.full((N,), 2e-3))
    # the funnel is the truth's whatever the auction ranked on
    truth = true_probabilities(world, learned.ad_id, state.interest, state.user_id, state.fatigue, state.hour)
    assert torch.equal(learned.p_click, truth.p_click)


def test_the_market_auction_ranks_on_the_attached_model():
    # through the market: the attached model's estimate on the platform view decides the winner
    # (budgets that never bind: the untrained model's eCPMs, in the thousands, would exhaust them)
    cfg = CFG.replace(
        competitor_ecpm_mean=0.0, reserve_ecpm=1e-6, num_candidates=2, budget_per_1k_requests=1e6
    )
    env = make_vec_env("ads-v0", N, config=cfg, world_seed=0, device="cpu")
    vec = env.unwrapped
    vec.reset(seed=3)
    model = model_of(vec.world)
    vec.attach_auction(model)
    assert vec.auction_estimator == "learned" and vec.estimator == "privileged"
    cand = torch.stack([torch.arange(N), torch.arange(N) + 20], dim=1)
    with torch.no_grad():  # the model on the platform view: the observation and the catalog only
        est = model(catalog_of(vec.world), observe(vec.world, vec.state), cand)
    learned = ecpm(vec.world, cand, est)
    privileged = ecpm(vec.world, cand, platform_probabilities(vec.world, cand, vec.state.user_id))
    disagree = learned.argmax(1) != privileged.argmax(1)
    assert bool(disagree.any())  # the test is about rows where the two orders differ
    _, _, _, _, info = env.step(cand)
    assert torch.equal(info["ad_id"][:, 0], cand.gather(1, learned.argmax(1, keepdim=True))[:, 0])
    torch.testing.assert_close(info["ecpm"][:, 0], learned.max(1).values)
    vec.attach_auction(None)
    assert vec.auction_estimator == "privileged"


@pytest.mark.parametrize(
    ("estimate", "message"),
    [
        (
            lambda p: Probabilities(p.p_click[:, :1], p.p_conversion, p.match),
            r"estimate.p_click has shape \(16, 1\)",
        ),
        (
            lambda p: Probabilities(p.p_click, p.p_conversion, p.match[:3]),
            r"estimate.match has shape \(3, 2\)",
        ),
        (lambda p: (p.p_click, p.p_conversion), r"estimate is a tuple: expected Probabilities"),
        (lambda p: p.p_click, r"estimate is a Tensor: expected Probabilities"),
        (lambda p: Probabilities(p.p_click, 0.5, p.match), r"estimate.p_conversion is a float"),
    ],
)
def test_a_misshapen_estimate_is_one_clear_value_error(estimate, message):
    world = generate_world(CFG, 0)
    state, market = sessions(world)
    cand = torch.stack([torch.arange(N), torch.arange(N) + 20], dim=1)
    good = platform_probabilities(world, cand, state.user_id)
    with pytest.raises(ValueError, match=message):
        transition(world, state, market, cand, estimate=estimate(good))


def test_score_predicts_the_learned_auctions_impressions():
    # one random candidate per request, budgets that never bind: each request is a Bernoulli(p_win) draw of
    # the auction (eCPM against the reserve and the log-normal competitor). Over R requests the impressions
    # are within 4 binomial standard errors, sqrt(sum p (1 - p)), of sum p_win (two-sided p ~ 6e-5).
    # The untrained model's pCTR and pCVR are near 0.5, so its eCPMs are in the thousands: the competitor
    # is put at that scale so that P(win) spreads over (0, 1) rather than sitting at 1.
    cfg = CFG.replace(budget_per_1k_requests=1e6, competitor_ecpm_mean=4000.0)
    env = make_vec_env("ads-v0", 256, config=cfg, world_seed=0, device="cpu")
    vec = env.unwrapped
    vec.reset(seed=11)
    model = model_of(vec.world)
    vec.attach_platform(model)
    vec.attach_auction(model)
    gen = torch.Generator().manual_seed(0)
    expected = variance = 0.0
    shown = capped = 0
    for _ in range(40):
        cand = torch.randint(0, cfg.num_ads, (256, 1), generator=gen)
        p = vec.score(cand).p_win.double()
        # every estimator predicts the same auction: P(win) is the auction model's, only the funnel differs
        assert torch.equal(vec.score(cand, estimator="privileged").p_win, vec.score(cand).p_win)
        assert torch.equal(vec.score(cand, truth=True).p_win, vec.score(cand).p_win)
        expected += float(p.sum())
        variance += float((p * (1 - p)).sum())
        _, _, _, _, info = env.step(cand)
        shown += int(info["impression"].sum())
        capped += int(info["budget_capped"].sum())
    assert capped == 0 and variance > 100  # budgets never bound; enough draws for the normal approximation
    assert abs(shown - expected) < 4 * math.sqrt(variance), (shown, expected, math.sqrt(variance))


def test_single_env_equals_vector_env_with_the_learned_auction():
    single = AdsEnv(config=CFG)
    vec = AdsVectorEnv(num_envs=1, config=CFG)
    model = model_of(vec.world)
    single.attach_auction(model)
    vec.attach_auction(model)
    assert single.auction_estimator == vec.auction_estimator == "learned"
    s_obs, _ = single.reset(seed=42)
    v_obs, _ = vec.reset(seed=42)
    differs = 0
    for t in range(60):
        for k in s_obs:  # after a session ends the single env resets, the vector env autoresets
            np.testing.assert_array_equal(
                np.asarray(s_obs[k]), v_obs[k][0].numpy(), err_msg=f"obs {k} at {t}"
            )
        a = (int(np.asarray(s_obs["user_id"])) * 13 + t * 7) % CFG.num_ads
        s_obs, s_r, s_term, s_trunc, s_info = single.step(a)
        v_obs, v_r, v_term, v_trunc, v_info = vec.step(torch.tensor([a]))
        assert s_r == float(v_r[0]) and s_term == bool(v_term[0]) and s_trunc == bool(v_trunc[0])
        for k in ("impression", "click", "revenue", "ecpm", "ad_id"):
            np.testing.assert_array_equal(s_info[k], v_info[k][0].numpy(), err_msg=f"{k} at {t}")
        differs += int(s_info["impression"][0])
        if s_term or s_trunc:
            s_obs, _ = single.reset()
    assert differs > 0  # some requests were won, so the learned eCPM reached the outcomes


def test_the_evaluation_auction_setting_is_checked_before_anything_runs(tmp_path):
    from agents.evaluate import parse_args
    from agents.evaluation.auction import attach_auction_model
    from agents.evaluation.compare import EvalConfig, run_config
    from agents.evaluation.oracle_share import OracleShareConfig

    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nowhere: not a platform folder"):
        EvalConfig(agents=("random",), auction=missing)
    with pytest.raises(ValueError, match="nowhere: not a platform folder"):
        OracleShareConfig(auction=missing)
    with pytest.raises(ValueError, match="nowhere: not a platform folder"):
        parse_args(["--agents", "random", "--auction", missing])
    with pytest.raises(ValueError, match=r"auction=3 is invalid"):
        EvalConfig(agents=("random",), auction=3)
    # the default: the privileged auction, nothing attached, and the agents' cache keys as before
    cfg = EvalConfig(agents=("random",))
    assert cfg.auction == "" and cfg.oracle_share.auction == "" and "auction" not in run_config(cfg, "random")
    env = make_vec_env("ads-v0", 2, config=CFG, world_seed=0, device="cpu")
    attach_auction_model(env, "")
    assert env.unwrapped.auction_estimator == "privileged"


def test_score_takes_the_auction_from_the_auction_model_and_the_funnel_from_the_estimator():
    from gpr_sim.world import score

    env = make_vec_env("ads-v0", N, config=CFG.replace(num_candidates=3), world_seed=0, device="cpu")
    vec = env.unwrapped
    vec.reset(seed=5)
    ranker, auction_model = model_of(vec.world, 0), model_of(vec.world, 1)
    vec.attach_platform(ranker)
    vec.attach_auction(auction_model)
    cand = torch.randint(0, CFG.num_ads, (N, 3), generator=torch.Generator().manual_seed(2))
    cand[0, 1] = -1
    catalog, obs = catalog_of(vec.world), observe(vec.world, vec.state)
    with torch.no_grad():
        funnel, auction = (
            ranker(catalog, obs, cand.clamp(min=0)),
            auction_model(catalog, obs, cand.clamp(min=0)),
        )
    world, state = vec.world, vec.state
    want = {
        "learned": score(world, state, cand, estimate=funnel, auction=auction),
        "privileged": score(world, state, cand, auction=auction),
        "truth": score(world, state, cand, truth=True, auction=auction),
    }
    for name, w in want.items():
        got = vec.score(cand, estimator=name)
        for field, x, y in zip(got._fields, got, w):
            assert torch.equal(x, y), (name, field)
        torch.testing.assert_close(
            got.ecpm, 1000.0 * world.ad_bid[cand.clamp(min=0)] * auction.p_click * auction.p_conversion
        )
    assert not torch.equal(want["learned"].p_click, want["privileged"].p_click)
