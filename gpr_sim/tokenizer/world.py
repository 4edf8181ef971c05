"""The semantic IDs of one simulated world: a tokenizer fitted on its organic items and ads together.

    tok = fit_world_tokenizer(world, "rq-kmeans-plus", CompareConfig(), seed=0)
    tok.table            # SemanticIdTable over [organic; ads]: global id i < num_organic is organic item i
    tok.trie             # PrefixTrie over the ads' paths only: what a policy may decode
    tok.ads_of(paths)    # (..., L+1) paths -> (...) ad index, -1 where the path is unknown or organic
    tok.save("runs/tokenizer"); WorldTokenizer.load("runs/tokenizer")

Organic content and ads share one embedding space in the world (``World.organic_emb``, ``ad_emb``),
so one quantiser serves both (GPR §2) and an organic item and an ad can share the first levels of a
path; the disambiguation digit of ``SemanticIdTable`` keeps every full path unique.

A saved tokenizer is a folder (usually the run folder that fitted it):

| file | content |
|---|---|
| ``semantic_ids.pt`` | codes (N, L) of [organic; ads], K, num_organic, method, world fingerprint |
| ``quantizer.pt`` | the fitted quantiser (``load_quantizer``): encodes items the world did not have |

The table is rebuilt from the stored codes, never by encoding again, so a loaded tokenizer gives
bit-identical paths on every device. The world fingerprint (a hash of the embeddings) lets an env
refuse a tokenizer fitted on another world, which would otherwise map ads to meaningless paths.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from gpr_sim.runs import SAFE_LOAD_ERRORS, safe_load_error
from gpr_sim.tokenizer.compare import CompareConfig
from gpr_sim.tokenizer.ids import SemanticIdTable
from gpr_sim.tokenizer.metrics import quantizer_metrics
from gpr_sim.tokenizer.rq_kmeans import Quantizer, check_choice, fit_rq_kmeans
from gpr_sim.tokenizer.rq_vae import fit_rq_vae, load_quantizer
from gpr_sim.tokenizer.trie import PrefixTrie
from gpr_sim.world.catalog import World

METHODS = {"rq-vae": "RQ-VAE", "rq-kmeans": "RQ-Kmeans", "rq-kmeans-plus": "RQ-Kmeans+"}
"""CLI name -> display name (the row labels of ``gpr_sim.tokenizer.compare``)"""

PAPER_TABLE1 = pd.DataFrame(
    {
        "collision_rate": [0.2321, 0.2140, 0.2060],
        "cur_l1": [0.9213, 1.0, 0.9936],
        "pas": [0.985, 0.986, 0.992],
    },
    index=pd.Index(list(METHODS.values()), name="method"),
)
"""GPR Table 1 (production items, not ours): what the simulated analogue is read against"""

IDS_FILE = "semantic_ids.pt"
QUANTIZER_FILE = "quantizer.pt"
FILE_FORMAT = "gpr_sim.tokenizer.world"
FILE_VERSION = 1


def world_embeddings(world: World) -> Tensor:
    """(num_organic + num_ads, D) float32 embeddings in global item order [organic; ads]."""
    return torch.cat([world.organic_emb, world.ad_emb]).float()


def world_fingerprint(world: World) -> str:
    """Hash of the world's item embeddings (16 hex digits): equal worlds, equal fingerprints.

    Worlds are generated on the CPU and then moved, so the bytes (and the hash) match on every device.
    """
    data = world_embeddings(world).cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


class WorldTokenizer:
    """Semantic IDs of a world's items plus the ad-only prefix trie, with ad <-> path lookups.

    Args:
        table: the item <-> path table over [organic; ads] (it must hold at least one ad).
        quantizer: the fitted quantiser, or None when only the table is known.
        method: key of ``METHODS`` that fitted it, or None.
        fingerprint: ``world_fingerprint`` of the world it was fitted on, or None (then only the item
            counts are checked against a world).
        fit_seconds: wall time of the quantiser fit (NaN when unknown, e.g. after ``load``).
    """

    def __init__(
        self,
        table: SemanticIdTable,
        quantizer: Quantizer | None = None,
        method: str | None = None,
        fingerprint: str | None = None,
        fit_seconds: float = math.nan,
        trie: PrefixTrie | None = None,
    ) -> None:
        if table.num_ads == 0:
            raise ValueError("the SemanticIdTable holds no ads: nothing to decode (check num_organic)")
        if method is not None:
            check_choice("method", method, tuple(METHODS))
        self.table = table
        self.quantizer = quantizer
        self.method = method
        self.fingerprint = fingerprint
        self.fit_seconds = fit_seconds
        # ads only: a decoded path must name an ad, so organic paths are not in the trie at all
        self.trie = trie if trie is not None else PrefixTrie(table.ad_paths, table.level_sizes)

    # ------------------------------------------------------------------------------------------
    @property
    def num_organic(self) -> int:
        return self.table.num_organic

    @property
    def num_ads(self) -> int:
        return self.table.num_ads

    @property
    def path_len(self) -> int:
        """L' = L + 1 digits per path (the last one disambiguates collisions)."""
        return self.table.path_len

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Codes per level, ``(K,) * L + (K_dis,)``: the nvec of a semantic action."""
        return self.table.level_sizes

    @property
    def device(self) -> torch.device:
        return self.table.item_to_path.device

    def to(self, device: str | torch.device) -> WorldTokenizer:
        """A copy on ``device`` (self is left where it is; tensors already there are shared)."""
        table = copy.copy(self.table).to(device)  # .to reassigns attributes: the copy moves, self stays
        trie = copy.copy(self.trie).to(device)
        quantizer = self.quantizer
        if quantizer is not None:
            quantizer = copy.deepcopy(quantizer).to(device)
        return WorldTokenizer(table, quantizer, self.method, self.fingerprint, self.fit_seconds, trie)

    def check_world(self, world: World) -> None:
        """Raise ``ValueError`` unless this tokenizer was fitted on ``world`` (item counts, fingerprint)."""
        cfg = world.config
        if (self.num_organic, self.num_ads) != (cfg.num_organic, cfg.num_ads):
            raise ValueError(
                f"tokenizer has {self.num_organic} organic items and {self.num_ads} ads, the world has "
                f"num_organic={cfg.num_organic} and num_ads={cfg.num_ads}: fit it on this world"
            )
        if self.fingerprint is not None and self.fingerprint != world_fingerprint(world):
            raise ValueError(
                f"tokenizer was fitted on another world (fingerprint {self.fingerprint}, this world "
                f"{world_fingerprint(world)}): same preset but a different world_seed or config?"
            )

    # ------------------------------------------------------------------------------------------
    def ads_of(self, paths: Tensor) -> Tensor:
        """Ad index of each full path.

        Args:
            paths: (..., L') int64 paths, any digits (out-of-range digits are just unknown paths).

        Returns:
            (...) int64 ad index, -1 where no item has the path or the item is organic.
        """
        lead = paths.shape[:-1]
        item = self.table.path_to_item(paths.reshape(math.prod(lead), self.path_len))  # (B,)
        ad = torch.where(item >= self.num_organic, item - self.num_organic, -1)
        return ad.view(lead)

    def paths_of_ads(self, ads: Tensor) -> Tensor:
        """(...) int64 ad indices in [0, num_ads) -> (..., L') int64 paths."""
        return self.table.ad_paths[ads]

    def prefix_mask(self, prefixes: Tensor, eligible: Tensor | None = None) -> Tensor:
        """Legal next codes after each prefix, over ads only.

        Args:
            prefixes: (..., l) int64 prefixes, 0 <= l < L'.
            eligible: optional (num_ads,) bool: only ads marked True count (e.g. budget left).

        Returns:
            (..., K_l) bool: code c is legal after a prefix iff some (eligible) ad's path extends it by c.
        """
        lead, length = prefixes.shape[:-1], prefixes.shape[-1]
        flat = prefixes.reshape(math.prod(lead), length).to(device=self.trie.device, dtype=torch.int64)
        mask = self.trie.prefix_mask(flat, eligible)  # (B, K_l)
        return mask.view(*lead, mask.shape[-1])

    # ------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``semantic_ids.pt`` (and ``quantizer.pt`` if known) into ``folder``, atomically each.

        Returns:
            The folder, which ``load`` and ``gymnasium.make("ads-v0", tokenizer=...)`` accept.
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "method": self.method,
            "codes": self.table.item_to_path[:, : self.table.num_levels].cpu(),  # (N, L) quantiser digits
            "codebook_size": self.table.codebook_size,
            "num_organic": self.num_organic,
            "fingerprint": self.fingerprint,
        }
        tmp = out / (IDS_FILE + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, out / IDS_FILE)
        if self.quantizer is not None:
            self.quantizer.save(out / QUANTIZER_FILE)
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> WorldTokenizer:
        """Read a folder written by ``save`` (or the ``semantic_ids.pt`` file in it)."""
        path = Path(folder)
        if path.is_dir():
            path = path / IDS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{os.fspath(path)}: no tokenizer here (expected a folder with {IDS_FILE})"
            )
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except SAFE_LOAD_ERRORS as e:
            raise ValueError(
                f"{os.fspath(path)}: not a readable tokenizer file ({safe_load_error(e)})"
            ) from None
        if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
            raise ValueError(f"{os.fspath(path)}: not a gpr_sim world tokenizer file (missing format header)")
        if payload.get("version") != FILE_VERSION:
            raise ValueError(
                f"{os.fspath(path)}: file version {payload.get('version')}, this code reads {FILE_VERSION}"
            )
        table = SemanticIdTable(payload["codes"], payload["codebook_size"], payload["num_organic"])
        qpath = path.with_name(QUANTIZER_FILE)
        quantizer = load_quantizer(qpath) if qpath.is_file() else None
        tok = cls(table, quantizer, payload["method"], payload["fingerprint"])
        return tok.to(map_location)


