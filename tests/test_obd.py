"""Open Bandit Dataset reader on a hand-made 20-row fixture in the OBD format (no downloads)."""

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpr_sim.data.obd import Args, extract_obd_sample, main, read_obd, to_logged_bandit
from gpr_sim.data.ope import ips, snips

FIXTURE = Path(__file__).parent / "fixtures" / "obd" / "bts" / "all"
LOG_CSV, ITEM_CSV = FIXTURE / "all.csv", FIXTURE / "item_context.csv"


@pytest.fixture(scope="module")
def df():
    return read_obd(LOG_CSV, ITEM_CSV)


def test_schema_and_dtypes(df):
    assert list(df.columns) == [
        "timestamp",
        "action",
        "position",
        "reward",
        "click",
        "propensity",
        "user_features",
        "user_item_affinity",
        "item_features",
    ]
    assert len(df) == 20
    assert isinstance(df["timestamp"].dtype, pd.DatetimeTZDtype) and str(df["timestamp"].dt.tz) == "UTC"
    for col in ("action", "position", "click"):
        assert df[col].dtype == np.int64, col
    for col in ("reward", "propensity"):
        assert df[col].dtype == np.float64, col
    assert all(v.dtype == np.float64 for v in df["user_features"])
    assert df.attrs["n_actions"] == 5


def test_positions_become_zero_based(df):
    raw = pd.read_csv(LOG_CSV)
    # the raw file uses slots 1..3
    assert sorted(raw["position"].unique()) == [1, 2, 3]
    assert sorted(df["position"].unique()) == [0, 1, 2]
    np.testing.assert_array_equal(df["position"].to_numpy(), raw["position"].to_numpy() - 1)
    np.testing.assert_array_equal(df["reward"].to_numpy(), raw["click"].to_numpy())
    assert df["reward"].sum() == 4  # clicks on rows 2, 7, 13, 18


def test_feature_encoding_by_hand(df):
    # user_feature_0 categories sorted: [7f3a9c, c41d02]; _1: [0b8e5f, 5d21aa, e9c470]; _2: [31f0bd, a86e13]
    assert df.attrs["user_feature_names"][:3] == [
        "user_feature_0=7f3a9c",
        "user_feature_0=c41d02",
        "user_feature_1=0b8e5f",
    ]
    # row 0 has (7f3a9c, 0b8e5f, 31f0bd) -> one-hot slots 0, 2, 5 of 7
    assert df["user_features"].iloc[0].tolist() == [1, 0, 1, 0, 0, 1, 0]
    # row 2 has (c41d02, e9c470, a86e13) -> slots 1, 4, 6
    assert df["user_features"].iloc[2].tolist() == [0, 1, 0, 0, 1, 0, 1]
    assert df["user_item_affinity"].iloc[2].tolist() == [0, 0, 0, 0, 2]
    # row 0 shows item 3: item_feature_0 = -1.0, item_feature_1 = 2e77b4 (first of [2e77b4, 9a0c11, d5f8a2]),
    # item_feature_2 = f01c3e (second of [4be2d7, f01c3e])
    assert df["item_features"].iloc[0].tolist() == [-1.0, 1, 0, 0, 0, 1]


def test_round_trip_to_logged_bandit(df):
    log = to_logged_bandit(df)
    assert (len(log), log.n_actions, log.n_positions) == (20, 5, 3)
    assert log.context.shape == (20, 7)
    np.testing.assert_array_equal(log.action, df["action"].to_numpy())
    np.testing.assert_array_equal(log.position, df["position"].to_numpy())
    np.testing.assert_array_equal(log.propensity, df["propensity"].to_numpy())
    wide = to_logged_bandit(df, context=("user_features", "user_item_affinity"))
    assert wide.context.shape == (20, 7 + 5)
    assert to_logged_bandit(df, context=()).context is None


