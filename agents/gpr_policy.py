"""The pre-trained GPR generator (``agents.pretrain`` run folder) as a policy: ``act(obs) -> PolicyOutput``.

    python -m agents.evaluate --env ads-v0 --agents cascade,gpr:runs/pretrain/mtp

Per request batch: tokens from the observation (``tokens_from_obs``) -> the model's context (eval mode,
no grad) -> trie-constrained beam search over the ad trie with head 0, restricted to the ads the market
can serve now (``market.eligible_ads()``) -> the top ``num_candidates`` ads, best first. The policy is
deterministic (propensity 1): the refiner's noise, if the model has one, comes from a generator seeded
once with ``seed``.

Padding: a row with fewer than ``num_candidates`` legal items (few eligible ads) repeats its best item
in the empty slots; a row with no eligible item at all (every budget spent) gets ad 0 in every slot
(the auction then finds no eligible bidder, as it would for any other list).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from agents.policies import PolicyOutput, _market
from agents.pretrain import read_checkpoint
from gpr_sim.decoding import beam_search
from gpr_sim.model import GPRConfig, GPRModel
from gpr_sim.schema import SchemaConfig, tokens_from_obs
from gpr_sim.tokenizer.world import WorldTokenizer


def _tokenizer_dir(run_dir: Path) -> Path:
    """The tokenizer the run used: ``config.json``'s ``tokenizer_path`` if it exists, else ``RUN/tokenizer``."""
    cfg_path = run_dir / "config.json"
    if cfg_path.is_file():
        try:
            recorded = json.loads(cfg_path.read_text()).get("tokenizer_path", "")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{cfg_path}: not a readable run config ({e})") from e
        if recorded:
            for cand in (Path(recorded), run_dir / recorded):
                if cand.is_dir() or cand.is_file():
                    return cand
    return run_dir / "tokenizer"


class GPRPolicy:
    """Top-K eligible ads by beam search with a pre-trained ``GPRModel`` (module doc).

    Args:
        env: an ads-v0 env (vector or single) or its ``BatchedMarket``; the model runs on its device.
        run_dir: an ``agents.pretrain`` run folder (``checkpoint.pt``, ``config.json``, its tokenizer).
        beam_width: beams per level; raised to ``num_candidates`` when smaller.
        seed: seed of the refiner noise generator.

    Raises:
        ValueError: naming the path, if the checkpoint or tokenizer is missing, unreadable, or does not
            fit this env's world.
    """

    def __init__(self, env, run_dir: str | Path, beam_width: int = 8, seed: int = 0):
        self.market = _market(env)
        self.device = torch.device(self.market.device)
        world = self.market.world
        self.k = int(world.config.num_candidates)
        self.beam_width = max(int(beam_width), self.k)
        run = Path(run_dir)
        if not run.is_dir():
            raise ValueError(f"{run}: not a run folder (expected agents.pretrain output with checkpoint.pt)")
        ckpt = run / "checkpoint.pt"
        payload = read_checkpoint(ckpt)
        tok_dir = _tokenizer_dir(run)
        try:
            tok = WorldTokenizer.load(tok_dir)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from e
        try:
            tok.check_world(world)
        except ValueError as e:
            raise ValueError(f"{tok_dir}: {e}") from e
        self.tokenizer = tok.to(self.device)
        self.schema = SchemaConfig.from_world(world.config)
        raw = dict(payload["config"])
        try:
            raw["level_sizes"] = tuple(raw["level_sizes"])
            names = {f.name for f in dataclasses.fields(GPRConfig)}
            cfg = GPRConfig(**{k: v for k, v in raw.items() if k in names})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{ckpt}: bad model config in checkpoint ({e})") from e
        if tuple(cfg.level_sizes) != tuple(self.tokenizer.level_sizes):
            raise ValueError(
                f"{ckpt}: model level sizes {list(cfg.level_sizes)} differ from the tokenizer's "
                f"{list(self.tokenizer.level_sizes)} in {tok_dir}"
            )
        if cfg.max_len != self.schema.seq_len:
            raise ValueError(
                f"{ckpt}: model max_len={cfg.max_len}, this world's token layout has {self.schema.seq_len}"
            )
        model = GPRModel(cfg)
        try:
            model.load_state_dict(payload["model"])
        except RuntimeError as e:
            raise ValueError(f"{ckpt}: model weights do not fit the model config ({e})") from e
        self.model = model.to(self.device).eval()
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @torch.no_grad()
    def act(self, obs: dict[str, torch.Tensor]) -> PolicyOutput:
        tokens = tokens_from_obs(obs, self.tokenizer.table, self.schema, check=False).to(self.device)
        n = tokens.token_ids.shape[0]
        ctx = self.model.context(tokens, self.generator)
        step_fn, _ = self.model.beam_fns(ctx)
        eligible = self.market.eligible_ads().to(self.device)
        res = beam_search(step_fn, self.tokenizer.trie, batch_size=n, beam_width=self.beam_width, top_k=self.k,
                          eligible=eligible)  # fmt: skip
        items = res.items
        best = items[:, :1].clamp_min(0)  # a row with no item at all gets ad 0 (module doc)
        action = torch.where(items >= 0, items, best)
        return PolicyOutput(action, torch.ones(n, dtype=torch.float64, device=self.device))


def gpr_factory(run_dir: str):
    """``AGENT_FAMILIES["gpr"]``: ``gpr:RUN_DIR`` -> ``factory(env, seed)``.

    A folder without ``checkpoint.pt`` is rejected here, so ``agents.evaluate`` fails on its arguments
    before any agent runs; the checkpoint and tokenizer themselves are read (and checked) by the factory.
    """
    if not (Path(run_dir) / "checkpoint.pt").is_file():
        raise ValueError(
            f"unknown agent 'gpr:{run_dir}': {Path(run_dir) / 'checkpoint.pt'} does not exist "
            "(expected an agents.pretrain run folder)"
        )

    def factory(env, seed: int) -> GPRPolicy:
        return GPRPolicy(env, run_dir, seed=seed)

    return factory
