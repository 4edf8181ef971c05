"""agents.hepo end to end on a tiny config: resume, every algorithm, policy export, errors; sampling and ARR."""

from __future__ import annotations

import json
import math
import signal
import threading

import gymnasium
import pandas as pd
import pytest
import torch

import agents.hepo as hepo
import envs  # noqa: F401  (registers ads-v0)
from agents import pretrain
from agents.cli import UsageError, parse_args, run_main
from agents.evaluate import Args as EvalArgs
from agents.evaluate import main as evaluate
from agents.evaluation.heldout import Evaluator, HeldOutConfig, paired_margin
from agents.policies.gpr import load_run_model, save_policy
from agents.reporting import keys
from agents.rl import checkpoint, selection, trainer
from agents.rl import config as rl_config
from agents.rl.rollout import Roller
from benchmarks import path_mass_shift
from envs.market import REHEARSAL_SEED_OFFSET
from gpr_sim.data.logs import read_logs
from gpr_sim.metrics import AD_METRICS, summarize
from gpr_sim.platform.features import PlatformFeatures
from gpr_sim.runs import read_metrics, write_parquet
from gpr_sim.sampling import sample_paths
from gpr_sim.schema import SchemaConfig, tokens_from_obs
from gpr_sim.world import WorldConfig, preset, rng
from gpr_sim.world.config import PRESETS
from gpr_sim.world.state import MarketState
from tests.helpers import TINY_PRETRAIN, torchrun


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hepo_pre")
    mtp = root / "mtp"
    pretrain.main(["--out", str(mtp), *TINY_PRETRAIN])
    pretrain.main(
        [
            "--out",
            str(root / "vaft"),
            "--stage",
            "vaft",
            "--init",
            str(mtp / "checkpoint.pt"),
            "--logs",
            str(mtp / "logs.parquet"),
            "--tokenizer",
            str(mtp / "tokenizer"),
            *TINY_PRETRAIN,
        ]
    )
    return root


