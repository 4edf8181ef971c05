"""The platform's learned funnel: pCTR and pCVR models trained on its own logs, over the platform view only.

A real platform ranks ads with click and conversion models learned from logged impressions; it never
reads a user's latent interest or an ad's hidden quality. ``FunnelModel`` is that estimator: its inputs
are the request observation (``gpr_sim.world.core.observe``) and the ``Catalog`` (``gpr_sim.platform.view``),
nothing else, so perturbing any hidden field of the world or the session leaves its output unchanged.

Inputs per (request, candidate ad):

| group | features |
|---|---|
| user | profile features (the U token); counts of impressions, clicks and conversions in the ad history |
| context | the E token: feed position, hour sin/cos, ad load, session progress, device one-hot |
| interest | ``estimate_interest`` (the profile the platform estimates from the O/I history) |
| ad | content embedding, an ad-id embedding (hashed into ``ad_buckets``), advertiser industry embedding, log bid, new flag, age, log mean order value (the numbers standardised over the catalog) |
| cross | cosine match of the estimated interest and the ad, and their elementwise product |
| slot | the slot the ad is shown in (0 = top; scoring asks for slot 0) |

The ad-id embedding lets the model learn the click rate of often-shown ads beyond what their content
says (their creative quality, in effect); an ad the log rarely shows keeps a near-zero embedding and is
predicted from its content and advertiser only: the realistic cold start.

Two heads, one trunk. CTR is learned on impressions, CVR on clicks only, which are ~10x fewer; sharing
the trunk (as ESMM does) lets the CVR head reuse the user / ad representation the far more numerous
click labels train, instead of fitting a second network on a tenth of the data. Each head is its own
linear layer on the trunk, so the two can weigh the shared features differently (click and conversion
depend on different things: creative quality versus the user's propensity to buy).

Labels (``funnel_examples``): one example per impression (any slot), labelled with its click; the clicked
ones again for the CVR head, labelled with their conversion. Both come from the session's *next*
observation: its ad history records every impression of the request with its deepest funnel event
(``EVENT_CLICK``, ``EVENT_CONVERSION``) as soon as it happens, also when the log's ``conversion`` column
reports a delayed conversion only at a later request (as ``delayed_conversion``, which does not say whose
it was). So a delayed conversion still belongs to its click: the labels are those of a platform whose
attribution window has closed. A platform that trains before its window closes would see some
conversions as negatives; that label noise is not modelled here. The next observation is the next row of
the same session (``episode_id``, ``step + 1``) or the row's ``final_*`` columns where the session ended
or the log stopped; a row with neither (a log without the optional ``final_*`` columns) gives no examples
and is counted as ``unlabelled``. Clicks read this way must equal the log's ``click`` column: a log where
they do not is refused.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from gpr_sim.data.logs import stack_list_column
from gpr_sim.finite import FirstNonFinite
from gpr_sim.metrics import classifier_report
from gpr_sim.platform.view import Catalog, estimate_interest
from gpr_sim.runs import load_torch, save_torch
from gpr_sim.tokenizer.world import world_fingerprint
from gpr_sim.world.catalog import World
from gpr_sim.world.config import check_range
from gpr_sim.world.core import CONTEXT_DIM
from gpr_sim.world.funnel import Probabilities, platform_probabilities
from gpr_sim.world.state import EVENT_CLICK, EVENT_CONVERSION, EVENT_IMPRESSION

FILE_FORMAT = "gpr_sim.platform.funnel"
FILE_VERSION = 1
REQUEST_KEYS = ("user_id", "user", "organic", "context", "ad_history", "ad_events")
"""the observation keys (``gpr_sim.world.core.observe``) a request carries; the model reads all but ``user_id``"""


@dataclass(frozen=True)
class FunnelConfig:
    """Sizes and training of the pCTR / pCVR model, fixed before looking at any result.

    The truth is a logistic function of a handful of signals (interest match, creative quality, position,
    fatigue, hour; the user's propensity for conversions), so a two-layer MLP of 64 units has room for the
    match interactions and the per-ad offsets while training in seconds on a CPU log of ~10^4 impressions.
    The ad-id table has 2^16 buckets: every ad of the small preset (500) has its own, the large preset's
    1M ads share ~15 per bucket (their often-shown members dominate a bucket's gradient). Training is Adam
    with decoupled weight decay (AdamW; torch's default decay 0.01 keeps the embeddings of rarely shown
    ads small) at lr 2e-3, batches of 256 impressions, and only two passes: click models with id
    embeddings overfit from the second pass on (the "one-epoch phenomenon" of production CTR models), and
    a CPU log has few clicks per ad. A fifth of the sessions is held out.
    """

    hidden: int = 64
    """width of the shared trunk"""
    layers: int = 2
    """hidden layers of the shared trunk"""
    ad_buckets: int = 1 << 16
    """rows of the ad-id embedding table (ad id modulo this)"""
    ad_id_dim: int = 8
    """width of the ad-id embedding"""
    industry_dim: int = 4
    """width of the advertiser-industry embedding"""
    epochs: int = 2
    """passes over the training impressions"""
    batch_size: int = 256
    """impressions per step (the CVR loss takes the clicked ones among them)"""
    lr: float = 2e-3
    """Adam learning rate"""
    weight_decay: float = 0.01
    """decoupled weight decay (AdamW)"""
    val_fraction: float = 0.2
    """share of sessions (``episode_id``) held out for the report"""
    seed: int = 0
    """seed of the initialisation, the split and the batch order"""

    def __post_init__(self) -> None:
        check_range("hidden", self.hidden, 1, 1 << 16)
        check_range("layers", self.layers, 1, 64)
        check_range("ad_buckets", self.ad_buckets, 1, 1 << 26)
        check_range("ad_id_dim", self.ad_id_dim, 1, 1024)
        check_range("industry_dim", self.industry_dim, 1, 1024)
        check_range("epochs", self.epochs, 1, 1 << 20)
        check_range("batch_size", self.batch_size, 1, 1 << 24)
        check_range("lr", self.lr, 0.0, 10.0, lo_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, 10.0)
        check_range("val_fraction", self.val_fraction, 0.0, 1.0, lo_open=True)
        check_range("seed", self.seed, 0, 1 << 63)
        for name in ("hidden", "layers", "ad_buckets", "ad_id_dim", "industry_dim", "epochs", "batch_size"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected an integer")
        if self.val_fraction >= 1.0:
            raise ValueError(
                f"val_fraction={self.val_fraction!r} is out of range: expected a number in (0, 1)"
            )


@dataclass(frozen=True)
class CatalogSpec:
    """What a model must know of the catalog it was built for: sizes and the embedding fingerprint."""

    num_ads: int
    emb_dim: int
    num_industries: int
    user_dim: int
    fingerprint: str

    @classmethod
    def of(cls, catalog: Catalog) -> CatalogSpec:
        return cls(
            num_ads=catalog.num_ads,
            emb_dim=catalog.emb_dim,
            num_industries=int(catalog.advertiser_industry.max()) + 1,
            user_dim=catalog.user_features.shape[1],
            fingerprint=world_fingerprint(catalog),  # reads organic_emb and ad_emb only
        )

    def mismatch(self, catalog: Catalog) -> str | None:
        """Why ``catalog`` is not this one (sizes first, then the fingerprint), or None."""
        if (catalog.num_ads, catalog.emb_dim) != (self.num_ads, self.emb_dim):
            return (
                f"the model was trained on a catalog of {self.num_ads} ads with {self.emb_dim}-d embeddings, "
                f"this catalog has {catalog.num_ads} ads with {catalog.emb_dim}-d embeddings"
            )
        theirs = world_fingerprint(catalog)
        if theirs != self.fingerprint:
            return (
                f"the model was trained on another catalog (fingerprint {self.fingerprint}, this one {theirs}): "
                f"same sizes but a different world_seed or config?"
            )
        return None


def history_counts(ad_events: torch.Tensor) -> torch.Tensor:
    """(N, Hi) history events -> (N, 3) shares of the history slots that hold an impression, a click, a
    conversion (the observable trace of the user's ad load, click and buying habits)."""
    hi = ad_events.shape[1]
    levels = torch.tensor([EVENT_IMPRESSION, EVENT_CLICK, EVENT_CONVERSION], device=ad_events.device)
    return (ad_events[:, :, None] >= levels).float().sum(1) / hi


class FunnelModel(nn.Module):
    """pCTR (given an impression) and pCVR (given a click) of candidate ads, from the platform view only.

    Args:
        config: sizes (``FunnelConfig``).
        catalog: the catalog it serves (its sizes, the standardisation of bids, order values and ages, and
            its fingerprint are kept: ``check_catalog``).
    """

    def __init__(self, config: FunnelConfig, catalog: Catalog | CatalogSpec) -> None:
        super().__init__()
        spec = catalog if isinstance(catalog, CatalogSpec) else CatalogSpec.of(catalog)
        self.config, self.spec = config, spec
        d = spec.emb_dim
        self.ad_id = nn.Embedding(config.ad_buckets, config.ad_id_dim)
        self.industry = nn.Embedding(spec.num_industries, config.industry_dim)
        nn.init.normal_(self.ad_id.weight, std=0.01)  # unseen ads start at ~0: content features decide
        nn.init.normal_(self.industry.weight, std=0.01)
        request_dim = spec.user_dim + CONTEXT_DIM + 3 + d  # user, context, history counts, interest
        ad_dim = d + config.ad_id_dim + config.industry_dim + 4  # content, ids, log bid/value, new, age
        layers, width = [], request_dim + ad_dim + 1 + d + 1  # + match, interest * content, slot
        for _ in range(config.layers):
            layers += [nn.Linear(width, config.hidden), nn.ReLU()]
            width = config.hidden
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.Linear(width, 2)  # click logit, conversion logit
        # standardisation of the catalog's numbers (buffers: saved with the weights)
        for name in ("log_bid_mean", "log_bid_std", "log_value_mean", "log_value_std", "max_age"):
            self.register_buffer(name, torch.zeros(()))
        if isinstance(catalog, Catalog):
            log_bid, log_value = torch.log(catalog.ad_bid.float()), torch.log(catalog.ad_value_mean.float())
            with torch.no_grad():
                self.log_bid_mean.copy_(log_bid.mean())
                self.log_bid_std.copy_(log_bid.std().clamp(min=1e-6) if log_bid.numel() > 1 else 1.0)
                self.log_value_mean.copy_(log_value.mean())
                self.log_value_std.copy_(log_value.std().clamp(min=1e-6) if log_value.numel() > 1 else 1.0)
                self.max_age.copy_(catalog.ad_age_days.float().max().clamp(min=1.0))

    def check_catalog(self, catalog: Catalog) -> None:
        """Raise ``ValueError`` unless ``catalog`` is the one this model was trained on (sizes, fingerprint)."""
        why = self.spec.mismatch(catalog)
        if why is not None:
            raise ValueError(why)

    def logits(
        self,
        catalog: Catalog,
        request: dict[str, torch.Tensor],
        ads: torch.Tensor,
        slot: torch.Tensor | int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(click logit, conversion logit, match), (N, K) each, for ads (N, K) in [0, num_ads).

        ``slot``: int or (N, K) slot positions of the ads.
        """
        if (catalog.num_ads, catalog.emb_dim) != (self.spec.num_ads, self.spec.emb_dim):
            raise ValueError(self.spec.mismatch(catalog))
        n, k = ads.shape
        interest = estimate_interest(
            catalog, request["organic"], request["ad_history"], request["ad_events"]
        )  # (N, D)
        req = torch.cat(
            [
                request["user"].float(),
                request["context"].float(),
                history_counts(request["ad_events"]),
                interest,
            ],
            dim=1,
        )  # (N, R)
        emb = catalog.ad_emb[ads]  # (N, K, D)
        match = torch.einsum("nd,nkd->nk", interest, emb)  # cosine: both unit norm (or a zero interest)
        industry = catalog.advertiser_industry[catalog.ad_advertiser[ads]]
        numbers = torch.stack(
            [
                (torch.log(catalog.ad_bid[ads].float()) - self.log_bid_mean) / self.log_bid_std,
                (torch.log(catalog.ad_value_mean[ads].float()) - self.log_value_mean) / self.log_value_std,
                catalog.ad_is_new[ads].float(),
                catalog.ad_age_days[ads].float() / self.max_age,
            ],
            dim=-1,
        )  # (N, K, 4)
        slot_f = torch.as_tensor(slot, dtype=torch.float32, device=ads.device).expand(n, k)
        x = torch.cat(
            [
                req[:, None, :].expand(n, k, req.shape[1]),
                emb,
                self.ad_id(ads % self.config.ad_buckets),
                self.industry(industry),
                numbers,
                match[..., None],
                interest[:, None, :] * emb,
                slot_f[..., None],
            ],
            dim=-1,
        )  # (N, K, F)
        out = self.heads(self.trunk(x))  # (N, K, 2)
        return out[..., 0], out[..., 1], match

    def forward(
        self,
        catalog: Catalog,
        request: dict[str, torch.Tensor],
        ads: torch.Tensor,
        slot: torch.Tensor | int = 0,
    ) -> Probabilities:
        """``Probabilities`` (p_click given an impression, p_conversion given a click, match), (N, K) each.

        Args:
            catalog: the platform's catalog (``catalog_of(world)``), on the model's device.
            request: the observation of N requests (keys of ``gpr_sim.world.core.observe``).
            ads: (N, K) int64 ad ids in [0, num_ads).
            slot: the slot the ads would be shown in (0 = top, as ``gpr_sim.world.core.score`` values them).
        """
        ctr, cvr, match = self.logits(catalog, request, ads, slot)
        return Probabilities(torch.sigmoid(ctr), torch.sigmoid(cvr), match)


# ----------------------------------------------------------------------------- examples from a log


class FunnelExamples(NamedTuple):
    """One row per logged impression (E of them): its request, ad, slot and labels."""

    request: dict[str, torch.Tensor]  # REQUEST_KEYS, (E, ...) each
    ad: torch.Tensor  # (E,) int64
    slot: torch.Tensor  # (E,) int64
    click: torch.Tensor  # (E,) float 0/1
    conversion: torch.Tensor  # (E,) float 0/1 (0 unless clicked)
    episode: torch.Tensor  # (E,) int64 session of the request
    row: torch.Tensor  # (E,) int64 row of the log
    unlabelled: int  # log rows with impressions but no next observation (no examples)

    def take(self, index: torch.Tensor) -> FunnelExamples:
        return FunnelExamples(
            {k: v[index] for k, v in self.request.items()},
            self.ad[index],
            self.slot[index],
            self.click[index],
            self.conversion[index],
            self.episode[index],
            self.row[index],
            self.unlabelled,
        )


def _next_observation(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ad ids, events, has) of the observation after each row: the session's next row, else ``final_*``."""
    ep, st = df["episode_id"].to_numpy(), df["step"].to_numpy()
    ids, events = stack_list_column(df, "ad_ids"), stack_list_column(df, "ad_events")
    order = np.lexsort((st, ep))
    follows = (ep[order][1:] == ep[order][:-1]) & (st[order][1:] == st[order][:-1] + 1)
    nxt = np.full(len(df), -1, dtype=np.int64)
    nxt[order[:-1][follows]] = order[1:][follows]
    has = nxt >= 0
    after_ids, after_events = ids[np.maximum(nxt, 0)], events[np.maximum(nxt, 0)]
    if "final_ad_ids" in df.columns and "final_ad_events" in df.columns:
        fin = df["final_ad_ids"].notna().to_numpy() & ~has
        if fin.any():
            after_ids[fin] = np.stack(df["final_ad_ids"].to_numpy()[fin])
            after_events[fin] = np.stack(df["final_ad_events"].to_numpy()[fin])
            has = has | fin
    return after_ids, after_events, has


def funnel_examples(df: pd.DataFrame, catalog: Catalog) -> FunnelExamples:
    """The labelled impressions of a log (``gpr_sim.data.logs``; module doc: Labels), on the CPU.

    Raises:
        ValueError: if the log names ads outside the catalog, or its next observations disagree with its
            ``shown_ad`` / ``click`` columns (rows named).
    """
    shown = stack_list_column(df, "shown_ad")  # (n, S), -1 = no impression
    if shown.size and int(shown.max()) >= catalog.num_ads:
        raise ValueError(f"log shows ad {int(shown.max())}, but the catalog has {catalog.num_ads} ads")
    after_ids, after_events, has = _next_observation(df)
    hi = after_ids.shape[1]
    imp = shown >= 0
    n_imp = imp.sum(1, keepdims=True)
    pos = hi - n_imp + np.cumsum(imp, axis=1) - 1  # where each impression sits in the next history
    keep = imp & has[:, None] & (pos >= 0)
    rows, slots = np.nonzero(keep)
    p = pos[rows, slots]
    if (after_ids[rows, p] != shown[rows, slots]).any():
        bad = np.unique(rows[after_ids[rows, p] != shown[rows, slots]])[:5].tolist()
        raise ValueError(f"log rows {bad}: the next observation's ad history does not end with the shown ads")
    event = after_events[rows, p]
    click = event >= EVENT_CLICK
    logged = df["click"].to_numpy()
    counted = np.bincount(rows, weights=click, minlength=len(df)).astype(np.int64)
    full = keep.sum(1) == imp.sum(1)  # rows whose every impression is labelled
    if (counted[full] != logged[full]).any():
        bad = np.flatnonzero(full & (counted != logged))[:5].tolist()
        raise ValueError(f"log rows {bad}: clicks in the next observation differ from the click column")
    request = {
        "user_id": torch.as_tensor(df["user_id"].to_numpy()[rows]),
        "user": torch.as_tensor(stack_list_column(df, "user_features")[rows]).float(),
        "organic": torch.as_tensor(stack_list_column(df, "organic_ids")[rows]),
        "context": torch.as_tensor(stack_list_column(df, "context")[rows]).float(),
        "ad_history": torch.as_tensor(stack_list_column(df, "ad_ids")[rows]),
        "ad_events": torch.as_tensor(stack_list_column(df, "ad_events")[rows]),
    }
    return FunnelExamples(
        request=request,
        ad=torch.as_tensor(shown[rows, slots]),
        slot=torch.as_tensor(slots, dtype=torch.int64),
        click=torch.as_tensor(click, dtype=torch.float32),
        conversion=torch.as_tensor(event == EVENT_CONVERSION, dtype=torch.float32),
        episode=torch.as_tensor(df["episode_id"].to_numpy()[rows]),
        row=torch.as_tensor(rows, dtype=torch.int64),
        unlabelled=int((imp.any(1) & ~has).sum()),
    )


def split_sessions(episode: torch.Tensor, val_fraction: float, seed: int) -> torch.Tensor:
    """(E,) bool: the examples of a random ``val_fraction`` of the sessions (at least one, if any)."""
    sessions = torch.unique(episode)
    gen = torch.Generator().manual_seed(seed)
    n_val = max(1, round(val_fraction * sessions.numel())) if sessions.numel() > 1 else 0
    held = sessions[torch.randperm(sessions.numel(), generator=gen)[:n_val]]
    return torch.isin(episode, held)


# ----------------------------------------------------------------------------- training and the report


def _to(ex: FunnelExamples, device: torch.device) -> FunnelExamples:
    return ex._replace(
        request={k: v.to(device) for k, v in ex.request.items()},
        ad=ex.ad.to(device),
        slot=ex.slot.to(device),
        click=ex.click.to(device),
        conversion=ex.conversion.to(device),
    )


def predict(
    model: FunnelModel, catalog: Catalog, ex: FunnelExamples, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E,) pCTR and pCVR of the examples' ads at their slots, on the CPU (no grad, in chunks)."""
    p_click, p_conv = [], []
    with torch.no_grad():
        for start in range(0, ex.ad.numel(), chunk):
            sl = slice(start, start + chunk)
            req = {k: v[sl] for k, v in ex.request.items()}
            pr = model(catalog, req, ex.ad[sl, None], ex.slot[sl, None])
            p_click.append(pr.p_click[:, 0].cpu())
            p_conv.append(pr.p_conversion[:, 0].cpu())
    empty = torch.zeros(0)
    return (torch.cat(p_click) if p_click else empty), (torch.cat(p_conv) if p_conv else empty)


def _rates(p_click, p_conv, val: FunnelExamples) -> dict[str, dict]:
    clicked = val.click.cpu().numpy() > 0
    return {
        "ctr": classifier_report(np.asarray(p_click), val.click.cpu().numpy()),
        "cvr": classifier_report(np.asarray(p_conv)[clicked], val.conversion.cpu().numpy()[clicked]),
    }


def funnel_report(
    model: FunnelModel,
    catalog: Catalog,
    train: FunnelExamples,
    val: FunnelExamples,
    df: pd.DataFrame,
    world: World | None = None,
) -> dict:
    """Held-out AUC, log-loss and calibration of pCTR (on impressions) and pCVR (on clicks).

    Beside the learned model: a constant predictor (the training base rate), the privileged estimator
    (``platform_probabilities``: the simulator's own form on hidden fields) when ``world`` is given, and
    the truth (the log's ``p_click`` / ``p_conversion``) when every held-out impression is in slot 0 (the
    only slot the log records them for). Same held-out rows for all.
    """
    n = val.ad.numel()
    base_click = float(train.click.mean())
    base_conv = float(train.conversion[train.click > 0].mean())
    val_cpu = val._replace(click=val.click.cpu(), conversion=val.conversion.cpu())
    p_click, p_conv = predict(model, catalog, val)
    estimators = {
        "learned": (p_click, p_conv),
        "constant": (torch.full((n,), base_click), torch.full((n,), base_conv)),
    }
    if world is not None:
        ads, slot = val.ad.to(world.device)[:, None], val.slot.to(world.device)[:, None]
        pr = platform_probabilities(world, ads, val.request["user_id"].to(world.device), slot)
        estimators["privileged"] = (pr.p_click[:, 0].cpu(), pr.p_conversion[:, 0].cpu())
    if n and bool((val.slot == 0).all()):
        rows = val.row.cpu().numpy()
        estimators["truth"] = (df["p_click"].to_numpy()[rows], df["p_conversion"].to_numpy()[rows])
    per = {name: _rates(pc, pv, val_cpu) for name, (pc, pv) in estimators.items()}
    return {
        "examples": {
            "train_impressions": int(train.ad.numel()),
            "train_clicks": int(train.click.sum()),
            "val_impressions": n,
            "val_clicks": int(val.click.sum()),
            "val_conversions": int(val.conversion.sum()),
            "val_sessions": int(torch.unique(val.episode).numel()),
            "unlabelled_rows": train.unlabelled,
        },
        "ctr": {name: r["ctr"] for name, r in per.items()},
        "cvr": {name: r["cvr"] for name, r in per.items()},
    }


def fit_funnel(
    df: pd.DataFrame,
    catalog: Catalog,
    cfg: FunnelConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    world: World | None = None,
) -> tuple[FunnelModel, dict]:
    """Train pCTR / pCVR on a log (AdamW on the two BCE losses) and report them on held-out sessions.

    Each step takes ``batch_size`` training impressions: the click loss is their mean BCE, the conversion
    loss the mean BCE over the clicked ones among them (each click is seen once per pass, like each
    impression); the two are summed.
    The heads start at the logit of the training base rates, so step 0 is the constant predictor.

    Args:
        df: a log (``gpr_sim.data.logs.read_logs``) of the catalog's world.
        catalog: the platform's catalog (``catalog_of(world)``).
        cfg: sizes and training (default ``FunnelConfig()``).
        device: where to train.
        progress: show a tqdm bar over epochs.
        world: the simulator's world, only to report the privileged estimator beside the model (it never
            reaches training).

    Returns:
        (model in eval mode on ``device``, report): ``funnel_report``, plus ``config`` and ``train_loss``
        (the mean loss of the last epoch).

    Raises:
        ValueError: if the training sessions hold no impression, no click or no non-click (nothing to learn).
        gpr_sim.finite.NonFiniteError: if a batch's loss is NaN or inf (named at the end of its epoch).
    """
    cfg = cfg or FunnelConfig()
    device = torch.device(device)
    examples = funnel_examples(df, catalog)
    held = split_sessions(examples.episode, cfg.val_fraction, cfg.seed)
    train = _to(examples.take(torch.nonzero(~held).squeeze(1)), device)
    val = _to(examples.take(torch.nonzero(held).squeeze(1)), device)
    clicks = torch.nonzero(train.click > 0).squeeze(1)
    n_train, n_click = train.ad.numel(), clicks.numel()
    if n_train == 0 or n_click == 0 or n_click == n_train:
        raise ValueError(
            f"the log's training sessions hold {n_train} impressions and {n_click} clicks: pCTR/pCVR need "
            f"impressions with and without clicks (collect a longer log)"
        )
    catalog = catalog.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # nn init reads the global generator: seed it, then restore it
        torch.manual_seed(cfg.seed)
        model = FunnelModel(cfg, catalog)
    model = model.to(device)
    base_click = train.click.mean().clamp(1e-4, 1 - 1e-4)
    base_conv = train.conversion[clicks].mean().clamp(1e-4, 1 - 1e-4)
    with torch.no_grad():
        model.heads.bias.copy_(torch.logit(torch.stack([base_click, base_conv])))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    epoch_loss = torch.zeros((), device=device)
    bar = tqdm(range(cfg.epochs), desc="funnel", disable=not progress, leave=False)
    for epoch in bar:
        epoch_loss = torch.zeros((), device=device)
        order = torch.randperm(n_train, generator=gen).to(device)
        batches = range(0, n_train, cfg.batch_size)
        watch = FirstNonFinite(device)  # a NaN stops the fit; read once per epoch (no sync per batch)
        for batch, start in enumerate(batches):
            idx = order[start : start + cfg.batch_size]
            ctr, cvr, _ = model.logits(catalog, _rows(train, idx), train.ad[idx, None], train.slot[idx, None])
            click = train.click[idx]
            loss = F.binary_cross_entropy_with_logits(ctr[:, 0], click)
            cvr_loss = F.binary_cross_entropy_with_logits(cvr[:, 0], train.conversion[idx], reduction="none")
            loss = loss + (cvr_loss * click).sum() / click.sum().clamp(min=1.0)  # CVR: the batch's clicks
            watch.see(batch, loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += loss.detach()
        watch.check(f"funnel epoch {epoch}", "loss")
        epoch_loss = epoch_loss / len(batches)
        if progress:
            bar.set_postfix(loss=f"{float(epoch_loss):.4f}")  # one sync per epoch, for the bar only
    model.eval()
    report = funnel_report(model, catalog, train, val, df, world)
    report["config"] = asdict(cfg)
    report["train_loss"] = float(epoch_loss)
    return model, report


def _rows(ex: FunnelExamples, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in ex.request.items()}


# ----------------------------------------------------------------------------- files


def save_funnel(model: FunnelModel, path: str | os.PathLike) -> Path:
    """Write the model (weights, ``FunnelConfig``, ``CatalogSpec``) atomically (``gpr_sim.runs.save_torch``)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_torch(
        path,
        FILE_FORMAT,
        FILE_VERSION,
        {"config": asdict(model.config), "catalog": asdict(model.spec), "state_dict": state},
    )


def load_funnel(
    path: str | os.PathLike, device: str | torch.device = "cpu", catalog: Catalog | None = None
) -> FunnelModel:
    """Read a ``save_funnel`` file (safely: no code from the file runs) into an eval-mode model on ``device``.

    Raises:
        ValueError: one line naming ``path``: not a funnel model, another version, a bad config, or (when
            ``catalog`` is given) a model of another catalog (sizes or embedding fingerprint).
    """
    payload = load_torch(
        path, FILE_FORMAT, FILE_VERSION, "a funnel model", ("config", "catalog", "state_dict")
    )
    try:
        model = FunnelModel(FunnelConfig(**payload["config"]), CatalogSpec(**payload["catalog"]))
        model.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a valid funnel model ({str(e).splitlines()[0]})") from None
    if catalog is not None:
        why = model.spec.mismatch(catalog)
        if why is not None:
            raise ValueError(f"{path}: {why}")
    return model.to(device).eval()


__all__ = [
    "CatalogSpec",
    "FunnelConfig",
    "FunnelExamples",
    "FunnelModel",
    "fit_funnel",
    "funnel_examples",
    "funnel_report",
    "history_counts",
    "load_funnel",
    "predict",
    "save_funnel",
    "split_sessions",
]
