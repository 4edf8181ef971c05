"""The Gymnasium contract of ads-v0: checkers, spaces, parity single vs vector, bad input."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from envs import AdsEnv, AdsVectorEnv, BatchedMarket, ads_env_ids, make_vec_env
from gpr_sim.world import WorldConfig, remaining_budget, score


@pytest.mark.parametrize(
    "overrides", [{}, {"num_candidates": 5, "num_slots": 2, "conversion_delay_mean": 2.0}]
)
def test_gymnasium_and_sb3_checkers_pass(overrides):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    check_env(gym.make("ads-v0", **overrides).unwrapped, skip_render_check=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SB3 suggests normalising Box bounds; not an error
        sb3_check_env(AdsEnv(**overrides))


def test_make_vec_uses_the_vector_entry_point():
    env = gym.make_vec("ads-v0", num_envs=6, vectorization_mode="vector_entry_point", num_candidates=3)
    assert isinstance(env.unwrapped, AdsVectorEnv)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains({k: v.numpy() for k, v in obs.items()})
    obs, reward, term, trunc, info = env.step(torch.zeros(6, 3, dtype=torch.int64))
    assert reward.shape == (6,) and term.dtype == torch.bool and info["click"].shape == (6, 1)
    for key in (
        "impression",
        "click",
        "conversion",
        "gmv",
        "revenue",
        "p_click",
        "p_conversion",
        "ecpm",
        "ad_id",
        "advertiser_id",
    ):
        assert key in info
    assert env.unwrapped.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP


def _policy(obs_user_id: np.ndarray, step: int, num_ads: int) -> np.ndarray:
    return (obs_user_id * 13 + step * 7) % num_ads


def test_single_env_equals_vector_env_at_n1_across_episodes():
    single = AdsEnv(conversion_delay_mean=1.0)
    vec = AdsVectorEnv(num_envs=1, conversion_delay_mean=1.0)
    n_ads = single.config.num_ads
    s_obs, _ = single.reset(seed=42)
    v_obs, _ = vec.reset(seed=42)
    episodes = 0
    for t in range(120):
        for k in s_obs:
            np.testing.assert_array_equal(
                np.asarray(s_obs[k]), v_obs[k][0].numpy(), err_msg=f"obs {k} at {t}"
            )
        a = _policy(np.asarray(s_obs["user_id"]), t, n_ads)
        s_obs, s_r, s_term, s_trunc, s_info = single.step(int(a))
        v_obs, v_r, v_term, v_trunc, v_info = vec.step(torch.as_tensor(a).reshape(1))
        assert (
            s_r == pytest.approx(float(v_r[0]), abs=0)
            and s_term == bool(v_term[0])
            and s_trunc == bool(v_trunc[0])
        )
        for k in ("click", "conversion", "revenue", "gmv", "ad_id", "delayed_conversion"):
            np.testing.assert_array_equal(s_info[k], v_info[k][0].numpy())
        if s_term or s_trunc:
            episodes += 1
            for k in s_obs:  # the vector env's final_obs is what the single env returned
                np.testing.assert_array_equal(np.asarray(s_obs[k]), v_info["final_obs"][k][0].numpy())
            s_obs, _ = single.reset()
    assert episodes >= 3


@pytest.mark.parametrize(
    "action, match",
    [
        (np.array([1.5]), "dtype"),
        (np.array([[1, 2]]), "shape"),
        (np.array(500), "ad index 500"),
        (np.array(-1), "ad index -1"),
    ],
)
def test_malformed_action_raises_and_leaves_state_untouched(action, match):
    env, ref = AdsEnv(), AdsEnv()
    env.reset(seed=0)
    ref.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.step(action)
    a = env.step(3)
    b = ref.step(3)
    assert a[1] == b[1] and a[4]["click"].tolist() == b[4]["click"].tolist()


def test_vector_env_rejects_bad_actions_clearly():
    env = AdsVectorEnv(num_envs=4, num_candidates=2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected \(4, 2\)"):
        env.step(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="expected ids in"):
        env.step(torch.full((4, 2), 10**6))
    with pytest.raises(ValueError, match="dtype"):
        env.step(torch.zeros(4, 2))


def test_invalid_config_through_make_names_the_field():
    with pytest.raises(ValueError, match="num_slots=2 is out of range"):
        gym.make("ads-v0", num_slots=2)
    with pytest.raises(ValueError, match="unknown WorldConfig field"):
        gym.make("ads-v0", num_adz=2)
    with pytest.raises(ValueError, match="num_envs=0"):
        AdsVectorEnv(num_envs=0)


def test_scoring_does_not_move_the_world():
    a, b = AdsVectorEnv(num_envs=8), AdsVectorEnv(num_envs=8)
    a.reset(seed=1)
    b.reset(seed=1)
    cand = torch.arange(80).view(8, 10)
    s1 = a.score(cand)
    s2 = a.score(cand, truth=True)
    assert s1.value.shape == (8, 10) and not torch.equal(s1.p_click, s2.p_click)
    act = torch.arange(8) * 3
    ra = a.step(act)
    rb = b.step(act)
    assert torch.equal(ra[1], rb[1]) and torch.equal(ra[4]["click"], rb[4]["click"])


# ----------------------------------------------------------------------------- misuse: clear errors


def test_step_and_score_before_reset_say_call_reset():
    # the vector env used to fail with AttributeError: 'NoneType' object has no attribute 'user_id'
    for env in (AdsEnv(), AdsVectorEnv(num_envs=2)):
        action = 0 if isinstance(env, AdsEnv) else torch.zeros(2, dtype=torch.int64)
        cand = [1] if isinstance(env, AdsEnv) else torch.ones(2, 1, dtype=torch.int64)
        with pytest.raises(RuntimeError, match=r"^call reset\(\) before step\(\)$"):
            env.step(action)
        with pytest.raises(RuntimeError, match=r"^call reset\(\) before score\(\)$"):
            env.score(cand)
        env.reset(seed=0)
        env.step(action)  # and after reset all is well


def test_score_rejects_non_integer_and_out_of_range_candidates():
    single, vec = AdsEnv(), AdsVectorEnv(num_envs=2)
    single.reset(seed=0)
    vec.reset(seed=0)
    # score([1.7]) used to be truncated to ad 1 and valued silently
    cases = [
        ([1.7], "candidates dtype float64 is invalid: expected integer ad indices"),
        ([True], "candidates dtype bool is invalid"),
        ([500], r"candidates contain ad index 500: expected ids in \[0, 499\] or -1 \(no ad\)"),
        ([-2], r"candidates contain ad index -2"),
    ]
    for cand, match in cases:
        with pytest.raises(ValueError, match=match):
            single.score(cand)
        with pytest.raises(
            ValueError, match=match.replace("float64", "torch.float32").replace("bool", "torch.bool")
        ):
            vec.score(torch.tensor([cand, cand]))
    # -1 is "no ad": it scores -inf value and leaves the other candidates' values as they are
    both, alone = single.score([-1, 3]), single.score([3])
    assert both["value"][0] == -np.inf and both["value"][1] == alone["value"][0]
    assert torch.equal(vec.score(torch.tensor([[-1], [3]])).value.isinf(), torch.tensor([[True], [False]]))
    lax = AdsVectorEnv(num_envs=2, validate_actions=False)  # no host sync: only the dtype is checked
    lax.reset(seed=0)
    assert lax.score(torch.tensor([[500], [3]])).value[0, 0] == -np.inf
    with pytest.raises(ValueError, match="dtype"):
        lax.score(torch.tensor([[1.7], [3.0]]))


def test_reset_seeds_are_integers_ge_0_used_modulo_2_32():
    # reset(seed=2**70) used to raise OverflowError; the RNG's keys are 32-bit, so seeds are reduced
    single, vec = AdsEnv(), AdsVectorEnv(num_envs=3)
    for big, small in ((2**70 + 5, 5), (2**32 + 7, 7), (np.int64(9), 9)):
        a, _ = single.reset(seed=big)
        b, _ = single.reset(seed=small)
        assert all(np.array_equal(a[k], b[k]) for k in a), big
        a, _ = vec.reset(seed=big)
        b, _ = vec.reset(seed=small)
        assert all(torch.equal(a[k], b[k]) for k in a), big
    assert not np.array_equal(single.reset(seed=5)[0]["organic"], single.reset(seed=6)[0]["organic"])
    for env in (single, vec):
        with pytest.raises(
            ValueError, match=r"seed=-1 is invalid: expected an integer >= 0 \(.*modulo 2\*\*32\)"
        ):
            env.reset(seed=-1)
        for bad in (1.5, True, "3"):
            with pytest.raises(
                ValueError, match=rf"seed={bad!r} is invalid: expected None or an integer >= 0"
            ):
                env.reset(seed=bad)


# ----------------------------------------------------------------------------- the env owns its state

# Tight budgets and no outside competition: advertisers run dry within a few steps, so the market
# state (spend) matters to what happens next; delayed conversions make the pending queue matter too.
TIGHT = dict(
    budget_per_1k_requests=0.2, competitor_ecpm_mean=0.0, conversion_delay_mean=1.0, steps_per_day=12
)


def _actions(obs: dict, t: int, num_ads: int) -> torch.Tensor:
    return (obs["user_id"] * 13 + t * 7) % num_ads


def _play(env: AdsVectorEnv, obs: dict, t0: int, steps: int) -> list:
    """``steps`` steps of a deterministic policy: every observation, reward, flag and info tensor."""
    out = []
    for t in range(t0, t0 + steps):
        obs, reward, term, trunc, info = env.step(_actions(obs, t, env.config.num_ads))
        out.append((obs, reward, term, trunc, {k: v for k, v in info.items() if isinstance(v, torch.Tensor)}))
    return out


def test_state_dict_round_trip_resumes_bit_for_bit():
    import io

    a = AdsVectorEnv(num_envs=16, world_seed=3, **TIGHT)
    obs, _ = a.reset(seed=7)
    _play(a, obs, 0, 9)  # sessions ended and restarted, budgets partly spent
    saved = a.state_dict()
    buf = io.BytesIO()
    torch.save(saved, buf)  # as a checkpoint would hold it
    frozen = {k: tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone() for k, v in saved.items()}
    obs_a = a.observe()
    want = _play(a, obs_a, 9, 25)
    # a snapshot, not a view: stepping on did not change it
    for key, v in saved.items():
        for x, y in zip(
            v if isinstance(v, tuple) else (v,), frozen[key] if isinstance(v, tuple) else (frozen[key],)
        ):
            assert torch.equal(x, y), key

    b = AdsVectorEnv(num_envs=16, world_seed=3, **TIGHT)
    b.reset(seed=123)  # another seed: everything it set is overwritten by the load
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    obs_b = b.observe()
    for k in obs_a:
        assert torch.equal(obs_a[k], obs_b[k]), k
    got = _play(b, obs_b, 9, 25)
    for t, (x, y) in enumerate(zip(want, got)):
        for k in x[0]:
            assert torch.equal(x[0][k], y[0][k]), f"obs {k} at step {t}"
        assert torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) and torch.equal(x[3], y[3]), t
        for k in x[4]:
            assert torch.equal(x[4][k], y[4][k]), f"info {k} at step {t}"
    assert torch.equal(a.remaining_budget(), b.remaining_budget())
    assert any(bool(x[2].any() | x[3].any()) for x in got)  # the resumed run crossed session ends
    with pytest.raises(ValueError, match="4 sessions, this market 16"):
        b.load_state_dict(_sized_state(4))


def _sized_state(n: int) -> dict:
    env = AdsVectorEnv(num_envs=n)
    env.reset(seed=0)
    return env.state_dict()


def _reference_rehearse(market: BatchedMarket, rows: torch.Tensor):
    """``Roller._rehearse`` of agents/rollout.py as of 1cfeb21, written out: (state ahead, its observation)."""
    from gpr_sim.world import observe, transition

    state = market.state.select(rows)
    state = state._replace(seed=state.seed + 0x5EED_A44)  # rollout.REHEARSAL_SEED_OFFSET
    none = torch.full((rows.numel(), 1), -1, dtype=torch.int64, device=market.device)
    ahead, _, _ = transition(market.world, state, market.market, none)
    return ahead, observe(market.world, ahead)


def test_rehearse_equals_the_rollout_rehearsal_and_moves_nothing():
    env, twin = AdsVectorEnv(num_envs=12, **TIGHT), AdsVectorEnv(num_envs=12, **TIGHT)
    obs, _ = env.reset(seed=4)
    twin.reset(seed=4)
    _play(env, obs, 0, 5)
    _play(twin, twin.observe(), 0, 5)
    rows = torch.tensor([0, 3, 4, 11])
    before = env.state_dict()
    got = env.rehearse(rows)
    want_state, want_obs = _reference_rehearse(env.engine, rows)
    for name, x, y in zip(want_state._fields, got.state, want_state):
        assert torch.equal(x, y), name
    for k in want_obs:
        assert torch.equal(got.obs[k], want_obs[k]), k
    assert got.obs["user_id"].shape == (4,) and torch.equal(
        got.state.user_id, env.state.user_id[rows]
    )  # same user
    assert (got.state.feed_pos > env.state.feed_pos[rows]).all()  # one request ahead: organic items consumed
    # scoring the rehearsed requests is the core's scoring of that state
    cand = torch.arange(8).repeat(4, 1)
    torch.testing.assert_close(
        env.score(cand, truth=True, state=got.state).value,
        score(env.world, want_state, cand, truth=True).value,
        rtol=0,
        atol=0,
    )
    # nothing moved: same state as before, and the next real step equals the twin's
    after = env.state_dict()
    for key in before:
        for x, y in zip(*(v if isinstance(v, tuple) else (v,) for v in (before[key], after[key]))):
            assert torch.equal(x, y), key
    s, t = _play(env, env.observe(), 5, 3), _play(twin, twin.observe(), 5, 3)
    for x, y in zip(s, t):
        assert torch.equal(x[1], y[1]) and torch.equal(x[4]["click"], y[4]["click"])


def test_vector_env_reads_equal_the_core():
    env = AdsVectorEnv(num_envs=6, **TIGHT)
    with pytest.raises(RuntimeError, match="reset"):
        _ = env.state
    obs, _ = env.reset(seed=2)
    _play(env, obs, 0, 4)
    market = env.engine
    assert env.world is market.world and env.config is market.world.config and env.first_slot == 0
    assert torch.equal(env.state.user_id, market.state.user_id)
    torch.testing.assert_close(
        env.remaining_budget(), remaining_budget(market.world, market.market), rtol=0, atol=0
    )
    rows = torch.tensor([1, 5])
    cand = torch.tensor([[3, 9], [4, 400]])
    torch.testing.assert_close(
        env.score(cand, state=env.state.select(rows)).value,
        score(env.world, market.state.select(rows), cand).value,
        rtol=0,
        atol=0,
    )
    full = env.score(torch.tensor([[3, 9]] * 6)).value
    torch.testing.assert_close(
        env.score(cand[:1], state=env.state.select(rows[:1])).value, full[1:2], rtol=0, atol=0
    )


def test_shard_arguments_reach_the_market():
    env = AdsVectorEnv(num_envs=4, market_envs=8, first_slot=4)
    obs, _ = env.reset(seed=0)
    assert env.first_slot == 4 and env.engine.market_envs == 8
    assert torch.equal(env.state.slot, torch.arange(4, 8))
    # rows 4..7 of one market of 8 sessions draw the same users as the full market's rows 4..7
    full = AdsVectorEnv(num_envs=8)
    full_obs, _ = full.reset(seed=0)
    assert torch.equal(obs["user_id"], full_obs["user_id"][4:])


# ----------------------------------------------------------------------------- the one vector-env factory


def test_make_vec_env_is_the_vector_env_and_names_unknown_ids():
    env = make_vec_env(
        "ads-v0", 5, config=WorldConfig.small(num_candidates=2), world_seed=1, validate_actions=False
    )
    ref = AdsVectorEnv(
        num_envs=5, config=WorldConfig.small(num_candidates=2), world_seed=1, validate_actions=False
    )
    assert isinstance(env, AdsVectorEnv) and env.num_envs == 5 and not env.validate_actions
    a, _ = env.reset(seed=3)
    b, _ = ref.reset(seed=3)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (
        make_vec_env("ads-v0", 2, preset="small", num_ads=50).config.num_ads == 50
    )  # WorldConfig fields pass
    assert ads_env_ids() == ["ads-v0"]
    with pytest.raises(
        ValueError, match=r"env_id='ads-v9' is not a registered ads env: expected one of \['ads-v0'\]"
    ):
        make_vec_env("ads-v9", 2)
    with pytest.raises(ValueError, match=r"env_id='CartPole-v1' is not a registered ads env"):
        make_vec_env("CartPole-v1", 2)  # registered, but not an ads env
