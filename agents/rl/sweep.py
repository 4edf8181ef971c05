"""The learning-rate grid of the RL learners (``SweepConfig``, the CLI of ``python -m agents.sweep``): every
variant x seed x algorithm x learning rate one RL run (``agents.rl.trainer.train``) from the seed's shared
pre-training (``plan``, ``run_grid``), the runs' table (``sweep_table``) and the final comparison of the runs each
algorithm's selected learning rate picked, on other sessions (``evaluate_selected``). The entry point's doc
describes the protocol; ``agents.reporting.sweep`` holds the selection and the tables' pure functions."""

import dataclasses
import hashlib
import json
import math
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

import pandas as pd
import tyro

from agents.cli import check_out, parse_args
from agents.evaluation.compare import EvalConfig
from agents.evaluation.folder import evaluate_folder
from agents.policies import POLICIES
from agents.policies.learned_cascade import learned_cascade_inputs
from agents.pretraining.pipeline import reward_funnel_file
from agents.reporting.folders import check_runs, update_gradients
from agents.reporting.keys import REWARD_MODEL
from agents.reporting.sweep import (
    FINAL_METRICS,
    comparison_table,
    lr_name,
)
from agents.rl import distributed
from agents.rl.config import ENTRY, PROFILES, RESUME_IGNORES, RLConfig, pretraining, record_defaults
from agents.rl.registry import ALGOS
from agents.rl.selection import BEST_DIR
from agents.rl.trainer import train
from gpr_sim.runs import read_json, read_owner, settings_diff, write_json
from gpr_sim.stats import CIConfig

