"""``agents.hepo --auction``: the training market, the held-out evaluation and the oracle_share states run their
auction on the same learned funnel that rewards; config, summary, resume and the reports keep it apart."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import agents.hepo as hepo
from agents.evaluation.auction import auction_funnel_file
from agents.evaluation.heldout import HeldOutConfig
from agents.pretraining.pipeline import FUNNEL_FILE
from agents.reporting.folders import check_protocol, check_runs, run_auction
from agents.rl import config as rl_config
from agents.rl import trainer
from gpr_sim.platform.funnel import load_funnel, save_funnel
from gpr_sim.runs import file_digest, read_json, read_metrics
from tests.helpers import torchrun
from tests.test_hepo import pre, tiny  # noqa: F401  (pre: the module's tiny MTP + VAFT stages)


def test_auction_needs_the_learned_reward_in_one_line():
    for reward in ("privileged", "truth"):
        with pytest.raises(ValueError, match=r"auction=True needs reward='learned'") as e:
            hepo.main(["--auction", "--reward", reward, "--no-progress"])
        assert "\n" not in str(e.value) and repr(reward) in str(e.value)
    with pytest.raises(ValueError, match=r"auction=1 is invalid: expected a bool"):
        hepo.Args(auction=1)
    assert hepo.Args().auction is False  # the default stays the privileged auction
    assert hepo.Args(auction=True).reward == "learned"


def test_held_out_config_carries_the_auction_to_the_oracle_share_states(tmp_path):
    funnel = tmp_path / FUNNEL_FILE
    funnel.write_bytes(b"")  # a file: auction_funnel_file names it as it is (read only when attached)
    assert rl_config.held_out(hepo.Args(), funnel).auction == ""  # without --auction the funnel is not used
    cfg = rl_config.held_out(hepo.Args(auction=True), funnel)
    assert cfg.auction == str(funnel) and cfg.oracle_share.auction == str(funnel)
    assert auction_funnel_file(cfg.auction) == funnel
    with pytest.raises(ValueError, match="needs the learned funnel file"):
        rl_config.held_out(hepo.Args(auction=True))
    with pytest.raises(ValueError, match="not a platform folder"):
        HeldOutConfig(auction=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="auction=3 is invalid"):
        HeldOutConfig(auction=3)


def _spy(monkeypatch) -> dict:
    """Record the training env and the evaluator ``agents.hepo`` builds."""
    seen = {}
    make_env, evaluator = trainer.make_train_env, trainer.Evaluator

    def make_train_env(*a, **k):
        seen["train"] = make_env(*a, **k)
        return seen["train"]

    def build_evaluator(*a, **k):
        seen["eval"] = evaluator(*a, **k)
        return seen["eval"]

    monkeypatch.setattr(trainer, "make_train_env", make_train_env)
    monkeypatch.setattr(trainer, "Evaluator", build_evaluator)
    return seen


def test_auction_run_ranks_every_market_on_the_reward_funnel(pre, tmp_path, monkeypatch):  # noqa: F811
    root = tmp_path / "pre"  # a copy: this test refits its funnel below
    shutil.copytree(pre, root)
    funnel = root / "funnel" / FUNNEL_FILE
    seen = _spy(monkeypatch)
    learned, privileged = tmp_path / "learned", tmp_path / "privileged"
    summary = hepo.main(tiny(root, learned, "--iterations", "1", "--auction"))
    train, ev = seen["train"].unwrapped.engine, seen["eval"]
    # one model object ranks and rewards (the market evaluates it once per score); the held-out market and the
    # oracle_share states rank on a model read from the same file
    assert train.auction_estimator == "learned" and train.auction_model is train.platform
    for market in (ev.env.unwrapped.engine, ev.states.env.unwrapped.engine):
        assert market.auction_estimator == "learned" and market.estimator == "privileged"
        for a, b in zip(market.auction_model.state_dict().values(), train.platform.state_dict().values()):
            torch.testing.assert_close(a, b)
    record = {"estimator": "learned", "funnel": str(funnel), "sha256": file_digest(funnel)}
    assert read_json(learned / "config.json")["auction"] == record and summary["auction"] == record
    assert read_json(learned / "config.json")["args"]["auction"] is True

    hepo.main(tiny(root, privileged, "--iterations", "1"))
    assert seen["train"].unwrapped.auction_estimator == "privileged"
    assert seen["train"].unwrapped.estimator == "learned"  # still rewarded through the learned funnel
    assert seen["eval"].env.unwrapped.auction_estimator == "privileged"
    assert read_json(privileged / "config.json")["auction"] == {"estimator": "privileged"}
    # same seed, same generator, other auction: the rollout and every evaluation see other prices and winners
    a, b = read_metrics(learned / "metrics.jsonl"), read_metrics(privileged / "metrics.jsonl")
    for key in ("eval/oracle_value", "eval/cand_mean_value"):
        assert math.isfinite(a[0][key]) and a[0][key] != b[0][key], key
    assert a[1]["rollout/group_value_mean"] != b[1]["rollout/group_value_mean"]

    # the reports keep the two auctions apart
    assert run_auction(learned) == "learned" and run_auction(privileged) == "privileged"
    with pytest.raises(
        ValueError, match=r"runs of different auctions are not comparable \(learned: .*learned; "
    ):
        check_runs([learned, privileged])
    baseline = {
        "env": "ads-v0",
        "preset": "small",
        "world_seed": 0,
        "num_envs": 8,
        "sessions": 8,
        "seed": 12345,
    }
    with pytest.warns(UserWarning, match=r"auction privileged \(runs: learned\)"):
        check_protocol([learned], baseline, tmp_path / "base")

    # resume: only with --auction, and only on the funnel the run started on
    with pytest.raises(ValueError, match=r"other settings \(--auction was true, now false\)"):
        hepo.main(tiny(root, learned, "--iterations", "2"))
    model = load_funnel(funnel)
    with torch.no_grad():
        next(model.parameters()).add_(0.1)
    save_funnel(model, funnel)  # the pipeline's funnel refitted since
    with pytest.raises(ValueError, match=r"started with the auction on funnel .*: pass another --out"):
        hepo.main(tiny(root, learned, "--iterations", "2", "--auction"))


@pytest.mark.slow
def test_two_gloo_processes_attach_the_auction_like_one(pre, tmp_path):  # noqa: F811
    """Both ranks rank their shard's auction on the funnel: 2 x 8 sessions == 1 x 16, metric by metric."""
    extra = ["--num-envs", "16", "--minibatch", "8", "--iterations", "1", "--auction"]
    one, two = tmp_path / "one", tmp_path / "two"
    hepo.main(tiny(pre, one, *extra))
    torchrun("agents.hepo", tiny(pre, two, *extra))
    assert json.loads((two / "config.json").read_text())["auction"]["estimator"] == "learned"
    for ra, rb in zip(read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl"), strict=True):
        for key, v in ra.items():
            if isinstance(v, (int, float)) and not key.startswith("perf/"):
                assert rb[key] == pytest.approx(v, rel=1e-4, abs=1e-5, nan_ok=True), (ra["iteration"], key)
