"""Offline evaluation of a pre-training stage on its held-out requests, and the best checkpoint so far.

``evaluate`` gives eval/loss, the HTE's eval/loss_value, eval/value_r2 and eval/value_r2_item, and HitRate@K / nDCG@K of MTP
head 0 under trie-constrained beam search (``gpr_sim.model.offline_eval``). ``best.pt`` holds the model of
the evaluation with the highest ``BEST_METRIC``; ``resume_best`` re-derives it when a run resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from agents.pretraining.checkpoint import read_checkpoint
from agents.pretraining.config import PretrainConfig
from agents.pretraining.data import Split
from gpr_sim.model import GPRModel
from gpr_sim.model.hsd import type_segments
from gpr_sim.model.offline_eval import model_rankings, ranking_metrics
from gpr_sim.runs import atomic_write_bytes
from gpr_sim.schema import TokenBatch
from gpr_sim.tokenizer.trie import PrefixTrie


def has_target(codes: torch.Tensor) -> torch.Tensor:
    """Rows whose first head has a target: the rows ``mtp_loss``'s refiner loss averages over."""
    return (codes[:, 0] >= 0).all(-1)


def value_target(model: GPRModel, values: torch.Tensor, coef: float = 1.0) -> torch.Tensor | None:
    """The HTE targets to train on, or None when there is no HTE or its loss is off."""
    return values if model.hte is not None and coef > 0 else None


def target_features(ad_lookup: Callable[[torch.Tensor], torch.Tensor] | None, codes: torch.Tensor):
    """(B, F_ad) platform features of head 0's target ad (``mtp_loss``'s ``value_features``), or None.

    ``ad_lookup``: full paths -> features (``gpr_sim.model.hte.path_ad_features`` bound to the tokenizer and
    the features; ``ad_lookup``), None when the model reads none."""
    return None if ad_lookup is None else ad_lookup(codes[:, 0])


def loss_rows(n: int, limit: int, device) -> torch.Tensor:
    """Indices of the held-out requests the evaluation's losses read: all ``n`` when ``limit`` is 0 or at
    least ``n``, else ``limit`` evenly spaced ones (first and last included), the same at every evaluation."""
    if limit == 0 or limit >= n:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, limit, dtype=torch.float64).round().long().to(device)


@torch.no_grad()
def evaluate(
    model: GPRModel,
    data: Split,
    trie: PrefixTrie,
    cfg: PretrainConfig,
    pop: dict[str, float],
    ad_lookup: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """eval/loss (weighted MTP NLL over all held-out requests) and ranking metrics of head 0 (module doc);
    with the HTE, eval/loss_value (its MSE over every prefix of the held-out shown ads, in value_scale units)
    and eval/value_r2 (1 - that MSE / the variance of the held-out targets: 0 = no better than their mean),
    and eval/value_r2_item, the same of the full item's value alone (depth L', the only one that can read
    the candidate's features; its context draws its own refiner noise). ``ad_lookup``: as in
    ``target_features``."""
    model.eval()
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1)  # same refiner noise every eval
    gen_item = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 2)
    rows = loss_rows(len(data), cfg.eval_loss_requests, cfg.device)
    # sums stay on the device: one host sync per evaluation instead of several per chunk
    zero = torch.zeros((), dtype=torch.float64, device=cfg.device)
    total, sq, sq_item, n_v = zero.clone(), zero.clone(), zero.clone(), zero.clone()
    segments = type_segments(data.tokens.type_ids)  # the slot layout, read once (the typed FFN needs no sort)
    for lo in range(0, rows.numel(), 512):
        idx = rows[lo : lo + 512]
        tokens, codes, masks, weights, values = data.rows(idx)
        out = model.mtp_loss(
            tokens,
            codes,
            weights,
            masks,
            gen,
            value_target=value_target(model, values),
            value_features=target_features(ad_lookup, codes),
            segments=segments,
        )
        total += out.loss_mtp.double() * idx.numel()
        has_v = has_target(codes) & values.isfinite()
        rows_v = has_v.sum()
        n_v += rows_v
        if model.hte is not None:
            sq += out.loss_value.double() * rows_v
            ctx = model.context(tokens, gen_item, segments=segments)
            item = model.values(ctx, codes[:, 0].clamp_min(0), target_features(ad_lookup, codes))[:, -1]
            sq_item += torch.where(has_v, item.double() - values.double(), 0.0).square().sum()
    total, sq, sq_item, n_v = (float(x) for x in torch.stack([total, sq, sq_item, n_v]).cpu())
    total /= rows.numel()
    value_terms = {}
    if model.hte is not None and n_v > 0:
        held = data.values[rows.to(data.values.device)]
        g = held[has_target(data.codes[rows.to(data.codes.device)]) & held.isfinite()].double()
        var = float(g.var(unbiased=False))
        value_terms = {
            "eval/loss_value": sq / n_v,
            "eval/value_r2": 1.0 - sq / n_v / var if var > 0 else float("nan"),
            "eval/value_r2_item": 1.0 - sq_item / n_v / var if var > 0 else float("nan"),
        }
    has = torch.nonzero(data.ads[:, 0] >= 0).squeeze(1)[: cfg.eval_requests]
    tokens = TokenBatch(*(t[has] for t in data.tokens))
    ranked = model_rankings(model, tokens, trie, cfg.top_k, cfg.beam_width, generator=gen)
    ranks = ranking_metrics(ranked, data.ads[has, 0].cpu())
    model.train()
    return {"eval/loss": total, **value_terms, **{f"eval/{k}": v for k, v in ranks.items()}, **pop}


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
    print(
        f"{best_path}: does not hold the best step {best['step']} of {key} (a run from before best.pt?); "
        "it is written again at the next improvement"
    )
    best_path.unlink(missing_ok=True)
    return best, False
