"""ads-v0 with semantic-ID actions: same outcomes as ad indices, invalid IDs counted, prefix masks, checker."""

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers ads-v0)
from gpr_sim.tokenizer import SemanticIdTable
from gpr_sim.tokenizer.compare import CompareConfig
from gpr_sim.tokenizer.world import WorldTokenizer, fit_world_tokenizer
from gpr_sim.world import WorldConfig, generate_world

CFG = WorldConfig.small(num_organic=400, num_ads=120, num_users=300, num_advertisers=12)
MULTI = CFG.replace(num_candidates=3, num_slots=1)
FAST = CompareConfig(num_levels=2, codebook_size=8, kmeans_iters=5)  # 64 two-digit paths: collisions


@pytest.fixture(scope="module")
def tok() -> WorldTokenizer:
    return fit_world_tokenizer(generate_world(CFG, 0), "rq-kmeans", FAST, seed=0)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    return str(tok.save(tmp_path_factory.mktemp("tokenizer")))


def unknown_path(tok: WorldTokenizer) -> np.ndarray:
    """A path with every digit in range that names no item (first one in lexicographic order)."""
    grid = torch.cartesian_prod(*[torch.arange(k) for k in tok.level_sizes])  # (prod K, L')
    return grid[tok.table.path_to_item(grid) < 0][0].numpy()


def test_action_spaces(tok):
    assert tok.level_sizes[:2] == (8, 8) and tok.table.num_dis > 1  # collisions: a real extra digit
    env = gymnasium.make("ads-v0", config=CFG, action_mode="semantic", tokenizer=tok)
    assert env.action_space == spaces.MultiDiscrete(list(tok.level_sizes))
    multi = gymnasium.make("ads-v0", config=MULTI, action_mode="semantic", tokenizer=tok)
    assert multi.action_space.shape == (3, 3)
    assert (multi.action_space.nvec == np.array(tok.level_sizes)).all()
    assert gymnasium.make("ads-v0", config=CFG).action_space == spaces.Discrete(
        CFG.num_ads
    )  # default unchanged


@pytest.mark.parametrize("cfg", [CFG, MULTI], ids=["k1", "k3"])
def test_check_env_passes_in_both_modes(cfg, tok, tok_dir):
    check_env(gymnasium.make("ads-v0", config=cfg).unwrapped)
    check_env(gymnasium.make("ads-v0", config=cfg, action_mode="semantic", tokenizer=tok_dir).unwrapped)


