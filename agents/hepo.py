"""Align the pre-trained GPR generator to business value in the simulator: HEPO (GPR §4.3) and baselines.

    python -m agents.hepo --env ads-v0                       # the whole pipeline, small CPU config
    python -m agents.hepo --env ads-v0 --algo ppo --seed 1   # PPO / GRPO / Sibling-GRPO / DPO, same generator
    python -m agents.hepo --env ads-v0 --device cuda --num-envs 4096 --iterations 200

Pipeline (each stage reused when already present): the platform's bootstrap log (the privileged cascade) ->
its learned pCTR / pCVR (``ROOT/funnel``) and learned cascade (``ROOT/platform``) -> the learned cascade's log
(``--behaviour``) -> fit the RQ-Kmeans+ tokenizer -> MTP -> VAFT (``agents.pretraining.pipeline``, into ``--pretrain-dir``, shared by every algorithm of a seed so
they start from the same generator; every stage in the ``--preset`` world) -> RL. The RL loop per iteration:

    rollout (``agents.rl.rollout.Roller``: N sessions x T steps, K sampled paths per request, simulator
    scores, process rewards, ARR requests) -> targets (the algorithm's ``targets``) -> E epochs of
    minibatch updates with the algorithm's loss (``agents.rl.loop.update``) -> metrics -> evaluation
    -> checkpoint

HEPO, PPO, GRPO, Sibling-GRPO and DPO (``agents.rl.registry.ALGOS``, one file each in ``agents/rl/``) share
the rollout buffer and this loop and differ only in their targets and loss. Evaluation
(``agents.evaluation.heldout``) runs the generator (beam search, top-1 served) on held-out sessions of a separate market with a fixed
seed: reward, revenue, GMV, CTR, CVR, CTCVR per session with 95% CIs, the same per user-activity tier and
for new / old ads (Table 5, values only: ``eval/strata/...``), plus the Table 3 candidate quality (nDCG,
OPR, mean / max normalised final_value of the top-K beam) on the first requests of those sessions.

The run folder (``runs/hepo/{env}__{algo}__{seed}__{time}``, or ``--out``) holds ``config.json``,
``metrics.jsonl``, ``checkpoint.pt`` (model, optimiser, env and RNG state: exact resume), ``policy.pt``
(the model alone, for ``agents.evaluate --agents gpr:RUN``), ``best/`` (the policy of the evaluation with the
highest held-out reward per session so far, ``keep_best``: ``gpr:RUN/best``), ``summary.json``, ``curves.png``,
``reward_model.png`` (the rewarded vs true value of the sampled candidates per iteration: ``agents.rl.rollout``) and
``gradients.png`` (the policy's and the critic's gradient norms before the clip, and how often it scaled). Without
``--out`` the newest unfinished run of the same env/algo/seed is resumed. The folder is locked while a run
writes it and belongs to the run that created it (``run.json``, ``gpr_sim.runs.RunFolder``): a run with other
flags (bar ``RESUME_IGNORES``) is refused, naming them, and so is a folder holding results but no checkpoint.
Resuming never rewrites ``config.json``, and a finished run asked for no more ``--iterations`` keeps its
``summary.json``. A SIGTERM during RL (``timeout``, a batch scheduler, a session's end) stops the run at the end
of its current iteration: it writes that iteration's checkpoint and ``policy.pt``, no ``summary.json``, and exits
with status 143 (``StopRequest``), so the same command resumes it with nothing lost (Ctrl-C stops at once).

The auction: by default the markets' auction ranks on the privileged estimate (the world's default). With
``--auction`` (needs ``--reward learned``) the training market's auction ranks on the same learned pCTR / pCVR
that rewards the learners (``agents.pretraining.pipeline.reward_funnel_file``: ``ROOT/platform/funnel.pt``, or
``ROOT/funnel/model.pt`` with ``--behaviour cascade-privileged``), and so do the held-out evaluation's market and its
``oracle_share`` states (``HeldOutConfig.auction``): the fair-arena setting in which the learned cascade is
compared with GPR (``agents.evaluate --auction``). ``config.json`` and ``summary.json`` record which auction
ran and the funnel's SHA-256 (``auction_record``); the reports refuse to put runs of different auctions in
one table (``agents.reporting.folders.check_runs``), and a run resumes only with the funnel it started on.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from agents.cli import check_args, parse_args, run_main
from agents.evaluation.heldout import Evaluator, HeldOutConfig, mtp_candidates, paired_margin
from agents.policies.gpr import load_run_model, save_policy
from agents.pretraining.config import PretrainConfig
from agents.pretraining.pipeline import (
    ensure_behaviour,
    ensure_funnel,
    ensure_pretrained,
    pipeline_dir,
    stage_configs,
)
from agents.reporting.figures import plot_curves, plot_gradients, plot_reward_model
from agents.reporting.keys import BEST_ITERATION, BEST_METRIC, margin_key
from agents.rl import distributed
from agents.rl.common import LossConfig
from agents.rl.distributed import SINGLE, Dist
from agents.rl.loop import CLIPS, COMPILE_MODES, PathTerms, UpdateConfig, update
from agents.rl.registry import algorithm
from agents.rl.rollout import OUTCOMES, SLOT_BITS, Roller
from envs import make_vec_env
from envs.market import ESTIMATORS
from gpr_sim.model import GPRModel
from gpr_sim.model.precision import check_precision
from gpr_sim.platform.funnel import load_funnel
from gpr_sim.runs import (
    RunFolder,
    append_metrics,
    file_digest,
    load_torch,
    read_json,
    read_metrics,
    run_name,
    save_torch,
    write_json,
    write_metrics,
    write_parquet,
)

ENTRY = "agents.hepo"
"""the owner of its run folders (``gpr_sim.runs.RunFolder``)"""
CKPT_FORMAT = "gpr_sim.hepo"
CKPT_VERSION = 2
"""2: keyed rollout draws and minibatch order (no generator states); the env state of every rank"""
RESUME_IGNORES = (
    "iterations",
    "progress",
    "threads",
    "out",
    "device",
    "label",
    "plateau_patience",
    "plateau_delta",
    "plateau_metric",
    "compile",
)
"""flags that may change between an interrupted run and its resumption"""
RL_STARTS = ("vaft", "mtp")
"""``Args.rl_start``: the pre-training stage (its folder in the pipeline) the RL starts from"""
BEST_RULES = ("highest", "resolved")
"""``Args.best_rule``: when an evaluation replaces ``OUT/best`` (``keep_best``)"""
PLATEAU_METRICS = ("oracle_share", "reward_per_session")
"""``Args.plateau_metric``: the held-out evaluation curve whose flattening stops a run"""
STOP_EXIT = 128 + signal.SIGTERM
"""exit status of a run stopped by SIGTERM (``StopRequest``): 143, the shell's code for a SIGTERM death"""


