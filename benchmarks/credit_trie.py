"""Where per-level credit matters: HEPO and the PPO family on a trie bandit with a known reward (issue 16 d6).

At GPU scale HEPO, PPO, GRPO and Sibling-GRPO ended level (``benchmarks/RESULTS.md``), with HEPO's critic explaining
little of its targets. The issue then asks where per-level credit does matter. This script answers it where
the answer can be computed exactly and with many seeds: a bandit whose actions are the leaves of a trie (a
semantic-ID path: ``depth`` levels of ``branching`` codes), whose reward is a sum of per-node terms with known
weights per level, and whose policy is a table of next-code logits per (context, prefix) with a table critic
per (context, prefix). The learners are the library's own (``agents.rl.registry.ALGOS``: targets, losses and the
update loop ``agents.rl.loop.update``, unchanged); only the generator and the world are replaced.

The reward of context c and leaf z: R = sum_l s_l g_l(c, z_<=l), g ~ N(0, 1) per node, rescaled to unit
standard deviation over the leaves. ``credit`` sets the level weights s_l: ``early`` (s_l = 2^-l: the first
code decides most), ``late`` (the reverse: the last code decides most), ``flat`` (equal). The learner observes
R + ``noise`` x N(0, 1) (a realised outcome instead of the expected value). Measured: the share of the
reachable value, (E_pi R - E_uniform R) / (max R - E_uniform R) per context, averaged over contexts, exactly
(every leaf's probability under the table policy), after every iteration, from a uniform start; the final share
and the mean share over the iterations (speed), per learner, over seeds, with each learner's difference to HEPO
paired by seed (the same bandit, the same start).

    python benchmarks/credit_trie.py --out benchmarks/results/credit_trie/sweep --seeds 10

Prints the table and writes ``--out``.json (every run's curve), ``--out``.md (the table) and ``--out``.png (each
learner's difference to HEPO per setting, one panel per noise level).
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from agents.rl.buffer import Buffer
from agents.rl.common import LossConfig
from agents.rl.loop import UpdateConfig, update
from agents.rl.registry import algorithm
from gpr_sim.runs import atomic_write_bytes, figure_bytes, write_json
from gpr_sim.schema import TokenBatch
from gpr_sim.stats import paired_difference, t_interval

CREDITS = ("early", "late", "flat")
"""where the reward is decided: the first levels, the last ones, or every level alike"""
LEARNERS = ("hepo", "hepo_gate", "ppo", "grpo", "sibling_grpo")
"""the PPO family of ``agents.rl`` (DPO needs a GPR reference model; it is not a per-level credit question)"""
VARIANTS = {"hepo_gate": ("hepo", {"gae_gate": "group"})}
"""learners that are an algorithm with other loss constants: name -> (algorithm, ``LossConfig`` fields)"""


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
    """Adam learning rate of the tables"""
    critic_warmup: int = 2
    """iterations that train the critic only (``agents.hepo --critic-warmup``)"""

    def __post_init__(self) -> None:
        if self.credit not in CREDITS:
            raise ValueError(f"credit={self.credit!r} is unknown: expected one of {list(CREDITS)}")
        for name in ("depth", "branching", "contexts", "group", "requests", "iterations"):
            if getattr(self, name) < (2 if name in ("branching", "group") else 1):
                raise ValueError(f"{name}={getattr(self, name)} is invalid: too small")
        if self.branching**self.depth > 1 << 16:
            raise ValueError(
                f"branching^depth = {self.branching**self.depth} leaves is too many (at most 65,536)"
            )
        if not (self.noise >= 0 and self.lr > 0):
            raise ValueError(f"noise={self.noise}, lr={self.lr}: expected noise >= 0, lr > 0")


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
        for level in range(depth):
            node_terms = torch.randn(p.contexts, b ** (level + 1), generator=g, dtype=torch.float64)
            reward += s[level] * node_terms[:, prefix[level]]
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


class TablePolicy(nn.Module):
    """Next-code logits per (context, internal node) and a critic value per (context, node), leaves included.

    Called as ``agents.rl.loop``'s ``terms_fn``: (buffer, segments) -> the buffer's paths' per-level log-probs
    (M, K, L) and values (M, K, L + 1) (V of the prefixes z_<l for l = 0..L-1, then of the leaf), the context of
    each request in ``buffer.tokens.token_ids[:, 0]``.
    """

    def __init__(self, p: TrieProblem):
        super().__init__()
        self.b, self.depth = p.branching, p.depth
        self.offsets = level_offsets(p.branching, p.depth)
        self.logits = nn.Parameter(torch.zeros(p.contexts, self.offsets[p.depth], p.branching))
        self.values = nn.Parameter(torch.zeros(p.contexts, self.offsets[p.depth + 1]))

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
        nodes = self.nodes(codes)  # (M, K, L + 1)
        c = ctx[:, None, None]
        logp = self.logits[c, nodes[..., :-1]].log_softmax(-1)  # (M, K, L, b)
        return logp.gather(-1, codes[..., None]).squeeze(-1), self.values[c, nodes]

    def forward(self, buf: Buffer, segments=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.terms(buf.tokens.token_ids[:, 0], buf.codes)

    @torch.no_grad()
    def sample(self, ctx: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
        """(M,) contexts -> (M, K, L) codes drawn from the policy, level by level."""
        index = torch.zeros(ctx.shape[0], k, dtype=torch.int64)
        codes = []
        for level in range(self.depth):
            probs = self.logits[ctx[:, None], index + self.offsets[level]].softmax(-1)  # (M, K, b)
            z = torch.multinomial(probs.flatten(0, 1), 1, generator=g).view(ctx.shape[0], k)
            codes.append(z)
            index = index * self.b + z
        return torch.stack(codes, -1)

    @torch.no_grad()
    def leaf_probs(self) -> torch.Tensor:
        """(C, leaves) the probability of every leaf."""
        prob = torch.ones(self.logits.shape[0], 1, dtype=torch.float64)
        for level in range(self.depth):
            lo, hi = self.offsets[level], self.offsets[level + 1]
            step = self.logits[:, lo:hi].double().softmax(-1)  # (C, b^level, b)
            prob = (prob[..., None] * step).flatten(1)
        return prob


def request_tokens(ctx: torch.Tensor) -> TokenBatch:
    """The buffer's token batch: one slot per request holding its context (what ``TablePolicy`` reads)."""
    m = ctx.shape[0]
    zeros = torch.zeros(m, 1, dtype=torch.int64)
    return TokenBatch(ctx[:, None], zeros, zeros, zeros.bool(), zeros[..., None], zeros, torch.zeros(m, 1, 1))


