"""The configuration of one pre-training stage (``PretrainConfig``) and the constants of its run folders."""

from __future__ import annotations

from dataclasses import dataclass

from agents.cli import check_args
from gpr_sim.model.precision import check_precision
from gpr_sim.world.config import PRESETS

ENTRY = "agents.pretrain"
"""the owner of its run folders (``gpr_sim.runs.RunFolder``)"""
RESUME_IGNORES = ("steps", "select", "progress", "threads", "out", "device", "compile")
"""flags that may change between a run and its resumption (more ``--steps`` continue it)"""
COMPILE_MODES = ("off", "blocks", "regions")
"""``PretrainConfig.compile``: what of the model runs through torch.compile (``GPRModel.compile_regions``)"""
STAGES = ("mtp", "vaft")
SELECT = ("best", "last")
BEHAVIOURS = ("cascade-privileged", "learned-cascade")
"""policies a stage's own log may be collected with (``PretrainConfig.behaviour``)"""
COMPONENTS = (
    "hybrid_attention",
    "token_aware_ln",
    "token_aware_ffn",
    "mixture_of_recursions",
    "thinking",
    "refining",
    "hte",
)
"""``GPRConfig`` component switches that are flags here (with ``mtp_heads``: the rows of GPR Table 2)"""
BEST_METRIC = "eval/hitrate@{k}"
"""metric that ``best.pt`` maximises"""


