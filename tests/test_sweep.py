"""agents.sweep: the grid on a tiny config (folders, tables, skip on rerun, the final seed), selection and the
comparison table on hand-built numbers, and the one-line errors of bad flags."""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import replace

import pandas as pd
import pytest

from agents import sweep
from agents.cli import run_main
from agents.reporting.sweep import comparison_table, select_lr
from agents.rl import sweep as rl_sweep
from gpr_sim.runs import read_json

TINY_HEPO = (
    "--mtp-steps 3 --vaft-steps 3 --d-model 16 --n-layers 1 --pretrain-batch 32 --collect-envs 16 "
    "--collect-steps 20 --num-envs 8 --rollout-steps 2 --group-size 4 --minibatch 8 --eval-every 1 "
    "--eval-sessions 8 --eval-envs 8 --eval-candidates 4 --eval-beam 2 --eval-states 16 --checkpoint-every 1 "
    "--critic-warmup 1 --funnel-envs 32 --funnel-steps 50 --threads 1 --no-progress"
).split()
"""``agents.hepo`` flags of a seconds-long run, pre-training included (``tests/test_hepo.py``'s ``tiny``)"""
ALGOS, LRS = ("hepo", "dpo"), (1e-4, 3e-4)


def argv(out, *extra, iterations: int = 1) -> list[str]:
    grid = ["--algos", ",".join(ALGOS), "--lrs", ",".join(map(str, LRS)), "--seeds", "0", "--out", str(out)]
    return [*grid, *extra, "--", *TINY_HEPO, "--iterations", str(iterations)]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return out, sweep.main(argv(out))


def run_folders(out):
    return [out / "base" / a / f"lr{lr:g}" / "seed0" for a in ALGOS for lr in LRS]


def test_grid_writes_every_run_from_one_generator_and_the_tables(grid):
    out, tables = grid
    for folder in run_folders(out):
        assert (folder / "summary.json").is_file() and (folder / "policy.pt").is_file()
    # one pre-training for the seed, the start of every run
    (vaft,) = out.glob("pretrain/*/seed0/vaft")
    assert {read_json(f / "config.json")["init"] for f in run_folders(out)} == {str(vaft)}
    assert read_json(vaft.parents[1] / "settings.json")["variants"] == ["base"]
    for name in ("sweep.csv", "selected.csv", "comparison.csv", "comparison.md", "sweep.png", "wall.json"):
        assert (out / name).is_file(), name
    runs = pd.read_csv(out / "sweep.csv")
    assert len(runs) == 4 and set(runs["iterations_run"]) == {1}
    assert (runs["wall_s"] > 0).all()
    # the reward model's monitor at the last iteration: rewarded and true value of the sampled candidates
    assert runs[["rollout/group_value_mean", "rollout/truth/group_value_mean"]].notna().all().all()
    selected = pd.read_csv(out / "selected.csv")
    assert selected.groupby("algo")["selected"].sum().to_dict() == {"dpo": 1, "hepo": 1}
    comparison = tables["comparison"]
    # agents.hepo's default logs with the learned cascade: the seed's platform is a reference row too
    assert list(comparison["agent"]) == ["hepo", "dpo", "cascade-privileged (reference)", "learned-cascade"]
    assert math.isnan(comparison.loc[0, "delta_oracle_share"])  # the reference algorithm's own row
    chosen = selected[selected["selected"]].set_index("algo")["lr"]
    assert comparison.set_index("agent").loc["dpo", "lr"] == chosen["dpo"]


def test_final_evaluation_runs_on_the_other_seed(grid):
    out, tables = grid
    train_eval_seed = read_json(run_folders(out)[0] / "config.json")["args"]["eval_seed"]
    assert train_eval_seed == 12345
    assert set(tables["comparison"]["final_eval_seed"]) == {54321}
    assert read_json(out / "base" / "final" / "seed0" / "config.json")["seed"] == 54321
    cached = sorted((out / "base" / "final" / "seed0" / "agents").glob("*/summary.json"))
    assert len(cached) == 4 and {read_json(p)["config"]["seed"] for p in cached} == {54321}


