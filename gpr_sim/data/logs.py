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

With the default reward weights, `reward = revenue + 0.02 (gmv + delayed_gmv)`; the two `delayed_*`
columns are zero unless `conversion_delay_mean > 0`.

File metadata (Parquet key `gpr_sim.logs`, JSON) records provenance: `world_config` (the
`WorldConfig` as a dict), `seed` (sessions and exploration), `policy` (behaviour policy name) and
whatever else the writer adds (`env`, `world_seed`, `num_envs`, `steps`, `temperature`, ...).
`read_logs` returns it as a dict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gpr_sim.runs import atomic_write_with

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
        ("final_organic_ids", pa.list_(pa.int64())),
        ("final_context", pa.list_(pa.float32())),
        ("final_ad_ids", pa.list_(pa.int64())),
        ("final_ad_events", pa.list_(pa.int64())),
    ]
)
"""Optional nullable columns: cast to these types when present. Other extra columns are kept as they are."""

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
        raise ValueError(f"a list column of {n} x {d} values overflows int32 offsets: write it in several batches")
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
        world_config: The `WorldConfig` (or its dict) that generated the market.
        seed: Seed of the sessions and of the policy's exploration.
        policy: Name of the behaviour policy.
        extra: More JSON-serialisable provenance (env id, world seed, num_envs, steps, temperature...).

    Returns:
        The path written.

    Raises:
        ValueError: If a required column is missing or has an incompatible type.
    """
    batches = [data] if isinstance(data, (pd.DataFrame, pa.Table, Mapping)) else list(data)
    if not batches:
        raise ValueError("write_logs got no batches")
    tables = [conform(_to_table(b), f"batch {i}") for i, b in enumerate(batches)]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    cfg = world_config.to_dict() if hasattr(world_config, "to_dict") else dict(world_config)
    meta = {"format_version": FORMAT_VERSION, "world_config": cfg, "seed": int(seed), "policy": str(policy)}
    meta.update(extra or {})
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})

    return atomic_write_with(path, lambda tmp: pq.write_table(table, tmp))


def read_logs(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """Read a log written by `write_logs`.

    Args:
        path: A ``.parquet`` file.

    Returns:
        (df, meta): one row per request with the ``SCHEMA`` columns (list columns hold one numpy array
        per row, of the schema's value dtype) and the provenance dict (empty if the file has none).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not Parquet, or lacks required columns (all are named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no log file at {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path} is not a readable Parquet file: {e}") from e
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    meta = json.loads(raw) if raw else {}
    table = conform(table, str(path))
    return table.to_pandas(), meta


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
