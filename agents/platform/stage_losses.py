"""Where a learned cascade loses value, stage by stage, measured in the simulator on fixed held-out requests.

On N request states (``agents.evaluation.oracle_share.RequestStates``: the first requests of N sessions
of a reset seed no log used, optionally after a warm-up) the true value table ``v(s, a)`` of every ad is
known (``score(truth=True)``, 0 for ineligible ads). With ``best(s)`` the myopic oracle's ad:

| key | definition |
|---|---|
| `retrieval_recall_best` | share of states whose ``best`` is among the R retrieved ads |
| `preranking_keep_best` | share of states whose ``best`` is among the P pre-ranked ads |
| `preranking_keep_given_retrieved` | the same among the states where retrieval found it |
| `ranking_top1_best` | share of states where the greedy ranker's pick is ``best`` |
| `value_share_retrieved` | sum_s max_{a in retrieved} v / sum_s v(best): what is left after retrieval |
| `value_share_preranked` | the same over the pre-ranked set |
| `value_share_greedy` | v of the greedy pick (temperature 0), over the oracle's |
| `value_share_served` | E over the exploring policy's top candidate (softmax over the pool), over the oracle's |

The value lost by a stage is the drop from the share before it to the share after it (oracle = 1):
`lost_retrieval` = 1 - `value_share_retrieved`, `lost_preranking`, `lost_ranking` (to the greedy pick) and
`lost_exploration` (greedy to served), which sum to 1 - `value_share_served`.
"""

from __future__ import annotations

import torch

from agents.evaluation.oracle_share import OracleShareConfig, RequestStates
from agents.platform.folder import Platform
from agents.policies.learned_cascade import LearnedCascadeConfig, LearnedCascadePolicy
from envs import ENV_ID, make_vec_env
from gpr_sim.world import WorldConfig


def _share(x: torch.Tensor, oracle: torch.Tensor) -> float:
    return float(x.sum() / oracle.sum()) if float(oracle.sum()) > 0 else float("nan")


@torch.no_grad()
def stage_losses(
    platform: Platform,
    world: WorldConfig,
    world_seed: int,
    states: OracleShareConfig,
    cascade: LearnedCascadeConfig,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """The module table's numbers for ``platform`` served as ``cascade`` on the held-out ``states``.

    Args:
        platform: the three learned stages.
        world: the world the platform was fitted on; world_seed its seed.
        states: which states (``states``, ``seed``, ``warmup`` are read; ``preset`` is replaced by ``world``).
        cascade: stage sizes and the exploration temperature of ``value_share_served``.
        device: where the env runs.
    """
    env = make_vec_env(
        ENV_ID, states.states, config=world, world_seed=world_seed, device=device, validate_actions=False
    )
    req = RequestStates.from_env(env, states)
    policy = LearnedCascadePolicy(env, platform, cascade, seed=states.seed)
    s = policy.stages(req.obs)
    v, oracle = req.values, req.oracle_values  # (N, num_ads) float32, (N,) float64
    best = v.masked_fill(~req.eligible, float("-inf")).argmax(1)  # (N,) the oracle's ad
    found = (s.retrieved == best[:, None]).any(1)
    kept = (s.preranked == best[:, None]).any(1)
    pool_v = v.gather(1, s.preranked).double()  # (N, P)
    greedy = s.logits.argmax(1)
    t = cascade.temperature
    if t > 0:
        served = (torch.softmax((s.logits / t).double(), dim=1) * pool_v).sum(1)
    else:
        served = pool_v.gather(1, greedy[:, None])[:, 0]
    shares = {
        "value_share_retrieved": _share(v.gather(1, s.retrieved).max(1).values.double(), oracle),
        "value_share_preranked": _share(pool_v.max(1).values, oracle),
        "value_share_greedy": _share(pool_v.gather(1, greedy[:, None])[:, 0], oracle),
        "value_share_served": _share(served, oracle),
    }
    found_kept = float(kept[found].double().mean()) if bool(found.any()) else float("nan")
    return {
        "states": int(v.shape[0]),
        "retrieval_size": int(s.retrieved.shape[1]),
        "preranking_size": int(s.preranked.shape[1]),
        "temperature": float(t),
        "oracle_value": float(oracle.mean()),
        "retrieval_recall_best": float(found.double().mean()),
        "preranking_keep_best": float(kept.double().mean()),
        "preranking_keep_given_retrieved": found_kept,
        "ranking_top1_best": float((s.preranked.gather(1, greedy[:, None])[:, 0] == best).double().mean()),
        **shares,
        "lost_retrieval": 1.0 - shares["value_share_retrieved"],
        "lost_preranking": shares["value_share_retrieved"] - shares["value_share_preranked"],
        "lost_ranking": shares["value_share_preranked"] - shares["value_share_greedy"],
        "lost_exploration": shares["value_share_greedy"] - shares["value_share_served"],
    }


__all__ = ["stage_losses"]
