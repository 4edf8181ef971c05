"""gpr_sim.runs: atomic writes (mode, no temporaries), orphan cleanup, the folder lock, ownership, checkpoints;
GPRConfig's checkpoint form; an agents.evaluate --out that another entry point owns."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agents.evaluate import Args as EvalArgs
from agents.evaluate import main as evaluate
from gpr_sim.model import GPRConfig
from gpr_sim.runs import (
    LOCK_FILE,
    RUN_FILE,
    RunFolder,
    append_metrics,
    atomic_write_bytes,
    atomic_write_with,
    load_torch,
    read_metrics,
    read_owner,
    remove_orphans,
    save_torch,
    settings_diff,
    write_json,
    write_metrics,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_writes_are_readable_by_others(tmp_path, umask_022):
    """0666 minus the umask 022 = 0644, as a plain open() makes (mkstemp would make 0600)."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for path in (
        atomic_write_bytes(tmp_path / "a.bin", b"abc"),
        atomic_write_with(tmp_path / "b.txt", lambda tmp: Path(tmp).write_text("abc")),
        write_json(tmp_path / "c.json", {"a": 1}),
        save_torch(tmp_path / "d.pt", "test.fmt", 1, {"x": torch.zeros(2)}),
    ):
        assert path.stat().st_mode & 0o777 == 0o644 == plain.stat().st_mode & 0o777, path.name
    assert (tmp_path / "a.bin").read_bytes() == b"abc"


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failed_writes_leave_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = atomic_write_bytes(tmp_path / "result.json", b'{"old": true}')

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b'{"new": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(path, half_then_fail)
    with pytest.raises(TypeError, match="serialis"):  # serialisation raises before any byte is written
        write_json(path, {"f": object()})
    with pytest.raises(Exception, match="lambda|pickle"):  # torch.save of what it cannot pickle
        save_torch(tmp_path / "ckpt.pt", "test.fmt", 1, {"f": lambda: 0})
    real_replace = os.replace

    def no_rename(src, dst):
        raise OSError("rename refused")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="rename refused"):
        atomic_write_bytes(path, b"{}")
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_bytes() == b'{"old": true}'
    assert _files(tmp_path) == ["result.json"]


def test_remove_orphans_deletes_only_this_modules_temporaries(tmp_path):
    keep = [
        "a.txt",
        ".a.txt.tmp",
        "x.12345678.tmp",
        ".hidden",
        ".b.txt.1234567.tmp",
    ]  # not .NAME.XXXXXXXX.tmp
    orphans = [".a.txt.0f3a9b2c.tmp", ".metrics.jsonl.k_x9zq1a.tmp"]  # ours (hex) and mkstemp's alphabet
    for name in keep + orphans:
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".s.pt.deadbeef.tmp").write_text("x")
    (tmp_path / "other_run").mkdir()  # a run folder of its own: its run cleans it
    (tmp_path / "other_run" / RUN_FILE).write_text("{}")
    (tmp_path / "other_run" / ".o.pt.deadbeef.tmp").write_text("x")
    removed = remove_orphans(tmp_path)
    assert sorted(p.name for p in removed) == sorted([*orphans, ".s.pt.deadbeef.tmp"])
    assert _files(tmp_path) == sorted([*keep, "other_run", "sub"])
    assert (tmp_path / "other_run" / ".o.pt.deadbeef.tmp").exists()


def test_opening_a_run_folder_removes_orphans(tmp_path):
    with RunFolder(tmp_path / "run", "agents.test", {"a": 1}):
        pass
    (tmp_path / "run" / ".metrics.jsonl.0f3a9b2c.tmp").write_text("half")  # a writer killed mid-write
    with RunFolder(tmp_path / "run", "agents.test", {"a": 1}):
        assert _files(tmp_path / "run") == [LOCK_FILE, RUN_FILE]


def test_metrics_log_round_trip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    append_metrics(path, {"step": 0, "loss": 1.5})
    append_metrics(path, {"step": 1, "loss": float("nan"), "n": torch.tensor(3)})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["n"] == 3 and rows[1]["loss"] != rows[1]["loss"]
    write_metrics(path, rows[:1])
    assert read_metrics(path) == [{"step": 0, "loss": 1.5}]
    path.write_text('{"step": 0}\n{"step": 1, "lo\n')  # a line cut by hand
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(path)


# ----------------------------------------------------------------------------- lock and ownership


