"""Bad inputs stop at once with one clear line: broken logs at load, logs of another world, unsafe files.

Each test reproduces a case that used to run on (a NaN model, a KeyError, an IndexError, a numpy broadcast
error, torch's advice to load code) and asserts the exception type and that the message names the file and
the column, flag or object at fault. The logs are tiny and built by hand; nothing trains.
"""

import json
import pickle
import re
import traceback

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from agents import ope, pretrain
from agents.evaluation import offpolicy
from gpr_sim.data.logs import (
    check_run_world,
    check_same_world,
    check_tokenizer_world,
    read_log_meta,
    read_logs,
    validate_log,
    write_logs,
)
from gpr_sim.runs import load_torch
from gpr_sim.tokenizer.compare import main as compare_main
from gpr_sim.tokenizer.ids import SemanticIdTable
from gpr_sim.tokenizer.rq_kmeans import read_payload
from gpr_sim.tokenizer.world import WorldTokenizer, world_fingerprint
from gpr_sim.world import WorldConfig, generate_world

torch.set_num_threads(1)

# a tiny world: two-item histories keep the hand-made rows short
CFG = WorldConfig.small(
    num_organic=40,
    num_ads=20,
    num_advertisers=5,
    num_users=50,
    organic_history=2,
    ad_history=2,
    initial_ad_history=2,
)
N = 30
"""rows of a tiny log: 20% of them are 6 rows"""
BAD_ROWS = np.arange(0, N, 5)  # rows 0, 5, 10, 15, 20, 25
META = {"env": "ads-v0", "world_seed": 0, "num_envs": 5, "steps": 6}


def tiny_columns(n: int = N) -> dict[str, np.ndarray]:
    """A valid log of ``n`` requests in the world ``CFG``: 5 sessions (slots) x n/5 steps, one ad shown each."""
    i = np.arange(n)
    z = np.zeros(n, dtype=np.int64)
    ads = i % CFG.num_ads
    return {
        "request_id": i,
        "episode_id": i % 5,
        "step": i // 5,
        "user_id": i % 5,
        "user_features": np.full((n, 7), 0.5, np.float32),
        "organic_ids": np.tile([3, -1], (n, 1)),
        "context": np.zeros((n, 8), np.float32),
        "ad_ids": np.tile([-1, 4], (n, 1)),
        "ad_events": np.tile([0, 2], (n, 1)),
        "candidates": ads[:, None],
        "action": ads,
        "propensity": np.full(n, 0.05),
        "shown_ad": ads[:, None],
        "position": z,
        "impression": z + 1,
        "click": z,
        "conversion": z,
        "gmv": np.zeros(n),
        "delayed_conversion": z,
        "delayed_gmv": np.zeros(n),
        "revenue": np.full(n, 0.01),
        "reward": np.full(n, 0.01),
        "p_click": np.full(n, 0.05),
        "p_conversion": np.full(n, 0.1),
        "is_new_ad": np.zeros(n, bool),
        "activity_tier": z + 3,
        "terminated": np.zeros(n, bool),
        "truncated": np.zeros(n, bool),
    }


def tiny_log(path, columns=None, world_seed: int = 0, **changes):
    """Write ``tiny_columns`` (or ``columns``) with some columns replaced; provenance of world ``world_seed``."""
    cols = {**(columns if columns is not None else tiny_columns()), **changes}
    return write_logs(
        cols,
        path,
        world_config=CFG,
        seed=0,
        policy="cascade-privileged",
        extra={**META, "world_seed": world_seed},
    )


def with_values(name: str, rows: np.ndarray, value) -> np.ndarray:
    arr = tiny_columns()[name].astype(np.float64)
    arr[rows] = value
    return arr


def tiny_tokenizer(world_seed: int) -> WorldTokenizer:
    """A tokenizer table (4 codes, one level) stamped with the fingerprint of world ``world_seed`` of ``CFG``."""
    codes = torch.arange(CFG.num_organic + CFG.num_ads)[:, None] % 4
    table = SemanticIdTable(codes, codebook_size=4, num_organic=CFG.num_organic)
    return WorldTokenizer(table, fingerprint=world_fingerprint(generate_world(CFG, world_seed)))


# ----------------------------------------------------------------------------- non-finite data


@pytest.mark.parametrize(
    "column, value, rows_text",
    [
        ("p_click", np.nan, "rows 0, 5, 10, 15, 20, ..."),
        ("revenue", np.inf, "rows 0, 5, 10, 15, 20, ..."),
        ("propensity", -np.inf, "rows 0, 5, 10, 15, 20, ..."),
    ],
)
def test_non_finite_column_stops_the_load_naming_column_count_and_rows(tmp_path, column, value, rows_text):
    path = tiny_log(tmp_path / "bad.parquet", **{column: with_values(column, BAD_ROWS, value)})
    with pytest.raises(ValueError) as e:
        read_logs(path)
    # 6 of 30 rows (20%), the first five listed
    assert str(e.value) == f"{path}: column {column} has 6 non-finite values ({rows_text})"