@pytest.fixture(scope="module")
def pre_content_only(tmp_path_factory):
    """``pre`` without the platform features in the tokens (content-only layout, ``--no-platform-features``)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hepo_pre_content")
    mtp = root / "mtp"
    flags = [*TINY_PRETRAIN, "--no-platform-features"]
    pretrain.main(["--out", str(mtp), *flags])
    pretrain.main(
        [
            "--out",
            str(root / "vaft"),
            "--stage",
            "vaft",
            "--init",
            str(mtp / "checkpoint.pt"),
            "--logs",
            str(mtp / "logs.parquet"),
            "--tokenizer",
            str(mtp / "tokenizer"),
            *flags,
        ]
    )
    return root


def tiny(pre, out, *extra) -> list[str]:
    return [
        "--pretrain-dir",
        str(pre),
        "--mtp-steps",
        "3",
        "--vaft-steps",
        "3",
        "--num-envs",
        "8",
        "--rollout-steps",
        "2",
        "--group-size",
        "4",
        "--minibatch",
        "8",
        "--eval-every",
        "1",
        "--eval-sessions",
        "8",
        "--eval-envs",
        "8",
        "--eval-candidates",
        "4",
        "--eval-beam",
        "2",
        "--checkpoint-every",
        "1",
        "--critic-warmup",
        "1",
        "--funnel-envs",
        "32",
        "--funnel-steps",
        "50",
        "--behaviour",
        "cascade-privileged",  # the log of the ``pre`` fixtures (agents.pretrain's default); the chain: below
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def _comparable_rows(out):
    return [
        {k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(out / "metrics.jsonl")
    ]


def test_interrupted_run_resumes_to_the_same_metrics(pre, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    hepo.main(tiny(pre, straight, "--iterations", "3"))

    broken = tmp_path / "broken"
    real_update, calls = trainer.update, []

    def crash_on_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during the third update, after checkpoint 2
        return real_update(*a, **kw)

    monkeypatch.setattr(trainer, "update", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        hepo.main(tiny(pre, broken, "--iterations", "3"))
    monkeypatch.setattr(trainer, "update", real_update)
    assert not (broken / "summary.json").exists()
    hepo.main(tiny(pre, broken, "--iterations", "3"))
    a, b = _comparable_rows(straight), _comparable_rows(broken)
    assert [r["iteration"] for r in a] == [0, 1, 2, 3]
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    chosen = [json.loads((f / "best" / "config.json").read_text())["selected"] for f in (straight, broken)]
    assert chosen[0] == chosen[1]  # the resumed run kept (or re-chose) the same best policy
    # every evaluation after the first is paired with the best one before it (the resumed run too: equal rows
    # above); for a mean per session the paired difference is the difference of the means
    margin, best_before = f"{selection.SELECT_METRIC}_vs_best", a[0][selection.SELECT_METRIC]
    assert margin not in a[0]
    for r in a[1:]:
        assert r[margin] == pytest.approx(r[selection.SELECT_METRIC] - best_before, abs=1e-9)
        assert r[f"{margin}_ci_low"] <= r[margin] <= r[f"{margin}_ci_high"]
        best_before = max(best_before, r[selection.SELECT_METRIC])
    start = f"{selection.SELECT_METRIC}_vs_start"  # and with the iteration-0 evaluation, the VAFT start
    for r in a[1:]:
        assert r[start] == pytest.approx(r[selection.SELECT_METRIC] - a[0][selection.SELECT_METRIC], abs=1e-9)
    kept = pd.read_parquet(straight / "best" / selection.BEST_SESSIONS)
    assert kept["reward"].mean() == pytest.approx(chosen[0]["value"])
    # every evaluation records the selection held after it; the last one names OUT/best's
    assert [keys.BEST_ITERATION in r for r in a] == [True] * 4
    assert a[-1][keys.BEST_ITERATION] == chosen[0]["iteration"]
    assert (straight / "curves.png").stat().st_size > 0
    assert (straight / "reward_model.png").stat().st_size > 0  # the reward model's monitor, every run
    assert (straight / "gradients.png").stat().st_size > 0  # the update's gradients, every run
    # the finished run asked for no more iterations: nothing runs, its summary and history stay as they are
    files = {p.name: p.read_bytes() for p in straight.iterdir() if p.is_file()}
    summary = json.loads(files["summary.json"])
    assert summary["iterations"] == 3
    assert hepo.main(tiny(pre, straight, "--iterations", "2")) == summary
    assert hepo.main(tiny(pre, straight, "--iterations", "3")) == summary
    assert {p.name: p.read_bytes() for p in straight.iterdir() if p.is_file()} == files


def _sigterm_in_update(monkeypatch, k: int) -> None:
    """Make the run's k-th update (iteration k) raise SIGTERM in this process: the stop request arrives
    mid-iteration at a known point, no timing involved (``raise_signal`` runs the handler before it returns)."""
    real_update, calls = trainer.update, []

    def update(*a, **kw):
        calls.append(1)
        if len(calls) == k:
            signal.raise_signal(signal.SIGTERM)
        return real_update(*a, **kw)

    monkeypatch.setattr(trainer, "update", update)


def _previous_handler() -> tuple[list, object]:
    """A SIGTERM handler to stand for what ran before (and to keep a stray SIGTERM from ending pytest);
    returns the signals it caught (a list it appends to) and the handler it replaced."""
    caught: list[int] = []
    return caught, signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))


def test_sigterm_stops_after_the_iteration_and_the_same_command_resumes(pre, tmp_path, monkeypatch, capsys):
    """SIGTERM during iteration 2 of 3: the run ends that iteration (its metrics row, evaluation, best policy),
    writes checkpoint.pt and policy.pt at 2 (no periodic one: --checkpoint-every 3), no summary.json, restores
    the previous handler and exits 143; the same command resumes at 2 and ends as an uninterrupted run."""

    def argv(out):
        return tiny(pre, out, "--iterations", "3", "--checkpoint-every", "3")

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    hepo.main(argv(straight))
    _sigterm_in_update(monkeypatch, 2)
    caught, pytests = _previous_handler()
    try:
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(SystemExit) as stop:
            run_main(hepo.main, argv(stopped))  # python -m agents.hepo's exit status
        assert (
            signal.getsignal(signal.SIGTERM) is before and caught == []
        )  # restored; the run's handler took it
    finally:
        signal.signal(signal.SIGTERM, pytests)
    assert stop.value.code == trainer.STOP_EXIT == 143
    out = capsys.readouterr().out
    assert f"{stopped}: SIGTERM at iteration 2: checkpoint written; run the same command to resume" in out
    state = checkpoint.read_checkpoint(stopped / "checkpoint.pt")
    assert state["iteration"] == 2
    assert [r["iteration"] for r in read_metrics(stopped / "metrics.jsonl")] == [0, 1, 2]  # = the checkpoint
    policy = torch.load(stopped / "policy.pt", weights_only=True)["model"]
    assert all(torch.equal(policy[k], v) for k, v in state["model"].items())
    assert not (stopped / "summary.json").exists()  # not finished: agents.sweep and run_dir resume it

    monkeypatch.undo()
    hepo.main(argv(stopped))
    assert f"{stopped}: resuming at iteration 2" in capsys.readouterr().out
    a, b = _comparable_rows(straight), _comparable_rows(stopped)
    assert [r["iteration"] for r in b] == [0, 1, 2, 3]
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    wa, wb = (torch.load(f / "policy.pt", weights_only=True)["model"] for f in (straight, stopped))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    chosen = [json.loads((f / "best" / "config.json").read_text())["selected"] for f in (straight, stopped)]
    assert chosen[0] == chosen[1]


def test_sigterm_in_the_last_iteration_finishes_the_run_and_still_stops(pre, tmp_path, monkeypatch, capsys):
    """The iteration the SIGTERM came in finished the run: its summary is written as usual, and the process
    still exits 143 (a sweep running runs in process must not start the next one)."""
    out = tmp_path / "run"
    _sigterm_in_update(monkeypatch, 1)
    caught, pytests = _previous_handler()
    try:
        with pytest.raises(SystemExit) as stop:
            hepo.main(tiny(pre, out, "--iterations", "1"))
    finally:
        signal.signal(signal.SIGTERM, pytests)
    assert stop.value.code == 143 and caught == []
    assert "SIGTERM at iteration 1, which finished the run: summary.json written" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["iterations_run"] == 1
    assert checkpoint.read_checkpoint(out / "checkpoint.pt")["iteration"] == 1


def test_stop_request_flags_sigterm_and_restores_the_previous_handler():
    caught, pytests = _previous_handler()
    try:
        previous = signal.getsignal(signal.SIGTERM)
        with trainer.StopRequest() as request:
            assert not request.requested
            signal.raise_signal(signal.SIGTERM)
            assert request.requested and caught == []  # flagged, the process goes on
        assert signal.getsignal(signal.SIGTERM) is previous
        signal.raise_signal(signal.SIGTERM)
        assert caught == [signal.SIGTERM]  # the previous handler has it again
        seen = []

        def elsewhere():  # signal.signal raises outside the main thread: nothing is installed, nothing fails
            with trainer.StopRequest() as r:
                seen.append((signal.getsignal(signal.SIGTERM) is previous, r.requested))

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert seen == [(True, False)]
    finally:
        signal.signal(signal.SIGTERM, pytests)


def check_strata(row: dict, served: bool = False) -> None:
    """An evaluation row's Table 5 keys (``keys.strata_key``) add up to its overall metrics: the activity
    tiers split the sessions (session-weighted means of the per-session metrics = the overall ones), the
    ad-age groups split each session's ads (new + old revenue per session = all of it). ``served``: the
    sessions had revenue, so the sums are not 0 = 0 (the tiny generators of these tests serve no ads)."""
    key, n = keys.strata_key, row["eval/sessions"]
    want = {
        key(s, g, m)
        for s, groups in keys.STRATA.items()
        for g in groups
        for m in ("sessions", *keys.STRATA_METRICS[s])
    }
    assert {k for k in row if k.startswith("eval/strata/")} == want
    tiers = keys.STRATA["activity_tier"]
    sizes = [row[key("activity_tier", g, "sessions")] for g in tiers]
    assert sum(sizes) == n and all(isinstance(k, int) for k in sizes)
    for m in ("reward_per_session", "gmv_per_session", "revenue_per_session"):
        values = [row[key("activity_tier", g, m)] for g in tiers]
        assert all(math.isnan(v) for k, v in zip(sizes, values) if k == 0)  # an empty tier: NaN (JSON NaN)
        combined = sum(k * v for k, v in zip(sizes, values) if k) / n
        assert combined == pytest.approx(row[f"eval/{m}"], rel=1e-9, abs=1e-12), m
    assert [row[key("ad_age", g, "sessions")] for g in ("new", "old")] == [n, n]
    ad_revenue = (
        row[key("ad_age", "new", "revenue_per_session")] + row[key("ad_age", "old", "revenue_per_session")]
    )
    assert ad_revenue == pytest.approx(row["eval/revenue_per_session"], rel=1e-9, abs=1e-12)
    assert row["eval/revenue_per_session"] > 0 or not served


def test_strata_metrics_are_the_ad_metrics_for_ad_age():
    assert set(keys.STRATA_METRICS["ad_age"]) == set(keys.TABLE5) & {m.name for m in AD_METRICS}
    assert keys.STRATA_METRICS["activity_tier"] == keys.TABLE5


def test_held_out_config_is_the_eval_flags():
    # the library's defaults are agents.hepo's --eval-* defaults, and every flag reaches its field
    assert rl_config.held_out(hepo.Args()) == HeldOutConfig()
    args = hepo.Args(
        eval_envs=8, eval_sessions=20, eval_seed=7, eval_beam=3, eval_candidates=5, progress=False
    )
    cfg = rl_config.held_out(args)
    assert cfg == HeldOutConfig(num_envs=8, sessions=20, seed=7, beam_width=3, candidates=5, progress=False)
    assert cfg.sessions_per_slot == 3  # ceil(20 / 8): every slot records 3 sessions, 24 in all
    for bad, field in (
        (dict(candidates=1), "candidates"),
        (dict(num_envs=0), "num_envs"),
        (dict(sessions=True), "sessions"),
        (dict(seed=1.5), "seed"),
    ):
        with pytest.raises(ValueError, match=field):
            HeldOutConfig(**bad)


DPO_MONITOR = (
    "train/dpo_chosen_logratio",
    "train/dpo_rejected_logratio",
    "train/dpo_pairs",
    "train/dpo_accuracy",
)


@pytest.mark.parametrize("algo", ["ppo", "grpo", "sibling_grpo", "dpo"])
def test_baselines_run_and_log_their_losses(pre, tmp_path, algo):
    out = tmp_path / algo
    summary = hepo.main(tiny(pre, out, "--algo", algo, "--iterations", "2"))
    assert summary["algo"] == algo
    rows = read_metrics(out / "metrics.jsonl")
    last = rows[-1]
    for key in (
        "train/policy",
        "train/item_value",
        "train/approx_kl",
        "eval/reward_per_session",
        "eval/cand_ndcg",
        "eval/cand_opr",
        "eval/cand_mean_value",
        "eval/cand_max_value",
    ):
        assert math.isfinite(last[key]), key
    assert json.loads((out / "config.json").read_text())["algo"] == algo
    # DPO's monitor (its pairs' log-ratios to the reference) in every update's row, and only DPO's
    watched = {k for r in rows[1:] for k in r if k.startswith("train/dpo_")}
    assert watched == (set(DPO_MONITOR) if algo == "dpo" else set())
    assert all(
        math.isfinite(r[k]) and (k != "train/dpo_pairs" or 0 <= r[k] <= 1) for r in rows[1:] for k in watched
    )
    evals = [r for r in rows if "eval/reward_per_session" in r]
    assert [r["iteration"] for r in evals] == [0, 1, 2]
    for row in evals:  # the Table 5 scalars of every evaluation, read back from metrics.jsonl
        check_strata(row)
    # Table 3's MTP stage: the candidates of the MTP generator VAFT started from, beside iteration 0 only
    mtp = {k: v for k, v in evals[0].items() if k.startswith("eval/mtp/cand_")}
    assert set(mtp) == {f"eval/mtp/cand_{m}" for m in keys.TABLE3} and all(
        math.isfinite(v) for v in mtp.values()
    )
    assert not any(k.startswith("eval/mtp/") for r in evals[1:] for k in r)


def test_path_mass_shift_of_the_start_is_nothing_and_a_trained_run_moves_it(pre, tmp_path):
    """``benchmarks/path_mass_shift.py``: the RL start scored against itself (its stage folder, loaded apart) moves
    nothing, every log-ratio 0 and the same mass on its sampled paths, a probability; a DPO run trained from it
    moves its paths' log-probs; a run folder that does not exist is one clear error."""
    out = tmp_path / "dpo"
    hepo.main(tiny(pre, out, "--algo", "dpo", "--iterations", "2", "--lr", "1e-2"))
    market = tiny(pre, tmp_path / "unused")  # the same market, reward and start as the run's
    shift = path_mass_shift.main(
        [str(pre / "vaft"), str(out), "--out", str(tmp_path / "shift"), "--", *market]
    )
    start, itself, dpo = shift["start"], shift[str(pre / "vaft")], shift[str(out)]
    assert 0.0 < start["mass_on_start_paths"] <= 1.0 + 1e-6 and 0.0 < start["pairs"] <= 1.0
    for key in ("chosen_logratio", "rejected_logratio", "sampled_logratio"):
        assert start[key] == 0.0 and itself[key] == pytest.approx(0.0, abs=1e-5)
    assert itself["mass_on_start_paths"] == pytest.approx(start["mass_on_start_paths"], rel=1e-5)
    assert abs(dpo["sampled_logratio"]) > 1e-3
    assert json.loads((tmp_path / "shift.json").read_text())["shift"] == shift
    with pytest.raises(ValueError, match="missing"):
        path_mass_shift.main([str(tmp_path / "missing"), "--", *market])


