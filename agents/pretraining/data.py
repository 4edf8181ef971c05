"""The data of a pre-training stage: its inputs (log, tokenizer), the session split and the training tensors.

Requests are split into train / held-out by session (``episode_id``) with a fixed split seed, so every
stage and seed sees the same held-out sessions. Each side becomes row-aligned tensors (``Split``): the
U/O/E/I tokens, the MTP target paths, the head weights (uniform for MTP, value weights for VAFT) and the
HTE value targets. The per-level legal masks of the targets come from the trie when rows are drawn
(``Split.rows``), not stored: stored, they cost N x sum_l K_l bytes per request (4 x (3 x 256 + K_dis): 6.9 KB
with the large world's K_dis = 949, about 7 GB of device memory per million requests), while a minibatch's
masks are a few trie lookups.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from agents.collection import CollectConfig, write_log
from agents.platform.folder import platform_fitted
from agents.platform.pipeline import PlatformFitConfig, write_platform_folder
from agents.policies.learned_cascade import LearnedCascadeConfig
from agents.pretraining.config import PretrainConfig
from gpr_sim.data.logs import check_run_world, check_tokenizer_world, log_world, read_logs
from gpr_sim.model.offline_eval import popularity_rankings, ranking_metrics
from gpr_sim.model.targets import mtp_targets, target_paths, vaft_weights, value_targets
from gpr_sim.platform.features import PlatformFeatures
from gpr_sim.platform.funnel import FunnelConfig
from gpr_sim.schema import (
    MARKET_COLUMN,
    SchemaConfig,
    TokenBatch,
    dense_dim,
    flatten_cells,
    tokens_from_logs,
)
from gpr_sim.tokenizer.compare import CompareConfig
from gpr_sim.tokenizer.trie import PrefixTrie
from gpr_sim.tokenizer.world import WorldTokenizer, fit_world_tokenizer
from gpr_sim.world import WorldConfig
from gpr_sim.world.catalog import World, generate_world

FAST_TOKENIZER = CompareConfig(codebook_size=16, kmeans_iters=5, vae_steps=30, batch_size=128, hidden_dim=32)
"""RQ-Kmeans+ settings of the tokenizer fitted when none is given (seconds on a CPU); the stage's
``codebook_size`` replaces the codebook size"""


@dataclass
class Split:
    """Everything one side of the split needs, as row-aligned tensors on the device."""

    tokens: TokenBatch  # B requests
    codes: torch.Tensor  # (B, N, L') target paths, -1 rows = none
    weights: torch.Tensor  # (B, N) per-target weights: 1/N (MTP) or VAFT weight / N
    ads: torch.Tensor  # (B, N) target ads, -1 = none
    values: torch.Tensor  # (B,) HTE target: final_value of head 0's ad / value_scale, NaN = none
    tok: WorldTokenizer  # on the tensors' device: the trie the legal masks of drawn rows come from

    def rows(self, idx: torch.Tensor) -> tuple[TokenBatch, Tensor, list[Tensor], Tensor, Tensor]:
        """Tokens, target paths, their L' legal masks (M, N, K_l) (``legal_masks``), weights and HTE
        targets of the M rows ``idx``."""
        codes = self.codes[idx]
        return (
            TokenBatch(*(t[idx] for t in self.tokens)),
            codes,
            legal_masks(codes, self.tok),
            self.weights[idx],
            self.values[idx],
        )

    def __len__(self) -> int:
        return self.codes.shape[0]


def split_sessions(episode_id: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(B,) bool held-out mask: a seeded random ``fraction`` of the sessions (at least one) is held out."""
    sessions = np.unique(episode_id)
    rng = np.random.default_rng(seed)
    n_eval = max(1, int(round(fraction * sessions.size)))
    held = rng.permutation(sessions)[:n_eval]
    return np.isin(episode_id, held)


def legal_masks(codes: torch.Tensor, tok: WorldTokenizer) -> list[torch.Tensor]:
    """L' masks (B, N, K_l) on ``tok``'s device: legal next codes after each target's prefix z_<l (from
    the ad trie)."""
    safe = codes.clamp_min(0).to(tok.device)  # rows without a target get some mask; mtp_loss ignores them
    return [tok.prefix_mask(safe[..., :level]) for level in range(codes.shape[-1])]


def value_scale(g: torch.Tensor) -> float:
    """The std of the finite HTE targets (1 when there are fewer than 2 or they are constant): the HTE learns
    unit-scale values, as HEPO's critic does (``agents.rl.rollout``'s ``reward_scale``)."""
    g = g[g.isfinite()].double()
    std = float(g.std()) if g.numel() > 1 else 0.0
    return std if std > 1e-12 else 1.0


