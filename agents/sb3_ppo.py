"""Stable-Baselines3 PPO on the single ``ads-v0`` env (flat ad-index action): proof the env is learnable.

    python -m agents.sb3_ppo --env ads-v0 --seeds 0,1,2 --total-timesteps 48000

For each seed it trains PPO (MLP on ``FlatFeatures``) and, every ``--eval-every`` steps, evaluates it
and a uniform-random policy on the same held-out users (same reset seeds, so the comparison is
paired). PPO is evaluated as the stochastic policy it trains (actions sampled from a generator seeded
by the seed, apart from training's), not its argmax: in a single session's market an advertiser's daily
budget buys about one impression, so an argmax that repeats the same ads in a session shows nothing
after the first (``--eval-deterministic`` measures it anyway). Training runs on ``--threads`` torch
threads (default 1, as the tests): float sums in another order send PPO down another trajectory, so a
seed's numbers hold for one thread count. Each seed writes ``{out}/{env}__sb3_ppo__{seed}/`` with
``config.json``, ``metrics.jsonl``, ``checkpoint.zip``; a rerun resumes from the checkpoint (one with
other flags than ``--total-timesteps`` is refused: ``gpr_sim.runs.RunFolder``). The parent folder gets
``summary.json`` and ``learning_curves.png`` (PPO vs random, per seed).
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agents.cli import check_args, parse_args, run_main
from gpr_sim.runs import (
    RunFolder,
    append_metrics,
    atomic_write_bytes,
    atomic_write_with,
    figure_bytes,
    read_metrics,
    run_name,
    write_json,
)
from gpr_sim.stats import paired_difference

ENTRY = "agents.sb3_ppo"
"""the owner of its run folders (``gpr_sim.runs.RunFolder``)"""
RESUME_IGNORES = ("total_timesteps", "seeds", "out")
"""flags that may change between a seed's run and its resumption (more steps continue it)"""


@dataclass(frozen=True)
class Args:
    env: str = "ads-v0"
    """registered env id"""
    preset: str = "small"
    """world preset"""
    seeds: str = "0,1,2"
    """comma-separated training seeds"""
    total_timesteps: int = 48_000
    """environment steps per seed"""
    num_envs: int = 8
    """single envs in SB3's DummyVecEnv"""
    learning_rate: float = 1e-3
    """Adam learning rate"""
    n_steps: int = 128
    """rollout length per env between updates"""
    batch_size: int = 256
    """minibatch size"""
    n_epochs: int = 10
    """epochs per update"""
    gamma: float = 0.99
    """discount"""
    ent_coef: float = 0.0
    """entropy bonus"""
    normalize_reward: bool = True
    """scale training rewards by a running std of discounted returns (SB3 VecNormalize; GMV makes rewards spiky)"""
    eval_every: int = 10_000
    """steps between evaluations (and checkpoints)"""
    eval_episodes: int = 200
    """held-out sessions per evaluation"""
    eval_deterministic: bool = False
    """evaluate PPO's argmax action instead of sampling the stochastic policy it trains"""
    threads: int = 1
    """torch CPU threads (a seed's trajectory depends on it; 1 is what the tests run); 0 = torch's default"""
    out: str = "runs/sb3_ppo"
    """parent folder of the per-seed run folders"""

    def __post_init__(self) -> None:
        check_args(self)
        for name in (
            "total_timesteps",
            "num_envs",
            "n_steps",
            "batch_size",
            "n_epochs",
            "eval_every",
            "eval_episodes",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is out of range: expected an integer >= 1")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads={self.threads!r} is out of range: expected an integer >= 0")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma={self.gamma} is out of range: expected (0, 1]")
        self.seed_list()

    def seed_list(self) -> list[int]:
        try:
            return [int(s) for s in self.seeds.split(",") if s.strip()]
        except ValueError as e:
            raise ValueError(f"seeds={self.seeds!r}: expected comma-separated integers") from e


def make_env(args: Args):
    import gymnasium as gym

    import envs  # noqa: F401
    from envs.wrappers import FlatFeatures

    return FlatFeatures(gym.make(args.env, preset=args.preset).unwrapped)


def evaluate(env, act, episodes: int, seed_base: int = 100_000) -> np.ndarray:
    """Total reward of ``episodes`` sessions; episode i starts from reset(seed=seed_base + i)."""
    returns = np.zeros(episodes)
    for i in range(episodes):
        obs, _ = env.reset(seed=seed_base + i)
        done = False
        while not done:
            obs, r, term, trunc, _ = env.step(act(obs))
            returns[i] += r
            done = term or trunc
    return returns