PROFILES: dict[str, dict] = {
    "cpu": {},
    "gpu-large": dict(
        device="cuda",
        precision="bf16",
        compile="regions",
        preset="large",
        collect_envs=16384,
        collect_steps=64,
        funnel_envs=16384,
        funnel_steps=64,
        codebook_size=256,
        d_model=256,
        n_layers=4,
        n_heads=4,
        pretrain_batch=1024,
        mtp_steps=3000,
        vaft_steps=1000,
        num_envs=16384,
        minibatch=1024,
        iterations=300,
        eval_every=10,
        eval_sessions=16384,
        eval_envs=4096,
        eval_states=2048,
        checkpoint_every=10,
        plateau_patience=5,
    ),
}
"""Named defaults of ``--profile`` (``Args``' own defaults are ``cpu``'s). ``gpu-large``: the large world (1M ads,
50k advertisers), a 256-code tokenizer, 1,048,576 logged requests (16,384 sessions x 64 steps) for MTP and as
many for the platform's own models (learned pCTR / pCVR, the learned cascade: a platform learns from at least
the traffic the generator sees; on 131,072 requests of the large world its CTR AUC was 0.53, truth's 0.65), the
d=256 x 4-layer generator, 16,384 concurrent RL sessions, and RL until eval/oracle_share has not gained 0.005 in
5 evaluations (50 iterations) or 300 iterations; sized for one H200 (139 GiB): the oracle_share states hold
every ad's true value at each state, 2,048 x 1M float64 = 16 GiB."""


