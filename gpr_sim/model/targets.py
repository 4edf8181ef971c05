"""MTP targets and VAFT weights from logged requests (GPR §4, stages 1 and 2).

    tgt = mtp_targets(df, num_heads=4)                  # ads (B, N), source rows (B, N), events (B, N)
    codes = target_paths(tgt.ads, tok)                  # (B, N, L') semantic-ID paths, -1 rows = none
    w = vaft_weights(df, tgt)                           # (B, N) value weights, mean 1 over real targets
    g = value_targets(df, tgt, world.ad_value_mean, world.config.reward)  # (B,) HTE target, NaN = none

**Targets.** Head j of request r predicts the j-th ad impression of r's session counted from r onward
(r's own shown ads first, in slot order, then the next requests' by ``step``): head 0 is the ad this
request showed, or the next one the session showed when r's slots stayed empty. A target past the
session's last impression is -1 (no target; the loss skips it).

**VAFT weights.** Each target is weighted by the value of the action it records (GPR §4.2):

| deepest event of the target | raw weight |
|---|---|
| impression | eCPM |
| click | eCPM / pCTR |
| conversion | eCPM / (pCTR * pCVR) |

- eCPM = 1000 x revenue / impressions of the target's request (the GSP price charged per impression);
  pCTR, pCVR = the logged true ``p_click`` and ``p_conversion`` of that request (clamped to >= 1e-3 so a
  rare event cannot take the whole batch).
- The deepest event is the request's (``conversion > 0``, else ``click > 0``, else impression). The log
  sums clicks over slots, so with several slots every ad of a request gets the request's event and
  probabilities (exact in the ``small`` preset, which has one slot).
- Raw weights are divided by their mean over real targets (mean 1), then clipped to [0.1, 10]; after
  clipping the mean is close to, not exactly, 1. Missing targets get weight 0.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from gpr_sim.schema import flatten_cells
from gpr_sim.tokenizer.world import WorldTokenizer
from gpr_sim.world.config import RewardConfig
from gpr_sim.world.reward import expected_weighted_reward

EVENT_IMPRESSION, EVENT_CLICK, EVENT_CONVERSION = 1, 2, 3
MIN_PROB = 1e-3
"""floor of pCTR and pCVR in the VAFT divisors"""
CLIP = (0.1, 10.0)
"""VAFT weights are clipped to this range after normalising to mean 1"""


class MTPTargets(NamedTuple):
    """Per request (in the DataFrame's row order) the next N ad impressions of its session."""

    ads: Tensor  # (B, N) int64 ad index, -1 = no target
    source_row: Tensor  # (B, N) int64 positional row of the request that showed it, -1 = no target


def mtp_targets(df: pd.DataFrame, num_heads: int = 4) -> MTPTargets:
    """Head j of each request = the j-th ad impression of its session from that request onward.

    Args:
        df: logged requests with ``episode_id``, ``step`` and the list column ``shown_ad`` (-1 = empty slot).
        num_heads: N heads.

    Returns:
        ``MTPTargets`` of (B, N) tensors, rows in ``df`` order.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads={num_heads} is invalid: expected >= 1")
    b = len(df)
    episode = df["episode_id"].to_numpy(np.int64)
    order = np.lexsort((df["step"].to_numpy(np.int64), episode))  # rows sorted by (episode, step)
    cells, row_lens = flatten_cells(df["shown_ad"], np.int64)  # every slot, in df row order
    lens = row_lens[order]
    # the slots re-read in sorted row order: session-major, slot order
    first = np.repeat(
        (np.cumsum(row_lens) - row_lens)[order], lens
    )  # each slot's row's first slot in `cells`
    flat = cells[first + np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)]
    flat_pos = np.repeat(np.arange(b), lens)  # sorted position of the request each slot belongs to
    real = flat >= 0
    imp_ad, imp_pos = flat[real], flat_pos[real]  # impressions only, still in session order
    imp_episode = episode[order][imp_pos]
    # the first impression at or after each request, then the next N - 1 of the list
    start = np.searchsorted(imp_pos, np.arange(b), side="left")  # (B,) in sorted order
    idx = start[:, None] + np.arange(num_heads)[None]  # (B, N)
    inside = idx < imp_ad.size
    idx_c = np.minimum(idx, max(imp_ad.size - 1, 0))
    ok = inside & (imp_episode[idx_c] == episode[order][:, None]) if imp_ad.size else np.zeros_like(inside)
    ads_sorted = np.where(ok, imp_ad[idx_c] if imp_ad.size else -1, -1)
    src_sorted = np.where(ok, order[imp_pos[idx_c]] if imp_ad.size else -1, -1)
    ads = np.empty_like(ads_sorted)
    src = np.empty_like(src_sorted)
    ads[order], src[order] = ads_sorted, src_sorted  # back to df row order
    return MTPTargets(torch.as_tensor(ads), torch.as_tensor(src))


def target_paths(ads: Tensor, tok: WorldTokenizer) -> Tensor:
    """(B, N) ad indices (-1 = none) -> (B, N, L') int64 semantic-ID paths, all -1 where there is none."""
    paths = tok.paths_of_ads(ads.clamp_min(0).to(tok.device)).cpu()  # (B, N, L')
    return paths.masked_fill((ads < 0)[..., None], -1)


def vaft_raw_weight(ecpm: Tensor, p_click: Tensor, p_conversion: Tensor, event: Tensor) -> Tensor:
    """Value of one logged action (GPR §4.2), before normalising; all inputs broadcast together.

    impression: eCPM; click: eCPM / pCTR; conversion: eCPM / (pCTR * pCVR) (probabilities floored at
    ``MIN_PROB``).
    """
    ctr = p_click.clamp_min(MIN_PROB)
    cvr = p_conversion.clamp_min(MIN_PROB)
    w = torch.where(event >= EVENT_CLICK, ecpm / ctr, ecpm)
    return torch.where(event >= EVENT_CONVERSION, w / cvr, w)


def normalise_weights(raw: Tensor, valid: Tensor) -> Tensor:
    """Divide by the mean over ``valid`` entries, clip to ``CLIP``; 0 where not valid."""
    n = valid.sum().clamp_min(1)
    mean = torch.where(valid, raw, 0.0).sum() / n
    w = (raw / mean.clamp_min(1e-12)).clamp(*CLIP)
    return torch.where(valid, w, 0.0)


def request_values(df: pd.DataFrame) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per request (B,): eCPM proxy, pCTR, pCVR (float64) and deepest event (int64), see module docstring."""
    imp = df["impression"].to_numpy(np.float64)
    ecpm = 1000.0 * df["revenue"].to_numpy(np.float64) / np.maximum(imp, 1.0)
    event = np.where(
        df["conversion"].to_numpy() > 0,
        EVENT_CONVERSION,
        np.where(df["click"].to_numpy() > 0, EVENT_CLICK, EVENT_IMPRESSION),
    )
    return (
        torch.as_tensor(ecpm),
        torch.as_tensor(df["p_click"].to_numpy(np.float64, copy=True)),
        torch.as_tensor(df["p_conversion"].to_numpy(np.float64, copy=True)),
        torch.as_tensor(event.astype(np.int64)),
    )


def vaft_weights(df: pd.DataFrame, targets: MTPTargets) -> Tensor:
    """(B, N) float32 VAFT weight of every target (module docstring); 0 where there is no target."""
    ecpm, ctr, cvr, event = request_values(df)
    src = targets.source_row.clamp_min(0)
    raw = vaft_raw_weight(ecpm[src], ctr[src], cvr[src], event[src])  # (B, N)
    return normalise_weights(raw, targets.source_row >= 0).float()


def value_targets(
    df: pd.DataFrame, targets: MTPTargets, ad_value_mean: Tensor, reward: RewardConfig
) -> Tensor:
    """(B,) float64 HTE pre-training target: final_value of head 0's ad where this request itself showed it
    in slot 0 and showed nothing else; NaN elsewhere.

    final_value is the scoring API's expected value of the shown ad (``gpr_sim.world.core.score`` under the
    true funnel, given the impression): THE reward formula (``gpr_sim.world.reward.expected_weighted_reward``)
    of the logged price (``revenue``), the logged true ``p_click`` / ``p_conversion``, the ad's mean order
    value and the stay outcome. The log holds no exit probability, so the stay term takes the logged
    outcome (``terminated`` false = stayed), which is unbiased for it and the only noisy term (variance
    ``reward.stay**2 p (1 - p)``; 0 with the default ``stay=0``). It is the rollout's R (``agents.rl.rollout``)
    without the auction's win probability (the ad did win) or the budget share, in the same currency, and
    free of the funnel's sampling noise. Requests with several impressions are left out: the log sums
    their prices over slots and keeps slot 0's probabilities only (the default world has one slot).
    """
    b = len(df)
    ads = targets.ads[:, 0]
    cells, lens = flatten_cells(df["shown_ad"], np.int64)
    if (lens < 1).any():
        raise ValueError(f"shown_ad is empty in row {int(np.argmax(lens < 1))}: expected one entry per slot")
    first = torch.as_tensor(cells[np.cumsum(lens) - lens])  # slot 0 of every request
    own = (targets.source_row[:, 0] == torch.arange(b)) & (first == ads) & (ads >= 0)
    own &= torch.as_tensor(df["impression"].to_numpy(np.int64, copy=True)) == 1
    price = torch.as_tensor(df["revenue"].to_numpy(np.float64, copy=True))
    ctr = torch.as_tensor(df["p_click"].to_numpy(np.float64, copy=True))
    cvr = torch.as_tensor(df["p_conversion"].to_numpy(np.float64, copy=True))
    stayed = torch.as_tensor(~df["terminated"].to_numpy(bool, copy=True)).double()
    value = expected_weighted_reward(
        reward, price, ctr, cvr, ad_value_mean.double().cpu()[ads.clamp_min(0)], stayed
    )
    return torch.where(own, value, torch.nan)


__all__ = [
    "MTPTargets",
    "value_targets",
    "mtp_targets",
    "target_paths",
    "vaft_raw_weight",
    "normalise_weights",
    "request_values",
    "vaft_weights",
    "EVENT_IMPRESSION",
    "EVENT_CLICK",
    "EVENT_CONVERSION",
    "MIN_PROB",
    "CLIP",
]
