"""U/O/E/I token schema: a hand-checked layout, and identical tokens from an observation and its log row."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.ads import AdsEnv
from envs.market import BatchedMarket
from gpr_sim.schema import (
    NO_ID,
    TYPE_E,
    TYPE_I,
    TYPE_O,
    TYPE_U,
    SchemaConfig,
    TokenBatch,
    build_tokens,
    describe,
    tokens_from_logs,
    tokens_from_obs,
)
from gpr_sim.tokenizer import SemanticIdTable
from gpr_sim.world import WorldConfig

# 3 organic items, 2 ads, L = 2, K = 4. Organic 0 and ad 0 share (1, 2): digits 0 and 1 (ascending global id)
TINY = SemanticIdTable.from_parts(
    torch.tensor([[1, 2], [0, 3], [2, 2]]), torch.tensor([[1, 2], [3, 0]]), codebook_size=4
)


def tiny_obs(organic, ads, events):
    return {
        "user_id": torch.tensor([7]),
        "user": torch.arange(1, 8, dtype=torch.float32)[None],  # 1..7
        "organic": torch.tensor([organic]),
        "context": torch.arange(10, 18, dtype=torch.float32)[None],  # 10..17
        "ad_history": torch.tensor([ads]),
        "ad_events": torch.tensor([events]),
    }


def test_hand_checked_layout():
    b = tokens_from_obs(tiny_obs([-1, 2, 0], [-1, 1], [0, 2]), TINY, SchemaConfig(organic_len=3, ad_len=2))
    # T = 1 (U) + 3 (O) + 2 (I) + 1 (E) = 7 slots: U O O O I I E
    assert b.type_ids.tolist() == [[TYPE_U, TYPE_O, TYPE_O, TYPE_O, TYPE_I, TYPE_I, TYPE_E]]
    # ids: user 7 | organic pad, 2, 0 | ad pad, ad 1 = global 3 + 1 = 4 | E has none
    assert b.token_ids.tolist() == [[7, -1, 2, 0, -1, 4, -1]]
    assert b.padding_mask.tolist() == [[False, True, False, False, True, False, False]]
    # positions count real tokens: U 0, organic 2 -> 1, organic 0 -> 2, ad 1 -> 3, E -> 4; pads 0
    assert b.positions.tolist() == [[0, 0, 1, 2, 0, 3, 4]]
    # paths with the disambiguation digit: organic 2 (2,2,0), organic 0 (1,2,0), ad 1 (3,0,0)
    assert b.semantic_codes.tolist() == [
        [[-1, -1, -1], [-1, -1, -1], [2, 2, 0], [1, 2, 0], [-1, -1, -1], [3, 0, 0], [-1, -1, -1]]
    ]
    assert b.event_ids.tolist() == [[0, 0, 0, 0, 0, 2, 0]]  # the click on ad 1
    dense = b.dense_features[0]  # (T, 7 + 8)
    assert dense.shape == (7, 15)
    assert dense[0].tolist() == list(range(1, 8)) + [0.0] * 8  # U: user features, then zeros
    assert dense[6].tolist() == [0.0] * 7 + list(range(10, 18))  # E: zeros, then context
    assert dense[1:6].abs().sum() == 0
    assert describe(b).type.tolist() == ["U", "O", "O", "O", "I", "I", "E"]


@pytest.mark.parametrize(("ho", "hi"), [(3, 2), (0, 2), (3, 0), (0, 0)])
def test_schema_segments_are_the_runs_of_its_tokens(ho, hi):
    """The layout's runs known on the host equal what ``type_segments`` reads from a batch built with it (empty
    blocks leave no run)."""
    from gpr_sim.model.hsd import type_segments

    cfg = SchemaConfig(organic_len=ho, ad_len=hi)
    b = tokens_from_obs(tiny_obs([-1, 2, 0], [-1, 1], [0, 2]), TINY, cfg)
    assert cfg.segments == type_segments(b.type_ids.expand(3, -1))
    assert cfg.segments[-1][1] == cfg.seq_len


def test_shared_path_prefix_of_organic_and_ad_gets_distinct_full_paths():
    b = tokens_from_obs(tiny_obs([0], [0], [1]), TINY, SchemaConfig(organic_len=1, ad_len=1))
    # organic 0 and ad 0 both quantise to (1, 2); the extra digit tells them apart
    assert b.semantic_codes[0, 1].tolist() == [1, 2, 0]
    assert b.semantic_codes[0, 2].tolist() == [1, 2, 1]
    assert b.token_ids[0].tolist() == [7, 0, 3, NO_ID]


def test_longer_histories_keep_the_most_recent_and_shorter_ones_are_left_padded():
    b = tokens_from_obs(
        tiny_obs([0, 1, 2], [0, 1, 1], [1, 3, 2]), TINY, SchemaConfig(organic_len=2, ad_len=4)
    )
    assert b.token_ids[0].tolist() == [7, 1, 2, -1, 3, 4, 4, -1]  # organic 0 dropped; one ad pad on the left
    assert b.event_ids[0].tolist() == [0, 0, 0, 0, 1, 3, 2, 0]
    assert b.positions[0].tolist() == [0, 1, 2, 0, 3, 4, 5, 6]


def test_ids_outside_the_table_raise():
    cfg = SchemaConfig(organic_len=1, ad_len=1)
    with pytest.raises(ValueError, match="organic holds id 3"):
        tokens_from_obs(tiny_obs([3], [0], [1]), TINY, cfg)
    with pytest.raises(ValueError, match="ad_history holds id 2"):
        tokens_from_obs(tiny_obs([0], [2], [1]), TINY, cfg)
    with pytest.raises(ValueError, match="lacks key"):
        tokens_from_obs({"user_id": torch.tensor([0])}, TINY, cfg)
    with pytest.raises(ValueError, match="organic_len"):
        SchemaConfig(organic_len=-1)


@settings(max_examples=40, deadline=None)
@given(
    organic=st.lists(st.sampled_from([-1, 0, 1, 2]), min_size=0, max_size=6),
    ads=st.lists(st.sampled_from([-1, 0, 1]), min_size=0, max_size=6),
)
def test_layout_invariants(organic, ads):
    events = [1 if a >= 0 else 0 for a in ads]
    cfg = SchemaConfig(organic_len=4, ad_len=3)
    obs = tiny_obs(organic, ads, events)
    if not organic:
        obs["organic"] = torch.zeros(1, 0, dtype=torch.int64)
    if not ads:
        obs["ad_history"] = obs["ad_events"] = torch.zeros(1, 0, dtype=torch.int64)
    b = tokens_from_obs(obs, TINY, cfg)
    real = ~b.padding_mask[0]
    n = int(real.sum())
    assert b.positions[0][real].tolist() == list(range(n))  # real tokens numbered 0..n-1 in slot order
    assert b.positions[0, -1] == n - 1  # E last
    assert (b.semantic_codes[0][~real] == -1).all() and (b.token_ids[0][~real] == -1).all()
    items = b.token_ids[0, 1:-1]
    has_item = items >= 0
    assert torch.equal(b.semantic_codes[0, 1:-1][has_item], TINY.item_to_path[items[has_item]])


# ----------------------------------------------------------------------------------------------
# observation vs logged row


CFG = WorldConfig.small(
    num_organic=300, num_ads=80, num_users=200, organic_history=6, ad_history=5, initial_ad_history=2
)


def world_table(cfg: WorldConfig) -> SemanticIdTable:
    """Random codes with many collisions (K = 4, L = 2): exercises the disambiguation digit."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (cfg.num_organic + cfg.num_ads, 2), generator=gen)
    return SemanticIdTable(codes, codebook_size=4, num_organic=cfg.num_organic)


