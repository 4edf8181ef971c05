"""U/O/E/I token tensors for the model, built the same way from live observations and from logs.

GPR §1: the model reads one typed token per position. Every request becomes the same fixed layout of
``T = 1 + Ho + Hi + 1`` slots (Ho organic, Hi ad history slots), identical for every row:

| slots | type_ids | token_ids | semantic_codes (L') | event_ids | dense_features (F columns) |
|---|---|---|---|---|---|
| 0 | U = 0 | user id | -1 | 0 | user profile (F_u) and, with platform features, the interest estimate (D) |
| 1 .. Ho | O = 1 | global item id = organic index | the item's path | 0 | 0 |
| Ho+1 .. Ho+Hi | I = 3 | global item id = num_organic + ad index | the ad's path | 1 imp, 2 click, 3 conv | with platform features: the ad's features (F_i); else 0 |
| T-1 | E = 2 | -1 (no id) | -1 | 0 | context (F_e) and, with market features, the market's ledger (F_m) |

The dense columns of the blocks are disjoint, so one bias-free linear layer embeds all of them without a
per-type projection (zeros elsewhere):

| layout | columns of ``dense_features`` | F in ads-v0 |
|---|---|---|
| without platform features (``features=None``: checkpoints from before them) | ``[user F_u, context F_e]`` | 7 + 8 = 15 |
| with platform features (``PlatformFeatures``) | ``[user F_u, interest D, ad F_i, context F_e]`` | 7 + D + 6 + 8 (``emb_dim`` = D) |
| + market features (``market=``: the default of new runs, with platform features) | the above, then ``market F_m`` | + 4 (7 + D + 6 + 8 + 4) |

``dense_dim(world_config, platform_features, market_features)`` is that rule; a model's ``GPRConfig.dense_dim``
must equal it (``GPRConfig.platform_features`` and ``GPRConfig.market_features`` record which layout a
checkpoint reads). The market columns come last, so a model without them is the model with them whose
embedding weights of those columns are zero (``GPRConfig.added_zero_widths``). With platform features
(``gpr_sim.platform.features``) the U token carries the platform's interest estimate of the user from the
history the tokens hold (``estimate_interest`` of the cut / padded O and I blocks: zero with no engagement)
and every I token the features of its ad (standardised log bid, new flag, log age, log order value, the
advertiser's log budget share and pacing flag). With market features (``gpr_sim.platform.market``) the E
token also carries the platform's spend ledger at the request (shares of advertisers eligible and throttled
by pacing, the mean spent share of the daily budgets, the budget day's progress): one (F_m,) vector per
request, from the env's ``market_features()`` live and from the log's ``market`` column. Nothing comes from
the simulator's hidden state.

- **Histories** are right-aligned, most recent last: a longer history keeps its last Ho (Hi) entries,
  a shorter one is left-padded. A slot holding -1 in the source (the env pads with -1) is padding too.
- **Padding** slots keep their block's type; they have ``padding_mask`` True (True = ignore, as
  ``key_padding_mask`` in PyTorch), token id -1, codes -1, event 0, zero features. U and E are never
  padding, so every query has a key to attend to.
- **positions** count real tokens only (pads get 0), so the distance between two real tokens does
  not depend on how much padding lies between them.
- **Why E last** (GPR lists the types U, O, E, I; the order is ours): E describes the request being
  answered, so the next ad is predicted from the last slot, which is slot T-1 in every row (batched
  decoding appends there with no gather), and the most recent history sits next to it.
- **Candidates**: the next ad is decoded as a semantic-ID path, so a candidate's own features cannot be
  in the context tokens; ad-side features reach the decision through the I history (what the user was
  shown, with bids and values) only.

Organic items and ads share one id space through the ``SemanticIdTable`` (global id < num_organic is
organic), so an O and an I token embed through the same semantic codes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from gpr_sim.platform.features import AD_FEATURE_DIM, PlatformFeatures
from gpr_sim.platform.market import MARKET_FEATURE_DIM
from gpr_sim.platform.view import rows_of
from gpr_sim.tokenizer.ids import SemanticIdTable
from gpr_sim.tokenizer.rq_kmeans import check_int
from gpr_sim.world.catalog import USER_FEATURE_DIM
from gpr_sim.world.core import CONTEXT_DIM

TYPE_U, TYPE_O, TYPE_E, TYPE_I = 0, 1, 2, 3
TOKEN_TYPES = ("U", "O", "E", "I")
"""type id -> name"""
NO_ID = -1
"""token id / code of tokens without an item (E, padding)"""

OBS_KEYS = ("user_id", "user", "organic", "context", "ad_history", "ad_events")
"""observation keys of ads-v0 (``gpr_sim.world.core.observe``)"""
LOG_COLUMNS = ("user_features", "organic_ids", "context", "ad_ids", "ad_events")
"""required columns of logged rows (``gpr_sim.data.logs``); ``user_id`` is used when present"""
MARKET_COLUMN = "market"
"""the logged market features of each request (``gpr_sim.platform.market``), read with ``market=True``"""


@dataclass(frozen=True)
class SchemaConfig:
    """Block sizes of the token layout (the model's sequence length is ``seq_len``)."""

    organic_len: int = 16
    """Ho: O-token slots (most recent organic items)"""
    ad_len: int = 16
    """Hi: I-token slots (most recent ad impressions)"""

    def __post_init__(self) -> None:
        check_int("organic_len", self.organic_len, 0, 1 << 16)
        check_int("ad_len", self.ad_len, 0, 1 << 16)

    @property
    def seq_len(self) -> int:
        """T = 1 (U) + Ho + Hi + 1 (E)."""
        return 2 + self.organic_len + self.ad_len

    @classmethod
    def from_world(cls, world_config) -> SchemaConfig:
        """Blocks as long as the env's histories (``WorldConfig.organic_history``, ``ad_history``)."""
        return cls(organic_len=world_config.organic_history, ad_len=world_config.ad_history)

    @property
    def blocks(self) -> tuple[tuple[int, int], ...]:
        """``(type, slots)`` of each block, in the layout's order (module docstring)."""
        return ((TYPE_U, 1), (TYPE_O, self.organic_len), (TYPE_I, self.ad_len), (TYPE_E, 1))

    def type_ids(self, device: str | torch.device = "cpu") -> Tensor:
        """(T,) int64 token type of every slot: the layout of the module docstring."""
        # filled on the device: no host-to-device copy (and no sync) per batch
        return torch.cat([torch.full((n,), t, dtype=torch.int64, device=device) for t, n in self.blocks])

    @property
    def segments(self) -> tuple[tuple[int, int, int], ...]:
        """The runs ``(start, end, type)`` of the layout's non-empty blocks: what ``gpr_sim.model.hsd.type_segments``
        reads from any batch of these tokens (every row has this layout), known here without a device sync."""
        runs, start = [], 0
        for t, n in self.blocks:
            if n:
                runs.append((start, start + n, t))
                start += n
        return tuple(runs)


def dense_dim(world_config, platform_features: bool, market_features: bool = False) -> int:
    """F, the dense feature columns of a world's token layout (module docstring): F_u + F_e without platform
    features, F_u + D + F_i + F_e with them (D = ``world_config.emb_dim``), + F_m with market features.
    ``GPRConfig.dense_dim`` of a model for this world must equal it."""
    extra = world_config.emb_dim + AD_FEATURE_DIM if platform_features else 0
    market = MARKET_FEATURE_DIM if market_features else 0
    return USER_FEATURE_DIM + extra + CONTEXT_DIM + market


def check_dense_dim(
    model_dense_dim: int, world_config, platform_features: bool, where: str, market_features: bool = False
) -> None:
    """Raise ``ValueError`` (starting with ``where``) if a model's ``dense_dim`` does not fit the layout."""
    want = dense_dim(world_config, platform_features, market_features)
    if model_dense_dim != want:
        layout = "with" if platform_features else "without"
        market = "with" if market_features else "without"
        raise ValueError(
            f"{where}: model dense_dim={model_dense_dim}, but this world's token layout {layout} platform "
            f"features and {market} market features has F={want} columns (gpr_sim.schema.dense_dim)"
        )


class TokenBatch(NamedTuple):
    """Typed token sequences of B requests (layout in the module docstring)."""

    token_ids: Tensor  # (B, T) int64 user id (U), global item id (O/I), -1 (E, padding)
    type_ids: Tensor  # (B, T) int64 in {U=0, O=1, E=2, I=3}
    positions: Tensor  # (B, T) int64 index among the row's real tokens, 0 at padding
    padding_mask: Tensor  # (B, T) bool, True = padding (ignore)
    semantic_codes: Tensor  # (B, T, L') int64 item paths of O/I tokens, -1 for U/E/padding
    event_ids: Tensor  # (B, T) int64 funnel event of I tokens (1 imp, 2 click, 3 conv), 0 elsewhere
    dense_features: Tensor  # (B, T, F) float32 user (+ interest) on U, ad on I, context (+ market) on E

    def to(self, device: str | torch.device) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in self))


