"""The compute precisions the generator runs in, and the context that applies one.

Parameters, gradients and optimiser state stay float32 whatever the precision; ``bf16`` runs the forward
passes under bfloat16 autocast (the matmuls in bfloat16, reductions and the norms' statistics in float32), and
``fp32`` is the reference every bf16 path is tested against. One home for every stage that runs the model:
pre-training (``agents.pretraining``), the RL rollout and update (``agents.rl``) and their benchmarks.
"""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16")
"""compute precisions of the model's forward passes: fp32 (the reference) | bf16 (autocast on CUDA and CPU)"""


def check_precision(precision: str) -> str:
    """``precision`` if it is one of ``PRECISIONS``, else a ``ValueError`` naming it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: expected one of {PRECISIONS}")
    return precision


def precision_context(device: torch.device | str, precision: str):
    """Autocast to bfloat16 on ``device`` for ``bf16``; a no-op context for ``fp32`` (the reference)."""
    dev = torch.device(device).type
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=check_precision(precision) == "bf16")
