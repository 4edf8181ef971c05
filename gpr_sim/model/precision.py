"""The compute precisions the generator runs in, and the context that applies one.

Parameters, gradients and optimiser state stay float32 whatever the precision; ``bf16`` runs the forward
passes under bfloat16 autocast (the matmuls in bfloat16, reductions and the norms' statistics in float32), and
``fp32`` is the reference every bf16 path is tested against. One home for every stage that runs the model:
pre-training (``agents.pretraining``), the RL rollout and update (``agents.rl``) and their benchmarks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("fp32", "bf16")
"""compute precisions of the model's forward passes: fp32 (the reference) | bf16 (autocast on CUDA and CPU)"""


def check_precision(precision: str, name: str = "precision") -> str:
    """``precision`` if it is one of ``PRECISIONS``, else a ``ValueError`` naming it (as the setting ``name``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"{name}={precision!r} is invalid: expected one of {PRECISIONS}")
    return precision


def precision_context(device: torch.device | str, precision: str):
    """Autocast to bfloat16 on ``device`` for ``bf16``; a no-op context for ``fp32`` (the reference)."""
    dev = torch.device(device).type
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=check_precision(precision) == "bf16")


RESIDUALS = ("fp32", "compute")
"""dtypes the blocks' residual stream may be carried in under autocast: fp32 (the embeddings' dtype) | compute
(the autocast dtype)"""


class ResidualStream:
    """The dtype the HSD's and the PTD's residual streams are carried in under autocast (``to_stream``).

    Autocast rounds each matmul's inputs to bfloat16, but the tensors between the matmuls (the residual sums,
    the norms' inputs, the attention gate, and their gradients) keep the embeddings' float32: on the GPU the
    compiled update moves them as fp32 around bf16 GEMMs (``benchmarks/roofline_rl_iteration.py``: element-wise
    work, norms and casts are two thirds of the update's bytes). ``compute`` carries the stream in the autocast
    dtype from the embeddings on (the norms still compute their statistics in float32 and the heads' softmax
    stays float32), halving those bytes; ``fp32`` keeps it float32. Without autocast (the fp32 reference) both
    are the same. The class attribute is the default the benchmarks flip (``bench_rl_iteration --residual``) and
    a run sets for its own forwards (``residual_stream``, ``agents.hepo --residual-stream``). It stays ``fp32``, the
    five-seed comparison's setting: ``compute`` saved 5-7% of the update on an H100 and learned as well from one
    seed's start (benchmarks/RESULTS.md, "The residual stream in bf16"), one seed short of a default.
    """

    dtype: str = "fp32"


def check_residual(dtype: str) -> str:
    """``dtype`` if it is one of ``RESIDUALS``, else a ``ValueError`` naming it."""
    if dtype not in RESIDUALS:
        raise ValueError(f"residual_stream={dtype!r} is invalid: expected one of {RESIDUALS}")
    return dtype


def to_stream(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the residual stream's dtype: the autocast dtype of its device under ``ResidualStream.dtype`` =
    ``compute`` with autocast on; else ``x`` unchanged."""
    if ResidualStream.dtype not in RESIDUALS:
        raise ValueError(
            f"ResidualStream.dtype={ResidualStream.dtype!r} is invalid: expected one of {RESIDUALS}"
        )
    dev = x.device.type
    if ResidualStream.dtype == "compute" and torch.is_autocast_enabled(dev):
        return x.to(torch.get_autocast_dtype(dev))
    return x


@contextlib.contextmanager
def residual_stream(dtype: str) -> Iterator[None]:
    """``ResidualStream.dtype`` = ``dtype`` inside the block, the previous value restored after it (a run sets its
    stream for its own forwards only: a notebook's next run or evaluation in the same process gets its own)."""
    previous, ResidualStream.dtype = ResidualStream.dtype, check_residual(dtype)
    try:
        yield
    finally:
        ResidualStream.dtype = previous
