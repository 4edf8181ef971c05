"""Run folders: naming, ownership and locking, atomic writes, the metrics log, the checkpoint header.

A run folder holds ``run.json`` (who owns it: the entry point and its settings), ``config.json``,
``metrics.jsonl`` (one flat dict per line, namespaced keys), checkpoints and plots. Every file is written
atomically: to a temporary sibling ``.NAME.XXXXXXXX.tmp`` (created with mode 0666 minus the umask, as a plain
``open`` would), then ``os.replace``d onto ``NAME``, so an interrupted run never leaves a half-written
result behind and readers never see one. A failed write removes its temporary file; a killed process can
leave one, which `remove_orphans` deletes when the next run opens the folder.

`RunFolder` opens a folder for writing: it takes an advisory lock (``fcntl.flock`` on ``.run.lock``: one
writing process per folder), removes orphan temporary files, and records the owner in ``run.json`` on first
use or checks it on every later use, refusing a folder that another kind of run owns or that holds a run
with other settings. ``run.json`` is written once and never rewritten: resuming never rewrites history.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
"""the owner record of a run folder"""
LOCK_FILE = ".run.lock"
"""the advisory lock file of a run folder (holds the locking process's pid)"""
RUN_FORMAT = "gpr_sim.run"
RUN_VERSION = 1
ORPHAN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
"""temporary files of this module's atomic writes (``.NAME.XXXXXXXX.tmp``)"""


# ----------------------------------------------------------------------------- naming


def run_name(env_id: str, tag: str, seed: int, stamp: bool = False) -> str:
    """CleanRL-style ``env__tag__seed`` (``tag``: algorithm, stage, policy...), ``__unixtime`` with ``stamp``."""
    name = f"{env_id}__{tag}__{seed}"
    return f"{name}__{int(time.time())}" if stamp else name


# ----------------------------------------------------------------------------- atomic writes


def _open_temp(path: Path) -> tuple[Path, int]:
    """A new temporary sibling of ``path`` and its descriptor; mode 0666 minus the umask (a plain ``open``)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it onto ``path``.

    For writers that only take a file name (Parquet, SB3's ``VecNormalize.save``). Readers never see a
    half-written file, a failed write leaves any previous file as it was and no temporary file behind.
    Parent folders are created. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _open_temp(path)
    os.close(fd)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (synced before the rename); parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def figure_bytes(fig, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes (for `atomic_write_bytes`); the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def write_parquet(path: str | os.PathLike, frame) -> Path:
    """A pandas DataFrame written atomically as Parquet (no index): read back with ``pandas.read_parquet``."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return atomic_write_bytes(path, buf.getvalue())


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.NAME.XXXXXXXX.tmp``) that killed writers left in ``folder``.

    Subfolders are searched too, except those that are run folders themselves (they hold ``run.json``:
    their own run cleans them). Returns the files removed.
    """
    folder = Path(folder)
    removed = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if entry.is_dir() and not entry.is_symlink():
            if not (entry / RUN_FILE).is_file():
                removed += remove_orphans(entry)
        elif ORPHAN.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex): what a cache keyed by content compares."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- JSON and metrics.jsonl


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, json.dumps(obj, indent=2, default=_jsonable).encode())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _line(row: dict) -> bytes:
    return json.dumps(row, default=_jsonable).encode() + b"\n"


def append_metrics(path: str | os.PathLike, row: dict) -> None:
    """Append one flat metrics dict as a JSON line (re-written atomically: the file stays small)."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    atomic_write_bytes(path, old + _line(row))


def write_metrics(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Replace the metrics log with ``rows`` (a resumed run drops the rows after its checkpoint)."""
    atomic_write_bytes(path, b"".join(_line(r) for r in rows))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics log ([] when there is none); a damaged line raises ``ValueError`` naming it."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i} is not a JSON line: {e}") from e
    return rows


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_bytes(fmt: str, version: int, payload: Mapping[str, Any]) -> bytes:
    """``torch.save`` of ``payload`` under the header ``{"format": fmt, "version": version}``."""
    import torch

    if "format" in payload or "version" in payload:
        raise ValueError("checkpoint payload must not set 'format' or 'version': they are the header")
    buf = io.BytesIO()
    torch.save({"format": fmt, "version": version, **payload}, buf)
    return buf.getvalue()


def save_torch(path: str | os.PathLike, fmt: str, version: int, payload: Mapping[str, Any]) -> Path:
    """Write a checkpoint (header + ``payload``) atomically: a crash never leaves half a file."""
    return atomic_write_bytes(path, checkpoint_bytes(fmt, version, payload))


SAFE_LOAD_ERRORS = (pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError, KeyError, TypeError)
"""what ``torch.load(weights_only=True)`` raises for a file it cannot or will not read"""


def safe_load_error(e: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line, without torch's advice.

    Torch's message for a file holding objects safe loading refuses suggests loading it again with
    ``weights_only=False``, which would run code from a file of unknown origin. Callers raise their own
    error with this text ``from None``, so the advice does not reach the user through the chained
    exception either.
    """
    if isinstance(e, pickle.UnpicklingError):
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        return "not a torch file, or it holds objects safe loading refuses" + (
            f": {refused.group(1)}" if refused else ""
        )
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and "weights_only" not in line]
    return f"{type(e).__name__}: {(lines or [''])[0][:200]}"


