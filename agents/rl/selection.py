"""Which policy an RL run keeps (``OUT/best``: ``keep_best`` and the records it pairs later evaluations with)
and when it stops (``plateaued``): both read the run's held-out evaluations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from agents.evaluation.heldout import paired_margin
from agents.policies.gpr import save_policy
from agents.reporting.keys import BEST_ITERATION, BEST_METRIC, margin_key
from gpr_sim.model import GPRModel
from gpr_sim.runs import file_digest, read_json, write_json, write_parquet

BEST_DIR = "best"
"""the run folder's sub-folder holding its best policy (``keep_best``), a run folder itself: ``gpr:RUN/best``"""
START_SESSIONS = "start_sessions.parquet"
"""the run folder's record of the iteration-0 evaluation's held-out sessions: each later evaluation is paired with
them (``paired_margin(..., against="start")``: is RL's gain over its start one the evaluation resolves?)"""
BEST_SESSIONS = "sessions.parquet"
"""``OUT/best``'s held-out session records: each later evaluation is paired with them (``paired_margin``)"""
SELECT_METRIC = BEST_METRIC
"""what ``OUT/best`` is chosen by: the realised reward per held-out session, the number an online A/B test of the
policy would read (revenue and GMV of the clicks and conversions drawn), not a privileged one; the reports read
the same choice back from ``metrics.jsonl`` (``agents.reporting.folders.best_row``)"""


def best_selection(out: Path, start: int) -> dict | None:
    """The selection ``OUT/best/config.json`` records (``keep_best``), or None when it is absent, was written after
    iteration ``start`` (by iterations a resumed run discards and replays) or does not describe the policy file
    beside it (a run stopped between the two writes): then the next evaluation chooses again."""
    path, policy = out / BEST_DIR / "config.json", out / BEST_DIR / "policy.pt"
    if not (path.is_file() and policy.is_file()):
        return None
    selected = read_json(path).get("selected")
    if not selected or selected["iteration"] > start or selected.get("policy_sha256") != file_digest(policy):
        return None
    return selected


def keep_best(
    out: Path,
    model: GPRModel,
    row: dict,
    selected: dict | None,
    sessions: pd.DataFrame | None = None,
    rule: str = "highest",
) -> dict | None:
    """Write ``OUT/best`` (``policy.pt``, the evaluation's session records ``sessions`` as ``BEST_SESSIONS`` when
    given, and a ``config.json`` recording ``selected``, last) when evaluation ``row`` beats ``selected``'s
    ``SELECT_METRIC``; returns the selection now held. ``rule`` (``BEST_RULES``): "highest" beats on a higher
    value, "resolved" only on a paired margin (``paired_margin``, in ``row``) whose interval is above 0; a row
    without a margin (no best sessions to pair with: a run folder from before they were kept) falls back to
    "highest".

    Why: under a learned reward RL over-optimises the reward model, and the held-out curves rise, peak and fall
    (benchmarks/RESULTS.md); a platform ships the checkpoint its A/B test liked best, not the last one.
    ``gpr:OUT/best`` serves it (a run folder: the same tokenizer and auction as ``OUT``). Selected on the
    training-time evaluation's sessions, so its own numbers there are optimistic: compare it on other sessions
    (``agents.sweep --policy best`` does, on ``--final-eval-seed``).
    """
    value = row.get(SELECT_METRIC, math.nan)
    if not math.isfinite(value) or (selected and value <= selected["value"]):
        return selected
    low = row.get(f"{margin_key('best')}_ci_low")
    if rule == "resolved" and selected and low is not None and not low > 0:
        return selected
    folder = out / BEST_DIR
    folder.mkdir(exist_ok=True)
    save_policy(folder / "policy.pt", model)
    chosen = {
        "iteration": row["iteration"],
        "metric": SELECT_METRIC,
        "value": value,
        "policy_sha256": file_digest(folder / "policy.pt"),
    }
    if sessions is not None:
        chosen["sessions_sha256"] = file_digest(write_parquet(folder / BEST_SESSIONS, sessions))
    write_json(folder / "config.json", {**read_json(out / "config.json"), "selected": chosen})
    return chosen