def _fit_history(hist: Tensor, width: int) -> Tensor:
    """(B, H) -> (B, width): keep the last ``width`` entries, or left-pad with -1."""
    b, h = hist.shape
    if h >= width:
        return hist[:, h - width :]
    pad = torch.full((b, width - h), NO_ID, dtype=hist.dtype, device=hist.device)
    return torch.cat([pad, hist], 1)


def build_tokens(
    user_id: Tensor,
    user: Tensor,
    organic: Tensor,
    context: Tensor,
    ad_history: Tensor,
    ad_events: Tensor,
    table: SemanticIdTable,
    cfg: SchemaConfig,
    check: bool = True,
    features: PlatformFeatures | None = None,
    market: Tensor | None = None,
) -> TokenBatch:
    """The one builder both adapters call.

    Args:
        user_id: (B,) int64 user ids.
        user: (B, F_u) user profile features.
        organic: (B, Ho') organic indices, most recent last, -1 = padding.
        context: (B, F_e) request context.
        ad_history: (B, Hi') ad indices, most recent last, -1 = padding.
        ad_events: (B, Hi') int64 deepest funnel event of each history ad.
        table: semantic IDs over [organic; ads], on the inputs' device.
        cfg: block sizes Ho, Hi (histories are cut or padded to them).
        check: raise ``ValueError`` on ids outside the table (one host sync; off in hot loops).
        features: the platform's catalog features on the inputs' device (U: + interest estimate, I: +
            ad features); None = the layout without them (module docstring).
        market: (B, F_m) market features of each request (``gpr_sim.platform.market``), appended to the E
            token's columns; None = the layout without them.

    Returns:
        ``TokenBatch`` with T = cfg.seq_len and F = F_u + F_e, or F_u + D + F_i + F_e with ``features``,
        + F_m with ``market``.
    """
    dev = user_id.device
    if table.item_to_path.device != dev:
        raise ValueError(
            f"table is on {table.item_to_path.device}, inputs on {dev}: call table.to(device) once"
        )
    if features is not None:
        if features.device != dev:
            raise ValueError(
                f"features are on {features.device}, inputs on {dev}: call features.to(device) once"
            )
        if features.num_ads != table.num_ads:
            raise ValueError(f"features describe {features.num_ads} ads, the table {table.num_ads}")
    b = user_id.shape[0]
    for name, t in (
        ("user", user),
        ("organic", organic),
        ("context", context),
        ("ad_history", ad_history),
        ("ad_events", ad_events),
    ):
        if t.dim() != 2 or t.shape[0] != b:
            raise ValueError(f"{name} must be (B, *) with B={b}, got {tuple(t.shape)}")
    if market is not None and tuple(market.shape) != (b, MARKET_FEATURE_DIM):
        raise ValueError(
            f"market must be (B, F_m) = ({b}, {MARKET_FEATURE_DIM}) (gpr_sim.platform.market), "
            f"got {tuple(market.shape)}"
        )
    if ad_events.shape != ad_history.shape:
        raise ValueError(
            f"ad_events {tuple(ad_events.shape)} must match ad_history {tuple(ad_history.shape)}"
        )
    organic = _fit_history(organic.long(), cfg.organic_len)  # (B, Ho)
    ads = _fit_history(ad_history.long(), cfg.ad_len)  # (B, Hi)
    events = _fit_history(ad_events.long(), cfg.ad_len).clamp_min(0)  # (B, Hi), padding event 0
    if check:
        for name, ids, n in (("organic", organic, table.num_organic), ("ad_history", ads, table.num_ads)):
            if ids.numel() and int(ids.max()) >= n:
                raise ValueError(
                    f"{name} holds id {int(ids.max())}: the table has {n} (expected ids < {n} or -1)"
                )

    o_valid, i_valid = organic >= 0, ads >= 0
    o_items = torch.where(o_valid, organic, NO_ID)  # global id = organic index
    i_items = torch.where(i_valid, table.ad_ids(ads), NO_ID)  # global id = num_organic + ad index
    ones = torch.ones(b, 1, dtype=torch.bool, device=dev)
    valid = torch.cat([ones, o_valid, i_valid, ones], 1)  # (B, T)
    no_id = torch.full((b, 1), NO_ID, dtype=torch.int64, device=dev)
    token_ids = torch.cat([user_id.long()[:, None], o_items, i_items, no_id], 1)  # (B, T)

    items = torch.cat([o_items, i_items], 1)  # (B, Ho + Hi)
    paths = rows_of(table.item_to_path, items.clamp_min(0))  # (B, Ho + Hi, L')
    paths = paths.masked_fill((items < 0)[..., None], NO_ID)
    no_path = torch.full((b, 1, table.path_len), NO_ID, dtype=torch.int64, device=dev)
    semantic_codes = torch.cat([no_path, paths, no_path], 1)  # (B, T, L')

    zero = torch.zeros(b, 1, dtype=torch.int64, device=dev)
    event_ids = torch.cat([zero, torch.zeros_like(organic), events * i_valid, zero], 1)  # (B, T)

    fu, fe = user.shape[1], context.shape[1]
    fp = 0 if features is None else features.emb_dim + AD_FEATURE_DIM  # platform columns (interest, ad)
    fm = 0 if market is None else MARKET_FEATURE_DIM  # market columns, last
    dense = torch.zeros(b, cfg.seq_len, fu + fp + fe + fm, dtype=torch.float32, device=dev)  # (B, T, F)
    dense[:, 0, :fu] = user.float()
    dense[:, -1, fu + fp : fu + fp + fe] = context.float()
    if market is not None:
        dense[:, -1, fu + fp + fe :] = market.float()
    if features is not None:
        d, i0 = features.emb_dim, 1 + cfg.organic_len  # interest columns, first I slot
        dense[:, 0, fu : fu + d] = features.interest(organic, ads, events)  # (B, D) from the shown history
        dense[:, i0 : i0 + cfg.ad_len, fu + d : fu + fp] = features.of_ads(ads)  # (B, Hi, F_i), pads 0

    positions = (torch.cumsum(valid.long(), 1) - 1) * valid  # (B, T)
    type_ids = cfg.type_ids(dev).expand(b, -1)
    return TokenBatch(token_ids, type_ids, positions, ~valid, semantic_codes, event_ids, dense)