@dataclass(frozen=True)
class Args:
    """CLI of ``python -m agents.hepo`` (``--loss.*`` flags set the loss constants)."""

    profile: str = "cpu"
    """named defaults (``PROFILES``): cpu (the demo: small world, d=64, minutes on a CPU) | gpu-large (the
    large world on one GPU); flags given beside it override the profile's values"""
    env: str = "ads-v0"
    """Gymnasium id of the environment"""
    algo: str = "hepo"
    """hepo | ppo (terminal reward, joint ratio) | grpo (group z-score, no critic) | sibling_grpo (per level, z-score
    among the paths sharing the prefix, no critic) | dpo (best vs worst of a group) (agents.rl.registry)"""
    seed: int = 0
    """seed of pre-training, rollouts and updates"""
    label: str = ""
    """name of the run in plots and tables (e.g. hepo_no_arr); empty = the algorithm"""
    device: str = "cpu"
    """torch device of the env and the model"""
    out: str = ""
    """run folder; empty = resume the newest unfinished runs/hepo/{env}__{algo}__{seed}__* or start one"""
    pretrain_dir: str = ""
    """folder of the shared MTP and VAFT stages; empty = runs/hepo/pretrain/{env}__{seed}"""
    pretrain_only: bool = False
    """run (or reuse) the pre-training stages into --pretrain-dir and stop, opening no run folder: learners launched
    later start from them (a device call that has time only for the pre-training, or several learners that share
    it); the summary it returns names the VAFT folder and the learned funnel"""
    rl_start: str = "vaft"
    """vaft | mtp: the pre-trained generator the RL starts from and anchors its KL to (GPR's pipeline: vaft; mtp
    skips the value-aware fine-tuning for the RL, which still runs, to ask whether it pays: on the large world the
    MTP model earned more per session than the VAFT one, RESULTS "The d3 start on paired sessions")"""
    preset: str = "small"
    """world preset of every stage: the pre-training log is collected in it, the RL and evaluation markets use it"""
    mtp_steps: int = 200
    """MTP pre-training steps"""
    vaft_steps: int = 100
    """VAFT steps"""
    d_model: int = 64
    """generator width (built by pre-training, trained by RL)"""
    n_layers: int = 2
    """HSD blocks of the generator"""
    n_heads: int = 2
    """attention heads (must divide d_model)"""
    pretrain_batch: int = 128
    """requests per MTP / VAFT step"""
    collect_envs: int = 64
    """sessions of the logged data pre-training learns from (collect_envs x collect_steps requests)"""
    collect_steps: int = 100
    """steps of the logged data"""
    codebook_size: int = 16
    """codes per semantic-ID level of the tokenizer (16 small world, 256 large)"""
    behaviour: str = "learned-cascade"
    """policy of the pre-training log: learned-cascade (served by {pretrain-dir}/platform, fitted on the funnel's
    bootstrap log of --funnel-envs x --funnel-steps requests: the platform's own production system, so MTP imitates
    choices made from the platform view) | cascade-privileged (a policy that reads the simulator's hidden state:
    imitating it hands GPR that state; ``agents.pretrain``'s default) (``PretrainConfig.behaviour``)"""
    market_features: bool = True
    """the generator's E token carries the platform's spend ledger (``PretrainConfig.market_features``); off =
    the layout without it"""
    iterations: int = 20
    """RL iterations (rollout + update)"""
    num_envs: int = 64
    """concurrent training sessions"""
    rollout_steps: int = 4
    """env steps per iteration"""
    group_size: int = 40
    """K candidates sampled and scored per request (GPR: 40)"""
    epochs: int = 2
    """passes over each rollout"""
    minibatch: int = 64
    """requests per minibatch (x group_size paths)"""
    lr: float = 1e-4
    """AdamW learning rate (constant, so a resumed run matches an uninterrupted one)"""
    max_grad_norm: float = 1.0
    """gradient clipping: the largest gradient norm a step takes"""
    grad_clip: str = "joint"
    """joint: one clip over the policy and the HTE together (the reference; the recorded runs used it) | separate:
    each on its own norm, so the critic's gradient does not shrink the policy's step (``UpdateConfig.clip``)"""
    critic_warmup: int = 2
    """first iterations that train only the HTE (critic and item value): pre-training fits it to logged final
    values of shown ads, which are not the rollout's R (no auction win probability, no budget share, other scale)"""
    reward: str = "learned"
    """funnel the learners are rewarded through (the scoring API's estimator): learned (pCTR / pCVR fitted on the
    pre-training log, ``ROOT/funnel``, as the paper's simulator uses production models) | privileged (the
    simulator's noisy-truth estimator) | truth (the simulator's true funnel); the last two are labelled
    privileged variants, never mixed with learned runs in one comparison"""
    reward_outcome: str = "expected"
    """expected (each sampled candidate is paid its expected value, GPR's final_value) | realised (one draw of
    what it would realise: win, click, conversion and stay drawn from the same funnel; unbiased but noisy,
    ``agents.rl.rollout.realised_rewards``)"""
    funnel_envs: int = 1024
    """sessions of the platform's own log the learned pCTR / pCVR is fitted on (``--reward learned``)"""
    funnel_steps: int = 128
    """requests per session of that log (1,024 x 128 = 131,072 requests; seconds on a CPU)"""
    auction: bool = False
    """the auction of the training market, the held-out market and the oracle_share states ranks on that same
    learned pCTR / pCVR (the fair-arena setting; needs --reward learned); off = the privileged auction"""
    budget_aware: bool = True
    """scale each candidate's value by its advertiser's budget share this step (agents.rl.rollout doc)"""
    arr: bool = True
    """anticipatory request rehearsal"""
    arr_rate: float = 0.5
    """ARR probability for the most active tier (tier t: arr_rate * t / 5)"""
    eval_every: int = 5
    """iterations between evaluations (and at the start and the end)"""
    eval_sessions: int = 256
    """held-out sessions per evaluation"""
    eval_envs: int = 128
    """concurrent evaluation sessions"""
    eval_seed: int = 12345
    """seed of the evaluation market (the same users for every algorithm and iteration)"""
    eval_beam: int = 8
    """beam width of the served policy"""
    eval_candidates: int = 40
    """K of the candidate-quality metrics (beam width = K)"""
    eval_states: int = 256
    """fixed request states of eval/oracle_share"""
    checkpoint_every: int = 5
    """iterations between checkpoints (and at the end)"""
    best_rule: str = "highest"
    """highest | resolved: an evaluation replaces OUT/best when its held-out reward per session is higher than the
    best's (highest), or only when its paired margin over the best (eval/reward_per_session_vs_best) is resolved
    above 0 at 95% (resolved: the earliest improvement its sessions can tell apart; benchmarks/RESULTS.md, "The
    best-checkpoint rule's margins")"""
    plateau_patience: int = 0
    """stop once this many evaluations in a row raised eval/PLATEAU_METRIC by no more than plateau_delta over the
    best before them (the curve has flattened); 0 = run every iteration"""
    plateau_delta: float = 0.005
    """the gain of plateau_metric that still counts as progress (in the metric's own units)"""
    plateau_metric: str = "oracle_share"
    """oracle_share | reward_per_session: the curve the stop rule watches. reward_per_session is the one the best
    checkpoint is chosen by (``OUT/best``), so the rule becomes early stopping: no new best in plateau_patience
    evaluations. Under the learned reward every gpu-large learner peaked by iteration 8 and only fell after it
    (benchmarks/RESULTS.md), so that rule ends a run once its best is settled instead of 20 iterations later"""
    precision: str = "fp32"
    """fp32 (the reference) | bf16: the rollout's and the update's forward passes under bfloat16 autocast"""
    pretrain_precision: str = "fp32"
    """fp32 | bf16: the pre-training steps' forward passes (``PretrainConfig.precision``). fp32 on every profile:
    on the H200 the gpu-large pre-training in bf16 saved ~15% of its time (422 s vs 490-515 s) but its MTP stage
    reached HitRate@10 0.109 against 0.121-0.127 in four fp32 pre-trainings (benchmarks/RESULTS.md), and a
    pre-training is paid once per seed (it travels between calls, benchmarks/pretrain_bundle.py)"""
    compile: str = "off"
    """off | blocks (each HSD and PTD block through torch.compile: the element-wise work fuses; seconds to
    compile) | regions (blocks, and the embedding, thinking, teacher-forced paths and HTE values, each one
    graph) | full (the whole update forward; minutes to compile) (``agents.rl.loop.PathTerms``); the
    pre-training stages compile the same way (full: the regions)"""
    threads: int = 0
    """torch CPU threads; 0 = torch's default"""
    progress: bool = True
    """progress bars"""
    loss: LossConfig = field(default_factory=LossConfig)
    """loss constants"""

    def __post_init__(self) -> None:
        check_args(self)
        if self.profile not in PROFILES:
            raise ValueError(f"profile={self.profile!r} is unknown: expected one of {sorted(PROFILES)}")
        if isinstance(self.loss, dict):
            object.__setattr__(self, "loss", LossConfig(**self.loss))
        algorithm(self.algo)  # a clear error for an unknown name
        check_precision(self.precision)
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile={self.compile!r} is unknown: expected one of {COMPILE_MODES}")
        if self.reward_outcome not in OUTCOMES:
            raise ValueError(f"reward_outcome={self.reward_outcome!r} is unknown: expected one of {OUTCOMES}")
        if self.rl_start not in RL_STARTS:
            raise ValueError(f"rl_start={self.rl_start!r} is unknown: expected one of {list(RL_STARTS)}")
        if self.reward not in ESTIMATORS:
            raise ValueError(f"reward={self.reward!r} is unknown: expected one of {ESTIMATORS}")
        for name in ("auction", "pretrain_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected a bool")
        if self.auction and self.reward != "learned":
            raise ValueError(
                f"auction=True needs reward='learned' (the auction ranks on the learned funnel that rewards), "
                f"got reward={self.reward!r}"
            )
        for name, lo in (
            ("mtp_steps", 1),
            ("vaft_steps", 1),
            ("iterations", 1),
            ("num_envs", 1),
            ("rollout_steps", 1),
            ("group_size", 2),
            ("epochs", 1),
            ("minibatch", 1),
            ("eval_every", 1),
            ("eval_sessions", 1),
            ("eval_envs", 1),
            ("eval_beam", 1),
            ("eval_candidates", 2),
            ("eval_states", 1),
            ("checkpoint_every", 1),
            ("threads", 0),
            ("critic_warmup", 0),
            ("d_model", 1),
            ("n_layers", 1),
            ("n_heads", 1),
            ("pretrain_batch", 1),
            ("collect_envs", 1),
            ("collect_steps", 1),
            ("funnel_envs", 1),
            ("funnel_steps", 1),
            ("codebook_size", 2),
            ("plateau_patience", 0),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r} is invalid: expected an integer >= {lo}")
        if self.num_envs > 1 << SLOT_BITS:
            raise ValueError(
                f"num_envs={self.num_envs} is invalid: at most {1 << SLOT_BITS} sessions (request ids)"
            )
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} is invalid: expected > 0")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} is invalid: expected > 0")
        if self.grad_clip not in CLIPS:
            raise ValueError(f"grad_clip={self.grad_clip!r} is invalid: expected one of {list(CLIPS)}")
        if self.best_rule not in BEST_RULES:
            raise ValueError(f"best_rule={self.best_rule!r} is unknown: expected one of {list(BEST_RULES)}")
        if self.plateau_metric not in PLATEAU_METRICS:
            raise ValueError(
                f"plateau_metric={self.plateau_metric!r} is unknown: expected one of {list(PLATEAU_METRICS)}"
            )
        if not self.plateau_delta >= 0:
            raise ValueError(f"plateau_delta={self.plateau_delta} is invalid: expected >= 0")
        if not 0.0 <= self.arr_rate <= 1.0:
            raise ValueError(f"arr_rate={self.arr_rate} is invalid: expected in [0, 1]")
        pretraining(
            self
        )  # the pre-training stages' settings (the preset among them) fail here, before any stage


