"""benchmarks/reevaluate.py: the per-label table from agents.evaluate summaries (seed spread, paired change,
ratio to the cascade) and its input checks."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from gpr_sim.stats import critical_value

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "reevaluate.py"
_spec = importlib.util.spec_from_file_location("reevaluate", _PATH)
reeval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reeval)


def _run(root: Path, algo: str, seed: int) -> Path:
    run = root / f"{algo}{seed}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"algo": algo, "seed": seed}))
    (run / "metrics.jsonl").write_text("")  # what check_runs looks for
    return run


def _row(reward: float, half: float = 0.1) -> dict:
    row = {}
    for m in reeval.TABLE4:  # every metric = reward, so each column checks the same arithmetic
        row.update(
            {f"eval/{m}": reward, f"eval/{m}_ci_low": reward - half, f"eval/{m}_ci_high": reward + half}
        )
    return row


def test_tabulate_seed_means_paired_change_and_cascade_ratio(tmp_path):
    runs = {(a, s): _run(tmp_path, a, s) for a in ("ppo", "hepo") for s in (0, 1)}
    values = {("ppo", 0): 1.0, ("ppo", 1): 2.0, ("hepo", 0): 1.5, ("hepo", 1): 2.0}
    rows = {f"gpr:{runs[k]}": _row(v) for k, v in values.items()}
    rows["cascade-privileged"] = _row(
        1.25, half=0.0
    )  # an exact reference: the ratio interval is the seeds' alone
    groups = reeval.group_runs(list(runs.values()))
    table = {r["label"]: r for r in reeval.tabulate(groups, rows, ref="ppo", level=0.95)}
    t1 = critical_value(0.95, 1)  # 12.706205: two seeds
    h = table["hepo"]
    assert h["n"] == 2 and h["reward_per_session"] == pytest.approx(1.75)
    assert h["reward_per_session_ci_high"] - 1.75 == pytest.approx(
        t1 * 0.25
    )  # values 1.5, 2.0: half t * 0.25
    assert h["reward_per_session_session_half"] == pytest.approx(0.1)
    # paired by seed: 1.5 / 1.0 - 1 = 0.5 and 2.0 / 2.0 - 1 = 0: mean 0.25, half t * 0.25
    assert h["reward_per_session_vs_ref"] == pytest.approx(0.25)
    assert h["reward_per_session_vs_ref_ci_high"] - 0.25 == pytest.approx(t1 * 0.25)
    assert "reward_per_session_vs_ref" not in table["ppo"]
    # vs cascade: 1.75 / 1.25 - 1 = 0.4, exact reference -> t_{1} * sd(x) / sqrt(2) / 1.25
    assert h["reward_per_session_vs_cascade-privileged"] == pytest.approx(0.4)
    assert h["reward_per_session_vs_cascade-privileged_ci_high"] - 0.4 == pytest.approx(
        t1 * 0.25 / 1.25, rel=1e-9
    )
    md = reeval.to_markdown(
        list(table.values()), "ppo", reeval.argparse.Namespace(sessions=64, seed=1, num_envs=8, level=0.95)
    )
    assert "| hepo | 2 | 1.75 [" in md and "+25.0%" in md and "+40.0%" in md
    assert math.isfinite(table["ppo"]["reward_per_session_vs_cascade-privileged_ci_low"])


def test_runs_without_a_policy_fail_before_any_evaluation(tmp_path):
    run = _run(tmp_path, "hepo", 0)
    with pytest.raises(SystemExit, match="no policy.pt"):
        reeval.main([str(run), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_the_cascade_is_evaluated_at_the_tables_level(tmp_path, monkeypatch):
    # the cascade's CI enters the vs-cascade interval read at --level, so agents.evaluate must use that level
    cmds = []

    class Failed:
        def __init__(self, cmd, **_):
            cmds.append(cmd)

        def wait(self):
            return 1

    monkeypatch.setattr(reeval.subprocess, "Popen", Failed)
    args = reeval.argparse.Namespace(jobs=1, num_envs=8, sessions=16, seed=1, preset="small", level=0.9)
    with pytest.raises(SystemExit, match="agents.evaluate failed"):
        reeval.run_evaluations(["cascade-privileged"], args, tmp_path)
    assert cmds[0][cmds[0].index("--level") + 1] == "0.9"
