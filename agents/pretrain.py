"""Pre-train the GPR generator on logs: MTP (GPR §4.1), then value-aware fine-tuning (VAFT, §4.2).

    python -m agents.pretrain --env ads-v0 --stage mtp --out runs/pretrain/mtp [--logs L.parquet] \
        [--tokenizer DIR] [--steps 200 --batch-size 128 --lr 1e-3 --seed 0 --device cpu]
    python -m agents.pretrain --stage vaft --init runs/pretrain/mtp/checkpoint.pt --logs ... \
        --tokenizer runs/pretrain/mtp/tokenizer --out runs/pretrain/vaft

Without ``--logs`` a small cascade log is collected into ``OUT/logs.parquet`` (``agents.collect``);
without ``--tokenizer`` an RQ-Kmeans+ tokenizer (small, fast settings) is fitted on the log's world into
``OUT/tokenizer``. Requests are split into train / held-out by session (``episode_id``) with a fixed
split seed, so every stage and seed sees the same held-out sessions.

Loop: seed -> data (tokens, MTP targets, per-level legal masks from the trie, VAFT weights) -> model /
AdamW -> {sample a batch, ``mtp_loss``, step, log, evaluate, checkpoint}. The run folder holds
``config.json``, ``metrics.jsonl`` (``train/loss``, ``eval/loss``, ``eval/hitrate@K``, ``eval/ndcg@K``,
``eval/pop_hitrate@K``, ``eval/pop_ndcg@K``, ``train/loss_value``, ``eval/loss_value``, ``eval/value_r2``),
``checkpoint.pt`` (model, optimiser, sampler RNG, step, model config; written atomically), ``best.pt`` and
``summary.json``. Running again into the same folder resumes from ``checkpoint.pt``: the folder is locked
while a run writes it, and a run with other flags than the folder's (bar ``RESUME_IGNORES``: more ``--steps``
continue it) is refused, naming them (``gpr_sim.runs.RunFolder``). A resumed run keeps ``config.json``; a
finished run asked for fewer ``--steps`` keeps its ``summary.json``.

HTE: with ``--value-coef`` > 0 (default 0.5) the value of every prefix of a request's shown ad regresses on
that ad's final_value (``gpr_sim.model.targets.value_targets``: the scoring API's expected value given the
impression, from the logged price and true funnel probabilities), in units of the train side's std
(``summary.json["value_scale"]``). The HTE reads the context detached (as HEPO's critic does) unless
``--value-trunk``: jointly trained, the value loss lowered held-out HitRate@10 in the Table 2 ablation
(``agents.ablation``'s ``+hte``, which sets it; see ``benchmarks/RESULTS.md``). Measured on a
25,600-request cascade log: a ridge regression on user, context and ad one-hot explains about 8% of that
value's variance on held-out rows (most of it is the auction's price, set by the request's competing
bids); ``eval/value_r2`` reaches about 0 after 400 steps, from about -5 cold.

Components: ``--[no-]hybrid-attention``, ``--[no-]token-aware-ln``, ``--[no-]token-aware-ffn``,
``--[no-]mixture-of-recursions``, ``--[no-]thinking``, ``--[no-]refining``, ``--[no-]hte`` and
``--mtp-heads`` switch the GPR parts of Table 2 (``GPRConfig``; defaults as there, MoR off).

Best checkpoint: ``best.pt`` (same format as ``checkpoint.pt``) holds the model of the evaluation with
the highest ``eval/hitrate@K`` so far (ties keep the earlier one); ``summary.json["best"]`` records its
step and metrics. An improvement also writes ``checkpoint.pt``, so ``best.pt`` is never ahead of the
resumable state and a resumed run re-derives the best from the kept ``metrics.jsonl`` rows. The best is
selected on the held-out requests themselves, so its metrics are optimistic. ``--select best|last``
names the file downstream users should load: ``summary.json["selected_checkpoint"]``.

Data parallel: ``torchrun --standalone --nproc-per-node W -m agents.pretrain ...`` (``agents.rl.distributed``).
Every rank loads the same data and draws the same global batch of ``--batch-size`` requests (the
sampler RNG is identical on all ranks); rank r trains on its contiguous slice of ``batch_size / W``
rows (``--batch-size`` must be a multiple of W) in ``DistributedDataParallel``, whose gradient average
equals the global-batch gradient; the refiner's noise rows are those of one process. Only rank 0
collects / fits the inputs, evaluates and writes the run folder; logged train losses are global.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from agents.cli import check_args, parse_args, run_main
from agents.pretraining.checkpoint import (
    checkpoint_data,
    load_checkpoint,
    load_model_state,
    read_checkpoint,
)
from agents.rl import distributed
from gpr_sim.data.logs import check_run_world, check_tokenizer_world, read_logs
from gpr_sim.model import GPRConfig, GPRModel
from gpr_sim.model.offline_eval import model_rankings, popularity_rankings, ranking_metrics
from gpr_sim.model.targets import mtp_targets, target_paths, vaft_weights, value_targets
from gpr_sim.runs import (
    RunFolder,
    append_metrics,
    atomic_write_bytes,
    read_json,
    read_metrics,
    run_name,
    write_json,
    write_metrics,
)
from gpr_sim.schema import SchemaConfig, TokenBatch, tokens_from_logs
from gpr_sim.tokenizer.compare import CompareConfig
from gpr_sim.tokenizer.world import WorldTokenizer, fit_world_tokenizer
from gpr_sim.world import WorldConfig
from gpr_sim.world.catalog import World, generate_world

ENTRY = "agents.pretrain"
"""the owner of its run folders (``gpr_sim.runs.RunFolder``)"""
RESUME_IGNORES = ("steps", "select", "progress", "threads", "out", "device")
"""flags that may change between a run and its resumption (more ``--steps`` continue it)"""
STAGES = ("mtp", "vaft")
SELECT = ("best", "last")
COMPONENTS = ("hybrid_attention", "token_aware_ln", "token_aware_ffn", "mixture_of_recursions", "thinking",
              "refining", "hte")  # fmt: skip
"""``GPRConfig`` component switches that are flags here (with ``mtp_heads``: the rows of GPR Table 2)"""
BEST_METRIC = "eval/hitrate@{k}"
"""metric that ``best.pt`` maximises"""
FAST_TOKENIZER = CompareConfig(codebook_size=16, kmeans_iters=5, vae_steps=30, batch_size=128, hidden_dim=32)
"""RQ-Kmeans+ settings of the tokenizer fitted when none is given (seconds on a CPU)"""


@dataclass(frozen=True)
class Args:
    """CLI of ``python -m agents.pretrain``."""

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
    """held-out requests ranked by beam search (the first ones; eval/loss uses all)"""
    top_k: int = 10
    """K of HitRate@K and nDCG@K"""
    beam_width: int = 20
    """beams per level in the offline eval (>= top_k)"""
    collect_envs: int = 64
    """sessions of the collected log (when --logs is empty)"""
    collect_steps: int = 100
    """steps of the collected log (when --logs is empty)"""
    threads: int = 0
    """torch CPU threads; 0 = torch's default"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        check_args(self)
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r} is unknown: expected one of {list(STAGES)}")
        if self.select not in SELECT:
            raise ValueError(f"select={self.select!r} is unknown: expected one of {list(SELECT)}")
        for name, lo in (("steps", 1), ("batch_size", 1), ("mtp_heads", 1), ("n_heads", 1), ("top_k", 1),
                         ("eval_every", 1), ("checkpoint_every", 1), ("eval_requests", 1), ("collect_envs", 1),
                         ("collect_steps", 1), ("threads", 0)):  # fmt: skip
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


