"""Open Bandit Dataset (ZOZOTOWN fashion e-commerce) reader and converter to the project's log schema.

The OBD logs three recommended items per impression, one row per (impression, slot), collected by a
uniform-random or a Bernoulli-Thompson-sampling ("bts") policy over three campaigns (all / men / women).
A small sample ships inside the `obp` wheel on PyPI; `fetch_obd_sample` extracts it.

Raw files (one folder per policy/campaign; both start with an unnamed pandas index column):

| file               | columns                                                                       |
|--------------------|-------------------------------------------------------------------------------|
| `{campaign}.csv`   | timestamp, item_id, position (1-based: 1..3), click, propensity_score,         |
|                    | user_feature_0..3 (hashed categoricals), user-item_affinity_0..n_items-1       |
| `item_context.csv` | item_id, item_feature_0 (float), item_feature_1..3 (hashed categoricals)       |

`read_obd` output (one row per logged slot):

| column               | dtype            | meaning                                                 |
|----------------------|------------------|---------------------------------------------------------|
| `timestamp`          | datetime64 (UTC) | impression time                                         |
| `action`             | int64            | item_id                                                 |
| `position`           | int64            | slot, 0-based (the raw 1..3 minus one)                  |
| `reward`             | float64          | the click, as the reward OPE estimates                  |
| `click`              | int64            | 0 / 1                                                   |
| `propensity`         | float64          | marginal pi_b of this item at this slot                 |
| `user_features`      | float64 arrays   | encoded `user_feature_*` (see below)                    |
| `user_item_affinity` | float64 arrays   | `user-item_affinity_*` in item order                    |
| `item_features`      | float64 arrays   | encoded `item_feature_*` of the row's item, if given    |

The array columns are object columns holding one float64 numpy array per row (they survive Parquet).

Encoding of feature columns: numeric columns are kept as floats; any other column is one-hot encoded
over its categories sorted as strings (a missing value gives all zeros). The vocabulary comes from the
file being read, so dimensions can differ between files; the names are kept in
`df.attrs["user_feature_names"]` / `df.attrs["item_feature_names"]`, and `df.attrs["n_actions"]` holds the
number of items.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gpr_sim.data.bandit import LoggedBandit, describe_rows, stack_vectors

OBP_VERSION = "0.4.1"
"""Last obp release published as a wheel installable on Python >= 3.10; it carries the OBD sample."""
POLICIES = ("random", "bts")
CAMPAIGNS = ("all", "men", "women")
LOG_COLUMNS = ("timestamp", "item_id", "position", "click", "propensity_score")


def _read_csv(path: str | os.PathLike) -> pd.DataFrame:
    df = pd.read_csv(path)
    # The OBD files start with a pandas index column written without a header.
    unnamed = [c for c in df.columns if c == "" or str(c).startswith("Unnamed:")]
    return df.drop(columns=unnamed)


def _numbered(df: pd.DataFrame, prefix: str) -> list[str]:
    """Columns `prefix<k>` sorted by k, so that `_10` follows `_9`."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)$")
    found = [(int(m.group(1)), c) for c in df.columns if (m := pattern.match(str(c)))]
    return [c for _, c in sorted(found)]


def encode_features(df: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, list[str]]:
    """Encode feature columns into one float matrix: numeric kept, others one-hot.

    Args:
        df: Table holding `columns`.
        columns: Feature columns, in output order.

    Returns:
        (matrix (n, d) float64, names of the d output features: `col` or `col=category`).
    """
    blocks, names = [np.zeros((len(df), 0))], []
    for c in columns:
        col = df[c]
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            blocks.append(col.to_numpy(dtype=np.float64, na_value=np.nan)[:, None])
            names.append(str(c))
            continue
        cats = sorted(col.dropna().astype(str).unique())
        codes = pd.Categorical(col.astype("string").to_numpy(), categories=cats).codes  # -1 when missing
        onehot = np.zeros((len(df), len(cats)))
        seen = codes >= 0
        onehot[np.flatnonzero(seen), codes[seen]] = 1.0
        blocks.append(onehot)
        names += [f"{c}={cat}" for cat in cats]
    return np.hstack(blocks), names