def as_world_tokenizer(obj: WorldTokenizer | SemanticIdTable | str | os.PathLike) -> WorldTokenizer:
    """Accept a ``WorldTokenizer``, a bare ``SemanticIdTable`` or a saved folder/file path."""
    if isinstance(obj, WorldTokenizer):
        return obj
    if isinstance(obj, SemanticIdTable):
        return WorldTokenizer(obj)
    if isinstance(obj, (str, os.PathLike)):
        return WorldTokenizer.load(obj)
    raise ValueError(
        f"tokenizer must be a WorldTokenizer, a SemanticIdTable or a path to a saved one, got {type(obj).__name__}"
    )


# ----------------------------------------------------------------------------------------------
# fitting and the Table-1 analogue


def _fit_quantizer(x: Tensor, method: str, cfg: CompareConfig, gen: torch.Generator) -> Quantizer:
    if method == "rq-kmeans":
        return fit_rq_kmeans(x, cfg.rq_kmeans(), gen)
    if method == "rq-vae":
        return fit_rq_vae(x, cfg.rq_vae(), gen)
    return fit_rq_vae(x, cfg.rq_kmeans_plus(), gen)


def fit_world_tokenizer(
    world: World, method: str = "rq-kmeans-plus", cfg: CompareConfig = CompareConfig(), seed: int = 0
) -> WorldTokenizer:
    """Fit one quantiser on the world's [organic; ads] embeddings and build its table and ad trie.

    Args:
        world: the world whose items get IDs (fitting runs on its device).
        method: ``rq-vae``, ``rq-kmeans`` or ``rq-kmeans-plus``.
        cfg: L, K and training settings shared by the three methods.
        seed: seed of the fit's own ``torch.Generator`` (as in ``compare_quantizers``, so the fits agree).

    Returns:
        The fitted ``WorldTokenizer`` on the world's device.
    """
    check_choice("method", method, tuple(METHODS))
    x = world_embeddings(world)  # (N, D)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    quantizer = _fit_quantizer(x, method, cfg, gen)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    seconds = time.perf_counter() - t0
    table = SemanticIdTable(
        quantizer.encode(x), quantizer.codebook_size, num_organic=world.config.num_organic
    )
    return WorldTokenizer(table, quantizer, method, world_fingerprint(world), seconds)