def test_nan_written_through_pandas_is_caught_too(tmp_path):
    # pandas -> Parquet stores a NaN as null: still a non-finite value of that column
    df = pd.DataFrame({k: list(v) if v.ndim == 2 else v for k, v in tiny_columns().items()})
    df.loc[[3, 17, 21], "p_click"] = np.nan
    path = write_logs(df, tmp_path / "pd.parquet", world_config=CFG, seed=0, policy="cascade-privileged")
    with pytest.raises(ValueError, match=r"column p_click has 3 non-finite values \(rows 3, 17, 21\)$"):
        read_logs(path)


def test_non_finite_list_values_and_every_bad_column_are_named(tmp_path):
    context = tiny_columns()["context"].copy()
    context[[4, 9], 2] = np.nan
    path = tiny_log(tmp_path / "bad.parquet", context=context, gmv=with_values("gmv", np.array([7]), np.inf))
    with pytest.raises(ValueError) as e:
        read_logs(path)
    msg = str(e.value)
    assert (
        msg
        == f"{path}: column context has 2 non-finite values (rows 4, 9); column gmv has 1 non-finite value (row 7)"
    )


def test_optional_final_columns_are_checked_only_where_they_hold_a_row(tmp_path):
    # final_* columns are null where the next row holds the observation; the writer keeps whatever data
    # lies behind a null row, so a NaN there is no value, but one in a kept row is
    data = np.zeros((N, 8), np.float32)
    data[:, 0] = np.nan
    kept = np.zeros(N, bool)
    kept[[4, 9]] = True
    data[9, 0] = 0.5  # row 4 keeps its NaN, row 9 is finite
    mask = np.broadcast_to(~kept[:, None], data.shape)
    path = tiny_log(tmp_path / "final.parquet", final_context=np.ma.MaskedArray(data, mask=mask))
    with pytest.raises(ValueError, match=r"column final_context has 1 non-finite value \(row 4\)$"):
        read_logs(path)
    data[4, 0] = 0.0
    df, _ = read_logs(tiny_log(tmp_path / "ok.parquet", final_context=np.ma.MaskedArray(data, mask=mask)))
    assert df["final_context"].notna().tolist() == kept.tolist()


@pytest.mark.parametrize("stage", ["mtp", "vaft"])
def test_pretraining_on_a_nan_log_stops_before_training(tmp_path, stage):
    # used to exit 0 with a NaN model (VAFT weights and value targets read p_click and revenue)
    path = tiny_log(tmp_path / "nan.parquet", p_click=with_values("p_click", BAD_ROWS, np.nan))
    init = ["--init", str(tmp_path / "mtp" / "checkpoint.pt")] if stage == "vaft" else []
    argv = ["--stage", stage, *init, "--logs", str(path), "--out", str(tmp_path / stage), "--no-progress"]
    with pytest.raises(ValueError, match=r"nan\.parquet: column p_click has 6 non-finite values"):
        pretrain.main(argv)
    assert not (tmp_path / stage / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- metadata and ids


def test_log_without_metadata_names_the_file(tmp_path):
    good = tiny_log(tmp_path / "good.parquet")
    bare = tmp_path / "bare.parquet"
    pq.write_table(pq.read_table(good).replace_schema_metadata(None), bare)
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(bare))} has no gpr_sim metadata \(Parquet key 'gpr_sim.logs'\)"
    ):
        read_logs(bare)
    # agents.pretrain used to stop on KeyError: 'world_config'
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bare))} has no gpr_sim metadata"):
        pretrain.main(["--logs", str(bare), "--out", str(tmp_path / "run"), "--no-progress"])


def test_incomplete_metadata_is_named(tmp_path):
    table = pq.read_table(tiny_log(tmp_path / "good.parquet"))
    meta = json.loads(table.schema.metadata[b"gpr_sim.logs"])
    cases = {
        "no_policy": ({k: v for k, v in meta.items() if k != "policy"}, r"its metadata lacks \['policy'\]"),
        "partial_world": (
            {**meta, "world_config": {"num_ads": 20}},
            r"metadata world_config lacks field\(s\) \[",
        ),
        "bad_world": (
            {**meta, "world_config": {**meta["world_config"], "num_ads": -1}},
            r"num_ads=-1 is out of range",
        ),
    }
    for name, (m, match) in cases.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table.replace_schema_metadata({b"gpr_sim.logs": json.dumps(m).encode()}), path)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*{match}"):
            read_logs(path)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*{match}"):
            read_log_meta(path)


