"""The GPR generator (GPR §3): HSD encoder, PTD decoder, HTE evaluator, composed in ``GPRModel``; the
KV-cached incremental step over it (``IncrementalDecoder``)."""

from gpr_sim.model.config import GPRConfig
from gpr_sim.model.gpr import GPRModel, MTPLoss
from gpr_sim.model.hsd import HSD, HSDOutput, KVCache, hybrid_mask
from gpr_sim.model.hte import HTE
from gpr_sim.model.incremental import IncrementalDecoder, IncrementalState, StepOutput
from gpr_sim.model.ptd import PTD, apply_legal_mask

__all__ = [
    "GPRConfig",
    "GPRModel",
    "MTPLoss",
    "HSD",
    "HSDOutput",
    "KVCache",
    "hybrid_mask",
    "HTE",
    "IncrementalDecoder",
    "IncrementalState",
    "StepOutput",
    "PTD",
    "apply_legal_mask",
]
