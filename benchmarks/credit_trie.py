"""Where per-level credit matters: HEPO and the PPO family on a trie bandit with a known reward (issue 16 d6).

At GPU scale HEPO, PPO, GRPO and Sibling-GRPO ended level (``benchmarks/RESULTS.md``), with HEPO's critic explaining
little of its targets. The issue then asks where per-level credit does matter. This script answers it where
the answer can be computed exactly and with many seeds: a bandit whose actions are the leaves of a trie (a
semantic-ID path: ``depth`` levels of ``branching`` codes), whose reward is a sum of per-level terms with known
weights, and whose policy and critic are a table per (context, prefix) or one network shared by every prefix.
The learners are the library's own (``agents.rl.registry.ALGOS``: targets, losses and the
update loop ``agents.rl.loop.update``, unchanged); only the generator and the world are replaced.

The reward of context c and leaf z: R = sum_l s_l g_l(c, z_<=l), rescaled to unit standard deviation over the
leaves, where ``reward`` makes the level terms: ``tree`` (the default), g ~ N(0, 1) per node, a code meaning
something only under its prefix; ``codebook``, g_l = <u_c, B_l[z_l]> with u_c, B_l[z] ~ N(0, I_8), one term per
(level, code) whatever the parent, as a residual quantiser's codebooks. ``credit`` sets the level weights s_l:
``early`` (s_l = 2^-l: the first code decides most), ``late`` (the reverse: the last code decides most), ``flat``
(equal). The learner observes R + ``noise`` x N(0, 1) (a realised outcome instead of the expected value).
``policy`` is what learns: ``table`` (the default; nothing shared between prefixes) or ``shared``, one network over
the context's and the prefix codes' embeddings with a next-code head, as the generator shares its weights across
prefixes, and a critic network beside it on the same context embedding, as the HTE (``shared_trunk``: the value a
head on the policy's network); a network's rate (``--lr``) is not the table's, the same for every learner.
Measured: the share of the reachable value, (E_pi R - E_uniform R) / (max R - E_uniform R) per context, averaged
over contexts, exactly (every leaf's probability under the policy), after every iteration, from a uniform start;
the final share and the mean share over the iterations (speed), per learner, over seeds, with each learner's
difference to HEPO paired by seed (the same bandit, the same start).

    python benchmarks/credit_trie.py --out benchmarks/results/credit_trie/sweep --seeds 10
    python benchmarks/credit_trie.py --out runs/credit_trie/shared --policy shared --reward tree,codebook \
        --lr 0.01 --depth 4 --learners hepo,grpo,ppo,sibling_grpo

Prints the table and writes ``--out``.json (every run's curve), ``--out``.md (the table) and ``--out``.png (each
learner's difference to HEPO per setting, one panel per noise level), ``--out``.curves.png (each learner's share
over the iterations, mean and 95% band over seeds, one panel per setting); every finished run is appended to
``--out``.runs.jsonl as it ends, and a sweep started again with the same ``--out`` reads those and ``--out``.json's
back instead of running them (a stopped sweep resumes; a committed one redraws its table and figures at once).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from agents.rl.buffer import Buffer
from agents.rl.common import LossConfig
from agents.rl.loop import CLIPS, UpdateConfig, update
from agents.rl.registry import algorithm
from gpr_sim.runs import append_metrics, atomic_write_bytes, figure_bytes, read_json, read_metrics
from gpr_sim.schema import TokenBatch
from gpr_sim.stats import paired_difference, t_interval

CREDITS = ("early", "late", "flat")
"""where the reward is decided: the first levels, the last ones, or every level alike"""
REWARDS = ("tree", "codebook")
"""how a leaf's reward is made of its codes: ``tree``, a term per node (a code means something only under its
prefix); ``codebook``, a term per (level, code) shared by every prefix (a residual quantiser's codebooks: a code
means the same under every parent), R = sum_l s_l <u_c, B_l[z_l]>"""
POLICIES = ("table", "shared", "shared_trunk")
"""``table``: a logit vector and a value per (context, node), nothing shared; ``shared``: one network over the
context's and the prefix codes' embeddings (as the generator shares its weights across prefixes) and a critic
network beside it on the same context (as the HTE); ``shared_trunk``: the critic a head on the policy's network"""
LEARNERS = ("hepo", "hepo_gate", "ppo", "grpo", "sibling_grpo")
"""the PPO family of ``agents.rl`` (DPO needs a GPR reference model; it is not a per-level credit question)"""
VARIANTS = {
    "hepo_gate": ("hepo", {"gae_gate": "group"}),
    "hepo_uniform": ("hepo", {"level_weights": "uniform"}),
    "sibling_uniform": ("sibling_grpo", {"level_weights": "uniform"}),
    "hepo_uniform_gate": ("hepo", {"level_weights": "uniform", "gae_gate": "group"}),
}
"""learners that are an algorithm with other loss constants: name -> (algorithm, ``LossConfig`` fields).
``*_uniform``: the levels weighted c_l = 1 / L (as GRPO's mean over levels) instead of the linear l / L: with a
table each level has its own parameters, whose Adam steps do not see a level's weight; a shared network's do.
``*_gate``: HEPO's GAE only while its critic beats the group mean (else the group baseline at every level)"""


