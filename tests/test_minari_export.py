"""Minari export of a collected log: episodes, observations (T + 1), actions, rewards, flags, recovery."""

import numpy as np
import pytest
import torch

minari = pytest.importorskip("minari")

import envs  # noqa: E402, F401  (registers ads-v0 for the dataset's spaces and env spec)
from agents.collection import collect  # noqa: E402
from agents.policies import make_policy  # noqa: E402
from envs import make_vec_env  # noqa: E402
from gpr_sim.data.logs import read_logs, stack_list_column, write_logs  # noqa: E402
from gpr_sim.data.minari_export import export_minari  # noqa: E402
from gpr_sim.world import WorldConfig  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # minari asks for author / permalink


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("minari")
    cfg = WorldConfig.small(max_steps=8)  # short sessions: several end inside 12 steps
    env = make_vec_env("ads-v0", 6, config=cfg, world_seed=0, device="cpu")
    columns, _ = collect(
        env, make_policy("cascade-privileged", env, seed=0), seed=0, steps=12, progress=False
    )
    meta = {"env": "ads-v0", "world_seed": 0, "num_envs": 6, "steps": 12, "temperature": 0.3}
    path = write_logs(
        columns, root / "log.parquet", world_config=cfg, seed=0, policy="cascade-privileged", extra=meta
    )
    ds = export_minari(path, "ads/cascade-test-v0", datasets_path=root / "datasets")
    df, _ = read_logs(path)
    return ds, df.sort_values(["episode_id", "step"]).reset_index(drop=True), cfg


def test_episode_and_step_counts(exported):
    ds, df, _ = exported
    assert ds.total_steps == len(df) == 72
    assert ds.total_episodes == df["episode_id"].nunique()
    assert ds.total_episodes > 6  # some slots started a second session


def test_episodes_match_the_log(exported):
    ds, df, _ = exported
    for ep, (_, rows) in zip(ds.iterate_episodes(), df.groupby("episode_id", sort=True)):
        t = len(rows)
        assert ep.observations["organic"].shape == (t + 1, 16)
        np.testing.assert_array_equal(ep.observations["organic"][:-1], stack_list_column(rows, "organic_ids"))
        np.testing.assert_array_equal(ep.observations["ad_events"][-1], rows["final_ad_events"].iat[-1])
        np.testing.assert_array_equal(ep.observations["context"][-1], rows["final_context"].iat[-1])
        np.testing.assert_array_equal(ep.observations["user_id"], np.full(t + 1, rows["user_id"].iat[0]))
        np.testing.assert_array_equal(ep.actions, rows["action"].to_numpy())
        np.testing.assert_allclose(ep.rewards, rows["reward"].to_numpy(), rtol=0, atol=0)
        np.testing.assert_array_equal(ep.terminations, rows["terminated"].to_numpy())
        # the last step ends the episode: terminated, truncated, or cut short by the collection
        assert ep.terminations[-1] or ep.truncations[-1]
        assert not (ep.terminations[:-1] | ep.truncations[:-1]).any()
        np.testing.assert_allclose(ep.infos["propensity"][1:], rows["propensity"].to_numpy())
        assert np.isnan(ep.infos["propensity"][0]) and ep.infos["request_id"][0] == -1


def test_environment_recovers_the_logged_market(exported):
    ds, _, cfg = exported
    env = ds.recover_environment()
    assert env.unwrapped.config == cfg
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