# ----------------------------------------------------------------------------- stages and folders


def pretraining(args: Args) -> tuple[PretrainConfig, PretrainConfig]:
    """The MTP and VAFT stages of this run (``agents.pretraining.pipeline``): every stage, the log collection
    included, in the run's world (``--preset``)."""
    common = PretrainConfig(
        env=args.env,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        progress=args.progress,
        preset=args.preset,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        batch_size=args.pretrain_batch,
        collect_envs=args.collect_envs,
        collect_steps=args.collect_steps,
        codebook_size=args.codebook_size,
        behaviour=args.behaviour,
        market_features=args.market_features,
        precision=args.pretrain_precision,
        # the RL update's "full" (its whole loss forward) has no pre-training counterpart: the regions instead
        compile="regions" if args.compile == "full" else args.compile,
    )
    return stage_configs(pipeline_dir(common, args.pretrain_dir), common, args.mtp_steps, args.vaft_steps)


def _comparable(args: Args) -> dict:
    d = json.loads(json.dumps(dataclasses.asdict(args)))
    return {k: v for k, v in d.items() if k not in RESUME_IGNORES}


def run_dir(args: Args) -> Path:
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


def record_defaults() -> dict:
    """The value of each flag a run record lacks: ``Args``' defaults, except that a record from before
    --market-features ran without them and one from before --behaviour on the privileged cascade's logs."""
    return {**dataclasses.asdict(Args()), "market_features": False, "behaviour": "cascade-privileged"}


