"""Logged bandit feedback: one row per shown (request, slot) with the behaviour policy's propensity.

Every off-policy estimator in `gpr_sim.data.ope` reads a `LoggedBandit`. Validation lives here, once, so
that a bad log fails at load time with the offending row indices instead of turning into a silent
`inf` or `nan` estimate later.

| field        | dtype   | shape  | meaning                                                            |
|--------------|---------|--------|--------------------------------------------------------------------|
| `action`     | int64   | (n,)   | logged action (ad / item id), in `[0, n_actions)`                  |
| `reward`     | float64 | (n,)   | observed reward (click, conversion, revenue...), finite             |
| `propensity` | float64 | (n,)   | behaviour probability of the logged action at its slot, in (0, 1]  |
| `position`   | int64   | (n,)   | slot, 0-based; all zeros for single-slot logs                      |
| `context`    | float64 | (n, d) | optional features of the request / user                            |
| `request_id` | int64   | (n,)   | optional id grouping the slots of one request (slate logs)         |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

_MAX_ROWS_SHOWN = 5


def describe_rows(bad: np.ndarray) -> str:
    """Format the first few offending row indices for an error message.

    Args:
        bad: Boolean mask (n,) of offending rows, or an int array of their indices.

    Returns:
        Text such as ``"rows [2, 7] "`` or ``"rows [0, 1, 2, 3, 4] (and 12 more)"``.
    """
    idx = np.flatnonzero(bad) if bad.dtype == bool else np.asarray(bad)
    shown = [int(i) for i in idx[:_MAX_ROWS_SHOWN]]
    extra = len(idx) - len(shown)
    return f"rows {shown}" + (f" (and {extra} more)" if extra > 0 else "")


def _as_1d(name: str, values: object, dtype: type, n: int | None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D with shape (n,), got shape {arr.shape}")
    if n is not None and len(arr) != n:
        raise ValueError(f"length mismatch: {name} has {len(arr)} rows but action has {n}")
    if dtype is np.int64 and arr.dtype.kind not in "iub":
        # Floats that hold whole numbers (a CSV column with a NaN elsewhere) are accepted; 2.5 is not.
        if arr.dtype.kind != "f":
            raise ValueError(f"{name} must be integer, got dtype {arr.dtype}")
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise ValueError(f"{name} must hold whole numbers; {describe_rows(bad)} do not")
    return arr.astype(dtype, copy=False)


@dataclass(frozen=True, eq=False)
class LoggedBandit:
    """Logged bandit (or per-slot slate) feedback, validated on construction.

    Arrays are converted to the dtypes in the module table (without a copy when they already match); a
    violation raises `ValueError` that names the field and the first offending rows. `eq=False` because
    element-wise array comparison has no single truth value.
    """

    action: np.ndarray
    """(n,) int64 logged action ids."""
    reward: np.ndarray
    """(n,) float64 observed rewards; NaN / inf are rejected because they poison every mean."""
    propensity: np.ndarray
    """(n,) float64 behaviour probability of the logged action (at the logged slot), in (0, 1]."""
    position: np.ndarray | None = None
    """(n,) int64 0-based slot; None means a single-slot log (all zeros)."""
    context: np.ndarray | None = None
    """(n, d) float64 request features, or None."""
    n_actions: int | None = None
    """Size of the action space; inferred as max(action) + 1 when None (pass it if some ids never appear)."""
    request_id: np.ndarray | None = None
    """(n,) int64 request id shared by the slots of one slate; None when unknown."""

    def __post_init__(self) -> None:
        action = _as_1d("action", self.action, np.int64, None)
        n = len(action)
        reward = _as_1d("reward", self.reward, np.float64, n)
        propensity = _as_1d("propensity", self.propensity, np.float64, n)
        position = (
            np.zeros(n, dtype=np.int64)
            if self.position is None
            else _as_1d("position", self.position, np.int64, n)
        )

        bad = ~np.isfinite(reward)
        if bad.any():
            raise ValueError(f"reward must be finite; {describe_rows(bad)} are NaN or inf")
        # `~(p > 0)` also catches NaN, which compares False with everything.
        bad = ~(propensity > 0.0) | (propensity > 1.0)
        if bad.any():
            raise ValueError(
                f"propensity must be in (0, 1]; {describe_rows(bad)} are <= 0, > 1 or NaN "
                f"(first values {propensity[bad][:_MAX_ROWS_SHOWN].tolist()})"
            )
        bad = position < 0
        if bad.any():
            raise ValueError(f"position must be >= 0 (0-based slots); {describe_rows(bad)} are negative")

        n_actions = self.n_actions
        if n_actions is None:
            n_actions = int(action.max()) + 1 if n > 0 else 0
        elif int(n_actions) < 1:
            raise ValueError(f"n_actions must be >= 1, got {n_actions}")
        n_actions = int(n_actions)
        bad = (action < 0) | (action >= n_actions)
        if bad.any():
            raise ValueError(
                f"action out of range [0, {n_actions}); {describe_rows(bad)} "
                f"(values {action[bad][:_MAX_ROWS_SHOWN].tolist()})"
            )

        context = self.context
        if context is not None:
            context = np.asarray(context, dtype=np.float64)
            if context.ndim != 2:
                raise ValueError(f"context must be 2-D with shape (n, d), got shape {context.shape}")
            if len(context) != n:
                raise ValueError(f"length mismatch: context has {len(context)} rows but action has {n}")

        request_id = self.request_id
        if request_id is not None:
            request_id = _as_1d("request_id", request_id, np.int64, n)
            dup = pd.DataFrame({"r": request_id, "p": position}).duplicated().to_numpy()
            if dup.any():
                raise ValueError(f"(request_id, position) must be unique; {describe_rows(dup)} repeat a slot")

        for name, value in [
            ("action", action),
            ("reward", reward),
            ("propensity", propensity),
            ("position", position),
            ("context", context),
            ("n_actions", n_actions),
            ("request_id", request_id),
        ]:
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return len(self.action)

    @property
    def n_positions(self) -> int:
        """Number of slots, max(position) + 1 (1 for single-slot logs)."""
        return int(self.position.max()) + 1 if len(self) else 0

    def subset(self, rows: np.ndarray) -> LoggedBandit:
        """Rows selected by a boolean mask or an index array, keeping `n_actions`."""

        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[rows]

        return LoggedBandit(
            action=self.action[rows],
            reward=self.reward[rows],
            propensity=self.propensity[rows],
            position=self.position[rows],
            context=take(self.context),
            n_actions=self.n_actions,
            request_id=take(self.request_id),
        )

    @classmethod
    def from_dataframe(
        cls,
        df: pd.DataFrame,
        action: str = "action",
        reward: str = "reward",
        propensity: str = "propensity",
        position: str | None = "position",
        context: str | Sequence[str] | None = None,
        n_actions: int | None = None,
        request_id: str | None = None,
    ) -> LoggedBandit:
        """Build from a DataFrame in the project's log schema.

        Args:
            df: One row per logged (request, slot).
            action: Column of action ids.
            reward: Column of rewards.
            propensity: Column of behaviour propensities of the logged action.
            position: Column of 0-based slots, or None for a single-slot log.
            context: Either one column holding a float vector per row (a list column such as
                `user_features`) or a list of scalar float columns; None for no context.
            n_actions: Action-space size; falls back to ``df.attrs["n_actions"]``, then to inference.
            request_id: Column grouping slots of one request, or None.

        Returns:
            The validated `LoggedBandit`.

        Raises:
            ValueError: If a named column is missing (all missing names are listed), or if any field
                fails validation (the offending rows are named).
        """
        scalar_cols = {"action": action, "reward": reward, "propensity": propensity}
        if position is not None:
            scalar_cols["position"] = position
        if request_id is not None:
            scalar_cols["request_id"] = request_id
        wanted = list(scalar_cols.values())
        if isinstance(context, str):
            wanted.append(context)
        elif context is not None:
            wanted.extend(context)
        missing = [c for c in wanted if c not in df.columns]
        if missing:
            raise ValueError(f"missing column(s) {missing}; the DataFrame has {list(df.columns)}")

        ctx = None
        if isinstance(context, str):
            ctx = stack_vectors(df[context], name=context)
        elif context is not None:
            ctx = df[list(context)].to_numpy(dtype=np.float64)

        def col(name: str) -> np.ndarray:
            return df[name].to_numpy()

        propensity_values = df[propensity].to_numpy(dtype=np.float64, na_value=np.nan)
        if np.isnan(propensity_values).all() and len(df):
            raise ValueError(
                f"propensity column {propensity!r} is empty (all NaN); the log has no propensities"
            )
        return cls(
            action=col(action),
            reward=df[reward].to_numpy(dtype=np.float64, na_value=np.nan),
            propensity=propensity_values,
            position=None if position is None else col(position),
            context=ctx,
            n_actions=n_actions if n_actions is not None else df.attrs.get("n_actions"),
            request_id=None if request_id is None else col(request_id),
        )

    def to_dataframe(self) -> pd.DataFrame:
        """The log in the project schema (`context` as a list column of float64 arrays)."""
        df = pd.DataFrame(
            {
                "action": self.action,
                "position": self.position,
                "reward": self.reward,
                "propensity": self.propensity,
            }
        )
        if self.request_id is not None:
            df.insert(0, "request_id", self.request_id)
        if self.context is not None:
            df["context"] = list(self.context)
        df.attrs["n_actions"] = self.n_actions
        return df


def stack_vectors(series: pd.Series, name: str = "column") -> np.ndarray:
    """Stack a list column (one float vector per row) into an (n, d) float64 matrix.

    Args:
        series: Column whose cells are equal-length sequences of numbers.
        name: Column name, for the error message.

    Returns:
        Array of shape (n, d).

    Raises:
        ValueError: If rows have different lengths (the first differing rows are named).
    """
    cells = [np.asarray(v, dtype=np.float64) for v in series.to_numpy()]
    if not cells:
        return np.zeros((0, 0), dtype=np.float64)
    lengths = np.array([c.size for c in cells])
    bad = lengths != lengths[0]
    if bad.any():
        raise ValueError(
            f"{name} vectors must all have length {lengths[0]} (row 0); {describe_rows(bad)} differ"
        )
    return np.stack(cells).reshape(len(cells), lengths[0])
