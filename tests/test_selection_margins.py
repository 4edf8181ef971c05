"""benchmarks/selection_margins.py on hand-written run folders: the rows it reads back and the counts it makes."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "selection_margins.py"
_spec = importlib.util.spec_from_file_location("selection_margins", _PATH)
margins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(margins)

KEY = "eval/reward_per_session"
MARGIN = f"{KEY}_vs_best"


def make_run(root: Path, name: str, evaluations, seed: int = 0, start_margins: bool = False) -> Path:
    """A run folder whose evaluations are (value, half-width, margin or None, paired half-width); with
    ``start_margins`` each later evaluation also logs its margin over the first (that interval's half-width 0.15)."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"algo": name, "label": name, "seed": seed}))
    rows = []
    for i, (value, half, margin, paired) in enumerate(evaluations):
        row = {"iteration": 2 * i, KEY: value, f"{KEY}_ci_low": value - half, f"{KEY}_ci_high": value + half}
        if margin is not None:
            row.update(
                {MARGIN: margin, f"{MARGIN}_ci_low": margin - paired, f"{MARGIN}_ci_high": margin + paired}
            )
        if start_margins and i > 0:
            d = value - evaluations[0][0]
            row.update(
                {
                    f"{KEY}_vs_start": d,
                    f"{KEY}_vs_start_ci_low": d - 0.15,
                    f"{KEY}_vs_start_ci_high": d + 0.15,
                }
            )
        rows.append(row)
        rows.append({"iteration": 2 * i + 1, "train/loss": 0.1})  # an iteration without an evaluation
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_margins_count_new_bests_and_what_pairing_buys(tmp_path):
    # values 1.0 (start), 1.3 (new best by +0.3 +- 0.1: resolved), 1.2 (below 1.3 by 0.1 +- 0.2: not resolved),
    # 1.35 (new best by +0.05 +- 0.1: not resolved), 1.0 (below by 0.35 +- 0.1: resolved)
    run = make_run(
        tmp_path,
        "hepo",
        [
            (1.0, 0.3, None, 0),
            (1.3, 0.4, 0.3, 0.1),
            (1.2, 0.3, -0.1, 0.2),
            (1.35, 0.3, 0.05, 0.1),
            (1.0, 0.3, -0.35, 0.1),
        ],
    )
    rows = margins.margin_rows(run)
    assert list(rows["iteration"]) == [2, 4, 6, 8]
    assert not rows["identical"].any()
    assert list(rows["new_best"]) == [True, False, True, False]
    # unpaired: the row's half-width with the best before's (1.0's 0.3, then 1.3's 0.4, then 1.35's 0.3)
    assert list(rows["unpaired_half_width"]) == pytest.approx([0.5, 0.5, 0.5, math.hypot(0.3, 0.3)])
    s = margins.summary_row("hepo", rows)
    assert (s["new_bests"], s["new_bests_resolved"], s["not_best"], s["not_best_resolved_below"]) == (
        2,
        1,
        2,
        1,
    )
    assert s["paired_half_width_median"] == pytest.approx(0.1)
    assert s["variance_reduction"] == pytest.approx((0.5 / 0.1) ** 2)
    assert s["new_best_margin_median"] == pytest.approx(0.175)


def test_new_bests_follow_the_selection_the_run_logged(tmp_path):
    """A run that logs ``eval/best_iteration`` (here a --best-rule resolved run that kept its start past a higher but
    unresolved evaluation) is read by what it chose, not by re-deriving the highest rule."""
    run = make_run(tmp_path, "hepo", [(1.0, 0.3, None, 0), (1.1, 0.3, 0.1, 0.2), (1.4, 0.3, 0.4, 0.1)])
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    chosen = {0: 0, 2: 0, 4: 4}  # 1.1 kept out (its margin reaches 0), 1.4 in
    for r in lines:
        if r["iteration"] in chosen:
            r["eval/best_iteration"] = chosen[r["iteration"]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = margins.margin_rows(run)
    assert list(rows["new_best"]) == [False, True]
    # 1.4's unpaired half-width combines its own with the start's (still the best), not with 1.1's
    assert rows["unpaired_half_width"].iloc[1] == pytest.approx(math.hypot(0.3, 0.3))


def test_an_unchanged_policy_is_counted_apart(tmp_path):
    """A critic warm-up evaluation plays the best's sessions again: margin 0 with a zero-width interval."""
    run = make_run(tmp_path, "grpo", [(1.0, 0.3, None, 0), (1.0, 0.3, 0.0, 0.0), (1.2, 0.3, 0.2, 0.1)])
    s = margins.summary_row("grpo", margins.margin_rows(run))
    assert (s["identical"], s["evaluations"], s["new_bests"], s["new_bests_resolved"]) == (1, 1, 1, 1)
    assert s["paired_half_width_median"] == pytest.approx(0.1)


def test_evaluations_resolved_above_the_start_are_counted_where_logged(tmp_path):
    # over the start 1.0: +0.3, +0.2, +0.35, 0.0 with half-width 0.15: the first three resolved
    evaluations = [
        (1.0, 0.3, None, 0),
        (1.3, 0.4, 0.3, 0.1),
        (1.2, 0.3, -0.1, 0.2),
        (1.35, 0.3, 0.05, 0.1),
        (1.0, 0.3, -0.35, 0.1),
    ]
    s = margins.summary_row(
        "hepo", margins.margin_rows(make_run(tmp_path, "hepo", evaluations, start_margins=True))
    )
    assert (s["above_start_resolved"], s["with_start_margin"]) == (3, 4)
    s = margins.summary_row("ppo", margins.margin_rows(make_run(tmp_path, "ppo", evaluations)))
    assert (s["above_start_resolved"], s["with_start_margin"]) == (0, 0)


def test_runs_without_margins_are_named_not_counted(tmp_path):
    with_margins = make_run(tmp_path, "ppo", [(1.0, 0.3, None, 0), (1.1, 0.3, 0.1, 0.05)])
    old = make_run(tmp_path, "old", [(1.0, 0.3, None, 0), (1.1, 0.3, None, 0)])
    res = margins.main([str(with_margins), str(old), "--out", str(tmp_path / "m")])
    assert res["without_margins"] == [str(old)]
    assert [r["runs"] for r in res["summary"]] == ["ppo", "all"]
    assert "without margins (not counted)" in (tmp_path / "m.md").read_text()
    with pytest.raises(ValueError, match="no run logged"):
        margins.main([str(old)])