def open_run_folder(out: Path, args: Args) -> RunFolder:
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


# ----------------------------------------------------------------------------- checkpoints


def _cpu(x):
    """``x`` (tensors in dicts and tuples) with every tensor on the CPU: what ranks exchange as objects."""
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_cpu(v) for v in x)
    return x.cpu() if isinstance(x, torch.Tensor) else x


def save_checkpoint(
    path: Path, model: GPRModel, opt, roller: Roller, it: int, env_steps: int, dist: Dist = SINGLE
):
    """Rank 0 writes model, optimiser and every rank's env state (collective: every rank calls it)."""
    rollers = distributed.gather_objects(_cpu(roller.state_dict()), dist)
    if not dist.is_main:
        return
    payload = {
        "iteration": it,
        "env_steps": env_steps,
        "config": model.cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rollers": rollers,
    }
    save_torch(path, CKPT_FORMAT, CKPT_VERSION, payload)


def read_checkpoint(path: Path) -> dict:
    """Read an RL checkpoint safely (``weights_only``); errors name the file and what is wrong."""
    return load_torch(
        path,
        CKPT_FORMAT,
        CKPT_VERSION,
        "an agents.hepo checkpoint",
        ("model", "optimizer", "rollers", "iteration", "env_steps"),
    )


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


