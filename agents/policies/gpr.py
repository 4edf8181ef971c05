"""``gpr:PATH``: the GPR generator of a run folder as a policy: ``act(obs) -> PolicyOutput``.

    python -m agents.evaluate --env ads-v0 --agents cascade-privileged,gpr:runs/pretrain/mtp,gpr:runs/hepo/RUN

A run folder is an ``agents.pretrain`` one (``checkpoint.pt``) or an RL one from ``agents.hepo``
(``policy.pt``, the model alone); either names its tokenizer in ``config.json``.

Per request batch: tokens from the observation (``tokens_from_obs``; a model that reads market features also
gets the env's ``market_features()``, the ledger the observed requests meet) -> the model's context (eval mode,
no grad; the HSD once per request: the observation's organic history changes between requests, so no
HSD cache can be appended to exactly) -> trie-constrained beam search over the ad trie with head 0 on
the cached PTD (``gpr_sim.model.incremental``: the context K/V once per request, each level decodes
only the beams' generated tokens), restricted to the ads the market
can serve now (``env.eligible_ads()``) -> the top ``num_candidates`` ads, best first. The policy is
deterministic (propensity 1): the refiner's noise, if the model has one, comes from a generator seeded
once with ``seed``.

Ranking (``rank``): ``"logprob"`` serves the beam's top ``num_candidates`` items by generation
log-probability; ``"value"`` keeps all ``beam_width`` items of the beam and serves the ``num_candidates``
with the highest HTE full-item value (``GPRModel.path_values``, the candidate ad's platform features
included when the model reads them: ``gpr_sim.model.hte``), ties in beam order. The HTE estimates
final_value, the eCPM-like value the served ad earns, where the log-probability imitates the logging policy.

Padding: a row with fewer than ``num_candidates`` legal items (few eligible ads) repeats its best item
in the empty slots; a row with no eligible item at all (every budget spent) gets ad 0 in every slot
(the auction then finds no eligible bidder, as it would for any other list).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from agents.policies import PolicyOutput, batched_env
from agents.pretraining.checkpoint import read_checkpoint
from gpr_sim.decoding import beam_search
from gpr_sim.model import GPRConfig, GPRModel
from gpr_sim.model.hte import path_ad_features
from gpr_sim.model.incremental import head_context_kv, request_major_step
from gpr_sim.model.precision import check_precision, precision_context
from gpr_sim.platform.features import PlatformFeatures
from gpr_sim.runs import load_torch, save_torch
from gpr_sim.schema import SchemaConfig, check_dense_dim, tokens_from_obs
from gpr_sim.tokenizer.world import IDS_FILE, WorldTokenizer


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


POLICY_FORMAT = "gpr_sim.policy"
POLICY_VERSION = 1
"""``policy.pt``: model config + weights only, written by the RL learners (``agents.hepo``)"""


def model_from_payload(path: Path, payload: dict) -> GPRModel:
    """A CPU ``GPRModel`` from a checkpoint payload's ``config`` and ``model`` entries, with errors naming ``path``."""
    model = GPRModel(GPRConfig.from_dict(payload["config"], where=f"{path}: model config"))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: model weights do not fit the model config ({e})") from e
    return model


def save_policy(path: Path, model: GPRModel) -> None:
    """Write ``policy.pt`` (format header, model config, weights) atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch(path, POLICY_FORMAT, POLICY_VERSION, {"config": model.cfg.to_dict(), "model": state})


def read_policy(path: Path) -> dict:
    """Read ``policy.pt`` safely (``weights_only``) and check its header; errors name the file."""
    payload = load_torch(path, POLICY_FORMAT, POLICY_VERSION, "a gpr_sim policy file", ("config", "model"))
    if not isinstance(payload["config"], dict) or not isinstance(payload["model"], dict):
        raise ValueError(f"{path}: policy file lacks the model config or weights")
    return payload


def model_file(run_dir: str | Path) -> Path:
    """The model file of a run folder: ``policy.pt`` (RL runs) if present, else ``checkpoint.pt`` (pre-training)."""
    run = Path(run_dir)
    return run / "policy.pt" if (run / "policy.pt").is_file() else run / "checkpoint.pt"


def run_inputs(run_dir: str | Path) -> list[Path]:
    """The files a ``GPRPolicy`` of ``run_dir`` reads (model, tokenizer ids): what its behaviour depends on."""
    tok = _tokenizer_dir(Path(run_dir))
    return [model_file(run_dir), tok / IDS_FILE if tok.is_dir() else tok]


def load_run_model(run_dir: str | Path) -> tuple[GPRModel, WorldTokenizer]:
    """The generator and tokenizer of a run folder: ``policy.pt`` (RL runs) or ``checkpoint.pt`` (pre-training).

    Raises:
        ValueError: naming the path, if the folder, model file or tokenizer is missing or unreadable, or
            the model does not fit the tokenizer.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"{run}: not a run folder (expected agents.pretrain or agents.hepo output)")
    path = model_file(run)
    payload = read_policy(path) if path.name == "policy.pt" else read_checkpoint(path)
    tok_dir = _tokenizer_dir(run)
    try:
        tok = WorldTokenizer.load(tok_dir)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from e
    model = model_from_payload(path, payload)
    if tuple(model.cfg.level_sizes) != tuple(tok.level_sizes):
        raise ValueError(
            f"{path}: model level sizes {list(model.cfg.level_sizes)} differ from the tokenizer's "
            f"{list(tok.level_sizes)} in {tok_dir}"
        )
    return model, tok


