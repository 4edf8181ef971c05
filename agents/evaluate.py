"""Evaluate agents on the same users and seeds: business metrics with confidence intervals, a table, charts.

    python -m agents.evaluate --env ads-v0 --agents random,cascade,oracle [--preset small] \
        [--num-envs 512] [--sessions 2000] [--seed 0] [--out runs/eval/NAME]

Every agent gets a fresh market built from the same world seed and reset with the same seed. The random
streams are keyed by (seed, env slot, draw counter), so each slot's first session has the same user for
every agent; later users follow the same streams but shift with session lengths. Each slot records its
first ceil(sessions / num_envs) sessions (a fixed number per slot, so short sessions are not favoured),
and the run stops once every slot has them. Metrics are computed over sessions (`gpr_sim.metrics`).

Output folder (`--out`, default `runs/eval/{env}__{preset}__{seed}`), an `agents.evaluate` folder: locked while
an evaluation writes it, and refused when another entry point owns it (e.g. an `agents.hepo` run;
`gpr_sim.runs.RunFolder`):

| file | content |
|---|---|
| `run.json` | the owner record (`gpr_sim.runs`) |
| `config.json` | the arguments of the last evaluation (written with its tables) |
| `summary.csv`, `summary.json` | one row / entry per agent: every metric with `_ci_low` / `_ci_high` |
| `strata.csv` | per agent x activity tier (1..5) and per agent x ad age (new / old) |
| `metrics.png`, `strata.png` | bar charts with error bars |
| `agents/NAME/sessions.parquet` | one row per session (`gpr_sim.metrics.SESSION_COLUMNS`) |
| `agents/NAME/summary.json` | the agent's run config (settings and the SHA-256 of the files it read, e.g. `policy.pt`) and metrics; a rerun with the same config reuses its sessions |
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from agents import cli
from agents.policies import known_policies, make_policy, policy_factory, policy_inputs
from envs import make_vec_env, resolve_config
from gpr_sim.metrics import SessionAccumulator, summarize, summarize_strata
from gpr_sim.runs import (
    RunFolder,
    atomic_write_bytes,
    figure_bytes,
    file_digest,
    read_json,
    run_name,
    write_json,
)
from gpr_sim.stats import CIConfig

ENTRY = "agents.evaluate"
"""the owner of its output folders (``gpr_sim.runs.RunFolder``)"""

PREFIX = "eval/"
CHECK_EVERY = 8  # steps between host syncs that update the progress bar and test for completion


@dataclass(frozen=True)
class Args:
    env: str = "ads-v0"
    """a registered ads env id (`envs.ads_env_ids()`: ads-v0)"""
    agents: str = "random,cascade,oracle"
    """comma-separated agents: policy names of `agents.policies` or NAME:ARG specs (gpr:PATH)"""
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

    def __post_init__(self) -> None:
        cli.check_args(self)
        for name in ("num_envs", "sessions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is out of range: expected an integer >= 1")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads={self.threads!r} is out of range: expected an integer >= 0")
        CIConfig(self.ci, self.level, self.n_bootstrap)
        specs = self.agent_list()
        if not specs:
            raise ValueError(f"agents={self.agents!r} is empty: expected one of {', '.join(known_policies())}")
        if len(set(specs)) != len(specs):
            raise ValueError(f"agents={self.agents!r} names an agent twice")
        for spec in specs:
            policy_factory(spec)  # an unknown agent fails here, before anything runs

    def agent_list(self) -> list[str]:
        return [s.strip() for s in self.agents.split(",") if s.strip()]

    @property
    def sessions_per_slot(self) -> int:
        return math.ceil(self.sessions / self.num_envs)

    @property
    def out_dir(self) -> Path:
        return Path(self.out or Path("runs/eval") / run_name(self.env, self.preset, self.seed))


# ----------------------------------------------------------------------------- running one agent


def collect_sessions(
    env, policy, sessions_per_slot: int, seed: int, desc: str = "", progress: bool = True
) -> tuple[pd.DataFrame, int]:
    """Run ``policy`` from ``env.reset(seed)`` until every slot has ``sessions_per_slot`` sessions.

    Returns the session records and the number of env steps taken.
    """
    vec = env.unwrapped
    obs, _ = env.reset(seed=seed)
    acc = SessionAccumulator(env.num_envs, vec.world.user_activity, sessions_per_slot)
    limit = sessions_per_slot * vec.config.max_steps  # a session is truncated at max_steps at the latest
    bar = tqdm(total=env.num_envs * sessions_per_slot, desc=desc, unit="session", leave=False, disable=not progress)
    steps = 0
    with torch.no_grad():
        while steps < limit:
            action = policy.act(obs).action
            obs, _, terminated, truncated, info = env.step(action)
            acc.update(info, terminated, truncated)
            steps += 1
            if steps % CHECK_EVERY == 0 or steps == limit:  # the loop's only host syncs
                bar.update(int(acc.num_sessions()) - bar.n)
                if bool(acc.complete()):
                    break
    bar.close()
    if not bool(acc.complete()):
        raise RuntimeError(f"{desc}: sessions did not end within {limit} steps")
    return acc.records(), steps


def agent_inputs(spec: str) -> dict[str, str]:
    """SHA-256 of every file a ``NAME:ARG`` agent reads (``agents.policies.policy_inputs``), by file name; {}
    for the built-in policies."""
    return {p.name: file_digest(p) for p in policy_inputs(spec) if p.is_file()}


def run_config(args: Args, spec: str) -> dict:
    """Everything that determines an agent's sessions (not how they are summarised): the settings and the
    content of the files the agent reads (``agent_inputs``: a retrained ``policy.pt`` is evaluated again)."""
    return {
        "agent": spec, "inputs": agent_inputs(spec), "env": args.env, "preset": args.preset,
        "world": resolve_config(args.preset).to_dict(), "world_seed": args.world_seed, "num_envs": args.num_envs,
        "sessions_per_slot": args.sessions_per_slot, "seed": args.seed, "device": args.device,
    }  # fmt: skip


def agent_dir(out: Path, spec: str) -> Path:
    return out / "agents" / re.sub(r"[^A-Za-z0-9._-]+", "_", spec)


def run_agent(args: Args, spec: str) -> pd.DataFrame:
    """The agent's sessions: reused from ``--out`` when its config matches, else simulated and saved."""
    folder = agent_dir(args.out_dir, spec)
    config = json.loads(json.dumps(run_config(args, spec)))  # as it reads back from JSON
    marker, table = folder / "summary.json", folder / "sessions.parquet"
    if not args.rerun and marker.exists() and table.exists():
        if read_json(marker).get("config") == config:
            print(f"{spec}: same config already evaluated in {folder}, reusing its sessions (--rerun to redo)")
            return pd.read_parquet(table)
        print(f"{spec}: {folder} holds a run with another config, running again")
    env = make_vec_env(args.env, args.num_envs, preset=args.preset, world_seed=args.world_seed, device=args.device,
                       validate_actions=False)  # fmt: skip
    policy = make_policy(spec, env, args.seed)
    start = time.perf_counter()
    sessions, steps = collect_sessions(env, policy, args.sessions_per_slot, args.seed, desc=spec)
    seconds = time.perf_counter() - start
    print(f"{spec}: {len(sessions)} sessions, {steps} steps of {args.num_envs} requests in {seconds:.1f} s")
    buf = io.BytesIO()
    sessions.to_parquet(buf, index=False)
    atomic_write_bytes(table, buf.getvalue())
    metrics = summarize(sessions, prefix=PREFIX)
    write_json(marker, {"config": config, "steps": steps, "seconds": seconds, "metrics": _clean(metrics)})
    return sessions


