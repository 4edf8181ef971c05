"""One RL run of the GPR generator (``train``): the pre-training it starts from, the run folder, then per iteration
rollout -> the algorithm's targets -> update -> held-out evaluation -> ``OUT/best`` -> checkpoint, until
``--iterations``, a plateau or a SIGTERM. ``python -m agents.hepo`` is its command line (its doc describes the run
folder); ``agents.sweep`` runs it in process for every cell of a grid."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from agents.evaluation.heldout import Evaluator, mtp_candidates
from agents.policies.gpr import load_run_model, save_policy
from agents.pretraining.pipeline import ensure_behaviour, ensure_funnel, ensure_pretrained
from agents.reporting.figures import plot_curves, plot_gradients, plot_reward_model
from agents.reporting.keys import margin_key
from agents.rl import distributed
from agents.rl.checkpoint import read_checkpoint, save_checkpoint
from agents.rl.config import ENTRY, RESUME_IGNORES, RLConfig, held_out, pretraining, record_defaults
from agents.rl.distributed import SINGLE, Dist
from agents.rl.loop import PathTerms, UpdateConfig, update
from agents.rl.registry import algorithm
from agents.rl.rollout import Roller
from agents.rl.selection import SELECT_METRIC, Selection, plateaued
from envs import make_vec_env
from gpr_sim.model.precision import residual_stream
from gpr_sim.platform.funnel import load_funnel
from gpr_sim.runs import (
    RunFolder,
    append_metrics,
    file_digest,
    read_json,
    read_metrics,
    run_name,
    write_json,
    write_metrics,
)

STOP_EXIT = 128 + signal.SIGTERM
"""exit status of a run stopped by SIGTERM (``StopRequest``): 143, the shell's code for a SIGTERM death"""


def _comparable(args: RLConfig) -> dict:
    d = json.loads(json.dumps(dataclasses.asdict(args)))
    return {k: v for k, v in d.items() if k not in RESUME_IGNORES}


def run_dir(args: RLConfig) -> Path:
    """``--out``, else the newest unfinished run of this env/algo/seed, else a new timestamped folder."""
    if args.out:
        return Path(args.out)
    root = Path("runs/hepo")
    prefix = run_name(args.env, args.algo, args.seed) + "__"
    unfinished = sorted(
        (
            p
            for p in root.glob(prefix + "*")
            if (p / "checkpoint.pt").is_file() and not (p / "summary.json").is_file()
        ),
        key=lambda p: p.name,
    )
    if unfinished:
        return unfinished[-1]
    return root / run_name(args.env, args.algo, args.seed, stamp=True)


def open_run_folder(out: Path, args: RLConfig) -> RunFolder:
    """Lock ``out`` for this run; refuse it (``ValueError`` naming the folder and why) unless it is new or holds
    an ``agents.hepo`` run with these settings (bar ``RESUME_IGNORES``) that can be resumed: a folder with
    metrics or a policy but no ``checkpoint.pt`` is not restarted over its results."""
    folder = RunFolder(out, ENTRY, dataclasses.asdict(args), RESUME_IGNORES, defaults=record_defaults())
    left = [name for name in ("metrics.jsonl", "policy.pt", "summary.json") if (out / name).is_file()]
    if left and not (out / "checkpoint.pt").is_file():
        folder.close()
        raise ValueError(
            f"{out} holds {', '.join(left)} but no checkpoint.pt to resume from (the run stopped "
            "before its first checkpoint, or the checkpoint was removed): pass another --out"
        )
    return folder