def best_logged(selected: dict | None) -> dict:
    """What an evaluation's ``metrics.jsonl`` row records of the selection held after it: ``BEST_ITERATION``,
    the evaluation ``OUT/best`` holds (``agents.reporting.folders.best_row`` reads it back)."""
    return {BEST_ITERATION: selected["iteration"]} if selected else {}


def best_sessions(out: Path, selected: dict | None) -> pd.DataFrame | None:
    """The held-out session records of the evaluation ``selected`` chose (``keep_best``), for the next
    evaluations' ``paired_margin``; None without a selection or when the file is not the one it recorded."""
    path = out / BEST_DIR / BEST_SESSIONS
    if not selected or not path.is_file() or selected.get("sessions_sha256") != file_digest(path):
        return None
    return pd.read_parquet(path)


def plateaued(curve: list[float], patience: int, delta: float) -> bool:
    """Whether the last ``patience`` of the evaluations' ``curve`` (eval/``plateau_metric``, in order) rose by no
    more than ``delta`` above the best before them: the curve has flattened (``patience`` 0: never)."""
    if patience <= 0 or len(curve) <= patience:
        return False
    return max(curve[-patience:]) <= max(curve[:-patience]) + delta


@dataclass
class Selection:
    """What ``OUT/best`` holds during a run (rank 0) and the held-out session records each later evaluation is
    paired with: the best evaluation's (``eval/reward_per_session_vs_best``) and the iteration-0 one's, the start
    (``..._vs_start``). ``start`` records the first evaluation, ``resumed`` reads both back from the run folder,
    ``margins`` pairs an evaluation, ``consider`` lets it replace the best (``keep_best`` under ``rule``)."""

    out: Path
    rule: str = "highest"
    best: dict | None = None
    best_records: pd.DataFrame | None = None
    start_records: pd.DataFrame | None = None

    @classmethod
    def resumed(cls, out: Path, start: int, rule: str = "highest") -> Selection:
        """The selection of the run in ``out`` resumed at iteration ``start`` (``best_selection``: none if written
        by iterations the resumed run replays)."""
        best = best_selection(out, start)
        start_file = out / START_SESSIONS  # written at iteration 0, which a resume never replays
        start_records = pd.read_parquet(start_file) if start_file.is_file() else None
        return cls(out, rule, best, best_sessions(out, best), start_records)

    def start(self, model: GPRModel, row: dict, sessions: pd.DataFrame) -> dict:
        """The iteration-0 evaluation ``row`` of ``model`` on ``sessions``: the first best and the start's records
        (``START_SESSIONS``); returns what its ``metrics.jsonl`` row records of the selection."""
        self.best = keep_best(self.out, model, row, None, sessions)
        self.best_records = sessions if self.best else None
        self.start_records = sessions
        write_parquet(self.out / START_SESSIONS, sessions)
        return best_logged(self.best)

    def margins(self, sessions: pd.DataFrame) -> dict:
        """A later evaluation's ``sessions`` paired with the best before it and with the start (``paired_margin``;
        nothing for a side without records)."""
        return {
            **paired_margin(sessions, self.best_records),
            **paired_margin(sessions, self.start_records, against="start"),
        }

    def consider(self, model: GPRModel, row: dict, sessions: pd.DataFrame) -> dict:
        """Let evaluation ``row`` (its margins in it) replace the best; returns its row's selection keys."""
        chosen = keep_best(self.out, model, row, self.best, sessions, self.rule)
        if chosen is not self.best:  # a new best: later evaluations are paired with its sessions
            self.best, self.best_records = chosen, sessions
        return best_logged(self.best)
