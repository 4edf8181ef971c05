"""The pre-training pipeline's stages on one preset, timed one by one: where the minutes of a large run go.

    python benchmarks/bench_pipeline.py --device cpu --preset small --envs 64 --steps 20 --mtp-steps 5   # smoke
    python benchmarks/bench_pipeline.py --device cuda --preset large --envs 16384 --steps 8 --mtp-steps 50

Each stage is the library call ``agents.hepo --profile gpu-large`` makes, in order, in a scratch folder:

- ``world``: ``generate_world`` of the preset (always on the CPU, then moved: the bytes match on every device);
  the process's world cache (``gpr_sim.world.catalog``) keeps it, so the later stages' own ``generate_world``
  calls only move it, as they do in one ``agents.hepo`` process;
- ``collect``: ``write_log(collect_config(...))``, the ``cascade-privileged`` log of ``--envs`` sessions x
  ``--steps`` steps on ``--device``, Parquet written;
- ``tokenizer``: ``ensure_inputs``' RQ-Kmeans+ fit (``--codebook`` codes per level) on every item, on ``--device``;
- ``load_data``: ``load_data`` (read the log, load the tokenizer, tokenise every request with the platform
  features, targets, the split; legal masks are drawn per minibatch in training, not here);
- ``mtp``: ``pretrain`` of ``--mtp-steps`` steps at ``--batch`` requests (its own ``load_data`` included; the
  row also gives the steps/s of the training loop alone, from the stage's ``summary.json``).

Rows: stage, seconds, items (requests or steps) and the rate. The ``extrapolated`` column scales the collect
and load_data rows linearly to ``--target-requests`` (the gpu-large profile's 1,048,576) so a short run says
how long the full one takes. Prints the table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from agents.collection import write_log
from agents.pretraining.config import PretrainConfig
from agents.pretraining.data import collect_config, ensure_inputs, load_data
from agents.pretraining.trainer import pretrain
from gpr_sim.runs import write_json
from gpr_sim.world import preset
from gpr_sim.world.catalog import generate_world


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []

    def row(stage: str, seconds: float, items: float, unit: str, scale: float = 1.0) -> None:
        r = dict(
            stage=stage,
            seconds=seconds,
            items=items,
            unit=unit,
            rate=items / seconds if seconds > 0 else float("nan"),
            extrapolated_s=seconds * scale,
        )
        rows.append(r)
        print(f"  {stage:<10} {seconds:9.2f} s  {items:>10.0f} {unit:<9} {r['rate']:12.1f}/s", flush=True)

    root = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    cfg = PretrainConfig(
        out=str(root / "mtp"),
        device=args.device,
        preset=args.preset,
        collect_envs=args.envs,
        collect_steps=args.steps,
        codebook_size=args.codebook,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        batch_size=args.batch,
        steps=max(args.mtp_steps, 1),  # PretrainConfig needs >= 1; --mtp-steps 0 skips the stage
        eval_every=max(args.mtp_steps, 1),
        checkpoint_every=max(args.mtp_steps, 1),
        progress=False,
    )
    requests = args.envs * args.steps
    scale = args.target_requests / requests

    world_cfg = preset(args.preset)
    world, sec = _timed(lambda: generate_world(world_cfg, 0))
    row("world", sec, world.ad_emb.shape[0], "ads")
    del world

    out = Path(cfg.out)
    logs = out / "logs.parquet"
    _, sec = _timed(lambda: write_log(collect_config(cfg, logs)))
    row("collect", sec, requests, "requests", scale)

    _, sec = _timed(lambda: ensure_inputs(cfg, out))  # the log exists: only the tokenizer is fitted
    row("tokenizer", sec, 1, "fit")

    tok_dir = out / "tokenizer"
    data, sec = _timed(lambda: load_data(cfg, logs, tok_dir))
    row("load_data", sec, len(data.train) + len(data.held_out), "requests", scale)
    del data

    if args.mtp_steps > 0:
        stage = dataclasses.replace(cfg, logs=str(logs), tokenizer=str(tok_dir), out=str(root / "mtp_run"))
        _, sec = _timed(lambda: pretrain(stage))
        row("mtp", sec, args.mtp_steps, "steps")
        last = json.loads((root / "mtp_run" / "metrics.jsonl").read_text().splitlines()[-1])
        print(f"  (training loop with its evaluation: {last['perf/steps_per_s']:.2f} steps/s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="large")
    p.add_argument("--envs", type=int, default=16384, help="concurrent sessions of the collection")
    p.add_argument(
        "--steps", type=int, default=8, help="collection steps (the profile's 64 are extrapolated)"
    )
    p.add_argument(
        "--target-requests", type=int, default=16384 * 64, help="what collect/load_data extrapolate to"
    )
    p.add_argument("--codebook", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--mtp-steps", type=int, default=50)
    p.add_argument("--out", default="benchmarks/results/bench_pipeline.json")
    args = p.parse_args(argv)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"bench_pipeline: {args.preset} preset on {device}", flush=True)
    rows = run(args)
    print(f"\n{'stage':<10} {'seconds':>9} {'items':>10} {'unit':<9} {'rate/s':>12} {'at target s':>12}")
    for r in rows:
        print(
            f"{r['stage']:<10} {r['seconds']:9.2f} {r['items']:10.0f} {r['unit']:<9} {r['rate']:12.1f}"
            f" {r['extrapolated_s']:12.1f}"
        )
    result = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=device,
        torch=torch.__version__,
        args=vars(args),
        rows=rows,
    )
    write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