def fit_world_tokenizers(
    world: World,
    cfg: CompareConfig = CompareConfig(),
    seed: int = 0,
    methods: tuple[str, ...] = tuple(METHODS),
) -> dict[str, WorldTokenizer]:
    """``fit_world_tokenizer`` for each method, same settings and seed; keyed by method."""
    return {m: fit_world_tokenizer(world, m, cfg, seed) for m in methods}


def tokenizer_table(tokenizers: dict[str, WorldTokenizer], world: World) -> pd.DataFrame:
    """The Table-1 analogue of fitted world tokenizers, measured on the world's items.

    Columns are those of ``compare_quantizers`` (collision_rate, cur_l1 .. cur_lL, pas, recon_mse,
    fit_seconds) plus ``num_dis``, the size of the disambiguation level (the largest collision group),
    and ``ad_collision_rate``, the share of ads whose L-digit path is shared with another item.
    Rows are indexed by display name (RQ-VAE, RQ-Kmeans, RQ-Kmeans+), so ``compare.write_table`` takes it.
    """
    x = world_embeddings(world)
    rows = []
    for method, tok in tokenizers.items():
        if tok.quantizer is None:
            raise ValueError(f"tokenizer {method!r} has no quantizer: metrics need one")
        paths = tok.table.item_to_path  # (N, L+1)
        _, inverse, counts = torch.unique(paths[:, :-1], dim=0, return_inverse=True, return_counts=True)
        shared = counts[inverse] > 1  # (N,) item's L-digit path is held by another item too
        rows.append(
            {
                "method": METHODS[method],
                **quantizer_metrics(tok.quantizer, x),
                "fit_seconds": tok.fit_seconds,
                "num_dis": float(tok.table.num_dis),
                "ad_collision_rate": float(shared[tok.num_organic :].double().mean()),
            }
        )
    return pd.DataFrame(rows).set_index("method")


