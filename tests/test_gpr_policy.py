"""The pre-trained GPR generator as an ``agents.evaluate`` policy (``gpr:RUN_DIR``)."""

from __future__ import annotations

import json
import math
import shutil

import gymnasium
import pytest
import torch

import envs  # noqa: F401  (registers ads-v0)
from agents import pretrain
from agents.evaluate import Args, agent_dir, main
from agents.gpr_policy import GPRPolicy, load_run_model, save_policy
from gpr_sim.runs import file_digest

TINY_PRETRAIN = ["--collect-envs", "16", "--collect-steps", "20", "--d-model", "16", "--n-layers", "1",
                 "--batch-size", "32", "--steps", "3", "--eval-every", "3", "--checkpoint-every", "3",
                 "--eval-requests", "16", "--threads", "1", "--no-progress"]  # fmt: skip
TINY_EVAL = dict(num_envs=8, sessions=8, plots=False, threads=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("gpr_run")
    pretrain.main(["--out", str(out), *TINY_PRETRAIN])
    return out


def _env(num_envs: int = 8):
    return gymnasium.make_vec("ads-v0", num_envs=num_envs, vectorization_mode="vector_entry_point", preset="small",
                              world_seed=0, device="cpu", validate_actions=False)  # fmt: skip


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
    market = policy.market
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
    with pytest.raises(ValueError, match=r"unknown agent 'gpr:.*checkpoint\.pt"):
        Args(agents=f"random,gpr:{tmp_path / 'missing'}")


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
    assert first["policy.pt"] == file_digest(run / "policy.pt") and set(first) == {"policy.pt", "semantic_ids.pt"}
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
