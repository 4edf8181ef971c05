"""``score`` with the same candidates in every row (a broadcast view, as the oracle scores the whole catalog):
the per-ad fields gathered once instead of per row, the values those of the per-row path, for every estimator
and with "no ad" entries; the oracle's choices keep their true values; its scoring compiled equals eager."""

from __future__ import annotations

import pytest
import torch

from agents.policies.oracle import FATIGUE_AWARE_PENALTY, CatalogScorer, OraclePolicy, catalog_values
from envs import make_vec_env
from gpr_sim.platform import FunnelConfig, FunnelModel, catalog_of
from gpr_sim.world import WorldConfig

torch.set_num_threads(1)

CFG = WorldConfig.small(num_ads=300, num_organic=200, num_users=300, num_advertisers=10)
N = 16


@pytest.fixture()
def env():
    env = make_vec_env("ads-v0", N, config=CFG, world_seed=0, device="cpu")
    env.reset(seed=7)
    for _ in range(3):  # a few requests in: fatigue, hours and positions differ by row
        env.step(
            torch.randint(0, CFG.num_ads, (N, CFG.num_candidates), generator=torch.Generator().manual_seed(1))
        )
    return env


def shared_and_copied(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,) ids -> the (N, K) broadcast view the shared path takes and a materialised copy the per-row path takes."""
    view = ids[None].expand(N, -1)
    assert view.stride(0) == 0
    return view, view.contiguous()


@pytest.mark.parametrize("estimator", ["privileged", "truth", "learned"])
def test_shared_candidates_score_as_the_rows_do(env, estimator):
    vec = env.unwrapped
    if estimator == "learned":
        torch.manual_seed(0)
        vec.attach_platform(FunnelModel(FunnelConfig(hidden=16), catalog_of(vec.world)).eval())
    ids = torch.arange(CFG.num_ads)
    ids[5] = -1  # "no ad": -inf value on both paths
    view, copy = shared_and_copied(ids)
    fast, slow = vec.score(view, estimator=estimator), vec.score(copy, estimator=estimator)
    for name, a, b in zip(fast._fields, fast, slow):
        assert a.shape == b.shape == (N, CFG.num_ads), name
        # float32 rounding: the match by one GEMM instead of a batched dot product, carried into eCPM and value
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert torch.isneginf(fast.value[:, 5]).all()
    assert fast.value.isfinite()[:, ids >= 0].all()


@pytest.mark.parametrize("compile", [False, True])
def test_the_oracles_choices_keep_their_true_values(env, compile):
    """The oracle (shared path, eager or compiled) serves, at every row, ads whose true values are the per-row
    path's top-K."""
    vec = env.unwrapped
    action = OraclePolicy(env, compile=compile).act(vec.observe()).action
    rows = vec.score(torch.arange(CFG.num_ads)[None].expand(N, -1).contiguous(), truth=True).value
    rows = rows.masked_fill(~vec.eligible_ads()[None], float("-inf"))
    best = rows.topk(CFG.num_candidates, dim=1).values
    torch.testing.assert_close(rows.gather(1, action), best, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("penalty", [0.0, FATIGUE_AWARE_PENALTY])
def test_compiled_catalog_scoring_equals_eager(env, penalty):
    """``CatalogScorer`` compiled (the CUDA default) against eager on the CPU: the values to float32 rounding, for
    chunks of two sizes (dynamic rows), and the fatigue-aware charge included."""
    vec = env.unwrapped
    eager, compiled = CatalogScorer(vec, penalty, compile=False), CatalogScorer(vec, penalty, compile=True)
    for rows in (torch.arange(N), torch.arange(3)):
        state = vec.state.select(rows)
        torch.testing.assert_close(compiled(state), eager(state), rtol=1e-5, atol=1e-7)
    assert compiled.compiled  # it compiled rather than fell back
    assert not CatalogScorer(vec).compiled  # the CPU default: eager


def test_a_failed_compile_falls_back_to_eager_with_one_line(env, capsys, monkeypatch):
    vec = env.unwrapped
    scorer = CatalogScorer(vec, compile=True)

    def broken(state):
        raise RuntimeError("backend exploded\nsecond line")

    monkeypatch.setattr(scorer, "_fn", broken)
    state = vec.state.select(torch.arange(N))
    torch.testing.assert_close(scorer(state), catalog_values(vec, state))
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["catalog scoring: torch.compile failed (RuntimeError: backend exploded); eager"], out
    assert not scorer.compiled