def build_split(
    df: pd.DataFrame,
    tok: WorldTokenizer,
    schema: SchemaConfig,
    world: World,
    cfg: PretrainConfig,
    features: PlatformFeatures | None = None,
    device_tok: WorldTokenizer | None = None,
) -> Split:
    """Row-aligned tensors of one side of the split (HTE targets in the world's currency: `load_data` scales them).

    ``tok`` is the CPU tokenizer the targets are built with; ``device_tok`` its copy on ``cfg.device`` (None:
    ``tok.to(cfg.device)``) that ``Split.rows`` draws legal masks from and the tokens are built with: only the
    logged histories cross to the device, and the dense token tensor (B x T x F floats, ~17 GB for the
    gpu-large log) is filled there, not on the host and then copied (about 30 s of idle GPU per stage on an
    H200, benchmarks/RESULTS.md)."""
    targets = mtp_targets(df, cfg.mtp_heads)
    codes = target_paths(targets.ads, tok)
    n = cfg.mtp_heads
    if cfg.stage == "vaft":
        weights = vaft_weights(df, targets) / n  # GPR §4.2; / N keeps the scale of the uniform MTP weights
    else:
        weights = torch.full((len(df), n), 1.0 / n)  # GPR §4.1 DEFAULT: uniform w_j, sum_j w_j = 1
    g = value_targets(df, targets, world.ad_value_mean, world.config.reward).float()
    rows = df.reset_index(drop=True)
    dev = torch.device(cfg.device)
    device_tok = device_tok if device_tok is not None else tok.to(dev)
    tokens = tokens_from_logs(
        rows,
        device_tok.table,
        schema,
        features=None if features is None else features.to(dev),
        market=cfg.market_features,
    )
    return Split(tokens, codes.to(dev), weights.to(dev), targets.ads.to(dev), g.to(dev), device_tok)


# ----------------------------------------------------------------------------- inputs


def input_paths(cfg: PretrainConfig, out: Path) -> tuple[Path, Path]:
    """The log and tokenizer of a stage: ``--logs`` / ``--tokenizer``, else ``out/logs.parquet`` / ``out/tokenizer``."""
    logs = Path(cfg.logs) if cfg.logs else out / "logs.parquet"
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else out / "tokenizer"
    return logs, tok_dir


PRIVILEGED = "cascade-privileged"
"""the bootstrap behaviour policy: the cascade that reads the simulator's true funnel (no platform has it)"""


def collect_config(cfg: PretrainConfig, logs: Path, policy: str = PRIVILEGED) -> CollectConfig:
    """The log of ``policy`` collected when a stage is given none: ``collect_envs`` x ``collect_steps`` requests
    of the ``preset`` world, sessions seeded by ``seed``, simulated on the stage's device."""
    return CollectConfig(
        env=cfg.env,
        policy=policy,
        num_envs=cfg.collect_envs,
        steps=cfg.collect_steps,
        seed=cfg.seed,
        preset=cfg.preset,
        device=cfg.device,
        out=str(logs),
        progress=False,
    )


def ensure_bootstrap_log(cfg: PretrainConfig, root: Path, envs: int, steps: int) -> Path:
    """``root/funnel/logs.parquet``: the privileged cascade's log of ``envs`` sessions x ``steps`` requests
    (``collect_config`` at this size: same world, device and seed), collected when absent. The platform's
    models learn from it: the funnel of the learned reward (``pipeline.ensure_funnel``) and the learned
    cascade (``ensure_platform``), as a real platform bootstraps on the traffic of the system before it."""
    logs = root / "funnel" / "logs.parquet"
    if not logs.is_file():
        sized = dataclasses.replace(cfg, collect_envs=envs, collect_steps=steps)
        write_log(collect_config(sized, logs))
    return logs


def ensure_platform(cfg: PretrainConfig, root: Path, envs: int, steps: int) -> Path:
    """``root/platform``: the learned cascade (funnel, retrieval, pre-ranking: ``agents.fit_platform``, its
    default settings, the funnel seeded by ``seed``) fitted on ``ensure_bootstrap_log(cfg, root, envs, steps)``;
    reused when its model files are present."""
    folder = root / "platform"
    if not platform_fitted(folder):
        logs = ensure_bootstrap_log(cfg, root, envs, steps)
        df, meta = read_logs(logs)
        world, world_seed = log_world(meta)
        fit = PlatformFitConfig(funnel=FunnelConfig(seed=cfg.seed))
        settings = {"logs": str(logs), "device": cfg.device, **dataclasses.asdict(fit)}
        write_platform_folder(
            df, world, world_seed, fit, folder, settings, str(logs), cfg.device, cfg.progress
        )
    return folder