def test_separate_clip_logs_both_norms_and_a_resume_keeps_its_clip(pre, tmp_path):
    """``--grad-clip separate``: the policy's and the critic's gradient norms logged every policy update, the share of
    clipped policy steps a fraction, and the clip is a setting of the run: resuming with the other one is refused."""
    out = tmp_path / "separate"
    hepo.main(tiny(pre, out, "--grad-clip", "separate", "--iterations", "2"))
    assert json.loads((out / "config.json").read_text())["args"]["grad_clip"] == "separate"
    trained = [r for r in read_metrics(out / "metrics.jsonl") if r.get("train/grad_norm_policy", 0) > 0]
    assert trained and all(
        r["train/grad_norm_critic"] > 0 and 0 <= r["train/grad_clipped"] <= 1 for r in trained
    )
    with pytest.raises(ValueError, match='--grad-clip was "separate", now "joint"'):
        hepo.main(tiny(pre, out, "--grad-clip", "joint", "--iterations", "3"))


def test_policy_file_plugs_into_evaluate(pre, tmp_path):
    out = tmp_path / "run"
    hepo.main(tiny(pre, out, "--iterations", "1", "--loss.kl-coef", "0.1"))
    assert "train/kl_ref" in read_metrics(out / "metrics.jsonl")[-1]
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"holds a run of agents.hepo, not of agents.evaluate"):
        evaluate(EvalArgs(agents="random", out=str(out), num_envs=8, sessions=8, plots=False, threads=1))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == kept  # config, summary untouched
    table = evaluate(
        EvalArgs(
            agents=f"cascade-privileged,gpr:{out},gpr:{out}/best",
            num_envs=8,
            sessions=8,
            plots=False,
            threads=1,
            out=str(tmp_path / "eval"),
        )
    )
    assert set(table["agent"]) == {"cascade-privileged", f"gpr:{out}", f"gpr:{out}/best"}  # best/ serves too
    # the Evaluator's Table 5 scalars of sessions that serve ads (the cascade's, from that evaluation), as
    # metrics.jsonl holds them: agents.evaluate's strata.csv values, adding up to the overall metrics
    sessions = pd.read_parquet(tmp_path / "eval" / "agents" / "cascade-privileged" / "sessions.parquet")
    row = json.loads(json.dumps({**summarize(sessions, prefix="eval/"), **Evaluator.strata(sessions)}))
    check_strata(row, served=True)
    strata = pd.read_csv(tmp_path / "eval" / "strata.csv", dtype={"group": str})
    for r in strata[strata["agent"] == "cascade-privileged"].to_dict("records"):
        for m in ("sessions", *keys.STRATA_METRICS[r["stratum"]]):
            want = r[f"eval/{m}"]
            assert row[keys.strata_key(r["stratum"], r["group"], m)] == pytest.approx(want, nan_ok=True), (
                r,
                m,
            )
    # CTR per tier and per ad age, weighted by the group's impressions, is the overall CTR
    imp = sessions.groupby("activity_tier")["impressions"].sum()
    tier_clicks = sum(row[keys.strata_key("activity_tier", str(t), "ctr")] * k for t, k in imp.items() if k)
    age_clicks = sum(
        row[keys.strata_key("ad_age", g, "ctr")] * sessions[f"{g}_impressions"].sum()
        for g in ("new", "old")
        if sessions[f"{g}_impressions"].sum()
    )
    assert tier_clicks == pytest.approx(sessions["clicks"].sum()) and age_clicks == pytest.approx(tier_clicks)
    assert row["eval/ctr"] == pytest.approx(tier_clicks / imp.sum()) and imp.sum() > 0


