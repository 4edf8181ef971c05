"""User-steps per second of ads-v0: SB3 DummyVecEnv of single envs vs the native batched env.

    python benchmarks/bench_env.py --device cpu --sizes 1024,65536
    python benchmarks/bench_env.py --device cuda --sizes 65536,1048576,4194304 --compile

Every row is the full default step with ``--candidates`` candidates per request: auction, funnel,
budgets, organic consumption, observations and autoreset. Actions are pre-generated on the device.
``eager`` is ``BatchedMarket.step`` (the reference path); ``compiled`` runs the same pure core
(transition + observe) through ``torch.compile`` and resets finished rows eagerly. The floor column
is the minimum bytes a user-step must move over the measured copy bandwidth (see ``bytes_per_step``).
Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import torch

from agents.cli import run_main
from envs.market import BatchedMarket
from gpr_sim.world import WorldConfig, initial, observe, transition


def bytes_per_step(cfg: WorldConfig) -> int:
    """Lower bound of bytes one user-step moves: state read + written, gathered catalog rows, action."""
    d, k, s = cfg.emb_dim, cfg.num_candidates, cfg.num_slots
    state = (
        4 * d + 8 * cfg.organic_history + 16 * cfg.ad_history + 3 * 8 * 4 + 8 * 10
    )  # interest, hists, pending, scalars
    per_candidate = 8 + 4 * d + 4 * 4 + 8  # id, embedding, quality/bias/bid/advertiser
    organic = cfg.organic_per_request * cfg.organic_candidates * 4 * d
    funnel = s * (4 * d + 32)
    obs = 4 * (7 + 8) + 8 * (cfg.organic_history + 2 * cfg.ad_history)
    return 2 * state + k * per_candidate + organic + funnel + obs


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in bytes/s (read + write)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    return 2 * 4 * n * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, actions: list[torch.Tensor], device, warmup: int) -> float:
    for i in range(warmup):
        step(actions[i % len(actions)])
    sync(device)
    t = time.perf_counter()
    for a in actions:
        step(a)
    sync(device)
    return time.perf_counter() - t


def native_step(market: BatchedMarket, compiled: bool):
    """The timed step of ``market`` for (N, K) candidates: ``market.step`` (eager), or the pure core
    (transition + observe) through ``torch.compile`` with finished rows reset eagerly (one host sync)."""
    if not compiled:
        return market.step
    world = market.world

    @torch.compile(dynamic=False)
    def core_step(state, mkt, cand):
        state, mkt, out = transition(world, state, mkt, cand)
        return state, mkt, out, observe(world, state)

    def step(cand):
        state, market.market, out, _ = core_step(market.state, market.market, cand)
        rows = torch.nonzero(out.terminated | out.truncated).squeeze(1)
        if rows.numel() > 0:
            fresh = initial(
                world, state.seed[rows], state.slot[rows], state.counter[rows], state.episode[rows] + 1
            )
            state = state.put(rows, fresh)
        market.state = state

    return step


def bench_native(cfg: WorldConfig, n: int, steps: int, device: torch.device, compiled: bool) -> float:
    market = BatchedMarket(cfg, n, device=device)
    market.reset(seed=0)
    gen = torch.Generator(device=device).manual_seed(0)
    actions = [
        torch.randint(0, cfg.num_ads, (n, cfg.num_candidates), generator=gen, device=device) for _ in range(4)
    ]
    actions = [actions[i % 4] for i in range(steps)]
    return n * steps / time_steps(native_step(market, compiled), actions, device, warmup=5 if compiled else 3)


def bench_dummy_vec(cfg: WorldConfig, n: int, steps: int) -> float:
    import numpy as np
    from stable_baselines3.common.vec_env import DummyVecEnv

    from envs import AdsEnv

    vec = DummyVecEnv([lambda: AdsEnv(config=cfg) for _ in range(n)])
    vec.seed(0)
    vec.reset()
    rng = np.random.default_rng(0)
    shape = (n,) if cfg.num_candidates == 1 else (n, cfg.num_candidates)
    acts = [rng.integers(0, cfg.num_ads, shape) for _ in range(steps)]
    vec.step(acts[0])
    t = time.perf_counter()
    for a in acts:
        vec.step(a)
    return n * steps / (time.perf_counter() - t)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="1024,65536", help="comma-separated numbers of concurrent sessions")
    p.add_argument("--candidates", type=int, default=40)
    p.add_argument("--num-ads", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd core")
    p.add_argument("--dummy-envs", type=int, default=8, help="single envs under SB3 DummyVecEnv (0 = skip)")
    p.add_argument("--out", default="benchmarks/bench_env.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = WorldConfig.small(
        num_candidates=args.candidates,
        num_ads=args.num_ads,
        num_advertisers=1000,
        num_organic=200_000,
        num_users=1_000_000,
    )
    bw = copy_bandwidth(device)
    floor_sps = bw / bytes_per_step(cfg)
    rows = []
    if args.dummy_envs > 0:
        sps = bench_dummy_vec(cfg, args.dummy_envs, max(args.steps, 50))
        rows.append(
            {"path": "sb3-dummyvec", "device": "cpu", "num_envs": args.dummy_envs, "user_steps_per_s": sps}
        )
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    for n in [int(s) for s in args.sizes.split(",")]:
        for mode in modes:
            try:
                sps = bench_native(cfg, n, args.steps, device, compiled=(mode == "compiled"))
            except torch.OutOfMemoryError:
                print(f"out of memory at N={n} ({mode})", flush=True)
                torch.cuda.empty_cache()
                continue
            except Exception as e:  # a compiler failure must not lose the eager rows
                print(f"{mode} failed at N={n}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rows.append(
                {
                    "path": f"native-{mode}",
                    "device": str(device),
                    "num_envs": n,
                    "user_steps_per_s": sps,
                    "floor_fraction": sps / floor_sps,
                    "peak_gib": peak,
                }
            )
            print(f"  {mode} N={n}: {sps:,.0f} user-steps/s", flush=True)
    base = next((r["user_steps_per_s"] for r in rows if r["path"] == "sb3-dummyvec"), None)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"device: {name}; candidates {args.candidates}; ads {args.num_ads}; copy bandwidth {bw / 1e9:.0f} GB/s; "
        f"floor {floor_sps / 1e6:.0f}M user-steps/s ({bytes_per_step(cfg)} B/step)"
    )
    print(f"{'path':<18}{'N':>10}{'user-steps/s':>16}{'x dummyvec':>12}{'of floor':>10}{'peak GiB':>10}")
    for r in rows:
        ratio = r["user_steps_per_s"] / base if base else float("nan")
        print(
            f"{r['path']:<18}{r['num_envs']:>10}{r['user_steps_per_s']:>16,.0f}{ratio:>12.0f}"
            f"{r.get('floor_fraction', float('nan')):>10.3f}{r.get('peak_gib', float('nan')):>10.2f}"
        )
    result = {
        "device": name,
        "date": datetime.now(timezone.utc).isoformat(),
        "args": vars(args),
        "copy_bandwidth_Bps": bw,
        "bytes_per_step": bytes_per_step(cfg),
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return rows


if __name__ == "__main__":
    run_main(main)
