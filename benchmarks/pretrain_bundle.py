"""A pre-training pipeline folder (``agents.hepo --pretrain-dir``) packed into parts small enough to move
between machines, and unpacked into a folder the RL starts from without pre-training again.

    python benchmarks/pretrain_bundle.py pack runs/d3/pre runs/bundle            # parts of <= 15 MiB
    python benchmarks/pretrain_bundle.py unpack runs/bundle runs/d3b/pre
    python -m agents.hepo --profile gpu-large --pretrain-dir runs/d3b/pre ...     # reuses every stage

Why: a lent GPU machine returns at most 16 MiB per file and 64 MiB in all, takes 64 MiB along, and is released
30 s after a call, so a learner call cannot reuse the 8-minute gpu-large pre-training of an earlier call
unless the pre-training travels. What the RL needs of it is small beside its logs: the start generator's
weights, the tokenizer's semantic IDs, the platform's models (the learned reward and cascade) and the stages'
``config.json`` / ``summary.json`` (``agents.pretraining.pipeline.stage_done`` reads the summaries). The logs,
the optimiser states and ``best.pt`` stay behind.

What changes on the way: with ``--weights bf16`` (the default; the gpu-large generator is 13.6M parameters,
52 MiB in float32) every floating-point weight is rounded to bfloat16 and unpacked back to float32, so the
unpacked start is the packed one to bfloat16's precision (2^-9 relative), not bit for bit: evaluate the
unpacked start beside the learners (``run_side_by_side.sh`` does). ``--weights fp32`` keeps them exact. The
semantic IDs travel as uint8 or int16 (exact). ``unpack`` writes each stage's model as ``policy.pt`` (what
``agents.policies.gpr.model_file`` loads first), points the stages' ``tokenizer_path`` at the unpacked
tokenizer and records the bundle in ``bundle.json``; a part missing, extra or altered is refused with one line.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from agents.cli import run_main  # noqa: E402
from agents.platform.folder import MODEL_FILES, REPORT_FILES  # noqa: E402
from agents.policies.gpr import load_run_model, model_from_payload, save_policy  # noqa: E402
from agents.pretraining.pipeline import FUNNEL_FILE  # noqa: E402
from gpr_sim.runs import atomic_write_bytes, checkpoint_bytes, load_torch, read_json, write_json  # noqa: E402
from gpr_sim.tokenizer.world import IDS_FILE, QUANTIZER_FILE  # noqa: E402

FORMAT = "gpr_sim.pretrain_bundle"
VERSION = 1
MANIFEST = "pre_bundle.json"
PART = "pre_bundle.{:03d}"
STAGES = ("mtp", "vaft")
WEIGHTS = ("bf16", "fp32")
STAGE_FILES = ("config.json", "summary.json")
"""what ``stage_done`` and the RL read of a stage besides its model"""


def _byte_tensor(data: bytes) -> torch.Tensor:
    """``data`` as a uint8 tensor (what ``weights_only`` loading accepts; ``frombuffer`` refuses an empty one)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _verbatim(pre: Path) -> dict[str, bytes]:
    """The small files that travel as they are, by their path in ``pre``: the stages' records, the platform's
    models and reports (``pre/platform``) and the reward funnel of a pipeline without a platform."""
    names = [f"{s}/{f}" for s in STAGES for f in STAGE_FILES]
    names += [f"platform/{f}" for f in (*MODEL_FILES, *REPORT_FILES)] + [
        f"funnel/{FUNNEL_FILE}",
        "funnel/report.json",
    ]
    return {name: (pre / name).read_bytes() for name in names if (pre / name).is_file()}


