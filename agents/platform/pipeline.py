"""Fit a platform from one log: the learned funnel, then retrieval on clicks, then pre-ranking distilled from the funnel.

    platform, report = fit_platform(df, world_config, world_seed, PlatformFitConfig(), device="cpu")

Order matters as in production: the ranker (``gpr_sim.platform.funnel``) learns pCTR/pCVR from impressions;
retrieval learns from clicks alone; pre-ranking learns the ranker's log eCPM on what retrieval returns for
logged requests. Sessions are split once (``heldout_fraction`` of episodes, by a hash of ``episode_id``):
retrieval and pre-ranking train on the others, and recall@R of the logged clicked ad is measured on the
held-out ones. The funnel splits its own data (its report holds its held-out AUC / ECE). The stage losses in
the simulator (``agents.platform.stage_losses``) come on top, on request states no log used.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from agents.evaluation.oracle_share import OracleShareConfig
from agents.platform.folder import Platform, save_platform
from agents.platform.stage_losses import stage_losses
from agents.policies.learned_cascade import LearnedCascadeConfig
from gpr_sim.platform.funnel import FunnelConfig, fit_funnel
from gpr_sim.platform.preranking import PrerankingConfig, fit_preranking, preranking_features
from gpr_sim.platform.retrieval import RetrievalConfig, fit_retrieval, recall_at
from gpr_sim.platform.view import Catalog, catalog_of
from gpr_sim.runs import RunFolder, atomic_write_bytes, write_json
from gpr_sim.world import WorldConfig, generate_world
from gpr_sim.world.config import check_range

LOG_COLUMNS = {
    "user_id": ("user_id", torch.int64),
    "user": ("user_features", torch.float32),
    "organic": ("organic_ids", torch.int64),
    "context": ("context", torch.float32),
    "ad_history": ("ad_ids", torch.int64),
    "ad_events": ("ad_events", torch.int64),
}
"""observation key -> (log column, dtype): a logged request read as the observation the policy saw"""
HASH_MULTIPLIER = 2654435761
"""Knuth's multiplicative hash of ``episode_id``: the held-out split does not follow the slot order"""