SET_BY_SWEEP = ("--algo", "--lr", "--seed", "--out", "--pretrain-dir")
"""``agents.hepo`` flags the sweep sets for every run (not allowed after ``--`` or in a variant)"""
BASE = "base"
"""the one variant of a sweep without ``--variants``"""
PRETRAIN = "pretrain"
"""``OUT/pretrain``: the shared pre-training folders (not a variant name)"""
LEARNED_CASCADE = "learned-cascade"
"""``--references`` name of the seed's pre-training platform (``PRETRAIN_DIR/platform``)"""
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class SweepConfig:
    """A learning-rate sweep (the CLI of ``python -m agents.sweep``); the ``agents.hepo`` flags of every run follow ``--``."""

    algos: str = ",".join(ALGOS)
    """comma list of algorithms (``agents.rl.registry.ALGOS``)"""
    lrs: str = "3e-5,1e-4,3e-4"
    """comma list of learning rates, each > 0"""
    seeds: str = "0,1"
    """comma list of training seeds (pre-training, rollouts, updates)"""
    variants: str = ""
    """``NAME=FLAGS;NAME2=FLAGS``: extra agents.hepo flags per variant, the whole grid run per variant (e.g.
    ``g8=--group-size 8;g40=--group-size 40``); empty = one variant ``base`` without extra flags"""
    out: str = "runs/sweep"
    """output folder: pretrain/, VARIANT/ALGO/lrLR/seedS/ (agents.hepo runs), VARIANT/final/, the tables"""
    select_metric: str = "eval/oracle_share"
    """metric of each run's last training-time evaluation that picks each algorithm's lr (mean over seeds, max)"""
    policy: Literal["last", "best"] = "last"
    """which policy of each run is selected on and compared: ``last`` (the run's end) or ``best`` (``RUN/best``,
    its evaluation with the highest held-out reward per session: ``agents.rl.selection.keep_best``); the final
    comparison's sessions (``--final-eval-seed``) are not the ones that chose it"""
    final: bool = True
    """evaluate the selected runs on --final-eval-seed (comparison.csv); off = grid and selection only"""
    final_eval_seed: int = 54321
    """reset seed of the final comparison's sessions and oracle_share states (must differ from --eval-seed)"""
    final_sessions: int = 0
    """sessions per agent of the final comparison; 0 = the runs' --eval-sessions"""
    reference_algo: str = "hepo"
    """algorithm every other agent of the final comparison is compared with (paired over seeds)"""
    references: str = "cascade-privileged,learned-cascade"
    """comma list of reference policies in the final comparison: built-in names (agents.policies) or
    learned-cascade (the seed's pre-training platform; skipped when the pipeline has none); empty = none"""
    level: float = 0.95
    """coverage of the t intervals over seeds"""
    hepo_flags: Annotated[tuple[str, ...], tyro.conf.Suppress] = ()
    """the agents.hepo flags after ``--`` (every run)"""

    def __post_init__(self) -> None:
        check_out(self.out)
        algos, lrs, seeds = self.algo_list(), self.lr_list(), self.seed_list()
        unknown = [a for a in algos if a not in ALGOS]
        if unknown:
            raise ValueError(f"algos={self.algos!r}: unknown {unknown}: expected some of {list(ALGOS)}")
        if self.final and self.reference_algo not in algos:
            raise ValueError(f"reference_algo={self.reference_algo!r} is not one of --algos {self.algos!r}")
        for ref in self.reference_list():
            if ref != LEARNED_CASCADE and ref not in POLICIES:
                raise ValueError(
                    f"references={self.references!r}: {ref!r} is unknown: expected some of "
                    f"{[*POLICIES, LEARNED_CASCADE]}"
                )
        if self.policy not in ("last", "best"):
            raise ValueError(f"policy={self.policy!r} is invalid: expected 'last' or 'best'")
        if isinstance(self.final_sessions, bool) or self.final_sessions < 0:
            raise ValueError(f"final_sessions={self.final_sessions!r} is invalid: expected an integer >= 0")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level={self.level} is invalid: expected in (0, 1)")
        if not self.select_metric.startswith("eval/"):
            raise ValueError(f"select_metric={self.select_metric!r} is invalid: expected an eval/ metric")
        for name, flags in (("the flags after --", self.hepo_flags), *self.variant_map().items()):
            for token in flags:
                if token.split("=")[0].replace("_", "-") in SET_BY_SWEEP:
                    raise ValueError(
                        f"{name}: {token} is set by the sweep: use --algos, --lrs, --seeds, --out"
                    )
        for variant in self.variant_map():  # agents.hepo's own checks, once per variant, before any run
            a = self.hepo_args(variant, algos[0], lrs[0], seeds[0])
            if self.final and a.eval_seed == self.final_eval_seed:
                raise ValueError(
                    f"final_eval_seed={self.final_eval_seed} is the runs' --eval-seed (variant {variant}): "
                    "the final comparison needs other sessions than the ones that selected the lr"
                )

    def algo_list(self) -> list[str]:
        return _distinct("algos", self.algos, str)

    def lr_list(self) -> list[float]:
        lrs = _distinct("lrs", self.lrs, float)
        bad = [lr for lr in lrs if not (math.isfinite(lr) and lr > 0)]
        if bad:
            raise ValueError(f"lrs={self.lrs!r} is invalid: {bad[0]} is not a finite number > 0")
        if len({lr_name(lr) for lr in lrs}) != len(lrs):
            raise ValueError(
                f"lrs={self.lrs!r} is invalid: two learning rates share a folder name (lr{{:g}})"
            )
        return lrs

    def seed_list(self) -> list[int]:
        return _distinct("seeds", self.seeds, int)

    def reference_list(self) -> list[str]:
        return _distinct("references", self.references, str, allow_empty=True)

    def variant_map(self) -> dict[str, tuple[str, ...]]:
        """Variant name -> its extra ``agents.hepo`` flags, in the order given."""
        if not self.variants.strip():
            return {BASE: ()}
        out: dict[str, tuple[str, ...]] = {}
        for part in (p.strip() for p in self.variants.split(";")):
            name, sep, flags = part.partition("=")
            name = name.strip()
            if not sep or not _NAME.match(name) or name == PRETRAIN:
                raise ValueError(
                    f"variants={self.variants!r}: {part!r} is not NAME=FLAGS with NAME of letters, digits, "
                    f"._+- (and not {PRETRAIN!r})"
                )
            if name in out:
                raise ValueError(f"variants={self.variants!r} names the variant {name!r} twice")
            out[name] = tuple(shlex.split(flags))
        return out

    def argv(
        self, variant: str, algo: str, lr: float, seed: int, pretrain_dir: Path | None = None
    ) -> list[str]:
        """The ``agents.hepo`` command line of one run (``pretrain_dir`` None: this seed's shared one)."""
        pre = self.pretrain_dir(variant, seed) if pretrain_dir is None else pretrain_dir
        return [
            *self.hepo_flags,
            *self.variant_map()[variant],
            *("--algo", algo, "--lr", repr(lr), "--seed", str(seed)),
            *("--out", str(run_dir(Path(self.out), variant, algo, lr, seed)), "--pretrain-dir", str(pre)),
        ]

    def hepo_args(self, variant: str, algo: str, lr: float, seed: int) -> RLConfig:
        """The run's parsed ``RLConfig`` (``agents.hepo``'s flags) (its validation included)."""
        return parse_args(RLConfig, self.argv(variant, algo, lr, seed, Path(self.out)), profiles=PROFILES)

    def pretrain_dir(self, variant: str, seed: int) -> Path:
        """``OUT/pretrain/KEY/seed{S}``: shared by every variant with the same pre-training settings."""
        a = self.hepo_args(variant, self.algo_list()[0], self.lr_list()[0], seed)
        return Path(self.out) / PRETRAIN / pretrain_key(a)[0] / f"seed{seed}"