def test_learned_platform_and_auction_reach_the_final_evaluation(tmp_path):
    """With --behaviour learned-cascade the seed's platform is a reference row; with --auction every agent of the
    final evaluation runs the auction on the seed's learned funnel, as its runs trained."""
    out = tmp_path / "lc"
    flags = ["--algos", "hepo", "--lrs", "1e-4", "--seeds", "0", "--out", str(out)]
    tables = sweep.main(
        [*flags, "--", *TINY_HEPO, "--iterations", "1", "--behaviour", "learned-cascade", "--auction"]
    )
    assert list(tables["comparison"]["agent"]) == [
        "hepo",
        "cascade-privileged (reference)",
        "learned-cascade",
    ]
    (funnel,) = out.glob("pretrain/*/seed0/platform/funnel.pt")  # the platform's: the runs' reward funnel
    assert not list(out.glob("pretrain/*/seed0/funnel/model.pt"))  # not fitted a second time
    cached = sorted((out / "base" / "final" / "seed0" / "agents").glob("*/summary.json"))
    assert len(cached) == 3 and {read_json(p)["config"]["auction"]["path"] for p in cached} == {str(funnel)}


def test_second_invocation_skips_finished_runs(grid, capsys):
    out, _ = grid
    before = {f: (f / "checkpoint.pt").stat().st_mtime_ns for f in run_folders(out)}
    wall = read_json(out / "wall.json")
    sweep.main(argv(out))
    assert {f: (f / "checkpoint.pt").stat().st_mtime_ns for f in run_folders(out)} == before
    assert read_json(out / "wall.json") == wall
    assert capsys.readouterr().out.count("finished, skipped") == 4


def test_a_folder_with_other_settings_is_refused_before_any_run(grid):
    out, _ = grid
    args = sweep.parse([*argv(out), "--rollout-steps", "3"])
    with pytest.raises(ValueError, match="other settings.*--rollout-steps was 2, now 3"):
        rl_sweep.plan(args)


def test_variants_share_pretraining_unless_they_change_it(tmp_path):
    args = sweep.parse(
        ["--out", str(tmp_path), "--variants", "g4=--group-size 4;g8=--group-size 8;cb8=--codebook-size 8"]
    )
    assert list(args.variant_map()) == ["g4", "g8", "cb8"]
    assert args.pretrain_dir("g4", 0) == args.pretrain_dir("g8", 0)
    assert args.pretrain_dir("g4", 0) != args.pretrain_dir("cb8", 0)
    assert args.pretrain_dir("g4", 1) == args.pretrain_dir("g4", 0).parent / "seed1"
    assert "--group-size" in args.argv("g8", "ppo", 1e-4, 0)


