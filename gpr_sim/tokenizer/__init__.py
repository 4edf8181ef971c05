"""Semantic IDs (GPR §2): quantisers, their metrics, unique item <-> path tables and the prefix trie.

gen = torch.Generator().manual_seed(0)
q = fit_rq_vae(emb, rq_kmeans_plus_config(), gen)           # or fit_rq_kmeans / fit_rq_vae
table = SemanticIdTable.from_parts(q.encode(organic_emb), q.encode(ad_emb), q.codebook_size)
trie = PrefixTrie(table.ad_paths, table.level_sizes)          # decode ads only
"""

from gpr_sim.tokenizer.ids import AD, ORGANIC, SemanticIdTable
from gpr_sim.tokenizer.metrics import (
    codebook_utilization,
    collision_rate,
    group_paths,
    path_alignment_score,
    quantizer_metrics,
    reconstruction_mse,
)
from gpr_sim.tokenizer.rq_kmeans import (
    Quantizer,
    RQKmeans,
    RQKmeansConfig,
    fit_rq_kmeans,
    kmeans,
    nearest_code,
)
from gpr_sim.tokenizer.rq_vae import (
    RQVAE,
    RQVAEConfig,
    RQVAELosses,
    fit_rq_vae,
    load_quantizer,
    rq_kmeans_plus_config,
)
from gpr_sim.tokenizer.trie import PrefixTrie

__all__ = [
    "AD",
    "ORGANIC",
    "PrefixTrie",
    "Quantizer",
    "RQKmeans",
    "RQKmeansConfig",
    "RQVAE",
    "RQVAEConfig",
    "RQVAELosses",
    "SemanticIdTable",
    "codebook_utilization",
    "collision_rate",
    "fit_rq_kmeans",
    "fit_rq_vae",
    "group_paths",
    "kmeans",
    "load_quantizer",
    "nearest_code",
    "path_alignment_score",
    "quantizer_metrics",
    "reconstruction_mse",
    "rq_kmeans_plus_config",
]
