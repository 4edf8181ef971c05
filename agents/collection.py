"""Behaviour-policy log collection: run a policy in the batched market and record one row per request.

`collect` records every request from the observation *before* the step (the U/O/E/I tokens the policy
saw, and the market features of the platform's ledger at that moment: the env's ``market_features()``), the
policy's ordered candidates and their propensity, and the step's outcome; `write_log` runs a
`CollectConfig` and writes the Parquet log (`gpr_sim.data.logs.SCHEMA`; its metadata holds the world
config, seeds, policy and sizes, which is everything `agents.ope` needs to re-simulate the same requests).

Tensors stay on the env's device during the loop; they are stacked and copied to the host once at
the end, and the Parquet list columns are built from those flat arrays (no loop over requests).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from agents.cli import check_args
from agents.policies import PolicyOutput, canonical_policy, make_policy, policy_factory, policy_options
from envs import make_vec_env
from gpr_sim.data.logs import write_logs
from gpr_sim.runs import run_name
from gpr_sim.stats import critical_value
from gpr_sim.world import WorldConfig, preset
from gpr_sim.world.config import check_range

FINAL_COLUMNS = ("final_organic_ids", "final_context", "final_ad_ids", "final_ad_events")


# ----------------------------------------------------------------------------- loop


StepHook = Callable[[object, dict, PolicyOutput], dict]
"""``hook(env, obs, policy_output) -> {name: (N, ...) tensor}``, called after ``act`` and before ``step``."""


def collect(
    env, policy, seed: int, steps: int, hook: StepHook | None = None, progress: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run ``policy`` for ``steps`` batched steps from ``env.reset(seed=seed)`` and record every request.

    Args:
        env: An ads-v0 vector env (`envs.make_vec_env`).
        policy: Anything with ``act(obs) -> PolicyOutput``.
        seed: Session seed (``env.reset``).
        steps: Batched steps T; the log has T x num_envs rows, step-major (row = t * N + slot).
        hook: Optional per-step extra recording (see `StepHook`), e.g. off-policy statistics that need
            the live state; its tensors are stacked like the log columns.
        progress: Show a tqdm bar.

    Returns:
        (columns, extra): the `gpr_sim.data.logs.SCHEMA` columns as numpy arrays ((T N,) scalars,
        (T N, d) lists), the optional ``final_*`` columns as masked (T N, d) arrays (rows where the
        session ended or the collection stopped are unmasked), and the hook's stacked outputs.
    """
    vec = env.unwrapped  # the sessions are read from the env's state, never written
    n = env.num_envs
    slot = torch.arange(n, device=vec.device)
    obs, _ = env.reset(seed=seed)
    rec: dict[str, list[torch.Tensor]] = {}
    extra: dict[str, list[torch.Tensor]] = {}

    def put(store: dict, row: dict) -> None:
        for k, v in row.items():
            store.setdefault(k, []).append(v)

    for t in tqdm(range(steps), desc="collect", disable=not progress, leave=False):
        out = policy.act(obs)
        if hook is not None:
            put(extra, hook(env, obs, out))
        state = vec.state  # before the step: the request the policy just answered
        market = vec.market_features()  # (F_m,) the ledger the request met, shared by every row
        before = {
            "request_id": t * n + slot,
            "episode_id": state.episode * n + slot,
            "step": state.step,
            "user_id": obs["user_id"],
            "user_features": obs["user"],
            "organic_ids": obs["organic"],
            "context": obs["context"],
            "ad_ids": obs["ad_history"],
            "ad_events": obs["ad_events"],
            "market": market.expand(n, -1),
            "candidates": out.action,
            "action": out.action[:, 0],
            "propensity": out.propensity,
        }
        obs, reward, terminated, truncated, info = env.step(out.action)
        imp = info["impression"]
        first = torch.where(imp.any(1), imp.to(torch.int8).argmax(1), torch.full_like(slot, -1))
        after = {
            "shown_ad": info["ad_id"],
            "position": first,
            "impression": imp.sum(1),
            "click": info["click"].sum(1),
            "conversion": info["conversion"].sum(1),
            "gmv": info["gmv"].double().sum(1),
            "delayed_conversion": info["delayed_conversion"],
            "delayed_gmv": info["delayed_gmv"].double(),
            "revenue": info["revenue"].double().sum(1),
            "reward": reward.double(),
            "p_click": info["p_click"][:, 0].double(),
            "p_conversion": info["p_conversion"][:, 0].double(),
            "is_new_ad": info["is_new_ad"][:, 0],
            "activity_tier": info["activity_tier"],
            "terminated": terminated,
            "truncated": truncated,
        }
        fin = info["final_obs"]  # the observation after this request (before any autoreset)
        final = {
            "final_organic_ids": fin["organic"],
            "final_context": fin["context"],
            "final_ad_ids": fin["ad_history"],
            "final_ad_events": fin["ad_events"],
            "final_kept": terminated | truncated | (t == steps - 1),
        }
        put(rec, before | after | final)

    def stack(store: dict) -> dict[str, np.ndarray]:
        # (T, N, ...) -> (T N, ...); one device -> host copy per column
        return {k: torch.stack(v).flatten(0, 1).cpu().numpy() for k, v in store.items()}

    columns = stack(rec)
    null = ~columns.pop("final_kept")[:, None]  # final observations only where an episode ends in the log
    for k in FINAL_COLUMNS:
        columns[k] = np.ma.MaskedArray(columns[k], mask=np.broadcast_to(null, columns[k].shape))
    for k in ("step", "impression", "click", "conversion", "delayed_conversion", "activity_tier", "position"):
        columns[k] = columns[k].astype(np.int64, copy=False)
    return columns, stack(extra)


