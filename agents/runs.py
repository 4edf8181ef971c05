"""Run folders: naming, atomic JSON/CSV writes, and the metrics log that plots read.

A run folder holds ``config.json``, ``metrics.jsonl`` (one flat dict per line, namespaced keys),
checkpoints and plots. Every file is written atomically (temp file, then ``os.replace``) so an
interrupted run never leaves a half-written result behind.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any


def run_name(env_id: str, algo: str, seed: int) -> str:
    """CleanRL-style ``env__algo__seed__time``."""
    return f"{env_id}__{algo}__{seed}__{int(time.time())}"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, json.dumps(obj, indent=2, default=_jsonable).encode())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def append_metrics(path: str | Path, row: dict) -> None:
    """Append one flat metrics dict as a JSON line (re-written atomically: the file stays small)."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    atomic_write_bytes(path, old + json.dumps(row, default=_jsonable).encode() + b"\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_torch(path: str | Path, payload: dict) -> Path:
    """``torch.save`` a checkpoint dict atomically (a crash never leaves half a file)."""
    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_torch(path: str | Path, fmt: str, version: int, what: str, required: tuple[str, ...] = ()) -> dict:
    """Load a checkpoint dict safely (``weights_only``) and check its ``format``/``version`` header.

    Raises:
        ValueError: naming the file and the problem: unreadable, not ``what`` (another format), another
            version, or missing one of ``required`` keys.
    """
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{path}: not {what} (missing format header)")
    if payload.get("version") != version:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')}, this code reads {version}")
    missing = [k for k in required if k not in payload]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing}")
    return payload
