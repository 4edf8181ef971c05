"""Fit the semantic-ID tokenizer of an ads-v0 world, with the Table-1 analogue beside it.

    python -m agents.tokenize --env ads-v0 --preset small --method rq-kmeans-plus --out runs/tokenizer
    python -m agents.tokenize --preset small --world.num-ads 2000 --vae-steps 500 --no-compare

Builds the world the env would build (same preset, overrides and ``--world-seed``), fits RQ-VAE,
RQ-Kmeans and RQ-Kmeans+ on its [organic; ads] embeddings with one seed (``--no-compare``: only
``--method``) and writes into ``--out``:

| file | content |
|---|---|
| ``table.csv``, ``table.json``, ``code_usage.png`` | the Table-1 analogue (``gpr_sim.tokenizer.compare.write_table``) |
| ``code_usage_levels.png`` | items per code at every level, per method (dead codes show as zeros) |
| ``semantic_ids.pt``, ``quantizer.pt`` | the ``--method`` tokenizer: ``WorldTokenizer.load(out)`` or ``gymnasium.make("ads-v0", action_mode="semantic", tokenizer=out)`` |
| ``config.json`` | arguments, world config, tokenizer summary |

The folder is locked while a fit writes it; a fit with other settings than the folder's first (``run.json``,
``gpr_sim.runs.RunFolder``) is refused, naming them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from agents.cli import check_args, parse_configs, run_main, world_config
from envs import ENV_ID
from gpr_sim.runs import RunFolder, atomic_write_bytes, figure_bytes, write_json
from gpr_sim.tokenizer.compare import CompareConfig, write_table
from gpr_sim.tokenizer.world import (
    METHODS,
    fit_world_tokenizers,
    plot_code_usage,
    tokenizer_summary,
    tokenizer_table,
)
from gpr_sim.world import generate_world

ENTRY = "agents.tokenize"
"""the owner of its output folders (``gpr_sim.runs.RunFolder``)"""
RESUME_IGNORES = ("device", "out")
"""flags that may change between two fits into one folder (the fit itself is the same)"""


@dataclass(frozen=True)
class Args:
    """Command line of ``python -m agents.tokenize`` (quantiser settings: ``CompareConfig``)."""

    env: str = ENV_ID
    """env id whose world gets semantic IDs (only ads-v0 exists)"""
    preset: str = "small"
    """world preset: small | large"""
    world_seed: int = 0
    """seed of the static world (must match the env's ``world_seed`` to use the tokenizer there)"""
    method: str = "rq-kmeans-plus"
    """tokenizer to save: rq-vae | rq-kmeans | rq-kmeans-plus"""
    compare: bool = True
    """fit all three methods for the Table-1 analogue (False: only ``method``)"""
    out: str = "runs/tokenizer"
    """output folder (the tokenizer is saved here too)"""
    seed: int = 0
    """seed of every fit's torch.Generator"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """where to fit"""

    def __post_init__(self) -> None:
        check_args(self)
        if self.env != ENV_ID:
            raise ValueError(f"env={self.env!r} is unknown: expected {ENV_ID!r}")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not allowed: expected one of {tuple(METHODS)}")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """CLI entry point; returns the Table-1 DataFrame."""
    args, cfg, overrides = parse_configs(Args, CompareConfig, argv=argv, description=__doc__, world=True)
    world_cfg = world_config(args.preset, overrides)

    settings = {
        **dataclasses.asdict(args),
        **dataclasses.asdict(cfg),
        "world": world_cfg.to_dict(),
    }  # keys = flags
    with RunFolder(args.out, ENTRY, settings, RESUME_IGNORES) as folder:
        return _fit(args, cfg, world_cfg, folder.path)


def _fit(args: Args, cfg: CompareConfig, world_cfg, out: Path) -> pd.DataFrame:
    world = generate_world(world_cfg, args.world_seed, args.device)
    methods = tuple(METHODS) if args.compare else (args.method,)
    tokenizers = fit_world_tokenizers(world, cfg, args.seed, methods)
    df = tokenizer_table(tokenizers, world)

    paths = write_table(df, out)
    atomic_write_bytes(out / "code_usage_levels.png", figure_bytes(plot_code_usage(tokenizers), dpi=120))
    tok = tokenizers[args.method]
    tok.save(out)
    write_json(
        out / "config.json",
        {
            "args": dataclasses.asdict(args),
            "compare": dataclasses.asdict(cfg),
            "world": world_cfg.to_dict(),
            "tokenizer": tokenizer_summary(tok),
        },
    )
    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 160):
        print(df)
    print(f"saved {args.method} tokenizer (level sizes {tok.level_sizes}) to {out}")
    print("wrote", ", ".join(str(v) for v in paths.values()))
    return df


if __name__ == "__main__":
    run_main(main)