def summarize(columns: dict[str, np.ndarray]) -> dict[str, float]:
    """Headline numbers of a log: per-request means and funnel rates."""
    n = len(columns["reward"])
    imp, clk, conv = (float(columns[k].sum()) for k in ("impression", "click", "conversion"))
    reward = columns["reward"]
    return {
        "requests": n,
        "sessions_ended": int((columns["terminated"] | columns["truncated"]).sum()),
        "reward_per_request": float(reward.mean()),
        "reward_se": float(reward.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "revenue_per_request": float(columns["revenue"].mean()),
        "gmv_per_request": float(columns["gmv"].mean()),
        "fill_rate": imp / n,
        "ctr": clk / imp if imp else float("nan"),
        "cvr": conv / clk if clk else float("nan"),
        "propensity_min": float(columns["propensity"].min()),
        "propensity_median": float(np.median(columns["propensity"])),
    }


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CollectConfig:
    """A log collection: behaviour policy, market size, seeds, output (the CLI of `python -m agents.collect`,
    whose `--world.<field>` flags override the preset's world)."""

    env: str = "ads-v0"
    """Gymnasium id of the environment (registered by `import envs`)"""
    policy: str = "cascade-privileged"
    """behaviour policy: a name of `agents.policies` (random | cascade-privileged | oracle | oracle-fatigue |
    learned-cascade:PATH | gpr:PATH); a former name (`cascade`) is logged under its current one"""
    num_envs: int = 256
    """concurrent sessions in the market (one request each per step)"""
    steps: int = 200
    """batched steps; the log has num_envs x steps rows"""
    seed: int = 0
    """seed of the sessions (env.reset) and of the policy's exploration"""
    world_seed: int = 0
    """seed of the static world (catalog, advertisers, users)"""
    preset: str = "small"
    """world preset: small | large"""
    temperature: float | None = None
    """exploration temperature of a cascade policy (cascade-privileged, learned-cascade:PATH; softmax over log
    value); default: the policy's own"""
    device: str = "cpu"
    """torch device of the simulation"""
    threads: int = 1
    """torch CPU threads (per-step tensors are small, so more threads mostly add contention); 0 = torch's default"""
    out: str = ""
    """output Parquet file; default runs/logs/{env}__{policy}__{seed}.parquet"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        check_args(self)
        policy_factory(self.policy)  # an unknown name fails here, before anything runs (a former one warns)
        check_range("num_envs", self.num_envs, 1, 1 << 24)
        check_range("steps", self.steps, 1, 1 << 24)
        check_range("threads", self.threads, 0, 1024)
        if self.temperature is not None:
            options = policy_options(canonical_policy(self.policy))
            if "temperature" not in options:
                raise ValueError(
                    f"temperature is only used by the exploring cascades, not policy={self.policy!r} "
                    f"(its options: {options})"
                )
            check_range("temperature", self.temperature, 0.0, 100.0)


# ----------------------------------------------------------------------------- a log from a config


def log_path(cfg: CollectConfig) -> Path:
    """``cfg.out``, else ``runs/logs/{env}__{policy}[-tT]__{seed}.parquet``."""
    policy_tag = re.sub(r"[^A-Za-z0-9._-]+", "_", canonical_policy(cfg.policy))  # gpr:PATH -> one file name
    policy_tag += f"-t{cfg.temperature:g}" if cfg.temperature is not None else ""
    return Path(cfg.out or Path("runs/logs") / f"{run_name(cfg.env, policy_tag, cfg.seed)}.parquet")


def write_log(cfg: CollectConfig, world: WorldConfig | None = None) -> Path:
    """Collect the log ``cfg`` describes in ``world`` (default: ``cfg.preset``'s) and write it; prints a summary
    and returns the Parquet path (`log_path`).

    ``cfg.threads`` > 0 sets torch's CPU threads for the process (per-step tensors are small, so more threads
    mostly add contention).
    """
    world = preset(cfg.preset) if world is None else world
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = log_path(cfg)
    env = make_vec_env(cfg.env, cfg.num_envs, config=world, world_seed=cfg.world_seed, device=cfg.device)
    options = {} if cfg.temperature is None else {"temperature": cfg.temperature}
    name = canonical_policy(cfg.policy)  # what the log's metadata records
    policy = make_policy(name, env, cfg.seed, **options)
    temperature = getattr(getattr(policy, "config", None), "temperature", None)

    start = time.perf_counter()
    columns, _ = collect(env, policy, cfg.seed, cfg.steps, progress=cfg.progress)
    elapsed = time.perf_counter() - start
    meta = {
        "env": cfg.env,
        "world_seed": cfg.world_seed,
        "num_envs": cfg.num_envs,
        "steps": cfg.steps,
        "temperature": temperature,
        "device": cfg.device,
        "torch": torch.__version__,
    }
    write_logs(columns, out, world_config=world, seed=cfg.seed, policy=name, extra=meta)

    s = summarize(columns)
    print(
        f"{out}: {s['requests']} requests ({cfg.num_envs} envs x {cfg.steps} steps) in {elapsed:.1f}s "
        f"({s['requests'] / elapsed:,.0f} req/s), {s['sessions_ended']} sessions ended\n"
        f"reward/request {s['reward_per_request']:.4f} +- {critical_value(0.95) * s['reward_se']:.4f} (95%)  "
        f"revenue/request {s['revenue_per_request']:.4f}  gmv/request {s['gmv_per_request']:.3f}\n"
        f"fill {s['fill_rate']:.3f}  ctr {s['ctr']:.4f}  cvr {s['cvr']:.4f}  "
        f"propensity min {s['propensity_min']:.3g} median {s['propensity_median']:.3g}"
    )
    return out
