"""The held-out evaluation of a generator during RL: online metrics on fixed sessions and candidate quality.

Every evaluation of an ``agents.hepo`` run (and of every algorithm and seed) sees the same sessions: a
separate market of the env's default world, reset with a fixed seed. It serves the generator (beam search,
top-1 served) and reports, keyed as ``metrics.jsonl`` holds them (``agents.reporting.keys``):

- ``eval/{metric}``: reward, revenue, GMV, CTR, CVR, CTCVR... per session with their CIs (``gpr_sim.metrics``);
- ``eval/strata/...``: the same per user-activity tier and for new / old ads (Table 5, values only);
- ``eval/cand_*``: Table 3 candidate quality (nDCG, OPR, mean / max / top-1 normalised final_value of the
  top-K beam) on the first request of every session;
- ``eval/oracle_share`` (+ interval) and ``eval/oracle_fatigue_share``: the true value the served generator
  picks on ``oracle_states`` fixed requests as a share of the myopic oracle's (``agents.evaluation.oracle_share``),
  the deterministic learning curve.

With ``auction`` (a funnel file or platform folder, ``agents.evaluation.auction``) the held-out market and the
``oracle_share`` states run the auction on that learned pCTR/pCVR instead of the privileged estimate: the same
market the run trained in (``agents.hepo --auction``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from agents.evaluation.auction import attach_auction_model, auction_funnel_file
from agents.evaluation.oracle_share import OracleShareConfig, RequestStates, best_true_values, oracle_share
from agents.evaluation.paired import difference_row, pair_sessions
from agents.evaluation.sessions import collect_sessions
from agents.policies.gpr import GPRPolicy, load_run_model
from agents.reporting.keys import BEST_METRIC, STRATA_METRICS, margin_key, strata_key
from envs import make_vec_env
from gpr_sim.decoding import beam_search
from gpr_sim.metrics import METRICS, summarize, summarize_strata
from gpr_sim.model import GPRModel
from gpr_sim.model.offline_eval import candidate_metrics
from gpr_sim.model.precision import check_precision, precision_context
from gpr_sim.platform.features import PlatformFeatures
from gpr_sim.schema import SchemaConfig, tokens_from_obs


@dataclass(frozen=True)
class HeldOutConfig:
    """Which held-out sessions an RL run is evaluated on and how its generator is served there (the
    defaults are ``agents.hepo``'s ``--eval-*`` flags)."""

    env: str = "ads-v0"
    """Gymnasium id of the environment"""
    preset: str = "small"
    """world preset (the one the generator was trained in)"""
    device: str = "cpu"
    """torch device of the env and the model"""
    num_envs: int = 128
    """concurrent evaluation sessions (env slots)"""
    sessions: int = 256
    """held-out sessions per evaluation (each slot records ceil(sessions / num_envs))"""
    seed: int = 12345
    """reset seed of the evaluation market (the same users for every algorithm and iteration)"""
    beam_width: int = 8
    """beam width of the served policy"""
    precision: str = "fp32"
    """fp32 (the reference) | bf16: the served policy's and the candidate metrics' forward passes under bfloat16
    autocast (``GPRPolicy``)"""
    candidates: int = 40
    """K of the candidate-quality metrics (beam width = K)"""
    oracle_states: int = 256
    """fixed request states of ``eval/oracle_share`` (the first request of as many sessions, same seed)"""
    progress: bool = True
    """progress bar of the session loop"""
    auction: str = ""
    """a funnel file or platform folder whose learned pCTR/pCVR the held-out market's auction (and the
    ``oracle_share`` states') ranks on (``agents.evaluation.auction``); empty = the privileged auction"""

    def __post_init__(self) -> None:
        auction_funnel_file(self.auction)  # neither a funnel file nor a platform folder: fails here
        check_precision(self.precision)
        for name, lo in (
            ("num_envs", 1),
            ("sessions", 1),
            ("beam_width", 1),
            ("candidates", 2),
            ("oracle_states", 1),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r} is invalid: expected an integer >= {lo}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} is invalid: expected an integer")

    @property
    def sessions_per_slot(self) -> int:
        return math.ceil(self.sessions / self.num_envs)

    @property
    def oracle_share(self) -> OracleShareConfig:
        """The request states of ``eval/oracle_share``: a market of ``oracle_states`` slots of the same world,
        reset with the same seed."""
        return OracleShareConfig(
            env=self.env,
            preset=self.preset,
            device=self.device,
            states=self.oracle_states,
            seed=self.seed,
            auction=self.auction,
        )


