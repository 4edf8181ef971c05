"""Fit a learned platform from a log: the ranker's pCTR/pCVR, two-tower retrieval and a distilled pre-ranker.

    python -m agents.collect --num-envs 256 --steps 100 --out runs/logs/cascade.parquet
    python -m agents.fit_platform --logs runs/logs/cascade.parquet --out runs/platform/small \
        [--preset small --world-seed 0] [--retrieval.epochs 30] [--preranking.hidden 16] [--states 1024]

Writes the platform folder (``agents.platform.folder``: funnel.pt, retrieval.pt, preranking.pt,
report.json, report.md) that the ``learned-cascade:DIR`` policy serves. The world is the log's (its
metadata); ``--preset`` / ``--world-seed``, when given, are checked against it so a folder is never fitted
on another world than the one named. Settings: ``PlatformFitConfig`` (nested ``--funnel.*``,
``--retrieval.*``, ``--preranking.*``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from agents.cli import check_args, parse_configs, run_main
from agents.platform.pipeline import PlatformFitConfig, report_markdown, write_platform_folder
from gpr_sim.data.logs import log_world, read_logs
from gpr_sim.world import preset


@dataclass(frozen=True)
class Args:
    """Command line of ``python -m agents.fit_platform`` (fit settings: ``PlatformFitConfig``)."""

    logs: str
    """the log to fit on (``python -m agents.collect``)"""
    out: str
    """the platform folder to write"""
    preset: str = ""
    """world preset the log must be of (empty: take the log's world without a check)"""
    world_seed: int = -1
    """world seed the log must be of (-1: take the log's without a check)"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """where to fit"""
    progress: bool = True
    """show the funnel fit's progress"""

    def __post_init__(self) -> None:
        check_args(self)
        if isinstance(self.world_seed, bool) or self.world_seed < -1:
            raise ValueError(
                f"world_seed={self.world_seed!r} is invalid: expected -1 (the log's) or a seed >= 0"
            )


def check_log_world(args: Args, meta: dict):
    """The log's (world config, world seed), after checking them against ``--preset`` / ``--world-seed``."""
    world, seed = log_world(meta)
    if args.preset and preset(args.preset).to_dict() != world.to_dict():
        raise ValueError(f"preset={args.preset!r} does not match {args.logs}: its world is not the preset's")
    if args.world_seed >= 0 and args.world_seed != seed:
        raise ValueError(f"world_seed={args.world_seed} does not match {args.logs}: its world seed is {seed}")
    return world, seed


def main(argv: list[str] | None = None) -> Path:
    """CLI entry point; returns the platform folder."""
    args, cfg = parse_configs(Args, PlatformFitConfig, argv=argv, description=__doc__)
    df, meta = read_logs(args.logs)
    world, world_seed = check_log_world(args, meta)
    settings = {**dataclasses.asdict(args), **dataclasses.asdict(cfg)}
    path, report = write_platform_folder(
        df, world, world_seed, cfg, args.out, settings, args.logs, args.device, args.progress
    )
    print(report_markdown(report))
    print(f"wrote the platform folder {path}")
    return path


if __name__ == "__main__":
    run_main(main)
