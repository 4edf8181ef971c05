"""``cascade-privileged``: the classic multi-stage ad system on the simulator's secrets, a labelled reference.

Embedding retrieval -> light pre-ranking -> eCPM ranking with the platform's estimates -> softmax
exploration (Plackett-Luce over K candidates), recording propensities. It binds to the env it acts in,
because ranking needs the catalog and the scoring API.

It reads what no platform has: the user's latent interest, the true ad embeddings, and a ranking predictor
of the simulator's own functional form. So, like the oracle, it is a reference, not a baseline a method
must beat; ``learned-cascade:PATH`` is the fair cascade, its stages fitted from logs on the platform view.
It stays the default behaviour policy of logged data. Its former registry name ``cascade`` is a deprecated
alias (``agents.policies.ALIASES``), which old logs store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from agents.policies import PolicyOutput, batched_env, row_chunks
from gpr_sim.world.config import check_range


@dataclass(frozen=True)
class CascadeConfig:
    """Stage sizes and exploration of the multi-stage system."""

    retrieval_size: int = 100
    """ads kept by embedding retrieval"""
    preranking_size: int = 20
    """ads kept by the light pre-ranking model"""
    temperature: float = 0.3
    """softmax exploration over log platform value; 0 = greedy (propensity 1)"""
    history_weight: float = 1.0
    """weight of recent organic consumption against the profile in the retrieval query"""
    chunk_size: int = 4096
    """requests scored against the whole catalog at once (bounds memory)"""

    def __post_init__(self) -> None:
        check_range("retrieval_size", self.retrieval_size, 1, 1 << 20)
        check_range("preranking_size", self.preranking_size, 1, 1 << 20)
        check_range("temperature", self.temperature, 0.0, 100.0)
        check_range("history_weight", self.history_weight, 0.0, 100.0)
        check_range("chunk_size", self.chunk_size, 1, 1 << 24)


class CascadePolicy:
    """Retrieval -> pre-ranking -> eCPM ranking -> Plackett-Luce exploration over K candidates."""

    def __init__(self, env, config: CascadeConfig | None = None, seed: int = 0):
        self.env = batched_env(env)
        self.config = config or CascadeConfig()
        self.generator = torch.Generator(device=self.env.device).manual_seed(seed)

    def query(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, D) retrieval query: profile interest plus the mean of recent organic consumption."""
        world = self.env.world
        organic = obs["organic"]
        valid = (organic >= 0).unsqueeze(-1)
        hist = (world.organic_emb[organic.clamp(min=0)] * valid).sum(1) / valid.sum(1).clamp(min=1)
        return F.normalize(world.user_interest[obs["user_id"]] + self.config.history_weight * hist, dim=-1)

    def pool(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The ranked pool of each request and its ranking logits, both (N, P).

        Retrieval (top embedding matches among eligible ads) -> pre-ranking (log bid + match) -> log of
        the platform's expected value (auction-aware; ineligible ads get log(1e-12)). ``act`` samples
        from softmax(logits / temperature) over this pool; off-policy evaluation (`agents.ope`) reads
        the same pool and logits for the exact action distribution.

        Returns:
            (pool, logits): (N, P) int64 ad ids, P = max(min(preranking_size, R), num_candidates) with
            R = min(retrieval_size, num_ads), and (N, P) float log platform value (not yet divided by
            the temperature).
        """
        cfg, world = self.config, self.env.world
        eligible = self.env.eligible_ads()
        q = self.query(obs)
        n = q.shape[0]
        r = min(cfg.retrieval_size, world.config.num_ads)
        p = max(min(cfg.preranking_size, r), world.config.num_candidates)
        log_bid = torch.log(world.ad_bid)
        retrieved = torch.empty(n, r, dtype=torch.int64, device=q.device)
        for sl in row_chunks(n, cfg.chunk_size):  # chunks of requests, not single users
            sim = (q[sl] @ world.ad_emb.T).masked_fill(~eligible[None], float("-inf"))
            retrieved[sl] = sim.topk(r, dim=1).indices
        # Pre-ranking: a light model, log(bid) + match-driven click logit, on the retrieved set.
        sim = torch.einsum("nd,nrd->nr", q, world.ad_emb[retrieved])
        light = log_bid[retrieved] + world.config.ctr_match_weight * sim
        light = light.masked_fill(~eligible[retrieved], float("-inf"))
        pre = retrieved.gather(1, light.topk(p, dim=1).indices)
        # Ranking: the platform's expected value of each ad (auction-aware).
        value = self.env.score(pre).value
        value = value.masked_fill(~eligible[pre], 0.0)
        return pre, torch.log(value.clamp(min=1e-12))

    def act(self, obs: dict[str, torch.Tensor]) -> PolicyOutput:
        pool, logits = self.pool(obs)
        return explore(pool, logits, self.env.config.num_candidates, self.config.temperature, self.generator)


def explore(
    pool: torch.Tensor, logits: torch.Tensor, k: int, temperature: float, generator: torch.Generator
) -> PolicyOutput:
    """A cascade's last stage: the top ``k`` of its ranked ``pool`` (N, P) by ``logits`` (greedy, ``temperature``
    0, propensity 1), else k drawn by Plackett-Luce from softmax(logits / temperature) with their propensity."""
    if temperature == 0:
        order = logits.topk(k, dim=1).indices
        prop = torch.ones(pool.shape[0], dtype=torch.float64, device=pool.device)
    else:
        order, prop = plackett_luce_sample(logits / temperature, k, generator)
    return PolicyOutput(pool.gather(1, order), prop)


def plackett_luce_sample(
    logits: torch.Tensor, k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample k ordered items without replacement from softmax(logits), (N, P) -> (N, k), (N,).

    Gumbel-top-k gives the sample; its probability is the product over positions of the chosen
    item's softmax share among the items still left (float64).
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    g = logits.double() - torch.log(-torch.log(u.clamp(1e-300, 1.0)))
    order = g.topk(k, dim=1).indices
    lp = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    remaining = logits.double().clone()
    for j in range(k):  # k candidate positions (small), not users
        logp = torch.log_softmax(remaining, dim=1)
        lp = lp + logp.gather(1, order[:, j : j + 1]).squeeze(1)
        remaining = remaining.scatter(1, order[:, j : j + 1], float("-inf"))
    return order, lp.exp()
