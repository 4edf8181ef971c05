"""RQ-Kmeans, RQ-VAE and RQ-Kmeans+: hand-worked fits, collapse vs no collapse, save/load, the comparison."""

import json

import pytest
import torch

from gpr_sim.tokenizer import (
    RQVAE,
    RQKmeans,
    RQKmeansConfig,
    RQVAEConfig,
    codebook_utilization,
    collision_rate,
    fit_rq_kmeans,
    fit_rq_vae,
    kmeans,
    load_quantizer,
    nearest_code,
    quantizer_metrics,
    rq_kmeans_plus_config,
)
from gpr_sim.tokenizer.compare import (
    CompareConfig,
    SyntheticConfig,
    compare_quantizers,
    hierarchical_embeddings,
    main,
)
from gpr_sim.tokenizer.rq_kmeans import spawn_cpu_generator

SMALL_VAE = dict(hidden_dim=32, batch_size=256, num_steps=300)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny MLP steps run 3-6x slower with 2 intra-op threads on a shared 2-core box: use one, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: RQKmeansConfig(num_levels=0), "num_levels"),
        (lambda: RQKmeansConfig(codebook_size=1), "codebook_size"),
        (lambda: RQKmeansConfig(num_iters=0), "num_iters"),
        (lambda: RQKmeansConfig(init="kmeans||"), "init"),
        (lambda: RQKmeansConfig(chunk_size=0), "chunk_size"),
        (lambda: RQVAEConfig(beta=-0.1), "beta"),
        (lambda: RQVAEConfig(lr=0.0), "lr"),
        (lambda: RQVAEConfig(batch_size=0), "batch_size"),
        (lambda: RQVAEConfig(num_steps=-1), "num_steps"),
        (lambda: RQVAEConfig(codebook_init="zeros"), "codebook_init"),
        (lambda: RQVAEConfig(residual_encoder=1), "residual_encoder"),
        (lambda: RQVAEConfig(latent_dim=0), "latent_dim"),
        (lambda: RQVAEConfig(residual_init_scale=2.0), "residual_init_scale"),
        (lambda: RQVAEConfig(hidden_dim=2.5), "hidden_dim"),
        (lambda: CompareConfig(vae_steps=-5), "vae_steps"),
        (lambda: SyntheticConfig(num_items=0), "num_items"),
        (lambda: SyntheticConfig(item_scale=float("nan")), "item_scale"),
    ],
)
def test_bad_config_raises_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_residual_needs_latent_dim_equal_to_input():
    with pytest.raises(ValueError, match="latent_dim"):
        RQVAE(rq_kmeans_plus_config(latent_dim=4), input_dim=8)


# ----------------------------------------------------------------------------------------------
# k-means and RQ-Kmeans


def test_nearest_code_chunked_matches_brute_force():
    g = gen()
    x, c = torch.randn(103, 5, generator=g), torch.randn(9, 5, generator=g)
    codes, d2 = nearest_code(x, c, chunk_size=7)
    brute = torch.cdist(x, c) ** 2  # (103, 9)
    assert torch.equal(codes, brute.argmin(1))
    torch.testing.assert_close(d2, brute.min(1).values, atol=1e-4, rtol=1e-4)


def test_rq_kmeans_hand_worked_two_levels():
    # 4 distinct points a + b, a in {(-10, 0), (10, 0)}, b in {(0, -1), (0, 1)}, 5 copies each.
    # Level 1 splits on x: centroids (+-10, 0), residuals (0, +-1); level 2: centroids (0, +-1).
    # So decode(encode(x)) = x exactly, all 2 codes used per level, every item collides (5 copies).
    a = torch.tensor([[-10.0, 0.0], [10.0, 0.0]])
    b = torch.tensor([[0.0, -1.0], [0.0, 1.0]])
    x = (a[:, None, :] + b[None, :, :]).reshape(4, 2).repeat_interleave(5, 0)  # (20, 2)
    q = fit_rq_kmeans(x, RQKmeansConfig(num_levels=2, codebook_size=2), gen())
    torch.testing.assert_close(q.codebooks[0][q.codebooks[0][:, 0].argsort()], a)
    torch.testing.assert_close(q.codebooks[1][q.codebooks[1][:, 1].argsort()], b)
    codes = q.encode(x)
    torch.testing.assert_close(q.decode(codes), x)
    assert codebook_utilization(codes, 2).tolist() == [1.0, 1.0]
    assert collision_rate(codes) == 1.0
    assert torch.unique(codes, dim=0).shape[0] == 4  # the 4 distinct points get 4 paths