class StopRequest:
    """``with StopRequest() as request:`` turns SIGTERM into ``request.requested = True`` inside the block, so
    the RL loop can stop where its files are consistent (the end of an iteration) instead of dying mid-iteration.

    The previous handler is back when the block ends. Outside the main thread, where ``signal.signal`` cannot
    install a handler, nothing is installed (``requested`` stays False). SIGINT is left alone: Ctrl-C still
    interrupts at once (``KeyboardInterrupt``), replaying the iterations since the last checkpoint on resume.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._installed = False

    def _handle(self, signum: int, frame) -> None:
        self.requested = True  # only the flag: a handler runs between two bytecodes of any code

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            # None: the previous handler was not set from Python; the default is the closest one Python can set
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False


def auction_record(args: RLConfig, funnel: Path | None) -> dict:
    """Which auction the run's markets rank on, as ``config.json`` and ``summary.json`` record it:
    ``{"estimator": "privileged"}``, or ``"learned"`` with the ``funnel`` file and its SHA-256 (runs of
    different auctions are never compared: ``agents.reporting.folders.run_auction``)."""
    if not args.auction:
        return {"estimator": "privileged"}
    return {"estimator": "learned", "funnel": str(funnel), "sha256": file_digest(funnel)}


def check_resumed_auction(config: dict, record: dict, out: Path) -> None:
    """Refuse to resume the run of ``config`` (its ``config.json``) in a market whose auction ranks on another
    funnel than the one it started on (the pipeline's funnel was refitted since)."""
    was = config.get("auction", {"estimator": "privileged"})
    if was.get("sha256") != record.get("sha256"):
        raise ValueError(
            f"{out}: started with the auction on funnel {was.get('sha256', 'none')[:12]}, now "
            f"{record.get('sha256', 'none')[:12]} ({record.get('funnel', 'privileged')}): pass another --out"
        )


def make_train_env(args: RLConfig, dist: Dist = SINGLE):
    """The training sessions; data-parallel, this rank's exact shard of one market (``distributed.shard_options``)."""
    shard = distributed.shard_options(args.num_envs, dist)  # --num-envs is the global number of sessions
    return make_vec_env(
        args.env,
        args.num_envs // dist.world_size,
        preset=args.preset,
        device=args.device,
        validate_actions=False,
        **shard,
    )


PHASES = ("rollout", "update", "eval")
"""the phases of an iteration whose peak memory ``PhasePeaks`` logs"""


class PhasePeaks:
    """The CUDA caching allocator's peak allocated GiB of each phase of an iteration, read and reset at the phase's
    end (host-side counters: no device sync), as ``perf/{phase}_peak_gib``; nothing off CUDA, where the process's
    peak RSS would not tell the phases apart. What decides how many learners share a card (RESULTS "Passes within a
    minibatch": the benchmark's 23.5 GiB was not the update's)."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.on = self.device.type == "cuda"
        if self.on:
            torch.cuda.reset_peak_memory_stats(self.device)

    def take(self, phase: str) -> dict[str, float]:
        if not self.on:
            return {}
        gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return {f"perf/{phase}_peak_gib": gib}


def log_line(row: dict) -> str:
    parts = [f"it {row['iteration']}"]
    if "eval/oracle_share" in row:
        parts.append(f"oracle_share {row['eval/oracle_share']:.3f}")
    if "eval/reward_per_session" in row:
        parts.append(f"eval reward/session {row['eval/reward_per_session']:.3f}")
        margin = margin_key("best")  # paired with the best evaluation before this one
        if margin in row:
            parts.append(
                f"(vs best {row[margin]:+.3f} [{row[f'{margin}_ci_low']:+.3f}, {row[f'{margin}_ci_high']:+.3f}])"
            )
        parts.append(f"gmv/session {row['eval/gmv_per_session']:.3f}")
        parts.append(f"cand value {row['eval/cand_mean_value']:.3f}")
    if "rollout/group_value_mean" in row:
        parts.append(f"group value {row['rollout/group_value_mean']:.4f}")
    if "rollout/truth/group_value_mean" in row:  # the same ads valued by the simulator's truth (privileged)
        parts.append(
            f"(truth {row['rollout/truth/group_value_mean']:.4f}, corr {row['rollout/truth/reward_corr']:.2f})"
        )
    if "perf/requests_per_s" in row:  # the iteration's speed, for logs written without the progress bar
        parts.append(
            f"{row['perf/requests_per_s']:,.0f} req/s (rollout {row['perf/rollout_s']:.1f} s, "
            f"update {row['perf/update_s']:.1f} s"
            + (f", evaluation {row['perf/eval_s']:.1f} s)" if "perf/eval_s" in row else ")")
        )
    elif "perf/setup_s" in row:  # the start: the markets and models set up, then its evaluation
        parts.append(f"(set-up {row['perf/setup_s']:.1f} s, evaluation {row['perf/eval_s']:.1f} s)")
    peaks = [row[f"perf/{phase}_peak_gib"] for phase in PHASES if f"perf/{phase}_peak_gib" in row]
    if peaks:  # CUDA only (PhasePeaks)
        parts.append(f"peak {max(peaks):.1f} GiB")
    return "  ".join(parts)


def make_roller(args: RLConfig, tok, funnel: Path | None = None, dist: Dist = SINGLE) -> Roller:
    """The run's training market (``make_train_env``), its platform (and with ``--auction`` its auction) on the learned
    ``funnel`` when given, and the ``Roller`` that collects its rollouts with tokenizer ``tok``: what the RL samples
    from, and what a diagnostic replays (``benchmarks/path_mass_shift.py``)."""
    env = make_train_env(args, dist)
    if funnel is not None:
        market = env.unwrapped
        learned = load_funnel(funnel, args.device, catalog=market.catalog)
        market.attach_platform(learned)
        if args.auction:  # the same object: the market evaluates it once per score (envs.market.score)
            market.attach_auction(learned)
    return Roller(
        env,
        tok,
        args.group_size,
        args.reward,
        args.arr_rate if args.arr else 0.0,
        args.seed,
        budget_aware=args.budget_aware,
        dist=dist,
        precision=args.precision,
        outcome=args.reward_outcome,
    )


def pretrained(args: RLConfig, dist: Dist = SINGLE) -> tuple[Path, Path | None]:
    """Run (or reuse) the pre-training stages; returns only the VAFT folder and the learned funnel file (when
    ``--reward learned``), so nothing the stages built outlives them."""
    mtp, vaft_stage = pretraining(args)
    ensure_behaviour(mtp, args.funnel_envs, args.funnel_steps, dist)
    vaft = ensure_pretrained(mtp, vaft_stage, dist)
    funnel = (
        ensure_funnel(mtp, args.funnel_envs, args.funnel_steps, dist) if args.reward == "learned" else None
    )
    # What the stages held (logs, models, optimisers, reference cycles among them) is garbage now, but CUDA
    # blocks stay reserved by torch's caching allocator until released: the process that pre-trained the
    # gpu-large stages kept 66 GB of an H200 during RL, the room of another RL process beside it.
    gc.collect()
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    return vaft, funnel


def train(args: RLConfig, dist: Dist = SINGLE) -> dict:
    """Run (or resume) the RL run ``args`` describes, its pre-training stages first (each reused when present);
    returns the summary (also ``OUT/summary.json``), or with ``--pretrain-only`` where the stages are.

    On every rank of a data-parallel run (``distributed.launch``): rank r simulates its shard of the
    ``--num-envs`` sessions in an exact shard of the one market, gradients are averaged by
    ``DistributedDataParallel``, statistics are reduced over ranks, and rank 0 evaluates and writes the run folder;
    every rank returns the summary. A SIGTERM ends the run at its iteration's end (``SystemExit(STOP_EXIT)``).
    """
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    vaft, funnel = pretrained(args, dist)
    if args.pretrain_only:
        summary = {
            "pretrain_dir": str(vaft.parent),
            "vaft": str(vaft),
            "funnel": None if funnel is None else str(funnel),
        }
        if dist.is_main:
            print(f"{vaft.parent}: pre-trained (--pretrain-only): no RL run")
        return summary
    out = Path(
        distributed.broadcast_object(str(run_dir(args)), dist)
    )  # a new folder is named by rank 0's clock
    # the start: a stage's folder in the pipeline
    start_dir = vaft if args.rl_start == "vaft" else vaft.parent / "mtp"
    # the run's forwards under autocast (rollout, update; the held-out evaluation with --eval-precision bf16) carry
    # its residual stream; the process's stream is restored after it
    with (
        distributed.main_rank_folder(lambda: open_run_folder(out, args), dist),
        residual_stream(args.residual_stream),
    ):
        return _run(args, dist, out, start_dir, funnel)


def _kept_summary(args: RLConfig, out: Path) -> dict | None:
    """The summary of the run in ``out`` when it has nothing left to train (it reached ``--iterations`` or stopped
    on a plateau): kept as it is; None otherwise."""
    summary_path, ckpt = out / "summary.json", out / "checkpoint.pt"
    if not (summary_path.is_file() and ckpt.is_file()):
        return None
    finished = int(read_checkpoint(ckpt)["iteration"])
    summary = read_json(summary_path)
    if finished < args.iterations and summary.get("plateau_at") != finished:
        return None
    why = (
        f"its {args.plateau_metric} curve flattened"
        if finished < args.iterations
        else f">= --iterations {args.iterations}"
    )
    print(f"{out}: finished at iteration {finished} ({why}); its summary is kept")
    return summary


def _write_summary(args: RLConfig, out: Path, summary: dict, best: dict | None) -> None:
    """Rank 0 at a run's end: its figures, ``summary.json`` (``summary`` plus the first, last and kept evaluations
    from ``metrics.jsonl``) and the lines that say what RL did."""
    rows = read_metrics(out / "metrics.jsonl")
    evals = [r for r in rows if "eval/reward_per_session" in r]
    plot_curves([out], out / "curves.png")
    plot_reward_model([out], out / "reward_model.png")
    plot_gradients([out], out / "gradients.png")
    summary = {
        "algo": args.algo,
        "seed": args.seed,
        "iterations": args.iterations,
        "iterations_run": int(rows[-1]["iteration"]) if rows else 0,
        **summary,
        "initial": evals[0],
        "final": evals[-1],
        "best": next((r for r in evals if best and r["iteration"] == best["iteration"]), None),
    }
    write_json(out / "summary.json", summary)
    first, last = evals[0], evals[-1]
    if "eval/oracle_share" in first and "eval/oracle_share" in last:  # (a run resumed from older logs)
        print(
            f"{out}: oracle_share {first['eval/oracle_share']:.3f} "
            f"[{first['eval/oracle_share_ci_low']:.3f}, {first['eval/oracle_share_ci_high']:.3f}] -> "
            f"{last['eval/oracle_share']:.3f} "
            f"[{last['eval/oracle_share_ci_low']:.3f}, {last['eval/oracle_share_ci_high']:.3f}] "
            f"(fatigue-aware oracle {last['eval/oracle_fatigue_share']:.3f})"
        )
    print(
        f"{out}: eval reward/session {first['eval/reward_per_session']:.3f} -> "
        f"{last['eval/reward_per_session']:.3f}, GMV/session {first['eval/gmv_per_session']:.3f} -> "
        f"{last['eval/gmv_per_session']:.3f}"
    )
    if summary["best"]:
        chosen = summary["best"]
        print(
            f"{out}/best: iteration {chosen['iteration']} (eval reward/session {chosen[SELECT_METRIC]:.3f}, "
            f"--best-rule {args.best_rule}), oracle_share {chosen.get('eval/oracle_share', float('nan')):.3f}"
        )


def _run(args: RLConfig, dist: Dist, out: Path, start_dir: Path, funnel: Path | None = None) -> dict:
    """The RL run in the opened folder ``out`` from the pre-trained generator in ``start_dir`` (``train``: the VAFT
    stage, or the MTP one with ``--rl-start mtp``), rewarded through the learned pCTR / pCVR ``funnel`` when given
    (``--reward learned``)."""
    summary_path = out / "summary.json"
    kept = _kept_summary(args, out)
    if kept is not None:
        return kept
    # perf/setup_s of the start's row: the model, the training market, the held-out one and its oracle states
    t_setup = time.perf_counter()
    model, tok = load_run_model(start_dir)
    tok_path = json.loads((start_dir / "config.json").read_text())["tokenizer_path"]
    model = model.to(args.device).train()
    algo = algorithm(args.algo)
    needs_ref = algo.reference or args.loss.kl_coef > 0
    ref = copy.deepcopy(model).eval().requires_grad_(False) if needs_ref else None
    # fused on CUDA: one kernel for every parameter (the multi-tensor path took 3.8% of an update's device time)
    fused = torch.device(args.device).type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=fused)
    schedule = UpdateConfig(
        args.epochs, args.minibatch, args.max_grad_norm, args.seed, args.precision, clip=args.grad_clip
    )
    auction = auction_record(args, funnel)
    roller = make_roller(args, tok, funnel, dist)
    evaluate = Evaluator(held_out(args, funnel), tok) if dist.is_main else None
    metrics_path, ckpt = out / "metrics.jsonl", out / "checkpoint.pt"
    start, env_steps = 0, 0
    kept = Selection(out, args.best_rule)  # OUT/best, and the records evaluations are paired with (rank 0)
    resume = ckpt.is_file()
    distributed.barrier(dist)  # every rank has looked for the checkpoint before rank 0 writes anything
    if resume:
        config = out / "config.json"
        check_resumed_auction(read_json(config) if config.is_file() else {}, auction, out)
        state = read_checkpoint(ckpt)
        rollers = state["rollers"]
        if len(rollers) != dist.world_size:
            raise ValueError(
                f"{ckpt}: written by {len(rollers)} process(es), resumed with {dist.world_size}: "
                "resume with the same number of processes"
            )
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{ckpt}: does not fit this run's model ({e})") from e
        roller.load_state_dict(rollers[dist.rank])
        start, env_steps = int(state["iteration"]), int(state["env_steps"])
        if dist.is_main:
            rows = [r for r in read_metrics(metrics_path) if r["iteration"] <= start]
            write_metrics(metrics_path, rows)
            kept = Selection.resumed(out, start, args.best_rule)
            print(f"{out}: resuming at iteration {start}")
    elif dist.is_main:
        write_json(
            out / "config.json",
            {
                "args": _comparable(args),
                "algo": args.algo,
                "label": args.label or args.algo,
                "seed": args.seed,
                "env": args.env,
                "init": str(start_dir),
                "tokenizer_path": tok_path,
                "world_size": dist.world_size,
                "auction": auction,
            },
        )
        metrics_path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        row = {
            "iteration": 0,
            "env_steps": 0,
            **evaluate(model),
            **mtp_candidates(evaluate, start_dir, args.device),
            "perf/setup_s": t0 - t_setup,
            "perf/eval_s": time.perf_counter() - t0,
        }
        append_metrics(metrics_path, {**row, **kept.start(model, row, evaluate.sessions)})
        print(log_line(row))
    terms_fn = PathTerms(model, compile=args.compile, ad_lookup=roller.ad_lookup(model))
    if dist.enabled:
        # find_unused_parameters: the RL losses leave the extra MTP heads (and per algorithm the critic) idle
        terms_fn = torch.nn.parallel.DistributedDataParallel(terms_fn, find_unused_parameters=True)

    watched = f"eval/{args.plateau_metric}"  # the curve of the stop rule
    curve = [r[watched] for r in read_metrics(metrics_path) if watched in r] if dist.is_main else []
    plateau_at, stopped_at = None, None  # the iteration a plateau / a SIGTERM ended the loop at
    bar = tqdm(
        range(start, args.iterations),
        desc=f"{args.algo}",
        disable=not (args.progress and dist.is_main),
        unit="it",
    )
    peaks = PhasePeaks(args.device)
    with StopRequest() as request:
        for it in bar:
            t0 = time.perf_counter()
            model.eval()
            buf, stats = roller.collect(model, args.rollout_steps)
            model.train()
            buf.adv, buf.returns = algo.targets(buf, args.loss)
            memory = peaks.take("rollout")
            t1 = time.perf_counter()
            terms = update(
                terms_fn,
                model,
                opt,
                ref,
                buf,
                algo,
                args.loss,
                schedule,
                it,
                dist,
                policy=it >= args.critic_warmup,
            )
            memory.update(peaks.take("update"))
            t2 = time.perf_counter()
            env_steps += stats["rollout/requests"]
            returns, _ = roller.pop_episodes()
            episodes = torch.tensor([float(returns.numel()), float(returns.sum())], dtype=torch.float64)
            count, total = distributed.all_reduce_sum(episodes, dist).tolist()
            done = it + 1
            row = {
                "iteration": done,
                "env_steps": env_steps,
                **stats,
                **(buf.stats or {}),
                **terms,
                "train/episodes": int(count),
                "train/episode_return": total / count if count else float("nan"),
                "perf/rollout_s": t1 - t0,
                "perf/update_s": t2 - t1,
                "perf/requests_per_s": stats["rollout/requests"] / max(t2 - t0, 1e-9),
                **memory,
            }
            if dist.is_main:
                if done % args.eval_every == 0 or done == args.iterations:
                    t3 = time.perf_counter()
                    row.update(evaluate(model))
                    row.update(kept.margins(evaluate.sessions))  # vs the best before it and the start
                    row["perf/eval_s"] = time.perf_counter() - t3  # held-out sessions and oracle states
                    row.update(peaks.take("eval"))
                    tqdm.write(log_line(row))
                    row.update(kept.consider(model, row, evaluate.sessions))
                append_metrics(metrics_path, row)
                bar.set_postfix(
                    value=f"{stats['rollout/group_value_mean']:.4f}",
                    req_s=f"{row['perf/requests_per_s']:.0f}",
                )
                if watched in row:
                    curve.append(row[watched])
            stop = distributed.broadcast_object(
                dist.is_main and plateaued(curve, args.plateau_patience, args.plateau_delta), dist
            )
            # a SIGTERM to any rank (a scheduler may signal one process) stops every rank at this iteration
            halt = any(distributed.gather_objects(request.requested, dist))
            if done % args.checkpoint_every == 0 or done == args.iterations or stop or halt:
                save_checkpoint(ckpt, model, opt, roller, done, env_steps, dist)
                if dist.is_main:
                    save_policy(out / "policy.pt", model)
            distributed.barrier(dist)  # rank 0's evaluation and files are done before the next rollout
            if stop:
                plateau_at = done
                tqdm.write(
                    f"{out}: {watched} gained <= {args.plateau_delta} in the last {args.plateau_patience} "
                    f"evaluations: stopping at iteration {done}"
                )
            if halt:
                stopped_at = done
            if stop or halt:
                break
    bar.close()
    if stopped_at is not None and plateau_at is None and stopped_at < args.iterations:
        # unfinished: no summary.json, so the same command resumes the run (run_dir, agents.sweep.finished)
        # from the checkpoint of the iteration metrics.jsonl ends at, replaying nothing
        if dist.is_main:
            print(
                f"{out}: SIGTERM at iteration {stopped_at}: checkpoint written; run the same command to resume"
            )
        raise SystemExit(STOP_EXIT)

    if dist.is_main:
        record = {
            "plateau_at": plateau_at,
            "env_steps": env_steps,
            "world_size": dist.world_size,
            "auction": auction,
        }
        _write_summary(args, out, record, kept.best)
    distributed.barrier(dist)  # rank 0 wrote summary.json
    if stopped_at is not None:
        # the SIGTERM came in the iteration that finished the run: summary written, the process still stops
        # (a caller running several runs in process, agents.sweep, must not start the next one)
        if dist.is_main:
            print(f"{out}: SIGTERM at iteration {stopped_at}, which finished the run: summary.json written")
        raise SystemExit(STOP_EXIT)
    return read_json(summary_path)
