"""Paired differences between agents: every metric of an agent minus the reference's, session by session.

    cfg = EvalConfig(agents=("random", "cascade-privileged"), reference="cascade-privileged")
    result = compare_agents(cfg, out)
    table = paired_table(result, "cascade-privileged")          # one row per (agent, metric)
    write_paired(table, out, result.level)           # paired.csv, paired.json, paired.png
    print(format_paired(table))

Why pair: every agent of a comparison runs on a fresh market from the same world seed, reset with the same
seed, and the simulator's random numbers are keyed by (seed, env slot, draw counter)
(``gpr_sim.world.rng``). A session is therefore identified across agents by ``gpr_sim.metrics.PAIR_KEY``,
(env slot, the slot's session index), and the k-th session of slot s of two agents shares

- for k = 0, always: the same user and pre-session history, and the same draw for every request of the
  session (clicks, conversions, order values, exits, the external competitor): common random numbers;
- for k >= 1, only when the slot's earlier sessions had the same lengths under both agents: a session starts
  at the draw counter sum_{j<k} (length_j + 1) (``initial`` takes one draw, each request one more), and its
  user is drawn at that counter (``stream_start``). When the lengths differ, the two sessions draw their users
  and outcomes from unrelated streams; the pair is still valid (same slot, same market position, same
  sampling plan), it just shares less.

Keying a session's user by (seed, slot, episode) instead would pair every session, but it would draw other
users for every session after a slot's first, changing every number the simulator has produced; it is not
done. For the strongest pairing, record one session per slot (``--num-envs`` >= ``--sessions``; budgets
scale with the number of slots, so that is another market, not the same one paired better).
``same_streams`` counts the pairs that share their streams. An agent recorded on fewer sessions per slot
(``EvalConfig.sessions_of``, an expensive reference) is paired on the sessions both hold (``common_sessions``):
each slot's first ones, where the pairing is strongest.

Per metric of ``gpr_sim.metrics.METRICS`` (per-session means and ratios of per-session sums) and for
``oracle_share`` (paired by request state: every agent is valued on the same states), the table holds the
paired difference with its interval (``gpr_sim.stats.paired_ratio_difference``: the delta method on paired
units, the t interval of per-pair differences for means), the unpaired interval of the same difference
(``gpr_sim.stats.welch_ratio_difference``: what the table would say if the sessions were independent) and
the variance reduction factor, unpaired variance / paired variance of the difference. Both intervals are over
the same sessions and have the same point estimate, R_agent - R_reference.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from agents.evaluation.compare import DISPLAY, Comparison, strict_json
from agents.policies import policy_label
from gpr_sim.metrics import METRICS, PAIR_KEY, Metric
from gpr_sim.runs import atomic_write_bytes, figure_bytes, write_json
from gpr_sim.stats import Estimate, paired_ratio_difference, welch_ratio_difference

STATE_METRIC = Metric("oracle_share", "policy", "oracle")
"""``eval/oracle_share`` over the per-state values (``agents.evaluation.oracle_share.state_values``), paired by
request state"""
COLUMNS = (
    "agent",
    "reference",
    "metric",
    "pairs",
    "same_streams",
    "value",
    "reference_value",
    "difference",
    "ci_low",
    "ci_high",
    "std_err",
    "unpaired_ci_low",
    "unpaired_ci_high",
    "unpaired_std_err",
    "variance_reduction",
)
"""Columns of ``paired_table``, in order."""
CHART = (
    "reward_per_session",
    "revenue_per_session",
    "gmv_per_session",
    "ctr",
    "ctcvr",
    "session_length",
    "exit_rate",
    "oracle_share",
)
"""The metrics of ``paired.png``, one panel each."""


# ----------------------------------------------------------------------------- pairing sessions


def stream_start(sessions: pd.DataFrame) -> pd.Series:
    """The draw counter at which each recorded session began: sum_{j<k} (length_j + 1) over the slot's
    earlier sessions (0 for a slot's first). Valid for records of every session since ``reset``
    (``collect_sessions``); two agents' sessions with the same (slot, start) draw the same user and outcomes."""
    order = np.lexsort((sessions["session"].to_numpy(), sessions["slot"].to_numpy()))  # by slot, then session
    steps = sessions["length"].to_numpy(np.int64)[order] + 1  # ``initial`` takes one draw, each request one
    before = pd.Series(steps).groupby(sessions["slot"].to_numpy()[order]).cumsum().to_numpy() - steps
    start = np.empty_like(before)
    start[order] = before
    return pd.Series(start, index=sessions.index, name="stream_start")


def pair_sessions(sessions: pd.DataFrame, reference: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two agents' records aligned on ``PAIR_KEY`` (row i of each is the same slot's same session), each
    with its ``stream_start`` column.

    Raises:
        ValueError: when a table lacks the key, repeats a key, or the two hold different sessions (records
            from runs of different sizes cannot be paired).
    """
    tables = []
    for name, df in (("sessions", sessions), ("reference", reference)):
        missing = [c for c in PAIR_KEY if c not in df.columns]
        if missing:
            raise ValueError(f"{name} has no pairing key column {', '.join(missing)}")
        if df.duplicated(list(PAIR_KEY)).any():
            raise ValueError(f"{name} holds a (slot, session) twice: not one run's records")
        tables.append(
            df.assign(stream_start=stream_start(df)).sort_values(list(PAIR_KEY)).reset_index(drop=True)
        )
    a, b = tables
    if not a[list(PAIR_KEY)].equals(b[list(PAIR_KEY)]):
        raise ValueError(
            f"the two agents hold different sessions ({len(a)} and {len(b)} records, not the same "
            "(slot, session) keys): only runs of the same size can be paired"
        )
    return a, b


def difference_row(a: pd.DataFrame, b: pd.DataFrame, metric: Metric, level: float) -> dict[str, float]:
    """One metric of two aligned tables (row i of ``a`` paired with row i of ``b``): both values, the paired
    and the unpaired interval of a - b, and the variance reduction (unpaired / paired variance; inf when the
    pairs agree exactly, NaN when neither interval exists)."""

    def parts(df):
        den = df[metric.denominator].to_numpy(np.float64) if metric.denominator else None
        return df[metric.numerator].to_numpy(np.float64), den

    args = (*parts(a), *parts(b), level)
    paired, unpaired = paired_ratio_difference(*args), welch_ratio_difference(*args)
    paired, unpaired = (Estimate(*(metric.scale * v for v in e[:4]), e.n, e.name) for e in (paired, unpaired))
    with np.errstate(divide="ignore", invalid="ignore"):
        reduction = np.float64(unpaired.std_err) ** 2 / np.float64(paired.std_err) ** 2
    return {
        "value": _ratio(a, metric),
        "reference_value": _ratio(b, metric),
        "difference": paired.value,
        "ci_low": paired.ci_low,
        "ci_high": paired.ci_high,
        "std_err": paired.std_err,
        "unpaired_ci_low": unpaired.ci_low,
        "unpaired_ci_high": unpaired.ci_high,
        "unpaired_std_err": unpaired.std_err,
        "variance_reduction": float(reduction),
    }


def _ratio(df: pd.DataFrame, m: Metric) -> float:
    den = df[m.denominator].sum() if m.denominator else len(df)
    return float(m.scale * df[m.numerator].sum() / den) if den else math.nan


def common_sessions(sessions: pd.DataFrame, reference: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both tables cut to the sessions both hold: each slot's first min(k_a, k_b) sessions, where k is a table's
    sessions per slot (an agent recorded on fewer sessions, ``EvalConfig.sessions_of``: in the same market its
    first sessions are a longer run's first ones). Tables with the same k come back unchanged."""
    if "session" not in sessions.columns or "session" not in reference.columns:
        return sessions, reference  # (``pair_sessions`` names the missing key)
    k_a, k_b = (int(df["session"].max()) + 1 if len(df) else 0 for df in (sessions, reference))
    k = min(k_a, k_b)
    return tuple(df if kk == k else df[df["session"] < k] for df, kk in ((sessions, k_a), (reference, k_b)))


def paired_table(result: Comparison, reference: str, metrics: tuple[Metric, ...] = METRICS) -> pd.DataFrame:
    """Every other agent of ``result`` against ``reference``: one row per (agent, metric) of ``metrics`` and
    ``STATE_METRIC`` (columns ``COLUMNS``), agents in comparison order, intervals at ``result.level``.

    Raises:
        ValueError: an unknown reference, or sessions that do not pair (``pair_sessions``).
    """
    if reference not in result.sessions:
        raise ValueError(
            f"reference={reference!r} is not one of the compared agents: {','.join(result.sessions)}"
        )
    rows = []
    for agent in result.sessions:
        if agent == reference:
            continue
        a, b = pair_sessions(*common_sessions(result.sessions[agent], result.sessions[reference]))
        same = int((a["stream_start"] == b["stream_start"]).sum())
        head = {"agent": agent, "reference": reference, "pairs": len(a), "same_streams": same}
        for m in metrics:
            rows.append({**head, "metric": m.name, **difference_row(a, b, m, result.level)})
        if agent in result.values and reference in result.values:
            va, vb = result.values[agent], result.values[reference]
            if len(va) != len(vb):
                raise ValueError(f"{agent} and {reference} were valued on {len(va)} and {len(vb)} states")
            n = len(va)  # the same fixed request states: every pair shares everything but the agent
            head = {**head, "pairs": n, "same_streams": n}
            rows.append(
                {**head, "metric": STATE_METRIC.name, **difference_row(va, vb, STATE_METRIC, result.level)}
            )
    return pd.DataFrame(rows, columns=list(COLUMNS))


# ----------------------------------------------------------------------------- files, table and chart


def _display(metric: str) -> tuple[str, float, str]:
    return DISPLAY.get(metric, (metric.replace("_", " "), 1.0, "{:.3f}"))


def write_paired(table: pd.DataFrame, out: Path, level: float, plots: bool = True) -> list[Path]:
    """``paired.csv`` (the table), ``paired.json`` (agent -> metric -> the row's numbers, non-finite as null)
    and, with ``plots``, ``paired.png`` into ``out``; returns the paths written."""
    nested: dict[str, dict] = {}
    for row in table.to_dict("records"):
        agent, metric = row.pop("agent"), row.pop("metric")
        nested.setdefault(agent, {})[metric] = strict_json(row)
    files = [
        atomic_write_bytes(out / "paired.csv", table.to_csv(index=False).encode()),
        write_json(out / "paired.json", {"level": level, "agents": nested}),
    ]
    if plots:
        files.append(plot_paired(table, out / "paired.png", level))
    return files


def format_paired(table: pd.DataFrame) -> str:
    """One block per agent: metric rows with the paired difference [interval], the unpaired interval beside
    it and the variance reduction factor, in the units of the summary table."""
    blocks = []
    for agent, part in table.groupby("agent", sort=False):
        rows = {}
        for r in part.itertuples():
            label, scale, fmt = _display(r.metric)
            lo, hi, ulo, uhi = (
                fmt.format(scale * v) for v in (r.ci_low, r.ci_high, r.unpaired_ci_low, r.unpaired_ci_high)
            )
            rows[label] = {
                "difference [paired CI]": f"{fmt.format(scale * r.difference)} [{lo}, {hi}]",
                "unpaired CI": f"[{ulo}, {uhi}]",
                "variance reduction": f"{r.variance_reduction:.2f}x",
            }
        first = part.iloc[0]
        sessions = part[part.metric != STATE_METRIC.name].iloc[0]
        blocks.append(
            f"{policy_label(agent)} - {policy_label(first.reference)}: {sessions.pairs} paired sessions, "
            f"{sessions.same_streams} "
            f"({sessions.same_streams / sessions.pairs:.0%}) on the same streams\n"
            + pd.DataFrame(rows).T.to_string()
        )
    return "\n\n".join(blocks)


def plot_paired(table: pd.DataFrame, path: Path, level: float) -> Path:
    """One panel per metric of ``CHART``: each agent's difference from the reference with its paired interval
    (black) and the unpaired one (grey) beside it, a line at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = list(dict.fromkeys(table["agent"]))
    x = np.arange(len(agents))
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    for ax, key in zip(axes.flat, CHART):
        part = table[table["metric"] == key].set_index("agent").reindex(agents)
        label, scale, _ = _display(key)
        v = scale * part["difference"].to_numpy(float)
        for dx, (lo, hi, color, name) in enumerate(
            (
                ("ci_low", "ci_high", "black", "paired"),
                ("unpaired_ci_low", "unpaired_ci_high", "0.6", "unpaired"),
            )
        ):
            err = np.stack([v - scale * part[lo].to_numpy(float), scale * part[hi].to_numpy(float) - v])
            ax.errorbar(
                x + 0.15 * (dx - 0.5), v, yerr=np.nan_to_num(err), fmt="o", color=color, capsize=3, label=name
            )
        ax.axhline(0.0, color="0.8", lw=1, zorder=0)
        ax.set_xticks(x, [policy_label(a) for a in agents])
        ax.set_title(f"{label}: agent - {policy_label(table['reference'].iloc[0])}")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="upper right", ncol=2, fontsize=9)
    fig.suptitle(f"paired differences from the reference, {level:.0%} intervals (paired and unpaired)")
    fig.tight_layout()
    return atomic_write_bytes(path, figure_bytes(fig, dpi=110))