def pack(
    pre: Path, out: Path, part_mib: float = 15.0, weights: str = "bf16", stages: tuple = ("vaft",)
) -> list[Path]:
    """Write ``out/pre_bundle.NNN`` parts of at most ``part_mib`` MiB and ``out/pre_bundle.json`` (their
    sizes and SHA-256); returns the parts. ``stages``: whose models travel (the RL starts from VAFT; MTP's only
    for ``--rl-start mtp`` or its evaluation)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is unknown: expected one of {list(WEIGHTS)}")
    size = int(part_mib * 2**20)
    if size < 1:
        raise ValueError(f"part_mib={part_mib} is invalid: expected > 0")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise ValueError(f"stages {list(stages)} are invalid: expected some of {list(STAGES)}")
    for stage in STAGES:
        if not (pre / stage / "summary.json").is_file():
            raise ValueError(
                f"{pre / stage}: no finished stage here (summary.json): pack a finished pre-training"
            )
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    models = {}
    for stage in stages:
        model, _ = load_run_model(pre / stage)  # its policy.pt or checkpoint.pt, checked against its config
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        models[stage] = {"config": model.cfg.to_dict(), "model": state}
    tok_dir = Path(read_json(pre / "vaft" / "config.json")["tokenizer_path"])
    ids = torch.load(tok_dir / IDS_FILE, map_location="cpu", weights_only=True)
    codes = ids["codes"]
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    if lo < 0 or hi >= 2**15:
        raise ValueError(f"{tok_dir / IDS_FILE}: codes in [{lo}, {hi}] do not fit int16")
    # the large world's 3M items x 3 levels: 9 MiB as uint8 (codes < 256), 17 as int16, 69 as int64
    ids = {**ids, "codes": codes.to(torch.uint8 if hi < 256 else torch.int16)}
    quantizer = (tok_dir / QUANTIZER_FILE).read_bytes() if (tok_dir / QUANTIZER_FILE).is_file() else b""
    data = checkpoint_bytes(
        FORMAT,
        VERSION,
        {
            "weights": weights,
            "models": models,
            "tokenizer": ids,
            "quantizer": _byte_tensor(quantizer),
            "files": {k: _byte_tensor(v) for k, v in _verbatim(pre).items()},
        },
    )
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("pre_bundle.*"):
        old.unlink()
    parts = [
        atomic_write_bytes(out / PART.format(i), data[o : o + size])
        for i, o in enumerate(range(0, len(data), size))
    ]
    write_json(
        out / MANIFEST,
        {
            "format": FORMAT,
            "version": VERSION,
            "source": str(pre),
            "weights": weights,
            "stages": list(stages),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "parts": [p.name for p in parts],
        },
    )
    return parts


def _read_parts(src: Path) -> tuple[dict, bytes]:
    manifest_path = src / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{src}: no {MANIFEST} here (expected the folder pretrain_bundle.py pack wrote)")
    manifest = read_json(manifest_path)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{manifest_path}: not a version-{VERSION} {FORMAT} manifest")
    missing = [p for p in manifest["parts"] if not (src / p).is_file()]
    if missing:
        raise ValueError(f"{src}: bundle parts {missing} are missing")
    data = b"".join((src / p).read_bytes() for p in manifest["parts"])
    if len(data) != manifest["bytes"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise ValueError(
            f"{src}: the bundle's parts do not add up to what was packed (size or SHA-256 differs)"
        )
    return manifest, data


def unpack(src: Path, pre: Path) -> Path:
    """Write the pipeline folder ``pre`` from the bundle in ``src``; returns ``pre``. A folder that already holds
    a stage is refused (nothing there is overwritten)."""
    manifest, data = _read_parts(src)
    for stage in STAGES:
        if (pre / stage).exists():
            raise ValueError(f"{pre / stage}: exists; unpack into an empty pipeline folder")
    # load_torch reads a path: the joined parts (checked above), beside the destination (src may be read-only)
    tmp = atomic_write_bytes(pre.parent / f".{pre.name}.bundle", data)
    try:
        payload = load_torch(
            tmp, FORMAT, VERSION, "a gpr_sim pre-training bundle", ("models", "tokenizer", "files")
        )
    finally:
        tmp.unlink(missing_ok=True)
    for name, raw in payload["files"].items():
        atomic_write_bytes(pre / name, raw.numpy().tobytes())
    tok_dir = pre / "mtp" / "tokenizer"
    ids = {**payload["tokenizer"], "codes": payload["tokenizer"]["codes"].to(torch.int64)}
    buf = io.BytesIO()
    torch.save(ids, buf)
    atomic_write_bytes(tok_dir / IDS_FILE, buf.getvalue())
    if payload["quantizer"].numel():
        atomic_write_bytes(tok_dir / QUANTIZER_FILE, payload["quantizer"].numpy().tobytes())
    for stage in STAGES:  # the recorded tokenizer is the unpacked one
        cfg_path = pre / stage / "config.json"
        write_json(cfg_path, {**read_json(cfg_path), "tokenizer_path": str(tok_dir)})
    for stage, packed in payload["models"].items():
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in packed["model"].items()}
        path = pre / stage / "policy.pt"
        save_policy(path, model_from_payload(path, {"config": packed["config"], "model": state}))
    write_json(pre / "bundle.json", {k: manifest[k] for k in ("source", "weights", "stages", "sha256")})
    return pre


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="PRE -> parts in OUT")
    a.add_argument("pre", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--part-mib", type=float, default=15.0)
    a.add_argument("--weights", default="bf16", help=f"one of {WEIGHTS}")
    a.add_argument("--stages", default="vaft", help=f"comma-separated, of {STAGES}: whose models travel")
    b = sub.add_parser("unpack", help="parts in SRC -> PRE")
    b.add_argument("src", type=Path)
    b.add_argument("pre", type=Path)
    args = p.parse_args(argv)
    if args.command == "pack":
        stages = tuple(s for s in args.stages.split(",") if s)
        parts = pack(args.pre, args.out, args.part_mib, args.weights, stages)
        total = sum(q.stat().st_size for q in parts)
        print(
            f"{args.pre} -> {len(parts)} parts in {args.out}, {total / 2**20:.1f} MiB ({args.weights} weights)"
        )
    else:
        unpack(args.src, args.pre)
        print(f"{args.src} -> {args.pre}: {json.dumps(read_json(args.pre / 'bundle.json'))}")


if __name__ == "__main__":
    run_main(main)