def behaviour_policy(cfg: PretrainConfig, out: Path) -> str:
    """The policy spec a stage in ``out`` collects its log with (``cfg.behaviour``).

    ``learned-cascade`` serves the platform of the stage's pipeline, ``out.parent/platform`` (fitted by
    ``ensure_platform`` on a bootstrap log of ``collect_envs`` x ``collect_steps`` requests when absent; the
    pipeline fits it first on its funnel's larger log), exploring at its default temperature (exact
    propensities)."""
    if cfg.behaviour == PRIVILEGED:
        return PRIVILEGED
    platform = ensure_platform(cfg, out.parent, cfg.collect_envs, cfg.collect_steps)
    return f"learned-cascade:{platform}@temperature={LearnedCascadeConfig().temperature:g}"


def tokenizer_config(cfg: PretrainConfig) -> CompareConfig:
    """``FAST_TOKENIZER`` with the stage's ``codebook_size``."""
    return dataclasses.replace(FAST_TOKENIZER, codebook_size=cfg.codebook_size)


def ensure_inputs(cfg: PretrainConfig, out: Path) -> tuple[Path, Path]:
    """The log and tokenizer paths, collecting (with ``behaviour_policy``) / fitting them into ``out`` when not
    given (both on the stage's device: the large world's million ads take minutes on a CPU)."""
    logs, tok_dir = input_paths(cfg, out)
    if not cfg.logs and not logs.is_file():
        write_log(collect_config(cfg, logs, behaviour_policy(cfg, out)))
    if not cfg.tokenizer and not (tok_dir / "semantic_ids.pt").is_file():
        _, meta = read_logs(logs)
        world = generate_world(
            WorldConfig.from_dict(meta["world_config"]), meta.get("world_seed", 0), cfg.device
        )
        fit_world_tokenizer(world, "rq-kmeans-plus", tokenizer_config(cfg), seed=cfg.seed).save(tok_dir)
    return logs, tok_dir


# ----------------------------------------------------------------------------- one stage's data


@dataclass
class StageData:
    """What a stage trains and evaluates on (`load_data`)."""

    tok: WorldTokenizer  # the semantic IDs (on the CPU)
    schema: SchemaConfig
    train: Split
    held_out: Split
    trie: PrefixTrie  # the ad trie on the stage's device
    pop: dict[str, float]  # eval/pop_*: the popularity baseline on the held-out requests
    scale: float  # value_scale of the train side's HTE targets (both sides are divided by it)
    dense_dim: int  # F of the token layout (``gpr_sim.schema.dense_dim``): the model's GPRConfig.dense_dim
    features: PlatformFeatures | None = None  # the per-ad features of the tokens (CPU), None without them


def load_data(cfg: PretrainConfig, logs: Path, tok_dir: Path) -> StageData:
    """One tokenisation of every request, then row-aligned tensors per side of the split (module doc)."""
    df, meta = read_logs(logs)
    tok = WorldTokenizer.load(tok_dir)
    world = generate_world(
        WorldConfig.from_dict(meta["world_config"]), meta.get("world_seed", 0)
    )  # HTE targets
    check_tokenizer_world(tok, world, logs, f"tokenizer {tok_dir}")
    if cfg.init:
        check_run_world(meta, logs, Path(cfg.init).parent, f"--init {cfg.init}")
    if cfg.market_features and MARKET_COLUMN not in df.columns:
        raise ValueError(
            f"{logs}: lacks column(s) {[MARKET_COLUMN]} of the token layout with market features (a log "
            "collected before them): collect it again, or pass --no-market-features"
        )
    schema = SchemaConfig.from_world(world.config)
    held = split_sessions(df["episode_id"].to_numpy(), cfg.eval_fraction, cfg.split_seed)
    train_df, eval_df = df[~held].reset_index(drop=True), df[held].reset_index(drop=True)
    features = PlatformFeatures.from_world(world) if cfg.platform_features else None  # CPU, as the rows
    device_tok = tok.to(cfg.device)
    train, held_out = (
        build_split(d, tok, schema, world, cfg, features, device_tok) for d in (train_df, eval_df)
    )
    scale = value_scale(train.values)  # the train side's, for both
    for side in (train, held_out):
        side.values = side.values / scale
    trie = device_tok.trie
    shown = torch.as_tensor(flatten_cells(train_df["shown_ad"], np.int64)[0])  # every train slot
    has = held_out.ads[:, 0] >= 0
    n_rank = min(int(has.sum()), cfg.eval_requests)
    pop_ranked = popularity_rankings(shown, tok.num_ads, cfg.top_k, n_rank)
    pop_target = held_out.ads[has, 0][:n_rank].cpu()
    pop = {f"eval/pop_{k}": v for k, v in ranking_metrics(pop_ranked, pop_target).items()}
    f = dense_dim(world.config, cfg.platform_features, cfg.market_features)
    return StageData(tok, schema, train, held_out, trie, pop, scale, f, features)