def log_rows(obs: dict, strip_padding: bool) -> pd.DataFrame:
    """What a logger writes for each request: one row, list columns (optionally without -1 padding)."""

    def lists(t, strip):
        rows = [r.tolist() for r in t]
        return [[v for v in r if v >= 0] for r in rows] if strip else rows

    keep = [r.tolist() for r in obs["ad_history"]]
    events = [r.tolist() for r in obs["ad_events"]]
    if strip_padding:
        events = [[e for e, a in zip(er, ar) if a >= 0] for er, ar in zip(events, keep)]
    return pd.DataFrame(
        {
            "user_id": obs["user_id"].numpy(),
            "user_features": [r.tolist() for r in obs["user"]],
            "organic_ids": lists(obs["organic"], strip_padding),
            "context": [r.tolist() for r in obs["context"]],
            "ad_ids": lists(obs["ad_history"], strip_padding),
            "ad_events": events,
        }
    )


def assert_same(a: TokenBatch, b: TokenBatch) -> None:
    for name, x, y in zip(TokenBatch._fields, a, b):
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), name


@pytest.mark.parametrize("strip_padding", [False, True])
def test_observation_and_its_logged_row_give_identical_tokens(strip_padding):
    market = BatchedMarket(CFG, num_envs=16, world_seed=0)
    obs = market.reset(seed=1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):  # histories fill up, some sessions restart (short and full histories mixed)
        obs, *_ = market.step(torch.randint(0, CFG.num_ads, (16, 1), generator=gen))
    table = world_table(CFG)
    assert (obs["ad_history"] < 0).any() and (obs["ad_history"] >= 0).any()  # both kinds of slots present
    from_obs = tokens_from_obs(obs, table)
    from_log = tokens_from_logs(log_rows(obs, strip_padding), table, SchemaConfig.from_world(CFG))
    assert_same(from_obs, from_log)
    assert from_obs.token_ids.shape == (16, 2 + 6 + 5)


