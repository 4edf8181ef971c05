"""Evaluate agents on the same users and seeds: business metrics with confidence intervals, a table, charts.

    python -m agents.evaluate --env ads-v0 --agents random,cascade-privileged,oracle [--preset small] \
        [--num-envs 512] [--sessions 2000] [--seed 0] [--reference cascade-privileged] \
        [--auction PLATFORM_DIR] [--budgets default|unlimited] [--out runs/eval/NAME]

Every agent gets a fresh market built from the same world seed and reset with the same seed. The random
streams are keyed by (seed, env slot, draw counter), so each slot's first session has the same user for
every agent; later users follow the same streams but shift with session lengths. Each slot records its
first ceil(sessions / num_envs) sessions (a fixed number per slot, so short sessions are not favoured),
and the run stops once every slot has them. Metrics are computed over sessions (`gpr_sim.metrics`); the
comparison itself is `agents.evaluation.compare`. Beside them, `eval/oracle_share`: the true value each agent
serves on `--oracle-states` fixed request states as a share of the myopic oracle's, with its interval, and
the fatigue-aware oracle's share (`agents.evaluation.oracle_share`). With `--auction DIR` every agent's
market (and the oracle_share states') ranks its auction on the learned pCTR/pCVR of the platform folder DIR
instead of the privileged estimate (`agents.evaluation.auction`); the folder's digest joins each agent's
cache key. `--sessions-of oracle=N` records an expensive reference on each slot's first sessions only, paired
with the others on those; `--cached-only oracle` takes it from `--out`'s cache or leaves it out (never simulated).
`--budgets unlimited` lifts every advertiser's daily budget so that none binds (the same catalog and
bids): the comparison of ranking alone, beside the default budgets' (`agents.evaluation.compare.BUDGETS`).

With `--reference NAME`, every other agent is also compared with NAME session by session
(`agents.evaluation.paired`): sessions are paired by (env slot, the slot's session index), the first session of
every slot shares its user and every random draw across agents (later ones only when the slot's earlier
sessions had the same lengths), and each metric's difference gets its paired interval, the unpaired interval
beside it and the variance reduction factor of pairing.

Output folder (`--out`, default `runs/eval/{env}__{preset}__{seed}`), an `agents.evaluate` folder: locked while
an evaluation writes it, and refused when another entry point owns it (e.g. an `agents.hepo` run;
`gpr_sim.runs.RunFolder`), written by `agents.evaluation.folder.evaluate_folder` (the library call beside
`EvalConfig`, for notebooks and scripts):

| file | content |
|---|---|
| `run.json` | the owner record (`gpr_sim.runs`) |
| `config.json` | the arguments of the last evaluation (written with its tables) |
| `summary.csv`, `summary.json` | one row / entry per agent: every metric with `_ci_low` / `_ci_high` |
| `strata.csv` | per agent x activity tier (1..5) and per agent x ad age (new / old) |
| `metrics.png`, `strata.png` | bar charts with error bars |
| `paired.csv`, `paired.json`, `paired.png` | with `--reference`: per agent x metric, the difference from the reference with its paired and unpaired interval and the variance reduction (`agents.evaluation.paired.COLUMNS`) |
| `agents/NAME/sessions.parquet` | one row per session (`gpr_sim.metrics.SESSION_COLUMNS`) |
| `agents/NAME/oracle_share.parquet` | one row per request state: the agent's, the oracle's and the fatigue-aware oracle's true value |
| `agents/NAME/summary.json` | the agent's run config (settings and the SHA-256 of the files it read, e.g. `policy.pt`) and metrics; a rerun with the same config reuses its sessions |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from agents import cli
from agents.evaluation.compare import EvalConfig, format_table
from agents.evaluation.folder import evaluate_folder
from agents.evaluation.paired import format_paired
from gpr_sim.runs import run_name
from gpr_sim.stats import CIConfig


@dataclass(frozen=True)
class Args:
    env: str = "ads-v0"
    """a registered ads env id (`envs.ads_env_ids()`: ads-v0)"""
    agents: str = "random,cascade-privileged,oracle"
    """comma-separated agents: policy names of `agents.policies` or NAME:ARG specs (gpr:PATH), each with options
    as @key=value (e.g. cascade-privileged@temperature=0, the greedy cascade, beside the exploring default)"""
    preset: str = "small"
    """world preset"""
    world_seed: int = 0
    """seed of the static world (catalog, advertisers, users)"""
    num_envs: int = 512
    """concurrent sessions in one market (advertiser budgets scale with it)"""
    sessions: int = 2000
    """at least this many completed sessions per agent (each slot records ceil(sessions / num_envs))"""
    seed: int = 0
    """reset seed, the same for every agent (same first users), also the policies' and bootstrap's seed"""
    device: str = "cpu"
    """torch device of the env and the policies"""
    oracle_states: int = 256
    """fixed request states of eval/oracle_share (the first request of as many sessions)"""
    threads: int = 1
    """torch CPU threads (0 = torch's default); at these batch sizes more threads gain little and stall on a busy CPU"""
    ci: str = "normal"
    """interval method: normal (delta method for ratios, CLT for means) or bootstrap (resampling sessions)"""
    level: float = 0.95
    """two-sided confidence level of the intervals"""
    n_bootstrap: int = 1000
    """bootstrap resamples (with --ci bootstrap)"""
    out: str = ""
    """output folder; empty means runs/eval/{env}__{preset}__{seed}"""
    plots: bool = True
    """write the PNG charts"""
    rerun: bool = False
    """run every agent again even when --out holds its sessions from the same config"""
    reference: str = ""
    """an agent of --agents that every other one is compared with session by session (paired.csv; delta-method
    intervals over pairs whatever --ci); empty = no paired table"""
    auction: str = ""
    """a platform folder (`agents.fit_platform`, e.g. an `agents.hepo` pipeline's PRETRAIN_DIR/platform) or a
    funnel file (PRETRAIN_DIR/funnel/model.pt of a pipeline that fits no platform) whose learned pCTR/pCVR the
    market's auction ranks on, for every agent; empty = the privileged auction (the default)"""
    budgets: str = "default"
    """advertisers' daily budgets: default (the preset's) | unlimited (no budget binds: ranking alone)"""
    sessions_of: str = ""
    """comma-separated AGENT=N: agents of --agents recorded on N sessions only (each slot's first ceil(N /
    num-envs), e.g. oracle=8192 with 8,192 envs: the oracle scores the whole catalog at every request), paired with
    the others on the sessions both hold"""
    cached_only: str = ""
    """comma-separated agents of --agents taken from --out's cache with this config, or left out with a line
    (never simulated: a reference evaluated once, in another run)"""

    def __post_init__(self) -> None:
        cli.check_args(self)
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads={self.threads!r} is out of range: expected an integer >= 0")
        self.config()  # the comparison's checks (sizes, agents, intervals): a bad value fails before anything runs

    def agent_list(self) -> list[str]:
        return [s.strip() for s in self.agents.split(",") if s.strip()]

    def sessions_of_pairs(self) -> tuple[tuple[str, int], ...]:
        """``--sessions-of`` as (agent, sessions) pairs; ``ValueError`` naming an entry that is not AGENT=N."""
        pairs = []
        for item in (s.strip() for s in self.sessions_of.split(",") if s.strip()):
            spec, _, n = item.rpartition("=")
            if not spec or not n.strip().isdigit():
                raise ValueError(
                    f"sessions_of entry {item!r} is invalid: expected AGENT=N (e.g. oracle=8192)"
                )
            pairs.append((spec.strip(), int(n)))
        return tuple(pairs)

    def config(self) -> EvalConfig:
        """The comparison these flags ask for (``agents.evaluation.compare``)."""
        return EvalConfig(
            agents=tuple(self.agent_list()),
            env=self.env,
            preset=self.preset,
            world_seed=self.world_seed,
            num_envs=self.num_envs,
            sessions=self.sessions,
            seed=self.seed,
            device=self.device,
            oracle_states=self.oracle_states,
            ci=CIConfig(self.ci, self.level, self.n_bootstrap),
            rerun=self.rerun,
            reference=self.reference or None,
            auction=self.auction,
            budgets=self.budgets,
            sessions_of=self.sessions_of_pairs(),
            cached_only=tuple(s.strip() for s in self.cached_only.split(",") if s.strip()),
        )

    @property
    def out_dir(self) -> Path:
        return Path(self.out or Path("runs/eval") / run_name(self.env, self.preset, self.seed))


def parse_args(argv: list[str] | None = None) -> Args:
    """``Args`` from the command line: one ``--flag-name`` per field (`agents.cli`)."""
    return cli.parse_args(Args, argv, __doc__.strip().splitlines()[0])


def main(argv: list[str] | Args | None = None) -> pd.DataFrame:
    """Evaluate every agent; returns the summary table (one row per agent)."""
    args = argv if isinstance(argv, Args) else parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = args.config()
    run = evaluate_folder(cfg, args.out_dir, plots=args.plots, settings=dataclasses.asdict(args))
    print(
        f"\n{args.env} ({args.preset}), {args.num_envs} envs, seed {args.seed}; {args.level:.0%} CIs ({args.ci}):"
    )
    print(format_table(run.comparison.summary))
    if run.paired is not None:
        print(f"\npaired differences from {cfg.reference}, {args.level:.0%} CIs (delta method over pairs):")
        print(format_paired(run.paired))
    print(f"\nwrote {run.path}/{', '.join(run.written)}")
    return run.comparison.summary


if __name__ == "__main__":
    cli.run_main(main)
