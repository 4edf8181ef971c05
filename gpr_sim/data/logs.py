"""Logged requests of a behaviour policy: the Parquet schema, and writing / reading it.

One row per ad request, recorded from the observation *before* the step, the policy's proposal and
the outcome of the step. The U/O/E/I columns are the observation tokens, so a model reads logged and
live requests the same way. Single-valued columns are Parquet scalars; the token histories and per-slot
values are `list<...>` columns (equal length within a file).

| column              | Parquet type    | token | meaning                                                          |
|---------------------|-----------------|-------|------------------------------------------------------------------|
| `request_id`        | int64           |       | unique per request: `t * num_envs + slot` (t = collection step)  |
| `episode_id`        | int64           |       | unique per session: `episode * num_envs + slot`                  |
| `step`              | int64           |       | requests already served in this session (0 = first)              |
| `user_id`           | int64           | U     | population index of the user                                     |
| `user_features`     | list<float32>   | U     | profile features (`obs["user"]`)                                 |
| `organic_ids`       | list<int64>     | O     | organic items consumed, most recent last, -1 = padding           |
| `context`           | list<float32>   | E     | request context (`obs["context"]`)                               |
| `ad_ids`            | list<int64>     | I     | ads shown before, most recent last, -1 = padding                 |
| `ad_events`         | list<int64>     | I     | deepest funnel event of each: 0 pad, 1 impr., 2 click, 3 conv.   |
| `candidates`        | list<int64>     |       | the ordered candidate ads the behaviour policy proposed (K)      |
| `action`            | int64           |       | `candidates[0]`, the behaviour policy's top pick                 |
| `propensity`        | float64         |       | probability of the whole ordered candidate list, in (0, 1]       |
| `shown_ad`          | list<int64>     |       | ad shown in each slot (S), -1 = empty                            |
| `position`          | int64           |       | slot of the first shown ad (0-based), -1 if nothing was shown    |
| `impression`        | int64           |       | impressions over slots                                           |
| `click`             | int64           |       | clicks over slots                                                |
| `conversion`        | int64           |       | conversions of this request's clicks reported now (<= click)     |
| `gmv`               | float64         |       | order value of those conversions                                 |
| `delayed_conversion`| int64           |       | earlier requests' conversions reported at this step              |
| `delayed_gmv`       | float64         |       | their order value                                                |
| `revenue`           | float64         |       | price charged over slots (GSP)                                   |
| `reward`            | float64         |       | the env's reward of the step                                     |
| `p_click`           | float64         |       | true click probability of the top-slot ad (0 if empty)           |
| `p_conversion`      | float64         |       | true conversion probability given a click, top slot (0 if empty) |
| `is_new_ad`         | bool            |       | the top-slot ad is a new (cold-start) ad                         |
| `activity_tier`     | int64           | U     | the user's activity tier, 1..5                                   |
| `terminated`        | bool            |       | the user left after this request                                 |
| `truncated`         | bool            |       | the session hit `max_steps` at this request                      |
| `final_organic_ids` | list<int64>?    | O     | optional: the observation *after* the request, where the session |
| `final_context`     | list<float32>?  | E     | ended here or the collection stopped after it; null elsewhere    |
| `final_ad_ids`      | list<int64>?    | I     | (the next row of the episode holds it). Completes the episodes   |
| `final_ad_events`   | list<int64>?    | I     | for offline RL and the Minari export (U tokens do not change).   |
| `market`            | list<float32>?  | E     | optional (logs from before it lack it), else in every row: the   |
|                     |                 |       | platform's spend ledger at the request (`market_features()`, F_m |
|                     |                 |       | shares in [0, 1]: `gpr_sim.platform.market`), the E token's      |
|                     |                 |       | market columns                                                   |

With the default reward weights, `reward = revenue + 0.02 (gmv + delayed_gmv)`; the two `delayed_*`
columns are zero unless `conversion_delay_mean > 0`.

File metadata (Parquet key `gpr_sim.logs`, JSON) records provenance: `world_config` (the
`WorldConfig` as a dict, every field), `seed` (sessions and exploration), `policy` (behaviour policy name)
and whatever else the writer adds (`env`, `world_seed`, `num_envs`, `steps`, `temperature`, ...; a log
without `world_seed` is of world seed 0, the envs' default). `read_logs` returns it as a dict.

## Validation at load
`read_logs` checks a log once, at load, so that no consumer trains or estimates on a broken one
(`validate_log`; one `ValueError` line naming the file, the column and the first rows):
- it has rows, and metadata with `world_config` (complete and valid), `seed` and `policy`;
- every float column is finite, and no required column holds nulls (pandas writes NaN as null). No
  column of the schema legitimately holds NaN: padding is -1 in the id lists, "nothing shown" is -1 /
  0, and only the optional `final_*` columns are null, as whole rows, where the next row holds the
  observation. Values computed later from a log (e.g. the HTE's value targets, NaN = none) are not
  columns;
- ids and codes lie in the ranges of the metadata's world: `user_id` in [0, num_users), `organic_ids`
  in [-1, num_organic), `ad_ids` and `shown_ad` in [-1, num_ads), `candidates` and `action` in
  [0, num_ads), `ad_events` in [0, 3], `position` in [-1, num_slots), `activity_tier` in [1, 5];
  `propensity` in (0, 1], `p_click` and `p_conversion` in [0, 1]; the id lists have the world's widths
  (`organic_history`, `ad_history`, `num_candidates`, `num_slots`).

A consumer given a log and something of a world (a tokenizer, another run, a preset) checks that they
are of the same world with `check_same_world`, `check_tokenizer_world` or `check_run_world`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gpr_sim.platform.market import MARKET_FEATURE_DIM
from gpr_sim.runs import atomic_write_with
from gpr_sim.world.config import WorldConfig

FORMAT_VERSION = 1
METADATA_KEY = b"gpr_sim.logs"

SCHEMA = pa.schema(
    [
        ("request_id", pa.int64()),
        ("episode_id", pa.int64()),
        ("step", pa.int64()),
        ("user_id", pa.int64()),
        ("user_features", pa.list_(pa.float32())),
        ("organic_ids", pa.list_(pa.int64())),
        ("context", pa.list_(pa.float32())),
        ("ad_ids", pa.list_(pa.int64())),
        ("ad_events", pa.list_(pa.int64())),
        ("candidates", pa.list_(pa.int64())),
        ("action", pa.int64()),
        ("propensity", pa.float64()),
        ("shown_ad", pa.list_(pa.int64())),
        ("position", pa.int64()),
        ("impression", pa.int64()),
        ("click", pa.int64()),
        ("conversion", pa.int64()),
        ("gmv", pa.float64()),
        ("delayed_conversion", pa.int64()),
        ("delayed_gmv", pa.float64()),
        ("revenue", pa.float64()),
        ("reward", pa.float64()),
        ("p_click", pa.float64()),
        ("p_conversion", pa.float64()),
        ("is_new_ad", pa.bool_()),
        ("activity_tier", pa.int64()),
        ("terminated", pa.bool_()),
        ("truncated", pa.bool_()),
    ]
)
"""The required columns, in file order."""

OPTIONAL_SCHEMA = pa.schema(
    [
        ("market", pa.list_(pa.float32())),
        ("final_organic_ids", pa.list_(pa.int64())),
        ("final_context", pa.list_(pa.float32())),
        ("final_ad_ids", pa.list_(pa.int64())),
        ("final_ad_events", pa.list_(pa.int64())),
    ]
)
"""Optional columns: cast to these types when present. Other extra columns are kept as they are."""

NOT_NULL_OPTIONAL = ("market",)
"""optional columns that, when present, hold a value in every row (the ``final_*`` ones are null where the
next row holds the observation)"""

_TYPES = {f.name: f.type for f in [*SCHEMA, *OPTIONAL_SCHEMA]}

Batch = pd.DataFrame | pa.Table | Mapping[str, np.ndarray]


def _list_array(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """(n, d) array -> list array of n rows of length d, built from flat values and offsets (no row loop).

    A masked array gives null rows where every entry of the row is masked.
    """
    mask = None
    if isinstance(values, np.ma.MaskedArray):
        mask = pa.array(np.ma.getmaskarray(values).all(axis=1))
        values = values.data
    n, d = values.shape
    if n * d >= 2**31:
        raise ValueError(
            f"a list column of {n} x {d} values overflows int32 offsets: write it in several batches"
        )
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * np.int32(d))
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    return pa.ListArray.from_arrays(offsets, flat, mask=mask)


def _table_from_columns(columns: Mapping[str, np.ndarray]) -> pa.Table:
    """Columns of numpy arrays (2-D for list columns, masked for null rows) -> a table typed by the schema."""
    arrays = {}
    for name, values in columns.items():
        arr = values if isinstance(values, np.ma.MaskedArray) else np.asarray(values)
        t = _TYPES.get(name)
        if arr.ndim == 2:
            arrays[name] = _list_array(arr, t.value_type if t is not None else pa.from_numpy_dtype(arr.dtype))
        elif arr.ndim == 1:
            arrays[name] = pa.array(arr, type=t) if t is not None and arr.dtype != object else pa.array(arr)
        else:
            raise ValueError(f"column {name!r} must be 1-D (scalars) or 2-D (lists), got shape {arr.shape}")
    return pa.table(arrays)


def _to_table(batch: Batch) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pd.DataFrame):
        return pa.Table.from_pandas(batch, preserve_index=False)
    if isinstance(batch, Mapping):
        return _table_from_columns(batch)
    raise ValueError(
        f"expected a DataFrame, a pyarrow Table, a mapping of column arrays or an iterable of those, "
        f"got {type(batch).__name__}"
    )


def _cast(col: pa.ChunkedArray, name: str, to: pa.DataType, source: str) -> pa.ChunkedArray:
    if col.type == to:
        return col
    try:
        return col.cast(to, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"{source}: column {name!r} has type {col.type}, expected {to}: {e}") from e


def conform(table: pa.Table, source: str = "table") -> pa.Table:
    """Check the required columns and cast them (and optional ones) to the schema types.

    Schema columns come first in ``SCHEMA`` order, then the others in their order.

    Raises:
        ValueError: Naming every missing column, or a column whose values cannot be cast safely.
    """
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{source} is missing log column(s) {missing}; see gpr_sim.data.logs.SCHEMA")
    names = SCHEMA.names + [c for c in table.column_names if c not in SCHEMA.names]
    columns, fields = [], []
    for name in names:
        col = table.column(name)
        if name in _TYPES:
            col = _cast(col, name, _TYPES[name], source)
        columns.append(col)
        fields.append(pa.field(name, col.type))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def write_logs(
    data: Batch | Iterable[Batch],
    path: str | os.PathLike,
    *,
    world_config: object,
    seed: int,
    policy: str,
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Write logged requests to Parquet atomically (``gpr_sim.runs.atomic_write_with``).

    Args:
        data: One batch or an iterable of batches; a batch is a DataFrame, a pyarrow Table, or a mapping
            of column name -> numpy array with shape (n,) for scalar columns and (n, d) for list columns.
        path: Destination ``.parquet`` file; parent folders are created.
        world_config: The `WorldConfig` (or its dict; missing fields take their defaults) that generated the
            market; recorded complete, so that a reader rebuilds the same world.
        seed: Seed of the sessions and of the policy's exploration.
        policy: Name of the behaviour policy.
        extra: More JSON-serialisable provenance (env id, world seed, num_envs, steps, temperature...).

    Returns:
        The path written.

    Raises:
        ValueError: If a required column is missing or has an incompatible type, or ``world_config`` is invalid.
    """
    batches = [data] if isinstance(data, (pd.DataFrame, pa.Table, Mapping)) else list(data)
    if not batches:
        raise ValueError("write_logs got no batches")
    tables = [conform(_to_table(b), f"batch {i}") for i, b in enumerate(batches)]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    cfg = as_world_config(world_config, "world_config").to_dict()
    meta = {"format_version": FORMAT_VERSION, "world_config": cfg, "seed": int(seed), "policy": str(policy)}
    meta.update(extra or {})
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})

    return atomic_write_with(path, lambda tmp: pq.write_table(table, tmp))