def test_single_env_numpy_observation_matches_the_batched_one():
    env = AdsEnv(config=CFG)
    obs, _ = env.reset(seed=3)
    table = world_table(CFG)
    single = tokens_from_obs(obs, table)  # numpy, no batch dim -> B = 1
    batched = tokens_from_obs({k: torch.as_tensor(np.asarray(v))[None] for k, v in obs.items()}, table)
    assert_same(single, batched)
    assert single.semantic_codes.shape == (1, 13, 3)


def test_log_rows_without_user_id_and_bad_columns():
    obs = tiny_obs([0, 1], [1], [2])
    rows = log_rows(obs, strip_padding=False).drop(columns="user_id")
    b = tokens_from_logs(rows, TINY, SchemaConfig(organic_len=2, ad_len=1))
    assert b.token_ids[0].tolist() == [NO_ID, 0, 1, 4, NO_ID]  # U token without a logged user id
    with pytest.raises(ValueError, match="lack column"):
        tokens_from_logs(rows.drop(columns="context"), TINY)
    rows.at[0, "ad_events"] = [2, 2]
    with pytest.raises(ValueError, match="same length"):
        tokens_from_logs(rows, TINY)


def test_build_tokens_rejects_inputs_of_another_batch_size():
    o = tiny_obs([0], [0], [1])
    with pytest.raises(ValueError, match="must be"):
        build_tokens(
            o["user_id"],
            o["user"],
            torch.zeros(2, 1, dtype=torch.int64),
            o["context"],
            o["ad_history"],
            o["ad_events"],
            TINY,
            SchemaConfig(1, 1),
        )


@pytest.mark.gpu
def test_tokens_on_cuda_equal_the_cpu_tokens():
    table = world_table(CFG)
    obs_cpu = BatchedMarket(CFG, num_envs=8).reset(seed=0)
    obs_gpu = {k: v.to("cuda") for k, v in obs_cpu.items()}
    a = tokens_from_obs(obs_cpu, table)
    b = tokens_from_obs(obs_gpu, copy.copy(table).to("cuda"))
    assert b.token_ids.is_cuda
    assert_same(a, b.to("cpu"))
    with pytest.raises(ValueError, match="table.to"):
        tokens_from_obs(obs_gpu, table)