@dataclass(frozen=True)
class PretrainConfig:
    """One pre-training stage (MTP or VAFT): data, model, optimiser, evaluation, run folder (the CLI of
    ``python -m agents.pretrain``: one flag per field)."""

    env: str = "ads-v0"
    """Gymnasium id of the environment the logs come from"""
    stage: str = "mtp"
    """mtp (uniform head weights) | vaft (value weights, starts from --init)"""
    logs: str = ""
    """logged requests (Parquet); empty = collect a small cascade log into OUT/logs.parquet"""
    tokenizer: str = ""
    """saved WorldTokenizer folder; empty = fit RQ-Kmeans+ (fast settings) into OUT/tokenizer"""
    init: str = ""
    """checkpoint to start from (VAFT: the MTP checkpoint); ignored when OUT holds a checkpoint to resume"""
    out: str = ""
    """run folder; default runs/pretrain/{env}__{stage}__{seed}"""
    steps: int = 200
    """optimiser steps"""
    batch_size: int = 128
    """requests per step"""
    lr: float = 1e-3
    """AdamW learning rate"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    seed: int = 0
    """seed of the model init, the batch sampler and the refiner noise"""
    device: str = "cpu"
    """torch device"""
    precision: str = "fp32"
    """fp32 (the reference) | bf16: each training step's forward under bfloat16 autocast (``gpr_sim.model.precision``;
    parameters, gradients and AdamW stay float32, the evaluation runs in float32)"""
    compile: str = "off"
    """off | blocks (each HSD and PTD block through torch.compile) | regions (the blocks, the embedding, thinking and
    refiner, the teacher-forced paths and the HTE, each one graph: ``GPRModel.compile_regions``); the same values
    and checkpoints, faster on a GPU"""
    d_model: int = 64
    """model width"""
    n_layers: int = 2
    """HSD blocks"""
    n_heads: int = 2
    """attention heads (must divide d_model)"""
    mtp_heads: int = 4
    """N MTP heads"""
    hybrid_attention: bool = True
    """GPR hybrid attention mask (prompt bidirectional, items causal); off = plain causal"""
    token_aware_ln: bool = True
    """one LayerNorm per token type; off = one shared LayerNorm"""
    token_aware_ffn: bool = True
    """one FFN per token type; off = one shared FFN"""
    mixture_of_recursions: bool = False
    """share the last HSD block and apply it recursively (router)"""
    thinking: bool = True
    """learnable thinking tokens distil the HSD outputs; off = the E token's output is the context"""
    refining: bool = True
    """diffusion-style refiner adds a refine token"""
    hte: bool = True
    """HTE value heads (beam guidance, the RL critic); pre-trained with --value-coef"""
    platform_features: bool = True
    """tokens carry the platform's catalog features (U: interest estimate, I: the ad's bid, value, age, budget;
    ``gpr_sim.schema``); off = the layout without them (runs recorded before this flag)"""
    market_features: bool = True
    """the E token also carries the platform's spend ledger at each request (shares of advertisers eligible
    and throttled by pacing, mean spent share of the daily budgets, budget-day progress;
    ``gpr_sim.platform.market``); needs a log with the ``market`` column (collected since); off = the layout
    without it (runs recorded before this flag)"""
    hte_ad_features: bool = True
    """with --platform-features: the HTE's full-item value also reads the candidate ad's platform features
    (bid, order value, age, budget; ``gpr_sim.model.hte``), GPRConfig.hte_ad_features = their width; off, or
    without platform features, it reads none (runs recorded before this flag)"""
    value_coef: float = 0.5
    """weight of the HTE loss: every prefix of a request's shown ad regresses on its final_value (0 = off)"""
    value_trunk: bool = False
    """let the HTE loss move the shared HSD/PTD trunk (joint training); off = the HTE reads detached features"""
    select: str = "last"
    """best | last: the checkpoint downstream users should load (summary.json selected_checkpoint)"""
    eval_fraction: float = 0.2
    """share of sessions held out"""
    split_seed: int = 0
    """seed of the train / held-out session split (kept apart from --seed on purpose)"""
    eval_every: int = 100
    """steps between evaluations (and at step 0 and the last step)"""
    checkpoint_every: int = 100
    """steps between checkpoints (and at the last step)"""
    eval_requests: int = 512
    """held-out requests ranked by beam search (the first ones)"""
    eval_loss_requests: int = 16384
    """held-out requests the evaluation's losses and value R^2 average over, evenly spaced over the held-out
    split (0 = all of them): a 1M-request log holds ~210k held-out requests, whose every-100-steps pass cost
    more than the training steps between them"""
    top_k: int = 10
    """K of HitRate@K and nDCG@K"""
    beam_width: int = 20
    """beams per level in the offline eval (>= top_k)"""
    preset: str = "small"
    """world preset of the collected log (when --logs is empty; a given log brings its own world)"""
    collect_envs: int = 64
    """sessions of the collected log (when --logs is empty)"""
    collect_steps: int = 100
    """steps of the collected log (when --logs is empty)"""
    behaviour: str = "cascade-privileged"
    """policy of the collected log (when --logs is empty): cascade-privileged (reads the simulator's true
    funnel) | learned-cascade (the platform a real one would run: fitted on a cascade-privileged bootstrap log
    beside OUT, ``agents.pretraining.data.ensure_platform``, then serving with exploration and exact propensities)"""
    codebook_size: int = 16
    """codes per semantic-ID level of the tokenizer fitted when --tokenizer is empty (16 suits the small world's
    500 ads; 256 the large world's 1M, as GPR's production tokenizer)"""
    threads: int = 0
    """torch CPU threads; 0 = torch's default"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        check_args(self)
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r} is unknown: expected one of {list(STAGES)}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is unknown: expected one of {sorted(PRESETS)}")
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour={self.behaviour!r} is unknown: expected one of {list(BEHAVIOURS)}")
        check_precision(self.precision)
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile={self.compile!r} is unknown: expected one of {list(COMPILE_MODES)}")
        if self.select not in SELECT:
            raise ValueError(f"select={self.select!r} is unknown: expected one of {list(SELECT)}")
        for name, lo in (
            ("steps", 1),
            ("batch_size", 1),
            ("mtp_heads", 1),
            ("n_heads", 1),
            ("top_k", 1),
            ("eval_every", 1),
            ("eval_loss_requests", 0),
            ("checkpoint_every", 1),
            ("eval_requests", 1),
            ("collect_envs", 1),
            ("collect_steps", 1),
            ("codebook_size", 2),
            ("threads", 0),
        ):
            if getattr(self, name) < lo:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected >= {lo}")
        if self.beam_width < self.top_k:
            raise ValueError(f"beam_width={self.beam_width} is invalid: expected >= top_k={self.top_k}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction} is invalid: expected in (0, 1)")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} is invalid: expected > 0")
        if not self.value_coef >= 0:
            raise ValueError(f"value_coef={self.value_coef} is invalid: expected >= 0")