def _distinct(name: str, text: str, kind: type, allow_empty: bool = False) -> list:
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"{name}={text!r} is invalid: expected a comma list of {kind.__name__}") from e
    if not values and not allow_empty:
        raise ValueError(f"{name}={text!r} is empty: expected at least one value")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}={text!r} lists a value twice")
    return values


# ----------------------------------------------------------------------------- runs


class Run(NamedTuple):
    """One cell of the grid."""

    variant: str
    algo: str
    lr: float
    seed: int
    argv: tuple[str, ...]
    """its ``agents.hepo`` command line"""
    args: RLConfig
    """that command line parsed"""

    @property
    def folder(self) -> Path:
        return Path(self.args.out)

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.algo}/{lr_name(self.lr)}/seed{self.seed}"


def run_dir(out: Path, variant: str, algo: str, lr: float, seed: int) -> Path:
    return out / variant / algo / lr_name(lr) / f"seed{seed}"


def pretrain_key(a: RLConfig) -> tuple[str, dict]:
    """(digest, settings) of the run's pre-training: the MTP and VAFT stage configs without paths, device,
    threads, progress and seed, and the funnel's log size; equal digests share a pipeline folder per seed."""
    drop = {"out", "init", "logs", "tokenizer", "device", "threads", "progress", "seed"}
    mtp, vaft = pretraining(a)
    settings = {
        stage: {k: v for k, v in dataclasses.asdict(cfg).items() if k not in drop}
        for stage, cfg in (("mtp", mtp), ("vaft", vaft))
    }
    settings["funnel"] = {"envs": a.funnel_envs, "steps": a.funnel_steps}
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10], settings


def plan(args: SweepConfig) -> list[Run]:
    """Every run of the grid (variant, seed, algo, lr order), checked against what its folder already holds.

    Raises:
        ValueError: a planned folder holds a run of another entry point or with other settings.
    """
    runs = []
    for variant in args.variant_map():
        for seed in args.seed_list():
            pre = args.pretrain_dir(variant, seed)
            for algo in args.algo_list():
                for lr in args.lr_list():
                    argv = args.argv(variant, algo, lr, seed, pre)
                    run = Run(
                        variant,
                        algo,
                        lr,
                        seed,
                        tuple(argv),
                        parse_args(RLConfig, argv, profiles=PROFILES),
                    )
                    check_folder(run)
                    runs.append(run)
    return runs


