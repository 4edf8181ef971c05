"""Retrieval, the first stage of the learned cascade: a two-tower model trained on logged clicks.

A production retrieval stage cannot afford the ranker on every ad, so it embeds the request and every ad
separately and keeps the top R ads by dot product (an ANN index in production; here an exact top-k over the
whole catalog in row chunks). It learns only from what the platform logged: which ad a request clicked. It
sees the platform view alone (``gpr_sim.platform.view``): the request's profile features, the interest
profile estimated from the observable history (``estimate_interest``) and the context; the ad's content
embedding, id, advertiser, industry, bid and age. Its objective (find the clicked ad among all ads) is not
the ranker's (expected value), which is the misalignment a multi-stage system lives with.

    model, report = fit_retrieval(catalog, requests, clicked, RetrievalConfig())
    ads, scores = model.retrieve(catalog, requests, r=100, eligible=env.eligible_ads())  # (N, R) each

Loss: softmax cross-entropy of the clicked ad against ``num_negatives`` ads drawn uniformly from the
catalog (shared by the batch; an accidental hit of the positive is masked). Uniform negatives make the
sampled softmax a consistent estimate of the full softmax over the catalog (no popularity correction is
needed, unlike in-batch negatives); with ``num_negatives >= num_ads`` it is the full softmax.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpr_sim.platform.training import train_epochs
from gpr_sim.platform.view import Catalog, estimate_interest
from gpr_sim.tokenizer.rq_kmeans import check_int
from gpr_sim.world.config import check_range

REQUEST_KEYS = ("user", "organic", "context", "ad_history", "ad_events")
"""observation keys the request tower reads (``gpr_sim.world.core.observe``)"""


@dataclass(frozen=True)
class RetrievalConfig:
    """Sizes and training of the two-tower model, fixed a priori (not tuned on the evaluation).

    The sizes follow the data, not a search: a small-preset log of ~25k requests holds ~1k clicks, so the
    towers stay small (two layers of ``hidden``) and the id embeddings are hashed into a fixed number of
    buckets (collisions are harmless at 500 ads and bound memory at 1M).
    """

    dim: int = 32
    """output embedding size of both towers (the dot product's dimension; an ANN index's vector size)"""
    hidden: int = 128
    """hidden width of each tower's two-layer MLP"""
    ad_id_buckets: int = 4096
    """hash buckets of the ad-id embedding (ad id modulo buckets): memorises ads seen clicked often"""
    advertiser_buckets: int = 1024
    """hash buckets of the advertiser embedding"""
    industry_buckets: int = 64
    """hash buckets of the industry embedding (the small preset has 8 industries)"""
    num_negatives: int = 1024
    """uniform catalog negatives per batch (>= num_ads: the full softmax)"""
    epochs: int = 30
    """passes over the logged clicks (few clicks: many cheap passes)"""
    batch_size: int = 256
    """clicks per optimiser step"""
    lr: float = 3e-3
    """Adam learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay (keeps rarely clicked ads' id embeddings near zero)"""
    retrieval_size: int = 100
    """R, the ads retrieval keeps per request (the default of the serving policy and of recall@R)"""
    chunk_size: int = 1024
    """requests scored against the whole catalog at once (bounds memory at chunk x num_ads)"""
    seed: int = 0
    """seed of the initialisation, the batch order and the negatives"""

    def __post_init__(self) -> None:
        for name, lo, hi in (
            ("dim", 1, 4096),
            ("hidden", 1, 1 << 16),
            ("ad_id_buckets", 1, 1 << 24),
            ("advertiser_buckets", 1, 1 << 24),
            ("industry_buckets", 1, 1 << 20),
            ("num_negatives", 1, 1 << 24),
            ("epochs", 1, 1 << 20),
            ("batch_size", 1, 1 << 24),
            ("retrieval_size", 1, 1 << 20),
            ("chunk_size", 1, 1 << 24),
        ):
            check_int(name, getattr(self, name), lo, hi)
        check_range("lr", self.lr, 0.0, 10.0, lo_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, 10.0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} is invalid: expected an integer")


def request_features(catalog: Catalog, request: dict[str, Tensor]) -> Tensor:
    """(N, 7 + D + 8) request-tower input: profile features, estimated interest, context (platform view only)."""
    interest = estimate_interest(catalog, request["organic"], request["ad_history"], request["ad_events"])
    return torch.cat([request["user"].float(), interest.float(), request["context"].float()], dim=1)


