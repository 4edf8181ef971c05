"""GPRConfig: one frozen, validated dataclass for the whole HHD generator (HSD + PTD + HTE, GPR §3)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from gpr_sim.tokenizer.rq_kmeans import check_int

NUM_TYPES = 4
"""U, O, E, I (``gpr_sim.schema``)"""
NUM_EVENTS = 4
"""event ids: 0 none, 1 impression, 2 click, 3 conversion"""


LEGACY_DEFAULTS = {"platform_features": False, "hte_ad_features": 0, "market_features": False}
"""fields added after checkpoints were first written, with the value that reproduces those checkpoints
(``GPRConfig.from_dict`` fills them in when a stored config lacks them)"""

ZERO_INIT_WIDTHS = {"hte_ad_features": "hte.ad_proj."}
"""width fields whose parameters (the state-dict keys under the prefix) start at zero and then add nothing:
a model with the width on and those parameters at zero computes exactly what the model without it (0)
computes, so a checkpoint without the width loads into it (``added_zero_widths``)"""

ZERO_INIT_COLUMNS = {"market_features": "hsd.dense.weight"}
"""layout switches that append dense feature columns (``dense_dim`` grows) read by the weight named: with
the weight's new last columns at zero the model computes exactly what the model without them (False)
computes, so a checkpoint without the switch loads into it, its weight in the first columns"""


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid: expected a bool")


@dataclass(frozen=True)
class GPRConfig:
    """Sizes and component switches of the GPR generator. Every switch maps to one row of GPR Table 2."""

    level_sizes: tuple[int, ...] = (64, 64, 64)
    """K_l: codes per semantic-ID level (``SemanticIdTable.level_sizes``); L' = len(level_sizes)"""
    num_items: int = 0
    """global item ids (organic + ads) for an extra id embedding of O/I tokens; 0 = codes only"""
    d_model: int = 256
    """width of every token embedding"""
    n_layers: int = 4
    """HSTU blocks in the HSD"""
    n_heads: int = 4
    """attention heads (d_model must divide evenly)"""
    ffn_mult: int = 4
    """FFN hidden width = ffn_mult * d_model"""
    dense_dim: int = 15
    """F: dense feature columns of the tokens; must equal ``gpr_sim.schema.dense_dim(world_config,
    platform_features)`` for the world the model reads (ads-v0: 7 user + 8 context = 15 without platform
    features; 7 + emb_dim + 6 + 8 with them). Configs built for a world derive it from that function."""
    platform_features: bool = False
    """the token layout the model reads: True = U tokens carry the platform's interest estimate and I tokens
    their ad's features (``gpr_sim.platform.features``); False = the layout without them. False in a bare
    config and in checkpoints written before this field (``LEGACY_DEFAULTS``); new pre-training runs turn
    it on (``agents.pretraining.config.PretrainConfig.platform_features``)"""
    market_features: bool = False
    """the token layout the model reads: True = the E token also carries the platform's spend ledger at the
    request (``gpr_sim.platform.market``, F_m = 4 columns after the context); False = the layout without it.
    False in a bare config and in checkpoints written before this field (``LEGACY_DEFAULTS``); new
    pre-training runs turn it on (``agents.pretraining.config.PretrainConfig.market_features``)"""
    max_len: int = 512
    """largest position id + 1 (GPR DEFAULT: sequences <= 512)"""
    hybrid_attention: bool = True
    """GPR hybrid mask (prompt bidirectional, I causal); False = plain causal over slots"""
    token_aware_ln: bool = True
    """one LayerNorm per token type (U/O/E/I); False = one shared LayerNorm"""
    token_aware_ffn: bool = True
    """one FFN per token type; False = one shared FFN"""
    mixture_of_recursions: bool = False
    """the last HSD block is shared and applied up to ``max_recursions`` times per token (router)"""
    max_recursions: int = 2
    """most applications of the shared MoR block (used only with mixture_of_recursions)"""
    thinking: bool = True
    """K learnable query tokens distil the HSD outputs; False = the E token's output is the context"""
    num_thinking: int = 4
    """K thinking tokens"""
    refining: bool = True
    """diffusion-style denoiser adds a refine token conditioned on the pooled thinking tokens"""
    refine_steps: int = 4
    """denoising steps of the fixed noise schedule"""
    decoder_layers: int = 1
    """transformer blocks of the PTD level decoder"""
    hte: bool = True
    """value heads for every prefix (critic, beam pruning)"""
    mtp_heads: int = 4
    """N parallel MTP heads (GPR §4)"""
    hte_ad_features: int = 0
    """F_ad: width of the candidate-ad features the HTE's full-item value reads (``gpr_sim.model.hte``: the
    platform's per-ad features, ``gpr_sim.platform.features.AD_FEATURE_DIM`` = 6); 0 = off (a bare config
    and checkpoints written before this field, ``LEGACY_DEFAULTS``). New pre-training runs with platform
    features turn it on (``agents.pretraining.config.PretrainConfig.hte_ad_features``). Needs ``hte``."""

    def __post_init__(self) -> None:
        if not isinstance(self.level_sizes, tuple) or len(self.level_sizes) == 0:
            raise ValueError(
                f"level_sizes={self.level_sizes!r} is invalid: expected a non-empty tuple of ints"
            )
        for i, k in enumerate(self.level_sizes):
            check_int(f"level_sizes[{i}]", k, 1, 1 << 24)
        check_int("num_items", self.num_items, 0, 1 << 31)
        check_int("d_model", self.d_model, 1, 1 << 16)
        check_int("n_layers", self.n_layers, 1, 1024)
        check_int("n_heads", self.n_heads, 1, self.d_model)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} is invalid: it must divide d_model={self.d_model}")
        check_int("ffn_mult", self.ffn_mult, 1, 64)
        check_int("dense_dim", self.dense_dim, 1, 1 << 16)
        check_int("max_len", self.max_len, 1, 1 << 20)
        for name in (
            "hybrid_attention",
            "token_aware_ln",
            "token_aware_ffn",
            "mixture_of_recursions",
            "thinking",
            "refining",
            "hte",
            "platform_features",
            "market_features",
        ):
            _check_bool(name, getattr(self, name))
        check_int("max_recursions", self.max_recursions, 1, 64)
        check_int("num_thinking", self.num_thinking, 1, 1024)
        check_int("refine_steps", self.refine_steps, 1, 1000)
        check_int("decoder_layers", self.decoder_layers, 1, 64)
        check_int("mtp_heads", self.mtp_heads, 1, 64)
        check_int("hte_ad_features", self.hte_ad_features, 0, 1 << 16)
        if self.hte_ad_features and not self.hte:
            raise ValueError(f"hte_ad_features={self.hte_ad_features} is invalid with hte=False: expected 0")

    def to_dict(self) -> dict:
        """Every field as plain JSON / ``torch.load(weights_only=True)`` types (``level_sizes`` a list): what
        checkpoints store; `from_dict` reads it back."""
        d = dataclasses.asdict(self)
        d["level_sizes"] = list(self.level_sizes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "model config") -> GPRConfig:
        """The config a `to_dict` dict describes, validated.

        Args:
            d: every field of ``GPRConfig`` (``level_sizes`` a list or tuple), nothing else; a field of
                ``LEGACY_DEFAULTS`` may be missing (a checkpoint from before it) and takes that value.
            where: what holds ``d`` (e.g. ``"runs/x/policy.pt: model config"``), the start of every error.

        Raises:
            ValueError: ``where`` and the field: not a dict, a field missing or unknown, or a bad value.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a dict of GPRConfig fields, got {type(d).__name__}")
        d = {**LEGACY_DEFAULTS, **d}
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        unknown = sorted(str(k) for k in d if k not in names)
        if missing or unknown:
            parts = ([f"missing field(s) {missing}"] if missing else []) + (
                [f"unknown field(s) {unknown}"] if unknown else []
            )
            raise ValueError(f"{where}: {'; '.join(parts)}")
        kw = dict(d)
        if isinstance(kw["level_sizes"], list):
            kw["level_sizes"] = tuple(kw["level_sizes"])
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: field {e}") from e

    def added_zero_widths(self, stored: Mapping) -> list[str] | None:
        """The ``ZERO_INIT_WIDTHS`` fields this config turns on and a stored config (a checkpoint's, legacy
        fields filled by ``LEGACY_DEFAULTS``) leaves at 0, and the ``ZERO_INIT_COLUMNS`` switches it turns on
        that the stored one leaves off (with the ``dense_dim`` they widen), when they are all that differs
        ([] when nothing does); None when any other field differs."""
        want, got = self.to_dict(), {**LEGACY_DEFAULTS, **stored}
        if set(got) != set(want):
            return None
        diff = [k for k in want if got[k] != want[k]]
        added = [k for k in diff if k in ZERO_INIT_WIDTHS and got[k] == 0]
        added += [k for k in diff if k in ZERO_INIT_COLUMNS and got[k] is False]
        widened = any(k in ZERO_INIT_COLUMNS for k in added) and got["dense_dim"] < want["dense_dim"]
        return added if len(added) + widened == len(diff) else None

    @property
    def path_len(self) -> int:
        """L': semantic-ID levels."""
        return len(self.level_sizes)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads
