"""Which token layout a run reads: new pre-training runs carry platform features, a checkpoint written before
them still runs with the layout it was trained on, and a config that claims the wrong one is refused."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from agents import pretrain
from agents.policies.gpr import POLICY_FORMAT, POLICY_VERSION, GPRPolicy, load_run_model
from envs import make_vec_env
from gpr_sim.model import GPRModel
from gpr_sim.runs import save_torch
from gpr_sim.schema import dense_dim, tokens_from_obs
from gpr_sim.world import WorldConfig
from tests.helpers import TINY_PRETRAIN

SMALL = WorldConfig.small()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny pre-training runs of the same log: the default (platform and market features) and the layout
    before them (--no-platform-features --no-market-features)."""
    torch.set_num_threads(1)
    on = tmp_path_factory.mktemp("features_on")
    pretrain.main(["--out", str(on), *TINY_PRETRAIN])
    off = tmp_path_factory.mktemp("features_off")
    shared = ["--logs", str(on / "logs.parquet"), "--tokenizer", str(on / "tokenizer")]
    old_layout = ["--no-platform-features", "--no-market-features"]
    pretrain.main(["--out", str(off), *old_layout, *shared, *TINY_PRETRAIN])
    return on, off


def _env(num_envs: int = 4):
    return make_vec_env(
        "ads-v0", num_envs, preset="small", world_seed=0, device="cpu", validate_actions=False
    )


def _acts(policy: GPRPolicy, env) -> torch.Tensor:
    obs, _ = env.reset(seed=0)
    out = policy.act(obs)
    eligible = policy.env.eligible_ads()
    assert ((out.action >= 0) & (out.action < SMALL.num_ads)).all()
    if eligible.any():
        assert eligible[out.action].all()
    return out.action


def test_new_runs_default_to_platform_features_and_the_flag_turns_them_off(runs):
    on, off = runs
    model_on, _ = load_run_model(on)
    model_off, _ = load_run_model(off)
    assert model_on.cfg.platform_features and model_on.cfg.market_features
    assert model_on.cfg.dense_dim == dense_dim(SMALL, True, market_features=True) == 37 + 4
    assert not model_off.cfg.platform_features and not model_off.cfg.market_features
    assert model_off.cfg.dense_dim == dense_dim(SMALL, False) == 15
    env = _env()
    for run, has in ((on, True), (off, False)):
        policy = GPRPolicy(env, run)
        assert (policy.features is not None) == has
        _acts(policy, env)


def _write_policy(run, config: dict, model: GPRModel) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch(run / "policy.pt", POLICY_FORMAT, POLICY_VERSION, {"config": config, "model": state})


def test_a_checkpoint_from_before_platform_features_runs_with_the_old_layout(runs, tmp_path):
    _, off = runs
    old = tmp_path / "old"
    shutil.copytree(off, old)
    model, tok = load_run_model(off)
    config = model.cfg.to_dict()
    del config["platform_features"], config["market_features"]  # what a checkpoint written before them holds
    _write_policy(old, config, model)
    loaded, _ = load_run_model(old)
    assert loaded.cfg == model.cfg and not loaded.cfg.platform_features
    env = _env()
    policy = GPRPolicy(env, old)
    assert policy.features is None
    assert torch.equal(_acts(policy, env), _acts(GPRPolicy(env, off), env))  # the same model, the same layout
    obs, _ = env.reset(seed=0)
    assert tokens_from_obs(obs, tok.table).dense_features.shape[-1] == 15


def test_a_config_that_claims_the_other_layout_is_refused(runs, tmp_path):
    _, off = runs
    bad = tmp_path / "bad"
    shutil.copytree(off, bad)
    model, _ = load_run_model(off)
    lying = dataclasses.replace(model.cfg, platform_features=True)  # weights of a 15-column model
    _write_policy(bad, lying.to_dict(), GPRModel(lying))
    with pytest.raises(ValueError, match="bad: model dense_dim=15, but this world's token layout with"):
        GPRPolicy(_env(), bad)