def read_logs(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """Read a log written by `write_logs`, validated (`validate_log`: module doc).

    Args:
        path: A ``.parquet`` file.

    Returns:
        (df, meta): one row per request with the ``SCHEMA`` columns (list columns hold one numpy array
        per row, of the schema's value dtype) and the provenance dict.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: One line naming the file, if it is not Parquet, lacks required columns (all are named),
            has no rows, lacks metadata, or holds non-finite or out-of-range values (column and rows named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no log file at {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path} is not a readable Parquet file: {e}") from e
    meta = _raw_meta(table.schema, str(path))
    table = conform(table, str(path))
    validate_log(table, meta, str(path))
    return table.to_pandas(), meta


def read_log_meta(path: str | os.PathLike) -> dict:
    """The provenance dict of a log file, checked (``check_log_meta``), without reading its rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no log file at {path}")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path} is not a readable Parquet file: {e}") from e
    meta = _raw_meta(schema, str(path))
    check_log_meta(meta, str(path))
    return meta


def _raw_meta(schema: pa.Schema, source: str) -> dict:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{source}: its metadata ({METADATA_KEY.decode()}) is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: its metadata ({METADATA_KEY.decode()}) is not a JSON object")
    return meta


# ----------------------------------------------------------------------------- validation


REQUIRED_META = ("world_config", "seed", "policy")
"""what `write_logs` always records: without them no consumer can rebuild the log's world"""