def _clean(d: dict) -> dict:
    """NaN -> None, so the JSON files stay strict JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------- table and charts

DISPLAY = {  # metric -> (label, scale, format), for the table and the charts
    "ctr": ("CTR %", 100.0, "{:.2f}"),
    "cvr": ("CVR %", 100.0, "{:.2f}"),
    "ctcvr": ("CTCVR %", 100.0, "{:.3f}"),
    "gmv_per_session": ("GMV / session", 1.0, "{:.2f}"),
    "revenue_per_session": ("revenue / session", 1.0, "{:.3f}"),
    "roi": ("advertiser ROI", 1.0, "{:.1f}"),
    "ecpm": ("eCPM", 1.0, "{:.1f}"),
    "reward_per_session": ("reward / session", 1.0, "{:.3f}"),
    "session_length": ("session length", 1.0, "{:.2f}"),
    "impressions_per_session": ("impressions / session", 1.0, "{:.2f}"),
}
CHART = ("ctr", "cvr", "ctcvr", "gmv_per_session", "revenue_per_session", "roi", "session_length", "ecpm")
STRATA_CHART = {
    "activity_tier": ("ctr", "ctcvr", "revenue_per_session", "session_length"),
    "ad_age": ("ctr", "cvr", "ctcvr", "ecpm"),
}


def format_table(summary: pd.DataFrame) -> str:
    """Metrics as rows, agents as columns, each cell ``value [ci_low, ci_high]``."""
    rows = {"sessions": {a: str(int(n)) for a, n in zip(summary["agent"], summary[f"{PREFIX}sessions"])}}
    for key, (label, scale, fmt) in DISPLAY.items():
        rows[label] = {}
        for _, r in summary.iterrows():
            v, lo, hi = (scale * r[f"{PREFIX}{key}{s}"] for s in ("", "_ci_low", "_ci_high"))
            rows[label][r["agent"]] = f"{fmt.format(v)} [{fmt.format(lo)}, {fmt.format(hi)}]"
    return pd.DataFrame(rows).T.to_string()


def _bars(ax, groups: list[str], agents: list[str], table: pd.DataFrame, key: str, group_col: str | None) -> None:
    """Grouped bars (x = groups, one bar per agent) with asymmetric error bars from the CI columns."""
    width = 0.8 / len(agents)
    for i, agent in enumerate(agents):
        part = table[table["agent"] == agent]
        if group_col is not None:
            part = part.set_index(group_col).reindex(groups)
        label, scale, _ = DISPLAY[key]
        v, lo, hi = (scale * part[f"{PREFIX}{key}{s}"].to_numpy(float) for s in ("", "_ci_low", "_ci_high"))
        x = np.arange(len(groups)) + (i - (len(agents) - 1) / 2) * width
        err = np.nan_to_num(np.stack([v - lo, hi - v]), nan=0.0)
        ax.bar(x, v, width, yerr=err, capsize=3, label=agent)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_title(label)


def _save(fig, path: Path) -> None:
    atomic_write_bytes(path, figure_bytes(fig, dpi=110))


def plot_summary(summary: pd.DataFrame, path: Path, level: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = list(summary["agent"])
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    for ax, key in zip(axes.flat, CHART):
        _bars(ax, [""], agents, summary, key, None)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="upper right", ncol=len(agents), fontsize=9)
    fig.suptitle(f"per-agent metrics, {level:.0%} confidence intervals over sessions")
    fig.tight_layout()
    _save(fig, path)


def plot_strata(strata: pd.DataFrame, path: Path, level: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = list(dict.fromkeys(strata["agent"]))
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    for row, (stratum, keys) in enumerate(STRATA_CHART.items()):
        part = strata[strata["stratum"] == stratum]
        groups = list(dict.fromkeys(part["group"]))
        for ax, key in zip(axes[row], keys):
            _bars(ax, groups, agents, part, key, "group")
            ax.set_xlabel("user activity tier" if stratum == "activity_tier" else "ad age")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper right", ncol=len(agents), fontsize=9)
    fig.suptitle(f"metrics by stratum, {level:.0%} confidence intervals over sessions")
    fig.tight_layout()
    _save(fig, path)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> Args:
    """``Args`` from the command line: one ``--flag-name`` per field (`agents.cli`)."""
    return cli.parse_args(Args, argv, __doc__.strip().splitlines()[0])


def main(argv: list[str] | Args | None = None) -> pd.DataFrame:
    """Evaluate every agent; returns the summary table (one row per agent)."""
    args = argv if isinstance(argv, Args) else parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with RunFolder(args.out_dir, ENTRY, dataclasses.asdict(args), same_settings=False) as folder:
        return _evaluate(args, folder.path)


def _evaluate(args: Args, out: Path) -> pd.DataFrame:
    """Every agent's sessions (reused or simulated), then the tables and charts of this evaluation in ``out``.
    ``config.json`` is written with them, after every agent ran: a failed evaluation leaves the last one's."""
    summaries, strata = [], []
    for spec in args.agent_list():
        sessions = run_agent(args, spec)
        kw = dict(prefix=PREFIX, ci=args.ci, level=args.level, n_bootstrap=args.n_bootstrap)
        rng = lambda: np.random.default_rng(args.seed)  # noqa: E731  (the same resamples for every agent)
        summaries.append({"agent": spec, **summarize(sessions, rng=rng(), **kw)})
        strata.append(summarize_strata(sessions, rng=rng(), **kw).assign(agent=spec))
    summary = pd.DataFrame(summaries)
    strata_df = pd.concat(strata, ignore_index=True)
    strata_df = strata_df[["agent"] + [c for c in strata_df.columns if c != "agent"]]
    write_json(out / "config.json", dataclasses.asdict(args))
    atomic_write_bytes(out / "summary.csv", summary.to_csv(index=False).encode())
    write_json(out / "summary.json", {r["agent"]: _clean(r) for r in summaries})
    atomic_write_bytes(out / "strata.csv", strata_df.to_csv(index=False).encode())
    if args.plots:
        plot_summary(summary, out / "metrics.png", args.level)
        plot_strata(strata_df, out / "strata.png", args.level)
    print(f"\n{args.env} ({args.preset}), {args.num_envs} envs, seed {args.seed}; {args.level:.0%} CIs ({args.ci}):")
    print(format_table(summary))
    print(f"\nwrote {out}/summary.csv, summary.json, strata.csv" + (", metrics.png, strata.png" if args.plots else ""))
    return summary


if __name__ == "__main__":
    cli.run_main(main)
