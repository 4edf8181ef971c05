"""agents.policies: one registry; every name builds and acts; clear errors for unknown names and options.

The ``gpr:PATH`` family needs a trained run folder: ``tests/test_gpr_policy.py`` builds it through the
registry with its option.
"""

import gymnasium
import pytest
import torch

from agents.policies import POLICIES, Policy, known_policies, make_policy, policy_factory, policy_options
from agents.policies.cascade import CascadeConfig, CascadePolicy
from agents.policies.oracle import FATIGUE_AWARE_PENALTY, OraclePolicy
from envs import BatchedMarket, make_vec_env
from gpr_sim.world import WorldConfig

torch.set_num_threads(1)
CFG = WorldConfig.small(
    num_ads=60, num_advertisers=12, num_organic=200, num_users=100, num_candidates=3, num_slots=2
)
N = 6


def _env():
    env = make_vec_env("ads-v0", N, config=CFG, world_seed=0)
    obs, _ = env.reset(seed=1)
    return env, obs


def test_known_policies_are_the_registry():
    assert known_policies() == [
        "cascade-privileged",
        "gpr:PATH",
        "learned-cascade:PATH",
        "oracle",
        "oracle-fatigue",
        "random",
    ]
    assert policy_options("cascade-privileged") == ["temperature"] and policy_options("oracle-fatigue") == [
        "fatigue_penalty"
    ]
    assert policy_options("random") == [] and policy_options("oracle") == []


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_registered_name_builds_and_acts(name):
    env, obs = _env()
    policy = make_policy(name, env, seed=0)
    assert isinstance(policy, Policy)
    for t in range(3):
        out = policy.act(obs)
        assert out.action.shape == (N, CFG.num_candidates) and out.action.dtype == torch.int64, name
        assert ((out.action >= 0) & (out.action < CFG.num_ads)).all(), name
        assert out.propensity.shape == (N,) and out.propensity.dtype == torch.float64, name
        assert ((out.propensity > 0) & (out.propensity <= 1)).all(), name
        if name == "random":  # K ads with replacement out of 60: (1/60)^3 for every list
            torch.testing.assert_close(out.propensity, torch.full((N,), 60.0**-3, dtype=torch.float64))
        if name != "random":  # the ranked policies propose eligible ads only
            assert env.eligible_ads()[out.action].all(), (name, t)
        obs, *_ = env.step(out.action)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_the_market_itself_gives_the_same_actions(name):
    """A policy bound to a ``BatchedMarket`` acts as one bound to the vector env over the same market."""
    env, obs = _env()
    market = BatchedMarket(CFG, N, world_seed=0)
    m_obs = market.reset(seed=1)
    a, b = make_policy(name, env, seed=4), make_policy(name, market, seed=4)
    for _ in range(3):
        out_a, out_b = a.act(obs), b.act(m_obs)
        assert torch.equal(out_a.action, out_b.action) and torch.equal(out_a.propensity, out_b.propensity), (
            name
        )
        obs, *_ = env.step(out_a.action)
        m_obs, *_ = market.step(out_b.action)


def test_options_reach_the_policy():
    env, obs = _env()
    greedy = make_policy("cascade-privileged", env, seed=5, temperature=0.0)
    assert isinstance(greedy, CascadePolicy) and greedy.config.temperature == 0.0
    direct = CascadePolicy(env, CascadeConfig(temperature=0.0), seed=5)
    assert torch.equal(greedy.act(obs).action, direct.act(obs).action)
    assert torch.equal(greedy.act(obs).propensity, torch.ones(N, dtype=torch.float64))  # greedy: propensity 1
    assert (
        make_policy("cascade-privileged", env).config == CascadeConfig()
    )  # no option: the config's defaults
    aware = make_policy("oracle-fatigue", env)
    assert isinstance(aware, OraclePolicy) and aware.fatigue_penalty == FATIGUE_AWARE_PENALTY
    assert make_policy("oracle-fatigue", env, fatigue_penalty=0.5).fatigue_penalty == 0.5
    assert make_policy("oracle", env).fatigue_penalty == 0.0


def test_unknown_names_options_and_envs_raise():
    env, _ = _env()
    listing = (
        r"expected one of cascade-privileged, gpr:PATH, learned-cascade:PATH, oracle, oracle-fatigue, random"
    )
    for spec in ("greedy", "gpr:", "nope:x", "Random"):
        with pytest.raises(ValueError, match=rf"unknown policy '{spec}': {listing}"):
            make_policy(spec, env)
        with pytest.raises(ValueError, match=rf"unknown policy '{spec}'"):
            policy_factory(spec)  # the same check, before any env exists
    with pytest.raises(
        ValueError, match=r"policy 'random' takes no option \['temperature'\]: its options are \[\]"
    ):
        make_policy("random", env, temperature=0.3)
    with pytest.raises(ValueError, match=r"temperature=-1"):
        make_policy("cascade-privileged", env, temperature=-1.0)  # the config's own range check
    with pytest.raises(ValueError, match="expected an ads-v0 vector env or a BatchedMarket, got AdsEnv"):
        make_policy("random", gymnasium.make("ads-v0"))  # the single (numpy) env