def as_world_config(config: WorldConfig | Mapping, what: str) -> WorldConfig:
    """A ``WorldConfig`` from itself or its dict; ``ValueError`` naming ``what`` if the dict is invalid."""
    if isinstance(config, WorldConfig):
        return config
    if not isinstance(config, Mapping):
        raise ValueError(f"{what} must be a WorldConfig or its dict, got {type(config).__name__}")
    try:
        return WorldConfig.from_dict(dict(config))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} is invalid: {e}") from None


def check_log_meta(meta: Mapping, source: str) -> WorldConfig:
    """The log's world config, after checking the metadata is present and complete.

    Raises:
        ValueError: naming ``source``, if the metadata is missing, lacks one of ``REQUIRED_META``, names
            another format version, or its ``world_config`` is invalid or lacks fields (a log of an
            older code version: its world cannot be rebuilt exactly).
    """
    if not meta:
        raise ValueError(
            f"{source} has no gpr_sim metadata (Parquet key {METADATA_KEY.decode()!r}): write logs with "
            f"gpr_sim.data.logs.write_logs (agents.collect), which records {list(REQUIRED_META)}"
        )
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{source}: its metadata lacks {missing} (written by gpr_sim.data.logs.write_logs?)")
    version = meta.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"{source}: log format version {version!r}, this code reads {FORMAT_VERSION}")
    cfg = as_world_config(meta["world_config"], f"{source}: metadata world_config")
    absent = sorted(set(cfg.to_dict()) - set(meta["world_config"]))
    if absent:
        raise ValueError(
            f"{source}: metadata world_config lacks field(s) {absent}: written by an older version? Its world "
            f"cannot be rebuilt exactly"
        )
    return cfg


