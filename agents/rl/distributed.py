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
traffic of ``market_envs`` sessions (``budget_per_1k_requests`` x ``market_envs`` x ``steps_per_day`` /
1000; default: the market's own rows). Two ways to keep W per-rank markets consistent with one global
market:

* **all-reduced spend** (exact, ``shard_market``): rank r runs ``N / W`` rows of a market whose budgets
  are scaled to all N sessions, and ``transition`` settles charges through ``grant_across_ranks``:
  every step, all-gather the (advertiser, charge) list of every rank (equal sizes: N/W rows x S
  slots), run ``cap_to_budget`` on the concatenation in rank order (= the single-process row order,
  given contiguous slots), keep the own slice of the grant, and sum the spend of all ranks, so every
  rank holds the one global ``MarketState`` and its rows' single-process outcomes. Cost: one
  all-gather per env step, and every rank must step together.
* **per-rank budget shares** (no communication): rank r runs ``BatchedMarket(num_envs=N / W)``, so by
  that scaling its market holds exactly 1/W of every advertiser's global budget. Spend never exceeds
  the global budget (each share is capped on its own), but an advertiser can run dry on one rank while
  it still has budget on another, and pacing looks at each share's own spend ratio: while no budget
  binds, results equal one process; once budgets bind they are close but not identical.

Sessions: a session's random stream is keyed by (seed, slot, counter); ``BatchedMarket.reset`` numbers
the slots ``first_slot .. first_slot + rows - 1``. ``reset_shard`` (and ``shard_market``) start rank r's
market on the global slots ``shard(N, dist)``, so its sessions are the single-process run's rows
(autoreset keeps each row's slot).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from envs.market import BatchedMarket
from gpr_sim.world import World, WorldConfig
from gpr_sim.world.core import Grant, grant_in_order

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
        torch_dist.init_process_group(
            "nccl" if cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kw,
        )
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def launch(main, args):
    """``main(args, dist)`` in the ``torchrun`` process group of the environment (``init_from_env`` on
    ``args.device``; the device becomes this rank's), leaving the group afterwards; plain call when single."""
    dist = init_from_env(args.device)
    if not dist.enabled:
        return main(args, dist)
    try:
        return main(on_rank_device(args, dist), dist)
    finally:
        cleanup(dist)


def on_rank_device(args, dist: Dist):
    """``args`` (a dataclass with ``device``) with this rank's device when data-parallel; as is when single."""
    return dataclasses.replace(args, device=dist.device) if dist.enabled else args


def broadcast_object(value, dist: Dist):
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself when single-process."""
    if not dist.enabled:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_rank_folder(open_folder: Callable[[], object], dist: Dist) -> Iterator[object]:
    """Rank 0 alone opens (owns and locks) the run folder, ``open_folder()``; every rank fails alike when it
    is refused (the ``ValueError`` is broadcast), and the folder is closed when the block ends. Yields the
    folder on rank 0, None on the others."""
    folder, refused = None, None
    if dist.is_main:
        try:
            folder = open_folder()
        except ValueError as e:
            refused = str(e)
    refused = broadcast_object(refused, dist)
    if refused:
        raise ValueError(refused)
    try:
        yield folder
    finally:
        if folder is not None:
            folder.close()


def gather_objects(value, dist: Dist) -> list:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` when single-process."""
    if not dist.enabled:
        return [value]
    parts = [None] * dist.world_size
    torch_dist.all_gather_object(parts, value)
    return parts


def shard(n: int, dist: Dist) -> slice:
    """The contiguous global rows [r n / W, (r + 1) n / W) that rank r owns.

    Raises:
        ValueError: if ``n`` is not a multiple of the world size (unequal slices would bias the mean).
    """
    if n % dist.world_size:
        raise ValueError(
            f"{n} rows do not split evenly over {dist.world_size} processes: use a multiple of the world size"
        )
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


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The sum over ranks of ``t`` (on ``t``'s device; reduced on the group's device); ``t`` when single."""
    if not dist.enabled:
        return t
    out = t.to(dist.device)
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out.to(t.device)


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
            return (
                randint(*args, generator=generator, size=size, **kw)
                if size is not None
                else randint(*args, generator=generator, **kw)
            )
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


def grant_across_ranks(dist: Dist) -> Grant:
    """A ``transition`` grant that settles the charges of every rank as one process settles all rows.

    One all-gather collects each rank's (advertiser, charge) pairs (stacked in one float64 tensor: ids
    are exact there) in rank order, ``settle`` (``transition`` passes the world's ``budget_settlement`` rule;
    default ``grant_in_order``) settles the concatenation, and the rank keeps its
    slice of the grant mask; the spend is the global one, summed in the single-process order, so every
    rank's market moves bit for bit as the single-process market. Every rank must pass the same number
    of charges in every step. Single-process: ``grant_in_order``.
    """
    if not dist.enabled:
        return grant_in_order

    def grant(
        advertiser: torch.Tensor,
        charge: torch.Tensor,
        remaining: torch.Tensor,
        settle: Grant = grant_in_order,
    ):
        mine = torch.stack([advertiser.to(torch.float64), charge.to(torch.float64)])  # (2, M)
        parts = [torch.empty_like(mine) for _ in range(dist.world_size)]
        torch_dist.all_gather(parts, mine)
        every = torch.cat(parts, dim=1)
        granted, spend = settle(every[0].long(), every[1].to(charge.dtype), remaining)
        m = advertiser.shape[0]
        return granted[dist.rank * m : (dist.rank + 1) * m], spend

    return grant


def shard_market(
    config: WorldConfig,
    num_envs: int,
    dist: Dist,
    world_seed: int = 0,
    device: str | torch.device | None = None,
    world: World | None = None,
) -> BatchedMarket:
    """Rank r's rows of one global market of ``num_envs`` sessions, exact (all-reduced spend).

    The market has the rows of the global slots ``shard(num_envs, dist)`` (``reset`` keys them so),
    budgets scaled to all ``num_envs`` sessions, and settles charges with ``grant_across_ranks``: given
    the same actions, every rank ends each step with the single-process ``MarketState`` and its rows'
    single-process outcomes. Every rank must call ``step`` together (one all-gather each). ``device``
    defaults to ``dist.device``. Single-process: ``BatchedMarket(config, num_envs, ...)``.
    """
    rows = shard(num_envs, dist)
    return BatchedMarket(
        config,
        rows.stop - rows.start,
        world_seed,
        device or dist.device,
        world,
        **shard_options(num_envs, dist),
    )


def shard_options(num_envs: int, dist: Dist) -> dict:
    """Keyword arguments that make a market (``BatchedMarket`` or the vector env) of N / W rows rank r's exact
    shard of one market of ``num_envs`` sessions, as ``shard_market`` builds it: the global session count
    (budgets), the cross-rank grant and the first global slot. Single-process: the plain market's values."""
    if num_envs % dist.world_size:
        raise ValueError(
            f"num_envs={num_envs} is invalid with {dist.world_size} processes: the global number of "
            "sessions must be a multiple of the world size"
        )
    if not dist.enabled:
        return {}
    return {
        "market_envs": num_envs,
        "grant": grant_across_ranks(dist),
        "first_slot": shard(num_envs, dist).start,
    }


def _own_rows(market: BatchedMarket, num_envs: int, dist: Dist) -> slice:
    """Rank r's global slots ``shard(num_envs, dist)``; an error if ``market`` has another row count."""
    rows = shard(num_envs, dist)
    if rows.stop - rows.start != market.num_envs:
        raise ValueError(
            f"the market has {market.num_envs} rows, rank {dist.rank}'s share of {num_envs} "
            f"sessions is {rows.stop - rows.start}"
        )
    return rows


def reset_shard(market, seed: int | None, dist: Dist, num_envs: int | None = None) -> dict[str, torch.Tensor]:
    """``BatchedMarket.reset`` on rank r's global env slots ``shard(num_envs, dist)``.

    ``market`` is this rank's ``BatchedMarket`` with ``num_envs / W`` rows (``num_envs``: the global
    count, default ``market.num_envs * W``); its rows are the single-process rows of those slots. Built
    with plain ``BatchedMarket(num_envs=N / W)`` it holds budget share 1/W of every advertiser
    (``open_market`` scales budgets to its own row count); ``shard_market`` builds the exact alternative.
    Returns the first observation. Single-process: exactly ``market.reset(seed)``.
    """
    if not dist.enabled:
        return market.reset(seed)
    total = market.num_envs * dist.world_size if num_envs is None else num_envs
    return market.reset(seed, first_slot=_own_rows(market, total, dist).start)