def learner_setup(name: str) -> tuple:
    """A learner's name -> (its ``agents.rl`` algorithm, its ``LossConfig``); an unknown name fails here."""
    algo, fields = VARIANTS.get(name, (name, {}))
    return algorithm(algo), LossConfig(**fields)


@dataclass(frozen=True)
class TrieProblem:
    """One bandit and how a learner meets it."""

    depth: int = 4
    """levels of the path (L)"""
    branching: int = 4
    """codes per level (every node has this many children: branching^depth leaves)"""
    credit: str = "early"
    """``CREDITS``: which levels' choices carry the reward"""
    noise: float = 0.0
    """standard deviation of the observed reward's noise (the reward has unit standard deviation)"""
    contexts: int = 32
    """requests (contexts) of the bandit, each with its own reward table"""
    group: int = 8
    """sampled paths per request (K)"""
    requests: int = 64
    """requests per iteration (contexts drawn uniformly)"""
    iterations: int = 40
    lr: float = 0.05
    """Adam learning rate of the policy and critic (the default is the table's; the shared network's sweeps ran at
    0.003 and 0.01)"""
    critic_warmup: int = 2
    """iterations that train the critic only (``agents.hepo --critic-warmup``)"""
    reward: str = "tree"
    """``REWARDS``: per-node terms or per-(level, code) terms shared across prefixes"""
    policy: str = "table"
    """``POLICIES``: what learns (a table per node, or one network shared by every prefix)"""
    width: int = 64
    """hidden width of the ``shared`` policy's network"""
    max_grad_norm: float = 1.0
    """the update's gradient-norm clip (``UpdateConfig.max_grad_norm``)"""
    clip: str = "joint"
    """``UpdateConfig.clip``: one clip over policy and critic together, or each on its own norm"""

    def __post_init__(self) -> None:
        for name, known in (("credit", CREDITS), ("reward", REWARDS), ("policy", POLICIES), ("clip", CLIPS)):
            if getattr(self, name) not in known:
                raise ValueError(f"{name}={getattr(self, name)!r} is unknown: expected one of {list(known)}")
        for name in ("depth", "branching", "contexts", "group", "requests", "iterations", "width"):
            if getattr(self, name) < (2 if name in ("branching", "group") else 1):
                raise ValueError(f"{name}={getattr(self, name)} is invalid: too small")
        if self.branching**self.depth > 1 << 16:
            raise ValueError(
                f"branching^depth = {self.branching**self.depth} leaves is too many (at most 65,536)"
            )
        if not (self.noise >= 0 and self.lr > 0 and self.max_grad_norm > 0):
            raise ValueError(
                f"noise={self.noise}, lr={self.lr}, max_grad_norm={self.max_grad_norm}: expected noise >= 0, lr > 0"
                ", max_grad_norm > 0"
            )


CODEBOOK_DIM = 8
"""dimension of the ``codebook`` reward's context vectors u_c and code vectors B_l[z]"""