def log_world(meta: Mapping) -> tuple[WorldConfig, int]:
    """(world config, world seed) of a checked log's metadata (``world_seed`` 0 when not recorded)."""
    return as_world_config(meta["world_config"], "world_config"), int(meta.get("world_seed", 0))


def _id_ranges(cfg: WorldConfig) -> dict[str, tuple[int | float, int | float, bool, str]]:
    """column -> (lo, hi, lo_open, why): the values a log of a world ``cfg`` may hold (hi inclusive)."""
    ads = f"num_ads={cfg.num_ads}"
    return {
        "user_id": (0, cfg.num_users - 1, False, f"num_users={cfg.num_users}"),
        "organic_ids": (-1, cfg.num_organic - 1, False, f"-1 = padding, num_organic={cfg.num_organic}"),
        "ad_ids": (-1, cfg.num_ads - 1, False, f"-1 = padding, {ads}"),
        "ad_events": (0, 3, False, "0 pad, 1 impression, 2 click, 3 conversion"),
        "candidates": (0, cfg.num_ads - 1, False, ads),
        "action": (0, cfg.num_ads - 1, False, ads),
        "propensity": (0.0, 1.0, True, "a probability of the logged candidates"),
        "shown_ad": (-1, cfg.num_ads - 1, False, f"-1 = empty slot, {ads}"),
        "position": (-1, cfg.num_slots - 1, False, f"-1 = nothing shown, num_slots={cfg.num_slots}"),
        "p_click": (0.0, 1.0, False, "a probability"),
        "p_conversion": (0.0, 1.0, False, "a probability"),
        "activity_tier": (1, 5, False, "tiers 1..5"),
        "final_organic_ids": (-1, cfg.num_organic - 1, False, f"-1 = padding, num_organic={cfg.num_organic}"),
        "final_ad_ids": (-1, cfg.num_ads - 1, False, f"-1 = padding, {ads}"),
        "final_ad_events": (0, 3, False, "0 pad, 1 impression, 2 click, 3 conversion"),
        "market": (0.0, 1.0, False, "shares (gpr_sim.platform.market)"),
    }