def test_estimators_on_fixture(df):
    log = to_logged_bandit(df)
    # policy "always show item 4": item 4 is on rows 2 (click, p .25), 8 (p .2), 14 (p .1), 18 (click, p .5)
    pi_e = (log.action == 4).astype(float)
    # IPS = (1/.25 + 1/.5) / 20 = 6 / 20;  SNIPS = 6 / (1/.25 + 1/.2 + 1/.1 + 1/.5) = 6 / 21
    assert ips(log, pi_e).value == pytest.approx(0.3)
    assert snips(log, pi_e).value == pytest.approx(6 / 21)


def test_cli_writes_parquet_that_round_trips(df, tmp_path):
    path = main(["--log-csv", str(LOG_CSV), "--item-context-csv", str(ITEM_CSV), "--out", str(tmp_path)])
    assert path == tmp_path / "obd_random_all.parquet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obd_random_all.parquet"]  # no temp file left
    back = pd.read_parquet(path)
    pd.testing.assert_frame_equal(
        back.drop(columns=["user_features", "user_item_affinity", "item_features"]),
        df.drop(columns=["user_features", "user_item_affinity", "item_features"]),
    )
    assert back.attrs["n_actions"] == 5
    np.testing.assert_array_equal(to_logged_bandit(back).context, to_logged_bandit(df).context)


def _write_variant(tmp_path, edit) -> Path:
    raw = pd.read_csv(LOG_CSV, index_col=0)
    path = tmp_path / "log.csv"
    edit(raw).to_csv(path)
    return path


def test_missing_columns_are_named(tmp_path):
    path = _write_variant(tmp_path, lambda d: d.drop(columns=["propensity_score", "click"]))
    with pytest.raises(ValueError, match=r"missing OBD column\(s\) \['click', 'propensity_score'\]"):
        read_obd(path)


def test_bad_values_name_the_rows(tmp_path):
    def zero_based(d):
        d.loc[[4, 9], "position"] = 0
        return d

    with pytest.raises(ValueError, match=r"1-based; rows \[4, 9\]"):
        read_obd(_write_variant(tmp_path, zero_based))

    def bad_propensity(d):
        d.loc[6, "propensity_score"] = 0.0
        return d

    with pytest.raises(ValueError, match=r"propensity must be in \(0, 1\]; rows \[6\]"):
        to_logged_bandit(read_obd(_write_variant(tmp_path, bad_propensity)))

    items = tmp_path / "items.csv"
    pd.read_csv(ITEM_CSV, index_col=0).query("item_id != 4").to_csv(items)
    with pytest.raises(ValueError, match=r"item_id missing from .*rows \[2, 8, 14, 18\]"):
        read_obd(LOG_CSV, items)


def test_extract_from_wheel(tmp_path):
    # a stand-in wheel with the same member layout as obp's
    wheel = tmp_path / "obp-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(LOG_CSV, "obp/dataset/obd/bts/men/men.csv")
        zf.write(ITEM_CSV, "obp/dataset/obd/bts/men/item_context.csv")
    log_csv, item_csv = extract_obd_sample(wheel, tmp_path / "raw", policy="bts", campaign="men")
    assert log_csv == tmp_path / "raw" / "bts" / "men" / "men.csv"
    assert log_csv.read_bytes() == LOG_CSV.read_bytes() and item_csv.read_bytes() == ITEM_CSV.read_bytes()
    with pytest.raises(ValueError, match="has no obp/dataset/obd/random/all/all.csv"):
        extract_obd_sample(wheel, tmp_path / "raw", policy="random", campaign="all")
    with pytest.raises(ValueError, match="policy must be one of"):
        extract_obd_sample(wheel, tmp_path, policy="greedy")


def test_cli_args_validation():
    with pytest.raises(ValueError, match="exactly one of fetch"):
        Args()
    with pytest.raises(ValueError, match="exactly one of fetch"):
        Args(fetch=True, log_csv="x.csv")
    with pytest.raises(ValueError, match="campaign must be one of"):
        Args(fetch=True, campaign="kids")