@pytest.mark.parametrize("block", [b for b in sweep.__doc__.split("\n\n") if "python -m agents.sweep" in b])
def test_documented_commands_parse(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # their --out is relative
    line = " ".join(block.replace("\\\n", " ").split())
    tokens = shlex.split(line.split("python -m agents.sweep", 1)[1].replace("[", "").replace("]", ""))
    assert rl_sweep.plan(sweep.parse(tokens))


def test_help_names_the_pass_through(capsys):
    with pytest.raises(SystemExit) as e:
        run_main(sweep.main, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert (
        out.lstrip().startswith("usage: python -m agents.sweep ") and "Flags after -- go to every run" in out
    )
    assert "--hepo-flags" not in out


def sweep_rows(values: dict[tuple[str, float], list[float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"variant": "base", "algo": algo, "lr": lr, "seed": seed, "eval/oracle_share": v}
            for (algo, lr), vs in values.items()
            for seed, v in enumerate(vs)
        ]
    )


def test_select_lr_picks_the_highest_mean_over_seeds():
    table = select_lr(
        sweep_rows(
            {
                ("a", 1e-4): [0.2, 0.2],
                ("a", 3e-4): [0.4, 0.6],  # mean 0.5: the highest
                ("a", 1e-3): [0.9, 0.0],  # the best single seed, mean 0.45
                ("b", 1e-4): [0.3, float("nan")],  # NaN mean never wins
                ("b", 3e-4): [0.1, 0.3],  # mean 0.2, tied with 1e-3: the smaller lr
                ("b", 1e-3): [0.2, 0.2],
            }
        ),
        "eval/oracle_share",
    )
    chosen = table[table["selected"]].set_index("algo")["lr"].to_dict()
    assert chosen == {"a": 3e-4, "b": 3e-4}
    row = table[(table["algo"] == "a") & (table["lr"] == 3e-4)].iloc[0]
    # mean 0.5, s = 0.1414, se = s / sqrt(2) = 0.1, t_{0.975, 1} = 12.706: 0.5 +- 1.2706
    assert row["eval/oracle_share"] == pytest.approx(0.5)
    assert row["eval/oracle_share_ci_low"] == pytest.approx(0.5 - 1.2706, abs=1e-4)
    assert row["eval/oracle_share_ci_high"] == pytest.approx(0.5 + 1.2706, abs=1e-4)
    assert row["seeds"] == 2


def test_select_lr_refuses_an_algorithm_without_a_finite_mean():
    with pytest.raises(ValueError, match="base/a: no learning rate"):
        select_lr(sweep_rows({("a", 1e-4): [float("nan")]}), "eval/oracle_share")


def test_comparison_table_pairs_seeds_with_the_reference():
    metrics = lambda share: {k: share for k in rl_sweep.FINAL_METRICS}  # noqa: E731
    values = {
        "base": {
            "hepo": {0: metrics(0.5), 1: metrics(0.6)},
            "ppo": {0: metrics(0.4), 1: metrics(0.55)},
            "cascade-privileged": {0: metrics(0.8), 1: metrics(0.8)},
        }
    }
    table = comparison_table(values, {"base": {"hepo": 3e-4, "ppo": 1e-4}}, "hepo", final_eval_seed=7)
    rows = table.set_index("agent")
    # ppo - hepo per seed: -0.1, -0.05: mean -0.075, s = 0.03536, se = 0.025, t_{0.975, 1} 12.706
    assert rows.loc["ppo", "delta_oracle_share"] == pytest.approx(-0.075)
    assert rows.loc["ppo", "delta_oracle_share_ci_high"] == pytest.approx(-0.075 + 12.706 * 0.025, abs=1e-4)
    assert rows.loc["ppo", "oracle_share"] == pytest.approx(0.475)
    assert math.isnan(rows.loc["hepo", "delta_oracle_share"])
    assert rows.loc["cascade-privileged (reference)", "delta_oracle_share"] == pytest.approx(0.25)
    assert math.isnan(rows.loc["cascade-privileged (reference)", "lr"])
    assert set(table["final_eval_seed"]) == {7}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--algos", "hepo,sac"], "algos='hepo,sac': unknown ['sac']"),
        (["--lrs", "1e-4,0"], "0.0 is not a finite number > 0"),
        (["--lrs", "1e-4,x"], "expected a comma list of float"),
        (["--lrs", "1e-4,1e-4"], "lists a value twice"),
        (["--seeds", ""], "is empty"),
        (["--reference-algo", "ppo", "--algos", "hepo"], "is not one of --algos"),
        (["--variants", "a=--group-size 4;a=--group-size 8"], "names the variant 'a' twice"),
        (["--final-eval-seed", "12345"], "is the runs' --eval-seed"),
        (["--", "--lr", "1e-3"], "--lr is set by the sweep"),
        (["--", "--group-size", "1"], "--group-size=1 is invalid"),
        (["--variants", "g=--bogus 1"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_fail_with_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        run_main(sweep.main, ["--out", str(tmp_path / "s"), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "s").exists()  # nothing ran


def test_policy_best_reads_and_serves_each_runs_best_folder(grid, tmp_path):
    out, _ = grid
    args = sweep.parse(argv(out, "--policy", "best"))
    runs = rl_sweep.plan(args)
    table = rl_sweep.sweep_table(runs, {}, args.select_metric, args.policy)
    for run, row in zip(runs, table.to_dict("records")):
        best = read_json(run.folder / "summary.json")["best"]
        assert row["policy_iteration"] == best["iteration"]
        assert row[args.select_metric] == best[args.select_metric]
    assert set(rl_sweep.sweep_table(runs, {}, args.select_metric)["policy_iteration"]) == {1}  # last
    # the update's gradients over each run beside its metrics: its one iteration is the critic's warm-up (no policy
    # step), so none to average (agents.reporting.folders.update_gradients, tested in test_reporting)
    assert table[["grad_norm_policy", "grad_norm_critic", "grad_clipped"]].isna().all().all()
    specs = rl_sweep.agent_specs(args, {r.algo: r for r in runs if r.lr == LRS[0]})
    assert specs["hepo"] == f"gpr:{runs[0].folder}/best@beam_width={runs[0].args.eval_beam}"
    old = tmp_path / "old"  # a run from before OUT/best: no best in its summary
    old.mkdir()
    summary = read_json(runs[0].folder / "summary.json")
    (old / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "best"}))
    with pytest.raises(ValueError, match=r"has no best policy .* pass --policy last"):
        rl_sweep.sweep_table(
            [runs[0]._replace(args=replace(runs[0].args, out=str(old)))], {}, "eval/oracle_share", "best"
        )


def test_more_iterations_resume_the_finished_runs(grid, capsys):
    """Last in the file: it trains the module's grid one more iteration."""
    out, _ = grid
    tables = sweep.main(argv(out, "--no-final", iterations=2))
    assert "comparison" not in tables
    text = capsys.readouterr().out
    assert "finished, skipped" not in text and text.count("resuming at iteration 1") == 4
    assert set(pd.read_csv(out / "sweep.csv")["iterations_run"]) == {2}
