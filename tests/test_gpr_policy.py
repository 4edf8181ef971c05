"""The pre-trained GPR generator as an ``agents.evaluate`` policy (``gpr:RUN_DIR``)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from agents import pretrain
from agents.evaluate import Args, main
from agents.evaluation.compare import agent_dir
from agents.policies import make_policy
from agents.policies.gpr import GPRPolicy, load_run_model, save_policy
from envs import make_vec_env
from gpr_sim.runs import file_digest
from tests.helpers import TINY_PRETRAIN

TINY_EVAL = dict(num_envs=8, sessions=8, plots=False, threads=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("gpr_run")
    pretrain.main(["--out", str(out), *TINY_PRETRAIN])
    return out


def _env(num_envs: int = 8):
    return make_vec_env(
        "ads-v0", num_envs, preset="small", world_seed=0, device="cpu", validate_actions=False
    )


def test_evaluate_runs_gpr_and_is_deterministic(run_dir, tmp_path):
    spec = f"gpr:{run_dir}"
    summary = main(Args(agents=f"random,{spec}", out=str(tmp_path / "a"), **TINY_EVAL))
    row = summary.set_index("agent").loc[spec]
    # CTR / eCPM are NaN when an (barely trained) agent wins no impression; these are always defined
    for key in (
        "eval/sessions",
        "eval/session_length",
        "eval/revenue_per_session",
        "eval/reward_per_session",
        "eval/impressions_per_session",
    ):
        assert math.isfinite(float(row[key])), key
    again = main(Args(agents=f"random,{spec}", out=str(tmp_path / "b"), **TINY_EVAL))
    assert summary.equals(again)


def test_actions_are_eligible_ads(run_dir):
    env = _env()
    policy = GPRPolicy(env, run_dir, beam_width=2)  # raised to num_candidates
    market = policy.env
    k = market.world.config.num_candidates
    assert policy.beam_width >= k
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        out = policy.act(obs)
        eligible = market.eligible_ads()
        assert out.action.shape == (8, k) and out.action.dtype == torch.int64
        assert ((out.action >= 0) & (out.action < market.world.config.num_ads)).all()
        if eligible.any():
            assert eligible[out.action].all()
        assert torch.equal(out.propensity, torch.ones(8, dtype=torch.float64))
        obs, *_ = env.step(out.action)


def test_a_bf16_policy_serves_eligible_ads_under_autocast(run_dir):
    """``precision="bf16"`` (``gpr:RUN@precision=bf16``): the model's forwards run under autocast and the served
    ads are eligible, as in fp32; its beams' scores round to bf16, so it may rank near-ties otherwise and is
    compared only with agents served at the same precision (no agreement rate is asserted); a bad precision is
    one clear error."""
    env = _env()
    policy = make_policy(f"gpr:{run_dir}@precision=bf16", env, seed=0, beam_width=4)
    assert isinstance(policy, GPRPolicy) and policy.precision == "bf16"
    under: list[bool] = []
    policy.model.hsd.register_forward_pre_hook(lambda m, a: under.append(torch.is_autocast_enabled("cpu")))
    market = policy.env
    obs, _ = env.reset(seed=0)
    for _ in range(2):
        out = policy.act(obs)
        eligible = market.eligible_ads()
        assert ((out.action >= 0) & (out.action < market.world.config.num_ads)).all()
        if eligible.any():
            assert eligible[out.action].all()
        obs, *_ = env.step(out.action)
    assert under == [True, True]
    assert not torch.is_autocast_enabled("cpu")  # the autocast ends with the call
    with pytest.raises(ValueError, match="precision='half' is invalid"):
        GPRPolicy(env, run_dir, precision="half")


def test_bad_run_dir_raises(run_dir, tmp_path):
    env = _env(2)
    with pytest.raises(ValueError, match="nowhere"):
        GPRPolicy(env, tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"checkpoint\.pt"):
        GPRPolicy(env, bad)
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    shutil.copy(run_dir / "checkpoint.pt", no_tok / "checkpoint.pt")
    with pytest.raises(ValueError, match="tokenizer"):
        GPRPolicy(env, no_tok)


def test_gpr_spec_without_checkpoint_fails_at_argument_check(tmp_path):
    with pytest.raises(ValueError, match=r"policy 'gpr:.*checkpoint\.pt"):
        Args(agents=f"random,gpr:{tmp_path / 'missing'}")


def test_registry_builds_gpr_with_its_options(run_dir):
    env = _env(4)
    policy = make_policy(f"gpr:{run_dir}", env, seed=3, beam_width=5)
    assert isinstance(policy, GPRPolicy) and policy.beam_width == 5 and policy.env is env.unwrapped
    obs, _ = env.reset(seed=0)
    torch.testing.assert_close(
        policy.act(obs).action, GPRPolicy(env, run_dir, beam_width=5, seed=3).act(obs).action
    )
    with pytest.raises(
        ValueError,
        match=r"takes no option \['temperature'\]: its options are \['beam_width', 'rank', 'precision'\]",
    ):
        make_policy(f"gpr:{run_dir}", env, temperature=0.3)


def test_evaluate_cache_is_keyed_by_the_policy_files_content(run_dir, tmp_path, capsys):
    """``gpr:RUN`` sessions are reused while ``policy.pt`` holds the same bytes, simulated again once it changes
    (the same path, retrained), not reused because the ``gpr:PATH`` string is the same."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    model, _ = load_run_model(run)
    save_policy(run / "policy.pt", model)
    spec, out = f"gpr:{run}", tmp_path / "eval"
    main(Args(agents=spec, out=str(out), **TINY_EVAL))
    record = agent_dir(out, spec) / "summary.json"
    first = json.loads(record.read_text())["config"]["inputs"]
    assert first["policy.pt"] == file_digest(run / "policy.pt") and set(first) == {
        "policy.pt",
        "semantic_ids.pt",
    }
    capsys.readouterr()
    main(Args(agents=spec, out=str(out), **TINY_EVAL))
    assert f"{spec}: same config already evaluated" in capsys.readouterr().out
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    save_policy(run / "policy.pt", model)
    main(Args(agents=spec, out=str(out), **TINY_EVAL))
    assert "already evaluated" not in capsys.readouterr().out
    again = json.loads(record.read_text())["config"]["inputs"]
    assert again["policy.pt"] == file_digest(run / "policy.pt") != first["policy.pt"]
    assert again["semantic_ids.pt"] == first["semantic_ids.pt"]
