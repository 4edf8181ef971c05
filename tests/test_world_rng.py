"""Counter-based draws: range and finiteness at the edges of the hash (the GPU-scale NaN)."""

import torch

from gpr_sim.world import rng

# Keys whose first stream hashes to the top 24-bit code 2**24 - 1, found by scanning keys 0..2**27 with
# ``rng.hash_bits(keys, 1) >> 8``. Before the fix, (2**24 - 1 + 0.5) / 2**24 rounded to exactly 1.0 in
# float32, so ``normals`` gave +inf (the refiner noise that turned a 4096-session RL run into NaN at
# iteration 10) and ``gumbels`` +inf.
TOP_CODE_KEYS = torch.tensor([62533353, 74303823])


def test_top_code_keys_really_hit_the_top_code():
    bits = rng.hash_bits(TOP_CODE_KEYS, 1)[:, 0] >> 8
    assert bits.tolist() == [(1 << 24) - 1] * 2


def test_uniforms_stay_strictly_inside_the_unit_interval_at_the_top_code():
    u = rng.uniforms(TOP_CODE_KEYS, 1)
    assert (u < 1.0).all() and (u > 0.0).all()
    assert u.eq(rng.UNIFORM_MAX).all()
    assert torch.isfinite(rng.normals(u)).all()
    assert torch.isfinite(rng.gumbels(u)).all()


def test_uniforms_other_codes_unchanged():
    # every code below the top keeps its value (b + 0.5) / 2**24 as float32 rounds it
    keys = torch.arange(1 << 16, dtype=torch.int64)
    bits = rng.hash_bits(keys, 3) >> 8
    expected = (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    top = bits == (1 << 24) - 1
    torch.testing.assert_close(rng.uniforms(keys, 3)[~top], expected[~top], rtol=0, atol=0)


def test_uniforms_cover_the_range_evenly():
    # 2**20 draws: mean 1/2 and variance 1/12 within 6 standard errors (SE of the mean 0.289/1024)
    u = rng.uniforms(torch.arange(1 << 18, dtype=torch.int64), 4).double().flatten()
    assert abs(u.mean().item() - 0.5) < 6 * (1 / 12) ** 0.5 / 1024
    assert abs(u.var().item() - 1 / 12) < 6 * 0.0745 / 1024  # SD of (u - 1/2)^2 is 1/sqrt(180) = 0.0745
    assert u.min() > 0 and u.max() < 1
