"""benchmarks/side_by_side_table.py: the tables of GPU calls that ran learners side by side, one seed per call."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from agents.reporting.keys import GRADIENTS

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "side_by_side_table.py"
_spec = importlib.util.spec_from_file_location("side_by_side_table", _PATH)
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)

RUNS = {"hepo": [0.80, 0.90, 0.70], "ppo": [0.80, 0.85, 0.86]}
"""per run, its evaluations' reward per session at iterations 0, 4, 8 (HEPO peaks at 4, PPO at 8)"""


def _call(root: Path, seed: int, final: dict[str, float], eval_seed: int = 54321) -> Path:
    """One unpacked call: a HEPO and a PPO run of ``seed`` and a final evaluation whose every metric of agent
    NAME is ``final[NAME]`` (the VAFT start, both runs' best, the learned cascade), paired against HEPO."""
    folder = root / f"seed{seed}"
    for name, rewards in RUNS.items():
        run = folder / name
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"algo": name, "seed": seed, "args": {"seed": seed}}))
        rows = []
        for i, reward in enumerate(rewards):
            rows.append(
                {"iteration": 4 * i, "eval/reward_per_session": reward + seed, "eval/oracle_share": i / 10}
            )
            grads = (
                dict(zip(GRADIENTS, (0.5, 4.0 + i, 1.0))) if seed == 1 else {}
            )  # seed 0: from before they were logged
            rows.append({"iteration": 4 * i + 1, "train/loss": 0.1, **grads})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = {
        "vaft": "gpr:/tmp/L/pre/vaft@beam_width=8",
        "hepo": "gpr:/tmp/L/hepo/best@beam_width=8",
        "ppo": "gpr:/tmp/L/ppo/best@beam_width=8",
        "learned-cascade": "learned-cascade:/tmp/L/pre/platform",
    }
    (folder / "final").mkdir()
    summary = [{"agent": specs[n], **{m: v for m in table.FINAL_METRICS}} for n, v in final.items()]
    pd.DataFrame(summary).to_csv(folder / "final" / "summary.csv", index=False)
    paired = [
        {
            "agent": specs[n],
            "reference": specs["hepo"],
            "metric": m,
            "pairs": 100,
            "difference": v - final["hepo"],
            "ci_low": v - final["hepo"] - 0.01,
            "ci_high": v - final["hepo"] + 0.01,
            "std_err": 0.01 * (1 + seed),
            "reference_value": final["hepo"],
        }
        for n, v in final.items()
        if n != "hepo"
        for m in table.PAIRED_METRICS
    ]
    pd.DataFrame(paired).to_csv(folder / "final" / "paired.csv", index=False)
    (folder / "final" / "config.json").write_text(json.dumps({"seed": eval_seed}))
    return folder


def test_tables_over_calls(tmp_path):
    a = _call(tmp_path, 0, {"vaft": 0.5, "hepo": 0.6, "ppo": 0.7, "learned-cascade": 0.4})
    b = _call(tmp_path, 1, {"vaft": 0.5, "hepo": 0.8, "ppo": 0.7, "learned-cascade": 0.6})
    out = tmp_path / "t"
    res = table.main([str(a), str(b), "--out", str(out)])
    runs = pd.DataFrame(res["runs"]).set_index(["seed", "run"])
    assert runs.loc[(1, "hepo"), "best_iteration"] == 4 and runs.loc[(1, "ppo"), "best_iteration"] == 8
    assert runs.loc[(0, "hepo"), "iterations"] == 9  # the last logged iteration, not the last evaluation
    assert runs.loc[(0, "hepo"), "best_value"] == pytest.approx(0.9)
    assert runs.loc[(1, "ppo"), "grad_norm_critic"] == pytest.approx(5.0)  # the mean over the run's updates
    assert math.isnan(runs.loc[(0, "ppo"), "grad_norm_policy"])
    paired = pd.DataFrame(res["paired"])
    assert set(paired["agent"]) == {"vaft", "ppo", "learned-cascade"}
    row = paired[(paired["seed"] == 1) & (paired["agent"] == "ppo") & (paired["metric"] == "oracle_share")]
    assert row["difference"].item() == pytest.approx(-0.1)
    pooled = pd.DataFrame(res["pooled"]).set_index(["agent", "metric"])
    # PPO - HEPO: +0.1 and -0.1 -> 0; standard errors 0.01 and 0.02 -> sqrt(0.0005) / 2 over both seeds' sessions
    row = pooled.loc[("ppo", "reward_per_session")]
    assert (row["seeds"], row["pairs"], row["difference"]) == (2, 200, pytest.approx(0.0, abs=1e-12))
    se = math.sqrt(0.01**2 + 0.02**2) / 2
    assert row["ci_high"] == pytest.approx(1.959964 * se, rel=1e-6)
    assert row["half_width_pct"] == pytest.approx(100 * 1.959964 * se / 0.7, rel=1e-6)  # HEPO's mean 0.6, 0.8
    over = pd.DataFrame(res["over_seeds"]).set_index("agent")
    # PPO - HEPO per seed: +0.1, -0.1 -> mean 0 with a t interval over the two seeds
    assert over.loc["ppo", "delta_reward_per_session"] == pytest.approx(0.0, abs=1e-12)
    assert over.loc["ppo", "delta_reward_per_session_ci_high"] == pytest.approx(12.706 * 0.1, rel=1e-3)
    assert math.isnan(over.loc["hepo", "delta_reward_per_session"])
    assert over.loc["learned-cascade", "reward_per_session"] == pytest.approx(0.5)
    text = out.with_suffix(".md").read_text()
    assert text.count("| 1 | ppo |") == 2  # in the runs and the per-seed table
    assert "| 0.000 | 0.100 | 0.200 | n/a | n/a | n/a |" in text and "| 0.50 | 5.00 | 1.00 |" in text
    assert "| ppo | 2 | 200 |" in text  # the pooled table
    assert json.loads(out.with_suffix(".json").read_text())["reference"] == "hepo"


def test_bad_folders_and_reference_fail_clearly(tmp_path):
    a = _call(tmp_path / "x", 0, {"vaft": 0.5, "hepo": 0.6, "ppo": 0.7, "learned-cascade": 0.4})
    b = _call(tmp_path / "y", 0, {"vaft": 0.5, "hepo": 0.6, "ppo": 0.7, "learned-cascade": 0.4})
    with pytest.raises(SystemExit, match="two folders of one seed"):
        table.main([str(a), str(b)])
    with pytest.raises(ValueError, match="not --reference 'ppo'"):
        table.main([str(a), "--reference", "ppo"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no run folder"):
        table.main([str(tmp_path / "empty")])
    c = _call(tmp_path / "z", 1, {"vaft": 0.5, "hepo": 0.6, "ppo": 0.7, "learned-cascade": 0.4}, eval_seed=7)
    with pytest.raises(ValueError, match=r"reset seeds \[7, 54321\]"):
        table.main([str(a), str(c)])
    assert table.agent_name("gpr:runs/x/grpo/best") == "grpo" and table.agent_name("random") == "random"
    assert table.agent_name("gpr:/w/pre/mtp@beam_width=8") == "mtp"
    assert table.agent_name("gpr:/w/pre/vaft") == "vaft"