def check_folder(run: Run) -> None:
    """Refuse a folder holding another run (``agents.hepo`` would, but only when that run's turn comes)."""
    record = read_owner(run.folder)
    if record is None:
        return
    if record["entry"] != ENTRY:
        raise ValueError(f"{run.folder} holds a run of {record['entry']}, not of {ENTRY}: use another --out")
    diff = settings_diff(
        record.get("settings", {}),
        dataclasses.asdict(run.args),
        RESUME_IGNORES,
        record_defaults(),
    )
    if diff:
        raise ValueError(
            f"{run.folder} holds a run with other settings ({'; '.join(diff)}): use another --out"
        )


def finished(run: Run) -> bool:
    """Whether the run's ``summary.json`` says it is done: ``--iterations`` reached, or stopped on a plateau."""
    path = run.folder / "summary.json"
    if not (path.is_file() and (run.folder / "checkpoint.pt").is_file()):
        return False
    s = read_json(path)
    done = s.get("iterations_run", 0)
    return done >= run.args.iterations or (s.get("plateau_at") is not None and s["plateau_at"] == done)


def run_grid(args: SweepConfig, runs: list[Run]) -> dict[str, float]:
    """Train every unfinished run (one line per run); returns the wall seconds this sweep spent per run
    (``OUT/wall.json``, summed over resumptions)."""
    out = Path(args.out)
    wall_path = out / "wall.json"
    wall = read_json(wall_path) if wall_path.is_file() else {}
    for key, settings in _pretrain_settings(runs).items():
        write_json(out / PRETRAIN / key / "settings.json", settings)
    todo = sum(not finished(r) for r in runs)
    t0 = time.perf_counter()
    for i, run in enumerate(runs, 1):
        head = f"[sweep] {i}/{len(runs)} {run.name}"
        if finished(run):
            print(f"{head}: finished, skipped")
            continue
        start = time.perf_counter()
        distributed.launch(train, run.args)
        took = time.perf_counter() - start
        wall[run.name] = wall.get(run.name, 0.0) + took
        write_json(wall_path, wall)
        todo -= 1
        print(f"{head}: {took:.0f} s ({todo} left, elapsed {time.perf_counter() - t0:.0f} s)")
    return wall


