"""The configuration of one RL run (``RLConfig``, the CLI of ``python -m agents.hepo``), its named profiles
(``PROFILES``) and what it derives from them: the pre-training stages it starts from (``pretraining``) and the
held-out evaluation of its generator (``held_out``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from agents.cli import check_args
from agents.evaluation.heldout import HeldOutConfig
from agents.pretraining.config import PretrainConfig
from agents.pretraining.pipeline import pipeline_dir, stage_configs
from agents.rl.common import LossConfig
from agents.rl.loop import CLIPS, COMPILE_MODES
from agents.rl.registry import algorithm
from agents.rl.rollout import OUTCOMES, SLOT_BITS
from envs.market import ESTIMATORS
from gpr_sim.model.precision import check_precision, check_residual

ENTRY = "agents.hepo"
"""the owner of its run folders (``gpr_sim.runs.RunFolder``)"""
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
"""``RLConfig.rl_start``: the pre-training stage (its folder in the pipeline) the RL starts from"""
BEST_RULES = ("highest", "resolved")
"""``RLConfig.best_rule``: when an evaluation replaces ``OUT/best`` (``agents.rl.selection.keep_best``)"""
PLATEAU_METRICS = ("oracle_share", "reward_per_session")
"""``RLConfig.plateau_metric``: the held-out evaluation curve whose flattening stops a run"""


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
"""Named defaults of ``--profile`` (``RLConfig``' own defaults are ``cpu``'s). ``gpu-large``: the large world (1M ads,
50k advertisers), a 256-code tokenizer, 1,048,576 logged requests (16,384 sessions x 64 steps) for MTP and as
many for the platform's own models (learned pCTR / pCVR, the learned cascade: a platform learns from at least
the traffic the generator sees; on 131,072 requests of the large world its CTR AUC was 0.53, truth's 0.65), the
d=256 x 4-layer generator, 16,384 concurrent RL sessions, and RL until eval/oracle_share has not gained 0.005 in
5 evaluations (50 iterations) or 300 iterations; sized for one H200 (139 GiB): the oracle_share states hold
every ad's true value at each state, 2,048 x 1M float64 = 16 GiB."""


@dataclass(frozen=True)
class RLConfig:
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
    eval_precision: str = "fp32"
    """fp32 (the reference every reported evaluation used) | bf16: the held-out evaluations serve the generator
    under bfloat16 autocast (``GPRPolicy(precision=)``): less memory and time, near-tied beams may rank otherwise"""
    residual_stream: str = "fp32"
    """fp32 | compute: under bf16, the dtype the blocks' residual stream is carried in between the matmuls (fp32, or
    bf16 from the embeddings on: half the bytes of the element-wise work; ``gpr_sim.model.precision.ResidualStream``);
    no effect under fp32"""
    pretrain_precision: str = "fp32"
    """fp32 | bf16: the pre-training steps' forward passes (``PretrainConfig.precision``). fp32 on every profile:
    on the H200 the gpu-large pre-training in bf16 saved ~15% of its time (422 s vs 490-515 s) but its MTP stage
    reached HitRate@10 0.109 against 0.121-0.127 in four fp32 pre-trainings (benchmarks/RESULTS.md), and a
    pre-training is paid once per seed (it travels between calls, benchmarks/pretrain_bundle.py)"""
    compile: str = "off"
    """off | blocks (each HSD and PTD block through torch.compile: the element-wise work fuses; seconds to
    compile) | regions (blocks, and the embedding, thinking, teacher-forced paths and HTE values, each one
    graph) | full (the update's whole forward as one graph, the rollout's and evaluation's through the regions)
    (``agents.rl.loop.PathTerms``); the pre-training stages compile the same way (full: the regions)"""
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
        check_precision(self.eval_precision, "eval_precision")
        check_residual(self.residual_stream)
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
        # the pre-training stages' settings (the preset among them) fail here, before any stage runs
        pretraining(self)


def pretraining(args: RLConfig) -> tuple[PretrainConfig, PretrainConfig]:
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


def record_defaults() -> dict:
    """The value of each flag a run record lacks: ``RLConfig``' defaults, except that a record from before
    --market-features ran without them and one from before --behaviour on the privileged cascade's logs."""
    return {**dataclasses.asdict(RLConfig()), "market_features": False, "behaviour": "cascade-privileged"}


def held_out(args: RLConfig, funnel: Path | None = None) -> HeldOutConfig:
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
        precision=args.eval_precision,
        candidates=args.eval_candidates,
        oracle_states=args.eval_states,
        progress=args.progress,
        auction=str(funnel) if args.auction else "",
    )