def ppo_returns(env, model, episodes: int, seed: int, deterministic: bool) -> np.ndarray:
    """``evaluate`` of the PPO ``model``: its argmax action, or its policy sampled with torch's generator
    seeded by ``seed`` for the evaluation and then restored, so evaluating never moves training's stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return evaluate(env, lambda obs: int(model.predict(obs, deterministic=deterministic)[0]), episodes)


def train_seed(args: Args, seed: int) -> dict:
    """Train (or resume) one seed in its run folder (locked; refused when it holds a run with other flags than
    ``--total-timesteps``); returns its final paired evaluation against random."""
    run_dir = Path(args.out) / run_name(args.env, "sb3_ppo", seed)
    config = {**dataclasses.asdict(args), "seed": seed}
    with RunFolder(run_dir, ENTRY, config, RESUME_IGNORES):
        return _train_seed(args, seed, run_dir, config)


def _train_seed(args: Args, seed: int, run_dir: Path, config: dict) -> dict:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv
    from tqdm.auto import tqdm

    ckpt = run_dir / "checkpoint.zip"
    if not ckpt.exists():  # a fresh start; a resumed run keeps the config it started with
        write_json(run_dir / "config.json", config)

    vec = DummyVecEnv([lambda: make_env(args) for _ in range(args.num_envs)])
    vec.seed(seed)
    stats = run_dir / "vecnormalize.pkl"
    if args.normalize_reward:
        from stable_baselines3.common.vec_env import VecNormalize

        if ckpt.exists() and stats.exists():
            vec = VecNormalize.load(str(stats), vec)
        else:
            vec = VecNormalize(vec, norm_obs=False, norm_reward=True, gamma=args.gamma)
    if ckpt.exists():
        model = PPO.load(ckpt, env=vec, device="cpu")
        print(f"[seed {seed}] resuming from {ckpt} at {model.num_timesteps} steps")
    else:
        model = PPO(
            "MlpPolicy",
            vec,
            learning_rate=args.learning_rate,
            n_steps=args.n_steps,
            batch_size=args.batch_size,
            n_epochs=args.n_epochs,
            gamma=args.gamma,
            ent_coef=args.ent_coef,
            seed=seed,
            device="cpu",
            verbose=0,
        )
    eval_env = make_env(args)
    rng = np.random.default_rng(seed)
    n_ads = eval_env.action_space.n
    random_returns = evaluate(eval_env, lambda obs: int(rng.integers(n_ads)), args.eval_episodes)
    bar = tqdm(
        total=args.total_timesteps,
        initial=min(model.num_timesteps, args.total_timesteps),
        desc=f"ppo seed {seed}",
    )
    while model.num_timesteps < args.total_timesteps:
        before = model.num_timesteps
        chunk = min(args.eval_every, args.total_timesteps - before)
        model.learn(total_timesteps=chunk, reset_num_timesteps=False)
        bar.update(model.num_timesteps - before)
        returns = ppo_returns(eval_env, model, args.eval_episodes, seed, args.eval_deterministic)
        diff = paired_difference(returns, random_returns)  # same reset seeds: paired by episode
        row = {
            "global_step": model.num_timesteps,
            "eval/return": float(returns.mean()),
            "eval/random_return": float(random_returns.mean()),
            "eval/diff_vs_random": diff.value,
            "eval/diff_ci_low": diff.ci_low,
            "eval/diff_ci_high": diff.ci_high,
        }
        append_metrics(run_dir / "metrics.jsonl", row)
        if args.normalize_reward:  # the reward statistics are part of the training state
            atomic_write_with(stats, vec.save)
        buf = io.BytesIO()
        model.save(buf)
        atomic_write_bytes(ckpt, buf.getvalue())
        bar.set_postfix(ret=f"{row['eval/return']:.3f}", rnd=f"{row['eval/random_return']:.3f}")
    bar.close()
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise RuntimeError(f"{run_dir} has no evaluations: total_timesteps={args.total_timesteps}")
    return {"seed": seed, **rows[-1]}


def plot_curves(out: Path, seeds: list[int], env_id: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for seed in seeds:
        rows = read_metrics(out / f"{env_id}__sb3_ppo__{seed}" / "metrics.jsonl")
        steps = [r["global_step"] for r in rows]
        ax.plot(steps, [r["eval/return"] for r in rows], marker="o", label=f"PPO seed {seed}")
        ax.plot(steps, [r["eval/random_return"] for r in rows], ls="--", color="grey")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("evaluation reward per session")
    ax.set_title(f"SB3 PPO on {env_id} (dashed: random, same users)")
    ax.legend()
    fig.tight_layout()
    return atomic_write_bytes(out / "learning_curves.png", figure_bytes(fig, dpi=120))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv, __doc__)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with RunFolder(args.out, ENTRY, dataclasses.asdict(args), same_settings=False) as folder:
            return _main(args, folder.path)
    finally:
        torch.set_num_threads(threads)


def _main(args: Args, out: Path) -> dict:
    """Every seed, then the summary and curves of this invocation's seeds in the parent folder ``out``."""
    results = [train_seed(args, s) for s in args.seed_list()]
    diffs = np.array([r["eval/diff_vs_random"] for r in results])
    summary = {
        "per_seed": results,
        "mean_diff_vs_random": float(diffs.mean()),
        "seeds_beating_random_ci": int(sum(r["eval/diff_ci_low"] > 0 for r in results)),
    }
    write_json(out / "summary.json", summary)
    plot_curves(out, args.seed_list(), args.env)
    print(f"{'seed':>4} {'ppo':>8} {'random':>8} {'diff':>8} {'95% CI of diff':>20}")
    for r in results:
        print(
            f"{r['seed']:>4} {r['eval/return']:8.4f} {r['eval/random_return']:8.4f} {r['eval/diff_vs_random']:8.4f}"
            f"   [{r['eval/diff_ci_low']:.4f}, {r['eval/diff_ci_high']:.4f}]"
        )
    return summary


if __name__ == "__main__":
    run_main(main)