def _as_tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def tokens_from_obs(
    obs: Mapping[str, Any],
    table: SemanticIdTable,
    cfg: SchemaConfig | None = None,
    check: bool = True,
    features: PlatformFeatures | None = None,
    market: Any = None,
) -> TokenBatch:
    """Tokens of env observations.

    Args:
        obs: ads-v0 observation: batched tensors (``AdsVectorEnv``, ``BatchedMarket``) or one numpy
            observation of ``AdsEnv`` (a batch of one).
        table: semantic IDs over [organic; ads], on the observation's device.
        cfg: block sizes; None = the observation's own history lengths.
        check: validate ids against the table (one host sync).
        features: the platform's catalog features, on the observation's device; None = the layout without
            them (``build_tokens``).
        market: the env's ``market_features()`` when the observation was made, (F_m,) (every request of a
            market shares it) or (B, F_m); None = the layout without market features.
    """
    missing = [k for k in OBS_KEYS if k not in obs]
    if missing:
        raise ValueError(f"observation lacks key(s) {missing}: expected {list(OBS_KEYS)}")
    t = {k: _as_tensor(obs[k]) for k in OBS_KEYS}
    if t["user_id"].dim() == 0:  # a single-env observation: make it a batch of one
        t = {k: v[None] for k, v in t.items()}
    if cfg is None:
        cfg = SchemaConfig(organic_len=t["organic"].shape[1], ad_len=t["ad_history"].shape[1])
    if market is not None:
        market = _as_tensor(market).to(t["context"].device)
        if market.dim() == 1:  # one market for every request
            market = market[None].expand(t["user_id"].shape[0], -1)
    return build_tokens(
        t["user_id"],
        t["user"],
        t["organic"],
        t["context"],
        t["ad_history"],
        t["ad_events"],
        table,
        cfg,
        check,
        features,
        market,
    )


