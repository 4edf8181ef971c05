"""Agents compared on the same users and seeds: their sessions, summary and strata tables with intervals, charts.

    result = compare_agents(EvalConfig(agents=("random", "cascade-privileged")), out)  # sessions in out/agents/
    write_comparison(result, out)                                           # summary.csv, strata.csv, charts
    print(format_table(result.summary))

Every agent gets a fresh market built from the same world seed and reset with the same seed. The random
streams are keyed by (seed, env slot, draw counter), so each slot's first session has the same user for
every agent; later users follow the same streams but shift with session lengths. Each slot records its
first ceil(sessions / num_envs) sessions (``agents.evaluation.sessions.collect_sessions``), and metrics
are computed over sessions (``gpr_sim.metrics``). A session is identified across agents by its pairing key
(env slot, the slot's session index: ``gpr_sim.metrics.PAIR_KEY``); ``agents.evaluation.paired`` compares
agents with a reference (``EvalConfig.reference``) over those pairs.

Every agent is also valued on ``oracle_states`` fixed request states (the first request of as many
sessions of a separate market reset with the same seed): ``eval/oracle_share``, the true value it serves
as a share of the myopic oracle's, with its interval, and ``eval/oracle_fatigue_share``
(``agents.evaluation.oracle_share``).

An agent's sessions are saved in ``out/agents/NAME/`` (``sessions.parquet``, its per-state values in
``oracle_share.parquet`` and ``summary.json`` with the agent's run config: the settings and the SHA-256 of
the files it reads, e.g. ``policy.pt``); a later comparison with the same run config reuses them, so a
retrained policy is evaluated again. Cached sessions that could not be paired (a table without a column of
``SESSION_COLUMNS``, or not every slot's sessions 0..k-1: ``cached_sessions_problem``) are simulated again.

Expensive references on fewer sessions: the oracle scores the whole catalog at every request (on the large
preset, 8,192 slots x 1M ads a step: 57 sessions/s on an H200, eager), so ``sessions_of`` records such an agent on
the first ``ceil(n / num_envs)`` sessions of every slot only, in the same market (every slot keeps running until
the last one has its sessions, so those first sessions are the ones a longer run records: the same draws), and
the paired table pairs it with the others on the sessions both hold. ``cached_only`` names agents taken from the
cache or not at all: one whose cache does not match is left out with a line, never simulated (a reference
evaluated once, in another call, for every pipeline seed).
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from agents.evaluation.auction import attach_auction_model, auction_funnel_file
from agents.evaluation.oracle_share import OracleShareConfig, RequestStates, state_values, summarize_shares
from agents.evaluation.sessions import collect_sessions
from agents.policies import known_policies, make_policy, policy_factory, policy_inputs, policy_label
from envs import make_vec_env, resolve_config
from gpr_sim.metrics import PAIR_KEY, SESSION_COLUMNS, summarize, summarize_strata
from gpr_sim.runs import atomic_write_bytes, figure_bytes, file_digest, read_json, write_json, write_parquet
from gpr_sim.stats import CIConfig

PREFIX = "eval/"
"""the prefix of every metric column"""
BUDGETS = {"default": {}, "unlimited": {"budget_per_1k_requests": 1e6}}
"""``EvalConfig.budgets`` -> the ``WorldConfig`` fields it changes. Unlimited: every advertiser's daily budget is
~10^6 times the default (1.5 per 1k requests), so no budget binds within an evaluation and the comparison is of
ranking alone; the catalog, users and bids stay the same (the budget draw scales, its random numbers do not)."""


@dataclass(frozen=True)
class EvalConfig:
    """Which agents are compared, on which sessions, with which intervals."""

    agents: tuple[str, ...] = ("random", "cascade-privileged", "oracle")
    """policy names of ``agents.policies`` or NAME:ARG specs (gpr:PATH), in table order"""
    env: str = "ads-v0"
    """a registered ads env id (``envs.ads_env_ids()``)"""
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
    ci: CIConfig = field(default_factory=CIConfig)
    """intervals over sessions"""
    oracle_states: int = 256
    """fixed request states of ``eval/oracle_share``"""
    rerun: bool = False
    """simulate every agent again even when the cache holds its sessions from the same run config"""
    reference: str | None = None
    """the agent every other one is compared with, session by session (``agents.evaluation.paired``); None
    = no paired table (no agent is the baseline by default: the first one listed is often ``random``)"""
    auction: str = ""
    """a platform folder (``agents.fit_platform``) whose learned pCTR/pCVR every agent's market auction ranks on
    (``agents.evaluation.auction``); empty = the privileged auction (the default)"""
    budgets: str = "default"
    """advertisers' daily budgets (``BUDGETS``): default (the preset's) | unlimited (no budget binds). The
    ``oracle_share`` states are first requests of sessions, where no budget binds yet: the same under both"""
    sessions_of: tuple[tuple[str, int], ...] = ()
    """(agent, sessions) pairs: agents recorded on fewer sessions than ``sessions`` (each slot's first
    ceil(n / num_envs)), paired with the others on the sessions both hold (module doc)"""
    cached_only: tuple[str, ...] = ()
    """agents taken from the output folder's cache with this config, or left out (never simulated)"""

    def __post_init__(self) -> None:
        auction_funnel_file(self.auction)  # not a platform folder: fails before anything runs
        if self.budgets not in BUDGETS:
            raise ValueError(f"budgets={self.budgets!r} is unknown: expected one of {list(BUDGETS)}")
        for name in ("num_envs", "sessions", "oracle_states"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is out of range: expected an integer >= 1")
        if not isinstance(self.ci, CIConfig):
            raise ValueError(f"ci={self.ci!r} is invalid: expected a gpr_sim.stats.CIConfig")
        if not self.agents:
            raise ValueError(
                f"agents={self.agents!r} is empty: expected one of {', '.join(known_policies())}"
            )
        if len(set(self.agents)) != len(self.agents):
            raise ValueError(f"agents={','.join(self.agents)!r} names an agent twice")
        for spec in self.agents:
            policy_factory(spec)  # an unknown agent fails here, before anything runs
        if self.reference is not None and self.reference not in self.agents:
            raise ValueError(
                f"reference={self.reference!r} is not one of the compared agents: {','.join(self.agents)}"
            )
        if self.reference is not None and len(self.agents) < 2:
            raise ValueError(
                f"reference={self.reference!r} needs at least one other agent to compare with it"
            )
        names = [spec for spec, _ in self.sessions_of]
        for spec, n in self.sessions_of:
            if spec not in self.agents:
                raise ValueError(f"sessions_of names {spec!r}, not one of the compared agents")
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.sessions:
                raise ValueError(
                    f"sessions_of {spec}={n!r} is out of range: expected an integer in [1, sessions={self.sessions}]"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"sessions_of names an agent twice: {','.join(names)}")
        for spec in self.cached_only:
            if spec not in self.agents:
                raise ValueError(f"cached_only names {spec!r}, not one of the compared agents")
        if self.reference is not None and self.reference in self.cached_only:
            raise ValueError(f"reference={self.reference!r} is cached_only: the paired table needs it")

    @property
    def sessions_per_slot(self) -> int:
        return math.ceil(self.sessions / self.num_envs)

    def sessions_per_slot_of(self, spec: str) -> int:
        """Sessions recorded per slot for ``spec``: ``sessions_of``'s count where it names the agent."""
        n = dict(self.sessions_of).get(spec, self.sessions)
        return math.ceil(n / self.num_envs)

    @property
    def oracle_share(self) -> OracleShareConfig:
        """The request states of ``eval/oracle_share``: the compared world, reset with ``seed``."""
        return OracleShareConfig(
            env=self.env,
            preset=self.preset,
            world_seed=self.world_seed,
            device=self.device,
            states=self.oracle_states,
            seed=self.seed,
            level=self.ci.level,
            auction=self.auction,
        )


# ----------------------------------------------------------------------------- running one agent


def agent_inputs(spec: str) -> dict[str, str]:
    """SHA-256 of every file a ``NAME:ARG`` agent reads (``agents.policies.policy_inputs``), by file name; {}
    for the built-in policies."""
    return {p.name: file_digest(p) for p in policy_inputs(spec) if p.is_file()}


def run_config(cfg: EvalConfig, spec: str) -> dict:
    """Everything that determines an agent's sessions (not how they are summarised): the settings and the
    content of the files the agent reads (``agent_inputs``: a retrained ``policy.pt`` is evaluated again)."""
    config = {
        "agent": spec,
        "inputs": agent_inputs(spec),
        "env": cfg.env,
        "preset": cfg.preset,
        "world": resolve_config(cfg.preset, **BUDGETS[cfg.budgets]).to_dict(),
        "world_seed": cfg.world_seed,
        "num_envs": cfg.num_envs,
        "sessions_per_slot": cfg.sessions_per_slot_of(spec),
        "seed": cfg.seed,
        "device": cfg.device,
        "oracle_states": cfg.oracle_states,
    }
    file = auction_funnel_file(cfg.auction)
    if file is not None:  # absent for the privileged auction, so earlier caches stay valid
        config["auction"] = {"path": cfg.auction, "funnel": file_digest(file)}
    return config


def agent_dir(out: Path, spec: str) -> Path:
    """Where an agent's sessions are cached in the output folder ``out``."""
    return out / "agents" / re.sub(r"[^A-Za-z0-9._-]+", "_", spec)


def cache_files(out: Path, spec: str) -> tuple[Path, Path, Path]:
    """The agent's cache in ``out``: its ``summary.json`` (run config), ``sessions.parquet`` and
    ``oracle_share.parquet``."""
    folder = agent_dir(out, spec)
    return folder / "summary.json", folder / "sessions.parquet", folder / "oracle_share.parquet"


def cached_tables(
    cfg: EvalConfig, spec: str, out: Path, config: dict | None = None, otherwise: str = "running again"
) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The agent's sessions and per-state values from ``agent_dir(out, spec)`` when they were written with this
    run config (``config``: ``run_config`` as it reads back from JSON, computed here when None: it hashes the
    agent's files) and can be paired; None otherwise, or with ``cfg.rerun`` (a cache that does not match is named
    in one printed line ending with ``otherwise``, what the caller does instead)."""
    folder = agent_dir(out, spec)
    if config is None:
        config = json.loads(json.dumps(run_config(cfg, spec)))
    marker, table, values_table = cache_files(out, spec)
    if cfg.rerun or not (marker.exists() and table.exists() and values_table.exists()):
        return None
    if read_json(marker).get("config") != config:
        print(f"{spec}: {folder} holds a run with another config, {otherwise}")
    elif problem := cached_sessions_problem(pd.read_parquet(table), cfg, spec):
        print(f"{spec}: {folder} holds sessions that cannot be paired ({problem}), {otherwise}")
    else:
        print(f"{spec}: same config already evaluated in {folder}, reusing its sessions (--rerun to redo)")
        return pd.read_parquet(table), pd.read_parquet(values_table)
    return None


def run_agent(
    cfg: EvalConfig, spec: str, out: Path, states: Callable[[], RequestStates] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The agent's sessions and its per-state values on the ``oracle_share`` states (``state_values``: columns
    ``policy``, ``oracle``, ``oracle_fatigue``): reused from ``agent_dir(out, spec)`` when its run config
    matches (``cached_tables``), else simulated and saved there. ``states`` returns those states (built once for
    every agent of a comparison: on the large preset they are a 16 GiB table and ~30 s of scoring); None builds
    them here."""
    config = json.loads(json.dumps(run_config(cfg, spec)))  # as it reads back from JSON
    cached = cached_tables(cfg, spec, out, config)
    if cached is not None:
        return cached
    marker, table, values_table = cache_files(out, spec)
    env = make_vec_env(
        cfg.env,
        cfg.num_envs,
        preset=cfg.preset,
        world_seed=cfg.world_seed,
        device=cfg.device,
        validate_actions=False,
        **BUDGETS[cfg.budgets],
    )
    attach_auction_model(env, cfg.auction)
    policy = make_policy(spec, env, cfg.seed)
    start = time.perf_counter()
    sessions, steps = collect_sessions(env, policy, cfg.sessions_per_slot_of(spec), cfg.seed, desc=spec)
    seconds = time.perf_counter() - start
    print(f"{spec}: {len(sessions)} sessions, {steps} steps of {cfg.num_envs} requests in {seconds:.1f} s")
    states = states() if states is not None else RequestStates.build(cfg.oracle_share)
    values = state_values(make_policy(spec, states.env, cfg.seed), states)
    values = pd.DataFrame({k: v.cpu().numpy() for k, v in values.items()})
    write_parquet(table, sessions)
    write_parquet(values_table, values)
    metrics = {**summarize(sessions, prefix=PREFIX), **oracle_share_metrics(values, cfg.ci.level)}
    write_json(
        marker,
        {
            "config": config,
            "steps": steps,
            "seconds": seconds,
            "metrics": strict_json(metrics),
        },
    )
    return sessions, values


def cached_sessions_problem(sessions: pd.DataFrame, cfg: EvalConfig, spec: str = "") -> str | None:
    """Why cached session records of ``spec`` cannot stand for this run (None if they can): a column of
    ``gpr_sim.metrics.SESSION_COLUMNS`` is missing (a cache written before it existed, e.g. without the
    pairing key ``slot``, ``session``), or the records are not the k-th session of every slot for every
    k < ``cfg.sessions_per_slot_of(spec)``, each once (what pairs sessions across agents)."""
    missing = [c for c in SESSION_COLUMNS if c not in sessions.columns]
    if missing:
        return f"no column {', '.join(missing)}"
    k = cfg.sessions_per_slot_of(spec)
    want = pd.MultiIndex.from_product([range(cfg.num_envs), range(k)], names=list(PAIR_KEY))
    have = pd.MultiIndex.from_frame(sessions[list(PAIR_KEY)])
    if len(have) != len(want) or not have.sort_values().equals(want):
        return f"not sessions 0..{k - 1} of slots 0..{cfg.num_envs - 1}, each once"
    return None


def oracle_share_metrics(values: pd.DataFrame, level: float) -> dict[str, float]:
    """``eval/oracle_share`` (+ interval), ``eval/oracle_fatigue_share``... of an agent's per-state values."""
    return {f"{PREFIX}{k}": v for k, v in summarize_shares(values, level).items()}


def strict_json(d: dict) -> dict:
    """NaN and +-inf -> None, so the JSON files stay strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------- every agent


@dataclass(frozen=True)
class Comparison:
    """The summaries of one comparison, one entry per agent in ``EvalConfig.agents`` order."""

    rows: tuple[dict, ...]
    """per agent: ``agent``, the flat metrics of ``gpr_sim.metrics.summarize`` (with intervals) and
    ``oracle_share_metrics``"""
    summary: pd.DataFrame
    """``rows`` as a table"""
    strata: pd.DataFrame
    """per agent x activity tier (1..5) and per agent x ad age (new / old): ``agent``, ``stratum``, ``group``
    and the metric columns (``gpr_sim.metrics.summarize_strata``)"""
    level: float
    """coverage of the intervals"""
    sessions: dict[str, pd.DataFrame] = field(default_factory=dict)
    """agent -> its session records (``gpr_sim.metrics.SESSION_COLUMNS``), what paired differences are over"""
    values: dict[str, pd.DataFrame] = field(default_factory=dict)
    """agent -> its per-state values on the ``oracle_share`` states (``state_values``: one row per state)"""


def compare_agents(cfg: EvalConfig, out: Path) -> Comparison:
    """Every agent's sessions (reused from the cache in ``out`` or simulated, ``run_agent``), summarised with
    ``cfg.ci``; the bootstrap (if any) resamples with the same seed for every agent."""
    summaries, strata, records, state_vals = [], [], {}, {}
    states = functools.cache(lambda: RequestStates.build(cfg.oracle_share))  # built on first need, once
    for spec in cfg.agents:
        if spec in cfg.cached_only:
            cached = cached_tables(cfg, spec, out, otherwise="left out (cached only)")
            if cached is None:
                print(f"{spec}: no sessions of this config in {agent_dir(out, spec)}: left out (cached only)")
                continue
            sessions, values = cached
        else:
            sessions, values = run_agent(cfg, spec, out, states)
        records[spec], state_vals[spec] = sessions, values
        kw = dict(prefix=PREFIX, ci=cfg.ci.method, level=cfg.ci.level, n_bootstrap=cfg.ci.n_bootstrap)
        rng = lambda: np.random.default_rng(cfg.seed)  # noqa: E731  (the same resamples for every agent)
        summary = summarize(sessions, rng=rng(), **kw)
        summaries.append({"agent": spec, **summary, **oracle_share_metrics(values, cfg.ci.level)})
        strata.append(summarize_strata(sessions, rng=rng(), **kw).assign(agent=spec))
    strata_df = pd.concat(strata, ignore_index=True)
    strata_df = strata_df[["agent"] + [c for c in strata_df.columns if c != "agent"]]
    return Comparison(tuple(summaries), pd.DataFrame(summaries), strata_df, cfg.ci.level, records, state_vals)


def write_comparison(result: Comparison, out: Path, plots: bool = True) -> list[Path]:
    """``summary.csv``, ``summary.json`` (agent -> row, NaN as null), ``strata.csv`` and, with ``plots``,
    ``metrics.png`` and ``strata.png`` into ``out``; returns the paths written."""
    files = [
        atomic_write_bytes(out / "summary.csv", result.summary.to_csv(index=False).encode()),
        write_json(out / "summary.json", {r["agent"]: strict_json(r) for r in result.rows}),
        atomic_write_bytes(out / "strata.csv", result.strata.to_csv(index=False).encode()),
    ]
    if plots:
        files.append(plot_summary(result.summary, out / "metrics.png", result.level))
        files.append(plot_strata(result.strata, out / "strata.png", result.level))
    return files


# ----------------------------------------------------------------------------- table and charts

DISPLAY = {  # metric -> (label, scale, format), for the table and the charts
    "oracle_share": ("oracle share %", 100.0, "{:.1f}"),
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
    # conditional expectations of the realised funnel (gpr_sim.metrics, "Expected outcomes": the simulator's truth)
    "ctr_expected": ("CTR % (expected)", 100.0, "{:.2f}"),
    "cvr_expected": ("CVR % (expected)", 100.0, "{:.2f}"),
    "ctcvr_expected": ("CTCVR % (expected)", 100.0, "{:.3f}"),
    "gmv_per_session_expected": ("GMV / session (expected)", 1.0, "{:.2f}"),
    "roi_expected": ("advertiser ROI (expected)", 1.0, "{:.1f}"),
}
CHART = ("ctr", "cvr", "ctcvr", "gmv_per_session", "revenue_per_session", "roi", "session_length", "ecpm")
STRATA_CHART = {
    "activity_tier": ("ctr", "ctcvr", "revenue_per_session", "session_length"),
    "ad_age": ("ctr", "cvr", "ctcvr", "ecpm"),
}


def format_table(summary: pd.DataFrame) -> str:
    """Metrics as rows, agents as columns (privileged references marked: ``policy_label``), each cell
    ``value [ci_low, ci_high]``."""
    rows = {
        "sessions": {
            policy_label(a): str(int(n)) for a, n in zip(summary["agent"], summary[f"{PREFIX}sessions"])
        }
    }
    for key, (label, scale, fmt) in DISPLAY.items():
        rows[label] = {}
        for _, r in summary.iterrows():
            v, lo, hi = (scale * r[f"{PREFIX}{key}{s}"] for s in ("", "_ci_low", "_ci_high"))
            rows[label][policy_label(r["agent"])] = f"{fmt.format(v)} [{fmt.format(lo)}, {fmt.format(hi)}]"
    return pd.DataFrame(rows).T.to_string()


def _bars(
    ax, groups: list[str], agents: list[str], table: pd.DataFrame, key: str, group_col: str | None
) -> None:
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
        ax.bar(x, v, width, yerr=err, capsize=3, label=policy_label(agent))
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_title(label)


def _save(fig, path: Path) -> Path:
    return atomic_write_bytes(path, figure_bytes(fig, dpi=110))


def plot_summary(summary: pd.DataFrame, path: Path, level: float) -> Path:
    """Bars of the summary table, one panel per metric of ``CHART``, one bar per agent, CI error bars."""
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
    return _save(fig, path)


def plot_strata(strata: pd.DataFrame, path: Path, level: float) -> Path:
    """Bars of the strata table: a row of panels per stratum (``STRATA_CHART``), grouped by tier / ad age."""
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
    return _save(fig, path)