def ad_numeric(catalog: Catalog) -> Tensor:
    """(num_ads, 3) cheap numeric ad features: log bid, new flag, log(1 + age in days)."""
    return torch.stack(
        [
            torch.log(catalog.ad_bid.float().clamp(min=1e-6)),
            catalog.ad_is_new.float(),
            torch.log1p(catalog.ad_age_days.float().clamp(min=0)),
        ],
        dim=1,
    )


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class TwoTower(nn.Module):
    """Request tower and ad tower; a request's score for an ad is the dot product of their outputs.

    Numeric inputs are standardised with statistics of the fitting data kept as buffers (saved with the
    weights), so a loaded model scores exactly as the fitted one.
    """

    def __init__(self, config: RetrievalConfig, emb_dim: int, request_dim: int):
        super().__init__()
        self.config, self.emb_dim, self.request_dim = config, emb_dim, request_dim
        c = config
        self.request_tower = _mlp(request_dim, c.hidden, c.dim)
        self.ad_tower = _mlp(emb_dim + 3, c.hidden, c.dim)
        self.ad_id = nn.Embedding(c.ad_id_buckets, c.dim)
        self.advertiser = nn.Embedding(c.advertiser_buckets, c.dim)
        self.industry = nn.Embedding(c.industry_buckets, c.dim)
        for emb in (self.ad_id, self.advertiser, self.industry):
            nn.init.normal_(emb.weight, std=0.01)  # start from content: ids add what content misses
        self.register_buffer("request_mean", torch.zeros(request_dim))
        self.register_buffer("request_std", torch.ones(request_dim))
        self.register_buffer("ad_mean", torch.zeros(3))
        self.register_buffer("ad_std", torch.ones(3))

    def set_normalisation(self, request_x: Tensor, ad_x: Tensor) -> None:
        """Standardise inputs with the fitting data's mean and std (std floored so constants stay 0)."""
        self.request_mean.copy_(request_x.mean(0))
        self.request_std.copy_(request_x.std(0).clamp(min=1e-3))
        self.ad_mean.copy_(ad_x.mean(0))
        self.ad_std.copy_(ad_x.std(0).clamp(min=1e-3))

    def encode_requests(self, x: Tensor) -> Tensor:
        """(N, request_dim) features -> (N, dim)."""
        return self.request_tower((x - self.request_mean) / self.request_std)

    def encode_ads(self, catalog: Catalog, ads: Tensor | None = None) -> Tensor:
        """(M, dim) ad vectors of ``ads`` (M,) (every ad when None)."""
        if ads is None:
            ads = torch.arange(catalog.num_ads, device=catalog.device)
        c = self.config
        x = torch.cat(
            [catalog.ad_emb[ads].float(), (ad_numeric(catalog)[ads] - self.ad_mean) / self.ad_std], 1
        )
        adv = catalog.ad_advertiser[ads]
        ind = catalog.advertiser_industry[adv]
        return (
            self.ad_tower(x)
            + self.ad_id(ads % c.ad_id_buckets)
            + self.advertiser(adv % c.advertiser_buckets)
            + self.industry(ind % c.industry_buckets)
        )

    @torch.no_grad()
    def scores(self, catalog: Catalog, request: dict[str, Tensor], ads: Tensor) -> Tensor:
        """(N, K) retrieval scores of ads (N, K) for the N requests (the dot products retrieval ranks by)."""
        q = self.encode_requests(request_features(catalog, request))  # (N, dim)
        v = self.encode_ads(catalog, ads.reshape(-1)).view(*ads.shape, -1)  # (N, K, dim)
        return torch.einsum("nd,nkd->nk", q, v)

    @torch.no_grad()
    def retrieve(
        self, catalog: Catalog, request: dict[str, Tensor], r: int, eligible: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The top ``r`` ads of each request by dot product over the whole catalog, best first.

        Scored in row chunks of ``config.chunk_size`` requests (memory chunk x num_ads); ineligible ads
        (``eligible`` (num_ads,) bool) score -inf, so they come last and only where fewer than ``r`` are
        eligible.

        Returns:
            (ads, scores): (N, r') int64 and float, r' = min(r, num_ads).
        """
        q = self.encode_requests(request_features(catalog, request))  # (N, dim)
        v = self.encode_ads(catalog)  # (num_ads, dim)
        r = min(r, catalog.num_ads)
        n = q.shape[0]
        ads = torch.empty(n, r, dtype=torch.int64, device=q.device)
        top = torch.empty(n, r, dtype=q.dtype, device=q.device)
        for start in range(0, n, self.config.chunk_size):  # chunks of requests, not single users
            sl = slice(start, min(n, start + self.config.chunk_size))
            sim = q[sl] @ v.T  # (chunk, num_ads)
            if eligible is not None:
                sim = sim.masked_fill(~eligible[None], float("-inf"))
            top[sl], ads[sl] = sim.topk(r, dim=1)
        return ads, top


def sampled_softmax_loss(
    model: TwoTower, catalog: Catalog, x: Tensor, clicked: Tensor, num_negatives: int, g: torch.Generator
) -> Tensor:
    """Mean cross-entropy of each clicked ad (B,) against uniform catalog negatives (module doc)."""
    q = model.encode_requests(x)  # (B, dim)
    if num_negatives >= catalog.num_ads:  # the full softmax over the catalog
        return F.cross_entropy(q @ model.encode_ads(catalog).T, clicked)
    neg = torch.randint(0, catalog.num_ads, (num_negatives,), generator=g, device=g.device)
    if neg.device.type == "cpu" and x.device.type == "cuda":
        # a pageable host tensor's copy waits for the GPU to drain, every batch; a pinned one is queued behind it,
        # so the host prepares the next batch meanwhile (the same draws: the generator is untouched)
        neg = neg.pin_memory().to(x.device, non_blocking=True)
    else:
        neg = neg.to(x.device)
    pos = (q * model.encode_ads(catalog, clicked)).sum(1, keepdim=True)  # (B, 1)
    logits = (q @ model.encode_ads(catalog, neg).T).masked_fill(neg[None] == clicked[:, None], float("-inf"))
    logits = torch.cat([pos, logits], dim=1)  # the positive is class 0
    return F.cross_entropy(logits, torch.zeros_like(clicked))


def fit_retrieval(
    catalog: Catalog,
    requests: dict[str, Tensor],
    clicked: Tensor,
    config: RetrievalConfig,
    device: str | torch.device = "cpu",
) -> tuple[TwoTower, dict]:
    """Train the two towers on logged clicks: request i clicked ad ``clicked[i]``.

    Args:
        catalog: the platform's catalog (on any device; moved to ``device``).
        requests: the clicking requests' observations (``REQUEST_KEYS``), (N, ...) each.
        clicked: (N,) int64 the ad each request clicked.
        config: sizes and training.
        device: where to train.

    Returns:
        (model, report): the model in eval mode, and ``{"clicks": N, "loss_first": ..., "loss_last": ...}``
        (mean loss of the first and last epoch).

    Raises:
        ValueError: no clicks, or clicked ids outside the catalog.
    """
    n = clicked.shape[0]
    if n == 0:
        raise ValueError("no clicked requests to fit retrieval on: collect a longer log")
    if bool(((clicked < 0) | (clicked >= catalog.num_ads)).any()):
        raise ValueError(f"clicked ad ids must lie in [0, {catalog.num_ads})")
    catalog = catalog.to(device)
    x = request_features(catalog, {k: requests[k].to(device) for k in REQUEST_KEYS})
    clicked = clicked.to(device)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, the global RNG left as it was
        torch.manual_seed(config.seed)
        model = TwoTower(config, catalog.emb_dim, x.shape[1]).to(device)
    model.set_normalisation(x, ad_numeric(catalog))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    g = torch.Generator(device="cpu").manual_seed(config.seed)
    losses = train_epochs(
        model,
        opt,
        n,
        config.batch_size,
        config.epochs,
        g,
        lambda idx: sampled_softmax_loss(model, catalog, x[idx], clicked[idx], config.num_negatives, g),
        "retrieval",
    )
    return model, {
        "clicks": n,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_uniform": math.log(catalog.num_ads),
    }


@torch.no_grad()
def recall_at(
    model: TwoTower, catalog: Catalog, requests: dict[str, Tensor], clicked: Tensor, r: int
) -> float:
    """Share of requests whose clicked ad is among their top ``r`` retrieved ads (whole catalog, no eligibility)."""
    if clicked.shape[0] == 0:
        return float("nan")
    ads, _ = model.retrieve(catalog, requests, r)
    return float((ads == clicked[:, None].to(ads.device)).any(1).float().mean())


FORMAT = "gpr_sim.retrieval"
VERSION = 1


def retrieval_payload(model: TwoTower) -> dict:
    """What ``save_torch`` stores of a model: its config, input size and weights (CPU)."""
    return {
        "config": asdict(model.config),
        "emb_dim": model.emb_dim,
        "request_dim": model.request_dim,
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
    }


def retrieval_from_payload(payload: dict, device: str | torch.device = "cpu") -> TwoTower:
    """The model of a ``retrieval_payload`` (read with ``gpr_sim.runs.load_torch``), in eval mode."""
    model = TwoTower(RetrievalConfig(**payload["config"]), payload["emb_dim"], payload["request_dim"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval()


__all__ = [
    "FORMAT",
    "REQUEST_KEYS",
    "VERSION",
    "RetrievalConfig",
    "TwoTower",
    "ad_numeric",
    "fit_retrieval",
    "recall_at",
    "request_features",
    "retrieval_from_payload",
    "retrieval_payload",
    "sampled_softmax_loss",
]