def test_best_policy_is_the_evaluation_with_the_highest_held_out_reward(pre, tmp_path):
    """``keep_best`` on hand-made evaluation rows: a strictly higher eval/reward_per_session replaces ``OUT/best``
    with the model as it is then (ties keep the earlier one, rows without an evaluation change nothing), the
    folder serves as a run folder, and a selection written after a resumed run's checkpoint is discarded."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(
        json.dumps({"tokenizer_path": str(pre / "mtp" / "tokenizer"), "seed": 0})
    )
    model, _ = load_run_model(pre / "vaft")
    weights = next(model.parameters())
    rows = [(0, 0.5), (1, None), (2, 0.4), (3, 0.7), (4, 0.7), (5, 0.6), (6, math.nan)]
    best, states = None, {}
    for it, value in rows:
        with torch.no_grad():
            weights.add_(1.0)  # a different model at every iteration
        states[it] = weights.detach().clone()
        row = {"iteration": it} if value is None else {"iteration": it, selection.SELECT_METRIC: value}
        best = selection.keep_best(out, model, row, best)
    assert {k: best[k] for k in ("iteration", "metric", "value")} == {
        "iteration": 3,
        "metric": selection.SELECT_METRIC,
        "value": 0.7,
    }
    served, _ = load_run_model(out / "best")
    assert torch.equal(next(served.parameters()), states[3])
    assert json.loads((out / "best" / "config.json").read_text())["selected"] == best
    assert selection.best_selection(out, start=5) == best
    assert selection.best_selection(out, start=2) is None  # written by iterations a resume replays
    assert selection.best_selection(tmp_path / "elsewhere", start=5) is None
    save_policy(out / "best" / "policy.pt", model)  # stopped after the policy, before its config: stale
    assert selection.best_selection(out, start=5) is None


def _best_folder(pre, tmp_path):
    """A run folder ``OUT/best`` can be written into (its tokenizer named) and the pre-trained model."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"tokenizer_path": str(pre / "mtp" / "tokenizer")}))
    model, _ = load_run_model(pre / "vaft")
    return out, model


def _sessions(rewards):
    """Held-out session records of one session per slot with these rewards."""
    n = len(rewards)
    return pd.DataFrame({"slot": range(n), "session": [0] * n, "length": [3] * n, "reward": rewards})


def test_best_sessions_travel_with_the_selection_and_later_evaluations_pair_with_them(pre, tmp_path):
    """``keep_best`` keeps the chosen evaluation's session records beside its policy, ``best_sessions`` reads
    them back only while they are the ones the selection recorded, and ``paired_margin`` is the paired t
    interval of the per-session differences (hand-computed)."""
    out, model = _best_folder(pre, tmp_path)

    first, second = _sessions([0.0, 2.0, 2.0, 5.0]), _sessions([1.0, 2.0, 3.0, 4.0])
    best = selection.keep_best(out, model, {"iteration": 0, selection.SELECT_METRIC: 2.25}, None, first)
    pd.testing.assert_frame_equal(selection.best_sessions(out, best), first)
    # per-session differences 1, 0, 1, -1: mean 0.25, t interval with 3 degrees of freedom
    margin = paired_margin(second, selection.best_sessions(out, best))
    half = 3.182446 * pd.Series([1.0, 0.0, 1.0, -1.0]).std() / 2
    key = f"{selection.SELECT_METRIC}_vs_best"
    assert margin[key] == pytest.approx(0.25)
    assert (margin[f"{key}_ci_low"], margin[f"{key}_ci_high"]) == pytest.approx((0.25 - half, 0.25 + half))
    assert paired_margin(second, None) == {}
    assert paired_margin(second, first, against="start")[
        f"{selection.SELECT_METRIC}_vs_start"
    ] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="different sessions"):
        paired_margin(second.iloc[:3], first)
    # the file rewritten by a later evaluation that stopped before its config: not this selection's sessions
    write_parquet(out / "best" / selection.BEST_SESSIONS, second)
    assert selection.best_sessions(out, best) is None
    assert selection.best_sessions(out, None) is None


def test_the_selection_pairs_with_the_best_and_the_start_and_reads_back_on_resume(pre, tmp_path):
    """``Selection``: the start's evaluation is the first best and the start; a later one is paired with both
    (hand-computed means), replaces the best when higher, and ``resumed`` reads back what a resumed run pairs
    with, nothing of an evaluation after the resumed iteration."""
    out, model = _best_folder(pre, tmp_path)

    metric = selection.SELECT_METRIC
    s0, s5, s10 = _sessions([1.0, 1.0, 1.0]), _sessions([2.0, 1.0, 3.0]), _sessions([1.0, 1.0, 2.5])
    kept = selection.Selection(out, "highest")
    assert kept.start(model, {"iteration": 0, metric: 1.0}, s0) == {keys.BEST_ITERATION: 0}
    row5 = {"iteration": 5, metric: 2.0, **kept.margins(s5)}
    assert row5[f"{metric}_vs_best"] == pytest.approx(1.0) and row5[f"{metric}_vs_start"] == pytest.approx(
        1.0
    )
    assert kept.consider(model, row5, s5) == {keys.BEST_ITERATION: 5}
    row10 = {"iteration": 10, metric: 1.5, **kept.margins(s10)}
    assert row10[f"{metric}_vs_best"] == pytest.approx(-0.5)  # against iteration 5's sessions now
    assert row10[f"{metric}_vs_start"] == pytest.approx(0.5)
    assert kept.consider(model, row10, s10) == {keys.BEST_ITERATION: 5}  # lower: kept
    back = selection.Selection.resumed(out, start=5)
    assert back.best == kept.best
    pd.testing.assert_frame_equal(back.best_records, s5)
    pd.testing.assert_frame_equal(back.start_records, s0)
    assert (
        selection.Selection.resumed(out, start=4).best is None
    )  # written by iteration 5, which a resume replays