def level_offsets(branching: int, depth: int) -> list[int]:
    """Index of the first node of each level 0..depth in a level-major numbering (root 0, then its children...)."""
    return [sum(branching**i for i in range(level)) for level in range(depth + 2)]


class TrieBandit:
    """The reward tables of ``contexts`` requests over the leaves of one trie, and a policy's exact value."""

    def __init__(self, p: TrieProblem, seed: int):
        g = torch.Generator().manual_seed(seed)
        b, depth = p.branching, p.depth
        leaves = torch.arange(b**depth)
        prefix = [
            leaves // b ** (depth - level) for level in range(1, depth + 1)
        ]  # (leaves,) node index per level
        scale = {
            "early": [2.0**-i for i in range(depth)],
            "late": [2.0 ** -(depth - 1 - i) for i in range(depth)],
        }
        s = scale.get(p.credit, [1.0] * depth)
        reward = torch.zeros(p.contexts, b**depth, dtype=torch.float64)
        if p.reward == "codebook":  # (drawn only here: the tree's draws stay those of the recorded sweeps)
            user = torch.randn(p.contexts, CODEBOOK_DIM, generator=g, dtype=torch.float64)
        for level in range(depth):
            if p.reward == "tree":
                node_terms = torch.randn(p.contexts, b ** (level + 1), generator=g, dtype=torch.float64)
                reward += s[level] * node_terms[:, prefix[level]]
            else:  # the code's own term, whatever its parent: prefix[level] % b is the leaf's code at level
                book = torch.randn(b, CODEBOOK_DIM, generator=g, dtype=torch.float64)
                reward += s[level] * (user @ book.T)[:, prefix[level] % b]
        reward = (reward - reward.mean(1, keepdim=True)) / reward.std(1, keepdim=True)
        self.reward = reward  # (C, leaves) expected reward, unit sd per context
        self.noise = p.noise

    def observe(self, ctx: torch.Tensor, leaf: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """(M,), (M, K) -> (M, K) float32 observed rewards: expected value plus the problem's noise."""
        r = self.reward[ctx[:, None], leaf]
        return (r + self.noise * torch.randn(r.shape, generator=g, dtype=torch.float64)).float()

    def share(self, leaf_prob: torch.Tensor) -> float:
        """(C, leaves) policy -> mean over contexts of (E_pi R - E_uniform R) / (max R - E_uniform R)."""
        value = (leaf_prob.double() * self.reward).sum(1)
        uniform = self.reward.mean(1)
        return float(((value - uniform) / (self.reward.max(1).values - uniform)).mean())


class TriePolicy(nn.Module, ABC):
    """A policy over the trie's paths and a critic over its prefixes, as ``agents.rl.loop``'s ``terms_fn``.

    Called as (buffer, segments) -> the buffer's paths' per-level log-probs (M, K, L) and values (M, K, L + 1) (V of
    the prefixes z_<l for l = 0..L-1, then of the leaf), the context of each request in
    ``buffer.tokens.token_ids[:, 0]``. A subclass gives ``scores``: the next-code logits and the value of prefixes.
    """

    def __init__(self, p: TrieProblem):
        super().__init__()
        self.b, self.depth, self.contexts = p.branching, p.depth, p.contexts
        self.offsets = level_offsets(p.branching, p.depth)

    @abstractmethod
    def critic_parameters(self) -> list[nn.Parameter]:
        """The critic's own parameters (``agents.rl.loop.clip_gradients`` clips them apart with ``--clip separate``)."""

    @abstractmethod
    def scores(
        self, ctx: torch.Tensor, codes: torch.Tensor, values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(...,) contexts, (..., L) paths -> the next-code logits of the prefixes z_<l, l = 0..L-1 (..., L, b), and
        the values of the prefixes z_<l, l = 0..L (..., L + 1), or None with ``values`` False (sampling and the
        exact leaf probabilities need the policy only)."""

    def nodes(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., L) codes -> (..., L + 1) node ids of the prefixes z_<l (l = 0..L) in the level-major numbering."""
        index = torch.zeros(codes.shape[:-1], dtype=torch.int64)
        out = [index + self.offsets[0]]
        for level in range(self.depth):
            index = index * self.b + codes[..., level]
            out.append(index + self.offsets[level + 1])
        return torch.stack(out, -1)

    def terms(self, ctx: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M,) contexts, (M, K, L) paths -> per-level log-probs (M, K, L) and values (M, K, L + 1)."""
        logits, values = self.scores(ctx[:, None].expand(codes.shape[:-1]), codes)
        return logits.log_softmax(-1).gather(-1, codes[..., None]).squeeze(-1), values

    def forward(self, buf: Buffer, segments=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.terms(buf.tokens.token_ids[:, 0], buf.codes)

    @torch.no_grad()
    def sample(self, ctx: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
        """(M,) contexts -> (M, K, L) codes drawn from the policy, level by level (the codes after the current level
        are placeholders the logits of the current level do not read)."""
        codes = torch.zeros(ctx.shape[0], k, self.depth, dtype=torch.int64)
        for level in range(self.depth):
            probs = self.scores(ctx[:, None].expand(-1, k), codes, values=False)[0][:, :, level].softmax(
                -1
            )  # (M, K, b)
            z = torch.multinomial(probs.flatten(0, 1), 1, generator=g).view(ctx.shape[0], k)
            codes[..., level] = z
        return codes

    @torch.no_grad()
    def leaf_probs(self) -> torch.Tensor:
        """(C, leaves) the probability of every leaf, level by level over every prefix of every context."""
        c = self.contexts
        prob = torch.ones(c, 1, dtype=torch.float64)
        for level in range(self.depth):
            index = torch.arange(self.b**level)
            # every prefix of this level as a path (the codes after z_<level are placeholders the logits do not read)
            paths = torch.zeros(index.numel(), self.depth, dtype=torch.int64)
            for j in range(level):
                paths[:, j] = (index // self.b ** (level - 1 - j)) % self.b
            contexts = torch.arange(c)[:, None].expand(c, index.numel())
            logits, _ = self.scores(contexts, paths.expand(c, -1, -1), values=False)
            prob = (prob[..., None] * logits[:, :, level].double().softmax(-1)).flatten(1)  # (C, b^(level+1))
        return prob


class TablePolicy(TriePolicy):
    """Next-code logits per (context, internal node) and a critic value per (context, node), leaves included."""

    def __init__(self, p: TrieProblem):
        super().__init__(p)
        self.logits = nn.Parameter(torch.zeros(p.contexts, self.offsets[p.depth], p.branching))
        self.values = nn.Parameter(torch.zeros(p.contexts, self.offsets[p.depth + 1]))

    def critic_parameters(self) -> list[nn.Parameter]:
        return [self.values]

    def scores(
        self, ctx: torch.Tensor, codes: torch.Tensor, values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        nodes = self.nodes(codes)  # (..., L + 1)
        logits = self.logits[ctx[..., None], nodes[..., :-1]]
        return logits, self.values[ctx[..., None], nodes] if values else None


class SharedPolicy(TriePolicy):
    """One network for every prefix, as the generator's decoder, and a critic network beside it, as its HTE.

    The policy reads the prefix z_<l of context c as ``e_c + e_level(l) + sum_{j<l} e_j(z_j)`` (per-level code
    embeddings) through a 2-layer MLP and a next-code head; the critic reads ``e_c + sum_{j<l} e'_j(z_j) +
    e'_level(l)`` through its own MLP and a value head (the HTE's form: its own code and level embeddings and MLP
    over the context the two share, read detached as ``agents.rl.loop`` feeds the HTE: the critic's loss trains
    the critic only). ``one_trunk``: the critic is a value head on the policy's trunk instead (the two losses pull
    on every weight). Both heads start at zero: the uniform policy and a zero critic, as the
    table's start."""

    def __init__(self, p: TrieProblem, one_trunk: bool = False):
        super().__init__(p)
        h = p.width
        self.context = nn.Embedding(p.contexts, h)
        self.code = nn.Embedding(p.depth * p.branching, h)  # level j's code z at j * b + z
        self.level = nn.Embedding(p.depth + 1, h)
        self.trunk = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, h), nn.GELU())
        self.head = nn.Linear(h, p.branching)
        self.value = nn.Linear(h, 1)
        self.critic = None
        if not one_trunk:
            self.critic = nn.ModuleDict(
                {
                    "code": nn.Embedding(p.depth * p.branching, h),
                    "level": nn.Embedding(p.depth + 1, h),
                    "trunk": nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, h), nn.GELU()),
                }
            )
        for layer in (self.head, self.value):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def critic_parameters(self) -> list[nn.Parameter]:
        """The value head and the critic's network; on one trunk the value head only (the trunk is the policy's)."""
        return [*self.value.parameters(), *([] if self.critic is None else self.critic.parameters())]

    def hidden(self, context: torch.Tensor, codes: torch.Tensor, code, level, trunk) -> torch.Tensor:
        """(..., h) contexts' embeddings, (..., L) paths -> (..., L + 1, h): the prefixes z_<l, l = 0..L, through one
        embedding set and MLP."""
        emb = code(codes + torch.arange(self.depth) * self.b)  # (..., L, h)
        prefix = torch.cat([torch.zeros_like(emb[..., :1, :]), emb], -2).cumsum(-2)  # sum_{j<l} e_j(z_j)
        return trunk(prefix + context[..., None, :] + level.weight)

    def scores(
        self, ctx: torch.Tensor, codes: torch.Tensor, values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context = self.context(ctx)
        hidden = self.hidden(context, codes, self.code, self.level, self.trunk)
        logits = self.head(hidden[..., :-1, :])
        if not values:
            return logits, None
        critic = hidden
        if (
            self.critic is not None
        ):  # the HTE's input: the context detached (agents.rl.loop), the rest its own
            critic = self.hidden(
                context.detach(), codes, self.critic["code"], self.critic["level"], self.critic["trunk"]
            )
        return logits, self.value(critic).squeeze(-1)


POLICY_CLASSES = {
    "table": TablePolicy,
    "shared": SharedPolicy,
    "shared_trunk": lambda p: SharedPolicy(p, one_trunk=True),
}


def request_tokens(ctx: torch.Tensor) -> TokenBatch:
    """The buffer's token batch: one slot per request holding its context (what ``TablePolicy`` reads)."""
    m = ctx.shape[0]
    zeros = torch.zeros(m, 1, dtype=torch.int64)
    return TokenBatch(ctx[:, None], zeros, zeros, zeros.bool(), zeros[..., None], zeros, torch.zeros(m, 1, 1))


def collect(
    policy: TriePolicy, bandit: TrieBandit, p: TrieProblem, g: torch.Generator, it: int, state: dict
) -> Buffer:
    """One iteration's rollout: ``p.requests`` contexts, ``p.group`` paths each drawn from the policy, their observed
    rewards, in the buffer ``agents.rl``'s learners read (every code legal, no process rewards)."""
    ctx = torch.randint(p.contexts, (p.requests,), generator=g)
    codes = policy.sample(ctx, p.group, g)
    leaf = policy.nodes(codes)[..., -1] - policy.offsets[p.depth]
    with torch.no_grad():
        old_log_prob, old_values = policy.terms(ctx, codes)
    return Buffer(
        tokens=request_tokens(ctx),
        noise=None,
        codes=codes,
        old_log_prob=old_log_prob,
        legal=[torch.ones(p.requests, p.group, p.branching, dtype=torch.bool)] * p.depth,
        old_values=old_values,
        reward=bandit.observe(ctx, leaf, g),
        process=torch.zeros(p.requests, p.group, p.depth),
        valid=torch.ones(p.requests, dtype=torch.bool),
        rehearsed=torch.zeros(p.requests, dtype=torch.bool),
        uid=torch.arange(p.requests) + it * p.requests,
        learner_state=state,
    )


def schedule_of(p: TrieProblem, seed: int) -> UpdateConfig:
    """The update's schedule: 2 epochs of 4 minibatches, as ``agents.hepo``'s, the problem's clip."""
    return UpdateConfig(
        epochs=2, minibatch=max(1, p.requests // 4), max_grad_norm=p.max_grad_norm, clip=p.clip, seed=seed
    )


def run(p: TrieProblem, learner: str, seed: int) -> list[float]:
    """One learner from the uniform policy on the bandit of ``seed``: the share after each iteration (0 first)."""
    bandit = TrieBandit(p, seed)
    # a network's initial weights: the seed's, whatever ran before in the process
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        policy = POLICY_CLASSES[p.policy](p)
    algo, cfg = learner_setup(learner)
    opt = torch.optim.Adam(policy.parameters(), lr=p.lr)
    g = torch.Generator().manual_seed(seed + 1)  # the rollouts' draws, the same for every learner's first one
    state: dict = {}
    curve = [bandit.share(policy.leaf_probs())]
    for it in range(p.iterations):
        buf = collect(policy, bandit, p, g, it, state)
        buf.adv, buf.returns = algo.targets(buf, cfg)
        update(
            policy, policy, opt, None, buf, algo, cfg, schedule_of(p, seed), it, policy=it >= p.critic_warmup
        )
        curve.append(bandit.share(policy.leaf_probs()))
    return curve


def _job(args: tuple[dict, str, int]) -> dict:
    problem, learner, seed = args
    torch.set_num_threads(1)
    curve = run(TrieProblem(**problem), learner, seed)
    return {**problem, "learner": learner, "seed": seed, "curve": [round(x, 5) for x in curve]}  # (JSON size)


def frame(runs: list[dict]) -> pd.DataFrame:
    """The runs with each one's ``final`` share and its ``mean`` share over the iterations (speed)."""
    df = pd.DataFrame(runs)
    df["final"] = df["curve"].map(lambda c: c[-1])
    df["mean"] = df["curve"].map(lambda c: sum(c[1:]) / (len(c) - 1))
    return df


def differences(runs: list[dict], keys: list[str], metric: str = "final") -> pd.DataFrame:
    """Per setting (``keys``) and learner other than HEPO: its ``metric`` minus HEPO's, paired by seed (columns
    ``value``, ``ci_low``, ``ci_high``: the 95% t interval over the seeds both ran)."""
    rows = []
    for setting, part in frame(runs).groupby(keys, sort=False):
        hepo = part[part.learner == "hepo"].set_index("seed")[metric]
        for learner, mine in part[part.learner != "hepo"].groupby("learner", sort=False):
            mine = mine.set_index("seed")[metric]
            seeds = mine.index.intersection(hepo.index)
            d = paired_difference(mine.loc[seeds].to_numpy(), hepo.loc[seeds].to_numpy())
            named = dict(zip(keys, setting if isinstance(setting, tuple) else (setting,)))
            rows.append(
                {**named, "learner": learner, "value": d.value, "ci_low": d.ci_low, "ci_high": d.ci_high}
            )
    return pd.DataFrame(rows)


def table(runs: list[dict], keys: list[str]) -> pd.DataFrame:
    """Per setting (``keys``) and learner: final share and mean share over iterations [95% t over seeds], and
    the difference to HEPO paired by seed (``differences``)."""
    rows = []
    for setting, part in frame(runs).groupby(keys, sort=False):
        for learner, r in part.groupby("learner", sort=False):
            row = {
                **dict(zip(keys, setting if isinstance(setting, tuple) else (setting,))),
                "learner": learner,
            }
            for m in ("final", "mean"):
                e = t_interval(r[m].to_numpy())
                row[m] = f"{e.value:.3f} [{e.ci_low:.3f}, {e.ci_high:.3f}]"
            rows.append(row)
    out = pd.DataFrame(rows)
    for m in ("final", "mean"):
        d = differences(runs, keys, m)
        if len(d):
            d[f"{m} - hepo"] = [
                f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]" for v, lo, hi in zip(d.value, d.ci_low, d.ci_high)
            ]
            out = out.merge(d[[*keys, "learner", f"{m} - hepo"]], on=[*keys, "learner"], how="left")
    return out.fillna("")


def plot(runs: list[dict], keys: list[str], path: Path) -> Path:
    """Each learner's final share minus HEPO's per setting (paired 95% t interval over seeds), one panel per noise
    level: where a learner's bar is above 0 it beat HEPO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diffs = differences(runs, keys)
    noises = sorted(diffs["noise"].unique())
    others = list(diffs["learner"].unique())
    fig, axes = plt.subplots(len(noises), 1, figsize=(12, 3.2 * len(noises)), squeeze=False)
    cell_keys = [k for k in keys if k != "noise"]
    width = 0.8 / max(len(others), 1)
    for ax, noise in zip(axes[:, 0], noises):
        part = diffs[diffs["noise"] == noise]
        cells = list(dict.fromkeys(map(tuple, part[cell_keys].to_numpy().tolist())))  # in the runs' order
        for j, name in enumerate(others):
            mine = part[part.learner == name].set_index(cell_keys).loc[cells]
            xs = [i + (j - (len(others) - 1) / 2) * width for i in range(len(cells))]
            ax.bar(xs, mine["value"], width, yerr=mine["value"] - mine["ci_low"], capsize=2, label=name)
        labels = ["\n".join(f"{k}={v}" for k, v in zip(cell_keys, cell)) for cell in cells]
        ax.set_xticks(range(len(cells)), labels, fontsize=7)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("final share - HEPO's")
        ax.set_title(
            f"reward noise sd {noise:g} (bars: paired 95% t interval over seeds; below 0: HEPO ahead)"
        )
        ax.legend(fontsize=8, ncol=len(others))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(path, figure_bytes(fig, dpi=110))
    plt.close(fig)
    return path


def plot_curves(runs: list[dict], keys: list[str], path: Path) -> Path:
    """The share after each iteration per learner, mean over seeds with its 95% t band, one panel per setting: how
    fast each learner climbs and whether it holds what it reached (the table's final share is one iteration's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(frame(runs).groupby(keys, sort=False))
    cols = min(4, len(cells))
    rows = -(-len(cells) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax, (setting, part) in zip(axes.flat, cells):
        for learner, r in part.groupby("learner", sort=False):
            curves = torch.tensor(r["curve"].tolist(), dtype=torch.float64)  # (seeds, iterations + 1)
            band = [t_interval(curves[:, i].numpy()) for i in range(curves.shape[1])]
            ax.plot([b.value for b in band], label=learner, linewidth=1.2)
            ax.fill_between(range(len(band)), [b.ci_low for b in band], [b.ci_high for b in band], alpha=0.2)
        named = zip(keys, setting if isinstance(setting, tuple) else (setting,))
        ax.set_title(", ".join(f"{k}={v}" for k, v in named if k not in ("branching",)), fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(cells) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of reachable value")
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write_bytes(path, figure_bytes(fig, dpi=72))
    plt.close(fig)
    return path


def pipe_table(df: pd.DataFrame) -> str:
    """A Markdown pipe table of the frame's cells as they print."""
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def problems(base: TrieProblem, grid: dict[str, list]) -> list[TrieProblem]:
    """Every combination of ``grid``'s values on ``base`` (each validated: a bad value fails here)."""
    return [TrieProblem(**{**asdict(base), **dict(zip(grid, v))}) for v in itertools.product(*grid.values())]


def run_key(problem: dict, learner: str, seed: int) -> str:
    return json.dumps([problem, learner, seed], sort_keys=True)


def sweep(
    cells: list[TrieProblem],
    learners: list[str],
    seeds: int,
    workers: int,
    done: Path | None = None,
    prior: list[dict] = (),
) -> list[dict]:
    """Every problem, every learner, seeds 0..seeds-1, in that order. ``done``: a JSON-lines file each finished run
    is appended to; the runs it already holds, and those in ``prior`` (a committed sweep's), are read back, not run
    again (a stopped sweep resumes; a finished one redraws its table and figures)."""
    jobs = [(asdict(pr), learner, s) for pr in cells for learner in learners for s in range(seeds)]
    finished = {}
    defaults = asdict(TrieProblem())  # a run recorded before a setting existed ran at its default
    for row in [*prior, *(read_metrics(done) if done else [])]:
        problem = {k: row.get(k, defaults[k]) for k in jobs[0][0]}
        finished[run_key(problem, row.get("learner"), row.get("seed"))] = {**row, **problem}
    todo = [job for job in jobs if run_key(*job) not in finished]
    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} runs read back")
    with Pool(workers) as pool:
        for row in tqdm(pool.imap_unordered(_job, todo), total=len(todo), desc="runs", disable=not todo):
            finished[run_key({k: row[k] for k in jobs[0][0]}, row["learner"], row["seed"])] = row
            if done:
                append_metrics(done, row)
    return [finished[run_key(*job)] for job in jobs]


def comma_list(text: str, kind: type, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected a comma list of {kind.__name__} values") from None


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/credit_trie/sweep", help="writes OUT.json and OUT.md")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--learners", default=",".join(LEARNERS))
    ap.add_argument("--depth", default="2,4", help="comma list; the branching keeps branching^depth fixed")
    ap.add_argument("--leaves", type=int, default=256, help="leaves of the trie (branching^depth)")
    ap.add_argument("--credit", default="early,late")
    ap.add_argument("--noise", default="0,2")
    ap.add_argument("--group", default="4,16")
    ap.add_argument("--reward", default="tree", help=f"comma list of {list(REWARDS)}")
    ap.add_argument("--policy", default="table", help=f"comma list of {list(POLICIES)}")
    ap.add_argument("--iterations", type=int, default=TrieProblem.iterations)
    ap.add_argument("--lr", default=str(TrieProblem.lr), help="comma list: every learner at each rate")
    ap.add_argument("--width", type=int, default=TrieProblem.width, help="the shared policy's hidden width")
    ap.add_argument("--max-grad-norm", type=float, default=TrieProblem.max_grad_norm)
    ap.add_argument("--clip", default=TrieProblem.clip, help=f"comma list of {list(CLIPS)}")
    a = ap.parse_args(argv)
    learners = a.learners.split(",")
    for name in learners:
        learner_setup(name)  # an unknown learner fails here, before any run
    cells: list[TrieProblem] = []
    for depth in comma_list(a.depth, int, "--depth"):
        branching = round(a.leaves ** (1 / depth))
        if branching**depth != a.leaves:
            raise SystemExit(
                f"--leaves {a.leaves} is not branching^{depth} for a whole branching (--depth {depth})"
            )
        base = TrieProblem(
            depth=depth,
            branching=branching,
            iterations=a.iterations,
            width=a.width,
            max_grad_norm=a.max_grad_norm,
        )
        grid = {
            "policy": a.policy.split(","),
            "reward": a.reward.split(","),
            "lr": comma_list(a.lr, float, "--lr"),
            "clip": a.clip.split(","),
            "credit": a.credit.split(","),
            "noise": comma_list(a.noise, float, "--noise"),
            "group": comma_list(a.group, int, "--group"),
        }
        try:
            cells += problems(base, grid)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    files = {
        ext: path.parent / f"{path.name}.{ext}" for ext in ("json", "md", "png", "curves.png", "runs.jsonl")
    }
    start = time.perf_counter()  # (a dot in OUT stays)
    prior = read_json(files["json"])["runs"] if files["json"].exists() else []
    runs = sweep(cells, learners, a.seeds, a.workers, done=files.pop("runs.jsonl"), prior=prior)
    # the runs first (the table reads them), one per line: a sweep's file stays a third of its indented size
    lines = ",\n".join(json.dumps(r, separators=(",", ":")) for r in runs)
    atomic_write_bytes(files["json"], f'{{"args": {json.dumps(vars(a))},\n"runs": [\n{lines}\n]}}\n'.encode())
    # the cell's settings: the policy, the reward's make and the rate only where the sweep varies them
    keys = [k for k in ("policy", "reward", "lr", "clip") if len({r[k] for r in runs}) > 1]
    keys += ["depth", "branching", "credit", "noise", "group"]
    out = table(runs, keys)
    md = pipe_table(out)
    print(md)
    print(f"{len(runs)} runs in {time.perf_counter() - start:.0f} s")
    atomic_write_bytes(files["md"], (md + "\n").encode())
    plot(runs, keys, files["png"])
    plot_curves(runs, keys, files["curves.png"])
    print(f"wrote {', '.join(str(f) for f in files.values())}")
    return out


if __name__ == "__main__":
    main()