def test_semantic_actions_reproduce_ad_actions_step_for_step(tok_dir):
    by_ad = gymnasium.make("ads-v0", config=MULTI)
    by_id = gymnasium.make("ads-v0", config=MULTI, action_mode="semantic", tokenizer=tok_dir)
    o1, _ = by_ad.reset(seed=5)
    o2, _ = by_id.reset(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(40):
        ads = rng.integers(0, MULTI.num_ads, size=3)
        o1, r1, te1, tr1, i1 = by_ad.step(ads)
        o2, r2, te2, tr2, i2 = by_id.step(by_id.unwrapped.semantic_ids(ads))  # (3, L') paths
        assert (r1, te1, tr1) == (r2, te2, tr2)
        for k in o1:
            np.testing.assert_array_equal(o1[k], o2[k])
        for k in i1:
            np.testing.assert_array_equal(i1[k], i2[k])
        assert i2["invalid"] == 0
        if te1 or tr1:
            o1, _ = by_ad.reset()
            o2, _ = by_id.reset()


def test_unknown_and_organic_paths_are_invalid_and_show_nothing(tok):
    env = gymnasium.make("ads-v0", config=CFG, action_mode="semantic", tokenizer=tok)
    env.reset(seed=0)
    for path in (unknown_path(tok), tok.table.organic_paths[0].numpy()):
        _, reward, _, _, info = env.step(path)
        assert info["invalid"] == 1
        assert info["ad_id"].tolist() == [-1] and not info["impression"].any()
        assert reward == 0.0
    # K = 3: one unknown path among two real ads -> invalid counts 1, the auction runs on the others
    multi = gymnasium.make("ads-v0", config=MULTI, action_mode="semantic", tokenizer=tok)
    multi.reset(seed=0)
    action = np.stack(
        [
            unknown_path(tok),
            tok.paths_of_ads(torch.tensor(4)).numpy(),
            tok.paths_of_ads(torch.tensor(9)).numpy(),
        ]
    )
    _, _, _, _, info = multi.step(action)
    assert info["invalid"] == 1 and info["ad_id"][0] in (-1, 4, 9)


def test_malformed_semantic_actions_raise(tok):
    env = gymnasium.make("ads-v0", config=CFG, action_mode="semantic", tokenizer=tok)
    env.reset(seed=0)
    good = tok.paths_of_ads(torch.tensor(0)).numpy()
    too_big = good.copy()
    too_big[1] = tok.level_sizes[1]  # digit 8 at level 1, whose codes are 0..7
    with pytest.raises(ValueError, match="digit 8 at level 1"):
        env.step(too_big)
    neg = good.copy()
    neg[0] = -1
    with pytest.raises(ValueError, match="at level 0"):
        env.step(neg)
    with pytest.raises(ValueError, match="action shape"):
        env.step(good[:2])
    with pytest.raises(ValueError, match="dtype"):
        env.step(good.astype(np.float32))


def test_mode_and_tokenizer_arguments_are_checked(tok, tok_dir):
    with pytest.raises(ValueError, match="needs tokenizer"):
        gymnasium.make("ads-v0", config=CFG, action_mode="semantic")
    with pytest.raises(ValueError, match="action_mode='ids'"):
        gymnasium.make("ads-v0", config=CFG, action_mode="ids", tokenizer=tok)
    with pytest.raises(ValueError, match="another world"):  # same config, other world seed
        gymnasium.make("ads-v0", config=CFG, world_seed=1, action_mode="semantic", tokenizer=tok_dir)
    with pytest.raises(ValueError, match="num_ads=121"):
        gymnasium.make("ads-v0", config=CFG.replace(num_ads=121), action_mode="semantic", tokenizer=tok)
    with pytest.raises(ValueError, match="has no tokenizer"):
        env = gymnasium.make("ads-v0", config=CFG)
        env.reset(seed=0)
        env.unwrapped.prefix_mask([])
    # a bare table (no fingerprint) is accepted when the item counts match
    bare = SemanticIdTable(tok.table.item_to_path[:, :-1], tok.table.codebook_size, CFG.num_organic)
    env = gymnasium.make("ads-v0", config=CFG, action_mode="semantic", tokenizer=bare)
    assert env.action_space.nvec.tolist() == list(tok.level_sizes)


def reference_mask(
    ad_paths: torch.Tensor, eligible: torch.Tensor, prefix: torch.Tensor, size: int
) -> torch.Tensor:
    """Next digits after ``prefix`` that some eligible ad continues with: a loop over ads, no trie."""
    mask = torch.zeros(size, dtype=torch.bool)
    depth = prefix.numel()
    for path, ok in zip(ad_paths, eligible):
        if ok and torch.equal(path[:depth], prefix):
            mask[path[depth]] = True
    return mask


def test_prefix_mask_is_the_eligible_ad_trie(tok):
    # tiny budgets and no outside competition: advertisers run dry within a few steps. The embeddings
    # (hence the tokenizer's world fingerprint) do not depend on budgets, so `tok` still fits this world.
    poor = CFG.replace(budget_per_1k_requests=0.05, competitor_ecpm_mean=0.0)
    env = gymnasium.make_vec(
        "ads-v0",
        num_envs=64,
        vectorization_mode="vector_entry_point",
        config=poor,
        action_mode="semantic",
        tokenizer=tok,
    )
    env.reset(seed=0)
    gen = torch.Generator().manual_seed(0)
    u = env.unwrapped
    for _ in range(30):  # spend budgets until some advertisers sit out
        env.step(tok.paths_of_ads(torch.randint(0, CFG.num_ads, (64,), generator=gen)))
        if not u.eligible_ads().all():
            break
    eligible = u.eligible_ads()
    assert 0 < int(eligible.sum()) < CFG.num_ads
    paths = tok.table.ad_paths
    for depth in range(tok.path_len):
        prefixes = torch.cat(
            [paths[:, :depth], tok.table.organic_paths[:8, :depth]]
        )  # ad and organic prefixes
        got = u.prefix_mask(prefixes)  # (num_prefixes, K_depth)
        everyone = u.prefix_mask(prefixes, eligible_only=False)
        for i in range(0, prefixes.shape[0], 7):
            want = reference_mask(paths, eligible, prefixes[i], tok.level_sizes[depth])
            assert torch.equal(got[i], want), (depth, i)
            assert torch.equal(
                everyone[i],
                reference_mask(paths, torch.ones_like(eligible), prefixes[i], tok.level_sizes[depth]),
            )
    # batched leading dims (N, beams, l) and the single env's numpy view
    assert u.prefix_mask(paths[:6, :1].view(2, 3, 1)).shape == (2, 3, tok.level_sizes[1])
    single = gymnasium.make("ads-v0", config=poor, action_mode="semantic", tokenizer=tok)
    single.reset(seed=0)
    assert (
        single.unwrapped.prefix_mask([]).tolist()
        == reference_mask(
            paths, single.unwrapped.eligible_ads(), torch.zeros(0, dtype=torch.int64), tok.level_sizes[0]
        ).tolist()
    )


def test_vector_env_semantic_mode(tok):
    make = lambda **kw: gymnasium.make_vec(  # noqa: E731
        "ads-v0", num_envs=8, vectorization_mode="vector_entry_point", config=MULTI, **kw
    )
    by_ad, by_id = make(), make(action_mode="semantic", tokenizer=tok)
    assert by_id.action_space.shape == (8, 3, tok.path_len)
    by_ad.reset(seed=2)
    by_id.reset(seed=2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        ads = torch.randint(0, MULTI.num_ads, (8, 3), generator=gen)
        o1, r1, te1, _, i1 = by_ad.step(ads)
        o2, r2, te2, _, i2 = by_id.step(by_id.unwrapped.semantic_ids(ads))  # (8, 3, L')
        assert (
            torch.equal(r1, r2) and torch.equal(te1, te2) and torch.equal(o1["ad_history"], o2["ad_history"])
        )
        assert torch.equal(i1["ad_id"], i2["ad_id"])
    # row r gets r unknown paths among its 3 candidates (rows >= 4: none)
    action = by_id.unwrapped.semantic_ids(torch.randint(0, MULTI.num_ads, (8, 3), generator=gen))
    bad = torch.as_tensor(unknown_path(tok))
    for r in range(4):
        action[r, :r] = bad
    _, _, _, _, info = by_id.step(action)
    assert info["invalid"].tolist() == [0, 1, 2, 3, 0, 0, 0, 0]
    assert info["ad_id"][3].tolist() == [-1]  # all three invalid: nothing shown
    # out-of-range digits raise, unless range checks are off (then they are just unknown paths)
    action[0, 0, 0] = 99
    with pytest.raises(ValueError, match="digit 99 at level 0"):
        by_id.step(action)
    lax = make(action_mode="semantic", tokenizer=tok, validate_actions=False)
    lax.reset(seed=2)
    _, _, _, _, info = lax.step(action)
    assert info["invalid"][0] == 1


def test_single_candidate_vector_env_takes_n_by_levels(tok):
    env = gymnasium.make_vec(
        "ads-v0",
        num_envs=4,
        vectorization_mode="vector_entry_point",
        config=CFG,
        action_mode="semantic",
        tokenizer=tok,
    )
    env.reset(seed=0)
    ads = torch.tensor([3, 1, 4, 1])
    _, _, _, _, a = env.step(env.unwrapped.semantic_ids(ads))  # (N, L')
    assert a["invalid"].tolist() == [0, 0, 0, 0]
    _, _, _, _, b = env.step(env.unwrapped.semantic_ids(ads[:, None]))  # (N, 1, L')
    assert b["invalid"].tolist() == [0, 0, 0, 0]


@pytest.mark.gpu
def test_semantic_mode_on_cuda(tok):
    env = gymnasium.make_vec(
        "ads-v0",
        num_envs=16,
        vectorization_mode="vector_entry_point",
        config=CFG,
        device="cuda",
        action_mode="semantic",
        tokenizer=tok,
    )
    env.reset(seed=0)
    ads = torch.arange(16, device="cuda")
    _, _, _, _, info = env.step(env.unwrapped.semantic_ids(ads))
    assert info["invalid"].sum().item() == 0
    assert env.unwrapped.prefix_mask(torch.zeros(16, 0, dtype=torch.int64, device="cuda")).is_cuda
    assert tok.device.type == "cpu"  # the env moved a copy, not the caller's tokenizer
