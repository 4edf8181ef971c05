"""The fast forms of the pre-training data stages give exactly what the straightforward forms gave.

Each reference below is the earlier implementation, kept here verbatim in substance: the world regenerated
per call, ``torch.unique(dim=0)`` over whole paths, per-row DataFrame access for targets and list columns,
advanced indexing in the interest estimate, and legal masks computed for every request at once.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from agents.collection import write_log
from agents.pretraining.config import PretrainConfig
from agents.pretraining.data import collect_config, ensure_inputs, legal_masks, load_data
from gpr_sim.data.logs import read_logs
from gpr_sim.model.targets import MTPTargets, mtp_targets, value_targets
from gpr_sim.platform.features import PlatformFeatures
from gpr_sim.platform.view import EVENT_WEIGHTS, ORGANIC_WEIGHT, catalog_of, estimate_interest
from gpr_sim.schema import NO_ID, SchemaConfig, build_tokens, flatten_cells, tokens_from_logs
from gpr_sim.tokenizer.ids import SemanticIdTable
from gpr_sim.tokenizer.metrics import group_paths
from gpr_sim.tokenizer.world import WorldTokenizer
from gpr_sim.world import preset
from gpr_sim.world.catalog import WORLD_CACHE_SIZE, World, _cpu_world, clear_world_cache, generate_world
from gpr_sim.world.config import RewardConfig

# ----------------------------------------------------------------------------- references


def ref_group_paths(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return inverse, counts


def ref_mtp_targets(df: pd.DataFrame, num_heads: int) -> MTPTargets:
    b = len(df)
    episode = df["episode_id"].to_numpy(np.int64)
    order = np.lexsort((df["step"].to_numpy(np.int64), episode))
    shown = [np.asarray(df["shown_ad"].iloc[i], dtype=np.int64).reshape(-1) for i in order]
    lens = np.fromiter((s.size for s in shown), dtype=np.int64, count=b)
    flat = np.concatenate(shown)
    flat_pos = np.repeat(np.arange(b), lens)
    real = flat >= 0
    imp_ad, imp_pos = flat[real], flat_pos[real]
    imp_episode = episode[order][imp_pos]
    start = np.searchsorted(imp_pos, np.arange(b), side="left")
    idx = start[:, None] + np.arange(num_heads)[None]
    inside = idx < imp_ad.size
    idx_c = np.minimum(idx, max(imp_ad.size - 1, 0))
    ok = inside & (imp_episode[idx_c] == episode[order][:, None])
    ads_sorted = np.where(ok, imp_ad[idx_c], -1)
    src_sorted = np.where(ok, order[imp_pos[idx_c]], -1)
    ads, src = np.empty_like(ads_sorted), np.empty_like(src_sorted)
    ads[order], src[order] = ads_sorted, src_sorted
    return MTPTargets(torch.as_tensor(ads), torch.as_tensor(src))


def ref_first_shown(df: pd.DataFrame) -> np.ndarray:
    return np.fromiter((np.asarray(s).reshape(-1)[0] for s in df["shown_ad"]), np.int64, len(df))


def ref_right_aligned(cells, width: int) -> np.ndarray:
    out = np.full((len(cells), width), NO_ID, dtype=np.int64)
    for i, c in enumerate(cells):
        a = np.asarray(c, dtype=np.int64).reshape(-1)[-width:] if width else np.zeros(0, np.int64)
        out[i, width - a.size :] = a
    return out


def ref_tokens_from_logs(rows: pd.DataFrame, table, cfg, features) -> tuple[torch.Tensor, ...]:
    dense = lambda col: torch.as_tensor(np.stack([np.asarray(c, np.float32).reshape(-1) for c in rows[col]]))  # noqa: E731
    return build_tokens(
        torch.as_tensor(np.array(rows["user_id"], dtype=np.int64)),
        dense("user_features"),
        torch.as_tensor(ref_right_aligned(rows["organic_ids"], cfg.organic_len)),
        dense("context"),
        torch.as_tensor(ref_right_aligned(rows["ad_ids"], cfg.ad_len)),
        torch.as_tensor(ref_right_aligned(rows["ad_events"], cfg.ad_len)),
        table,
        cfg,
        features=features,
    )


def ref_estimate_interest(catalog, organic, ad_history, ad_events) -> torch.Tensor:
    o_w = (organic >= 0).to(catalog.organic_emb.dtype) * ORGANIC_WEIGHT
    a_w = torch.zeros(ad_history.shape, dtype=catalog.ad_emb.dtype)
    for event, weight in EVENT_WEIGHTS.items():
        a_w = torch.where(ad_events == event, torch.full_like(a_w, weight), a_w)
    a_w = a_w * (ad_history >= 0)
    total = torch.einsum("nh,nhd->nd", o_w, catalog.organic_emb[organic.clamp(min=0)])
    total = total + torch.einsum("nh,nhd->nd", a_w, catalog.ad_emb[ad_history.clamp(min=0)])
    return torch.nn.functional.normalize(total, dim=-1)


def assert_worlds_equal(a: World, b: World) -> None:
    assert a.config == b.config
    for f in dataclasses.fields(World):
        if f.name != "config":
            assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name


# ----------------------------------------------------------------------------- group_paths


@pytest.mark.parametrize(
    "n, levels, k, lo",
    [(5000, 3, 4, 0), (5000, 2, 64, 0), (3000, 4, 3, -2), (2000, 1, 5, 0), (1, 3, 8, 0), (400, 3, 1, 0)],
)
def test_group_paths_equals_rowwise_unique(n, levels, k, lo):
    # small alphabets: most paths collide (k=4, L=3: 64 paths for 5000 items), k=1: one group
    g = torch.Generator().manual_seed(n + levels + k)
    codes = torch.randint(lo, lo + k, (n, levels), generator=g)
    for got, want in zip(group_paths(codes), ref_group_paths(codes)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_group_paths_falls_back_when_keys_overflow():
    # digit ranges of 2^40 per level: 2^120 combined keys do not fit int64, so rows are compared whole
    big = 1 << 40
    codes = torch.tensor([[big, 0, 1], [0, big, 1], [big, 0, 1], [0, 0, 0]])
    inverse, counts = group_paths(codes)
    assert inverse.tolist() == [2, 1, 2, 0] and counts.tolist() == [1, 1, 2]  # lexicographic groups


def test_semantic_id_table_disambiguation_unchanged():
    # items 0, 2, 3 share path (1, 0): digits 0, 1, 2 in item order; item 1 alone gets 0
    table = SemanticIdTable(torch.tensor([[1, 0], [0, 1], [1, 0], [1, 0]]), codebook_size=2)
    assert table.item_to_path[:, -1].tolist() == [0, 0, 1, 2] and table.num_dis == 3


# ----------------------------------------------------------------------------- world cache


def test_world_cache_returns_equal_worlds_and_new_ones_for_new_keys():
    cfg = preset("small", num_users=300, num_ads=200, num_organic=400)
    clear_world_cache()
    first = generate_world(cfg, 3)
    again = generate_world(cfg, 3)
    assert again.ad_emb is first.ad_emb  # served from the cache: the same tensors
    clear_world_cache()
    assert_worlds_equal(generate_world(cfg, 3), first)  # a fresh generation equals the cached one
    other = generate_world(cfg.replace(num_ads=201), 3)
    assert other.ad_emb.shape[0] == 201
    assert not torch.equal(generate_world(cfg, 4).ad_emb, first.ad_emb)  # another seed, another world
    for n in range(5):
        generate_world(cfg.replace(num_ads=190 + n), 3)
    assert _cpu_world.cache_info().currsize == WORLD_CACHE_SIZE  # bounded
    with pytest.raises(ValueError, match="WorldConfig"):
        generate_world({"num_ads": 3}, 0)


def test_simulation_leaves_the_cached_world_unchanged():
    # the cache is only sound because nothing writes into a World: run the env, fit features, tokenise
    from tests.helpers import rollout

    cfg = preset("small", num_users=300, num_ads=200, num_organic=400)
    clear_world_cache()
    world = generate_world(cfg, 0)
    snapshot = {
        f.name: getattr(world, f.name).clone() for f in dataclasses.fields(World) if f.name != "config"
    }
    market, _, obs = rollout(cfg, num_envs=8, steps=6)
    assert market.world.ad_emb is world.ad_emb  # the env got the cached tensors
    feats = PlatformFeatures.from_world(world)
    feats.interest(obs[-1]["organic"], obs[-1]["ad_history"], obs[-1]["ad_events"])
    for name, before in snapshot.items():
        assert torch.equal(getattr(world, name), before), name


# ----------------------------------------------------------------------------- targets, tokens, interest


def _random_frame(seed: int, rows: int = 400, slots: int = 3) -> pd.DataFrame:
    """Shuffled rows of 30 sessions; slots hold -1 (empty) a third of the time."""
    rng = np.random.default_rng(seed)
    episode = rng.integers(0, 30, rows)
    step = np.zeros(rows, np.int64)
    for e in np.unique(episode):  # distinct steps per session, in a random row order
        where = np.flatnonzero(episode == e)
        step[where] = rng.permutation(where.size)
    shown = [np.where(rng.random(slots) < 1 / 3, -1, rng.integers(0, 50, slots)) for _ in range(rows)]
    return pd.DataFrame(
        {
            "episode_id": episode,
            "step": step,
            "shown_ad": shown,
            "impression": [int((s >= 0).sum()) for s in shown],
            "revenue": rng.random(rows),
            "p_click": rng.random(rows),
            "p_conversion": rng.random(rows),
            "terminated": rng.random(rows) < 0.1,
        }
    )


@pytest.mark.parametrize("seed, slots", [(0, 1), (1, 3)])
def test_mtp_and_value_targets_equal_per_row_reference(seed, slots):
    df = _random_frame(seed, slots=slots)
    got = mtp_targets(df, num_heads=4)
    want = ref_mtp_targets(df, 4)
    assert torch.equal(got.ads, want.ads) and torch.equal(got.source_row, want.source_row)
    # list cells as plain lists (not arrays) take the per-cell path: same targets
    lists = df.assign(shown_ad=[s.tolist() for s in df["shown_ad"]])
    assert torch.equal(mtp_targets(lists, 4).ads, want.ads)
    value_mean = torch.rand(50, generator=torch.Generator().manual_seed(seed)) + 0.5
    g = value_targets(df, got, value_mean, RewardConfig())
    first = torch.as_tensor(ref_first_shown(df))
    own = (got.source_row[:, 0] == torch.arange(len(df))) & (first == got.ads[:, 0]) & (got.ads[:, 0] >= 0)
    own &= torch.as_tensor(df["impression"].to_numpy(copy=True)) == 1
    assert torch.equal(g.isfinite(), own)


def test_value_targets_reject_empty_shown_cells():
    df = _random_frame(0, rows=5, slots=1)
    df.at[2, "shown_ad"] = np.zeros(0, np.int64)
    with pytest.raises(ValueError, match="row 2"):
        value_targets(df, mtp_targets(df, 2), torch.ones(50), RewardConfig())


def test_flatten_cells_arrays_lists_and_scalars():
    cells = [np.array([4, 5]), np.zeros(0, np.int64), np.array([6])]
    for form in (cells, [c.tolist() for c in cells], pd.Series(cells)):
        flat, lens = flatten_cells(form, np.int64)
        assert flat.tolist() == [4, 5, 6] and lens.tolist() == [2, 0, 1] and flat.dtype == np.int64
    flat, lens = flatten_cells([7, 8], np.int64)  # scalar cells: one entry each
    assert flat.tolist() == [7, 8] and lens.tolist() == [1, 1]
    flat, lens = flatten_cells([[[1, 2]], [[3, 4]]], np.int64)  # 2-D cells are flattened per cell
    assert flat.tolist() == [1, 2, 3, 4] and lens.tolist() == [2, 2]


def test_estimate_interest_equals_advanced_indexing_reference():
    world = generate_world(preset("small", num_users=100, num_ads=300, num_organic=500), 1)
    g = torch.Generator().manual_seed(0)
    organic = torch.randint(-1, 500, (257, 16), generator=g)
    ads = torch.randint(-1, 300, (257, 12), generator=g)
    events = torch.randint(0, 4, (257, 12), generator=g)
    cat = catalog_of(world)
    assert torch.equal(
        estimate_interest(cat, organic, ads, events), ref_estimate_interest(cat, organic, ads, events)
    )


# ----------------------------------------------------------------------------- a logged stage


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A seeded cascade log of the small world (24 sessions x 30 steps) and its fitted tokenizer."""
    out = tmp_path_factory.mktemp("stage")
    cfg = PretrainConfig(out=str(out), collect_envs=24, collect_steps=30, steps=1, threads=1, progress=False)
    write_log(collect_config(cfg, out / "logs.parquet"))
    logs, tok_dir = ensure_inputs(cfg, out)
    return cfg, logs, tok_dir