RANKS = ("logprob", "value")
"""what orders the beam's items before the top ``num_candidates`` are served (module doc)"""
DEFAULT_RANK = "logprob"
"""``rank`` when not given. Measured on the small world (25,600-request cascade log, MTP 300 + VAFT 200
steps, beam 8, one training seed unless stated): value ranking raises the myopic oracle_share (1024 fixed
first requests) by +3.2 points (95% CI [+0.9, +5.4]; a second seed +1.0 [-1.3, +3.3]) with the candidate's
features in the HTE, but lowers the online reward per session from 1.10 [0.98, 1.22] to 0.90 [0.79, 1.01]
and the revenue per session from 0.95 to 0.74 (``agents.evaluate``, 512 sessions; impressions per request
0.56 -> 0.42; the second seed: reward 1.07 -> 0.92, revenue 0.91 -> 0.77). The HTE's target is the value given an impression, which does not price the chance of winning
the slot: a likely cause, not verified. Log-probability ranking stays the default."""


class GPRPolicy:
    """Top-K eligible ads by beam search with a ``GPRModel`` (module doc).

    Args:
        env: an ads-v0 vector env or a ``BatchedMarket``; the model runs on its device.
        run_dir: an ``agents.pretrain`` or ``agents.hepo`` run folder (``load_run_model``).
        beam_width: beams per level; raised to ``num_candidates`` when smaller.
        seed: seed of the refiner noise generator.
        rank: one of ``RANKS`` (module doc); ``"value"`` needs the model's HTE.
        precision: ``fp32`` (the reference every reported evaluation so far used) or ``bf16``: the model's
            forward passes under bfloat16 autocast (``gpr_sim.model.precision``), about half the activation
            memory; near-tied beams may then rank differently, so compare agents evaluated at one precision.

    Raises:
        ValueError: naming the path, if the checkpoint or tokenizer is missing, unreadable, or does not
            fit this env's world; or an unknown ``rank``.
    """

    def __init__(
        self,
        env,
        run_dir: str | Path,
        beam_width: int = 8,
        seed: int = 0,
        rank: str = DEFAULT_RANK,
        precision: str = "fp32",
    ):
        model, tok = load_run_model(run_dir)
        self._setup(env, model, tok, beam_width, seed, rank, precision, where=Path(run_dir))

    @classmethod
    def from_model(
        cls,
        env,
        model: GPRModel,
        tokenizer: WorldTokenizer,
        beam_width: int = 8,
        seed: int = 0,
        rank: str = DEFAULT_RANK,
        precision: str = "fp32",
    ):
        """A policy over an in-memory model (e.g. during training); the model is used as is, not copied."""
        policy = cls.__new__(cls)
        policy._setup(env, model, tokenizer, beam_width, seed, rank, precision, where="model")
        return policy

    def _setup(
        self,
        env,
        model: GPRModel,
        tok: WorldTokenizer,
        beam_width: int,
        seed: int,
        rank: str,
        precision: str,
        where,
    ) -> None:
        self.precision = check_precision(precision)
        if rank not in RANKS:
            raise ValueError(f"rank={rank!r} is unknown: expected one of {list(RANKS)}")
        if rank == "value" and model.hte is None:
            raise ValueError(f"{where}: rank='value' needs the model's HTE (GPRConfig.hte is False)")
        self.rank = rank
        self.env = batched_env(env)
        self.device = torch.device(self.env.device)
        world = self.env.world
        self.k = int(world.config.num_candidates)
        self.beam_width = max(int(beam_width), self.k)
        try:
            tok.check_world(world)
        except ValueError as e:
            raise ValueError(f"{where}: tokenizer: {e}") from e
        self.tokenizer = tok.to(self.device)
        self.schema = SchemaConfig.from_world(world.config)
        if model.cfg.max_len != self.schema.seq_len:
            raise ValueError(
                f"{where}: model max_len={model.cfg.max_len}, this world's token layout has {self.schema.seq_len}"
            )
        check_dense_dim(
            model.cfg.dense_dim,
            world.config,
            model.cfg.platform_features,
            str(where),
            market_features=model.cfg.market_features,
        )
        reads = model.cfg.platform_features or model.cfg.hte_ad_features > 0
        self.features = PlatformFeatures.from_world(world).to(self.device) if reads else None
        self.token_features = self.features if model.cfg.platform_features else None
        self.ad_features = self.features if model.cfg.hte_ad_features else None  # the HTE's candidate input
        self.model = model.to(self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @torch.no_grad()
    def act(self, obs: dict[str, torch.Tensor]) -> PolicyOutput:
        with precision_context(self.device, self.precision):
            return self._act(obs)

    def _act(self, obs: dict[str, torch.Tensor]) -> PolicyOutput:
        market = self.env.market_features() if self.model.cfg.market_features else None  # the obs's market
        tokens = tokens_from_obs(
            obs, self.tokenizer.table, self.schema, check=False, features=self.token_features, market=market
        ).to(self.device)
        n = tokens.token_ids.shape[0]
        was_training = self.model.training
        self.model.eval()
        ctx = self.model.context(tokens, self.generator, segments=self.schema.segments)  # no device sync
        self.model.train(was_training)
        # the cached PTD of the rollout and the incremental decoder: context K/V once per request, read
        # per request (not gathered per beam) at every level
        kv = head_context_kv(self.model, ctx)
        step_fn = request_major_step(self.model.ptd.level_logits_cached, kv, n)
        eligible = self.env.eligible_ads().to(self.device)
        res = beam_search(
            step_fn,
            self.tokenizer.trie,
            batch_size=n,
            beam_width=self.beam_width,
            top_k=self.beam_width if self.rank == "value" else self.k,
            eligible=eligible,
        )
        items = res.items if self.rank == "logprob" else self._by_value(ctx, res.items, res.codes)
        best = items[:, :1].clamp_min(0)  # a row with no item at all gets ad 0 (module doc)
        action = torch.where(items >= 0, items, best)
        return PolicyOutput(action, torch.ones(n, dtype=torch.float64, device=self.device))

    def _by_value(self, ctx: torch.Tensor, items: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(B, W) beam items, (B, W, L') paths -> (B, num_candidates) items of the highest HTE full-item value,
        ties (and missing items, -1, ranked last) in beam order."""
        feats = path_ad_features(self.tokenizer, self.ad_features, codes)  # (B, W, F_ad) or None
        value = self.model.path_values(ctx, codes.clamp_min(0), feats)[..., -1].float()  # (B, W)
        value = value.masked_fill(items < 0, float("-inf"))
        order = value.argsort(dim=1, descending=True, stable=True)[:, : self.k]
        return items.gather(1, order)


def gpr_factory(run_dir: str):
    """The registry's ``gpr`` family (``agents.policies``): ``gpr:RUN_DIR`` -> ``factory(env, seed, beam_width=8,
    rank=DEFAULT_RANK, precision="fp32")``.

    A folder without ``checkpoint.pt`` or ``policy.pt`` is rejected here, so ``agents.evaluate`` fails on
    its arguments before any agent runs; the checkpoint and tokenizer themselves are read (and checked)
    by the factory.
    """
    run = Path(run_dir)
    if not ((run / "checkpoint.pt").is_file() or (run / "policy.pt").is_file()):
        raise ValueError(
            f"policy 'gpr:{run_dir}': neither {run / 'policy.pt'} nor {run / 'checkpoint.pt'} exists "
            "(expected an agents.hepo or agents.pretrain run folder)"
        )

    def factory(
        env, seed: int = 0, beam_width: int = 8, rank: str = DEFAULT_RANK, precision: str = "fp32"
    ) -> GPRPolicy:
        return GPRPolicy(env, run_dir, beam_width=beam_width, seed=seed, rank=rank, precision=precision)

    return factory