@pytest.mark.parametrize(
    "column, value, why",
    [
        (
            "shown_ad",
            10**6,
            r"shown_ad has 1 value outside \[-1, 19\] \(-1 = empty slot, num_ads=20; e.g. 1000000\)",
        ),
        ("shown_ad", -2, r"shown_ad has 1 value outside \[-1, 19\]"),
        ("candidates", -1, r"candidates has 1 value outside \[0, 19\] \(num_ads=20"),
        ("user_id", 50, r"user_id has 1 value outside \[0, 49\] \(num_users=50"),
        ("ad_events", 4, r"ad_events has 1 value outside \[0, 3\]"),
        ("organic_ids", 40, r"organic_ids has 1 value outside \[-1, 39\]"),
        ("propensity", 0.0, r"propensity has 1 value outside \(0.0, 1.0\]"),
        ("p_click", 1.5, r"p_click has 1 value outside \[0.0, 1.0\]"),
    ],
)
def test_ids_outside_the_worlds_ranges_are_named(tmp_path, column, value, why):
    # agents.pretrain used to stop on IndexError for shown_ad 10**6
    arr = tiny_columns()[column].copy()
    arr = arr.astype(np.float64) if isinstance(value, float) else arr
    arr[12] = value  # a list column: every entry of row 12
    arr = arr if arr.ndim == 1 else np.where(np.arange(arr.shape[1]) == 0, arr, tiny_columns()[column])
    path = tiny_log(tmp_path / "bad.parquet", **{column: arr})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: column {why}.* \(row 12\)$"):
        read_logs(path)


def test_list_widths_must_match_the_world(tmp_path):
    path = tiny_log(tmp_path / "wide.parquet", organic_ids=np.tile([3, -1, -1], (N, 1)))
    with pytest.raises(
        ValueError, match=r"column organic_ids has 30 rows of length 3, expected organic_history=2"
    ):
        read_logs(path)


def test_empty_log_is_named(tmp_path):
    path = tiny_log(tmp_path / "empty.parquet", columns=tiny_columns(0))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} has no rows$"):
        read_logs(path)
    # agents.ope used to stop on "operands could not be broadcast together"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} has no rows$"):
        ope.main(["--logs", str(path), "--policy", "random", "--out", str(tmp_path / "o"), "--no-progress"])


def test_validate_log_accepts_a_good_log_in_memory():
    assert (
        validate_log(tiny_columns(), {"world_config": CFG.to_dict(), "seed": 0, "policy": "p"}, "mem") == CFG
    )
    with pytest.raises(ValueError, match="^mem: column reward has 1 non-finite value"):
        validate_log(
            {**tiny_columns(), "reward": with_values("reward", np.array([2]), np.nan)},
            {"world_config": CFG.to_dict(), "seed": 0, "policy": "p"},
            "mem",
        )


# ----------------------------------------------------------------------------- OPE propensities


def test_ope_nan_propensities_blame_the_log_not_the_resimulation(tmp_path):
    # used to read "re-simulation diverged from the log in column 'propensity'"
    path = tiny_log(tmp_path / "nanprop.parquet", propensity=with_values("propensity", BAD_ROWS, np.nan))
    with pytest.raises(ValueError, match=r"nanprop\.parquet: column propensity has 6 non-finite values") as e:
        ope.main(["--logs", str(path), "--policy", "random", "--out", str(tmp_path / "o"), "--no-progress"])
    assert "diverged" not in str(e.value)


def test_ope_names_a_non_finite_recomputed_propensity_and_a_cut_log():
    df = pd.DataFrame(
        {
            "request_id": np.arange(4),
            "reward": np.ones(4),
            "propensity": np.full(4, 0.5),
            "candidates": [np.array([1])] * 4,
        }
    )
    columns = {"candidates": np.ones((4, 1), np.int64), "reward": np.ones(4)}
    pi_b = np.array([0.5, np.nan, 0.5, np.nan])
    with pytest.raises(
        RuntimeError, match=r"recomputed propensity is not finite at request_id \[1, 3\] \(2 rows\)"
    ):
        offpolicy.check_reproduced(df, columns, {"pi_b": pi_b}, "log.parquet")
    with pytest.raises(ValueError, match=r"log.parquet has 3 rows, but its metadata .* re-simulates 4"):
        offpolicy.check_reproduced(df.iloc[:3], columns, {"pi_b": np.full(4, 0.5)}, "log.parquet")
    offpolicy.check_reproduced(df, columns, {"pi_b": np.full(4, 0.5)}, "log.parquet")  # a faithful one passes