def _widths(cfg: WorldConfig) -> dict[str, tuple[int, str]]:
    """list column -> (length, why) in a log of a world ``cfg``."""
    return {
        "organic_ids": (cfg.organic_history, "organic_history"),
        "ad_ids": (cfg.ad_history, "ad_history"),
        "ad_events": (cfg.ad_history, "ad_history"),
        "candidates": (cfg.num_candidates, "num_candidates"),
        "shown_ad": (cfg.num_slots, "num_slots"),
        "final_organic_ids": (cfg.organic_history, "organic_history"),
        "final_ad_ids": (cfg.ad_history, "ad_history"),
        "final_ad_events": (cfg.ad_history, "ad_history"),
        "market": (MARKET_FEATURE_DIM, "gpr_sim.platform.market.MARKET_FEATURE_DIM"),
    }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _rows(rows: np.ndarray) -> str:
    """``rows 3, 17, 21, ...``: the first five distinct row numbers."""
    rows = np.unique(rows)
    more = ", ..." if rows.size > 5 else ""
    return f"row{'s' if rows.size > 1 else ''} {', '.join(str(r) for r in rows[:5])}{more}"


def _column_problems(table: pa.Table, name: str, cfg: WorldConfig) -> list[str]:
    """What is wrong with one column (empty: nothing), each as ``column NAME has ... (rows ...)``."""
    col = table.column(name)
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    required = name in SCHEMA.names or name in NOT_NULL_OPTIONAL
    if pa.types.is_list(arr.type):
        is_null = arr.is_null().to_numpy(zero_copy_only=False)
        null_rows = np.flatnonzero(is_null)
        if required and null_rows.size:
            return [f"column {name} has {_count(null_rows.size, 'null row')} ({_rows(null_rows)})"]
        width, why = _widths(cfg).get(name, (None, ""))
        if width is not None:
            lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)  # NaN on null rows
            off = np.flatnonzero(~np.isnan(lengths.astype(np.float64)) & (lengths != width))
            if off.size:
                return [
                    f"column {name} has {_count(off.size, 'row')} of length {int(lengths[off[0]])}, expected "
                    f"{why}={width} of the metadata's world_config ({_rows(off)})"
                ]
        # every entry with its row; entries behind a null row (the writer may keep data there) are no values
        offsets = arr.offsets.to_numpy()
        values = arr.values.slice(offsets[0], offsets[-1] - offsets[0])
        rows = np.repeat(np.arange(len(arr)), np.diff(offsets))
        keep = ~is_null[rows]
        rows = rows[keep]
        nulls = values.is_null().to_numpy(zero_copy_only=False)[keep]
        x = values.to_numpy(zero_copy_only=False)[keep]
    else:
        values, rows = arr, np.arange(len(arr))
        nulls = values.is_null().to_numpy(zero_copy_only=False)
        x = values.to_numpy(zero_copy_only=False)
    if pa.types.is_floating(values.type):
        bad = nulls | ~np.isfinite(x)
        if bad.any():
            return [f"column {name} has {_count(int(bad.sum()), 'non-finite value')} ({_rows(rows[bad])})"]
    elif nulls.any():
        return [f"column {name} has {_count(int(nulls.sum()), 'missing value')} ({_rows(rows[nulls])})"]
    if name in _id_ranges(cfg) and x.size:
        lo, hi, lo_open, why = _id_ranges(cfg)[name]
        bad = ((x <= lo) if lo_open else (x < lo)) | (x > hi)
        if bad.any():
            first = x[bad][0]
            return [
                f"column {name} has {_count(int(bad.sum()), 'value')} outside {'(' if lo_open else '['}{lo}, {hi}] "
                f"({why}; e.g. {first}) ({_rows(rows[bad])})"
            ]
    return []