# ----------------------------------------------------------------------------- data


@dataclass
class Split:
    """Everything one side of the split needs, as row-aligned tensors on the device."""

    tokens: TokenBatch  # B requests
    codes: torch.Tensor  # (B, N, L') target paths, -1 rows = none
    masks: list[torch.Tensor]  # L' of (B, N, K_l) legal codes after each target's prefix
    weights: torch.Tensor  # (B, N) per-target weights: 1/N (MTP) or VAFT weight / N
    ads: torch.Tensor  # (B, N) target ads, -1 = none
    values: torch.Tensor  # (B,) HTE target: final_value of head 0's ad / value_scale, NaN = none

    def rows(self, idx: torch.Tensor) -> tuple[TokenBatch, Tensor, list[Tensor], Tensor, Tensor]:
        return (TokenBatch(*(t[idx] for t in self.tokens)), self.codes[idx], [m[idx] for m in self.masks],
                self.weights[idx], self.values[idx])  # fmt: skip

    def __len__(self) -> int:
        return self.codes.shape[0]


def split_sessions(episode_id: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(B,) bool held-out mask: a seeded random ``fraction`` of the sessions (at least one) is held out."""
    sessions = np.unique(episode_id)
    rng = np.random.default_rng(seed)
    n_eval = max(1, int(round(fraction * sessions.size)))
    held = rng.permutation(sessions)[:n_eval]
    return np.isin(episode_id, held)


def legal_masks(codes: torch.Tensor, tok: WorldTokenizer) -> list[torch.Tensor]:
    """L' masks (B, N, K_l): legal next codes after each target's prefix z_<l (from the ad trie)."""
    safe = codes.clamp_min(0).to(tok.device)  # rows without a target get some mask; mtp_loss ignores them
    return [tok.prefix_mask(safe[..., :level]).cpu() for level in range(codes.shape[-1])]


def value_scale(g: torch.Tensor) -> float:
    """The std of the finite HTE targets (1 when there are fewer than 2 or they are constant): the HTE learns
    unit-scale values, as HEPO's critic does (``agents.rl.rollout``'s ``reward_scale``)."""
    g = g[g.isfinite()].double()
    std = float(g.std()) if g.numel() > 1 else 0.0
    return std if std > 1e-12 else 1.0


def build_split(df: pd.DataFrame, tok: WorldTokenizer, schema: SchemaConfig, world: World, args: Args) -> Split:
    """Row-aligned tensors of one side of the split (HTE targets in the world's currency: ``_main`` scales them)."""
    targets = mtp_targets(df, args.mtp_heads)
    codes = target_paths(targets.ads, tok)
    n = args.mtp_heads
    if args.stage == "vaft":
        weights = vaft_weights(df, targets) / n  # GPR §4.2; / N keeps the scale of the uniform MTP weights
    else:
        weights = torch.full((len(df), n), 1.0 / n)  # GPR §4.1 DEFAULT: uniform w_j, sum_j w_j = 1
    g = value_targets(df, targets, world.ad_value_mean, world.config.reward).float()
    tokens = tokens_from_logs(df.reset_index(drop=True), tok.table.to("cpu"), schema)
    dev = torch.device(args.device)
    return Split(tokens.to(dev), codes.to(dev), [m.to(dev) for m in legal_masks(codes, tok)],
                 weights.to(dev), targets.ads.to(dev), g.to(dev))  # fmt: skip


def ensure_inputs(args: Args, out: Path) -> tuple[Path, Path]:
    """The log and tokenizer paths, collecting / fitting them into ``out`` when not given."""
    logs = Path(args.logs) if args.logs else out / "logs.parquet"
    if not args.logs and not logs.is_file():
        from agents.collect import main as collect_main

        collect_main(["--env", args.env, "--policy", "cascade", "--num-envs", str(args.collect_envs),
                      "--steps", str(args.collect_steps), "--seed", str(args.seed), "--out", str(logs),
                      "--no-progress"])  # fmt: skip
    tok_dir = Path(args.tokenizer) if args.tokenizer else out / "tokenizer"
    if not args.tokenizer and not (tok_dir / "semantic_ids.pt").is_file():
        _, meta = read_logs(logs)
        world = generate_world(WorldConfig.from_dict(meta["world_config"]), meta.get("world_seed", 0))
        fit_world_tokenizer(world, "rq-kmeans-plus", FAST_TOKENIZER, seed=args.seed).save(tok_dir)
    return logs, tok_dir


# ----------------------------------------------------------------------------- checkpoints


def model_config(tok: WorldTokenizer, schema: SchemaConfig, dense_dim: int, args: Args) -> GPRConfig:
    return GPRConfig(level_sizes=tuple(tok.level_sizes), d_model=args.d_model, n_layers=args.n_layers,
                     n_heads=args.n_heads, dense_dim=dense_dim, max_len=schema.seq_len, mtp_heads=args.mtp_heads,
                     **{name: getattr(args, name) for name in COMPONENTS})  # fmt: skip


# ----------------------------------------------------------------------------- eval


@torch.no_grad()
def evaluate(model: GPRModel, data: Split, trie, args: Args, pop: dict[str, float]) -> dict[str, float]:
    """eval/loss (weighted MTP NLL over all held-out requests) and ranking metrics of head 0 (module doc);
    with the HTE, eval/loss_value (its MSE over every prefix of the held-out shown ads, in value_scale units)
    and eval/value_r2 (1 - that MSE / the variance of the held-out targets: 0 = no better than their mean)."""
    model.eval()
    gen = torch.Generator(device=args.device).manual_seed(args.seed + 1)  # same refiner noise every eval
    total, n, sq, n_v = 0.0, len(data), 0.0, 0
    for lo in range(0, n, 512):
        idx = torch.arange(lo, min(lo + 512, n), device=args.device)
        tokens, codes, masks, weights, values = data.rows(idx)
        out = model.mtp_loss(tokens, codes, weights, masks, gen, value_target=_value_target(model, values))
        total += float(out.loss_mtp) * idx.numel()
        rows_v = int((_has_target(codes) & values.isfinite()).sum())
        sq, n_v = sq + float(out.loss_value) * rows_v, n_v + rows_v
    value_terms = {}
    if model.hte is not None and n_v > 0:
        g = data.values[_has_target(data.codes) & data.values.isfinite()].double()
        var = float(g.var(unbiased=False))
        value_terms = {"eval/loss_value": sq / n_v, "eval/value_r2": 1.0 - sq / n_v / var if var > 0 else float("nan")}
    has = torch.nonzero(data.ads[:, 0] >= 0).squeeze(1)[: args.eval_requests]
    tokens = TokenBatch(*(t[has] for t in data.tokens))
    ranked = model_rankings(model, tokens, trie, args.top_k, args.beam_width, generator=gen)
    ranks = ranking_metrics(ranked, data.ads[has, 0].cpu())
    model.train()
    return {"eval/loss": total / n, **value_terms, **{f"eval/{k}": v for k, v in ranks.items()}, **pop}


# ----------------------------------------------------------------------------- best checkpoint


def best_row(rows: list[dict], key: str) -> dict | None:
    """The metrics row with the highest ``key`` (the earliest on ties); None when no row has it."""
    best = None
    for row in rows:
        value = row.get(key)
        if value is not None and np.isfinite(value) and (best is None or value > best[key]):
            best = row
    return best


def checkpoint_step(path: Path) -> int | None:
    """The step recorded in a checkpoint file; None when it is missing or unreadable."""
    try:
        return int(read_checkpoint(path)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def resume_best(
    rows: list[dict], key: str, start: int, ckpt: Path, best_path: Path
) -> tuple[dict | None, bool]:
    """Best row among the kept metrics rows (all <= the resumed step) and whether ``best_path`` holds it.

    An improvement writes ``checkpoint.pt`` before ``best.pt``, so the only gap is a crash between the two
    writes; then the best is the resumed step itself and ``best.pt`` is restored from ``checkpoint.pt``.
    """
    best = best_row(rows, key)
    if best is None:
        best_path.unlink(missing_ok=True)
        return None, False
    if best_path.is_file() and checkpoint_step(best_path) == best["step"]:
        return best, True
    if best["step"] == start:
        atomic_write_bytes(best_path, ckpt.read_bytes())
        return best, True
    print(f"{best_path}: does not hold the best step {best['step']} of {key} (a run from before best.pt?); "
          "it is written again at the next improvement")  # fmt: skip
    best_path.unlink(missing_ok=True)
    return best, False


# ----------------------------------------------------------------------------- main


class _MTPStep(torch.nn.Module):
    """``GPRModel.mtp_loss`` as a ``forward`` (what ``DistributedDataParallel`` wraps and hooks)."""

    def __init__(self, model: GPRModel, value_trunk: bool) -> None:
        super().__init__()
        self.model, self.value_trunk = model, value_trunk

    def forward(self, tokens, codes, weights, masks, gen, values):
        out = self.model.mtp_loss(tokens, codes, weights, masks, gen, value_target=values, value_trunk=self.value_trunk)
        return out.loss_mtp, out.loss_refine, out.loss_value


def _has_target(codes: torch.Tensor) -> torch.Tensor:
    """Rows whose first head has a target: the rows ``mtp_loss``'s refiner loss averages over."""
    return (codes[:, 0] >= 0).all(-1)


def _value_target(model: GPRModel, values: torch.Tensor, coef: float = 1.0) -> torch.Tensor | None:
    """The HTE targets to train on, or None when there is no HTE or its loss is off."""
    return values if model.hte is not None and coef > 0 else None


def main(argv: list[str] | None = None) -> dict:
    """Train one stage; returns the summary (also written to ``OUT/summary.json``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains data-parallel (module doc); every rank returns
    the summary rank 0 wrote.
    """
    return distributed.launch(_main, parse_args(Args, argv, __doc__))


def out_dir(args: Args) -> Path:
    """``--out``, else ``runs/pretrain/{env}__{stage}__{seed}``."""
    return Path(args.out or Path("runs/pretrain") / run_name(args.env, args.stage, args.seed))


def open_run_folder(out: Path, args: Args) -> RunFolder:
    """Lock ``out`` for this run; refuse it (``ValueError``) unless it is new or holds an ``agents.pretrain``
    run with these settings (bar ``RESUME_IGNORES``)."""
    return RunFolder(out, ENTRY, dataclasses.asdict(args), RESUME_IGNORES, defaults=dataclasses.asdict(Args()))


def _main(args: Args, dist: distributed.Dist) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.batch_size % dist.world_size:
        raise ValueError(f"batch_size={args.batch_size} is invalid with {dist.world_size} processes: "
                         "--batch-size is the global batch and must be a multiple of the world size")  # fmt: skip
    out, folder, refused = out_dir(args), None, None
    if dist.is_main:  # rank 0 alone writes the folder; every rank fails alike when it is refused
        try:
            folder = open_run_folder(out, args)
        except ValueError as e:
            refused = str(e)
    refused = distributed.broadcast_object(refused, dist)
    if refused:
        raise ValueError(refused)
    try:
        return _train(args, dist, out)
    finally:
        if folder is not None:
            folder.close()


def _train(args: Args, dist: distributed.Dist, out: Path) -> dict:
    ckpt, summary_path = out / "checkpoint.pt", out / "summary.json"
    finished = checkpoint_step(ckpt) if ckpt.is_file() else None
    if finished is not None and finished > args.steps and summary_path.is_file():
        print(f"{out}: finished at step {finished} > --steps {args.steps}; its summary is kept")
        return read_json(summary_path)
    if dist.is_main:
        logs, tok_dir = ensure_inputs(args, out)
        if not ckpt.is_file():  # a fresh start; a resumed run keeps the config it started with
            extra = {"world_size": dist.world_size} if dist.enabled else {}
            write_json(
                out / "config.json",
                {**dataclasses.asdict(args), "logs_path": str(logs), "tokenizer_path": str(tok_dir), **extra},
            )
    distributed.barrier(dist)
    if not dist.is_main:
        logs = Path(args.logs) if args.logs else out / "logs.parquet"
        tok_dir = Path(args.tokenizer) if args.tokenizer else out / "tokenizer"

    # data: one tokenisation of every request, then row-aligned tensors per side of the split
    df, meta = read_logs(logs)
    tok = WorldTokenizer.load(tok_dir)
    world = generate_world(WorldConfig.from_dict(meta["world_config"]), meta.get("world_seed", 0))  # HTE targets
    check_tokenizer_world(tok, world, logs, f"tokenizer {tok_dir}")
    if args.init:
        check_run_world(meta, logs, Path(args.init).parent, f"--init {args.init}")
    schema = SchemaConfig.from_world(world.config)
    held = split_sessions(df["episode_id"].to_numpy(), args.eval_fraction, args.split_seed)
    train_df, eval_df = df[~held].reset_index(drop=True), df[held].reset_index(drop=True)
    train, held_out = (build_split(d, tok, schema, world, args) for d in (train_df, eval_df))
    scale = value_scale(train.values)  # the train side's, for both
    for side in (train, held_out):
        side.values = side.values / scale
    trie = tok.to(args.device).trie
    shown = torch.as_tensor(np.concatenate([np.asarray(s, dtype=np.int64) for s in train_df["shown_ad"]]))
    has = held_out.ads[:, 0] >= 0
    n_rank = min(int(has.sum()), args.eval_requests)
    pop_ranked = popularity_rankings(shown, tok.num_ads, args.top_k, n_rank)
    pop_target = held_out.ads[has, 0][:n_rank].cpu()
    pop = {f"eval/pop_{k}": v for k, v in ranking_metrics(pop_ranked, pop_target).items()}

    # model, optimiser, sampler RNG; resume > init > fresh
    torch.manual_seed(args.seed)
    dense_dim = train.tokens.dense_features.shape[-1]
    model = GPRModel(model_config(tok, schema, dense_dim, args)).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    start = 0
    if ckpt.is_file():
        state = load_checkpoint(ckpt, model.cfg)
        if state["stage"] != args.stage:
            raise ValueError(
                f"{ckpt}: a {state['stage']} checkpoint, this run is stage {args.stage}: use another --out"
            )
        load_model_state(ckpt, model, state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"])
        start = int(state["step"])
        # metrics logged after the checkpoint belong to the lost tail of the run: drop them
        if dist.is_main:
            rows = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] <= start]
            write_metrics(out / "metrics.jsonl", rows)
    elif args.init:
        load_model_state(Path(args.init), model, load_checkpoint(args.init, model.cfg)["model"])
    elif args.stage == "vaft":
        raise ValueError("stage vaft starts from the MTP checkpoint: pass --init PATH")

    metrics_path, best_path = out / "metrics.jsonl", out / "best.pt"
    key = BEST_METRIC.format(k=args.top_k)
    best, best_saved = None, False
    if dist.is_main:
        if start == 0:
            metrics_path.unlink(missing_ok=True)
            first = {"step": 0, **evaluate(model, held_out, trie, args, pop)}
            append_metrics(metrics_path, first)
            atomic_write_bytes(best_path, checkpoint_data(model, opt, gen, 0, args.stage))
            best, best_saved = first, True
        else:
            best, best_saved = resume_best(read_metrics(metrics_path), key, start, ckpt, best_path)
    if dist.enabled:
        # the step's global batch: the same indices on every rank, this rank's contiguous slice
        own = distributed.shard(args.batch_size, dist)
        # find_unused_parameters: with --value-coef 0 the HTE heads (and switched-off parts) get no gradients
        ddp = torch.nn.parallel.DistributedDataParallel(_MTPStep(model, args.value_trunk), find_unused_parameters=True)
        distributed.barrier(dist)
    show = args.progress and dist.is_main
    bar = tqdm(range(start, args.steps), desc=f"pretrain {args.stage}", disable=not show)
    t0, loss = time.perf_counter(), torch.zeros(())
    for step in bar:
        idx = torch.randint(0, len(train), (args.batch_size,), generator=gen, device=args.device)
        if not dist.enabled:
            tokens, codes, masks, weights, values = train.rows(idx)
            out_loss = model.mtp_loss(tokens, codes, weights, masks, gen, value_target=_value_target(
                model, values, args.value_coef), value_coef=args.value_coef, value_trunk=args.value_trunk)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            out_loss.loss.backward()
            opt.step()
            loss = out_loss.loss.detach()
            loss_mtp, loss_refine = out_loss.loss_mtp.detach(), out_loss.loss_refine.detach()
            loss_value = out_loss.loss_value.detach()
        else:
            tokens, codes, masks, weights, values = train.rows(idx[own])
            with distributed.global_row_draws(gen, own.stop - own.start, dist):
                loss_mtp, loss_refine, loss_value = ddp(tokens, codes, weights, masks, gen,
                                                        _value_target(model, values, args.value_coef))  # fmt: skip
            # mtp_loss averages the refiner and value losses over their rows with a target; rescaled to this
            # rank's share of the global count, DDP's average over ranks is the global-batch loss
            n_has = _has_target(codes).sum().clamp_min(1)
            n_all = _has_target(train.codes[idx]).sum().clamp_min(1)
            loss_refine = loss_refine * (dist.world_size * n_has / n_all)
            v_has = (_has_target(codes) & values.isfinite()).sum().clamp_min(1)
            v_all = (_has_target(train.codes[idx]) & train.values[idx].isfinite()).sum().clamp_min(1)
            loss_value = loss_value * (dist.world_size * v_has / v_all)
            loss = loss_mtp + loss_refine + args.value_coef * loss_value
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_mtp, loss_refine, loss = loss_mtp.detach(), loss_refine.detach(), loss.detach()
            loss_value = loss_value.detach()
        done, improved = step + 1, False
        is_eval = done % args.eval_every == 0 or done == args.steps
        is_ckpt = done % args.checkpoint_every == 0 or done == args.steps
        if is_eval:
            train_terms = {"train/loss": float(loss), "train/loss_mtp": float(loss_mtp),
                           "train/loss_refine": float(loss_refine), "train/loss_value": float(loss_value)}  # fmt: skip
            train_terms = distributed.all_reduce_mean(train_terms, dist)  # global; every rank takes part
            if dist.is_main:
                row = {"step": done, **train_terms,
                       "perf/steps_per_s": (done - start) / (time.perf_counter() - t0),
                       **evaluate(model, held_out, trie, args, pop)}  # fmt: skip
                append_metrics(metrics_path, row)
                bar.set_postfix(loss=f"{row['train/loss']:.3f}", eval=f"{row['eval/loss']:.3f}")
                improved = best is None or row[key] > best[key]  # ties keep the earlier evaluation
                best = row if improved else best
        if dist.is_main and (is_ckpt or improved):
            data = checkpoint_data(model, opt, gen, done, args.stage)
            atomic_write_bytes(ckpt, data)  # first: best.pt is never ahead of the resumable state
            if improved:
                atomic_write_bytes(best_path, data)
                best_saved = True
        if dist.enabled and (is_eval or is_ckpt):
            distributed.barrier(dist)  # the other ranks wait for rank 0's evaluation and writes

    if not dist.is_main:
        distributed.barrier(dist)  # rank 0 writes summary.json
        return read_json(summary_path)
    rows = read_metrics(metrics_path)
    selected = ckpt
    if args.select == "best":
        if best_saved:
            selected = best_path
        else:
            print(f"{out}: --select best but no best.pt holds the best step: selecting {ckpt}")
    best_info = None if best is None else {
        "step": best["step"], "metric": key, "value": best[key],
        "checkpoint": str(best_path) if best_saved else None, "metrics": best,
    }  # fmt: skip
    summary = {"stage": args.stage, "steps": args.steps, "train_requests": len(train),
               "eval_requests": len(held_out), "initial": rows[0], "final": rows[-1], "best": best_info,
               "select": args.select, "selected_checkpoint": str(selected), "value_scale": scale}  # fmt: skip
    write_json(summary_path, summary)
    distributed.barrier(dist)
    k = args.top_k
    fin = rows[-1]
    print(f"{out}: eval/loss {rows[0]['eval/loss']:.3f} -> {fin['eval/loss']:.3f}  "
          f"hitrate@{k} {fin[f'eval/hitrate@{k}']:.3f} (popularity {fin[f'eval/pop_hitrate@{k}']:.3f})  "
          f"ndcg@{k} {fin[f'eval/ndcg@{k}']:.3f} (popularity {fin[f'eval/pop_ndcg@{k}']:.3f})")  # fmt: skip
    return summary


if __name__ == "__main__":
    run_main(main)
