"""The one minibatch loop the platform's stage models (retrieval, pre-ranking) train with."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gpr_sim.finite import FirstNonFinite


def train_epochs(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    n: int,
    batch_size: int,
    epochs: int,
    generator: torch.Generator,
    batch_loss: Callable[[Tensor], Tensor],
    name: str,
) -> list[float]:
    """``epochs`` passes over ``n`` examples in seeded random minibatches; the mean loss of every epoch.

    ``batch_loss(idx)`` is the loss of the examples ``idx`` (on the model's device). A non-finite loss stops the
    fit at the end of its epoch with one line naming ``name``, the epoch and the first bad batch
    (``gpr_sim.finite.FirstNonFinite``). One host sync per epoch.
    """
    device = next(model.parameters()).device
    losses = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        total = torch.zeros((), device=device)
        watch = FirstNonFinite(device)
        for batch, start in enumerate(range(0, n, batch_size)):
            idx = order[start : start + batch_size]
            loss = batch_loss(idx)
            watch.see(batch, loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * idx.numel()
        watch.check(f"{name} epoch {epoch}", "loss")
        losses.append(float(total) / n)
    model.eval()
    return losses