def read_obd(log_csv: str | os.PathLike, item_context_csv: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read one OBD log (and optionally its item_context.csv) into the project's log schema.

    Args:
        log_csv: Path to `{campaign}.csv`.
        item_context_csv: Path to the matching `item_context.csv`, or None.

    Returns:
        DataFrame with the columns in the module docstring; `attrs` holds n_actions and feature names.

    Raises:
        ValueError: For missing columns (all are named), positions below 1, clicks other than 0 / 1, item
            ids absent from the item context (rows named).
    """
    raw = _read_csv(log_csv)
    missing = [c for c in LOG_COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(f"{log_csv}: missing OBD column(s) {missing}; found {list(raw.columns)[:12]}")

    position = raw["position"].to_numpy()
    bad = ~(position >= 1)
    if bad.any():
        raise ValueError(f"{log_csv}: OBD positions are 1-based; {describe_rows(bad)} have position < 1")
    click = raw["click"].to_numpy()
    bad = ~np.isin(click, (0, 1))
    if bad.any():
        raise ValueError(f"{log_csv}: click must be 0 or 1; {describe_rows(bad)} are not")

    user_cols = _numbered(raw, "user_feature_")
    affinity_cols = _numbered(raw, "user-item_affinity_")
    user_x, user_names = encode_features(raw, user_cols)
    affinity = raw[affinity_cols].to_numpy(dtype=np.float64)

    df = pd.DataFrame(
        {
            "timestamp": pd.to_datetime(raw["timestamp"], utc=True),
            "action": raw["item_id"].to_numpy(dtype=np.int64),
            "position": (position - 1).astype(np.int64),
            "reward": click.astype(np.float64),
            "click": click.astype(np.int64),
            "propensity": raw["propensity_score"].to_numpy(dtype=np.float64),
            "user_features": list(user_x),
            "user_item_affinity": list(affinity),
        }
    )
    n_actions = len(affinity_cols) if affinity_cols else int(df["action"].max()) + 1
    df.attrs["user_feature_names"] = user_names

    if item_context_csv is not None:
        items = _read_csv(item_context_csv)
        if "item_id" not in items.columns:
            raise ValueError(
                f"{item_context_csv}: missing OBD column(s) ['item_id']; found {list(items.columns)}"
            )
        dup = items["item_id"].duplicated().to_numpy()
        if dup.any():
            raise ValueError(f"{item_context_csv}: item_id must be unique; {describe_rows(dup)} repeat one")
        item_x, item_names = encode_features(items, _numbered(items, "item_feature_"))
        lookup = pd.Index(items["item_id"].to_numpy(dtype=np.int64)).get_indexer(df["action"])  # -1 if absent
        bad = lookup < 0
        if bad.any():
            raise ValueError(
                f"{log_csv}: item_id missing from {item_context_csv}; {describe_rows(bad)} "
                f"(ids {df['action'].to_numpy()[bad][:5].tolist()})"
            )
        df["item_features"] = list(item_x[lookup])
        df.attrs["item_feature_names"] = item_names
        n_actions = max(n_actions, int(items["item_id"].max()) + 1)

    df.attrs["n_actions"] = n_actions
    return df


def to_logged_bandit(
    df: pd.DataFrame,
    context: tuple[str, ...] = ("user_features",),
    n_actions: int | None = None,
) -> LoggedBandit:
    """Convert a `read_obd` table to a validated `LoggedBandit`.

    Args:
        df: Output of `read_obd` (or the Parquet written by `main`).
        context: List columns concatenated into the context matrix; () for none.
        n_actions: Number of items; defaults to ``df.attrs["n_actions"]``.

    Returns:
        The log, with the OBD's 0-based positions and marginal propensities.
    """
    missing = [c for c in context if c not in df.columns]
    if missing:
        raise ValueError(f"missing context column(s) {missing}; the DataFrame has {list(df.columns)}")
    log = LoggedBandit.from_dataframe(df, n_actions=n_actions)
    if not context:
        return log
    ctx = np.hstack([stack_vectors(df[c], name=c) for c in context])
    return LoggedBandit(log.action, log.reward, log.propensity, log.position, ctx, log.n_actions)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_parquet_atomic(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write Parquet to a temporary sibling, then rename, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_choice(policy: str, campaign: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if campaign not in CAMPAIGNS:
        raise ValueError(f"campaign must be one of {CAMPAIGNS}, got {campaign!r}")


def extract_obd_sample(
    wheel: str | os.PathLike, dest_dir: str | os.PathLike, policy: str = "random", campaign: str = "all"
) -> tuple[Path, Path]:
    """Copy one policy/campaign sample (log CSV and item_context.csv) out of an obp wheel.

    Args:
        wheel: Path to the obp `.whl` (a zip file).
        dest_dir: Folder; files land in `dest_dir/policy/campaign/`.
        policy: "random" or "bts".
        campaign: "all", "men" or "women".

    Returns:
        (log CSV path, item_context.csv path).
    """
    _check_choice(policy, campaign)
    out = Path(dest_dir) / policy / campaign
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"obp/dataset/obd/{policy}/{campaign}/"
    paths = []
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for member in (f"{prefix}{campaign}.csv", f"{prefix}item_context.csv"):
            if member not in names:
                raise ValueError(f"{wheel} has no {member}; is it an obp wheel with the OBD sample?")
            target = out / Path(member).name
            _write_atomic(target, zf.read(member))
            paths.append(target)
    return paths[0], paths[1]


def fetch_obd_sample(
    dest_dir: str | os.PathLike, policy: str = "random", campaign: str = "all", version: str = OBP_VERSION
) -> tuple[Path, Path]:
    """Download the obp wheel with pip (no dependencies) and extract one OBD sample. Needs network.

    Args:
        dest_dir: Folder for the CSVs (`dest_dir/policy/campaign/`).
        policy: "random" or "bts".
        campaign: "all", "men" or "women".
        version: obp version to download.

    Returns:
        (log CSV path, item_context.csv path).
    """
    _check_choice(policy, campaign)
    with tempfile.TemporaryDirectory(prefix="obp-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"obp=={version}", "--no-deps", "--only-binary=:all:"]
        proc = subprocess.run([*cmd, "-d", tmp], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("obp-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        return extract_obd_sample(wheels[0], dest_dir, policy, campaign)


@dataclass(frozen=True)
class Args:
    """CLI of `python -m gpr_sim.data.obd`: fetch (or take local) OBD CSVs and write Parquet."""

    fetch: bool = False
    """Download the sample from the obp wheel (needs network)."""
    log_csv: str | None = None
    """Convert this local log CSV instead of fetching."""
    item_context_csv: str | None = None
    """Local item_context.csv to join (only with --log-csv)."""
    out: str = "data/obd"
    """Output folder: raw CSVs under raw/, Parquet as obd_{policy}_{campaign}.parquet."""
    policy: str = "random"
    """Behaviour policy of the sample: random or bts."""
    campaign: str = "all"
    """Campaign of the sample: all, men or women."""
    obp_version: str = OBP_VERSION
    """obp release to download."""

    def __post_init__(self) -> None:
        if self.fetch == (self.log_csv is not None):
            raise ValueError("exactly one of fetch (--fetch) or log_csv (--log-csv PATH) must be given")
        if self.item_context_csv is not None and self.log_csv is None:
            raise ValueError("item_context_csv is only used with log_csv")
        _check_choice(self.policy, self.campaign)


def main(argv: list[str] | None = None) -> Path:
    """Parse flags into `Args`, read the OBD CSVs, write Parquet atomically; returns the Parquet path."""
    parser = argparse.ArgumentParser(description=Args.__doc__)
    parser.add_argument("--fetch", action="store_true", help="download the sample from the obp wheel")
    parser.add_argument("--log-csv", default=None, help="local OBD log CSV to convert")
    parser.add_argument("--item-context-csv", default=None, help="local item_context.csv")
    parser.add_argument("--out", default=Args.out, help="output folder")
    parser.add_argument("--policy", default=Args.policy, choices=POLICIES)
    parser.add_argument("--campaign", default=Args.campaign, choices=CAMPAIGNS)
    parser.add_argument("--obp-version", default=OBP_VERSION)
    args = Args(**vars(parser.parse_args(argv)))

    log_csv, item_csv = args.log_csv, args.item_context_csv
    if args.fetch:
        log_csv, item_csv = fetch_obd_sample(
            Path(args.out) / "raw", args.policy, args.campaign, args.obp_version
        )
    df = read_obd(log_csv, item_csv)
    log = to_logged_bandit(df)  # validates before anything is written
    path = write_parquet_atomic(df, Path(args.out) / f"obd_{args.policy}_{args.campaign}.parquet")
    print(
        f"{path}: {len(log)} rows, {log.n_actions} items, {log.n_positions} positions, "
        f"ctr={log.reward.mean():.4f}, context dim={0 if log.context is None else log.context.shape[1]}"
    )
    return path


if __name__ == "__main__":
    main()