# ----------------------------------------------------------------------------- logs of another world


def test_check_same_world_names_both_and_the_differences(tmp_path):
    meta = read_log_meta(tiny_log(tmp_path / "w0.parquet"))
    check_same_world(meta, CFG, 0, "w0.parquet", "--preset x")  # the same world passes
    with pytest.raises(
        ValueError, match=r"^w0.parquet and --preset x are of different worlds \(world_seed 0 vs 3\)$"
    ):
        check_same_world(meta, CFG, 3, "w0.parquet", "--preset x")
    with pytest.raises(ValueError, match=r"different worlds \(num_ads 20 vs 30, reward.gmv 0.02 vs 0.5\)$"):
        check_same_world(meta, CFG.replace(num_ads=30, reward={"gmv": 0.5}), 0, "w0.parquet", "--preset x")


def test_pretraining_with_a_tokenizer_of_another_world_is_refused(tmp_path):
    # used to train without complaint: the tokenizer's paths belong to another world's ads
    tiny_tokenizer(world_seed=1).save(tmp_path / "tok1")
    log = tiny_log(tmp_path / "w0.parquet", world_seed=0)
    argv = [
        "--logs",
        str(log),
        "--tokenizer",
        str(tmp_path / "tok1"),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    with pytest.raises(
        ValueError,
        match=rf"^tokenizer {re.escape(str(tmp_path / 'tok1'))} does not fit the world of {re.escape(str(log))}: .*another world",
    ):
        pretrain.main(argv)
    with pytest.raises(ValueError, match=r"does not fit the world of w0.parquet"):
        check_tokenizer_world(tiny_tokenizer(1), generate_world(CFG, 0), "w0.parquet", "tok1")
    check_tokenizer_world(tiny_tokenizer(0), generate_world(CFG, 0), "w0.parquet", "tok0")


def test_vaft_from_a_run_of_another_world_is_refused(tmp_path):
    # the --init run trained on a log of world seed 5 (its config.json records it, as agents.pretrain writes)
    init = tmp_path / "mtp"
    init.mkdir()
    other = tiny_log(tmp_path / "w5.parquet", world_seed=5)
    (init / "config.json").write_text(json.dumps({"logs_path": str(other)}))
    tiny_tokenizer(world_seed=0).save(tmp_path / "tok0")
    log = tiny_log(tmp_path / "w0.parquet", world_seed=0)
    argv = [
        "--stage",
        "vaft",
        "--init",
        str(init / "checkpoint.pt"),
        "--logs",
        str(log),
        "--tokenizer",
        str(tmp_path / "tok0"),
        "--out",
        str(tmp_path / "vaft"),
        "--no-progress",
    ]
    want = (
        rf"^{re.escape(str(log))} and --init {re.escape(str(init / 'checkpoint.pt'))} \(trained on "
        rf"{re.escape(str(other))}\) are of different worlds \(world_seed 0 vs 5\)$"
    )
    with pytest.raises(ValueError, match=want):
        pretrain.main(argv)
    check_run_world(read_log_meta(other), other, init, "--init")  # its own world passes
    check_run_world(
        read_log_meta(log), log, tmp_path / "no_such_run", "--init"
    )  # nothing recorded: not checked


# ----------------------------------------------------------------------------- unsafe torch files


class Payload:
    """Runs code when unpickled (what ``weights_only=False`` would allow)."""

    def __reduce__(self):
        return (print, ("code from the file ran",))


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch notes the pickle protocol of the crafted file
def test_torch_files_with_code_never_get_the_weights_only_false_advice(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "gpr_sim.test", "version": 1, "obj": Payload()}, path)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "semantic_ids.pt").write_bytes(path.read_bytes())
    loaders = {
        "not a checkpoint file": lambda: load_torch(path, "gpr_sim.test", 1, "a checkpoint file"),
        "not a readable tokenizer file": lambda: WorldTokenizer.load(tmp_path / "tok"),
        "not a readable quantizer file": lambda: read_payload(path),
        "not a readable embeddings file": lambda: compare_main(
            ["--embeddings", str(path), "--out", str(tmp_path)]
        ),
    }
    for what, load in loaders.items():
        with pytest.raises(ValueError) as e:
            load()
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path}/") and what in msg and "safe loading refuses: print" in msg, msg
        shown = "".join(traceback.format_exception(e.value))  # what a user sees, chained causes included
        assert "set to `False`" not in shown and "trust" not in shown, shown  # torch's advice, cut
    assert "code from the file ran" not in capsys.readouterr().out
    with pytest.raises(pickle.UnpicklingError):  # the refusal itself is torch's: nothing was loosened
        torch.load(path, weights_only=True)