# ----------------------------------------------------------------------------- evaluation


def held_out(args: Args, funnel: Path | None = None) -> HeldOutConfig:
    """The held-out sessions of this run's evaluations and how its generator is served there (``--eval-*``);
    with ``--auction`` their markets' auction ranks on the learned ``funnel`` (the run's, ``ensure_funnel``).

    Raises:
        ValueError: ``--auction`` without the ``funnel`` file it ranks on.
    """
    if args.auction and funnel is None:
        raise ValueError("auction=True needs the learned funnel file its markets rank on (ensure_funnel)")
    return HeldOutConfig(
        env=args.env,
        preset=args.preset,
        device=args.device,
        num_envs=args.eval_envs,
        sessions=args.eval_sessions,
        seed=args.eval_seed,
        beam_width=args.eval_beam,
        candidates=args.eval_candidates,
        oracle_states=args.eval_states,
        progress=args.progress,
        auction=str(funnel) if args.auction else "",
    )


def auction_record(args: Args, funnel: Path | None) -> dict:
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


# ----------------------------------------------------------------------------- main


def make_train_env(args: Args, dist: Dist = SINGLE):
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


def _log_line(row: dict) -> str:
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
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    """Run (or resume) one RL run; returns the summary (also ``OUT/summary.json``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it runs data-parallel: rank r simulates its shard of the
    ``--num-envs`` sessions in an exact shard of the one market, gradients are averaged by
    ``DistributedDataParallel``, statistics are reduced over ranks, and rank 0 evaluates and writes the
    run folder; every rank returns the summary.
    """
    return distributed.launch(_main, parse_args(Args, argv, __doc__, PROFILES))


def _pretrained(args: Args, dist: Dist) -> tuple[Path, Path | None]:
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


def _main(args: Args, dist: Dist) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    vaft, funnel = _pretrained(args, dist)
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
    with distributed.main_rank_folder(lambda: open_run_folder(out, args), dist):
        return _run(args, dist, out, start_dir, funnel)