def test_empty_clusters_are_reseeded_from_far_points():
    # 90 copies of the origin + 3 far points, K = 4, random init: seeds are (almost surely) all origin
    # copies, so 3 centroids start empty. Re-seeding moves them onto the 3 worst-served (far) points.
    far = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0]])
    x = torch.cat([torch.zeros(90, 2), far])
    cfg = RQKmeansConfig(num_levels=1, codebook_size=4, init="random", num_iters=10)
    centroids = kmeans(x, cfg, gen())
    expected = torch.cat([torch.zeros(1, 2), far])
    dist = torch.cdist(expected, centroids)  # (4, 4): every expected point has a centroid on it
    assert float(dist.min(1).values.max()) < 1e-6
    codes, _ = nearest_code(x, centroids)
    assert codes.unique().numel() == 4  # all codes used


def test_kmeanspp_with_identical_points_does_not_crash():
    x = torch.ones(10, 3)  # every D^2 weight is 0 after the first seed: falls back to uniform
    q = fit_rq_kmeans(x, RQKmeansConfig(num_levels=1, codebook_size=4), gen())
    torch.testing.assert_close(q.decode(q.encode(x)), x)


def test_fit_is_seeded_and_leaves_global_rng_alone():
    x, _ = hierarchical_embeddings(SyntheticConfig(num_items=600, dim=8), gen(3))
    state = torch.get_rng_state()
    q1 = fit_rq_kmeans(x, RQKmeansConfig(codebook_size=8), gen(1))
    q2 = fit_rq_kmeans(x, RQKmeansConfig(codebook_size=8), gen(1))
    v1 = fit_rq_vae(x, RQVAEConfig(codebook_size=8, **{**SMALL_VAE, "num_steps": 20}), gen(1))
    v2 = fit_rq_vae(x, RQVAEConfig(codebook_size=8, **{**SMALL_VAE, "num_steps": 20}), gen(1))
    assert torch.equal(torch.get_rng_state(), state)  # no hidden draws from the global generator
    assert torch.equal(q1.codebooks, q2.codebooks)
    for (k, a), (_, b) in zip(v1.state_dict().items(), v2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------------------------------------
# RQ-VAE / RQ-Kmeans+


def test_loss_terms_and_straight_through():
    x = torch.randn(64, 6, generator=gen())
    model = RQVAE(RQVAEConfig(num_levels=2, codebook_size=4, hidden_dim=16, beta=0.5), input_dim=6)
    model.reset_parameters(gen())
    out = model.loss(x)
    torch.testing.assert_close(out.loss, out.recon + out.codebook + 0.5 * out.commitment)
    out.recon.backward()
    # straight-through: the reconstruction reaches the encoder although the code choice is discrete
    assert float(model.encoder[0].weight.grad.abs().sum()) > 0
    assert (
        model.codebooks.grad is None or float(model.codebooks.grad.abs().sum()) == 0
    )  # recon skips codebooks
    z_st, codes, _, _ = model.quantize(model.embed(x))
    torch.testing.assert_close(z_st, sum(model.codebooks[lv][codes[:, lv]] for lv in range(2)))
    assert torch.equal(codes, model.encode(x))


def test_rq_kmeans_plus_starts_from_rq_kmeans_on_the_initial_latents():
    # residual_init_scale = 0: f(x) = 0 exactly, so the initial latents are x and the k-means init must equal
    # RQ-Kmeans on x under the same generator stream (fit_rq_vae first spawns the weight-init generator).
    x, _ = hierarchical_embeddings(SyntheticConfig(num_items=500, dim=8), gen(2))
    cfg = rq_kmeans_plus_config(codebook_size=8, num_steps=0, residual_init_scale=0.0, hidden_dim=16)
    plus = fit_rq_vae(x, cfg, gen(5))
    g = gen(5)
    spawn_cpu_generator(g)
    ref = fit_rq_kmeans(x, RQKmeansConfig(codebook_size=8, num_iters=cfg.kmeans_iters), g)
    torch.testing.assert_close(plus.codebooks.detach(), ref.codebooks)
    assert torch.equal(plus.encode(x), ref.encode(x))


def _collapse_case(seed: int = 0) -> torch.Tensor:
    """32 tight clusters around an offset of +5: far from codebooks drawn in [-1/K, 1/K]."""
    g = gen(seed)
    centres = 5.0 + torch.randn(32, 8, generator=g)
    return centres.repeat_interleave(40, 0) + 0.05 * torch.randn(1280, 8, generator=g)  # (1280, 8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rq_kmeans_plus_avoids_the_collapse_of_random_rq_vae(seed):
    x = _collapse_case(seed)
    common = dict(num_levels=2, codebook_size=16, **SMALL_VAE)
    vae = quantizer_metrics(fit_rq_vae(x, RQVAEConfig(**common), gen(seed)), x)
    plus = quantizer_metrics(fit_rq_vae(x, rq_kmeans_plus_config(**common), gen(seed)), x)
    # measured (seeds 0-3): RQ-VAE CUR_L1 = 1/16 = 0.0625 (every latent picks one code), CUR_L2 0.06-0.13;
    # RQ-Kmeans+ uses all 16 codes at both levels and reconstructs ~40x better (MSE ~0.02 vs ~0.9).
    # The bounds are the claims, not those values: "collapsed" = at most 4 of 16 codes used, "not collapsed"
    # = at least 15 of 16 (0.9), "reconstructs far better" = at least 5x lower MSE.
    assert vae["cur_l1"] <= 0.25
    assert plus["cur_l1"] >= 0.9 and plus["cur_l2"] >= 0.9
    assert plus["recon_mse"] < 0.2 * vae["recon_mse"]


def test_save_load_round_trip_and_errors(tmp_path):
    x, _ = hierarchical_embeddings(SyntheticConfig(num_items=300, dim=8), gen())
    km = fit_rq_kmeans(x, RQKmeansConfig(codebook_size=8), gen())
    vae = fit_rq_vae(x, rq_kmeans_plus_config(codebook_size=8, **{**SMALL_VAE, "num_steps": 10}), gen())
    km.save(tmp_path / "km.pt")
    vae.save(tmp_path / "vae.pt")
    km2, vae2 = RQKmeans.load(tmp_path / "km.pt"), load_quantizer(tmp_path / "vae.pt")
    assert isinstance(vae2, RQVAE) and isinstance(load_quantizer(tmp_path / "km.pt"), RQKmeans)
    assert torch.equal(km2.encode(x), km.encode(x))
    codes = vae.encode(x)
    assert torch.equal(vae2.encode(x), codes)
    torch.testing.assert_close(vae2.decode(codes), vae.decode(codes))
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries

    with pytest.raises(ValueError, match="expected 'rq_vae'"):
        RQVAE.load(tmp_path / "km.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(ValueError, match="not a readable quantizer file"):
        load_quantizer(tmp_path / "junk.pt")
    raw = (tmp_path / "vae.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable quantizer file"):
        load_quantizer(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a gpr_sim quantizer file"):
        load_quantizer(tmp_path / "foreign.pt")
    payload = torch.load(tmp_path / "km.pt", weights_only=True)
    payload["config"]["codebook_size"] = 16  # config no longer matches the stored (3, 8, 8) codebooks
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="do not match"):
        RQKmeans.load(tmp_path / "mismatch.pt")


def test_decode_rejects_bad_codes():
    q = RQKmeans(RQKmeansConfig(num_levels=2, codebook_size=4), input_dim=3)
    with pytest.raises(ValueError, match="codes must lie in"):
        q.decode(torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="codes must be"):
        q.decode(torch.tensor([[0, 1, 2]]))


# ----------------------------------------------------------------------------------------------
# the Table-1 comparison


def test_synthetic_embeddings_are_seeded_and_clustered():
    cfg = SyntheticConfig(num_items=2000, dim=8, num_categories=4, subcategories_per_category=3)
    x1, labels = hierarchical_embeddings(cfg, gen(7))
    x2, _ = hierarchical_embeddings(cfg, gen(7))
    assert x1.shape == (2000, 8) and torch.equal(x1, x2)
    assert 0 <= int(labels.min()) and int(labels.max()) < 12
    # items scatter around their sub-category with per-dim std item_scale = 0.15. The sample std of 16,000
    # centred values has relative sd 1 / sqrt(2 * 16,000) = 0.56%, and centring on 12 group means shrinks it
    # by at most 0.3%: tolerance 3% (over 4 sds plus that bias).
    centred = torch.cat([x1[labels == s] - x1[labels == s].mean(0) for s in labels.unique()])
    assert float(centred.std()) == pytest.approx(0.15, rel=0.03)


def _check_table1_ordering(df, pas_vs_kmeans: bool = True) -> None:
    """Table 1's ordering. The CUR bounds are the claims "no collapse" (>= 0.9: at least 58 of 64 codes) and
    "collapses at level 1" (<= 0.5; measured 7/64 = 0.11); the rest are orderings, no thresholds."""
    assert list(df.index) == ["RQ-VAE", "RQ-Kmeans", "RQ-Kmeans+"]
    vae, km, plus = (df.loc[m] for m in df.index)
    assert plus.collision_rate <= vae.collision_rate
    assert plus.pas >= vae.pas
    if pas_vs_kmeans:
        assert plus.pas >= km.pas
    assert plus.cur_l1 >= 0.9 and km.cur_l1 >= 0.9
    assert vae.cur_l1 <= 0.5  # random-init RQ-VAE collapses at level 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rq_kmeans_plus_ordering_on_hierarchical_data(seed):
    # 3000 items, L = 3, K = 64, a short 600-step budget. Measured at this budget over data/fit seeds 0-9:
    # collision(RQ-Kmeans+) <= collision(RQ-VAE) 10/10 (~0.04 vs ~0.89), PAS(+) >= PAS(RQ-VAE) 10/10, but
    # PAS(+) >= PAS(RQ-Kmeans) only 8/10 (seeds 2 and 9 lose by ~0.001): the PAS gap to RQ-Kmeans is small
    # and needs the longer default budget (the slow test below checks it over 5 seeds). Here it is a
    # regression value (seed 0: PAS 0.9922 vs 0.9915), the rest is checked on every seed.
    x, _ = hierarchical_embeddings(SyntheticConfig(num_items=3000), gen(seed))
    cfg = CompareConfig(vae_steps=600, hidden_dim=64, batch_size=512)
    _check_table1_ordering(compare_quantizers(x, cfg, seed=seed), pas_vs_kmeans=seed == 0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_rq_kmeans_plus_ordering_default_budget(seed):
    # The CLI defaults (5000 items, hidden 128, 3000 steps): the ordering held for seeds 0-4 when measured.
    x, _ = hierarchical_embeddings(SyntheticConfig(num_items=5000), gen(seed))
    _check_table1_ordering(compare_quantizers(x, CompareConfig(), seed=seed))


def test_compare_main_writes_table(tmp_path):
    args = ["--num-items", "400", "--codebook-size", "8", "--vae-steps", "5", "--kmeans-iters", "3"]
    df = main(args + ["--hidden-dim", "16", "--device", "cpu", "--out", str(tmp_path / "a")])
    assert list(df.columns) == [
        "collision_rate",
        "cur_l1",
        "cur_l2",
        "cur_l3",
        "pas",
        "recon_mse",
        "fit_seconds",
    ]
    for name in ("table.csv", "table.json", "code_usage.png", "config.json"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert set(json.loads((tmp_path / "a" / "table.json").read_text())) == {
        "RQ-VAE",
        "RQ-Kmeans",
        "RQ-Kmeans+",
    }
    assert not list((tmp_path / "a").glob("*.tmp"))
    # --embeddings loads a saved (N, D) tensor instead of drawing synthetic items
    torch.save(torch.randn(300, 5, generator=gen()), tmp_path / "emb.pt")
    df2 = main(
        args + ["--embeddings", str(tmp_path / "emb.pt"), "--device", "cpu", "--out", str(tmp_path / "b")]
    )
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dim"] == 5
    assert df2.shape == (3, 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_fit_with_cpu_generator():
    x = _collapse_case()
    q = fit_rq_vae(x.cuda(), rq_kmeans_plus_config(num_levels=2, codebook_size=16, **SMALL_VAE), gen())
    m = quantizer_metrics(q, x.cuda())
    assert m["cur_l1"] >= 0.9