def test_the_resolved_rule_replaces_the_best_only_on_a_resolved_margin(pre, tmp_path):
    """``--best-rule resolved``: a higher evaluation whose paired margin over the best reaches 0 keeps the best; one
    whose margin is above 0 replaces it; a row without a margin (nothing to pair with) falls back to "highest"."""
    out, model = _best_folder(pre, tmp_path)
    key = f"{selection.SELECT_METRIC}_vs_best"

    def row(it, value, low=None):
        margin = {} if low is None else {key: value - 0.5, f"{key}_ci_low": low, f"{key}_ci_high": 1.0}
        return {"iteration": it, selection.SELECT_METRIC: value, **margin}

    best = selection.keep_best(out, model, row(0, 0.5), None, rule="resolved")
    assert best["iteration"] == 0
    assert (
        selection.keep_best(out, model, row(2, 0.6, low=-0.01), best, rule="resolved") is best
    )  # not resolved
    assert selection.keep_best(out, model, row(2, 0.6, low=-0.01), best, rule="highest")["iteration"] == 2
    best = selection.keep_best(out, model, row(4, 0.7, low=0.02), best, rule="resolved")
    assert best["iteration"] == 4
    assert selection.keep_best(out, model, row(6, 0.8), best, rule="resolved")["iteration"] == 6  # no margin
    assert (
        selection.keep_best(out, model, row(8, 0.6, low=0.5), best, rule="resolved") is best
    )  # lower: never
    assert selection.best_logged(best) == {keys.BEST_ITERATION: 4} and selection.best_logged(None) == {}


def test_bad_inputs_fail_clearly(pre, tmp_path):
    with pytest.raises(ValueError, match="algo"):
        hepo.Args(algo="a2c")
    with pytest.raises(ValueError, match="best_rule='latest' is unknown"):
        hepo.Args(best_rule="latest")
    with pytest.raises(ValueError, match="group_size"):
        hepo.Args(group_size=1)
    with pytest.raises(ValueError, match="residual_stream='fp16' is invalid"):
        hepo.Args(residual_stream="fp16")
    out = tmp_path / "run"
    hepo.main(tiny(pre, out, "--iterations", "1"))
    with pytest.raises(ValueError, match=r"other settings \(--group-size was 4, now 6\)"):
        hepo.main(tiny(pre, out, "--iterations", "2", "--group-size", "6"))
    with pytest.raises(ValueError, match=r"other settings \(--loss.clip was 0.2, now 0.3\)"):
        hepo.main(tiny(pre, out, "--iterations", "2", "--loss.clip", "0.3"))
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt"):
        hepo.main(tiny(pre, out, "--iterations", "2"))
    # results without the checkpoint they came from: refused, not restarted over them
    (out / "checkpoint.pt").unlink()
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(
        ValueError, match=r"holds metrics.jsonl, policy.pt, summary.json but no checkpoint.pt"
    ):
        hepo.main(tiny(pre, out, "--iterations", "2"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == kept


def test_a_bf16_run_carries_its_residual_stream_and_restores_it(pre, tmp_path, monkeypatch):
    """``--precision bf16 --residual-stream compute`` on the CPU: wherever the run's forwards run under autocast (the
    rollout and the update; the held-out evaluation serves the policy in fp32 unless ``--eval-precision bf16``,
    and in fp32 the stream is fp32 whatever the setting) the HSD's stream enters its blocks in bf16; the run
    records the settings, its training numbers are finite, and the process's stream is the default again after it
    (a notebook's next run is not in it)."""
    from gpr_sim.model import hsd
    from gpr_sim.model.precision import ResidualStream

    seen: set[tuple[bool, torch.dtype]] = set()  # (under autocast, the stream's dtype)
    original = hsd.to_stream

    def spy(x):
        out = original(x)
        seen.add((torch.is_autocast_enabled("cpu"), out.dtype))
        return out

    monkeypatch.setattr(hsd, "to_stream", spy)
    before = ResidualStream.dtype
    out = tmp_path / "bf16_stream"
    hepo.main(tiny(pre, out, "--iterations", "1", "--precision", "bf16", "--residual-stream", "compute"))
    assert seen == {(True, torch.bfloat16), (False, torch.float32)}
    assert ResidualStream.dtype == before == "fp32"
    assert json.loads((out / "config.json").read_text())["args"]["residual_stream"] == "compute"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1]
    # the training numbers (the tiny run's evaluation serves no impressions, so its rates are NaN at any precision)
    trained = {
        k: v for k, v in rows[1].items() if k.startswith(("train/", "rollout/")) and isinstance(v, float)
    }
    assert trained and all(math.isfinite(v) for v in trained.values()), trained
    # --eval-precision bf16: the held-out evaluations (sessions, candidates, oracle_share) under autocast too
    seen.clear()
    both = tmp_path / "bf16_eval"
    hepo.main(
        tiny(
            pre,
            both,
            "--iterations",
            "1",
            "--precision",
            "bf16",
            "--residual-stream",
            "compute",
            "--eval-precision",
            "bf16",
        )
    )
    assert seen == {(True, torch.bfloat16)}
    assert json.loads((both / "config.json").read_text())["args"]["eval_precision"] == "bf16"
    assert [r["iteration"] for r in read_metrics(both / "metrics.jsonl")] == [0, 1]
    with pytest.raises(ValueError, match="precision='fp16' is invalid"):
        HeldOutConfig(precision="fp16")


def test_rl_starts_from_the_mtp_stage_when_asked(pre, tmp_path):
    """``--rl-start mtp``: the run loads the MTP stage of the same pipeline (recorded as its init), so its
    iteration-0 evaluation is the MTP model's own (Table 3's MTP row, logged beside it, reads the same)."""
    with pytest.raises(ValueError, match="rl_start='sft' is unknown"):
        hepo.Args(rl_start="sft")
    out = tmp_path / "from_mtp"
    hepo.main(tiny(pre, out, "--iterations", "1", "--rl-start", "mtp"))
    assert json.loads((out / "config.json").read_text())["init"] == str(pre / "mtp")
    first = read_metrics(out / "metrics.jsonl")[0]
    mtp_keys = [k for k in first if k.startswith("eval/mtp/")]
    assert mtp_keys
    for k in mtp_keys:
        assert first[k] == first[k.replace("eval/mtp/", "eval/", 1)], k
    vaft_run = tmp_path / "from_vaft"
    hepo.main(tiny(pre, vaft_run, "--iterations", "1"))
    assert json.loads((vaft_run / "config.json").read_text())["init"] == str(pre / "vaft")
    with pytest.raises(ValueError, match=r'other settings \(--rl-start was "mtp", now "vaft"\)'):
        hepo.main(tiny(pre, out, "--iterations", "2"))


TINY_WORLD = dict(num_ads=200, num_advertisers=20, num_organic=500, num_users=2000)
"""a world unlike the small preset's, registered as preset "tiny" by the test below"""


def test_preset_is_the_world_of_every_stage(tmp_path, monkeypatch):
    """``--preset`` reaches pre-training: the MTP stage collects its log in that world (the log's metadata names
    it), VAFT trains on that log, and both stages record it; an unknown preset fails before any stage runs."""
    monkeypatch.setitem(PRESETS, "tiny", lambda **changes: WorldConfig.small(**{**TINY_WORLD, **changes}))
    pre = tmp_path / "pre"
    with pytest.raises(ValueError, match="preset='nope' is unknown"):
        hepo.main(tiny(pre, tmp_path / "nope", "--preset", "nope"))
    assert not pre.exists() and not (tmp_path / "nope").exists()
    # --pretrain-only: the stages and nothing else; the RL run after it reuses them as they are
    done = hepo.main(tiny(pre, tmp_path / "run", "--preset", "tiny", "--pretrain-only"))
    assert done["vaft"] == str(pre / "vaft") and not (tmp_path / "run").exists()
    vaft_ckpt = (pre / "vaft" / "checkpoint.pt").stat().st_mtime_ns
    hepo.main(tiny(pre, tmp_path / "run", "--preset", "tiny", "--iterations", "1"))
    assert (pre / "vaft" / "checkpoint.pt").stat().st_mtime_ns == vaft_ckpt
    assert (tmp_path / "run" / "summary.json").is_file()
    _, meta = read_logs(pre / "mtp" / "logs.parquet")
    assert WorldConfig.from_dict(meta["world_config"]) == preset("tiny") != preset("small")
    for stage in ("mtp", "vaft"):
        assert json.loads((pre / stage / "config.json").read_text())["preset"] == "tiny"
    assert json.loads((pre / "vaft" / "config.json").read_text())["logs_path"] == str(
        pre / "mtp" / "logs.parquet"
    )


# ----------------------------------------------------------------------------- sampling and rehearsal


def _env(n=16):
    return gymnasium.make_vec(
        "ads-v0",
        num_envs=n,
        vectorization_mode="vector_entry_point",
        preset="small",
        device="cpu",
        validate_actions=False,
    )


def test_sampled_paths_are_legal_eligible_and_their_log_probs_match_the_model(pre):
    model, tok = load_run_model(pre / "vaft")
    model.eval()
    env = _env()
    obs, _ = env.reset(seed=0)
    eligible = torch.zeros(tok.num_ads, dtype=torch.bool)
    eligible[::3] = True  # a third of the ads have budget
    features = PlatformFeatures.from_world(env.unwrapped.world) if model.cfg.platform_features else None
    market = env.unwrapped.market_features() if model.cfg.market_features else None
    schema = SchemaConfig.from_world(env.unwrapped.config)
    tokens = tokens_from_obs(obs, tok.table, schema, features=features, market=market)
    with torch.no_grad():
        ctx = model.context(tokens)
        step_fn, _ = model.beam_fns(ctx)
        s = sample_paths(step_fn, tok.trie, 16, 8, eligible, torch.Generator().manual_seed(0))
        assert bool(s.valid.all())
        assert bool((s.items >= 0).all()) and bool(eligible[s.items].all())
        torch.testing.assert_close(tok.paths_of_ads(s.items), s.codes)  # the item is the path's leaf
        k = s.codes.shape[1]
        again = model.log_prob(
            ctx.repeat_interleave(k, 0), s.codes.flatten(0, 1), [m.flatten(0, 1) for m in s.legal]
        )
    # the update recomputes exactly the rollout's log-probs (PPO ratio 1 before any step)
    torch.testing.assert_close(again.view_as(s.log_prob), s.log_prob, atol=1e-5, rtol=1e-5)


def test_sampling_follows_the_policy_distribution():
    """A fixed two-level policy: empirical path frequencies match its legal-renormalised probabilities."""
    from gpr_sim.tokenizer.trie import PrefixTrie

    paths = torch.tensor([[0, 0], [0, 1], [1, 0], [2, 1]])  # 4 items, 3 x 2 codes
    trie = PrefixTrie(paths, (3, 2))
    logits = {0: torch.tensor([0.0, 1.0, -1.0]), 1: torch.tensor([0.5, -0.5])}

    def step_fn(row, prefix):
        return logits[prefix.shape[1]].expand(row.shape[0], -1)

    n = 20000
    p0 = torch.softmax(logits[0].double(), 0)
    p1 = torch.softmax(logits[1].double(), 0)
    expected = torch.stack([p0[0] * p1[0], p0[0] * p1[1], p0[1], p0[2]])  # codes 1 and 2 have one child
    keyed = rng.uniforms(torch.tensor([7]), n * 2).view(1, n, 2)  # inverse-CDF draws from keyed numbers
    for s in (
        sample_paths(step_fn, trie, 1, n, generator=torch.Generator().manual_seed(0)),
        sample_paths(step_fn, trie, 1, n, uniforms=keyed),
    ):
        freq = torch.bincount(s.items[0], minlength=4).double() / n
        assert torch.allclose(freq, expected, atol=4 * math.sqrt(0.25 / n))


def test_keyed_sampling_does_not_depend_on_the_batch():
    """With per-row numbers, rows sampled together or in two shards get the same paths (data parallel)."""
    from gpr_sim.tokenizer.trie import PrefixTrie

    paths = torch.tensor([[a, b] for a in range(4) for b in range(3)])
    trie = PrefixTrie(paths, (4, 3))
    table = torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(0))  # per row and level

    def step_fn(row, prefix):
        return table[row, prefix.shape[1], : trie.level_sizes[prefix.shape[1]]]

    keys = torch.arange(6) * 977
    u = rng.uniforms(keys, 5 * 2).view(6, 5, 2)
    whole = sample_paths(step_fn, trie, 6, 5, uniforms=u)
    halves = [
        sample_paths(lambda r, p, o=o: step_fn(r + o, p), trie, 3, 5, uniforms=u[o : o + 3]) for o in (0, 3)
    ]
    assert torch.equal(whole.codes, torch.cat([h.codes for h in halves]))
    torch.testing.assert_close(whole.log_prob, torch.cat([h.log_prob for h in halves]))