def test_lock_refuses_a_second_writer(tmp_path):
    folder = RunFolder(tmp_path / "run", "agents.test", {"a": 1})
    with pytest.raises(ValueError, match=rf"run is in use by this process \(pid {os.getpid()}\)"):
        RunFolder(tmp_path / "run", "agents.test", {"a": 1})  # another descriptor of the same process
    fd = os.open(tmp_path / "run" / LOCK_FILE, os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a plain flock sees it too
    code = (
        f"from gpr_sim.runs import RunFolder; RunFolder({str(tmp_path / 'run')!r}, 'agents.test', {{'a': 1}})"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert f"run is in use by another process (pid {os.getpid()})" in res.stderr
    folder.close()
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_ownership_refuses_another_entry_point_or_other_settings(tmp_path):
    run = tmp_path / "run"
    settings = {"lr": 1e-3, "iterations": 5, "label": "", "loss": {"clip": 0.2, "kl_coef": 0.0}}
    with RunFolder(run, "agents.hepo", settings, ignores=("iterations",)) as f:
        assert f.fresh
    record = (run / RUN_FILE).read_bytes()
    assert read_owner(run)["entry"] == "agents.hepo" and read_owner(run)["settings"] == settings
    with pytest.raises(
        ValueError, match=rf"^{run} holds a run of agents.hepo, not of agents.evaluate: pass another"
    ):
        RunFolder(run, "agents.evaluate", {})
    with pytest.raises(ValueError, match=r"other settings \(--lr was 0.001, now 0.002\)"):
        RunFolder(run, "agents.hepo", {**settings, "lr": 2e-3}, ignores=("iterations",))
    with pytest.raises(ValueError, match=r"--loss.kl-coef was 0.0, now 0.1\)"):
        RunFolder(
            run, "agents.hepo", {**settings, "loss": {"clip": 0.2, "kl_coef": 0.1}}, ignores=("iterations",)
        )
    # an ignored flag may change; a flag added since (absent from the record) compares with its default
    with RunFolder(
        run,
        "agents.hepo",
        {**settings, "iterations": 9, "new": 1},
        ignores=("iterations",),
        defaults={"new": 1},
    ) as f:
        assert not f.fresh
    with pytest.raises(ValueError, match=r"--new was 1, now 2"):
        RunFolder(run, "agents.hepo", {**settings, "new": 2}, ignores=("iterations",), defaults={"new": 1})
    with RunFolder(run, "agents.hepo", {"anything": 1}, same_settings=False):  # a folder of independent runs
        pass
    assert (run / RUN_FILE).read_bytes() == record  # the record is never rewritten
    assert settings_diff({"a": [1, 2], "b": float("nan")}, {"a": (1, 2), "b": float("nan")}) == []


def test_folder_with_files_but_no_owner_is_refused(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"old holds files \(config.json\) but no run.json"):
        RunFolder(tmp_path / "old", "agents.test", {})
    assert not (tmp_path / "old" / RUN_FILE).exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / RUN_FILE).write_text('{"entry": "x"}')
    with pytest.raises(ValueError, match="not a run owner record"):
        RunFolder(tmp_path / "bad", "agents.test", {})


def test_evaluate_refuses_an_out_that_another_run_owns(tmp_path):
    """agents.evaluate --out pointed at an RL run folder: refused before anything is written."""
    run = tmp_path / "hepo_run"
    with RunFolder(run, "agents.hepo", {"seed": 0}):
        write_json(run / "config.json", {"algo": "hepo"})
        write_json(run / "summary.json", {"final": 1})
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(ValueError, match=r"holds a run of agents.hepo, not of agents.evaluate"):
        evaluate(EvalArgs(agents="random", out=str(run), num_envs=8, sessions=8, plots=False))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


# ----------------------------------------------------------------------------- checkpoints


class NotWeights:
    """A class torch's weights-only loader refuses (it could run code on load)."""


def test_load_torch_errors_are_one_line_naming_the_file(tmp_path):
    good = save_torch(tmp_path / "good.pt", "test.fmt", 2, {"x": torch.arange(3)})
    assert torch.equal(load_torch(good, "test.fmt", 2, "a test file", ("x",))["x"], torch.arange(3))
    torch.save({"format": "test.fmt", "version": 2, "x": NotWeights()}, tmp_path / "pickled.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:100])
    cases = {
        "pickled.pt": "not a test file",
        "junk.pt": "not a test file",
        "cut.pt": "not a readable checkpoint",
        "absent.pt": "no such file",
    }
    for name, why in cases.items():
        with pytest.raises(ValueError) as e:
            load_torch(tmp_path / name, "test.fmt", 2, "a test file")
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / name}: {why}") and "\n" not in msg, msg
        assert "weights_only" not in msg.replace("(weights_only)", "") and "False" not in msg, msg
    with pytest.raises(ValueError, match="version 2, this code reads 3"):
        load_torch(good, "test.fmt", 3, "a test file")
    with pytest.raises(ValueError, match=r"not another file \(missing format header\)"):
        load_torch(good, "other.fmt", 2, "another file")
    with pytest.raises(ValueError, match=r"lacks \['y'\]"):
        load_torch(good, "test.fmt", 2, "a test file", ("x", "y"))
    with pytest.raises(ValueError, match="header"):
        save_torch(tmp_path / "x.pt", "test.fmt", 1, {"format": "mine"})


def test_gpr_config_round_trip_and_bad_fields(tmp_path):
    cfg = GPRConfig(level_sizes=(8, 4, 2), d_model=32, n_heads=4, thinking=False, mtp_heads=2)
    d = cfg.to_dict()
    assert d["level_sizes"] == [8, 4, 2] and GPRConfig.from_dict(d) == cfg
    assert GPRConfig.from_dict(json.loads(json.dumps(d))) == cfg
    path = save_torch(tmp_path / "m.pt", "test.fmt", 1, {"config": d})
    assert GPRConfig.from_dict(load_torch(path, "test.fmt", 1, "a test file")["config"]) == cfg
    where = f"{path}: model config"
    with pytest.raises(ValueError, match=r"m.pt: model config: field d_model='wide' is out of range"):
        GPRConfig.from_dict({**d, "d_model": "wide"}, where)
    with pytest.raises(
        ValueError, match=r"model config: field n_heads=3 is invalid: it must divide d_model=32"
    ):
        GPRConfig.from_dict({**d, "n_heads": 3}, where)
    with pytest.raises(ValueError, match=r"model config: missing field\(s\) \['hte'\]"):
        GPRConfig.from_dict({k: v for k, v in d.items() if k != "hte"}, where)
    with pytest.raises(ValueError, match=r"model config: unknown field\(s\) \['colour'\]"):
        GPRConfig.from_dict({**d, "colour": 1}, where)
    with pytest.raises(ValueError, match=r"field thinking=1 is invalid: expected a bool"):
        GPRConfig.from_dict({**d, "thinking": 1}, where)
    with pytest.raises(ValueError, match="expected a dict"):
        GPRConfig.from_dict([1, 2], where)
