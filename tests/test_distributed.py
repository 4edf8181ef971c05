"""Data-parallel pre-training (torchrun, gloo, 2 CPU processes) matches one process; sharding helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agents import pretrain
from agents.pretraining.checkpoint import read_checkpoint
from agents.pretraining.config import PretrainConfig
from agents.pretraining.trainer import pretrain as pretrain_stage
from agents.rl import distributed
from agents.rl.distributed import Dist
from envs.market import BatchedMarket
from gpr_sim.runs import read_metrics
from gpr_sim.world import preset
from tests.helpers import torchrun

TINY = (
    "--d-model 16 --n-layers 1 --batch-size 16 --lr 3e-3 --threads 1 --eval-requests 20 --no-progress".split()
)


def test_shard_rows():
    assert distributed.shard(8, Dist()) == slice(0, 8)
    rows = [distributed.shard(12, Dist(rank=r, world_size=3)) for r in range(3)]
    assert rows == [slice(0, 4), slice(4, 8), slice(8, 12)]
    assert sum((list(range(12))[s] for s in rows), []) == list(range(12))  # disjoint, in order, complete
    with pytest.raises(ValueError, match="multiple of the world size"):
        distributed.shard(10, Dist(rank=0, world_size=3))


def test_single_process_is_a_no_op(monkeypatch):
    for name in distributed.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    d = distributed.init_from_env("cpu")
    assert d == Dist(device="cpu") and d.is_main and not d.enabled
    assert distributed.all_reduce_mean({"a": 1.5}, d) == {"a": 1.5}
    distributed.barrier(d)
    distributed.cleanup(d)


def test_batch_size_must_split_over_ranks(tmp_path):
    cfg = PretrainConfig(out=str(tmp_path), batch_size=10)
    with pytest.raises(ValueError, match="multiple of the world size"):
        pretrain_stage(cfg, Dist(rank=0, world_size=3))


def test_global_row_draws_give_each_rank_its_rows_of_the_one_process_draw():
    def draws(gen: torch.Generator, rows: int):
        a = torch.randn((rows, 3), generator=gen)
        b = torch.randint(0, 5, (rows,), generator=gen)
        c = torch.randn(rows, 2, generator=gen)
        return a, b, c

    randn, randint = torch.randn, torch.randint
    want = draws(torch.Generator().manual_seed(7), 8)
    want_state = torch.Generator().manual_seed(7)
    draws(want_state, 8)
    for rank in range(2):
        gen = torch.Generator().manual_seed(7)
        d = Dist(rank=rank, world_size=2)
        with distributed.global_row_draws(gen, 4, d):
            got = draws(gen, 4)
            other = torch.randn(3, generator=torch.Generator().manual_seed(1))  # another generator: untouched
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w[rank * 4 : (rank + 1) * 4], rtol=0, atol=0)
        torch.testing.assert_close(other, torch.randn(3, generator=torch.Generator().manual_seed(1)))
        # the generator advanced as in one process
        assert torch.equal(gen.get_state(), want_state.get_state())
        with distributed.global_row_draws(gen, 4, d), pytest.raises(RuntimeError, match="leading dim"):
            torch.randn(5, generator=gen)
    assert torch.randn is randn and torch.randint is randint  # the patch is undone


def test_market_shards_hold_budget_shares_and_the_global_sessions():
    cfg = preset("small")
    one = BatchedMarket(cfg, 8)
    obs = one.reset(seed=3)
    parts = []
    for rank in range(2):
        m = BatchedMarket(cfg, 4, world=one.world)
        parts.append((m, distributed.reset_shard(m, 3, Dist(rank=rank, world_size=2))))
    # budget share 1/W: open_market scales budgets to the market's own rows (num_envs = N / W)
    total = sum(m.market.budget for m, _ in parts)
    torch.testing.assert_close(total, one.market.budget)
    torch.testing.assert_close(parts[0][0].market.budget, one.market.budget / 2)
    # rank r's rows are the single-process sessions of global slots [4 r, 4 r + 4)
    for key, value in obs.items():
        torch.testing.assert_close(torch.cat([o[key] for _, o in parts]), value, rtol=0, atol=0)
    # one step from fresh budgets (none binds): the same outcomes row for row
    cand = torch.arange(8 * 4).view(8, 4) % one.world.config.num_ads
    _, out, *_ = one.step(cand)
    outs = [m.step(cand[4 * r : 4 * r + 4])[1] for r, (m, _) in enumerate(parts)]
    assert int(out.budget_capped.sum()) == 0
    for key in ("ad_id", "impression", "click", "revenue", "reward"):
        torch.testing.assert_close(torch.cat([getattr(o, key) for o in outs]), getattr(out, key))
    # single process: reset_shard is BatchedMarket.reset
    m = BatchedMarket(cfg, 8, world=one.world)
    torch.testing.assert_close(distributed.reset_shard(m, 3, Dist())["user_id"], obs["user_id"])


# ----------------------------------------------------------------------------- torchrun, gloo, 2 processes

LR, RTOL, ATOL = 3e-3, 1e-4, 1e-5
"""tolerance of the 2-process vs 1-process comparison (float32 sums in another order)"""


KEY_BIAS_CHUNKS = {"qkvu.bias": (1, 4), "qkv.bias": (1, 3), "kv.bias": (0, 2)}
"""attention in-projection biases: (index of the key chunk, number of chunks) of the stacked bias"""


def _key_part(name: str, size: int) -> slice | None:
    """The key chunk of a stacked in-projection bias (q, k, v[, u]) or None: the key bias's true gradient is
    0 (softmax is shift-invariant), so Adam turns float noise into steps of up to ~lr there, in either run."""
    for suffix, (index, chunks) in KEY_BIAS_CHUNKS.items():
        if name.endswith(suffix):
            width = size // chunks
            return slice(index * width, (index + 1) * width)
    return None


def _assert_weights_close(got: dict, want: dict, steps: int) -> None:
    """Every parameter at RTOL/ATOL, except the key chunk of attention biases (bounded by Adam's step size)."""
    assert got.keys() == want.keys()
    for name in want:
        key = _key_part(name, want[name].numel())
        if key is None:
            torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL, msg=name)
            continue
        assert (got[name][key] - want[name][key]).abs().max() <= 2 * steps * LR, name
        rest = torch.ones(want[name].numel(), dtype=torch.bool)
        rest[key] = False  # the q, v (and gate u) biases: a real tolerance
        torch.testing.assert_close(got[name][rest], want[name][rest], rtol=RTOL, atol=ATOL, msg=name)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny collected log and tokenizer (one 1-step pre-training run makes them)."""
    out = tmp_path_factory.mktemp("src")
    pretrain.main(["--out", str(out), "--steps", "1", "--collect-envs", "16", "--collect-steps", "24", *TINY])
    return ["--logs", str(out / "logs.parquet"), "--tokenizer", str(out / "tokenizer")]


def _torchrun(args: list[str], nproc: int = 2):
    return torchrun("agents.pretrain", args, nproc)


def test_two_gloo_processes_match_one_process(inputs, tmp_path):
    common = [*inputs, "--eval-every", "3", "--checkpoint-every", "3", "--select", "best", *TINY]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    want = pretrain.main(["--out", str(single), "--steps", "6", *common])
    _torchrun(["--out", str(ddp), "--steps", "6", *common])

    # the same global batches, gradients and refiner noise: metrics and weights up to float tolerance
    a, b = read_metrics(single / "metrics.jsonl"), read_metrics(ddp / "metrics.jsonl")
    assert [r["step"] for r in b] == [r["step"] for r in a] == [0, 3, 6]
    for key in (
        "train/loss",
        "train/loss_mtp",
        "train/loss_refine",
        "train/loss_value",
        "eval/loss",
        "eval/loss_value",
    ):
        np.testing.assert_allclose(
            [r[key] for r in b if key in r], [r[key] for r in a if key in r], rtol=RTOL
        )
    sa = read_checkpoint(single / "checkpoint.pt")
    sb = read_checkpoint(ddp / "checkpoint.pt")
    assert sb["step"] == 6 and torch.equal(sa["rng"], sb["rng"])  # the sampler RNG in lock-step
    _assert_weights_close(sb["model"], sa["model"], steps=6)
    # the same parameters were trained (the HTE by its value loss in both)
    assert sb["optimizer"]["state"].keys() == sa["optimizer"]["state"].keys()
    # only rank 0 wrote the run folder; its summary is the single-process one
    got = json.loads((ddp / "summary.json").read_text())
    assert got["best"]["step"] == want["best"]["step"] and got["final"]["step"] == 6
    assert json.loads((ddp / "config.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())

    # resume under torchrun: 3 more steps from the 2-process checkpoint equal a straight 9-step run
    _torchrun(["--out", str(ddp), "--steps", "9", *common])
    pretrain.main(["--out", str(single), "--steps", "9", *common])
    a, b = read_metrics(single / "metrics.jsonl"), read_metrics(ddp / "metrics.jsonl")
    assert [r["step"] for r in b] == [0, 3, 6, 9]
    np.testing.assert_allclose(b[-1]["train/loss"], a[-1]["train/loss"], rtol=RTOL)
    _assert_weights_close(
        read_checkpoint(ddp / "checkpoint.pt")["model"],
        read_checkpoint(single / "checkpoint.pt")["model"],
        steps=9,
    )