class Evaluator:
    """Held-out sessions of a separate market with a fixed seed: online metrics, candidate quality and
    ``oracle_share`` on fixed request states (built once, valued at every evaluation); both markets' auction
    is ``config.auction``'s."""

    def __init__(self, config: HeldOutConfig, tokenizer):
        self.config = config
        self.env = make_vec_env(
            config.env, config.num_envs, preset=config.preset, device=config.device, validate_actions=False
        )
        attach_auction_model(self.env, config.auction)
        self.tok = tokenizer.to(config.device)
        self.features = PlatformFeatures.from_world(self.env.unwrapped.world).to(config.device)
        self.states = RequestStates.build(config.oracle_share)
        self.sessions: pd.DataFrame | None = None
        """the session records of the last evaluation (``collect_sessions``), for ``paired_margin``"""

    @torch.no_grad()
    def oracle_share(self, model: GPRModel) -> dict[str, float]:
        """``eval/oracle_share`` (+ interval), ``eval/oracle_fatigue_share``, ``eval/policy_value`` and
        ``eval/oracle_value`` of the served generator (top-1 of the beam) on the fixed request states."""
        c = self.config
        policy = GPRPolicy.from_model(
            self.states.env, model, self.tok, beam_width=c.beam_width, seed=c.seed, precision=c.precision
        )
        return {f"eval/{k}": v for k, v in oracle_share(policy, self.states).items()}

    @torch.no_grad()
    def candidates(self, model: GPRModel) -> dict[str, float]:
        """Table 3 metrics of the top-K beam on the first request of every evaluation session."""
        c, e = self.config, self.env.unwrapped
        obs, _ = self.env.reset(seed=c.seed)
        features = self.features if model.cfg.platform_features else None
        market = e.market_features() if model.cfg.market_features else None
        schema = SchemaConfig.from_world(e.config)
        tokens = tokens_from_obs(obs, self.tok.table, schema, check=False, features=features, market=market)
        gen = torch.Generator(device=c.device).manual_seed(c.seed)
        eligible = e.eligible_ads()  # (num_ads,) bool: the market's, the same for every request
        k = c.candidates
        with precision_context(c.device, c.precision):  # the served policy's precision
            ctx = model.context(tokens, gen, segments=schema.segments)
            step_fn, _ = model.beam_fns(ctx, cached=True)
            res = beam_search(
                step_fn, self.tok.trie, batch_size=ctx.shape[0], beam_width=k, top_k=k, eligible=eligible
            )
        present = res.items >= 0  # (N, K)
        values = e.score(res.items.clamp_min(0), truth=True).value  # (N, K)
        metrics = candidate_metrics(values, present, best_true_values(e).to(values.dtype))
        return {f"eval/cand_{k}": v for k, v in metrics.items()}

    @staticmethod
    def strata(sessions) -> dict[str, float]:
        """Table 5 scalars: per user-activity tier and ad age group (``summarize_strata``, normal CIs: no
        resampling), the held-out sessions in the group and the value of each of its ``STRATA_METRICS``
        (no interval), keyed ``strata_key`` (``eval/strata/activity_tier/3/ctr``); NaN for an empty group."""
        out: dict[str, float] = {}
        for r in summarize_strata(sessions, prefix="eval/").to_dict("records"):
            stratum, group = r["stratum"], r["group"]
            out[strata_key(stratum, group, "sessions")] = int(r["eval/sessions"])
            out.update(
                {strata_key(stratum, group, m): float(r[f"eval/{m}"]) for m in STRATA_METRICS[stratum]}
            )
        return out

    def __call__(self, model: GPRModel) -> dict[str, float]:
        c = self.config
        was_training = model.training
        model.eval()
        policy = GPRPolicy.from_model(
            self.env, model, self.tok, beam_width=c.beam_width, seed=c.seed, precision=c.precision
        )
        sessions, _ = collect_sessions(self.env, policy, c.sessions_per_slot, c.seed, progress=c.progress)
        self.sessions = sessions
        out = {k: v for k, v in summarize(sessions, prefix="eval/").items() if isinstance(v, (int, float))}
        out.update(self.strata(sessions))
        out.update(self.candidates(model))
        out.update(self.oracle_share(model))
        model.train(was_training)
        return out


MARGIN_METRIC = next(m for m in METRICS if f"eval/{m.name}" == BEST_METRIC)
"""the metric ``paired_margin`` compares: the one a run's best policy is chosen by"""


def paired_margin(
    sessions: pd.DataFrame, reference: pd.DataFrame | None, against: str = "best", level: float = 0.95
) -> dict[str, float]:
    """``margin_key(against)`` (+ ``_ci_low`` / ``_ci_high``): this evaluation minus an earlier one of the
    same run (``against``: "best", the best before it, or "start", iteration 0's), paired by session
    (``agents.evaluation.paired``: every evaluation of a run resets the same market with the same seed, so a slot's
    sessions share their user and, while the lengths agree, their draws); {} without ``reference``.

    Why: the best policy is the evaluation with the highest ``BEST_METRIC``, and neighbouring iterations often
    differ by less than one evaluation's interval (benchmarks/RESULTS.md, "A fourth seed of the learners"); the
    paired difference says whether a new best won by more than its sessions' noise, and whether RL's gain over its
    start is one the evaluation resolves; the unpaired intervals of the two rows cannot."""
    if reference is None:
        return {}
    a, b = pair_sessions(sessions, reference)
    d = difference_row(a, b, MARGIN_METRIC, level)
    key = margin_key(against)
    return {key: d["difference"], f"{key}_ci_low": d["ci_low"], f"{key}_ci_high": d["ci_high"]}


def mtp_candidates(evaluate: Evaluator, vaft: Path, device: str) -> dict[str, float]:
    """Table 3 metrics of the MTP stage the VAFT generator started from (``eval/mtp/cand_*``), logged
    beside the iteration-0 evaluation so the table reads MTP -> VAFT -> RL; {} without an MTP checkpoint."""
    mtp = vaft.parent / "mtp"
    if not (mtp / "checkpoint.pt").is_file():
        return {}
    model, _ = load_run_model(mtp)
    return {
        k.replace("eval/", "eval/mtp/", 1): v for k, v in evaluate.candidates(model.to(device).eval()).items()
    }
