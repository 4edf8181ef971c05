"""One guard against NaN and inf in training: stop the run with a line that names what went wrong.

Why a hard stop: a single non-finite value in a loss reaches every parameter through the shared trunk and
the global gradient-norm clip (``clip_grad_norm_`` scales every gradient by max_norm / inf = 0, and
0 x inf = NaN), so one bad request turns the whole model into NaN in one optimiser step, and a run that
carries on evaluates and saves a NaN policy with exit status 0. The guard runs before the optimiser step
takes effect (read on the host before it, or, with a fused optimiser, the step skipped on the device and the
values read after the update: ``agents.rl.loop.update``), so the parameters, the optimiser state and the last
checkpoint on disk stay the last good ones.
"""

from __future__ import annotations

import torch
from torch import Tensor


class NonFiniteError(FloatingPointError):
    """A training value is NaN or inf; raised before the step that would have applied it."""


def nonfinite_names(values: dict[str, Tensor | float]) -> list[str]:
    """Names of the entries of ``values`` (scalars or tensors) that hold a NaN or an inf."""
    bad = []
    for name, v in values.items():
        t = v if isinstance(v, Tensor) else torch.tensor(float(v))
        if not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def check_finite(where: str, values: dict[str, Tensor | float]) -> None:
    """Raise `NonFiniteError` naming ``where`` and every entry of ``values`` that is not finite.

    Args:
        where: the place in the run, e.g. ``"iteration 11, epoch 0, minibatch 38"``.
        values: named scalars or tensors (one host sync per tensor: call it once per step, not per op).
    """
    bad = nonfinite_names(values)
    if bad:
        raise NonFiniteError(f"{where}: non-finite {', '.join(bad)}")


class FirstNonFinite:
    """The index of the first step whose value was NaN or inf, kept on the values' device: a loop of small steps
    (the platform's stage models) checks every step without a host sync, which would stall the GPU queue behind
    each one, and reads the answer once per epoch (``check``). A bad step still stops the fit, at the end of its
    epoch instead of before its update: nothing of the fit is kept, so nothing good is lost."""

    def __init__(self, device: torch.device | str) -> None:
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def see(self, step: int, value: Tensor) -> None:
        """Record ``step`` if ``value`` holds a NaN or an inf and no earlier step did."""
        bad = ~torch.isfinite(value.detach()).all()
        self.first = torch.where(bad & (self.first < 0), step, self.first)

    def check(self, where: str, name: str) -> None:
        """Raise ``NonFiniteError`` ("{where}, batch {step}: non-finite {name}") if a step was recorded."""
        step = int(self.first)  # the one host sync
        if step >= 0:
            raise NonFiniteError(f"{where}, batch {step}: non-finite {name}")


def check_finite_parameters(where: str, module: torch.nn.Module) -> None:
    """Raise `NonFiniteError` naming the first parameters of ``module`` that hold a NaN or an inf."""
    bad = [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteError(f"{where}: non-finite parameters {', '.join(bad[:3])}{more}")


__all__ = ["FirstNonFinite", "NonFiniteError", "check_finite", "check_finite_parameters", "nonfinite_names"]
