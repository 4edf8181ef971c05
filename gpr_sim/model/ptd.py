"""PTD: the token-wise decoder of GPR §3, thinking -> refining -> generation over semantic-ID levels.

- **Thinking**: K learnable queries cross-attend to the HSD outputs -> (B, K, C).
- **Refining**: a tiny MLP denoiser, conditioned on the pooled thinking tokens, runs ``refine_steps``
  deterministic (DDIM-style) steps from Gaussian noise and emits one refine token (B, 1, C). It is
  trained to predict the clean target embedding (the target item's code embedding) from a noised one.
- **Generation**: a small causal decoder over ``[context tokens, BOS, emb(z_1), ..., emb(z_l)]``
  gives logits for level l+1. Legal-code masks come from the caller (``PrefixTrie.legal_mask``) and are
  applied with ``masked_fill(~legal, -inf)``: the model never builds them.

The "context" passed around is a (B, C, d) tensor: the thinking tokens (or the E token's output when
thinking is off), plus the refine token when refining is on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpr_sim.model.config import GPRConfig
from gpr_sim.model.hsd import MLP, small_matmul, split_attention
from gpr_sim.model.precision import to_stream


class Thinking(nn.Module):
    """K learnable queries cross-attend (SDPA) to the intent embeddings: (B, T, C) -> (B, K, C)."""

    def __init__(self, cfg: GPRConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.queries = nn.Parameter(torch.randn(cfg.num_thinking, d) * 0.02)
        self.ln_kv = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        self.ln_mlp = nn.LayerNorm(d)
        self.mlp = MLP(d, cfg.ffn_mult * d)

    def forward(self, hidden: Tensor, padding_mask: Tensor) -> Tensor:
        b, t, c = hidden.shape
        h, kq = self.n_heads, self.queries.shape[0]
        q = self.q(self.queries).view(1, kq, h, c // h).transpose(1, 2).expand(b, -1, -1, -1)  # (B, H, K, hd)
        k, v = self.kv(self.ln_kv(hidden)).split(c, dim=2)  # (B, T, C) each
        k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (k, v))  # (B, H, T, hd)
        mask = ~padding_mask[:, None, None, :]  # (B, 1, 1, T): queries read real tokens only
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, K, hd)
        x = self.queries + self.out(a.transpose(1, 2).reshape(b, kq, c))  # (B, K, C)
        return x + self.mlp(self.ln_mlp(x))

    # -- cached path (rollout steps): the keys/values of earlier slots are kept per user --------------
    def keys_values(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """HSD outputs (B, T, C) -> keys and values (B, H, T, hd) each; per slot, so they can be cached."""
        b, t, c = hidden.shape
        h = self.n_heads
        k, v = self.kv(self.ln_kv(hidden)).split(c, dim=2)
        return tuple(z.view(b, t, h, c // h).transpose(1, 2) for z in (k, v))  # type: ignore[return-value]

    def _queries(self, b: int) -> Tensor:
        c, h, kq = self.queries.shape[1], self.n_heads, self.queries.shape[0]
        return (
            self.q(self.queries).view(1, kq, h, c // h).transpose(1, 2).expand(b, -1, -1, -1)
        )  # (B, H, K, hd)

    def _scores(self, hidden: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, C) -> float32 masked scores (B, H, K, T) and values (B, H, T, hd)."""
        k, v = self.keys_values(hidden)
        q = self._queries(hidden.shape[0])
        s = small_matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        return s.masked_fill(padding_mask[:, None, None, :], float("-inf")), v

    def partial(self, hidden: Tensor, padding_mask: Tensor) -> ThinkingPartial:
        """Online-softmax state over ``hidden`` (B, T, C) (at least one real slot per row)."""
        s, v = self._scores(hidden, padding_mask)
        m = s.amax(-1)  # (B, H, K)
        p = torch.exp(s - m[..., None])
        with torch.autocast(hidden.device.type, enabled=False):  # the running sums stay float32
            acc = torch.matmul(p, v.float())
        return ThinkingPartial(m, p.sum(-1), acc)

    def forward_partial(self, part: ThinkingPartial, hidden: Tensor, padding_mask: Tensor) -> Tensor:
        """``forward(cat(hidden_seen, hidden), cat(pad_seen, padding_mask))`` from ``partial(hidden_seen,
        pad_seen)`` and the new slots ``hidden`` (B, Tn, C): (B, K, C), exact up to rounding."""
        s, v = self._scores(hidden, padding_mask)  # (B, H, K, Tn)
        m = torch.maximum(part.m, s.amax(-1))  # (B, H, K); finite: the partial has a real slot
        old = torch.exp(part.m - m)
        p = torch.exp(s - m[..., None])
        with torch.autocast(hidden.device.type, enabled=False):
            pv = small_matmul(p, v.float())
        a = (part.acc * old[..., None] + pv) / (part.denom * old + p.sum(-1))[..., None]
        b, kq, c = a.shape[0], self.queries.shape[0], self.queries.shape[1]
        x = self.queries + self.out(a.to(hidden.dtype).transpose(1, 2).reshape(b, kq, c))  # (B, K, C)
        return x + self.mlp(self.ln_mlp(x))

    def forward_cached(
        self, k1: Tensor, v1: Tensor, pad1: Tensor, k2: Tensor, v2: Tensor, pad2: Tensor
    ) -> Tensor:
        """``forward`` over slots given as two parts of keys/values (``keys_values``): cached + new.

        k1/v1 (B, H, T1, hd) with padding pad1 (B, T1), k2/v2 (B, H, T2, hd) with pad2 (B, T2) ->
        (B, K, C); equals ``forward(cat(hidden), cat(pad))`` up to rounding, without concatenating.
        """
        b, c = k1.shape[0], self.queries.shape[1]
        h, kq = self.n_heads, self.queries.shape[0]
        q = self.q(self.queries).view(1, kq, h, c // h).transpose(1, 2).expand(b, -1, -1, -1)  # (B, H, K, hd)
        a = split_attention(q, k1, v1, ~pad1[:, None, None, :], k2, v2, ~pad2[:, None, None, :])
        x = self.queries + self.out(a.transpose(1, 2).reshape(b, kq, c))  # (B, K, C)
        return x + self.mlp(self.ln_mlp(x))


class ThinkingPartial(NamedTuple):
    """Online-softmax state of the thinking attention over a set of slots (per request, head, query).

    The thinking queries are parameters (the same for every request), so the attention over slots
    already seen folds into a running (max, sum, weighted-value sum): O(K d) per request instead of
    the O(T d) keys/values. ``Thinking.forward_partial`` adds new slots to it exactly (up to rounding).
    """

    m: Tensor  # (B, H, K) float32 max score
    denom: Tensor  # (B, H, K) float32 sum of exp(score - m)
    acc: Tensor  # (B, H, K, hd) float32 sum of exp(score - m) * value


class Refiner(nn.Module):
    """Tiny diffusion-style denoiser: x0-prediction MLP with a fixed cosine noise schedule."""

    def __init__(self, cfg: GPRConfig) -> None:
        super().__init__()
        d, s = cfg.d_model, cfg.refine_steps
        # alpha_bar[t] falls from ~1 (t=0, almost clean) to ~0 (t=S-1, almost pure noise)
        t = torch.arange(1, s + 1, dtype=torch.float32) / (s + 1)
        self.register_buffer("alpha_bar", torch.cos(t * math.pi / 2) ** 2, persistent=False)
        self.step_emb = nn.Embedding(s, d)
        self.net = nn.Sequential(nn.Linear(3 * d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def denoise(self, x_t: Tensor, step: Tensor, cond: Tensor) -> Tensor:
        """(B, C) noised embedding, (B,) step, (B, C) condition -> (B, C) predicted clean embedding."""
        return self.net(torch.cat([x_t, cond, self.step_emb(step)], -1))

    def loss(self, cond: Tensor, target: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Denoising loss: noise ``target`` (B, C) at a random step, predict it back -> (B,) per-row MSE."""
        b = target.shape[0]
        step = torch.randint(0, self.alpha_bar.numel(), (b,), device=target.device, generator=generator)
        noise = torch.randn(target.shape, device=target.device, generator=generator)
        ab = self.alpha_bar[step][:, None]  # (B, 1)
        x_t = ab.sqrt() * target + (1 - ab).sqrt() * noise
        return (self.denoise(x_t, step, cond) - target).pow(2).mean(-1)

    def draw_noise(
        self,
        batch: int,
        device: torch.device,
        dtype: torch.dtype,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The starting noise of ``sample``: (B, C) standard normal from ``generator`` (None: a fresh generator
        seeded 0, so inference is reproducible by default)."""
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(0)
        shape = (batch, self.step_emb.embedding_dim)
        return torch.randn(shape, device=device, generator=generator, dtype=dtype)

    def sample(
        self, cond: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Tensor:
        """(B, C) condition -> (B, C) refine embedding, iterating from noise (deterministic DDIM steps).

        ``noise`` (B, C) is the starting point; without it one is drawn from ``generator``
        (``draw_noise``). RL passes the rollout's noise back at update time, so the context, and with it
        the policy's log-probabilities, are a function of the parameters only.
        """
        if noise is None:
            noise = self.draw_noise(cond.shape[0], cond.device, cond.dtype, generator)
        elif noise.shape != cond.shape:
            raise ValueError(f"noise must be {tuple(cond.shape)}, got {tuple(noise.shape)}")
        x = noise.to(cond.dtype)  # (B, C)
        x0 = x
        for s in reversed(range(self.alpha_bar.numel())):
            step = torch.full((cond.shape[0],), s, dtype=torch.int64, device=cond.device)
            x0 = self.denoise(x, step, cond)
            if s == 0:
                break
            ab, ab_prev = self.alpha_bar[s], self.alpha_bar[s - 1]
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # the noise implied by the x0 prediction
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        return x0


class DecoderBlock(nn.Module):
    """Pre-norm self-attention block with an explicit boolean mask (True = may attend)."""

    def __init__(self, cfg: GPRConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, cfg.ffn_mult * d)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, c = x.shape
        h = self.n_heads
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))

    def forward_kv(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``forward`` that also returns this block's keys and values (B, H, T, hd) (cacheable)."""
        b, t, c = x.shape
        h = self.n_heads
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x)), k, v

    def forward_past(
        self,
        x: Tensor,
        past_k: Tensor,
        past_v: Tensor,
        mask: Tensor,
        beams: int | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Tokens ``x`` (M, T, C) after cached keys/values that every token sees.

        ``past_k``/``past_v``: (M, H, Tp, hd), one per sequence; or, with ``beams``, (B, H, Tp, hd) shared
        by ``beams`` consecutive sequences (M = B * beams; sequence i reads past row i // beams) without
        gathering them per sequence. ``mask`` (T, T) is the tokens' own mask (True = may attend).
        ``last_only``: only the last token's output is computed, (M, 1, C) (every token still gives
        keys/values). Equals ``forward`` on the concatenated sequences for these rows (up to rounding).
        """
        m, t, c = x.shape
        h = self.n_heads
        hd = c // h
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(m, t, h, hd).transpose(1, 2) for z in (q, k, v))  # (M, H, T, hd)
        if last_only:
            x, q, mask = x[:, -1:], q[:, :, -1:], mask[-1:]
        tq = q.shape[2]
        if beams is None:
            see_past = torch.ones(tq, past_k.shape[2], dtype=torch.bool, device=x.device)
            a = split_attention(q, past_k, past_v, see_past, k, v, mask)  # (M, H, Tq, hd)
        else:
            b, tp = past_k.shape[0], past_k.shape[2]
            scale = hd**-0.5

            def rows_of(z: Tensor) -> Tensor:  # (M, H, Tq, e) -> (B, H, beams * Tq, e)
                return z.reshape(b, beams, h, tq, -1).transpose(1, 2).reshape(b, h, beams * tq, -1)

            def seqs_of(z: Tensor) -> Tensor:  # (B, H, beams * Tq, e) -> (M, H, Tq, e)
                return z.view(b, h, beams, tq, -1).transpose(1, 2).reshape(m, h, tq, -1)

            s1 = seqs_of(small_matmul(rows_of(q), past_k.transpose(-1, -2))).float() * scale  # (M, H, Tq, Tp)
            s2 = small_matmul(q, k.transpose(-1, -2)).float() * scale  # (M, H, Tq, T)
            s2 = s2.masked_fill(~mask, float("-inf"))
            p = torch.cat([s1, s2], -1).softmax(-1)
            dt = past_v.dtype
            a_past = seqs_of(small_matmul(rows_of(p[..., :tp].to(dt)), past_v))  # (M, H, Tq, hd)
            a = a_past + small_matmul(p[..., tp:].to(dt), v)
        x = x + self.out(a.transpose(1, 2).reshape(m, tq, c))
        return x + self.mlp(self.ln2(x))


def apply_legal_mask(logits: Tensor, legal_mask: Tensor | None) -> Tensor:
    """(B, K) logits -> same with illegal codes at -inf (probability exactly 0 after softmax)."""
    return logits if legal_mask is None else logits.masked_fill(~legal_mask, float("-inf"))


class PTD(nn.Module):
    """Thinking + refining + level-by-level generation of the next ad's semantic ID."""

    def __init__(self, cfg: GPRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.thinking = Thinking(cfg) if cfg.thinking else None
        self.refiner = Refiner(cfg) if cfg.refining else None
        self.code_emb = nn.ModuleList(nn.Embedding(k, d) for k in cfg.level_sizes)
        self.bos = nn.Parameter(torch.randn(d) * 0.02)
        self.level_pos = nn.Embedding(cfg.path_len, d)  # BOS = level 0, z_l at l (l < L')
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.decoder_layers))
        self.ln_f = nn.LayerNorm(d)
        self.heads = nn.ModuleList(nn.Linear(d, k) for k in cfg.level_sizes)

    # -- thinking and refining --------------------------------------------------------------------
    def think(self, hidden: Tensor, padding_mask: Tensor) -> Tensor:
        """HSD outputs (B, T, C) -> thinking tokens (B, K, C), or the E (last) token (B, 1, C) if off."""
        if self.thinking is None:
            return hidden[:, -1:]
        return self.thinking(hidden, padding_mask)

    def context(
        self,
        hidden: Tensor,
        padding_mask: Tensor,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """HSD outputs -> context (B, C_ctx, C): thinking tokens, then the refine token when on.

        ``noise`` (B, C): the refiner's starting noise (``Refiner.sample``); ignored without a refiner.
        Without it, one is drawn here from ``generator`` (``Refiner.draw_noise``), before
        ``context_from_noise``: that is the part ``GPRModel.compile_regions`` compiles, and a
        ``torch.Generator`` cannot be traced (a draw inside would break its graph in two).
        """
        if self.refiner is not None and noise is None:
            # the dtype of the pooled thinking tokens the refiner is conditioned on (hidden's, fp32 under
            # autocast): the same draw as ``Refiner.sample`` makes from ``generator``
            noise = self.refiner.draw_noise(hidden.shape[0], hidden.device, hidden.dtype, generator)
        return self.context_from_noise(hidden, padding_mask, noise)

    def context_from_noise(self, hidden: Tensor, padding_mask: Tensor, noise: Tensor | None) -> Tensor:
        """``context`` from the refiner's starting noise (B, C) (None without a refiner): the part
        ``GPRModel.compile_regions`` compiles (no ``torch.Generator`` inside)."""
        ctx = self.think(hidden, padding_mask)  # (B, K, C)
        if self.refiner is None:
            return ctx
        refine = self.refiner.sample(ctx.mean(1), noise=noise)  # (B, C) conditioned on pooled thinking
        return torch.cat([ctx, refine[:, None]], 1)  # (B, K + 1, C)

    def thinking_tokens(self, context: Tensor) -> Tensor:
        """Context -> the thinking part (drops the refine token)."""
        return context[:, :-1] if self.refiner is not None else context

    # -- generation --------------------------------------------------------------------------------
    def _decode(self, context: Tensor, prefix: Tensor) -> Tensor:
        """Context (B, Cc, C), prefix codes (B, l) -> (B, l + 1, C) hidden states at BOS, z_1 .. z_l."""
        b, cc, d = context.shape
        depth = prefix.shape[1]
        if depth >= self.cfg.path_len:
            raise ValueError(f"prefix has {depth} levels: expected fewer than L'={self.cfg.path_len}")
        gen = [self.bos.expand(b, 1, d)] + [self.code_emb[i](prefix[:, i : i + 1]) for i in range(depth)]
        gen = torch.cat(gen, 1) + self.level_pos.weight[: depth + 1]  # (B, l + 1, C)
        x = to_stream(torch.cat([context, gen], 1))  # (B, Cc + l + 1, C)
        t = x.shape[1]
        slot = torch.arange(t, device=x.device)
        # context tokens see each other; generated tokens see the context and earlier-or-equal codes
        mask = (slot[None, :] < cc) | (slot[None, :] <= slot[:, None])  # (T, T)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x[:, cc:])  # (B, l + 1, C)

    # -- cached generation: the context tokens through the decoder once per request -------------------
    def context_kv(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Context (B, Cc, C) -> per decoder block, the context tokens' keys and values (B, H, Cc, hd).

        Context tokens attend to each other only (``_decode``'s mask), so their keys/values do not depend
        on the prefix: computed once per request, then ``level_logits_cached`` decodes only the
        generated tokens of each beam.
        """
        x = to_stream(context)
        cc = context.shape[1]
        mask = torch.ones(cc, cc, dtype=torch.bool, device=context.device)
        out = []
        for block in self.blocks:
            x, k, v = block.forward_kv(x, mask)
            out.append((k, v))
        return out

    def level_logits_cached(
        self,
        context_kv: Sequence[tuple[Tensor, Tensor]],
        row: Tensor,
        prefix_codes: Tensor,
        legal_mask: Tensor | None = None,
        beams: int | None = None,
    ) -> Tensor:
        """``level_logits(context[row], prefix_codes, legal_mask)`` from ``context_kv(context)``.

        Args:
            context_kv: from ``context_kv`` over B requests.
            row: (M,) int64 request of each prefix.
            prefix_codes: (M, l) codes, 0 <= l < L'.
            legal_mask: optional (M, K_{l+1}) bool.
            beams: the caller promises ``row == arange(B).repeat_interleave(beams)`` (M = B * beams, the
                layout of ``beam_search``): the context K/V are then read per request, not gathered per
                beam (``row`` is not read; not checked).

        Returns:
            (M, K_{l+1}) logits (equal to the uncached path up to rounding).
        """
        depth = prefix_codes.shape[1]
        h = self._decode_cached(context_kv, row, prefix_codes, beams, last_only=True)[:, -1]  # (M, C)
        return apply_legal_mask(self.heads[depth](h), legal_mask)

    def _decode_cached(
        self,
        context_kv: Sequence[tuple[Tensor, Tensor]],
        row: Tensor | None,
        prefix_codes: Tensor,
        beams: int | None,
        last_only: bool,
    ) -> Tensor:
        """``_decode`` of the generated tokens against cached context K/V: (M, l) -> (M, l + 1, C).

        ``last_only``: the last block computes the last token only, (M, 1, C) (what a level step reads).
        """
        m, depth = prefix_codes.shape
        if depth >= self.cfg.path_len:
            raise ValueError(f"prefix has {depth} levels: expected fewer than L'={self.cfg.path_len}")
        d = self.bos.shape[0]
        gen = [self.bos.expand(m, 1, d)] + [
            self.code_emb[i](prefix_codes[:, i : i + 1]) for i in range(depth)
        ]
        x = to_stream(torch.cat(gen, 1) + self.level_pos.weight[: depth + 1])  # (M, l + 1, C)
        slot = torch.arange(depth + 1, device=x.device)
        mask = slot[None, :] <= slot[:, None]  # (l + 1, l + 1) causal among generated tokens
        n_blocks = len(self.blocks)
        for i, (block, (k, v)) in enumerate(zip(self.blocks, context_kv, strict=True)):
            last = last_only and i == n_blocks - 1  # the last block: only the last token's output is read
            if beams is None:
                k, v = k.index_select(0, row), v.index_select(0, row)
            x = block.forward_past(x, k, v, mask, beams=beams, last_only=last)
        return self.ln_f(x)

    def log_prob_cached(
        self,
        context_kv: Sequence[tuple[Tensor, Tensor]],
        codes: Tensor,
        legal_masks: Sequence[Tensor | None] | None = None,
        beams: int = 1,
    ) -> Tensor:
        """``log_prob(context[row], codes, legal_masks)`` from ``context_kv(context)`` over B requests, for
        ``beams`` paths per request laid out request-major (M = B * beams, path i of request i // beams).

        The context tokens go through the decoder once per request, not once per path: the teacher-forced
        pass of the RL update over K paths per request. Differentiable (gradients reach the context).

        Args:
            context_kv: from ``context_kv`` over B requests.
            codes: (M, L') int64 paths (in range).
            legal_masks: None, or L' masks (M, K_l) bool (entries may be None).
            beams: paths per request.

        Returns:
            (M, L') log P(z_l | context, z_<l) (equal to ``log_prob`` up to rounding).
        """
        h = self._decode_cached(context_kv, None, codes[:, :-1], beams, last_only=False)  # (M, L', C)
        out = []
        for lvl, head in enumerate(self.heads):
            mask = None if legal_masks is None else legal_masks[lvl]
            logp = apply_legal_mask(head(h[:, lvl]), mask).log_softmax(-1)  # (M, K_l)
            out.append(logp.gather(1, codes[:, lvl : lvl + 1]))
        return torch.cat(out, 1)

    def level_logits(self, context: Tensor, prefix_codes: Tensor, legal_mask: Tensor | None = None) -> Tensor:
        """Logits of the next level.

        Args:
            context: (B, Cc, C) from ``context``.
            prefix_codes: (B, l) int64 codes z_1..z_l already chosen, 0 <= l < L'.
            legal_mask: optional (B, K_{l+1}) bool from the trie; illegal codes get -inf.

        Returns:
            (B, K_{l+1}) logits.
        """
        h = self._decode(context, prefix_codes)[:, -1]  # (B, C)
        return apply_legal_mask(self.heads[prefix_codes.shape[1]](h), legal_mask)

    def log_prob(
        self, context: Tensor, codes: Tensor, legal_masks: Sequence[Tensor | None] | None = None
    ) -> Tensor:
        """Teacher-forced per-level log-probabilities of full paths, in one decoder pass.

        Args:
            context: (B, Cc, C).
            codes: (B, L') int64 target paths (in range).
            legal_masks: None, or L' masks (B, K_l) bool (entries may be None).

        Returns:
            (B, L') log P(z_l | context, z_<l).
        """
        h = self._decode(context, codes[:, :-1])  # (B, L', C): position l predicts level l+1
        out = []
        for lvl, head in enumerate(self.heads):
            mask = None if legal_masks is None else legal_masks[lvl]
            logp = apply_legal_mask(head(h[:, lvl]), mask).log_softmax(-1)  # (B, K_l)
            out.append(logp.gather(1, codes[:, lvl : lvl + 1]))
        return torch.cat(out, 1)