def flatten_cells(cells: Sequence, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """A list column's cells, flattened: (flat values, (B,) int64 lengths), cell i's values (``reshape(-1)``)
    at ``flat[sum(lens[:i]) : sum(lens[:i + 1])]``.

    Logs hold one 1-D numpy array per cell (``gpr_sim.data.logs.read_logs``): those are concatenated in one
    call, with no per-cell conversion (the per-cell way costs seconds per million requests). Any other cells
    (lists, scalars, nested arrays) take the per-cell ``np.asarray(c).reshape(-1)``: the same values.
    """
    cells = cells.to_numpy() if isinstance(cells, pd.Series) else cells
    n = len(cells)
    if n == 0:
        return np.zeros(0, dtype), np.zeros(0, np.int64)
    try:  # 1-D cells: their lengths and values in two C loops
        lens = np.fromiter(map(len, cells), dtype=np.int64, count=n)
        flat = np.concatenate(cells)
        if flat.ndim == 1 and flat.size == lens.sum():  # else some cell was not 1-D
            return flat.astype(dtype, copy=False), lens
    except (TypeError, ValueError):  # scalar cells have no len, ragged nested ones do not concatenate
        pass
    arrays = [np.asarray(c, dtype=dtype).reshape(-1) for c in cells]
    lens = np.fromiter((a.size for a in arrays), dtype=np.int64, count=n)
    return np.concatenate(arrays), lens


def _right_aligned(flat: np.ndarray, lens: np.ndarray, width: int | None) -> np.ndarray:
    """Flattened ragged int lists (``flatten_cells``) -> (B, width) int64, most recent (last) entries kept,
    -1 on the left.

    ``width`` None = the longest list. No Python loop over entries: one scatter.
    """
    width = int(lens.max(initial=0)) if width is None else width
    out = np.full((lens.size, width), NO_ID, dtype=np.int64)
    if lens.sum() == 0 or width == 0:
        return out
    row = np.repeat(np.arange(lens.size), lens)
    start = np.repeat(np.cumsum(lens) - lens, lens)
    col = width - np.repeat(lens, lens) + (np.arange(flat.size) - start)  # right-aligned column
    keep = col >= 0  # entries older than the last ``width`` fall off the left
    out[row[keep], col[keep]] = flat[keep]
    return out


def _dense(cells: Sequence, name: str) -> np.ndarray:
    """Equal-length float lists -> (B, F) float32."""
    flat, lens = flatten_cells(cells, np.float32)
    sizes = np.unique(lens)
    if sizes.size > 1:
        raise ValueError(
            f"column {name!r} must hold equal-length float lists, got lengths {sorted(sizes.tolist())}"
        )
    return flat.reshape(lens.size, int(sizes[0]) if sizes.size else 0)


def tokens_from_logs(
    rows: pd.DataFrame,
    table: SemanticIdTable,
    cfg: SchemaConfig | None = None,
    check: bool = True,
    features: PlatformFeatures | None = None,
    market: bool = False,
) -> TokenBatch:
    """Tokens of logged requests, one per row (the same tensors ``tokens_from_obs`` gives for the obs
    the row was logged from).

    Args:
        rows: DataFrame with list columns ``user_features``, ``organic_ids``, ``context``, ``ad_ids``,
            ``ad_events`` (histories most recent last; -1 entries or shorter lists are padding) and
            optionally an int ``user_id`` column (without it U tokens get id -1).
        table: semantic IDs over [organic; ads] (CPU, where the rows are).
        cfg: block sizes; None = the longest history in ``rows``.
        check: validate ids against the table.
        features: the platform's catalog features (on the table's device); the logged ad ids index them, so
            logs need no feature column. None = the layout without them (``build_tokens``).
        market: read the market features of each request from the ``market`` column (what the collection
            recorded from the env's ``market_features()``); False = the layout without them. A log from
            before that column cannot give them: the market's ledger at each request is not recoverable
            from the logged outcomes (per-slot prices are not logged, nor is the market of other rows).
    """
    missing = [c for c in LOG_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"logged rows lack column(s) {missing}: expected {list(LOG_COLUMNS)}")
    if market and MARKET_COLUMN not in rows.columns:
        raise ValueError(
            f"logged rows lack column(s) {[MARKET_COLUMN]} that the layout with market features reads: the "
            "log was collected before market features (collect it again, or use the layout without them)"
        )
    b = len(rows)
    if b == 0:
        raise ValueError("no logged rows to tokenize")
    organic, organic_lens = flatten_cells(rows["organic_ids"], np.int64)
    ad_ids, ad_lens = flatten_cells(rows["ad_ids"], np.int64)
    ad_events, event_lens = flatten_cells(rows["ad_events"], np.int64)
    if cfg is None:
        cfg = SchemaConfig(organic_len=int(organic_lens.max(initial=0)), ad_len=int(ad_lens.max(initial=0)))
    if not np.array_equal(ad_lens, event_lens):
        raise ValueError("ad_ids and ad_events must have the same length in every row")
    if "user_id" in rows.columns:
        user_id = torch.as_tensor(np.array(rows["user_id"], dtype=np.int64))
    else:
        user_id = torch.full((b,), NO_ID, dtype=torch.int64)
    tensors = dict(
        user=torch.as_tensor(_dense(rows["user_features"], "user_features")),
        organic=torch.as_tensor(_right_aligned(organic, organic_lens, cfg.organic_len)),
        context=torch.as_tensor(_dense(rows["context"], "context")),
        ad_history=torch.as_tensor(_right_aligned(ad_ids, ad_lens, cfg.ad_len)),
        ad_events=torch.as_tensor(_right_aligned(ad_events, event_lens, cfg.ad_len)),
    )
    if market:
        tensors["market"] = torch.as_tensor(_dense(rows[MARKET_COLUMN], MARKET_COLUMN))
    dev = table.item_to_path.device
    return build_tokens(
        user_id.to(dev),
        **{k: v.to(dev) for k, v in tensors.items()},
        table=table,
        cfg=cfg,
        check=check,
        features=features,
    )


def describe(batch: TokenBatch, row: int = 0) -> pd.DataFrame:
    """One row of a batch as a table (slot, type, id, position, pad, event, codes): for reading layouts."""
    codes = batch.semantic_codes[row].cpu().tolist()
    return pd.DataFrame(
        {
            "type": [TOKEN_TYPES[t] for t in batch.type_ids[row].tolist()],
            "token_id": batch.token_ids[row].tolist(),
            "position": batch.positions[row].tolist(),
            "pad": batch.padding_mask[row].tolist(),
            "event": batch.event_ids[row].tolist(),
            "codes": [tuple(c) for c in codes],
        }
    ).rename_axis("slot")


__all__ = [
    "TYPE_U",
    "TYPE_O",
    "TYPE_E",
    "TYPE_I",
    "TOKEN_TYPES",
    "NO_ID",
    "MARKET_COLUMN",
    "SchemaConfig",
    "TokenBatch",
    "dense_dim",
    "check_dense_dim",
    "build_tokens",
    "tokens_from_obs",
    "tokens_from_logs",
    "flatten_cells",
    "describe",
]
