"""Request logs: schema, exact Parquet round trip, accounting in collected logs, bad-file errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from agents.collection import FINAL_COLUMNS, collect
from agents.policies import make_policy
from envs import make_vec_env
from gpr_sim.data import logs
from gpr_sim.data.logs import OPTIONAL_SCHEMA, SCHEMA, read_logs, stack_list_column, write_logs
from gpr_sim.world import WorldConfig

torch.set_num_threads(1)

NUM_ENVS, STEPS = 16, 40
# Three candidates, two slots and delayed conversions exercise every column.
CFG = WorldConfig.small(num_candidates=3, num_slots=2, conversion_delay_mean=1.0)


@pytest.fixture(scope="module")
def collected():
    env = make_vec_env("ads-v0", NUM_ENVS, config=CFG, world_seed=0, device="cpu")
    columns, _ = collect(
        env, make_policy("cascade-privileged", env, seed=0), seed=0, steps=STEPS, progress=False
    )
    return columns


@pytest.fixture(scope="module")
def written(collected, tmp_path_factory):
    path = tmp_path_factory.mktemp("logs") / "log.parquet"
    write_logs(
        collected, path, world_config=CFG, seed=0, policy="cascade-privileged", extra={"num_envs": NUM_ENVS}
    )
    return path


HAND_CFG = WorldConfig.small(
    num_ads=20, organic_history=2, ad_history=2, initial_ad_history=2, budget_settlement="in_order"
)
"""the world of `hand_columns`: two-item histories (`read_logs` checks the widths and id ranges against it); its
dict lacks ``budget_settlement``, which reads back as the rule of logs from before the field"""


def hand_columns(n: int = 2) -> dict[str, np.ndarray]:
    """A minimal valid log of n requests of the world ``HAND_CFG``, one candidate and one slot, written out by hand."""
    z = np.zeros(n, dtype=np.int64)
    return {
        "request_id": np.arange(n),
        "episode_id": z,
        "step": np.arange(n),
        "user_id": z + 7,
        "user_features": np.full((n, 2), 0.5, np.float32),
        "organic_ids": np.array([[3, -1]] * n),
        "context": np.zeros((n, 3), np.float32),
        "ad_ids": np.array([[-1, 4]] * n),
        "ad_events": np.array([[0, 2]] * n),
        "candidates": np.array([[11], [12]])[:n],
        "action": np.array([11, 12])[:n],
        "propensity": np.array([0.25, 1.0])[:n],
        "shown_ad": np.array([[11], [-1]])[:n],
        "position": np.array([0, -1])[:n],
        "impression": np.array([1, 0])[:n],
        "click": np.array([1, 0])[:n],
        "conversion": np.array([1, 0])[:n],
        "gmv": np.array([100.0, 0.0])[:n],
        "delayed_conversion": z,
        "delayed_gmv": np.zeros(n),
        "revenue": np.array([0.04, 0.0])[:n],
        "reward": np.array([2.04, 0.0])[:n],
        "p_click": np.array([0.1, 0.0])[:n],
        "p_conversion": np.array([0.2, 0.0])[:n],
        "is_new_ad": np.array([True, False])[:n],
        "activity_tier": z + 3,
        "terminated": np.array([False, True])[:n],
        "truncated": np.zeros(n, bool),
    }


# ----------------------------------------------------------------------------- schema and round trip


def test_schema_columns_and_dtypes(written):
    df, meta = read_logs(written)
    assert list(df.columns) == SCHEMA.names + list(OPTIONAL_SCHEMA.names)
    assert len(df) == NUM_ENVS * STEPS == 640
    scalar = {"int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}
    for f in SCHEMA:
        if pa.types.is_list(f.type):
            want = np.float32 if f.type.value_type == pa.float32() else np.int64
            assert all(cell.dtype == want for cell in df[f.name]), f.name
        else:
            assert scalar[str(df[f.name].dtype)] == f.type, f.name
    widths = {
        "user_features": 7,
        "organic_ids": 16,
        "context": 8,
        "ad_ids": 16,
        "ad_events": 16,
        "candidates": 3,
        "shown_ad": 2,
    }
    for name, d in widths.items():
        assert stack_list_column(df, name).shape == (640, d), name
    assert WorldConfig.from_dict(meta["world_config"]) == CFG
    assert (meta["seed"], meta["policy"], meta["num_envs"], meta["format_version"]) == (
        0,
        "cascade-privileged",
        16,
        1,
    )


def test_round_trip_gives_identical_arrays(collected, written):
    df, _ = read_logs(written)
    for name in SCHEMA.names:
        back = stack_list_column(df, name) if collected[name].ndim == 2 else df[name].to_numpy()
        assert back.dtype == collected[name].dtype, name
        np.testing.assert_array_equal(back, collected[name], err_msg=name)
    for name in FINAL_COLUMNS:  # null exactly where masked, identical values elsewhere
        kept = ~np.ma.getmaskarray(collected[name]).all(1)
        assert (df[name].notna().to_numpy() == kept).all(), name
        np.testing.assert_array_equal(
            stack_list_column(df[kept], name), collected[name].data[kept], err_msg=name
        )


def test_dataframe_and_batches_write_the_same_file(collected, written, tmp_path):
    df, meta = read_logs(written)
    again = write_logs(
        df, tmp_path / "again.parquet", world_config=meta["world_config"], seed=0, policy="cascade-privileged"
    )
    half = len(df) // 2
    halves = [{k: v[:half] for k, v in collected.items()}, {k: v[half:] for k, v in collected.items()}]
    split = write_logs(
        halves, tmp_path / "split.parquet", world_config=CFG, seed=0, policy="cascade-privileged"
    )
    for path in (again, split):
        other, _ = read_logs(path)
        assert list(other.columns) == list(df.columns) and len(other) == len(df)
        for name in df.columns:
            a, b = df[name].to_numpy(), other[name].to_numpy()
            if a.dtype == object:  # list cells: compare row by row (None for null final observations)
                assert all((x is None and y is None) or np.array_equal(x, y) for x, y in zip(a, b)), name
            else:
                np.testing.assert_array_equal(a, b, err_msg=name)


def test_hand_made_log_reads_back(tmp_path):
    path = write_logs(
        hand_columns(),
        tmp_path / "hand.parquet",
        world_config={"num_ads": 20, "organic_history": 2, "ad_history": 2, "initial_ad_history": 2},
        seed=3,
        policy="h",
    )
    df, meta = read_logs(path)
    assert df["reward"].tolist() == [2.04, 0.0]  # 0.04 revenue + 0.02 x 100 GMV; an empty request
    assert df["position"].tolist() == [0, -1]
    assert df["organic_ids"][0].tolist() == [3, -1] and df["context"][1].dtype == np.float32
    assert df["is_new_ad"].tolist() == [True, False] and df["terminated"].tolist() == [False, True]
    assert meta["seed"] == 3 and meta["policy"] == "h"
    assert meta["world_config"] == json.loads(
        json.dumps(HAND_CFG.to_dict())
    )  # a partial dict is recorded complete


# ----------------------------------------------------------------------------- accounting


def test_accounting_per_request(written):
    df, _ = read_logs(written)
    imp, clk, conv = (df[c].to_numpy() for c in ("impression", "click", "conversion"))
    assert (conv <= clk).all() and (clk <= imp).all() and (imp <= CFG.num_slots).all()
    assert clk.sum() > 0 and imp.sum() > 0  # the checks are not vacuous
    shown = stack_list_column(df, "shown_ad")
    np.testing.assert_array_equal((shown >= 0).sum(1), imp)
    pos = df["position"].to_numpy()
    assert ((pos == -1) == (imp == 0)).all()
    np.testing.assert_array_equal(pos[imp > 0], (shown >= 0).argmax(1)[imp > 0])  # budgets can empty slot 0
    p = df["propensity"].to_numpy()
    assert ((p > 0) & (p <= 1)).all()
    np.testing.assert_array_equal(df["action"].to_numpy(), stack_list_column(df, "candidates")[:, 0])
    np.testing.assert_array_equal(df["request_id"].to_numpy(), np.arange(len(df)))
    assert ((df["p_click"] > 0) == (shown[:, 0] >= 0)).all()
    # default reward weights: revenue + 0.02 x (GMV reported now + delayed GMV); float32 in the env
    expect = df["revenue"] + 0.02 * (df["gmv"] + df["delayed_gmv"])
    np.testing.assert_allclose(df["reward"], expect, rtol=1e-5, atol=1e-6)
    assert df["delayed_conversion"].sum() > 0  # conversion_delay_mean=1 reports some later


def test_episodes_are_consecutive_and_end_once(written):
    df, _ = read_logs(written)
    df = df.sort_values(["episode_id", "step"])
    g = df.groupby("episode_id")
    assert (g["step"].min() == 0).all()  # every session starts inside the log (collection starts at reset)
    assert (g["step"].max() - g["step"].min() + 1 == g.size()).all()  # no gaps
    ended = df["terminated"] | df["truncated"]
    last = df.groupby("episode_id").tail(1).index
    assert not ended.drop(index=last).any()  # a session ends only at its last row
    final_kept = df["final_context"].notna()
    last_step = df["request_id"] >= len(df) - NUM_ENVS
    assert (final_kept == (ended | last_step)).all()
    assert (df.loc[df["truncated"], "step"] == CFG.max_steps - 1).all()


# ----------------------------------------------------------------------------- errors


def test_missing_columns_are_named(tmp_path):
    cols = hand_columns()
    del cols["reward"], cols["click"]
    path = tmp_path / "partial.parquet"
    pq.write_table(logs._table_from_columns(cols), path)
    with pytest.raises(ValueError, match=r"missing log column\(s\) \['click', 'reward'\]"):
        read_logs(path)
    with pytest.raises(ValueError, match=r"missing log column\(s\) \['click', 'reward'\]"):
        write_logs(cols, tmp_path / "x.parquet", world_config={}, seed=0, policy="p")


def test_non_parquet_and_missing_files(tmp_path):
    path = tmp_path / "notes.parquet"
    path.write_text("request_id,reward\n0,1.0\n")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        read_logs(path)
    with pytest.raises(FileNotFoundError, match="no log file"):
        read_logs(tmp_path / "absent.parquet")


def test_invalid_world_config_is_refused_at_write(tmp_path):
    with pytest.raises(
        ValueError, match=r"world_config is invalid: unknown WorldConfig field\(s\): \['num_adz'\]"
    ):
        write_logs(hand_columns(), tmp_path / "x.parquet", world_config={"num_adz": 20}, seed=0, policy="p")
    assert not (tmp_path / "x.parquet").exists()


def test_uncastable_column_is_named(tmp_path):
    df, _ = read_logs(
        write_logs(hand_columns(), tmp_path / "ok.parquet", world_config=HAND_CFG, seed=0, policy="p")
    )
    df["propensity"] = ["high", "low"]
    with pytest.raises(ValueError, match=r"column 'propensity' has type \w*string, expected double"):
        write_logs(df, tmp_path / "bad.parquet", world_config=HAND_CFG, seed=0, policy="p")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_logs(hand_columns(), tmp_path / "log.parquet", world_config=HAND_CFG, seed=0, policy="old")

    def broken(table, where):
        open(where, "wb").write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(logs.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_logs(hand_columns(1), path, world_config=HAND_CFG, seed=0, policy="new")
    monkeypatch.undo()
    df, meta = read_logs(path)
    assert len(df) == 2 and meta["policy"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["log.parquet"]  # no temporary file left behind
