"""agents.cli: the documented command lines parse to the expected dataclasses, ``--help`` lists the
documented flags, ``--world.*`` flags override only what they name in the chosen preset, and user errors
print one ``error:`` line naming the flag and exit 2 (``--debug``: the traceback)."""

import argparse
import dataclasses
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agents import ablation, cli, collect, evaluate, hepo, ope, plots, pretrain, sb3_ppo, tokenize
from agents.platform.folder import platform_inputs
from agents.rl.common import LossConfig
from gpr_sim.tokenizer.compare import CompareConfig
from gpr_sim.world import preset

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {
    m.__name__.split(".")[-1]: m
    for m in (hepo, pretrain, collect, evaluate, ope, ablation, sb3_ppo, tokenize)
}


@pytest.fixture
def cuda_present(monkeypatch):
    """Documented ``--device cuda`` lines parse on a CPU machine too (check_device asks torch.cuda)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def field(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


# (entry point, command line from README / docs / Makefile / benchmarks / notebooks, expected fields)
DOCUMENTED = [
    ("hepo", "--env ads-v0", {"env": "ads-v0", "algo": "hepo", "num_envs": 64}),
    ("hepo", "--env ads-v0 --algo ppo --seed 1", {"algo": "ppo", "seed": 1}),
    ("hepo", "--device cuda --num-envs 8192", {"device": "cuda", "num_envs": 8192}),
    (
        "hepo",
        "--env ads-v0 --device cuda --num-envs 4096 --iterations 200",
        {"num_envs": 4096, "iterations": 200},
    ),
    (
        "hepo",
        "--env ads-v0 --out runs/demo/hepo --pretrain-dir runs/demo/pretrain",
        {"out": "runs/demo/hepo", "pretrain_dir": "runs/demo/pretrain"},
    ),
    (
        "hepo",
        "--device cuda --num-envs 16384 --minibatch 1024 --iterations 200 --out runs/hepo/big",
        {"num_envs": 16384, "minibatch": 1024, "out": "runs/hepo/big"},
    ),
    (
        "hepo",
        "--seed 2 --iterations 1 --eval-every 1 --threads 1 --no-progress --pretrain-dir p --out o",
        {"seed": 2, "iterations": 1, "eval_every": 1, "threads": 1, "progress": False},
    ),
    (
        "hepo",
        "--seed 0 --algo hepo --no-arr --label hepo_no_arr --out o",
        {"arr": False, "label": "hepo_no_arr", "budget_aware": True},
    ),
    ("hepo", "--algo hepo --no-budget-aware --label hepo_no_budget", {"budget_aware": False, "arr": True}),
    # compare_algos.sh spells the nested negation argparse's way; tyro's own spelling works as well
    (
        "hepo",
        "--algo hepo --no-loss.process-rewards --label hepo_no_process",
        {"loss.process_rewards": False, "loss.group_norm": True},
    ),
    ("hepo", "--loss.no-process-rewards", {"loss.process_rewards": False}),
    (
        "hepo",
        "--iterations 1 --loss.kl-coef 0.1 --loss.value-coef 0.25",
        {"loss.kl_coef": 0.1, "loss.value_coef": 0.25, "loss.clip": 0.2},
    ),
    (
        "hepo",
        "--pretrain-dir p --mtp-steps 20 --vaft-steps 20 --iterations 3 --num-envs 16 --rollout-steps 2 "
        "--group-size 8 --minibatch 16 --eval-every 1 --eval-sessions 32 --eval-envs 16 --eval-candidates 8 "
        "--eval-beam 4 --checkpoint-every 3 --critic-warmup 1 --threads 1",
        {
            "mtp_steps": 20,
            "rollout_steps": 2,
            "group_size": 8,
            "eval_candidates": 8,
            "eval_beam": 4,
            "critic_warmup": 1,
        },
    ),
    (
        "pretrain",
        "--env ads-v0 --stage mtp --out runs/pretrain/mtp",
        {"stage": "mtp", "out": "runs/pretrain/mtp"},
    ),
    (
        "pretrain",
        "--stage vaft --device cuda --init runs/pretrain/mtp/checkpoint.pt --logs runs/pretrain/mtp/logs.parquet "
        "--tokenizer runs/pretrain/mtp/tokenizer --out runs/pretrain/vaft",
        {
            "stage": "vaft",
            "init": "runs/pretrain/mtp/checkpoint.pt",
            "tokenizer": "runs/pretrain/mtp/tokenizer",
        },
    ),
    (
        "pretrain",
        "--stage mtp --device cuda --batch-size 512 --steps 2000 --out runs/pretrain/mtp",
        {"batch_size": 512, "steps": 2000},
    ),
    (
        "pretrain",
        "--out /tmp/mtp5 --logs L --tokenizer T --steps 400 --eval-every 100",
        {"logs": "L", "eval_every": 100},
    ),
    (
        "pretrain",
        "--collect-envs 32 --collect-steps 40 --d-model 32 --n-layers 1 --batch-size 64 --steps 40 "
        "--eval-every 5 --checkpoint-every 40 --eval-requests 64 --threads 1 --no-progress",
        {"collect_envs": 32, "d_model": 32, "n_layers": 1, "eval_requests": 64, "progress": False},
    ),
    (
        "pretrain",
        "--value-coef 0 --value-trunk --mtp-heads 1 --n-heads 4 --select best",
        {"value_coef": 0.0, "value_trunk": True, "mtp_heads": 1, "n_heads": 4, "select": "best"},
    ),
    (
        "collect",
        "--env ads-v0 --policy cascade-privileged --num-envs 256 --steps 200 --seed 0 --out runs/logs/cp.parquet "
        "--preset small --temperature 0.3",
        {"policy": "cascade-privileged", "temperature": 0.3, "out": "runs/logs/cp.parquet"},
    ),
    ("collect", "--policy random", {"policy": "random", "temperature": None}),
    (
        "evaluate",
        "--env ads-v0 --agents random,cascade-privileged,oracle",
        {"agents": "random,cascade-privileged,oracle", "plots": True},
    ),
    (
        "evaluate",
        "--env ads-v0 --sessions 512 --out runs/demo/eval "
        "--agents random,learned-cascade:runs/demo/pretrain/platform,cascade-privileged,oracle,"
        "gpr:runs/demo/pretrain/vaft,gpr:runs/demo/hepo,gpr:runs/demo/hepo/best",
        {
            "sessions": 512,
            "agents": "random,learned-cascade:runs/demo/pretrain/platform,cascade-privileged,oracle,"
            "gpr:runs/demo/pretrain/vaft,gpr:runs/demo/hepo,gpr:runs/demo/hepo/best",
        },
    ),
    (
        "evaluate",
        "--env ads-v0 --preset small --agents random,cascade-privileged,oracle --num-envs 128 --sessions 256 "
        "--seed 12345 --threads 1 --no-plots --out b",
        {"num_envs": 128, "seed": 12345, "plots": False, "preset": "small"},
    ),
    (
        "ope",
        "--logs runs/logs/ads-v0__cascade-privileged__0.parquet --policy oracle --env ads-v0",
        {"logs": "runs/logs/ads-v0__cascade-privileged__0.parquet", "policy": "oracle", "env": "ads-v0"},
    ),
    ("ope", "--logs L --sweep-temperatures 0.2 0.5 1.5", {"sweep_temperatures": (0.2, 0.5, 1.5)}),
    (
        "ablation",
        "--env ads-v0 --seeds 0,1,2 --variants hstu,+hte,full --out /tmp/abl",
        {"seeds": "0,1,2", "variants": "hstu,+hte,full", "out": "/tmp/abl"},
    ),
    (
        "ablation",
        "--variants hstu,+mtp,full --steps 100 --select last --threads 1",
        {"steps": 100, "select": "last"},
    ),
    (
        "sb3_ppo",
        "--env ads-v0 --seeds 0,1,2 --total-timesteps 48000",
        {"seeds": "0,1,2", "total_timesteps": 48000},
    ),
    (
        "sb3_ppo",
        "--seeds 1 --total-timesteps 48000 --eval-every 24000 --eval-episodes 300 --learning-rate 0.001 "
        "--n-epochs 10 --ent-coef 0.0 --normalize-reward --out o",
        {"eval_every": 24000, "eval_episodes": 300, "learning_rate": 0.001, "normalize_reward": True},
    ),
    ("sb3_ppo", "--no-normalize-reward --num-envs 4", {"normalize_reward": False, "num_envs": 4}),
]


@pytest.mark.parametrize(
    "module, line, expected", DOCUMENTED, ids=[f"{m}: {c[:40]}" for m, c, _ in DOCUMENTED]
)
def test_documented_command_lines_parse(module, line, expected, cuda_present, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # --out runs/... is checked against the working folder
    for run in ("runs/demo/pretrain/vaft", "runs/demo/hepo", "runs/demo/hepo/best"):  # the Makefile's gpr:RUN
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "policy.pt").touch()
    for model in platform_inputs(tmp_path / "runs/demo/pretrain/platform"):  # and its learned-cascade:PATH
        model.parent.mkdir(parents=True, exist_ok=True)
        model.touch()
    args = cli.parse_args(ENTRY_POINTS[module].Args, shlex.split(line))
    assert {k: field(args, k) for k in expected} == expected
    default = ENTRY_POINTS[module].Args(**({"logs": "L"} if module == "ope" else {}))
    given = {
        t[2:].split("=")[0].removeprefix("no-").split(".")[0].replace("-", "_")
        for t in shlex.split(line)
        if t.startswith("--")
    }
    for f in dataclasses.fields(args):
        if f.name not in given:
            assert getattr(args, f.name) == getattr(default, f.name), f.name  # the rest keep their defaults


def test_flag_forms_agree(tmp_path, monkeypatch):
    """``--x=1``, ``--x_y`` and the last of a repeated flag: the forms argparse accepted."""
    monkeypatch.chdir(tmp_path)
    a = cli.parse_args(hepo.Args, ["--num-envs=8", "--eval_every", "2", "--seed", "1", "--seed", "3"])
    assert (a.num_envs, a.eval_every, a.seed) == (8, 2, 3)


def test_world_overrides_change_only_the_flags_given():
    # --preset large, then two overrides: every other field keeps the large preset's value
    argv = ["--preset", "large", "--world.num-ads", "1000", "--world.reward.gmv", "0.1", "--num-envs", "8"]
    args, overrides = cli.parse_args_with_world(collect.Args, argv)
    assert (args.preset, args.num_envs) == ("large", 8)
    assert overrides == {"num_ads": 1000, "reward": {"gmv": 0.1}}
    large = preset("large")
    expected = large.replace(num_ads=1000, reward=dataclasses.replace(large.reward, gmv=0.1))
    assert cli.world_config(args.preset, overrides) == expected
    assert expected.num_users == large.num_users != preset("small").num_users  # not the small preset's
    # the override may come before --preset (which is read first), and --preset=NAME works
    _, late = cli.parse_args_with_world(
        collect.Args, ["--world.num-ads", "1000", "--world.reward.gmv", "0.1", "--preset=large"]
    )
    assert late == overrides
    # no --world.* flag: the preset itself; a tuple field takes space-separated values
    assert cli.parse_args_with_world(collect.Args, [])[1] == {}
    _, tup = cli.parse_args_with_world(
        collect.Args, ["--world.activity-weights", "0.2", "0.2", "0.2", "0.2", "0.2"]
    )
    assert tup == {"activity_weights": (0.2,) * 5}


def test_tokenize_flags_are_args_compare_and_world():
    line = "--preset small --world.num-ads 2000 --vae-steps 500 --no-compare --kmeans-iters 5 --world.num-organic 300 "
    args, cfg, overrides = cli.parse_configs(
        tokenize.Args, CompareConfig, argv=shlex.split(line + "--device cpu"), world=True
    )
    assert (args.preset, args.compare, args.device) == ("small", False, "cpu")
    assert cfg == CompareConfig(vae_steps=500, kmeans_iters=5)
    assert overrides == {"num_ads": 2000, "num_organic": 300}
    with pytest.raises(ValueError, match="unrecognized arguments: --world.num-ads"):
        cli.parse_args(
            tokenize.Args, ["--world.num-ads", "3"]
        )  # only parse_configs(world=True) has --world.*


DOCUMENTED_FLAGS = {
    "hepo": "--env --algo --seed --device --num-envs --iterations --out --pretrain-dir --threads --no-progress "
    "--eval-every --label --no-arr --no-budget-aware --loss.no-process-rewards --loss.kl-coef "
    "--loss.value-coef --minibatch --preset --mtp-steps --vaft-steps --rollout-steps --group-size "
    "--eval-sessions --eval-envs --eval-candidates --eval-beam --checkpoint-every --critic-warmup",
    "pretrain": "--env --stage --out --logs --init --tokenizer --steps --eval-every --device --batch-size "
    "--collect-envs --collect-steps --d-model --n-layers --checkpoint-every --eval-requests --threads "
    "--no-progress --value-coef --value-trunk --mtp-heads --n-heads --select",
    "collect": "--env --policy --num-envs --steps --seed --out --preset --temperature --world.num-ads "
    "--world.reward.gmv --world.competitor-ecpm-mean",
    "evaluate": "--env --agents --preset --sessions --out --num-envs --seed --threads --no-plots",
    "ope": "--logs --policy --env --sweep-temperatures",
    "ablation": "--env --seeds --out --variants --steps --select --threads",
    "sb3_ppo": "--env --seeds --total-timesteps --out --eval-every --eval-episodes --learning-rate --n-epochs "
    "--ent-coef --normalize-reward --num-envs",
    "tokenize": "--env --preset --method --out --world.num-ads --vae-steps --no-compare --kmeans-iters "
    "--world.num-organic --device",
    "plots": "--out --baseline --level",
}


@pytest.mark.parametrize("module", list(DOCUMENTED_FLAGS))
def test_help_lists_documented_flags(module, capsys):
    mod = plots if module == "plots" else ENTRY_POINTS[module]
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(mod.main, ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    # the usage line names the command, also where its config class lives in the library (agents.rl.config)
    assert out.lstrip().startswith(f"usage: python -m agents.{module} "), out.splitlines()[0]
    missing = [f for f in DOCUMENTED_FLAGS[module].split() if f not in out]
    assert not missing, missing


def test_help_text_is_the_field_docstring(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(hepo.Args, ["--help"])
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert (
        "anticipatory request rehearsal" in out and "PPO clip range eps" in out
    )  # Args and nested LossConfig


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "cls", [*(m.Args for m in ENTRY_POINTS.values()), LossConfig], ids=lambda c: c.__module__
)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_field_rejects_nan_and_inf(cls, bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = {"logs": "L"} if cls is ope.Args else {}
    for f in dataclasses.fields(cls):
        if "float" in str(f.type):
            value = (0.1, bad) if "tuple" in str(f.type) else bad
            with pytest.raises(ValueError, match=f"{f.name}=.* is invalid: expected a finite number"):
                cls(**base, **{f.name: value})
    cls(**base)  # the defaults are valid


def test_nan_in_a_tuple_and_nested_loss_are_rejected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="sweep_temperatures=.*finite"):
        ope.Args(logs="L", sweep_temperatures=(0.1, math.nan))
    # today's bug: value_coef=nan passed `value_coef < 0`
    with pytest.raises(ValueError, match="value_coef=nan is invalid: expected a finite number"):
        cli.parse_args(hepo.Args, ["--loss.value-coef", "nan"])


def test_check_device():
    cli.check_device("cpu")
    cli.check_device("")  # none asked for (ope: the log's device)
    with pytest.raises(ValueError, match="device='bogus' is invalid"):
        cli.check_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' is unavailable: CUDA is not available"):
            cli.check_device("cuda")
    else:
        with pytest.raises(ValueError, match="device='cuda:99' is unavailable"):
            cli.check_device("cuda:99")


def test_check_env_and_out(tmp_path):
    cli.check_env("ads-v0")
    with pytest.raises(
        ValueError, match=r"env='foo-v0' is not a registered environment: expected one of \['ads-v0'\]"
    ):
        cli.check_env("foo-v0")
    (tmp_path / "file").write_text("x")
    cli.check_out(str(tmp_path / "new" / "deeper"))  # made later, under a writable folder
    with pytest.raises(ValueError, match="is a file, not a folder"):
        cli.check_out(str(tmp_path / "file" / "sub"))


# ----------------------------------------------------------------------------- reporting


@pytest.mark.parametrize(
    "message, argv, expected",
    [
        (
            "num_envs=0 is invalid: expected >= 1",
            ["--num-envs", "0"],
            "--num-envs=0 is invalid: expected >= 1",
        ),
        ("value_coef=nan is invalid", ["--loss.value-coef", "nan"], "--loss.value-coef=nan is invalid"),
        ("value_coef=nan is invalid", ["--value-coef=nan"], "--value-coef=nan is invalid"),  # pretrain's own
        ("num_ads=0 is out of range", ["--world.num-ads", "0"], "--world.num-ads=0 is out of range"),
        (
            "reward.gmv=nan is out of range",
            ["--world.reward.gmv", "nan"],
            "--world.reward.gmv=nan is out of range",
        ),
        (
            "beam_width=20 is invalid: expected >= top_k=30",
            ["--top-k", "30"],
            "--beam-width=20 is invalid: expected >= top_k=30",
        ),  # a cross-field check: the field's flag
        (
            "temperature is only used by the cascade policy",
            ["--temperature", "1"],
            "--temperature is only used by the cascade policy",
        ),
        ("buffer is full", [], "buffer is full"),  # not a flag given: left alone
        ("unknown agent 'x'", ["--agents", "x"], "unknown agent 'x'"),
    ],
)
def test_flag_message(message, argv, expected):
    assert cli.flag_message(message, argv) == expected


def _exit(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main, argv)
    return exit_.value.code, capsys.readouterr().err


def _raises(exc):
    def main(argv):
        raise exc

    return main


def test_run_main_user_errors_are_one_line(capsys, tmp_path):
    code, err = _exit(_raises(ValueError("num_envs=0 is invalid")), ["--num-envs", "0"], capsys)
    assert (code, err) == (2, "error: --num-envs=0 is invalid\n")
    missing = tmp_path / "nope.parquet"
    code, err = _exit(lambda argv: open(missing), [], capsys)
    assert (code, err) == (2, f"error: {missing}: No such file or directory\n")
    code, err = _exit(_raises(SystemExit("--seq-len must be >= 2")), [], capsys)  # the benchmarks' way
    assert (code, err) == (2, "error: --seq-len must be >= 2\n")
    code, err = _exit(_raises(ValueError("two\nlines")), [], capsys)
    assert (code, err) == (2, "error: two lines\n")
    code, err = _exit(_raises(KeyboardInterrupt()), [], capsys)
    assert (code, err) == (130, "interrupted\n")
    code, err = _exit(lambda argv: argv, ["x"], capsys)
    assert (code, err) == (0, "")


def test_run_main_argparse_usage_errors_are_one_line(capsys):
    original = argparse.ArgumentParser.error

    def main(argv):
        p = argparse.ArgumentParser()
        p.add_argument("--level", type=float)
        p.parse_args(argv)

    code, err = _exit(main, ["--level", "x"], capsys)
    assert (code, err) == (2, "error: argument --level: invalid float value: 'x'\n")
    assert argparse.ArgumentParser.error is original  # restored after the run


def test_run_main_debug_and_bugs_keep_the_traceback():
    seen = []
    with pytest.raises(ValueError, match="bad"):
        cli.run_main(
            lambda argv: seen.append(argv) or _raises(ValueError("bad"))(argv), ["--debug", "--x", "1"]
        )
    assert seen == [["--x", "1"]]  # --debug is not passed on
    with pytest.raises(RuntimeError):  # a bug, not a user error
        cli.run_main(_raises(RuntimeError("shape mismatch")), [])
    with pytest.raises(KeyboardInterrupt):
        cli.run_main(_raises(KeyboardInterrupt()), ["--debug"])


# (command line, the flag its one error line must name); each fails in Args validation, before any stage
FAILING = [
    (["agents.collect", "--num-envs", "0"], "--num-envs"),
    (["agents.hepo", "--algo", "foo"], "--algo"),
    (["agents.hepo", "--preset", "nope"], "--preset"),
    (["agents.evaluate", "--env", "foo-v0"], "--env"),
    (["agents.pretrain", "--out", "{file}/sub"], "--out"),
    (["agents.hepo", "--loss.value-coef", "nan"], "--loss.value-coef"),
    (["agents.ablation", "--device", "cuda"], "--device"),
]


def _run(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "file").write_text("a regular file")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}  # no CUDA, also on a GPU host
    return subprocess.run(
        [sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("argv, flag", FAILING, ids=[" ".join(a) for a, _ in FAILING])
def test_user_error_is_one_line_exit_2(argv, flag, tmp_path):
    res = _run(argv, tmp_path)
    lines = res.stderr.splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_debug_shows_the_traceback(tmp_path):
    res = _run(["agents.collect", "--num-envs", "0", "--debug"], tmp_path)
    assert res.returncode == 1 and "Traceback" in res.stderr and "num_envs=0" in res.stderr
