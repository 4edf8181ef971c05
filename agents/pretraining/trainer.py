"""The pre-training loop of one stage (MTP or VAFT) in its run folder: ``pretrain(cfg, dist) -> summary``.

Loop: seed -> data (``agents.pretraining.data``) -> model / AdamW (resume > init > fresh) -> {sample a batch,
``mtp_loss``, step, log, evaluate, checkpoint} -> ``summary.json``. The run folder is opened through
``gpr_sim.runs.RunFolder`` (locked, owned by ``agents.pretrain``, refused with other settings than its own bar
``RESUME_IGNORES``); ``python -m agents.pretrain``'s docstring describes the folder and the data-parallel
mode (every rank draws the same global batch and trains on its contiguous slice of it).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import torch
from tqdm import tqdm

from agents.pretraining.checkpoint import checkpoint_data, load_checkpoint, load_init, load_model_state
from agents.pretraining.config import BEST_METRIC, COMPONENTS, ENTRY, RESUME_IGNORES, PretrainConfig
from agents.pretraining.data import StageData, ensure_inputs, input_paths, load_data
from agents.pretraining.evaluation import (
    checkpoint_step,
    evaluate,
    has_target,
    resume_best,
    target_features,
    value_target,
)
from agents.rl import distributed
from gpr_sim.model import GPRConfig, GPRModel
from gpr_sim.model.gpr import REGIONS
from gpr_sim.model.hsd import type_segments
from gpr_sim.model.hte import path_ad_features
from gpr_sim.model.precision import precision_context
from gpr_sim.platform.features import AD_FEATURE_DIM
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
from gpr_sim.schema import SchemaConfig
from gpr_sim.tokenizer.world import WorldTokenizer


class MTPStep(torch.nn.Module):
    """``GPRModel.mtp_loss`` as a ``forward`` (what ``DistributedDataParallel`` wraps and hooks)."""

    def __init__(self, model: GPRModel, value_trunk: bool) -> None:
        super().__init__()
        self.model, self.value_trunk = model, value_trunk

    def forward(self, tokens, codes, weights, masks, gen, values, features=None, segments=None):
        out = self.model.mtp_loss(
            tokens,
            codes,
            weights,
            masks,
            gen,
            value_target=values,
            value_trunk=self.value_trunk,
            value_features=features,
            segments=segments,
        )
        return out.loss_mtp, out.loss_refine, out.loss_value


def model_config(tok: WorldTokenizer, schema: SchemaConfig, dense_dim: int, cfg: PretrainConfig) -> GPRConfig:
    return GPRConfig(
        level_sizes=tuple(tok.level_sizes),
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        dense_dim=dense_dim,
        platform_features=cfg.platform_features,
        market_features=cfg.market_features,
        max_len=schema.seq_len,
        mtp_heads=cfg.mtp_heads,
        hte_ad_features=AD_FEATURE_DIM if cfg.hte and cfg.platform_features and cfg.hte_ad_features else 0,
        **{name: getattr(cfg, name) for name in COMPONENTS},
    )


def out_dir(cfg: PretrainConfig) -> Path:
    """``--out``, else ``runs/pretrain/{env}__{stage}__{seed}``."""
    return Path(cfg.out or Path("runs/pretrain") / run_name(cfg.env, cfg.stage, cfg.seed))


def open_run_folder(out: Path, cfg: PretrainConfig) -> RunFolder:
    """Lock ``out`` for this run; refuse it (``ValueError``) unless it is new or holds an ``agents.pretrain``
    run with these settings (bar ``RESUME_IGNORES``)."""
    # a record from before --platform-features (--market-features) ran without them: resuming keeps that layout
    before = {"platform_features": False, "hte_ad_features": False, "market_features": False}
    defaults = {**dataclasses.asdict(PretrainConfig()), **before}
    return RunFolder(out, ENTRY, dataclasses.asdict(cfg), RESUME_IGNORES, defaults=defaults)


def pretrain(cfg: PretrainConfig, dist: distributed.Dist = distributed.SINGLE) -> dict:
    """Train one stage into its run folder (``out_dir``); returns the summary (also ``OUT/summary.json``).

    Data-parallel when ``dist`` is (every rank calls it, with its own device in ``cfg``: see
    ``distributed.launch``); every rank returns the summary rank 0 wrote.
    """
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % dist.world_size:
        raise ValueError(
            f"batch_size={cfg.batch_size} is invalid with {dist.world_size} processes: "
            "--batch-size is the global batch and must be a multiple of the world size"
        )
    out = out_dir(cfg)
    with distributed.main_rank_folder(lambda: open_run_folder(out, cfg), dist):
        return train_stage(cfg, dist, out)


def init_model(cfg: PretrainConfig, data: StageData, ckpt: Path, dist: distributed.Dist):
    """Model, optimiser, sampler RNG and the step to start from: resumed from ``ckpt`` > ``cfg.init`` > fresh.

    A resumed run drops the metrics rows logged after its checkpoint (the lost tail of the run).
    """
    torch.manual_seed(cfg.seed)
    model = GPRModel(model_config(data.tok, data.schema, data.dense_dim, cfg)).to(cfg.device)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        fused=torch.device(cfg.device).type == "cuda",
    )  # fused on CUDA: one kernel for every parameter
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    start = 0
    if ckpt.is_file():
        state = load_checkpoint(ckpt, model.cfg)
        if state["stage"] != cfg.stage:
            raise ValueError(
                f"{ckpt}: a {state['stage']} checkpoint, this run is stage {cfg.stage}: use another --out"
            )
        load_model_state(ckpt, model, state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"])
        start = int(state["step"])
        if dist.is_main:
            metrics_path = ckpt.parent / "metrics.jsonl"
            write_metrics(metrics_path, [r for r in read_metrics(metrics_path) if r["step"] <= start])
    elif cfg.init:
        added = load_init(cfg.init, model)
        if added and dist.is_main:
            print(
                f"--init {cfg.init}: the checkpoint predates {added}: loaded with their weights at zero (same outputs)"
            )
    elif cfg.stage == "vaft":
        raise ValueError("stage vaft starts from the MTP checkpoint: pass --init PATH")
    return model, opt, gen, start


def train_stage(cfg: PretrainConfig, dist: distributed.Dist, out: Path) -> dict:
    """The stage in the opened folder ``out`` (``pretrain``): inputs, data, model, the loop, the summary."""
    ckpt, summary_path = out / "checkpoint.pt", out / "summary.json"
    finished = checkpoint_step(ckpt) if ckpt.is_file() else None
    if finished is not None and finished > cfg.steps and summary_path.is_file():
        print(f"{out}: finished at step {finished} > --steps {cfg.steps}; its summary is kept")
        return read_json(summary_path)
    if dist.is_main:
        logs, tok_dir = ensure_inputs(cfg, out)
        if not ckpt.is_file():  # a fresh start; a resumed run keeps the config it started with
            extra = {"world_size": dist.world_size} if dist.enabled else {}
            write_json(
                out / "config.json",
                {**dataclasses.asdict(cfg), "logs_path": str(logs), "tokenizer_path": str(tok_dir), **extra},
            )
    distributed.barrier(dist)
    if not dist.is_main:
        logs, tok_dir = input_paths(cfg, out)
    data = load_data(cfg, logs, tok_dir)
    train, held_out, trie, pop = data.train, data.held_out, data.trie, data.pop
    model, opt, gen, start = init_model(cfg, data, ckpt, dist)
    if cfg.compile != "off":  # in place: the training steps, the evaluation and the checkpoints see one model
        model.compile_regions(("blocks",) if cfg.compile == "blocks" else REGIONS)
    ad_lookup = None  # full paths -> the candidate ad's features, when the HTE reads them
    if model.cfg.hte_ad_features:
        ad_lookup = functools.partial(path_ad_features, data.tok.to(cfg.device), data.features.to(cfg.device))

    metrics_path, best_path = out / "metrics.jsonl", out / "best.pt"
    key = BEST_METRIC.format(k=cfg.top_k)
    best, best_saved = None, False
    if dist.is_main:
        if start == 0:
            metrics_path.unlink(missing_ok=True)
            first = {"step": 0, **evaluate(model, held_out, trie, cfg, pop, ad_lookup)}
            append_metrics(metrics_path, first)
            atomic_write_bytes(best_path, checkpoint_data(model, opt, gen, 0, cfg.stage))
            best, best_saved = first, True
        else:
            best, best_saved = resume_best(read_metrics(metrics_path), key, start, ckpt, best_path)
    if dist.enabled:
        # the step's global batch: the same indices on every rank, this rank's contiguous slice
        own = distributed.shard(cfg.batch_size, dist)
        # find_unused_parameters: with --value-coef 0 the HTE heads (and switched-off parts) get no gradients
        ddp = torch.nn.parallel.DistributedDataParallel(
            MTPStep(model, cfg.value_trunk), find_unused_parameters=True
        )
        distributed.barrier(dist)
    show = cfg.progress and dist.is_main
    bar = tqdm(range(start, cfg.steps), desc=f"pretrain {cfg.stage}", disable=not show)
    t0, loss = time.perf_counter(), torch.zeros(())
    # the log's slot layout, read once: every step's HSD runs the typed FFN per run of slots (no sort)
    segments = type_segments(train.tokens.type_ids)
    for step in bar:
        idx = torch.randint(0, len(train), (cfg.batch_size,), generator=gen, device=cfg.device)
        if not dist.enabled:
            tokens, codes, masks, weights, values = train.rows(idx)
            with precision_context(cfg.device, cfg.precision):  # the forward only; backward outside
                out_loss = model.mtp_loss(
                    tokens,
                    codes,
                    weights,
                    masks,
                    gen,
                    value_target=value_target(model, values, cfg.value_coef),
                    value_coef=cfg.value_coef,
                    value_trunk=cfg.value_trunk,
                    value_features=target_features(ad_lookup, codes),
                    segments=segments,
                )
            opt.zero_grad(set_to_none=True)
            out_loss.loss.backward()
            opt.step()
            loss = out_loss.loss.detach()
            loss_mtp, loss_refine = out_loss.loss_mtp.detach(), out_loss.loss_refine.detach()
            loss_value = out_loss.loss_value.detach()
        else:
            tokens, codes, masks, weights, values = train.rows(idx[own])
            with (
                distributed.global_row_draws(gen, own.stop - own.start, dist),
                precision_context(cfg.device, cfg.precision),
            ):
                loss_mtp, loss_refine, loss_value = ddp(
                    tokens,
                    codes,
                    weights,
                    masks,
                    gen,
                    value_target(model, values, cfg.value_coef),
                    target_features(ad_lookup, codes),
                    segments,
                )
            # mtp_loss averages the refiner and value losses over their rows with a target; rescaled to this
            # rank's share of the global count, DDP's average over ranks is the global-batch loss
            n_has = has_target(codes).sum().clamp_min(1)
            n_all = has_target(train.codes[idx]).sum().clamp_min(1)
            loss_refine = loss_refine * (dist.world_size * n_has / n_all)
            v_has = (has_target(codes) & values.isfinite()).sum().clamp_min(1)
            v_all = (has_target(train.codes[idx]) & train.values[idx].isfinite()).sum().clamp_min(1)
            loss_value = loss_value * (dist.world_size * v_has / v_all)
            loss = loss_mtp + loss_refine + cfg.value_coef * loss_value
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_mtp, loss_refine, loss = loss_mtp.detach(), loss_refine.detach(), loss.detach()
            loss_value = loss_value.detach()
        done, improved = step + 1, False
        is_eval = done % cfg.eval_every == 0 or done == cfg.steps
        is_ckpt = done % cfg.checkpoint_every == 0 or done == cfg.steps
        if is_eval:
            train_terms = {
                "train/loss": float(loss),
                "train/loss_mtp": float(loss_mtp),
                "train/loss_refine": float(loss_refine),
                "train/loss_value": float(loss_value),
            }
            train_terms = distributed.all_reduce_mean(train_terms, dist)  # global; every rank takes part
            if dist.is_main:
                row = {
                    "step": done,
                    **train_terms,
                    "perf/steps_per_s": (done - start) / (time.perf_counter() - t0),
                    **evaluate(model, held_out, trie, cfg, pop, ad_lookup),
                }
                append_metrics(metrics_path, row)
                bar.set_postfix(loss=f"{row['train/loss']:.3f}", eval=f"{row['eval/loss']:.3f}")
                improved = best is None or row[key] > best[key]  # ties keep the earlier evaluation
                best = row if improved else best
        if dist.is_main and (is_ckpt or improved):
            payload = checkpoint_data(model, opt, gen, done, cfg.stage)
            atomic_write_bytes(ckpt, payload)  # first: best.pt is never ahead of the resumable state
            if improved:
                atomic_write_bytes(best_path, payload)
                best_saved = True
        if dist.enabled and (is_eval or is_ckpt):
            distributed.barrier(dist)  # the other ranks wait for rank 0's evaluation and writes

    if not dist.is_main:
        distributed.barrier(dist)  # rank 0 writes summary.json
        return read_json(summary_path)
    summary = write_summary(cfg, out, data, best, best_saved)
    distributed.barrier(dist)
    rows, k = (summary["initial"], summary["final"]), cfg.top_k
    print(
        f"{out}: eval/loss {rows[0]['eval/loss']:.3f} -> {rows[1]['eval/loss']:.3f}  "
        f"hitrate@{k} {rows[1][f'eval/hitrate@{k}']:.3f} (popularity {rows[1][f'eval/pop_hitrate@{k}']:.3f})  "
        f"ndcg@{k} {rows[1][f'eval/ndcg@{k}']:.3f} (popularity {rows[1][f'eval/pop_ndcg@{k}']:.3f})"
    )
    return summary


def write_summary(
    cfg: PretrainConfig, out: Path, data: StageData, best: dict | None, best_saved: bool
) -> dict:
    """``OUT/summary.json`` of a finished stage (rank 0): first and last evaluation, the best one and the
    checkpoint downstream users should load (``--select``); returns it."""
    ckpt, best_path = out / "checkpoint.pt", out / "best.pt"
    rows = read_metrics(out / "metrics.jsonl")
    key = BEST_METRIC.format(k=cfg.top_k)
    selected = ckpt
    if cfg.select == "best":
        if best_saved:
            selected = best_path
        else:
            print(f"{out}: --select best but no best.pt holds the best step: selecting {ckpt}")
    best_info = (
        None
        if best is None
        else {
            "step": best["step"],
            "metric": key,
            "value": best[key],
            "checkpoint": str(best_path) if best_saved else None,
            "metrics": best,
        }
    )
    summary = {
        "stage": cfg.stage,
        "steps": cfg.steps,
        "train_requests": len(data.train),
        "eval_requests": len(data.held_out),
        "initial": rows[0],
        "final": rows[-1],
        "best": best_info,
        "select": cfg.select,
        "selected_checkpoint": str(selected),
        "value_scale": data.scale,
    }
    write_json(out / "summary.json", summary)
    return summary