def test_rehearsal_moves_nothing_and_favours_active_users(pre):
    _, tok = load_run_model(pre / "vaft")
    env = _env(256)
    roller = Roller(env, tok, group_size=2, estimator="truth", arr_rate=1.0, seed=0)
    engine = env.unwrapped
    before = engine.state_dict()
    rows = torch.arange(256)
    ahead, obs = engine.rehearse(rows, REHEARSAL_SEED_OFFSET)
    after = engine.state_dict()
    for key in ("session", "market"):
        for t, u in zip(before[key], after[key]):
            assert torch.equal(t, u)  # the real sessions and budgets did not move
    assert torch.equal(obs["user_id"], engine.state.user_id)  # U kept
    assert bool((ahead.step == engine.state.step + 1).all())  # E refreshed one request ahead
    assert not torch.equal(obs["organic"], roller.obs["organic"])  # O rebuilt from new consumption
    # rehearsal probability is arr_rate * tier / 5: count over several collections
    model, _ = load_run_model(pre / "vaft")
    buf, stats = roller.collect(model.eval(), 3)
    assert stats["rollout/rehearsed"] > 0
    tier = engine.world.user_activity
    user = buf.tokens.token_ids[:, 0]
    share = buf.rehearsed.float()
    lo = share[tier[user] <= 2].mean() if bool((tier[user] <= 2).any()) else torch.tensor(0.0)
    hi = share[tier[user] >= 4].mean()
    assert float(hi) > float(lo)


def _set_market(env, market: MarketState) -> None:
    """Replace the advertisers' market state of a vector env through its state dict."""
    state = env.state_dict()
    state["market"] = tuple(market)
    env.load_state_dict(state)


