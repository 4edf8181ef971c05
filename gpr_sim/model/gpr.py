"""GPRModel: HSD + PTD + HTE (GPR §3) with the MTP pre-training loss (GPR §4).

Usage (shapes on the right)::

    model = GPRModel(GPRConfig(level_sizes=table.level_sizes))
    ctx = model.context(tokens)                                  # (B, Cc, C)
    logits = model.level_logits(ctx, prefix, trie.prefix_mask(prefix))   # (B, K_{l+1}), illegal = -inf
    v = model.values(ctx, path)                                  # (B, L' + 1)
    out = model.mtp_loss(tokens, targets, legal_masks=masks)     # out.loss.backward()
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from gpr_sim.model.config import GPRConfig
from gpr_sim.model.hsd import HSD, HSDOutput, KVCache, Segments
from gpr_sim.model.hte import HTE
from gpr_sim.model.ptd import PTD
from gpr_sim.schema import TokenBatch

REGIONS = ("blocks", "embed", "context", "paths", "values")
"""the parts ``GPRModel.compile_regions`` compiles, each one graph"""


def batch_dynamic(fn: Callable) -> Callable:
    """``fn`` (a ``torch.compile``'d function) called with the leading dimension of every tensor argument
    dynamic from the first call.

    The batch differs between the callers of one compiled region (the rollout's requests and its rehearsed
    ones, the update's last, shorter minibatch, the evaluation's sessions): left to torch.compile's automatic
    dynamic shapes, the first call compiles a graph for its size and the first other size compiles it again.
    A tensor outside autograd is passed as a fresh alias (``detach``: the same data, no copy): torch.compile
    guards on the base of a view (a chunk of the rollout's tokens), so the same call with a fresh tensor (the
    evaluation's) would compile once more, and the mark stays off the caller's tensor. A tensor that needs its
    gradient is passed as it is. A leading dimension of size 0 or 1 is still specialised (torch.compile's rule).
    """

    def mark(t: Tensor) -> Tensor:
        if not t.requires_grad:
            t = t.detach()
        if t.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return t

    @functools.wraps(fn)
    def call(*args, **kwargs):
        args, kwargs = tree_map_only(Tensor, mark, (args, kwargs))
        return fn(*args, **kwargs)

    return call


BATCH_DYNAMIC_INDUCTOR = {"triton.mix_order_reduction": False}
"""Inductor options of every batch-dynamic graph (``compile_batch_dynamic``). Inductor's mix-order reduction
(the fused backward of a norm's two reductions) chooses from the batch size whether to fuse, and each choice
becomes a guard on it (``nrow * ncol >= 5 * 2**20``, ``nrow >= 4096``: torch/_inductor/scheduler.py,
``MixOrderReduction.can_fuse``); a batch on the other side then compiles the graph again, so a dynamic batch
was not one graph on CUDA (7 compiles instead of 4 in one RL iteration at 8,192 sessions, more in a run whose
evaluation batches differ). Off, the same iteration compiles once per region and grad mode at the same
steady-state speed (H200, torch 2.11: 5,536 vs 5,566 requests/s; ``benchmarks/results/compile_cuda``,
``mix_order.sh``). It only acts on Triton (GPU) code: the CPU's graphs are unchanged."""


def compile_batch_dynamic(fn: Callable) -> Callable:
    """``torch.compile(fn)`` compiled once per grad mode whatever the batch: the leading dimension of every
    tensor argument dynamic (``batch_dynamic``) and no Inductor choice guarding on it
    (``BATCH_DYNAMIC_INDUCTOR``)."""
    return batch_dynamic(torch.compile(fn, options=dict(BATCH_DYNAMIC_INDUCTOR)))


class MTPLoss(NamedTuple):
    """Named loss terms; ``loss`` is what to backpropagate."""

    loss: Tensor  # () loss_mtp + loss_refine + value_coef * loss_value
    loss_mtp: Tensor  # () -sum_j w_j sum_l log P_j(z_l | ...), mean over requests
    loss_refine: Tensor  # () denoising MSE of the refiner (0 when refining is off)
    head_nll: Tensor  # (N,) mean over requests of -sum_l log P_j, per head (unweighted)
    loss_value: Tensor  # () HTE regression: mean over prefixes of head 0's target of (V - G)^2 (0 without G)


class GPRModel(nn.Module):
    def __init__(self, cfg: GPRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.hsd = HSD(cfg)
        self.ptd = PTD(cfg)
        self.hte = HTE(cfg) if cfg.hte else None
        # MTP: head j reads the shared context through its own small residual adapter (zero-init, so
        # every head starts as the single-head model)
        self.mtp_adapters = nn.ModuleList(nn.Linear(cfg.d_model, cfg.d_model) for _ in range(cfg.mtp_heads))
        for a in self.mtp_adapters:
            nn.init.zeros_(a.weight)
            nn.init.zeros_(a.bias)

    def critic_parameters(self) -> list[nn.Parameter]:
        """The HTE's parameters (none without it): the RL update's critic reads the trunk's context detached, so only
        the value losses train them; ``agents.rl.loop.UpdateConfig.clip`` = separate clips them apart from the
        policy's."""
        return [] if self.hte is None else list(self.hte.parameters())

    def compile_regions(self, regions: Sequence[str] = REGIONS, dynamic: bool | None = None) -> GPRModel:
        """Compile parts of the model in place with ``torch.compile`` (regional compilation); returns self.

        ``regions`` (``REGIONS``): ``blocks`` = every HSD ``HSTUBlock`` and PTD ``DecoderBlock`` (their
        ``forward``); ``embed`` = ``HSD.embed`` (code, event, type and position lookups, the dense
        projection: a dozen element-wise passes over (B, T, C) eager); ``context`` = ``PTD.context_from_noise``
        (thinking and refiner; ``PTD.context`` draws the noise outside it); ``paths`` = ``PTD.log_prob_cached``
        (the update's teacher-forced pass over K paths per request); ``values`` = ``HTE.forward_paths``. Each
        region is one graph (a method compiled on this instance: the state dict and the parameters are
        unchanged; the blocks of a kind share one compiled function), so it compiles in seconds where the
        whole update forward took minutes; every caller (rollout, update, evaluation) then runs the compiled
        code. Compiling a region twice is a no-op.

        ``dynamic``: torch.compile's; None (the default) makes the leading (batch) dimension of every tensor
        argument dynamic from the first call (``compile_batch_dynamic``), so a region compiles once per grad mode:
        the rollout's and the evaluation's forward (no grad) and the update's (forward and backward) are
        different programs, whatever their batch sizes.
        """
        unknown = sorted(set(regions) - set(REGIONS))
        if unknown:
            raise ValueError(f"regions {unknown} are unknown: expected some of {REGIONS}")
        done = self.__dict__.setdefault("_compiled_regions", set())
        methods = {
            "blocks": [(block, "forward") for block in (*self.hsd.blocks, *self.ptd.blocks)]
            + ([(self.hsd.shared, "forward")] if self.cfg.mixture_of_recursions else []),
            "embed": [(self.hsd, "embed")],
            "context": [(self.ptd, "context_from_noise")],
            "paths": [(self.ptd, "log_prob_cached")],
            "values": [] if self.hte is None else [(self.hte, "forward_paths")],  # no HTE: nothing to compile
        }
        compiled: dict[Callable, Callable] = {}  # one per function: the blocks of a kind share it
        for region in regions:
            if region in done:
                continue
            for owner, name in methods[region]:
                fn = getattr(type(owner), name)
                if fn not in compiled:
                    compiled[fn] = (
                        compile_batch_dynamic(fn) if dynamic is None else torch.compile(fn, dynamic=dynamic)
                    )
                # an instance attribute shadows the method (``nn.Module.__call__`` then runs the compiled
                # forward); the function is compiled unbound and the instance bound by a partial, so a
                # deepcopy of the model calls it on the copy (the memo maps the instance), never on this one
                owner.__dict__[name] = functools.partial(compiled[fn], owner)
            done.add(region)
        return self

    def encode(self, tokens: TokenBatch, cache: KVCache | None = None) -> HSDOutput:
        """HSD intent embeddings (B, T, C) and KV cache (see ``gpr_sim.model.hsd``)."""
        return self.hsd(tokens, cache)

    def context(
        self,
        tokens: TokenBatch,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        segments: Segments | None = None,
    ) -> Tensor:
        """TokenBatch -> PTD context (B, Cc, C): thinking tokens (+ the refine token).

        ``noise`` (B, C) fixes the refiner's starting noise (else drawn from ``generator``). ``segments``:
        ``type_segments(tokens.type_ids)`` when the caller has it (``HSD.forward``).
        """
        hidden = self.hsd(tokens, segments=segments).hidden  # (B, T, C)
        return self.ptd.context(hidden, tokens.padding_mask, generator, noise)

    def head_context(self, context: Tensor, head: int) -> Tensor:
        """Context as seen by MTP head ``head`` (head 0 is the one used for generation)."""
        return context + self.mtp_adapters[head](context)

    def level_logits(self, context: Tensor, prefix_codes: Tensor, legal_mask: Tensor | None = None) -> Tensor:
        """(B, Cc, C), (B, l) -> (B, K_{l+1}) logits of the next level; ``legal_mask`` sets illegal to -inf."""
        return self.ptd.level_logits(self.head_context(context, 0), prefix_codes, legal_mask)

    def log_prob(
        self, context: Tensor, codes: Tensor, legal_masks: Sequence[Tensor | None] | None = None
    ) -> Tensor:
        """(B, Cc, C), (B, L') -> (B, L') teacher-forced per-level log-probs (head 0)."""
        return self.ptd.log_prob(self.head_context(context, 0), codes, legal_masks)

    def values(self, context: Tensor, prefix_codes: Tensor, ad_features: Tensor | None = None) -> Tensor:
        """(B, Cc, C), (B, l) -> (B, l + 1) HTE predictions of final_value for every prefix.

        ``ad_features`` (B, F_ad): the platform features of the ad each full path names
        (``gpr_sim.model.hte.path_ad_features``), with ``GPRConfig.hte_ad_features``; None = zeros."""
        if self.hte is None:
            raise ValueError("values() needs the HTE: GPRConfig.hte is False")
        return self.hte(context, prefix_codes, ad_features)

    def path_values(self, context: Tensor, paths: Tensor, ad_features: Tensor | None = None) -> Tensor:
        """(B, Cc, C), (B, K, l) -> (B, K, l + 1) HTE values of every prefix of K paths per request
        (``values`` per path without repeating the context; ``HTE.forward_paths``); ``ad_features``
        (B, K, F_ad) as in ``values``."""
        if self.hte is None:
            raise ValueError("path_values() needs the HTE: GPRConfig.hte is False")
        return self.hte.forward_paths(context, paths, ad_features)

    def beam_fns(
        self,
        context: Tensor,
        cached: bool = False,
        ad_lookup: Callable[[Tensor], Tensor | None] | None = None,
    ) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]:
        """Callables for ``gpr_sim.decoding.beam_search`` over an encoded batch ``context`` (B, Cc, C).

        ``cached=True``: the context tokens go through the PTD decoder once per request here
        (``PTD.context_kv``) and each step decodes only the beams' generated tokens against those
        keys/values (``PTD.level_logits_cached``): the same logits up to rounding, fewer FLOPs.

        ``ad_lookup``: full paths (M, L') -> (M, F_ad) candidate features (``path_ad_features``), read by
        ``value_fn`` at the last level; None = none.

        Returns:
            ``step_fn(row (M,), prefix (M, l)) -> (M, K_{l+1})`` logits (the search applies the trie mask)
            and ``value_fn(row (M,), prefix (M, l)) -> (M,)`` HTE value of each prefix.
        """

        def value_fn(row: Tensor, prefix: Tensor) -> Tensor:
            full = ad_lookup is not None and prefix.shape[1] == self.cfg.path_len
            return self.values(context[row], prefix, ad_lookup(prefix) if full else None)[:, -1]

        if cached:
            kv = self.ptd.context_kv(self.head_context(context, 0))

            def step_cached(row: Tensor, prefix: Tensor) -> Tensor:
                return self.ptd.level_logits_cached(kv, row, prefix)

            return step_cached, value_fn

        def step_fn(row: Tensor, prefix: Tensor) -> Tensor:
            return self.level_logits(context[row], prefix)

        return step_fn, value_fn

    def mtp_loss(
        self,
        tokens: TokenBatch,
        target_codes: Tensor,
        weights: Tensor | None = None,
        legal_masks: Sequence[Tensor | None] | None = None,
        generator: torch.Generator | None = None,
        value_target: Tensor | None = None,
        value_coef: float = 1.0,
        value_trunk: bool = False,
        value_features: Tensor | None = None,
        segments: Segments | None = None,
    ) -> MTPLoss:
        """Multi-token prediction loss (GPR §4): N heads, each predicting a full L'-level path.

        Predicts from the request (one prediction per request, at the E token's context), not from
        every position t of the sequence.

        Args:
            tokens: TokenBatch of B requests.
            target_codes: (B, N, L') int64, head j's target path; a row of -1 = no target (ignored).
            weights: (N,) or (B, N) w_j (GPR: sum_j w_j = 1; VAFT passes value weights); None = 1/N.
            legal_masks: None, or L' masks (B, N, K_l) bool: softmax over legal codes only.
            generator: randomness of the refiner (sampling and denoising loss).
            value_target: optional (B,) final_value G of head 0's target item (NaN = none): the HTE values
                of every prefix of that path, z_<=0 .. z_<=L', regress on G (a Monte-Carlo target of each
                prefix's value under the logging policy).
            value_coef: weight of that term in ``loss``.
            value_trunk: let that term's gradient reach the shared context (HSD, thinking, refiner); False
                (default) trains the HTE on detached features, as HEPO's critic is (``agents.hepo``).
            value_features: optional (B, F_ad) platform features of head 0's target ad
                (``gpr_sim.model.hte.path_ad_features`` of ``target_codes[:, 0]``), read by the full-item
                value with ``GPRConfig.hte_ad_features``; None = zeros.
            segments: ``type_segments(tokens.type_ids)`` when the caller has it (``HSD.forward``).

        Returns:
            ``MTPLoss`` named terms.
        """
        b, n, lp = target_codes.shape
        if n != self.cfg.mtp_heads or lp != self.cfg.path_len:
            raise ValueError(
                f"target_codes must be (B, {self.cfg.mtp_heads}, {self.cfg.path_len}), got {tuple(target_codes.shape)}"
            )
        if weights is None:
            weights = target_codes.new_full((n,), 1.0 / n, dtype=torch.float32)
        weights = weights.expand(b, n)  # (B, N)
        hidden = self.hsd(tokens, segments=segments).hidden  # (B, T, C)
        ctx = self.ptd.context(hidden, tokens.padding_mask, generator)  # (B, Cc, C)
        valid = (target_codes >= 0).all(-1)  # (B, N)
        codes = target_codes.clamp_min(0).reshape(b * n, lp)
        ctx_heads = torch.stack([self.head_context(ctx, j) for j in range(n)], 1)  # (B, N, Cc, C)
        masks = None
        if legal_masks is not None:
            # rows without a target get an all-legal mask, so their (ignored) log-prob stays finite
            masks = [None if m is None else (m | ~valid[..., None]).reshape(b * n, -1) for m in legal_masks]
        logp = self.ptd.log_prob(ctx_heads.flatten(0, 1), codes, masks).view(b, n, lp)  # (B, N, L')
        nll = torch.where(valid, -logp.sum(-1), 0.0)  # (B, N)
        loss_mtp = (weights * nll).sum(1).mean()
        loss_refine = hidden.new_zeros(())
        if self.ptd.refiner is not None:
            # target of the denoiser: the first head's item as the HSD embeds it (detached: the refiner
            # learns to reach the item embedding, it does not move it)
            target = self.hsd.code_embedding(target_codes[:, 0]).detach()  # (B, C)
            cond = self.ptd.thinking_tokens(ctx).mean(1)  # (B, C)
            per_row = self.ptd.refiner.loss(cond, target, generator)  # (B,)
            has = valid[:, 0].float()
            loss_refine = (per_row * has).sum() / has.sum().clamp_min(1)
        loss_value = hidden.new_zeros((), dtype=torch.float32)
        if value_target is not None:
            if self.hte is None:
                raise ValueError("value_target needs the HTE: GPRConfig.hte is False")
            if value_target.shape != (b,):
                raise ValueError(f"value_target must be (B,) = ({b},), got {tuple(value_target.shape)}")
            has_v = (valid[:, 0] & value_target.isfinite()).float()
            feats = ctx if value_trunk else ctx.detach()
            pred = self.hte(feats, target_codes[:, 0].clamp_min(0), value_features).float()  # (B, L' + 1)
            err = (pred - value_target.float().nan_to_num(0.0)[:, None]).square().mean(1)
            loss_value = (err * has_v).sum() / has_v.sum().clamp_min(1)
        head_nll = nll.sum(0) / valid.sum(0).clamp_min(1)
        loss = loss_mtp + loss_refine + value_coef * loss_value
        return MTPLoss(loss, loss_mtp, loss_refine, head_nll, loss_value)
