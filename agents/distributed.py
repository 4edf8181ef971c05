"""Data-parallel helpers on PyTorch's own stack: ``torchrun`` env vars, ``init_process_group``, sharding.

    torchrun --standalone --nproc-per-node 2 -m agents.pretrain --device cuda ...

``init_from_env`` reads the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and joins the process group: NCCL for CUDA, gloo for CPU. Without
``WORLD_SIZE`` (or with 1) it is a no-op and every helper here degrades to the single-process case,
so a CLI can call them unconditionally.

Rows: a global batch of ``n`` rows (requests, env slots) is cut into ``world_size`` contiguous,
equal slices; rank r owns ``shard(n, dist)`` = [r n / W, (r + 1) n / W). Equal slices make the mean of
the per-rank means the global mean, so DDP's gradient average equals the single-process gradient.

The advertiser market. ``BatchedMarket`` / ``open_market`` scale each advertiser's daily budget to the
traffic of the market's own ``num_envs`` sessions (``budget_per_1k_requests`` x ``num_envs`` x
``steps_per_day`` / 1000). Two ways to keep W per-rank markets consistent with one global market:

* **per-rank budget shares** (what this module supports): rank r runs ``BatchedMarket(num_envs=N / W)``,
  so by that scaling its market holds exactly 1/W of every advertiser's global budget, with no
  communication. Spend never exceeds the global budget (each share is capped on its own), but an
  advertiser can run dry on one rank while it still has budget on another, and pacing looks at each
  share's own spend ratio: while no budget binds, results equal one process; once budgets bind they
  are close but not identical.
* **all-reduced spend** (exact, not implemented): every step, all-gather the (advertiser, charge) list
  of every rank (equal sizes: N/W rows x S slots), run ``cap_to_budget`` on the concatenation in rank
  order (= the single-process row order, given contiguous slots), keep the own slice of the grant, and
  all-reduce the spend so every rank holds the one global ``MarketState``. That needs a hook in
  ``gpr_sim.world.core.transition`` (a ``cap`` callable or a ``market_reduce`` argument): one
  all-gather per env step.

Sessions: a session's random stream is keyed by (seed, slot, counter); ``BatchedMarket.reset`` numbers
the slots 0..N-1. ``reset_shard`` starts rank r's market on the global slots ``shard(N, dist)``
instead, so its sessions are the single-process run's rows (autoreset keeps each row's slot).
A ``slot_offset`` argument of ``BatchedMarket`` would make this helper unnecessary.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""what ``torchrun`` sets per process (plus ``MASTER_ADDR`` / ``MASTER_PORT``)"""


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the data-parallel job (``world_size`` 1 = single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """rank 0: the one process that evaluates and writes the run folder"""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = Dist()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value != "" else default
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def init_from_env(device: str = "cpu", timeout_s: float = 1800.0) -> Dist:
    """Join the ``torchrun`` process group described by the environment; a no-op when single-process.

    ``device`` is the CLI's ``--device``: ``cuda`` (or ``cuda:i``) becomes ``cuda:LOCAL_RANK`` with
    the NCCL backend, anything else keeps the device with gloo. ``NCCL_NVLS_ENABLE`` defaults to 0
    (NVLink multicast off) unless already set.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Dist(device=device)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is out of range for WORLD_SIZE={world}")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} under torchrun but torch.cuda.is_available() is False")
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local}, but {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not torch_dist.is_initialized():
        kw = {"device_id": torch.device(device)} if cuda else {}
        torch_dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                      timeout=datetime.timedelta(seconds=timeout_s), **kw)  # fmt: skip
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def shard(n: int, dist: Dist) -> slice:
    """The contiguous global rows [r n / W, (r + 1) n / W) that rank r owns.

    Raises:
        ValueError: if ``n`` is not a multiple of the world size (unequal slices would bias the mean).
    """
    if n % dist.world_size:
        raise ValueError(f"{n} rows do not split evenly over {dist.world_size} processes: "
                         f"use a multiple of the world size")  # fmt: skip
    per = n // dist.world_size
    return slice(dist.rank * per, (dist.rank + 1) * per)


def all_reduce_mean(values: dict[str, float], dist: Dist) -> dict[str, float]:
    """The mean over ranks of each value (one collective); the values themselves when single-process."""
    if not dist.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return {k: float(v) / dist.world_size for k, v in zip(keys, t.tolist())}


def barrier(dist: Dist) -> None:
    if dist.enabled:
        if torch.device(dist.device).type == "cuda":
            torch_dist.barrier(device_ids=[dist.local_rank])
        else:
            torch_dist.barrier()


def cleanup(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


# ----------------------------------------------------------------------------- same random draws as one process


def _size(args: tuple) -> tuple[int, ...]:
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0])
    return tuple(args)


@contextlib.contextmanager
def global_row_draws(generator: torch.Generator, rows: int, dist: Dist) -> Iterator[None]:
    """Inside, ``torch.randn`` / ``torch.randint`` calls that use ``generator`` draw the global batch.

    A draw of shape (rows, ...) becomes a draw of (rows W, ...) of which this rank keeps its slice, so
    each row gets the noise it gets in one process and ``generator`` advances as it does there (the
    refiner's noise in ``GPRModel.mtp_loss``). Other calls pass through. A draw from ``generator``
    whose leading dimension is not ``rows`` raises (it could not be matched to a global row).
    A ``noise`` / row-offset argument of ``mtp_loss`` would replace this patch.
    """
    if not dist.enabled:
        yield
        return
    randn, randint, w = torch.randn, torch.randint, dist.world_size
    own = shard(rows * w, dist)

    def widen(shape: tuple[int, ...]) -> tuple[int, ...]:
        if not shape or shape[0] != rows:
            raise RuntimeError(f"draw of shape {shape} from the step generator: expected leading dim {rows}")
        return (rows * w, *shape[1:])

    def g_randn(*size, generator=None, **kw):
        if generator is not gen:
            return randn(*size, generator=generator, **kw)
        return randn(widen(_size(size)), generator=generator, **kw)[own]

    def g_randint(*args, generator=None, size=None, **kw):
        if generator is not gen:
            return randint(*args, generator=generator, size=size, **kw) if size is not None else \
                randint(*args, generator=generator, **kw)  # fmt: skip
        if size is None:
            *bounds, size = args
        else:
            bounds = list(args)
        return randint(*bounds, widen(tuple(size)), generator=generator, **kw)[own]

    gen = generator
    torch.randn, torch.randint = g_randn, g_randint
    try:
        yield
    finally:
        torch.randn, torch.randint = randn, randint


# ----------------------------------------------------------------------------- batched market shards


def reset_shard(market, seed: int | None, dist: Dist, num_envs: int | None = None) -> dict[str, torch.Tensor]:
    """``BatchedMarket.reset`` on rank r's global env slots ``shard(num_envs, dist)``.

    ``market`` is this rank's ``BatchedMarket`` with ``num_envs / W`` rows (``num_envs``: the global
    count, default ``market.num_envs * W``); it then holds budget share 1/W of every advertiser
    (``open_market`` scales budgets to its own row count) and its rows are the single-process rows
    of those slots. Returns the first observation. Single-process: exactly ``market.reset(seed)``.
    """
    if not dist.enabled:
        return market.reset(seed)
    total = market.num_envs * dist.world_size if num_envs is None else num_envs
    rows = shard(total, dist)
    if rows.stop - rows.start != market.num_envs:
        raise ValueError(f"the market has {market.num_envs} rows, rank {dist.rank}'s share of {total} slots "
                         f"is {rows.stop - rows.start}")  # fmt: skip
    return market.reset(seed, first_slot=rows.start)
