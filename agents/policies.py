"""Non-learned policies with one API: ``act(obs) -> PolicyOutput``.

- ``RandomPolicy``: uniform ads (a floor).
- ``CascadePolicy``: the classic multi-stage ad system: embedding retrieval -> light pre-ranking ->
  eCPM ranking with the platform's estimates -> softmax exploration, recording propensities (the
  behaviour policy of logged data).
- ``OraclePolicy``: ranks every eligible ad by its *true* expected immediate reward (a myopic upper
  bound); with ``fatigue_penalty > 0`` it also charges each ad the fatigue it would cause (the simple
  fatigue-aware variant used to show that long-term value is real).

All policies work on batched torch observations from ``AdsVectorEnv`` (or ``BatchedMarket``) and
bind to the market they act in, because ranking needs the catalog and the scoring API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from envs.market import BatchedMarket
from gpr_sim.world import score
from gpr_sim.world.config import check_range


class PolicyOutput(NamedTuple):
    """What a policy proposes for N requests."""

    action: torch.Tensor  # (N, K) int64 candidate ads, in the policy's order
    propensity: torch.Tensor  # (N,) float64 probability of proposing exactly this ordered list


def _market(env) -> BatchedMarket:
    """Accept an AdsVectorEnv, an AdsEnv, a gymnasium wrapper of either, or the engine itself."""
    if isinstance(env, BatchedMarket):
        return env
    engine = getattr(getattr(env, "unwrapped", env), "engine", None)
    if not isinstance(engine, BatchedMarket):
        raise ValueError(f"expected an ads-v0 env or a BatchedMarket, got {type(env).__name__}")
    return engine


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class RandomPolicy:
    """Proposes K ads uniformly at random (with replacement)."""

    def __init__(self, env, seed: int = 0):
        self.market = _market(env)
        self.generator = torch.Generator(device=self.market.device).manual_seed(seed)

    def act(self, obs: dict[str, torch.Tensor]) -> PolicyOutput:
        cfg = self.market.config
        n, k = obs["user_id"].shape[0], cfg.num_candidates
        action = torch.randint(0, cfg.num_ads, (n, k), generator=self.generator, device=self.market.device)
        prop = torch.full((n,), float(cfg.num_ads) ** -k, dtype=torch.float64, device=self.market.device)
        return PolicyOutput(action, prop)


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
        self.market = _market(env)
        self.config = config or CascadeConfig()
        self.generator = torch.Generator(device=self.market.device).manual_seed(seed)

    def query(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, D) retrieval query: profile interest plus the mean of recent organic consumption."""
        world = self.market.world
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
        cfg, world = self.config, self.market.world
        eligible = self.market.eligible_ads()
        q = self.query(obs)
        n = q.shape[0]
        r = min(cfg.retrieval_size, world.config.num_ads)
        p = max(min(cfg.preranking_size, r), world.config.num_candidates)
        log_bid = torch.log(world.ad_bid)
        retrieved = torch.empty(n, r, dtype=torch.int64, device=q.device)
        for sl in _chunks(n, cfg.chunk_size):  # chunks of requests, not single users
            sim = (q[sl] @ world.ad_emb.T).masked_fill(~eligible[None], float("-inf"))
            retrieved[sl] = sim.topk(r, dim=1).indices
        # Pre-ranking: a light model, log(bid) + match-driven click logit, on the retrieved set.
        sim = torch.einsum("nd,nrd->nr", q, world.ad_emb[retrieved])
        light = log_bid[retrieved] + world.config.ctr_match_weight * sim
        light = light.masked_fill(~eligible[retrieved], float("-inf"))
        pre = retrieved.gather(1, light.topk(p, dim=1).indices)
        # Ranking: the platform's expected value of each ad (auction-aware).
        value = self.market.score(pre).value
        value = value.masked_fill(~eligible[pre], 0.0)
        return pre, torch.log(value.clamp(min=1e-12))

    def act(self, obs: dict[str, torch.Tensor]) -> PolicyOutput:
        k = self.market.world.config.num_candidates
        pool, logits = self.pool(obs)
        if self.config.temperature == 0:
            order = logits.topk(k, dim=1).indices
            prop = torch.ones(pool.shape[0], dtype=torch.float64, device=pool.device)
        else:
            order, prop = plackett_luce_sample(logits / self.config.temperature, k, self.generator)
        return PolicyOutput(pool.gather(1, order), prop)


def plackett_luce_sample(logits: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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


class OraclePolicy:
    """Top-K eligible ads by true expected immediate reward, optionally minus a fatigue charge.

    ``fatigue_penalty`` charges each ad ``penalty x P(win) x (fatigue it adds)``: the fatigue-aware
    variant trades a little value now for a user who stays longer.
    """

    def __init__(self, env, fatigue_penalty: float = 0.0, chunk_size: int = 2048):
        check_range("fatigue_penalty", fatigue_penalty, 0.0, 1e6)
        self.market = _market(env)
        self.fatigue_penalty = fatigue_penalty
        self.chunk_size = chunk_size

    def act(self, obs: dict[str, torch.Tensor]) -> PolicyOutput:
        world = self.market.world
        wc = world.config
        k = wc.num_candidates
        eligible = self.market.eligible_ads()
        n = obs["user_id"].shape[0]
        action = torch.empty(n, k, dtype=torch.int64, device=self.market.device)
        all_ads = torch.arange(wc.num_ads, device=self.market.device)
        state = self.market.state
        for sl in _chunks(n, self.chunk_size):
            rows = torch.arange(n, device=self.market.device)[sl]
            sub = state.select(rows)
            cand = all_ads[None].expand(rows.numel(), -1)
            sc = score(world, sub, cand, truth=True)  # the scoring API on this chunk of rows
            v = sc.value
            if self.fatigue_penalty > 0:
                match = sub.interest @ world.ad_emb.T
                added = wc.fatigue_per_ad + wc.fatigue_irrelevance * (1.0 - match).clamp(min=0.0)
                v = v - self.fatigue_penalty * sc.p_win * added
            action[sl] = v.masked_fill(~eligible[None], float("-inf")).topk(k, dim=1).indices
        return PolicyOutput(action, torch.ones(n, dtype=torch.float64, device=self.market.device))


POLICIES = {"random": RandomPolicy, "cascade": CascadePolicy, "oracle": OraclePolicy}


def make_policy(name: str, env, seed: int = 0):
    """Build a non-learned policy by name: ``random``, ``cascade``, ``oracle`` or ``oracle-fatigue``."""
    if name == "random":
        return RandomPolicy(env, seed=seed)
    if name == "cascade":
        return CascadePolicy(env, seed=seed)
    if name == "oracle":
        return OraclePolicy(env)
    if name == "oracle-fatigue":
        return OraclePolicy(env, fatigue_penalty=FATIGUE_AWARE_PENALTY)
    raise ValueError(f"unknown policy {name!r}: expected one of random, cascade, oracle, oracle-fatigue")


FATIGUE_AWARE_PENALTY = 0.1
"""Default fatigue charge of the ``oracle-fatigue`` variant (currency per unit of fatigue)."""
