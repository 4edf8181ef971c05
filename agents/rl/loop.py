"""The training loop's update, the same for every algorithm: minibatches -> the algorithm's loss -> steps.

Per minibatch of requests the current policy recomputes its per-level log-probs and HTE values of the
buffer's paths (``path_terms``); the algorithm (``agents.rl.common.Algorithm``) turns them into its policy
and critic losses; the loop adds what every learner shares, the item-value regression and the optional
KL penalty to the frozen reference, and logs named terms (``loss``, ``policy``, ``critic``,
``item_value``, ``approx_kl``, ``clip_frac``, ``kl_ref``) and the gradients (``grad_norm``, ``grad_norm_policy``,
``grad_norm_critic``, ``grad_clipped``: ``add_terms``); ``UpdateConfig.clip`` says whether one clip bounds the policy
and the critic together or each on its own (``clip_gradients``).

Speed: the teacher-forced pass decodes each request's context once for its K paths (``path_terms``);
``UpdateConfig.precision`` = bf16 runs the forward under bfloat16 autocast (fp32 is the reference;
parameters, gradients and AdamW stay float32); ``PathTerms(compile=...)`` compiles the forward: ``"regions"``
(each part of the model one graph: regional compilation, which the rollout and the evaluation run too),
``"blocks"`` (the HSD and PTD blocks only) or ``"full"`` (the update's forward one graph, the regions beside it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from agents.rl import distributed
from agents.rl.buffer import Buffer
from agents.rl.common import (
    Algorithm,
    LossConfig,
    item_value_loss,
    kl_to_reference,
)
from agents.rl.distributed import SINGLE, Dist
from gpr_sim.finite import check_finite
from gpr_sim.model import GPRModel
from gpr_sim.model.gpr import REGIONS, compile_batch_dynamic
from gpr_sim.model.hsd import Segments, type_segments
from gpr_sim.model.incremental import path_log_prob
from gpr_sim.model.precision import check_precision, precision_context
from gpr_sim.world import rng

UPDATE_SALT = 0x0DD5
"""added to the seed for the keys of the minibatch order"""

CLIPS = ("joint", "separate")
"""``UpdateConfig.clip``'s values"""


@dataclass(frozen=True)
class UpdateConfig:
    """How one rollout is trained on: epochs of shuffled minibatches, gradient clipping, the order's seed."""

    epochs: int = 2
    """passes over each rollout"""
    minibatch: int = 64
    """requests per minibatch (x group size paths)"""
    max_grad_norm: float = 1.0
    """gradient clipping: the largest gradient norm a step takes (``clip``)"""
    seed: int = 0
    """keys the minibatch order (``minibatches``)"""
    precision: str = "fp32"
    """fp32 (the reference) | bf16: the loss forward under bfloat16 autocast (``precision_context``);
    parameters, optimiser state and the backward's accumulation stay float32"""
    clip: str = "joint"
    """joint: one clip over every parameter on the norm of all, so a large critic gradient shrinks the policy's step
    too (the reference; the recorded GPU runs used it) | separate: the policy's parameters and the critic's
    (``critic_parameters()``: the HTE) each clipped on their own norm (``clip_gradients``)"""

    def __post_init__(self) -> None:
        check_precision(self.precision)
        for name in ("epochs", "minibatch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is invalid: expected an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} is invalid: expected an integer")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm={self.max_grad_norm} is invalid: expected a finite number > 0")
        if self.clip not in CLIPS:
            raise ValueError(f"clip={self.clip!r} is invalid: expected one of {CLIPS}")


AdLookup = Callable[[torch.Tensor], torch.Tensor]
"""full paths (..., L') -> (..., F_ad) candidate-ad features for the HTE (``Roller.ad_lookup``)"""