def load_torch(
    path: str | os.PathLike, fmt: str, version: int, what: str, required: tuple[str, ...] = ()
) -> dict:
    """Load a checkpoint safely (``weights_only``: no code from the file runs) and check its header.

    Raises:
        ValueError: one line naming the file and the problem: missing, unreadable, holding objects that
            safe loading refuses, not ``what`` (another format), another version, or missing one of
            ``required`` keys. Torch's advice to load with ``weights_only=False`` is never passed on
            (``safe_load_error``).
    """
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (expected {what})") from None
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not {what} ({safe_load_error(e)})") from None
    except SAFE_LOAD_ERRORS as e:
        raise ValueError(f"{path}: not a readable checkpoint ({safe_load_error(e)})") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{path}: not {what} (missing format header)")
    if payload.get("version") != version:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')}, this code reads {version}")
    missing = [k for k in required if k not in payload]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing}")
    return payload


# ----------------------------------------------------------------------------- ownership and locking


def _normal(settings: Mapping[str, Any]) -> dict:
    """``settings`` as they read back from JSON (tuples -> lists, dataclasses -> dicts, paths -> str)."""
    return json.loads(json.dumps(dict(settings), default=_jsonable))


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def flag(key: str) -> str:
    """The command-line flag of a settings key: ``group_size`` -> ``--group-size``, ``loss.kl_coef`` -> ``--loss.kl-coef``."""
    return "--" + key.replace("_", "-")


_ABSENT = object()


def settings_diff(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    ignores: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """The flags whose values differ, as ``--flag was OLD, now NEW``, sorted; nested dicts compare per key.

    A key in ``ignores`` (or under it: ``loss`` covers ``loss.clip``) is skipped. A key missing from ``old``
    (a flag added since ``old`` was recorded) takes its value from ``defaults``.
    """
    old, new = _flat(_normal(old)), _flat(_normal(new))
    defaults = _flat(_normal(defaults or {}))
    ignores = tuple(ignores)
    out = []
    for key in sorted(set(old) | set(new)):
        if any(key == ig or key.startswith(ig + ".") for ig in ignores):
            continue
        a, b = old.get(key, defaults.get(key, _ABSENT)), new.get(key, _ABSENT)
        show = lambda v: "(none)" if v is _ABSENT else json.dumps(v)  # noqa: E731
        if show(a) != show(b):
            out.append(f"{flag(key)} was {show(a)}, now {show(b)}")
    return out


def read_owner(folder: str | os.PathLike) -> dict | None:
    """The owner record (``run.json``) of a run folder, or None when it has none."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT or "entry" not in record:
        raise ValueError(f"{path}: not a run owner record (expected format {RUN_FORMAT!r})")
    if record.get("version") != RUN_VERSION:
        raise ValueError(
            f"{path}: owner record version {record.get('version')}, this code reads {RUN_VERSION}"
        )
    return record


def _lock(folder: Path) -> int:
    """An exclusive ``flock`` on ``folder/.run.lock`` (its descriptor), or ``ValueError`` naming the holder."""
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        who = "this process" if holder == str(os.getpid()) else "another process"
        raise ValueError(f"{folder} is in use by {who} (pid {holder})") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class RunFolder:
    """A run folder opened for writing by one entry point: locked, cleaned, its owner checked (module doc).

    Use as a context manager (or call `close`): the lock is held until then.

    Args:
        path: the folder (created with its parents).
        entry: the entry point that writes it, e.g. ``"agents.hepo"``.
        settings: what determines the run (its flags); recorded on first use, compared on later ones.
        ignores: settings that may change between the recorded run and this one (e.g. ``iterations``).
        defaults: values of settings the record lacks (flags added since it was written).
        same_settings: False for folders of independent runs that share the owner only (an evaluation
            cache): other settings are allowed, the record keeps the first.

    Raises:
        ValueError: one line naming the folder: it is in use by another process (pid N); another entry point
            owns it; it holds a run with other settings (the differing flags); or it holds files but no
            ``run.json`` (written by hand or by an older version: nothing says what it is).

    Attributes:
        fresh: True when this call claimed the folder (it had no ``run.json``).
        record: the owner record (``run.json``): format, version, entry, settings, created, pid.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        entry: str,
        settings: Mapping[str, Any],
        ignores: Iterable[str] = (),
        defaults: Mapping[str, Any] | None = None,
        same_settings: bool = True,
    ) -> None:
        self.path, self.entry = Path(path), entry
        self.path.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = _lock(self.path)
        try:
            remove_orphans(self.path)
            self.fresh, self.record = self._claim(_normal(settings), tuple(ignores), defaults, same_settings)
        except BaseException:
            self.close()
            raise

    def _claim(
        self, settings: dict, ignores: tuple[str, ...], defaults, same_settings: bool
    ) -> tuple[bool, dict]:
        record = read_owner(self.path)
        if record is None:
            content = sorted(p.name for p in self.path.iterdir() if not p.name.startswith("."))
            if content:
                raise ValueError(
                    f"{self.path} holds files ({', '.join(content[:4])}{', ...' if len(content) > 4 else ''}) "
                    f"but no {RUN_FILE} saying which run wrote them: pass another --out or remove them"
                )
            record = {
                "format": RUN_FORMAT,
                "version": RUN_VERSION,
                "entry": self.entry,
                "settings": settings,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "pid": os.getpid(),
            }
            write_json(self.path / RUN_FILE, record)
            return True, record
        if record["entry"] != self.entry:
            raise ValueError(
                f"{self.path} holds a run of {record['entry']}, not of {self.entry}: pass another --out"
            )
        if same_settings:
            diff = settings_diff(record.get("settings", {}), settings, ignores, defaults)
            if diff:
                raise ValueError(
                    f"{self.path} holds a run with other settings ({'; '.join(diff)}): pass another --out"
                )
        return False, record

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