def test_budget_share_is_remaining_over_demand_of_the_served_ads(pre):
    _, tok = load_run_model(pre / "vaft")
    env = _env(64)
    roller = Roller(env, tok, group_size=2, estimator="truth", arr_rate=0.0, seed=0)
    e = env.unwrapped
    world = e.world
    hot = int(world.ad_advertiser[0])
    items = torch.zeros(64, 2, dtype=torch.int64)  # every session is served ad 0 ...
    items[32:, 0] = torch.arange(1, 33)  # ... except half, served 32 other ads
    scores = e.score(items, truth=True)
    market = MarketState(*e.state_dict()["market"])
    spent = market.budget * 0.5  # mid-day (tick 1, not a day boundary): half of every budget spent ...
    spent[hot] = market.budget[hot] - 0.1  # ... and the hot advertiser has 0.1 left
    _set_market(e, market._replace(tick=market.tick + 1, spent_today=spent))
    share = roller._budget_share(items, scores)
    remaining = e.remaining_budget()
    charge = scores.expected_revenue[:, 0].double()
    demand = torch.zeros_like(remaining).index_add_(0, world.ad_advertiser[items[:, 0]], charge)
    assert float(demand[hot]) > float(remaining[hot])  # the test only means something if the budget binds
    want = torch.where(
        demand > 0, (remaining / demand.clamp_min(1e-12)).clamp(max=1.0), torch.ones_like(demand)
    )
    torch.testing.assert_close(share, want.float())
    assert float(share[hot]) < 1.0  # precondition of what follows: the hot advertiser's budget binds
    # the rewards of a collection are the budget-blind ones times the share of each candidate's advertiser
    model, _ = load_run_model(pre / "vaft")
    bufs = {}

    def late_in_the_day(r: Roller) -> Roller:  # every advertiser has 0.05 left (the unpaced ones may bid)
        m = MarketState(*r.market.state_dict()["market"])
        _set_market(r.market, m._replace(tick=m.tick + 1, spent_today=m.budget - 0.05))
        return r

    for aware in (True, False):
        r = late_in_the_day(
            Roller(_env(64), tok, group_size=4, estimator="truth", arr_rate=0.0, seed=3, budget_aware=aware)
        )
        r.reward_scale = 1.0
        bufs[aware], _ = r.collect(model.eval(), 1)
    aware, blind = bufs[True], bufs[False]
    assert torch.equal(aware.codes, blind.codes)  # same draws: only the reward differs
    fresh = late_in_the_day(
        Roller(_env(64), tok, group_size=4, estimator="truth", arr_rate=0.0, seed=3)
    )  # before the step
    sampled = tok.ads_of(aware.codes)
    share = fresh._budget_share(sampled, fresh.market.score(sampled, truth=True))
    torch.testing.assert_close(aware.reward, blind.reward * share[world.ad_advertiser[sampled]])
    assert bool((aware.reward <= blind.reward + 1e-6).all()) and bool((aware.reward < blind.reward).any())


def _top1(out):
    return [
        r["eval/cand_top1_value"] for r in read_metrics(out / "metrics.jsonl") if "eval/cand_top1_value" in r
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hepo_raises_the_value_of_what_it_serves_over_the_vaft_start(pre_content_only, tmp_path, seed):
    """The RL objective on held-out requests: the true value of the top-1 generated ad (normalised by the
    best eligible ad) rises above the VAFT generator's. (Session-level online reward is reported, not
    asserted: see the issue note and README on why it falls in this market.) The 0.1 gain was set for the
    content-only token layout, so the test runs there: with the platform features the VAFT start is already
    higher (top-1 value 0.136 against 0.055) and RL ends higher (0.215-0.220 against 0.158-0.180) but gains
    about 0.08, less head-room, not less learning."""
    out = tmp_path / f"s{seed}"
    hepo.main(
        tiny(
            pre_content_only,
            out,
            "--seed",
            str(seed),
            "--num-envs",
            "32",
            "--group-size",
            "16",
            "--minibatch",
            "32",
            "--iterations",
            "8",
            "--eval-every",
            "8",
            "--eval-sessions",
            "32",
            "--eval-envs",
            "32",
            "--eval-candidates",
            "16",
            "--eval-beam",
            "4",
            "--lr",
            "1e-3",
            "--checkpoint-every",
            "8",
        )
    )
    start, end = _top1(out)
    # a learning claim, not a measured value: the served ad's true value, as a share of the best eligible ad's,
    # rises by at least a tenth of the oracle's value in 8 iterations (on each of the 3 seeds)
    assert end > start + 0.1


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_hepo_default_model_improves_served_value(tmp_path, seed):
    """Default-size generator and config, 10 iterations (minutes on a CPU). The top-1 value metric is the truth's
    and ignores budgets and popularity, so the learner is run on that objective: ``--reward truth`` (the default
    learned pCTR/pCVR, CTR AUC ~0.61, is a noisier proxy of it: seed 1 gained +0.044 under it, 2026-12-03),
    ``--no-budget-aware`` (the budget-aware
    reward trades per-request value for budget headroom, agents.rl.rollout doc) and no process reward (the
    popularity process reward pulls towards popular prefixes: with the default share 0.1, seed 1 gained +0.041
    top-1 value and +0.08 online reward per session, with share 0 +0.112 and +0.02, 2026-12-02)."""
    out = tmp_path / "run"
    hepo.main(
        [
            "--seed",
            str(seed),
            "--iterations",
            "10",
            "--eval-every",
            "10",
            "--threads",
            "1",
            "--no-progress",
            "--no-budget-aware",
            "--reward",
            "truth",
            "--loss.process-scale",
            "0",
            "--pretrain-dir",
            str(tmp_path / "pre"),
            "--out",
            str(out),
        ]
    )
    start, end = _top1(out)
    # a learning claim: at least 5% of the oracle's value gained in 10 iterations of the default model
    assert end > start + 0.05


# ----------------------------------------------------------------------------- data-parallel (torchrun, gloo)


def _numeric(rows: list[dict]) -> list[dict]:
    """What must match across process counts: every logged number except wall-clock timings."""
    return [
        {k: v for k, v in r.items() if not k.startswith("perf/") and isinstance(v, (int, float))}
        for r in rows
    ]


@pytest.mark.parametrize(
    "clip", [[], ["--grad-clip", "separate", "--max-grad-norm", "0.3"]], ids=["joint", "separate"]
)
def test_two_gloo_processes_match_one_process_and_resume(pre, tmp_path, clip):
    """2 ranks x 8 sessions (exact shards of one market) == 1 process x 16 sessions, same seed: rollouts,
    rewards, losses, evaluations and weights; then both resume to iteration 3 alike. With the policy and the critic
    clipped apart too (a limit the steps reach): each rank splits the same all-reduced gradients."""
    extra = [*clip, "--num-envs", "16", "--minibatch", "8", "--group-size", "4", "--eval-every", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    hepo.main(tiny(pre, one, "--iterations", "2", *extra))
    torchrun("agents.hepo", tiny(pre, two, "--iterations", "2", *extra))
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["world_size"] == 2

    def check():
        a, b = _numeric(read_metrics(one / "metrics.jsonl")), _numeric(read_metrics(two / "metrics.jsonl"))
        assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys()
            for key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5, nan_ok=True), (
                    ra["iteration"],
                    key,
                )
        wa = torch.load(one / "policy.pt", weights_only=True)["model"]
        wb = torch.load(two / "policy.pt", weights_only=True)["model"]
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)

    check()
    if clip:  # the separate clips did scale policy steps
        assert any(r.get("train/grad_clipped", 0) > 0 for r in read_metrics(one / "metrics.jsonl"))
    hepo.main(tiny(pre, one, "--iterations", "3", *extra))
    torchrun("agents.hepo", tiny(pre, two, "--iterations", "3", *extra))
    check()
    with pytest.raises(ValueError, match="resume with the same number of processes"):
        hepo.main(tiny(pre, two, "--iterations", "4", *extra))


