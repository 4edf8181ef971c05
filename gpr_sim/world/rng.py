"""Counter-based random numbers for the simulation core.

Every random number of a step is a hash of ``(seed, env slot, draw counter, stream)``. Why not a
``torch.Generator``: a generator's sequence depends on the batch size and on how often it was called,
so env slot 0 of a batch of 1000 could never reproduce a single env, CPU and CUDA would disagree, and
the step could not be a pure (compilable) function. With hashing, a slot's trajectory depends only on
its own key: the single env is literally slot 0 of the batched core, and the same seed gives the same
draws on any device and at any batch size.

The hash is a 32-bit integer mixer evaluated in int64 arithmetic that never overflows (constants are
applied in 16-bit halves), so it is exact on every backend.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
# Multipliers of the "lowbias32" mixer (odd constants with good avalanche).
_C1 = 0x7FEB352D
_C2 = 0x846CA68B
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without int64 overflow."""
    hi, lo = c >> 16, c & _M16
    return (((x * hi) & _M16) << 16) + x * lo & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit avalanche mixer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def stream_keys(seed: torch.Tensor, slot: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Key of one draw event per env slot. All (N,) int64; returns (N,) int64 in [0, 2**32)."""
    k = mix32((seed & _M32) ^ _GOLDEN)
    k = mix32(k ^ (slot & _M32))
    return mix32(k ^ (counter & _M32))


def hash_bits(keys: torch.Tensor, num_streams: int, offset: int = 0) -> torch.Tensor:
    """(N,) keys -> (N, num_streams) independent 32-bit integers (int64 in [0, 2**32))."""
    streams = torch.arange(offset, offset + num_streams, device=keys.device, dtype=torch.int64)
    return mix32(mix32(keys[:, None] ^ _mul32(streams, _GOLDEN)[None, :]))


UNIFORM_MAX = 1.0 - 2.0**-24
"""the largest float32 below 1: the top of `uniforms`' range"""


def uniforms(keys: torch.Tensor, num_streams: int, offset: int = 0) -> torch.Tensor:
    """(N,) keys -> (N, num_streams) float32 uniforms strictly inside (0, 1).

    A draw is (b + 0.5) / 2**24 for 24 hash bits b, rounded to float32. For the top code b = 2**24 - 1
    that rounds to exactly 1.0 (1 - 2**-25 lies half-way between the last two float32 values, and ties
    go to the even one, 1.0), where ``normals`` and ``gumbels`` are infinite: about 2 draws in 2**25. At
    GPU scale that happened every few iterations and one infinite refiner noise turned a whole RL update
    into NaN. The top code is therefore mapped to ``UNIFORM_MAX``; every other draw is unchanged.
    """
    bits = hash_bits(keys, num_streams, offset) >> 8  # 24 bits: exact in float32
    return ((bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))).clamp_(max=UNIFORM_MAX)


def normals(u: torch.Tensor) -> torch.Tensor:
    """Standard normals from uniforms in (0, 1) (inverse CDF: one uniform per normal)."""
    return torch.special.ndtri(u)


def gumbels(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniforms in (0, 1)."""
    return -torch.log(-torch.log(u))
