"""The scoring API's estimators: "privileged" is today's default bit for bit, "learned" is the core's score
computed from the attached model's probabilities, "truth" is truth=True, and bad choices fail clearly."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from envs import make_vec_env
from gpr_sim.platform import FunnelConfig, FunnelModel, catalog_of
from gpr_sim.world import WorldConfig, observe, score
from gpr_sim.world.funnel import Probabilities, platform_probabilities

torch.set_num_threads(1)

CFG = WorldConfig.small(num_ads=60, num_organic=200, num_users=300, num_advertisers=10)
N, K = 8, 4


@pytest.fixture()
def env():
    env = make_vec_env("ads-v0", N, config=CFG, world_seed=0, device="cpu")
    env.reset(seed=5)
    return env


def model_of(env, seed: int = 0) -> FunnelModel:
    torch.manual_seed(seed)  # an untrained model: its outputs differ from the privileged ones
    return FunnelModel(FunnelConfig(hidden=16), catalog_of(env.unwrapped.world)).eval()


def candidates(seed: int = 0) -> torch.Tensor:
    cand = torch.randint(0, CFG.num_ads, (N, K), generator=torch.Generator().manual_seed(seed))
    cand[0, 1] = -1  # "no ad" scores -inf value in every estimator
    return cand


def assert_same(a, b):
    for name, x, y in zip(a._fields, a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_privileged_is_todays_default_exactly(env):
    vec = env.unwrapped
    cand = candidates()
    today = score(vec.world, vec.state, cand)
    assert vec.estimator == "privileged"
    assert_same(vec.score(cand), today)
    assert_same(vec.score(cand, estimator="privileged"), today)
    vec.attach_platform(model_of(env))
    assert vec.estimator == "learned"
    assert_same(vec.score(cand, estimator="privileged"), today)  # still there on demand
    vec.attach_platform(None)
    assert vec.estimator == "privileged"
    assert_same(vec.score(cand), today)


def test_truth_flag_and_truth_estimator_agree(env):
    vec = env.unwrapped
    cand = candidates(1)
    want = score(vec.world, vec.state, cand, truth=True)
    assert_same(vec.score(cand, truth=True), want)
    assert_same(vec.score(cand, estimator="truth"), want)
    assert_same(vec.score(cand, truth=True, estimator="truth"), want)


def test_learned_is_core_score_of_the_models_probabilities(env):
    vec = env.unwrapped
    model = model_of(env)
    vec.attach_platform(model)
    cand = candidates(2)
    ads = cand.clamp(min=0)
    with torch.no_grad():
        est = model(catalog_of(vec.world), observe(vec.world, vec.state), ads)
    want = score(vec.world, vec.state, cand, estimate=est)
    got = vec.score(cand)
    assert_same(got, want)
    assert_same(vec.score(cand, estimator="learned"), want)
    torch.testing.assert_close(got.p_click, est.p_click, rtol=0, atol=0)
    # eCPM is the learned one: 1000 x bid x pCTR x pCVR
    torch.testing.assert_close(got.ecpm, 1000.0 * vec.world.ad_bid[ads] * est.p_click * est.p_conversion)
    assert bool(torch.isinf(got.value[0, 1])) and not bool(torch.isinf(got.value[1]).any())
    privileged = vec.score(cand, estimator="privileged")
    assert not torch.equal(got.p_click, privileged.p_click)


def test_learned_scores_rows_and_rehearsed_states(env):
    vec = env.unwrapped
    model = model_of(env)
    vec.attach_platform(model)
    rows = torch.tensor([1, 4, 6])
    cand = candidates(3)[rows]
    for state in (vec.state.select(rows), vec.rehearse(rows).state):
        with torch.no_grad():
            est = model(catalog_of(vec.world), observe(vec.world, state), cand)
        assert_same(vec.score(cand, state=state), score(vec.world, state, cand, estimate=est))


def test_core_score_with_the_privileged_estimate_is_the_default():
    # the privileged probabilities passed in as an estimate reproduce the default exactly
    env = make_vec_env("ads-v0", N, config=CFG, world_seed=0, device="cpu")
    env.reset(seed=1)
    world, state = env.unwrapped.world, env.unwrapped.state
    cand = candidates(4)
    default = score(world, state, cand)
    est = platform_probabilities(world, cand.clamp(min=0), state.user_id)
    assert_same(score(world, state, cand, estimate=est), default)
    with pytest.raises(ValueError, match="truth=True and an estimate"):
        score(world, state, cand, truth=True, estimate=est)
    with pytest.raises(ValueError, match=r"estimate.p_click has shape \(8, 3\)"):
        score(world, state, cand, estimate=Probabilities(*(t[:, :3] for t in est)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"estimator": "oracle"}, r"estimator='oracle' is not allowed: expected one of \('learned'"),
        ({"truth": True, "estimator": "privileged"}, "truth=True conflicts with estimator='privileged'"),
        ({"truth": True, "estimator": "learned"}, "truth=True conflicts with estimator='learned'"),
        ({"estimator": "learned"}, r"call attach_platform\(model\) first"),
    ],
)
def test_estimator_errors(env, kwargs, message):
    with pytest.raises(ValueError, match=message):
        env.unwrapped.score(candidates(), **kwargs)


def test_single_env_forwards_estimators():
    env = gym.make("ads-v0", config=CFG, world_seed=0)
    env.reset(seed=2)
    single = env.unwrapped
    cand = np.array([3, 7, -1])
    privileged = single.score(cand)
    assert single.estimator == "privileged" and single.catalog.num_ads == CFG.num_ads
    single.attach_platform(model_of(single))
    learned = single.score(cand)
    np.testing.assert_array_equal(single.score(cand, estimator="privileged")["value"], privileged["value"])
    np.testing.assert_array_equal(single.score(cand, estimator="learned")["value"], learned["value"])
    assert not np.array_equal(learned["p_click"], privileged["p_click"])
    assert np.isneginf(learned["value"][2])
    with pytest.raises(ValueError, match="conflicts"):
        single.score(cand, truth=True, estimator="learned")