def with_paper(table: pd.DataFrame) -> pd.DataFrame:
    """Collision rate, CUR_L1 and PAS of ``tokenizer_table`` beside GPR Table 1, columns (metric, source)."""
    cols = list(PAPER_TABLE1.columns)
    both = pd.concat({"sim": table[cols], "paper": PAPER_TABLE1}, axis=1)  # columns (source, metric)
    return both.swaplevel(axis=1)[[(c, s) for c in cols for s in ("sim", "paper")]]


def code_usage(tok: WorldTokenizer) -> Tensor:
    """(L, K) int64: how many items (organic and ads) use each code of each quantiser level."""
    codes = tok.table.item_to_path[:, : tok.table.num_levels]  # (N, L)
    k = tok.table.codebook_size
    offsets = torch.arange(codes.shape[1], device=codes.device) * k  # level l's codes live at [l K, (l+1) K)
    return torch.bincount((codes + offsets).reshape(-1), minlength=codes.shape[1] * k).view(-1, k)


def plot_code_usage(tokenizers: dict[str, WorldTokenizer]):
    """One panel per level: items per code, codes sorted by use (a flat curve = even use, zeros = dead codes).

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    usage = {METHODS.get(m, m): code_usage(t).cpu() for m, t in tokenizers.items()}
    num_levels = next(iter(usage.values())).shape[0]
    fig, axes = plt.subplots(1, num_levels, figsize=(4.2 * num_levels, 3.4), squeeze=False)
    for level, ax in enumerate(axes[0]):
        for name, u in usage.items():
            counts = torch.sort(u[level], descending=True).values
            used = int((counts > 0).sum())
            ax.plot(
                range(1, counts.numel() + 1), counts.numpy(), label=f"{name} ({used}/{counts.numel()} used)"
            )
        ax.set_title(f"level {level + 1}")
        ax.set_xlabel("code rank")
        ax.set_yscale("symlog", linthresh=1.0)  # zero stays visible: dead codes sit on the x axis
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("items per code")
    fig.tight_layout()
    return fig


def tokenizer_summary(tok: WorldTokenizer) -> dict:
    """JSON-ready facts about a tokenizer: sizes, levels, method, fingerprint."""
    return {
        "method": tok.method,
        "num_organic": tok.num_organic,
        "num_ads": tok.num_ads,
        "num_levels": tok.table.num_levels,
        "codebook_size": tok.table.codebook_size,
        "num_dis": tok.table.num_dis,
        "level_sizes": list(tok.level_sizes),
        "fingerprint": tok.fingerprint,
    }


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Atomic JSON write: ``.tmp`` sibling, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)