def run(p: TrieProblem, learner: str, seed: int) -> list[float]:
    """One learner from the uniform policy on the bandit of ``seed``: the share after each iteration (0 first)."""
    bandit = TrieBandit(p, seed)
    policy = TablePolicy(p)
    algo, cfg = learner_setup(learner)
    opt = torch.optim.Adam(policy.parameters(), lr=p.lr)
    schedule = UpdateConfig(epochs=2, minibatch=max(1, p.requests // 4), max_grad_norm=1.0, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)  # the rollouts' draws, the same for every learner's first one
    state: dict = {}
    legal = [torch.ones(p.requests, p.group, p.branching, dtype=torch.bool)] * p.depth
    curve = [bandit.share(policy.leaf_probs())]
    for it in range(p.iterations):
        ctx = torch.randint(p.contexts, (p.requests,), generator=g)
        codes = policy.sample(ctx, p.group, g)
        tokens = request_tokens(ctx)
        leaf = policy.nodes(codes)[..., -1] - policy.offsets[p.depth]
        with torch.no_grad():
            old_log_prob, old_values = policy.terms(ctx, codes)
        buf = Buffer(
            tokens=tokens,
            noise=None,
            codes=codes,
            old_log_prob=old_log_prob,
            legal=legal,
            old_values=old_values,
            reward=bandit.observe(ctx, leaf, g),
            process=torch.zeros(p.requests, p.group, p.depth),
            valid=torch.ones(p.requests, dtype=torch.bool),
            rehearsed=torch.zeros(p.requests, dtype=torch.bool),
            uid=torch.arange(p.requests) + it * p.requests,
            learner_state=state,
        )
        buf.adv, buf.returns = algo.targets(buf, cfg)
        update(policy, policy, opt, None, buf, algo, cfg, schedule, it, policy=it >= p.critic_warmup)
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


def pipe_table(df: pd.DataFrame) -> str:
    """A Markdown pipe table of the frame's cells as they print."""
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def sweep(
    base: TrieProblem, grid: dict[str, list], learners: list[str], seeds: int, workers: int
) -> list[dict]:
    """Every combination of ``grid``'s values on ``base``, every learner, seeds 0..seeds-1."""
    names = list(grid)
    problems = [
        asdict(TrieProblem(**{**asdict(base), **dict(zip(names, v))}))
        for v in itertools.product(*grid.values())
    ]
    jobs = [(pr, learner, s) for pr in problems for learner in learners for s in range(seeds)]
    with Pool(workers) as pool:
        return pool.map(_job, jobs, chunksize=1)


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
    ap.add_argument("--iterations", type=int, default=TrieProblem.iterations)
    ap.add_argument("--lr", type=float, default=TrieProblem.lr)
    a = ap.parse_args(argv)
    learners = a.learners.split(",")
    for name in learners:
        learner_setup(name)  # an unknown learner fails here, before any run
    depths = [int(d) for d in a.depth.split(",")]
    runs: list[dict] = []
    start = time.perf_counter()
    for depth in depths:
        branching = round(a.leaves ** (1 / depth))
        if branching**depth != a.leaves:
            raise SystemExit(
                f"--leaves {a.leaves} is not branching^{depth} for a whole branching (--depth {depth})"
            )
        base = TrieProblem(depth=depth, branching=branching, iterations=a.iterations, lr=a.lr)
        grid = {
            "credit": a.credit.split(","),
            "noise": [float(x) for x in a.noise.split(",")],
            "group": [int(x) for x in a.group.split(",")],
        }
        runs += sweep(base, grid, learners, a.seeds, a.workers)
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    files = {ext: path.parent / f"{path.name}.{ext}" for ext in ("json", "md", "png")}  # a dot in OUT stays
    write_json(files["json"], {"args": vars(a), "runs": runs})  # the runs first: the table reads them
    keys = ["depth", "branching", "credit", "noise", "group"]
    out = table(runs, keys)
    md = pipe_table(out)
    print(md)
    print(f"{len(runs)} runs in {time.perf_counter() - start:.0f} s")
    atomic_write_bytes(files["md"], (md + "\n").encode())
    plot(runs, keys, files["png"])
    print(f"wrote {', '.join(str(f) for f in files.values())}")
    return out


if __name__ == "__main__":
    main()