def _run(args: Args, dist: Dist, out: Path, start_dir: Path, funnel: Path | None = None) -> dict:
    """The RL run in the opened folder ``out`` from the pre-trained generator in ``start_dir`` (``_main``: the VAFT
    stage, or the MTP one with ``--rl-start mtp``), rewarded through the learned pCTR / pCVR ``funnel`` when given
    (``--reward learned``)."""
    summary_path = out / "summary.json"
    if summary_path.is_file() and (out / "checkpoint.pt").is_file():
        finished = int(read_checkpoint(out / "checkpoint.pt")["iteration"])
        summary = read_json(summary_path)
        if finished >= args.iterations or summary.get("plateau_at") == finished:
            # nothing to train: the finished (or flattened) run's summary stays as it is
            why = (
                "its oracle_share curve flattened"
                if finished < args.iterations
                else f">= --iterations {args.iterations}"
            )
            print(f"{out}: finished at iteration {finished} ({why}); its summary is kept")
            return summary
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
    env = make_train_env(args, dist)
    if funnel is not None:
        market = env.unwrapped
        learned = load_funnel(funnel, args.device, catalog=market.catalog)
        market.attach_platform(learned)
        if args.auction:  # the same object: the market evaluates it once per score (envs.market.score)
            market.attach_auction(learned)
    auction = auction_record(args, funnel)
    roller = Roller(
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
    evaluate = Evaluator(held_out(args, funnel), tok) if dist.is_main else None
    metrics_path, ckpt = out / "metrics.jsonl", out / "checkpoint.pt"
    start, env_steps = 0, 0
    best: dict | None = None  # OUT/best's selection (rank 0: keep_best)
    best_records: pd.DataFrame | None = None  # its held-out sessions, paired with each later evaluation's
    start_records: pd.DataFrame | None = None  # the iteration-0 evaluation's, likewise
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
            best = best_selection(out, start)
            best_records = best_sessions(out, best)
            start_file = out / START_SESSIONS  # written at iteration 0, which a resume never replays
            start_records = pd.read_parquet(start_file) if start_file.is_file() else None
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
        best = keep_best(out, model, row, None, evaluate.sessions)
        best_records = evaluate.sessions if best else None
        start_records = evaluate.sessions
        write_parquet(out / START_SESSIONS, start_records)
        append_metrics(metrics_path, {**row, **best_logged(best)})
        print(_log_line(row))
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
    with StopRequest() as request:
        for it in bar:
            t0 = time.perf_counter()
            model.eval()
            buf, stats = roller.collect(model, args.rollout_steps)
            model.train()
            buf.adv, buf.returns = algo.targets(buf, args.loss)
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
            }
            if dist.is_main:
                if done % args.eval_every == 0 or done == args.iterations:
                    t3 = time.perf_counter()
                    row.update(evaluate(model))
                    row.update(paired_margin(evaluate.sessions, best_records))  # vs the best before it
                    row.update(paired_margin(evaluate.sessions, start_records, against="start"))
                    row["perf/eval_s"] = time.perf_counter() - t3  # held-out sessions and oracle states
                    tqdm.write(_log_line(row))
                    chosen = keep_best(out, model, row, best, evaluate.sessions, args.best_rule)
                    if chosen is not best:  # a new best: later evaluations are paired with its sessions
                        best, best_records = chosen, evaluate.sessions
                    row.update(best_logged(best))
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
        rows = read_metrics(metrics_path)
        evals = [r for r in rows if "eval/reward_per_session" in r]
        plot_curves([out], out / "curves.png")
        plot_reward_model([out], out / "reward_model.png")
        plot_gradients([out], out / "gradients.png")
        summary = {
            "algo": args.algo,
            "seed": args.seed,
            "iterations": args.iterations,
            "iterations_run": int(rows[-1]["iteration"]) if rows else 0,
            "plateau_at": plateau_at,
            "env_steps": env_steps,
            "world_size": dist.world_size,
            "auction": auction,
            "initial": evals[0],
            "final": evals[-1],
            "best": next((r for r in evals if best and r["iteration"] == best["iteration"]), None),
        }
        write_json(summary_path, summary)
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
            f"{out}: eval reward/session {evals[0]['eval/reward_per_session']:.3f} -> "
            f"{evals[-1]['eval/reward_per_session']:.3f}, GMV/session {evals[0]['eval/gmv_per_session']:.3f} -> "
            f"{evals[-1]['eval/gmv_per_session']:.3f}"
        )
        if summary["best"]:
            chosen = summary["best"]
            print(
                f"{out}/best: iteration {chosen['iteration']} (highest eval reward/session, "
                f"{chosen[SELECT_METRIC]:.3f}), oracle_share {chosen.get('eval/oracle_share', float('nan')):.3f}"
            )
    distributed.barrier(dist)  # rank 0 wrote summary.json
    if stopped_at is not None:
        # the SIGTERM came in the iteration that finished the run: summary written, the process still stops
        # (a caller running several runs in process, agents.sweep, must not start the next one)
        if dist.is_main:
            print(f"{out}: SIGTERM at iteration {stopped_at}, which finished the run: summary.json written")
        raise SystemExit(STOP_EXIT)
    return read_json(summary_path)


if __name__ == "__main__":
    run_main(main)
