"""World tokenizers: fit on [organic; ads], save/load next to a run, Table-1 agreement, the CLI."""

import json

import gymnasium
import pytest
import torch

import envs  # noqa: F401  (registers ads-v0)
from agents.tokenize import main as tokenize_main
from gpr_sim.tokenizer import SemanticIdTable
from gpr_sim.tokenizer.compare import CompareConfig, compare_quantizers
from gpr_sim.tokenizer.world import (
    METHODS,
    WorldTokenizer,
    as_world_tokenizer,
    code_usage,
    fit_world_tokenizer,
    fit_world_tokenizers,
    tokenizer_table,
    with_paper,
    world_embeddings,
    world_fingerprint,
)
from gpr_sim.world import WorldConfig, generate_world

CFG = WorldConfig.small(num_organic=300, num_ads=100, num_users=100)
FAST = CompareConfig(codebook_size=16, kmeans_iters=5, vae_steps=30, batch_size=128, hidden_dim=32)


@pytest.fixture(scope="module")
def world():
    return generate_world(CFG, 0)


def test_fit_covers_organic_then_ads_and_round_trips(world):
    tok = fit_world_tokenizer(world, "rq-kmeans", FAST, seed=0)
    assert (tok.num_organic, tok.num_ads) == (300, 100)
    assert torch.equal(tok.table.item_to_path[:, :-1], tok.quantizer.encode(world_embeddings(world)))
    ads = torch.arange(100)
    assert torch.equal(tok.ads_of(tok.paths_of_ads(ads)), ads)  # ad -> path -> ad
    assert tok.ads_of(tok.table.organic_paths).eq(-1).all()  # organic paths are not ads
    assert tok.ads_of(tok.paths_of_ads(ads.view(4, 25))).shape == (4, 25)  # leading dims kept


def test_save_load_round_trip_and_bad_files(world, tmp_path):
    tok = fit_world_tokenizer(world, "rq-kmeans-plus", FAST, seed=0)
    tok.save(tmp_path / "run")
    back = WorldTokenizer.load(tmp_path / "run")
    assert torch.equal(back.table.item_to_path, tok.table.item_to_path)
    assert back.method == "rq-kmeans-plus" and back.fingerprint == world_fingerprint(world)
    assert torch.equal(back.quantizer.encode(world_embeddings(world)), tok.table.item_to_path[:, :-1])
    assert as_world_tokenizer(str(tmp_path / "run" / "semantic_ids.pt")).level_sizes == tok.level_sizes
    back.check_world(world)
    with pytest.raises(ValueError, match="another world"):
        back.check_world(generate_world(CFG, 1))
    with pytest.raises(FileNotFoundError):
        WorldTokenizer.load(tmp_path / "nothing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "semantic_ids.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable tokenizer file"):
        WorldTokenizer.load(tmp_path / "junk")
    with pytest.raises(ValueError, match="tokenizer must be"):
        as_world_tokenizer(42)
    with pytest.raises(ValueError, match="method="):
        fit_world_tokenizer(world, "kmeans", FAST)


def test_to_returns_a_copy_and_leaves_the_original():
    table = SemanticIdTable(torch.tensor([[0, 1], [1, 1], [0, 1]]), codebook_size=2, num_organic=1)
    tok = WorldTokenizer(table)
    moved = tok.to("cpu")
    assert moved is not tok and moved.table is not tok.table
    assert torch.equal(moved.table.ad_paths, tok.table.ad_paths)
    with pytest.raises(ValueError, match="no ads"):
        WorldTokenizer(SemanticIdTable(torch.tensor([[0, 1]]), codebook_size=2))


def test_code_usage_hand_worked():
    # items (0,1), (1,1), (0,1): level 1 uses code 0 twice and code 1 once; level 2 uses code 1 three times
    tok = WorldTokenizer(
        SemanticIdTable(torch.tensor([[0, 1], [1, 1], [0, 1]]), codebook_size=2, num_organic=1)
    )
    assert code_usage(tok).tolist() == [[2, 1], [0, 3]]


def test_table_matches_compare_quantizers(world):
    tokenizers = fit_world_tokenizers(world, FAST, seed=3)
    ours = tokenizer_table(tokenizers, world)
    theirs = compare_quantizers(world_embeddings(world), FAST, seed=3)  # the same fits, from compare.py
    cols = [c for c in theirs.columns if c != "fit_seconds"]
    assert list(ours.index) == list(METHODS.values())
    torch.testing.assert_close(torch.tensor(ours[cols].to_numpy()), torch.tensor(theirs[cols].to_numpy()))
    # num_dis is the largest collision group: the disambiguation level's size
    assert ours.loc["RQ-Kmeans", "num_dis"] == tokenizers["rq-kmeans"].level_sizes[-1]
    side = with_paper(ours)
    assert side.loc["RQ-Kmeans+", ("pas", "paper")] == 0.992  # GPR Table 1
    assert side.loc["RQ-VAE", ("cur_l1", "sim")] == ours.loc["RQ-VAE", "cur_l1"]


def test_cli_writes_table_and_a_tokenizer_the_env_loads(tmp_path):
    out = tmp_path / "tok"
    df = tokenize_main(
        [
            "--out",
            str(out),
            "--method",
            "rq-kmeans",
            "--no-compare",
            "--codebook-size",
            "16",
            "--kmeans-iters",
            "5",
            "--world.num-organic",
            "300",
            "--world.num-ads",
            "100",
            "--device",
            "cpu",
        ]
    )
    assert list(df.index) == ["RQ-Kmeans"]
    for name in (
        "table.csv",
        "table.json",
        "code_usage.png",
        "code_usage_levels.png",
        "config.json",
        "semantic_ids.pt",
        "quantizer.pt",
    ):
        assert (out / name).is_file(), name
    meta = json.loads((out / "config.json").read_text())
    assert meta["world"]["num_ads"] == 100 and meta["tokenizer"]["method"] == "rq-kmeans"
    env = gymnasium.make("ads-v0", num_organic=300, num_ads=100, action_mode="semantic", tokenizer=str(out))
    assert list(env.action_space.nvec) == meta["tokenizer"]["level_sizes"]
    with pytest.raises(ValueError, match="method="):
        tokenize_main(["--out", str(out), "--method", "vq"])
