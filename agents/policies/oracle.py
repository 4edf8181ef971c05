"""``oracle`` and ``oracle-fatigue``: labelled references that read the hidden state.

``OraclePolicy`` ranks every eligible ad by its *true* expected immediate reward (a myopic upper
bound); with ``fatigue_penalty > 0`` it also charges each ad the fatigue it would cause (the simple
fatigue-aware variant used to show that long-term value is real).
"""

from __future__ import annotations

import torch

from agents.policies import CATALOG_CELLS, PolicyOutput, batched_env, catalog_rows, row_chunks
from gpr_sim.world.config import check_range

COMPILED_CATALOG_CELLS = 1 << 24
"""(request, ad) pairs a chunk when the oracle's scoring is compiled: the fused kernels keep no per-pair
temporaries but the interest matches (GEMM outputs) and the values, float32, so chunks 4x ``CATALOG_CELLS`` hold
~200 MB and save launches (on the CPU, 16 requests x
1M ads: 0.372 s in 16M-pair chunks vs 0.526 s in 4M; ``benchmarks/bench_oracle.py``)."""


def catalog_values(env, state, fatigue_penalty: float = 0.0) -> torch.Tensor:
    """(R, num_ads) every ad's true expected immediate reward at the R requests of ``state`` (the scoring API with
    the whole catalog as one shared row: ``gpr_sim.world.score``), minus ``fatigue_penalty x P(win) x (fatigue it
    adds)``; ineligible ads are not masked here."""
    world, wc = env.world, env.world.config
    cand = torch.arange(wc.num_ads, device=env.device)[None].expand(state.user_id.shape[0], -1)
    sc = env.score(cand, truth=True, state=state)
    if fatigue_penalty <= 0:
        return sc.value
    match = state.interest @ world.ad_emb.T
    added = wc.fatigue_per_ad + wc.fatigue_irrelevance * (1.0 - match).clamp(min=0.0)
    return sc.value - fatigue_penalty * sc.p_win * added


class CatalogScorer:
    """``catalog_values`` of one env, eager or compiled: the one scoring loop of the oracle and of the
    ``oracle_share`` states (``agents.evaluation.oracle_share``, eager: built once per evaluation).

    Compiled (the default on CUDA), the ~50 element-wise kernels of the scoring over (R, num_ads) run as a few fused
    ones (on the CPU, 16 requests x 1M ads: 2.3x over the eager shared row, 5.6x over per-row candidates, the same
    top-K; ``benchmarks/bench_oracle.py``). Floats are specialised while it
    compiles (``specialize_float``): Dynamo's symbolic floats failed on the auction's arithmetic of config floats
    in torch 2.13 ("Guard failed on the same frame it was created"). A compile that fails falls back to eager
    with one printed line: the values are the same either way (``tests/test_world_score_shared.py``).
    """

    def __init__(self, env, fatigue_penalty: float = 0.0, compile: bool | None = None):
        self.env, self.fatigue_penalty = env, fatigue_penalty
        self.compiled = env.device.type == "cuda" if compile is None else compile
        self._fn = torch.compile(self._eager, dynamic=True) if self.compiled else self._eager

    def _eager(self, state) -> torch.Tensor:
        return catalog_values(self.env, state, self.fatigue_penalty)

    def __call__(self, state) -> torch.Tensor:
        if not self.compiled:
            return self._eager(state)
        import torch._dynamo  # (0.8 s to import: only where it compiles)

        try:
            with torch._dynamo.config.patch(specialize_float=True):
                return self._fn(state)
        except Exception as e:  # a compiler failure: the eager path computes the same values
            print(
                f"catalog scoring: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); eager"
            )
            self.compiled, self._fn = False, self._eager
            return self._eager(state)


class OraclePolicy:
    """Top-K eligible ads by true expected immediate reward, optionally minus a fatigue charge.

    ``fatigue_penalty`` charges each ad ``penalty x P(win) x (fatigue it adds)``: the fatigue-aware
    variant trades a little value now for a user who stays longer. ``compile``: the scoring compiled
    (``CatalogScorer``; None = on CUDA).
    """

    def __init__(
        self, env, fatigue_penalty: float = 0.0, chunk_size: int = 2048, compile: bool | None = None
    ):
        check_range("fatigue_penalty", fatigue_penalty, 0.0, 1e6)
        self.env = batched_env(env)
        self.fatigue_penalty = fatigue_penalty
        self.chunk_size = chunk_size
        self.scorer = CatalogScorer(self.env, fatigue_penalty, compile)

    def act(self, obs: dict[str, torch.Tensor]) -> PolicyOutput:
        wc = self.env.world.config
        k = wc.num_candidates
        eligible = self.env.eligible_ads()
        n = obs["user_id"].shape[0]
        device = self.env.device
        action = torch.empty(n, k, dtype=torch.int64, device=device)
        state = self.env.state
        cells = COMPILED_CATALOG_CELLS if self.scorer.compiled else CATALOG_CELLS
        for sl in row_chunks(n, catalog_rows(self.chunk_size, wc.num_ads, cells)):
            v = self.scorer(state.select(torch.arange(n, device=device)[sl]))
            action[sl] = v.masked_fill(~eligible[None], float("-inf")).topk(k, dim=1).indices
        return PolicyOutput(action, torch.ones(n, dtype=torch.float64, device=device))


FATIGUE_AWARE_PENALTY = 0.1
"""Default fatigue charge of the ``oracle-fatigue`` variant (currency per unit of fatigue)."""