def test_log_tokens_equal_per_cell_reference(stage):
    cfg, logs, tok_dir = stage
    df, meta = read_logs(logs)
    tok = WorldTokenizer.load(tok_dir)
    world = generate_world(preset(cfg.preset), meta.get("world_seed", 0))
    schema = SchemaConfig.from_world(world.config)
    feats = PlatformFeatures.from_world(world)
    for features in (feats, None):
        got = tokens_from_logs(df, tok.table, schema, features=features)
        want = ref_tokens_from_logs(df, tok.table, schema, features)
        for name, a, b in zip(got._fields, got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), name


def test_minibatch_legal_masks_equal_masks_of_every_request(stage):
    cfg, logs, tok_dir = stage
    for stage_name in ("mtp", "vaft"):
        data = load_data(dataclasses.replace(cfg, stage=stage_name), logs, tok_dir)
        for side in (data.train, data.held_out):
            everyone = legal_masks(side.codes, data.tok)  # what was stored per request before
            idx = torch.randperm(len(side), generator=torch.Generator().manual_seed(0))[:97]
            _, codes, masks, _, _ = side.rows(idx)
            assert torch.equal(codes, side.codes[idx])
            assert len(masks) == len(everyone) == codes.shape[-1]
            for got, full in zip(masks, everyone):
                assert got.dtype == torch.bool and torch.equal(got, full[idx])
            # every real target's code is legal after its own prefix
            has = (codes >= 0).all(-1)  # (M, N)
            for level, m in enumerate(masks):
                picked = m.gather(-1, codes[..., level : level + 1].clamp_min(0)).squeeze(-1)
                assert bool(picked[has].all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stage_data_built_on_the_gpu_equals_the_cpu_build(stage):
    """``build_split`` fills the tokens on the stage's device (no host-built copy): the same rows as the CPU build,
    to float rounding where the interest estimate reduces on the GPU."""
    cfg, logs, tok_dir = stage
    cpu = load_data(cfg, logs, tok_dir)
    gpu = load_data(dataclasses.replace(cfg, device="cuda"), logs, tok_dir)
    for a, b in ((cpu.train, gpu.train), (cpu.held_out, gpu.held_out)):
        assert b.tokens.dense_features.device.type == "cuda"
        for name, x, y in zip(a.tokens._fields, a.tokens, b.tokens):
            torch.testing.assert_close(y.cpu(), x, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(a.codes, b.codes.cpu()) and torch.equal(a.ads, b.ads.cpu())
        torch.testing.assert_close(b.values.cpu(), a.values, equal_nan=True)  # NaN: no HTE target, same rows


@pytest.mark.parametrize("n, levels, k", [(5000, 3, 4), (3000, 2, 64), (10, 1, 2), (1, 3, 3)])
def test_semantic_id_table_key_index_equals_a_sort_of_the_keys(n, levels, k):
    g = torch.Generator().manual_seed(n)
    table = SemanticIdTable(torch.randint(0, k, (n, levels), generator=g), k, num_organic=n // 2)
    keys, items = torch.sort(table._keys(table.item_to_path))
    assert torch.equal(table._sorted_keys, keys) and torch.equal(table._key_items, items)
    assert torch.equal(table.path_to_item(table.item_to_path), torch.arange(n))
