"""Collect logged data: run a behaviour policy in the batched market and write one Parquet row per request.

    python -m agents.collect --env ads-v0 --policy cascade-privileged --num-envs 256 --steps 200 --seed 0 \
        --out runs/logs/cascade-privileged.parquet [--preset small] [--temperature 0.3] [--world.num-ads 1000]

Every request is recorded from the observation *before* the step (the U/O/E/I tokens the policy saw),
the policy's ordered candidates and their propensity, and the step's outcome. The columns are
`gpr_sim.data.logs.SCHEMA`; the file's metadata holds the world config, seeds, policy and sizes, which
is everything `agents.ope` needs to re-simulate the same requests.

Tensors stay on the env's device during the loop; they are stacked and copied to the host once at
the end, and the Parquet list columns are built from those flat arrays (no loop over requests).
"""

from __future__ import annotations

from pathlib import Path

from agents.cli import parse_args_with_world, run_main, world_config
from agents.collection import CollectConfig, write_log
from gpr_sim.world import WorldConfig

Args = CollectConfig
"""CLI of `python -m agents.collect` (world fields are `--world.<field>` flags over the preset)."""


def parse(argv: list[str] | None = None) -> tuple[Args, WorldConfig]:
    """``Args`` and the world config (the preset with the ``--world.*`` overrides) from the command line."""
    args, overrides = parse_args_with_world(Args, argv, __doc__, entry="agents.collect")
    return args, world_config(args.preset, overrides)


def main(argv: list[str] | None = None) -> Path:
    """Collect a log and write it; prints a summary and returns the Parquet path."""
    return write_log(*parse(argv))


if __name__ == "__main__":
    run_main(main)