@pytest.mark.parametrize("metric", rl_config.PLATEAU_METRICS)
def test_plateau_stops_the_run_and_a_rerun_keeps_its_summary(pre, tmp_path, metric, capsys):
    out = tmp_path / "flat"
    args = tiny(pre, out, "--iterations", "4", "--plateau-patience", "1", "--plateau-delta", "1e9")
    summary = hepo.main([*args, "--plateau-metric", metric])
    # evaluations at iterations 0 and 1: the second gains at most 1e9 over the first, so the run stops at 1
    assert summary["plateau_at"] == 1 and summary["iterations_run"] == 1
    assert [r["iteration"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]
    assert f"eval/{metric} gained <= 1000000000.0 in the last 1 evaluations" in capsys.readouterr().out
    assert hepo.main(args) == summary  # flattened: nothing more to train, the summary stays
    with pytest.raises(ValueError, match="plateau_metric='ctr' is unknown"):
        hepo.Args(plateau_metric="ctr")


@pytest.mark.parametrize(
    ("shares", "patience", "delta", "expected"),
    [
        ([0.4, 0.5], 0, 0.0, False),  # patience 0: never
        ([0.4], 1, 0.0, False),  # nothing before the window
        ([0.4, 0.41], 1, 0.005, False),  # +0.01 > 0.005: still progress
        ([0.4, 0.404], 1, 0.005, True),
        ([0.4, 0.5, 0.49, 0.503], 2, 0.005, True),  # best in window 0.503 <= 0.5 + 0.005
        ([0.4, 0.5, 0.49, 0.51], 2, 0.005, False),
    ],
)
def test_plateaued_by_hand(shares, patience, delta, expected):
    assert selection.plateaued(shares, patience, delta) is expected


def test_gpu_profile_sets_the_large_pipeline_and_flags_override_it():
    args = parse_args(
        hepo.Args, ["--profile", "gpu-large", "--device", "cpu", "--seed", "3"], profiles=rl_config.PROFILES
    )
    assert (args.profile, args.device, args.seed, args.preset, args.num_envs) == (
        "gpu-large",
        "cpu",
        3,
        "large",
        16384,
    )
    mtp, vaft = rl_config.pretraining(args)
    assert mtp.preset == vaft.preset == "large"
    assert (mtp.codebook_size, mtp.d_model, mtp.n_layers) == (256, 256, 4)
    assert mtp.collect_envs * mtp.collect_steps >= 1 << 20  # >= 1M logged requests for MTP
    assert (
        parse_args(hepo.Args, [], profiles=rl_config.PROFILES) == hepo.Args()
    )  # cpu: the class's own defaults
    with pytest.raises(UsageError, match="unknown profile 'gpu'"):
        parse_args(hepo.Args, ["--profile", "gpu"], profiles=rl_config.PROFILES)
    assert args.compile == "regions" and hepo.Args().compile == "off"
    # the RL in bf16, the pre-training in fp32 (bf16 cost the MTP stage HitRate on the H200), unless asked
    assert (args.precision, mtp.precision, vaft.precision) == ("bf16", "fp32", "fp32")
    bf16 = parse_args(hepo.Args, ["--pretrain-precision", "bf16"], profiles=rl_config.PROFILES)
    assert {stage.precision for stage in rl_config.pretraining(bf16)} == {"bf16"}
    with pytest.raises(ValueError, match="precision='fp16' is invalid"):
        hepo.Args(pretrain_precision="fp16")
    assert mtp.market_features and vaft.market_features  # the default of new runs
    off = parse_args(hepo.Args, ["--no-market-features"], profiles=rl_config.PROFILES)
    assert not any(stage.market_features for stage in rl_config.pretraining(off))
    with pytest.raises(ValueError, match="compile='fast' is unknown"):
        hepo.Args(compile="fast")
    with pytest.raises(ValueError, match="reward_outcome='drawn' is unknown"):
        hepo.Args(reward_outcome="drawn")


def test_the_evaluation_line_names_the_iterations_speed():
    """Logs written with --no-progress (the GPU runs) still show what an iteration cost."""
    row = {
        "iteration": 3,
        "eval/oracle_share": 0.5,
        "rollout/group_value_mean": 0.25,
        "perf/requests_per_s": 5214.4,
        "perf/rollout_s": 0.734,
        "perf/update_s": 2.384,
    }
    line = trainer.log_line(row)
    assert line.startswith("it 3  oracle_share 0.500")
    assert line.endswith("5,214 req/s (rollout 0.7 s, update 2.4 s)")
    timed = trainer.log_line({**row, "perf/eval_s": 41.26})  # what the held-out evaluation cost, when it ran
    assert timed.endswith("5,214 req/s (rollout 0.7 s, update 2.4 s, evaluation 41.3 s)")
    assert "req/s" not in trainer.log_line(
        {"iteration": 0, "eval/oracle_share": 0.5}
    )  # the start: no iteration ran
    start = trainer.log_line(
        {"iteration": 0, "eval/oracle_share": 0.5, "perf/setup_s": 31.04, "perf/eval_s": 12.96}
    )
    assert start.endswith("(set-up 31.0 s, evaluation 13.0 s)") and "req/s" not in start
    # on CUDA the phases' peak memory (PhasePeaks): the line names the largest, what decides the card's share
    peaks = {"perf/rollout_peak_gib": 23.51, "perf/update_peak_gib": 17.26, "perf/eval_peak_gib": 9.0}
    assert trainer.log_line({**row, **peaks}).endswith("update 2.4 s)  peak 23.5 GiB")
    assert trainer.PhasePeaks("cpu").take("rollout") == {}  # the process's RSS would mix the phases: nothing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA allocator's peaks")
def test_phase_peaks_read_each_phase_apart():
    dev = torch.device("cuda")
    peaks = trainer.PhasePeaks(dev)  # whatever else the process holds stays allocated through both phases
    big = torch.empty(64 << 20, dtype=torch.uint8, device=dev)  # 64 MiB live in the first phase only
    del big
    first = peaks.take("rollout")["perf/rollout_peak_gib"]
    second = peaks.take("update")["perf/update_peak_gib"]  # reset: the freed block is not this phase's
    assert first - second == pytest.approx(64 / 1024, abs=1e-3)