def _pretrain_settings(runs: list[Run]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for run in runs:
        key, settings = pretrain_key(run.args)
        entry = out.setdefault(key, {**settings, "variants": []})
        if run.variant not in entry["variants"]:
            entry["variants"].append(run.variant)
    return out


# ----------------------------------------------------------------------------- tables


def sweep_table(
    runs: list[Run], wall: dict[str, float], select_metric: str, policy: str = "last"
) -> pd.DataFrame:
    """One row per run: its coordinates, iterations, wall seconds (``run_grid``'s: a seed's first run includes
    the pre-training it triggered; NaN for a run trained outside this sweep), the metrics of its ``policy``'s
    evaluation (``last``: the run's last; ``best``: ``RUN/best``'s, at ``policy_iteration``) and the reward
    model's monitor at that iteration (``REWARD_MODEL``: rewarded vs true value of the sampled candidates; NaN
    for runs from before it and at iteration 0), and the update's gradients over the run
    (``agents.reporting.folders.update_gradients``: the policy's and the critic's norms before the clip, the share of
    clipped policy steps)."""
    rows = []
    keys = dict.fromkeys(
        (
            *FINAL_METRICS,
            "eval/oracle_share_ci_low",
            "eval/oracle_share_ci_high",
            select_metric,
            *REWARD_MODEL,
        )
    )
    for run in runs:
        s = read_json(run.folder / "summary.json")
        chosen = s["final"] if policy == "last" else s.get("best")
        if chosen is None:
            raise ValueError(
                f"{run.folder}/summary.json has no best policy (a run from before agents.hepo kept OUT/best): "
                "train it again or pass --policy last"
            )
        if select_metric not in chosen:
            raise ValueError(f"select_metric={select_metric!r} is not a metric of {run.folder}/summary.json")
        rows.append(
            {
                "variant": run.variant,
                "algo": run.algo,
                "lr": run.lr,
                "seed": run.seed,
                "iterations_run": s["iterations_run"],
                "plateau_at": s.get("plateau_at"),
                "env_steps": s["env_steps"],
                "wall_s": wall.get(run.name, math.nan),
                "folder": str(run.folder),
                "policy_iteration": chosen["iteration"],
                **{k: chosen.get(k, math.nan) for k in keys},
                **update_gradients(run.folder),
            }
        )
    return pd.DataFrame(rows)


def selected_runs(runs: list[Run], table: pd.DataFrame) -> dict[str, dict[int, dict[str, Run]]]:
    """variant -> seed -> algo -> its run at the selected lr."""
    chosen = {(r["variant"], r["algo"]): r["lr"] for _, r in table[table["selected"]].iterrows()}
    out: dict[str, dict[int, dict[str, Run]]] = {}
    for run in runs:
        if chosen[(run.variant, run.algo)] == run.lr:
            out.setdefault(run.variant, {}).setdefault(run.seed, {})[run.algo] = run
    return out


# ----------------------------------------------------------------------------- final comparison


def agent_specs(args: SweepConfig, by_algo: dict[str, Run]) -> dict[str, str]:
    """Row name -> ``agents.evaluate`` spec of one seed: each algorithm's selected run (served as during
    training: beam ``--eval-beam``), then the references (``learned-cascade`` only if the seed's pipeline
    fitted a platform)."""
    sub = f"/{BEST_DIR}" if args.policy == "best" else ""
    specs = {algo: f"gpr:{run.folder}{sub}@beam_width={run.args.eval_beam}" for algo, run in by_algo.items()}
    platform = Path(next(iter(by_algo.values())).args.pretrain_dir) / "platform"
    for ref in args.reference_list():
        if ref != LEARNED_CASCADE:
            specs[ref] = ref
        elif all(p.is_file() for p in learned_cascade_inputs(str(platform))):
            specs[ref] = f"{LEARNED_CASCADE}:{platform}"
        else:
            print(f"[sweep] no {platform} (the pipeline's --behaviour is not learned-cascade): no {ref} row")
    return specs


def final_config(args: SweepConfig, by_algo: dict[str, Run], specs: dict[str, str]) -> EvalConfig:
    """The evaluation of one seed's selected runs: the runs' held-out protocol (preset, slots, sessions,
    oracle_share states, auction) reset with ``--final-eval-seed`` instead of their ``--eval-seed``."""
    a = by_algo[args.reference_algo].args
    return EvalConfig(
        agents=tuple(specs.values()),
        env=a.env,
        preset=a.preset,
        num_envs=a.eval_envs,
        sessions=args.final_sessions or a.eval_sessions,
        seed=args.final_eval_seed,
        device=a.device,
        oracle_states=a.eval_states,
        ci=CIConfig(level=args.level),
        reference=specs[args.reference_algo] if len(specs) > 1 else None,
        auction=str(reward_funnel_file(Path(a.pretrain_dir))) if a.auction else "",
    )


def evaluate_selected(args: SweepConfig, chosen: dict[str, dict[int, dict[str, Run]]]) -> pd.DataFrame:
    """Evaluate every seed's selected runs and references into ``OUT/VARIANT/final/seed{S}`` (an
    ``agents.evaluate`` folder: sessions cached, paired by user per seed) and tabulate them over seeds
    (``agents.reporting.sweep.comparison_table``)."""
    values: dict[str, dict[str, dict[int, dict]]] = {}  # variant -> agent -> seed -> metrics
    lrs: dict[str, dict[str, float]] = {}
    for variant, by_seed in chosen.items():
        for seed, by_algo in sorted(by_seed.items()):
            check_runs([r.folder for r in by_algo.values()])  # one auction: comparable numbers
            specs = agent_specs(args, by_algo)
            folder = Path(args.out) / variant / "final" / f"seed{seed}"
            run = evaluate_folder(final_config(args, by_algo, specs), folder, plots=False)
            summary = run.comparison.summary.set_index("agent")
            for name, spec in specs.items():
                values.setdefault(variant, {}).setdefault(name, {})[seed] = summary.loc[spec].to_dict()
            lrs.setdefault(variant, {}).update({algo: r.lr for algo, r in by_algo.items()})
    return comparison_table(values, lrs, args.reference_algo, args.level, args.final_eval_seed)