def path_terms(
    model: GPRModel,
    buf: Buffer,
    cached: bool = True,
    ad_lookup: AdLookup | None = None,
    segments: Segments | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Current per-level log-probs (M, K, L) and HTE values (M, K, L + 1) of the buffer's paths.

    ``cached`` (default): the PTD decodes the context once per request and only each path's generated
    tokens against it (``gpr_sim.model.incremental.path_log_prob``); False is the reference, the context
    repeated for each of the K paths. Equal up to rounding, forward and backward. ``ad_lookup``: the
    candidates' features for the HTE, when the model reads them (None = none). ``segments``:
    ``type_segments(buf.tokens.type_ids)`` when the caller has it (the typed FFN then needs no sort).
    """
    feats = None if ad_lookup is None else ad_lookup(buf.codes)
    return _terms(model, buf.tokens, buf.noise, buf.codes, buf.legal, cached, feats, segments)


def _terms(
    model: GPRModel,
    tokens,
    noise,
    codes: torch.Tensor,
    legal: list[torch.Tensor],
    cached: bool,
    ad_features: torch.Tensor | None = None,
    segments: Segments | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``path_terms`` on the buffer's tensors (what ``PathTerms(compile=True)`` compiles)."""
    m, k, length = codes.shape
    ctx = model.context(tokens, noise=noise, segments=segments)  # (M, Cc, C)
    if cached:
        log_prob = path_log_prob(model, ctx, codes, legal).float()
    else:
        flat = codes.flatten(0, 1)
        masks = [mask.flatten(0, 1) for mask in legal]
        log_prob = model.log_prob(ctx.repeat_interleave(k, 0), flat, masks).view(m, k, length).float()
    # the critic reads the policy's features but does not move them: value regression on a cold HTE
    # would otherwise rewrite the shared HSD/PTD trunk (and with it the policy) before the policy learns
    values = model.path_values(ctx.detach(), codes, ad_features).float()  # (M, K, L + 1)
    return log_prob, values


COMPILE_MODES = ("off", "blocks", "regions", "full")
"""``PathTerms``' compile modes (``True`` / ``False`` read as ``"full"`` / ``"off"``)"""


class PathTerms(torch.nn.Module):
    """``path_terms`` as a ``forward``: what ``DistributedDataParallel`` wraps (its hooks need a forward).

    ``cached``: ``path_terms``'s. ``compile``:

    | mode | what runs through ``torch.compile`` |
    |---|---|
    | ``"off"`` | nothing (the reference) |
    | ``"full"`` | the update's whole forward (HSD, thinking, refiner, PTD, HTE) as one graph, the minibatch size dynamic from the first call (the last minibatch of an epoch is shorter: ``compile_batch_dynamic``), so Inductor fuses and recomputes across the regions' borders; and the regions in place as ``"regions"`` for the rollout and the evaluation (the update's graph traces through them: torch.compile inlines a compiled function it meets) |
    | ``"blocks"`` | each ``HSTUBlock`` and PTD ``DecoderBlock`` (``GPRModel.compile_regions``, in place: the rollout's full forwards run them too); the element-wise work around the matmuls (norms, gates, residuals, casts) fuses into few kernels, and the blocks of a kind share one graph, so it compiles in seconds |
    | ``"regions"`` | ``"blocks"`` and the other parts of the forward, each one graph (``GPRModel.compile_regions``): the HSD's embedding, the PTD's thinking and refiner, its teacher-forced pass over the K paths, the HTE's path values (eager, they were a third of the minibatch's device time on an H200) |

    The loss, the backward's bookkeeping and the optimiser stay eager. ``ad_lookup``: ``path_terms``'s (run
    eagerly, outside the compiled forward).
    """

    def __init__(
        self,
        model: GPRModel,
        cached: bool = True,
        compile: bool | str = False,
        ad_lookup: AdLookup | None = None,
    ) -> None:
        super().__init__()
        mode = ("full" if compile else "off") if isinstance(compile, bool) else compile
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r} is invalid: expected one of {COMPILE_MODES} or a bool")
        self.model, self.cached, self.ad_lookup, self.compile_mode = model, cached, ad_lookup, mode
        self._fn = compile_batch_dynamic(_terms) if mode == "full" else _terms
        if mode != "off":  # "full" too: its graph is the update's, the rollout's forwards run the regions
            model.compile_regions(("blocks",) if mode == "blocks" else REGIONS)

    def forward(self, buf: Buffer, segments: Segments | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        feats = None if self.ad_lookup is None else self.ad_lookup(buf.codes)
        return self._fn(self.model, buf.tokens, buf.noise, buf.codes, buf.legal, self.cached, feats, segments)


def loss_terms(
    algo: Algorithm,
    cfg: LossConfig,
    terms: torch.nn.Module,
    ref: GPRModel | None,
    buf: Buffer,
    segments: Segments | None = None,
) -> dict:
    """The algorithm's loss on a minibatch; returns named scalar tensors (``loss`` to backpropagate).

    ``terms``: the policy's ``PathTerms`` (or its ``DistributedDataParallel`` wrapper). ``ref``: the frozen
    reference policy, needed when ``algo.reference`` or ``cfg.kl_coef`` > 0, else None. An algorithm
    without a critic logs ``critic`` = 0. ``segments``: ``type_segments`` of the buffer's tokens (``update``).
    """
    log_prob, values = terms(buf, segments)
    old = buf.old_log_prob
    item = item_value_loss(values[..., -1], buf.reward)
    out = {"item_value": item}
    ref_lp = None
    if ref is not None:
        with torch.no_grad():
            ref_lp, _ = path_terms(ref, buf, segments=segments)
    policy, critic = algo.loss(log_prob, values, ref_lp, buf, cfg)
    if critic is None:
        critic = item * 0
    loss = policy + cfg.value_coef * (critic + item)
    if cfg.kl_coef > 0:
        if ref_lp is None:
            raise ValueError(f"kl_coef={cfg.kl_coef} needs the reference policy: pass ref")
        out["kl_ref"] = kl_to_reference(log_prob.flatten(0, 1), ref_lp.flatten(0, 1))
        loss = loss + cfg.kl_coef * out["kl_ref"]
    out.update(policy=policy, critic=critic, loss=loss)
    with torch.no_grad():
        if algo.monitor is not None:
            out.update(algo.monitor(log_prob, ref_lp, buf, cfg))
        log_ratio = (log_prob - old).sum(-1)
        out["approx_kl"] = ((log_ratio.exp() - 1) - log_ratio).mean()
        out["clip_frac"] = ((log_prob - old).exp().sub(1).abs() > cfg.clip).float().mean()
    return out


def minibatches(buf: Buffer, seed: int, draw: int, size: int, dist: Dist = SINGLE) -> tuple[list, list[int]]:
    """One epoch's minibatches of the valid requests of every rank: (this rank's rows of each, global sizes).

    The order is a shuffle keyed by the request ids (``Buffer.uid``) and ``draw``, sorted over the ids of
    every rank (one all-gather), so W ranks cut the one-process global batch into the same minibatches;
    each rank gets the rows of a minibatch that it holds (possibly none).
    """
    rows = torch.nonzero(buf.valid).squeeze(1)
    uid = buf.uid[rows]
    seeds = torch.full_like(uid, seed + UPDATE_SALT)
    key = rng.stream_keys(seeds, uid & 0xFFFFFFFF, (uid >> 32) * 65_537 + draw)
    mine = torch.stack([key, uid], 1).cpu()
    parts = distributed.gather_objects(mine, dist)
    every = torch.cat(parts)
    order = torch.argsort(every[:, 1], stable=True)  # ties of the shuffle key broken by the unique id
    order = order[torch.argsort(every[order, 0], stable=True)]
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    start = sum(len(p) for p in parts[: dist.rank])
    position = position[start : start + len(mine)]  # this rank's rows, in their global order
    total = order.numel()
    chunk = position // size
    local = torch.argsort(position)
    counts = torch.bincount(chunk, minlength=math.ceil(total / size)).tolist()
    pieces = list(rows[local.to(rows.device)].split(counts))
    sizes = [min(size, total - lo) for lo in range(0, total, size)]
    return pieces, sizes


GRADIENT_NORM = "gradient norm"
"""a minibatch's gradient norm before the clip, as the non-finite check's error line names it"""
GROUP_NORMS = ("policy gradient norm", "critic gradient norm")
"""the norms of the policy's and the critic's parameters' gradients before the clip (``clip_gradients``)"""


def parameter_groups(model) -> tuple[list, list, list]:
    """``model``'s parameters in its order: all, the policy's, the critic's (``model.critic_parameters()``: the HTE,
    which reads the trunk's context detached, so only the value losses reach it); read once per update."""
    params = list(model.parameters())
    critic_ids = {id(p) for p in model.critic_parameters()}
    return params, [p for p in params if id(p) not in critic_ids], [p for p in params if id(p) in critic_ids]


def clip_gradients(groups: tuple[list, list, list], max_norm: float, clip: str) -> list[torch.Tensor]:
    """Clip the gradients of ``parameter_groups``' parameters in place; their norms before the clip: of all, of the
    policy's, of the critic's (0 for a group without gradients).

    ``clip`` joint: one clip on the norm of all (``torch.nn.utils.clip_grad_norm_``'s step to the bit), so a critic
    gradient far larger than the policy's shrinks the policy's step with it; separate: each group scaled to
    ``max_norm`` on its own norm, so the critic's loss no longer sets the policy's step size.
    """
    with_grad = [[p for p in group if p.grad is not None] for group in groups]
    device = with_grad[0][0].grad.device if with_grad[0] else torch.device("cpu")
    norms = [
        torch.nn.utils.get_total_norm([p.grad for p in group]) if group else torch.zeros((), device=device)
        for group in with_grad
    ]
    if clip == "joint":
        torch.nn.utils.clip_grads_with_norm_(with_grad[0], max_norm, norms[0])
    else:
        for group, norm in zip(with_grad[1:], norms[1:]):
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return norms


def add_terms(sums: dict[str, float], named: dict[str, float], share: float, cfg: UpdateConfig) -> None:
    """Add one minibatch's loss terms, weighted by its share, to the update's sums; the gradient norms before the
    clip as ``grad_norm`` (all), ``grad_norm_policy`` and ``grad_norm_critic``, and whether the clip scaled the
    policy's step as ``grad_clipped``: with ``cfg.clip`` joint the norm of all decides, so a large critic gradient
    shrinks the policy's step too (``benchmarks/RESULTS.md``, "Per-level credit with a shared network")."""
    norms = {name: named[name] for name in (GRADIENT_NORM, *GROUP_NORMS)}
    for key, value in named.items():
        if key not in norms:
            sums[key] = sums.get(key, 0.0) + share * value
    for key, name in zip(("grad_norm", "grad_norm_policy", "grad_norm_critic"), norms):
        sums[key] = sums.get(key, 0.0) + share * norms[name]
    decides = norms[GRADIENT_NORM if cfg.clip == "joint" else GROUP_NORMS[0]]
    # no policy gradient (the critic's warm-up): no policy step to scale
    scaled = decides > cfg.max_grad_norm and norms[GROUP_NORMS[0]] > 0
    sums["grad_clipped"] = sums.get("grad_clipped", 0.0) + share * float(scaled)


def update(
    terms_fn,
    model: GPRModel,
    opt,
    ref: GPRModel | None,
    buf: Buffer,
    algo: Algorithm,
    loss_cfg: LossConfig,
    cfg: UpdateConfig,
    draw: int,
    dist: Dist = SINGLE,
    policy: bool = True,
) -> dict:
    """``cfg.epochs`` passes of minibatch updates over the valid requests; mean of each loss term.

    ``terms_fn``: ``PathTerms(model)`` or its DDP wrapper. Data-parallel, each rank's loss is the mean over
    its rows of the global minibatch scaled by its share (x W, since DDP averages the gradients over ranks),
    so the step equals the one-process step on the global minibatch; a rank holding none of its rows runs
    one row with weight 0 (every rank must join the gradient all-reduce). ``policy`` False trains the
    value terms only (critic warm-up). ``draw`` keys the minibatch order (``minibatches``). The buffer
    holds ``algo``'s targets.

    Non-finite values (any loss term or the gradient norm) stop the run (``gpr_sim.finite``) before they reach
    the parameters. With the plain optimiser the check reads them on the host before each step (one sync per
    minibatch); with a fused AdamW the step is skipped on the device when they are not finite (its
    ``found_inf``, as ``torch.amp.GradScaler`` uses it) and they are read once at the end of the update, so
    the host queues minibatches ahead of the GPU (every step after a bad one is skipped too). Either way the
    parameters and optimiser state stay those before the first bad minibatch, which the error names.
    """
    sums: dict[str, float] = {}
    n = 0
    # the slot layout of the buffer's tokens, read once (one sync): every minibatch's HSD then runs the typed
    # FFN as dense GEMMs per run of slots of one type instead of sorting its tokens by type
    segments = type_segments(buf.tokens.type_ids)
    groups = parameter_groups(model)  # the clip's split, read once
    on_device = bool(opt.defaults.get("fused"))  # the fused kernel can skip a flagged step without a sync
    pending: list[tuple[str, list[str], torch.Tensor, float]] = []  # checked after the last step
    flagged = torch.zeros((), device=buf.codes.device)  # 1 from the first non-finite minibatch on
    for epoch in range(cfg.epochs):
        pieces, sizes = minibatches(buf, cfg.seed, draw * cfg.epochs + epoch, cfg.minibatch, dist)
        for batch, (idx, size) in enumerate(zip(pieces, sizes)):
            share = idx.numel() / size
            if idx.numel() == 0:
                idx = torch.zeros(1, dtype=torch.int64, device=buf.codes.device)
            with precision_context(buf.codes.device, cfg.precision):  # the forward only; backward outside
                terms = loss_terms(algo, loss_cfg, terms_fn, ref, buf.rows(idx), segments)
            loss = terms["loss"] if policy else loss_cfg.value_coef * (terms["critic"] + terms["item_value"])
            opt.zero_grad(set_to_none=True)
            (loss * (share * dist.world_size)).backward()
            norms = clip_gradients(groups, cfg.max_grad_norm, cfg.clip)
            # checked before the step takes effect: a NaN here would reach every parameter (gpr_sim.finite);
            # every rank sees the same all-reduced gradient norm, so all ranks skip and stop together
            names = [*terms, GRADIENT_NORM, *GROUP_NORMS]
            values = torch.stack([v.detach().float() for v in terms.values()] + [n.float() for n in norms])
            where = f"iteration {draw + 1}, epoch {epoch}, minibatch {batch}"
            # fused: no host sync per minibatch; from a non-finite one on, steps are skipped on the device
            if on_device:
                flagged = torch.maximum(flagged, (~torch.isfinite(values).all()).float())
                opt.found_inf = flagged
                opt.step()
                del opt.found_inf
                pending.append((where, names, values, share))
                continue
            named = dict(zip(names, values.tolist()))
            check_finite(where, named)
            opt.step()
            add_terms(sums, named, share, cfg)
            n += 1
    if pending:  # one sync for the whole update; the first non-finite minibatch stops the run
        table = torch.stack([values for _, _, values, _ in pending]).tolist()
        for (where, names, _, share), row in zip(pending, table, strict=True):
            named = dict(zip(names, row))
            check_finite(where, named)
            add_terms(sums, named, share, cfg)
            n += 1
    out = {f"train/{k}": v / max(n, 1) for k, v in sums.items()}
    return {k: v * dist.world_size for k, v in distributed.all_reduce_mean(out, dist).items()}


__all__ = [
    "CLIPS",
    "UPDATE_SALT",
    "PathTerms",
    "clip_gradients",
    "parameter_groups",
    "UpdateConfig",
    "loss_terms",
    "minibatches",
    "path_terms",
    "update",
]
