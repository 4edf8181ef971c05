"""Pre-ranking, the second stage of the learned cascade: a tiny model distilled from the ranker's eCPM.

Between retrieval (R ads, cheap dot products) and the ranker (the learned funnel, costly per ad) a production
system scores the retrieved set with a light model and keeps the top P. Here it is a two-layer MLP over five
cheap features of a (request, ad) pair, trained to reproduce the ranker's log eCPM,
``log(bid x pCTR x pCVR)`` of the learned funnel, on the retrieved sets of logged requests. Only the order
within a request matters to it, so the loss is the squared error of the per-request centred scores (a
constant per request, e.g. the 1000 of eCPM or the user's base rate, is not learned). Its own objective,
its own capacity: what it drops is lost to the ranker (error propagation).

| feature | why it is cheap |
|---|---|
| retrieval score | computed by retrieval already |
| cosine(estimated interest, ad content) | one dot product of two stored vectors |
| log bid | an account setting |
| new-ad flag, log(1 + age in days) | catalog fields |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from gpr_sim.platform.training import train_epochs
from gpr_sim.platform.view import Catalog, estimate_interest
from gpr_sim.tokenizer.rq_kmeans import check_int
from gpr_sim.world.config import check_range

NUM_FEATURES = 5
"""features per (request, ad) pair (module table)"""


@dataclass(frozen=True)
class PrerankingConfig:
    """Size and training of the pre-ranker, fixed a priori.

    Five features and one hidden layer of 16: a production pre-ranker is chosen for its serving cost (it
    scores R ads per request, the ranker only P), so it is deliberately far smaller than the ranker.
    """

    hidden: int = 16
    """hidden width of the two-layer MLP"""
    epochs: int = 10
    """passes over the logged requests' retrieved sets"""
    batch_size: int = 256
    """requests (each with its R retrieved ads) per optimiser step"""
    lr: float = 1e-2
    """Adam learning rate"""
    preranking_size: int = 20
    """P, the ads pre-ranking keeps per request (the default of the serving policy)"""
    seed: int = 0
    """seed of the initialisation and the batch order"""

    def __post_init__(self) -> None:
        for name, lo, hi in (
            ("hidden", 1, 1 << 16),
            ("epochs", 1, 1 << 20),
            ("batch_size", 1, 1 << 24),
            ("preranking_size", 1, 1 << 20),
        ):
            check_int(name, getattr(self, name), lo, hi)
        check_range("lr", self.lr, 0.0, 10.0, lo_open=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} is invalid: expected an integer")


def preranking_features(
    catalog: Catalog, request: dict[str, Tensor], ads: Tensor, retrieval_scores: Tensor
) -> Tensor:
    """(N, R, NUM_FEATURES) features of the retrieved ads (N, R) of N requests (module table).

    Args:
        catalog: the platform's catalog.
        request: the observations (``organic``, ``ad_history``, ``ad_events`` are read).
        ads: (N, R) int64 retrieved ads.
        retrieval_scores: (N, R) their retrieval scores.
    """
    interest = estimate_interest(catalog, request["organic"], request["ad_history"], request["ad_events"])
    cosine = torch.einsum("nd,nrd->nr", interest.float(), catalog.ad_emb[ads].float())
    return torch.stack(
        [
            retrieval_scores.float(),
            cosine,
            torch.log(catalog.ad_bid[ads].float().clamp(min=1e-6)),
            catalog.ad_is_new[ads].float(),
            torch.log1p(catalog.ad_age_days[ads].float().clamp(min=0)),
        ],
        dim=-1,
    )


class PreRanker(nn.Module):
    """A two-layer MLP from (N, R, NUM_FEATURES) to (N, R) scores; inputs standardised by fitted buffers."""

    def __init__(self, config: PrerankingConfig):
        super().__init__()
        self.config = config
        self.net = nn.Sequential(
            nn.Linear(NUM_FEATURES, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1)
        )
        self.register_buffer("mean", torch.zeros(NUM_FEATURES))
        self.register_buffer("std", torch.ones(NUM_FEATURES))

    def set_normalisation(self, features: Tensor) -> None:
        flat = features.reshape(-1, NUM_FEATURES)
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0).clamp(min=1e-3))

    def forward(self, features: Tensor) -> Tensor:
        return self.net((features - self.mean) / self.std).squeeze(-1)

    @torch.no_grad()
    def keep(self, ads: Tensor, features: Tensor, p: int, eligible: Tensor | None = None) -> Tensor:
        """(N, p') the top ``p`` of the retrieved ``ads`` (N, R) by pre-ranking score, p' = min(p, R).

        Ineligible ads (``eligible`` (num_ads,) bool) score -inf, so they are kept only where fewer than
        ``p`` retrieved ads are eligible.
        """
        score = self(features)
        if eligible is not None:
            score = score.masked_fill(~eligible[ads], float("-inf"))
        return ads.gather(1, score.topk(min(p, ads.shape[1]), dim=1).indices)


def centred_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of per-request centred scores (N, R): only the order within a request is learned."""
    d = (pred - pred.mean(1, keepdim=True)) - (target - target.mean(1, keepdim=True))
    return (d * d).mean()


def fit_preranking(
    features: Tensor, teacher: Tensor, config: PrerankingConfig, device: str | torch.device = "cpu"
) -> tuple[PreRanker, dict]:
    """Distil the ranker's log eCPM ``teacher`` (N, R) on the retrieved sets' ``features`` (N, R, F).

    Returns:
        (model, report): the model in eval mode and ``{"requests", "loss_first", "loss_last"}`` (the mean
        ``centred_mse`` of the first and last epoch).

    Raises:
        ValueError: mismatched shapes, no requests, or a non-finite teacher score.
    """
    if features.dim() != 3 or features.shape[:2] != teacher.shape or features.shape[2] != NUM_FEATURES:
        raise ValueError(
            f"features {tuple(features.shape)} and teacher {tuple(teacher.shape)} must be (N, R, {NUM_FEATURES}) and (N, R)"
        )
    n = teacher.shape[0]
    if n == 0:
        raise ValueError("no requests to fit pre-ranking on")
    if not bool(torch.isfinite(teacher).all()):
        raise ValueError("the teacher's log eCPM holds non-finite values")
    features, teacher = features.to(device).float(), teacher.to(device).float()
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, the global RNG left as it was
        torch.manual_seed(config.seed)
        model = PreRanker(config).to(device)
    model.set_normalisation(features)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    g = torch.Generator(device="cpu").manual_seed(config.seed)
    losses = train_epochs(
        model,
        opt,
        n,
        config.batch_size,
        config.epochs,
        g,
        lambda idx: centred_mse(model(features[idx]), teacher[idx]),
        "pre-ranking",
    )
    return model, {"requests": n, "loss_first": losses[0], "loss_last": losses[-1]}


FORMAT = "gpr_sim.preranking"
VERSION = 1


def preranking_payload(model: PreRanker) -> dict:
    """What ``save_torch`` stores of a model: its config and weights (CPU)."""
    return {"config": asdict(model.config), "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}


def preranking_from_payload(payload: dict, device: str | torch.device = "cpu") -> PreRanker:
    """The model of a ``preranking_payload`` (read with ``gpr_sim.runs.load_torch``), in eval mode."""
    model = PreRanker(PrerankingConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval()


__all__ = [
    "FORMAT",
    "NUM_FEATURES",
    "VERSION",
    "PreRanker",
    "PrerankingConfig",
    "centred_mse",
    "fit_preranking",
    "preranking_features",
    "preranking_from_payload",
    "preranking_payload",
]