@dataclass(frozen=True)
class PlatformFitConfig:
    """Everything a platform fit does besides the log: the three stages' configs, the split, the stage-loss states.

    The stage sizes (R = 100, P = 20) are those of ``cascade-privileged``, so the learned and the privileged
    cascade differ in their models only; they are fixed before any stage loss is looked at.
    """

    funnel: FunnelConfig = field(default_factory=FunnelConfig)
    """the learned pCTR / pCVR ranker"""
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    """the two-tower retrieval (its ``retrieval_size`` is R of recall@R and of the stage losses)"""
    preranking: PrerankingConfig = field(default_factory=PrerankingConfig)
    """the distilled pre-ranker (its ``preranking_size`` is P of the stage losses)"""
    heldout_fraction: float = 0.2
    """share of logged sessions retrieval and pre-ranking do not train on (recall@R is measured on them)"""
    preranking_requests: int = 20000
    """logged training requests the pre-ranker learns on at most (bounds memory at requests x R features)"""
    states: int = 1024
    """held-out request states of the stage losses (one env slot each)"""
    states_seed: int = 987654
    """reset seed of those states (a seed no collection uses by default)"""
    warmup: int = 0
    """steps under the seeded ``cascade-privileged`` before the states are taken (0: first requests of sessions)"""
    temperature: float = 0.3
    """the serving temperature of the stage losses' exploring share (``cascade-privileged``'s default)"""

    def __post_init__(self) -> None:
        check_range("heldout_fraction", self.heldout_fraction, 0.0, 1.0, lo_open=True)
        if self.heldout_fraction >= 1.0:
            raise ValueError(
                f"heldout_fraction={self.heldout_fraction!r} is out of range: expected a number in (0, 1)"
            )
        for name, lo in (("preranking_requests", 1), ("states", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {lo}")
        if (
            isinstance(self.states_seed, bool)
            or not isinstance(self.states_seed, int)
            or self.states_seed < 0
        ):
            raise ValueError(f"states_seed={self.states_seed!r} is invalid: expected an integer >= 0")
        check_range("temperature", self.temperature, 0.0, 100.0)


def log_requests(df: pd.DataFrame, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The logged requests as a batched observation (``LOG_COLUMNS``), (N, ...) per key."""
    out = {}
    for key, (column, dtype) in LOG_COLUMNS.items():
        values = df[column].to_numpy()
        array = np.stack(values) if values.dtype == object else np.asarray(values)
        out[key] = torch.as_tensor(np.array(array), dtype=dtype, device=device)
    return out


def heldout_sessions(episode_id: np.ndarray, fraction: float) -> np.ndarray:
    """(N,) bool: the rows of held-out sessions (a hash of ``episode_id`` below ``fraction``)."""
    h = (episode_id.astype(np.uint64) * np.uint64(HASH_MULTIPLIER)) % np.uint64(1 << 32)
    return h < np.uint64(int(fraction * (1 << 32)))


def clicked_ads(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(rows, ads): the requests with a click and the ad in its first shown slot (the clicked ad with one slot)."""
    position = df["position"].to_numpy()
    rows = np.flatnonzero((df["click"].to_numpy() > 0) & (position >= 0))
    shown = np.stack(df["shown_ad"].to_numpy()[rows]) if rows.size else np.zeros((0, 1), dtype=np.int64)
    return rows, shown[np.arange(rows.size), position[rows]].astype(np.int64)


@torch.no_grad()
def log_ecpm(
    funnel, catalog: Catalog, request: dict[str, torch.Tensor], ads: torch.Tensor, chunk: int = 4096
):
    """(N, R) the ranker's log eCPM, log(bid x pCTR x pCVR), of ads (N, R): the pre-ranker's teacher."""
    out = torch.empty(ads.shape, dtype=torch.float32, device=ads.device)
    for start in range(0, ads.shape[0], chunk):  # chunks of requests, not single users
        sl = slice(start, min(ads.shape[0], start + chunk))
        pr = funnel(catalog, {k: v[sl] for k, v in request.items()}, ads[sl])
        out[sl] = (
            torch.log(catalog.ad_bid[ads[sl]].float())
            + torch.log(pr.p_click.float().clamp(min=1e-12))
            + torch.log(pr.p_conversion.float().clamp(min=1e-12))
        )
    return out


def fit_platform(
    df: pd.DataFrame,
    world: WorldConfig,
    world_seed: int,
    config: PlatformFitConfig,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[Platform, dict]:
    """Fit the three stages on a log (module doc) and measure them; returns the platform and the report dict.

    The report holds ``funnel`` (``fit_funnel``'s report), ``retrieval`` (training losses, clicks, held-out
    recall@R), ``preranking`` (training losses), ``stage_losses`` (``agents.platform.stage_losses``), the
    sizes of the split and ``seconds``, the wall time of each phase (what a large log's fit spends its time on).
    """
    seconds: dict[str, float] = {}
    clock = _Clock(seconds, device)
    sim_world = generate_world(world, world_seed, device)
    catalog = catalog_of(sim_world)
    # The simulator's world reaches fit_funnel only for its report (the privileged estimator beside the model).
    clock("world")
    funnel, funnel_report = fit_funnel(df, catalog, config.funnel, device, progress, world=sim_world)
    funnel.eval()
    clock("funnel")

    held = heldout_sessions(df["episode_id"].to_numpy(), config.heldout_fraction)
    rows, ads = clicked_ads(df)
    requests = log_requests(df, device)
    clock("requests")

    def pick(idx: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: v[torch.as_tensor(idx, device=device)] for k, v in requests.items()}

    train, test = ~held[rows], held[rows]
    clicked = torch.as_tensor(ads, device=device)
    retrieval, ret_report = fit_retrieval(
        catalog, pick(rows[train]), clicked[train], config.retrieval, device
    )
    r = config.retrieval.retrieval_size
    ret_report[f"recall_at_{r}_heldout"] = recall_at(retrieval, catalog, pick(rows[test]), clicked[test], r)
    ret_report[f"recall_at_{r}_train"] = recall_at(retrieval, catalog, pick(rows[train]), clicked[train], r)
    ret_report["heldout_clicks"] = int(test.sum())
    clock("retrieval")

    g = np.random.default_rng(config.preranking.seed)
    train_requests = np.flatnonzero(~held)
    if train_requests.size > config.preranking_requests:
        train_requests = np.sort(g.choice(train_requests, config.preranking_requests, replace=False))
    req = pick(train_requests)
    retrieved, scores = retrieval.retrieve(catalog, req, r)
    teacher = log_ecpm(funnel, catalog, req, retrieved)
    features = preranking_features(catalog, req, retrieved, scores)
    preranker, pre_report = fit_preranking(features, teacher, config.preranking, device)
    clock("preranking")

    platform = Platform(funnel, retrieval, preranker)
    cascade = LearnedCascadeConfig(r, config.preranking.preranking_size, config.temperature)
    states = OracleShareConfig(states=config.states, seed=config.states_seed, warmup=config.warmup)
    losses = stage_losses(platform, world, world_seed, states, cascade, device)
    clock("stage_losses")
    report = {
        "requests": len(df),
        "heldout_requests": int(held.sum()),
        "funnel": funnel_report,
        "retrieval": ret_report,
        "preranking": pre_report,
        "stage_losses": losses,
        "seconds": seconds,
    }
    return platform, report


class _Clock:
    """Records into ``seconds[name]`` the wall time since the previous call (the device synchronised first)."""

    def __init__(self, seconds: dict[str, float], device: str | torch.device) -> None:
        self.seconds, self.device, self.last = seconds, torch.device(device), time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 3)
        self.last = now


def report_markdown(report: dict) -> str:
    """The report's numbers as a short markdown document (``report.md``; lists such as reliability bins and
    the configs stay in ``report.json``)."""
    lines = [
        "# Platform fit",
        "",
        f"{report['requests']} logged requests, {report['heldout_requests']} in held-out sessions.",
        "",
    ]
    for section in ("funnel", "retrieval", "preranking", "stage_losses", "seconds"):
        lines += [f"## {section}", "", "| key | value |", "|---|---|"]
        for key, value in _flat(report[section]).items():
            if isinstance(value, (list, tuple)) or key.startswith("config."):
                continue
            text = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)
            lines.append(f"| {key} | {text} |")
        lines.append("")
    return "\n".join(lines)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


__all__ = [
    "LOG_COLUMNS",
    "PlatformFitConfig",
    "clicked_ads",
    "fit_platform",
    "heldout_sessions",
    "log_ecpm",
    "log_requests",
    "report_markdown",
]


PLATFORM_ENTRY = "agents.fit_platform"
"""the owner of platform folders (``gpr_sim.runs.RunFolder``), whoever writes them"""
PLATFORM_RESUME_IGNORES = ("device", "out", "progress")
"""settings that may change between two fits into one folder"""


def write_platform_folder(
    df: pd.DataFrame,
    world: WorldConfig,
    world_seed: int,
    cfg: PlatformFitConfig,
    out: str | Path,
    settings: dict,
    logs: str,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[Path, dict]:
    """Fit the platform on the log ``df`` (of ``world`` / ``world_seed``, read from ``logs``) and write the folder
    ``out`` that ``learned-cascade:OUT`` serves: the models, ``report.json`` and ``report.md``. The folder is
    claimed for ``settings`` (``RunFolder``: a folder of other settings is refused). Returns (folder, report)."""
    with RunFolder(out, PLATFORM_ENTRY, settings, PLATFORM_RESUME_IGNORES) as folder:
        platform, report = fit_platform(df, world, world_seed, cfg, device, progress)
        report = {"logs": logs, "world_seed": world_seed, "config": dataclasses.asdict(cfg), **report}
        save_platform(platform, folder.path)
        write_json(folder.path / "report.json", report)
        atomic_write_bytes(folder.path / "report.md", report_markdown(report).encode())
    return folder.path, report
