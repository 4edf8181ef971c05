"""The Gymnasium contract of ads-v0: checkers, spaces, parity single vs vector, bad input."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers ads-v0)
from envs import AdsEnv, AdsVectorEnv


@pytest.mark.parametrize("overrides", [{}, {"num_candidates": 5, "num_slots": 2, "conversion_delay_mean": 2.0}])
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
    for key in ("impression", "click", "conversion", "gmv", "revenue", "p_click", "p_conversion", "ecpm",
                "ad_id", "advertiser_id"):
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
            np.testing.assert_array_equal(np.asarray(s_obs[k]), v_obs[k][0].numpy(), err_msg=f"obs {k} at {t}")
        a = _policy(np.asarray(s_obs["user_id"]), t, n_ads)
        s_obs, s_r, s_term, s_trunc, s_info = single.step(int(a))
        v_obs, v_r, v_term, v_trunc, v_info = vec.step(torch.as_tensor(a).reshape(1))
        assert s_r == pytest.approx(float(v_r[0]), abs=0) and s_term == bool(v_term[0]) and s_trunc == bool(v_trunc[0])
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