def validate_log(data: Batch, meta: Mapping, source: str) -> WorldConfig:
    """Check a log the way `read_logs` does (module doc) and return its world config.

    Args:
        data: The log's columns (a table, DataFrame or mapping of arrays; cast to the schema first).
        meta: Its provenance dict.
        source: What to call it in errors (the file).

    Raises:
        ValueError: one line, ``SOURCE: column p_click has 128 non-finite values (rows 3, 17, 21, ...)``,
            naming every bad column (``; ``-separated), or saying that the log has no rows or what its
            metadata lacks.
    """
    table = conform(_to_table(data), source)
    if table.num_rows == 0:
        raise ValueError(f"{source} has no rows")
    cfg = check_log_meta(meta, source)
    problems = [
        p for name in table.column_names if name in _TYPES for p in _column_problems(table, name, cfg)
    ]
    if problems:
        raise ValueError(f"{source}: {'; '.join(problems)}")
    return cfg


def check_same_world(
    meta: Mapping, world_config: WorldConfig | Mapping, world_seed: int, path: str | os.PathLike, other: str
) -> None:
    """Raise ``ValueError`` unless the log at ``path`` (its ``meta``) is of the world ``(world_config, world_seed)``.

    ``other`` names where that world comes from (a flag, a run folder): the one-line error names both and
    the first differing fields.
    """
    cfg, seed = log_world(meta)
    want = as_world_config(world_config, other)
    a, b = _flat_dict(cfg.to_dict()), _flat_dict(want.to_dict())
    diff = [f"{k} {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]
    if seed != int(world_seed):
        diff.insert(0, f"world_seed {seed} vs {int(world_seed)}")
    if diff:
        more = ", ..." if len(diff) > 5 else ""
        raise ValueError(f"{path} and {other} are of different worlds ({', '.join(diff[:5])}{more})")


def _flat_dict(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def check_tokenizer_world(tokenizer, world, path: str | os.PathLike, other: str) -> None:
    """Raise ``ValueError`` naming both unless ``tokenizer`` (a ``WorldTokenizer``) was fitted on ``world``, the
    world of the log at ``path`` (item counts and embedding fingerprint: ``WorldTokenizer.check_world``)."""
    try:
        tokenizer.check_world(world)
    except ValueError as e:
        raise ValueError(f"{other} does not fit the world of {path}: {e}") from None


def check_run_world(meta: Mapping, path: str | os.PathLike, run_dir: str | os.PathLike, other: str) -> None:
    """Raise ``ValueError`` unless the run in ``run_dir`` trained on a log of the same world as ``path``.

    The run's log is the one its ``config.json`` records as ``logs_path`` (``agents.pretrain`` runs), looked
    up as recorded and in ``run_dir``; a run that records none, or whose log is gone, is not checked.
    """
    cfg_path = Path(run_dir) / "config.json"
    try:
        recorded = json.loads(cfg_path.read_text()).get("logs_path") if cfg_path.is_file() else None
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{cfg_path}: not a readable run config ({e})") from None
    if not recorded:
        return
    for log in (Path(recorded), Path(run_dir) / Path(recorded).name):
        if log.is_file():
            check_same_world(meta, *log_world(read_log_meta(log)), path, f"{other} (trained on {log})")
            return


def stack_list_column(df: pd.DataFrame, name: str) -> np.ndarray:
    """A list column as an (n, d) array of its value dtype (rows must have equal length)."""
    cells = df[name].to_numpy()
    if len(cells) == 0:
        return np.zeros((0, 0))
    lengths = np.fromiter((len(c) for c in cells), dtype=np.int64, count=len(cells))
    if (lengths != lengths[0]).any():
        bad = np.flatnonzero(lengths != lengths[0])[:5].tolist()
        raise ValueError(f"{name} rows must have equal length {lengths[0]}; rows {bad} differ")
    return np.stack(cells)
