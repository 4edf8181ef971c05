"""Small shared helpers for the tests: run a policy in a BatchedMarket and collect outcomes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from agents.rl.distributed import ENV_VARS
from envs.market import BatchedMarket
from gpr_sim.world import WorldConfig


def random_candidates(market: BatchedMarket, gen: torch.Generator) -> torch.Tensor:
    cfg = market.config
    return torch.randint(0, cfg.num_ads, (market.num_envs, cfg.num_candidates), generator=gen)


def rollout(cfg: WorldConfig, num_envs: int, steps: int, seed: int = 0, policy=None, world_seed: int = 0):
    """Run ``steps`` batched steps; returns (market, list of Outcome, list of obs)."""
    market = BatchedMarket(cfg, num_envs, world_seed=world_seed)
    obs = market.reset(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    outcomes, observations = [], [obs]
    for _ in range(steps):
        action = policy(market, obs) if policy is not None else random_candidates(market, gen)
        obs, out, _, _, _ = market.step(action)
        outcomes.append(out)
        observations.append(obs)
    return market, outcomes, observations


def stack(outcomes, field: str) -> torch.Tensor:
    return torch.stack([getattr(o, field) for o in outcomes])


ROOT = Path(__file__).resolve().parents[1]
TINY_PRETRAIN = (
    "--collect-envs 16 --collect-steps 20 --d-model 16 --n-layers 1 --batch-size 32 --steps 3 --eval-every 3 "
    "--checkpoint-every 3 --eval-requests 16 --threads 1 --no-progress"
).split()
"""``agents.pretrain`` flags of a seconds-long stage (tiny log, model and schedule) for end-to-end tests"""


def torchrun(module: str, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m module -- args`` on CPU (gloo), one thread per process."""
    drop = (*ENV_VARS, "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        module,
        "--",
        *args,
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res
