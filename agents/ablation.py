"""GPR Table 2 analogue: add one component at a time to an HSTU-style baseline, MTP pre-train, compare.

    python -m agents.ablation --env ads-v0 --seeds 0,1,2 --out runs/ablation \
        [--variants hstu,+mtp,full --steps 100 --select last --threads 1]

Variants (``VARIANTS``): ``hstu`` = every ``GPRConfig`` component off (plain causal attention, one shared
LayerNorm and FFN, no MoR, no thinking / refining tokens, no HTE) and one MTP head; ``+hybrid_attn``,
``+token_ffn``, ``+token_ln``, ``+mor``, ``+thinking``, ``+refining``, ``+hte``, ``+mtp`` = hstu with that
one component on (``+mtp``: 4 heads); ``full`` = every component on, MoR included (``GPRConfig`` leaves
MoR off by default; the paper's full GPR has it), 4 MTP heads. ``+hte`` adds the value heads and their
pre-training loss (``agents.pretrain --value-coef``: every prefix of the shown ad regresses on its
final_value) trained jointly with the trunk (``--value-trunk``): beam search under ``agents.pretrain``'s eval
does not read the values, so the shared trunk is the only way the HTE can change HitRate. ``full`` keeps
``agents.pretrain``'s default, an HTE on detached features (the paper's gain also has value-guided decoding
and HEPO behind it).

Every variant and seed trains on ONE log and ONE tokenizer (collected / fitted once into ``OUT/shared``
with ``agents.pretraining.data.ensure_inputs``), the same held-out session split (``--split-seed``), steps, batch
size and learning rate: an ``agents.pretraining`` mtp stage into ``OUT/VARIANT/seedS``. A run whose
``summary.json`` exists is skipped; a half-done one resumes from its ``checkpoint.pt``.

Table (``OUT/table2.csv``, ``OUT/table2.json``, ``OUT/table2.png``, printed): per variant the mean over
seeds of held-out HitRate@K and nDCG@K of MTP head 0 (the final evaluation, or with ``--select best`` the
best one; note the best is picked on the same held-out requests, so it is optimistic), with t intervals
over seeds; the paired difference to hstu (same seeds) with its t interval; the popularity baseline;
and the paper's Table 2 HitRate@100 (%) with its difference to HSTU, for reference only: the paper's
numbers come from a production system, K = 100 and far larger models and logs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from agents.cli import check_args, parse_args, run_main
from agents.pretraining.config import SELECT, PretrainConfig
from agents.pretraining.data import ensure_inputs
from agents.pretraining.trainer import pretrain
from agents.rl import distributed
from gpr_sim.runs import atomic_write_bytes, figure_bytes, read_json, write_json
from gpr_sim.stats import nan_estimate, paired_difference, t_interval

HSTU = {
    "hybrid_attention": False,
    "token_aware_ln": False,
    "token_aware_ffn": False,
    "mixture_of_recursions": False,
    "thinking": False,
    "refining": False,
    "hte": False,
    "mtp_heads": 1,
}
"""the HSTU-style baseline: every GPR component off, one MTP head"""
FULL_HEADS = 4
"""MTP heads of ``+mtp`` and ``full`` (GPR DEFAULT N = 4)"""
VARIANTS: dict[str, dict] = {
    "hstu": HSTU,
    "+hybrid_attn": {**HSTU, "hybrid_attention": True},
    "+token_ffn": {**HSTU, "token_aware_ffn": True},
    "+token_ln": {**HSTU, "token_aware_ln": True},
    "+mor": {**HSTU, "mixture_of_recursions": True},
    "+thinking": {**HSTU, "thinking": True},
    "+refining": {**HSTU, "refining": True},
    "+hte": {**HSTU, "hte": True, "value_trunk": True},
    "+mtp": {**HSTU, "mtp_heads": FULL_HEADS},
    "full": {**{k: True for k in HSTU if k != "mtp_heads"}, "mtp_heads": FULL_HEADS},
}
"""variant -> ``agents.pretrain`` component settings (Table 2 order)"""
PAPER_HITRATE_100 = {
    "hstu": 18.98,
    "+hybrid_attn": 20.56,
    "+token_ffn": 21.98,
    "+token_ln": 20.76,
    "+mor": 20.09,
    "+thinking": 21.75,
    "+refining": 19.61,
    "+hte": 19.91,
    "+mtp": 22.38,
    "full": 27.32,
}
"""GPR paper, Table 2: HitRate@100 (%) of HSTU with one component added, and the full GPR"""


@dataclass(frozen=True)
class Args:
    """CLI of ``python -m agents.ablation``."""

    env: str = "ads-v0"
    """Gymnasium id of the environment the shared log comes from"""
    seeds: str = "0,1,2"
    """comma list of training seeds (model init, batch sampler)"""
    variants: str = ""
    """comma list of variants to run (subset of hstu,+hybrid_attn,+token_ffn,+token_ln,+mor,+thinking,+refining,+hte,+mtp,full); empty = all"""
    out: str = "runs/ablation"
    """output folder: shared/ (log, tokenizer), VARIANT/seedS/ (pretrain runs), table2.*"""
    steps: int = 100
    """optimiser steps of every run"""
    batch_size: int = 128
    """requests per step"""
    lr: float = 1e-3
    """AdamW learning rate"""
    d_model: int = 64
    """model width"""
    n_layers: int = 2
    """HSD blocks"""
    n_heads: int = 2
    """attention heads"""
    eval_every: int = 25
    """steps between held-out evaluations (candidates of --select best)"""
    eval_requests: int = 512
    """held-out requests ranked by beam search"""
    top_k: int = 10
    """K of HitRate@K and nDCG@K"""
    beam_width: int = 20
    """beams per level in the offline eval (>= top_k)"""
    split_seed: int = 0
    """seed of the train / held-out session split (shared by every run)"""
    data_seed: int = 0
    """seed of the shared log collection and tokenizer fit"""
    collect_envs: int = 64
    """sessions of the shared collected log"""
    collect_steps: int = 100
    """steps of the shared collected log"""
    select: str = "last"
    """last | best: which evaluation of each run the table reports (and the run's selected checkpoint)"""
    level: float = 0.95
    """coverage of the t intervals over seeds"""
    threads: int = 1
    """torch CPU threads; 0 = torch's default"""
    device: str = "cpu"
    """torch device"""
    progress: bool = False
    """progress bars of the pretrain runs"""

    def __post_init__(self) -> None:
        check_args(self)
        self.seed_list()
        self.variant_list()
        if self.select not in SELECT:
            raise ValueError(f"select={self.select!r} is unknown: expected one of {list(SELECT)}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level={self.level} is invalid: expected in (0, 1)")
        # the rest is checked by PretrainConfig: build one now so a bad flag fails before any run
        self.pretrain_args(VARIANTS["full"], 0, Path("."))

    def seed_list(self) -> list[int]:
        try:
            seeds = [int(s) for s in self.seeds.split(",") if s.strip()]
        except ValueError as e:
            raise ValueError(f"seeds={self.seeds!r} is invalid: expected a comma list of ints") from e
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds={self.seeds!r} is invalid: expected distinct ints, at least one")
        return seeds

    def variant_list(self) -> list[str]:
        names = [v.strip() for v in self.variants.split(",") if v.strip()] or list(VARIANTS)
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants {unknown} unknown: expected a subset of {list(VARIANTS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"variants={self.variants!r} lists a variant twice")
        return [v for v in VARIANTS if v in names]  # Table 2 order

    def pretrain_args(
        self, switches: dict, seed: int, out: Path, logs: str = "", tokenizer: str = ""
    ) -> PretrainConfig:
        return PretrainConfig(
            env=self.env,
            stage="mtp",
            logs=logs,
            tokenizer=tokenizer,
            out=str(out),
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=seed,
            device=self.device,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            eval_every=self.eval_every,
            checkpoint_every=self.steps,
            eval_requests=self.eval_requests,
            top_k=self.top_k,
            beam_width=self.beam_width,
            split_seed=self.split_seed,
            collect_envs=self.collect_envs,
            collect_steps=self.collect_steps,
            threads=self.threads,
            progress=self.progress,
            select=self.select,
            **switches,
        )


# ----------------------------------------------------------------------------- runs


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed{seed}"


def shared_inputs(args: Args, out: Path) -> tuple[Path, Path]:
    """The one log and tokenizer of every run, collected / fitted into ``OUT/shared`` on first use."""
    shared = out / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    return ensure_inputs(args.pretrain_args(VARIANTS["hstu"], args.data_seed, shared), shared)


def run_one(
    args: Args, variant: str, seed: int, logs: Path, tok: Path, out: Path
) -> tuple[dict, float | None]:
    """One pretrain run (skipped when its summary exists): its summary and the seconds it took (None = skipped)."""
    folder = run_dir(out, variant, seed)
    summary_path = folder / "summary.json"
    if summary_path.is_file():
        summary = read_json(summary_path)
        if summary.get("steps") == args.steps and summary.get("select") == args.select:
            return summary, None
        if summary.get("steps", 0) > args.steps:
            raise ValueError(
                f"{folder}: trained for {summary.get('steps')} steps > --steps {args.steps}: "
                "use another --out"
            )
    cfg = args.pretrain_args(VARIANTS[variant], seed, folder, str(logs), str(tok))
    t0 = time.perf_counter()
    summary = distributed.launch(pretrain, cfg)
    return summary, time.perf_counter() - t0


# ----------------------------------------------------------------------------- table


def _row_metrics(summary: dict, select: str) -> dict:
    if select == "best" and summary.get("best"):
        return summary["best"]["metrics"]
    return summary["final"]


def build_table(results: dict[str, dict[int, dict]], args: Args) -> pd.DataFrame:
    """One row per variant: means over seeds, t intervals, paired deltas to hstu, the paper's numbers."""
    k, rows = args.top_k, []
    base = results.get("hstu", {})
    for variant, by_seed in results.items():
        row: dict = {"variant": variant, "seeds": len(by_seed)}
        metrics = {s: _row_metrics(summ, args.select) for s, summ in by_seed.items()}
        row["step"] = float(np.mean([m["step"] for m in metrics.values()]))
        common = [s for s in metrics if s in base]  # seeds hstu ran too: the pairs of the paired difference
        for name in (f"hitrate@{k}", f"ndcg@{k}"):
            values = [m[f"eval/{name}"] for m in metrics.values()]
            row.update(t_interval(values, args.level, nan_policy="propagate").columns(name))
            x = [metrics[s][f"eval/{name}"] for s in common]
            y = [_row_metrics(base[s], args.select)[f"eval/{name}"] for s in common]
            delta = paired_difference(x, y, args.level, nan_policy="propagate") if common else nan_estimate()
            row.update(delta.columns(f"delta_{name}"))
        row[f"pop_hitrate@{k}"] = float(np.mean([m[f"eval/pop_hitrate@{k}"] for m in metrics.values()]))
        row["paper_hitrate@100"] = PAPER_HITRATE_100[variant]
        row["paper_delta_hitrate@100"] = round(PAPER_HITRATE_100[variant] - PAPER_HITRATE_100["hstu"], 2)
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame, k: int, level: float) -> str:
    """Human-readable table: value [CI] per metric, deltas to hstu, the paper's HitRate@100."""
    lines = {}
    for _, r in table.iterrows():
        cell = {}
        for name in (f"hitrate@{k}", f"ndcg@{k}"):
            cell[name] = f"{r[name]:.3f} [{r[f'{name}_ci_low']:.3f}, {r[f'{name}_ci_high']:.3f}]"
            d = f"delta_{name}"
            cell[f"d {name}"] = f"{r[d]:+.3f} [{r[f'{d}_ci_low']:+.3f}, {r[f'{d}_ci_high']:+.3f}]"
        cell["seeds"] = int(r["seeds"])
        cell[f"pop hr@{k}"] = f"{r[f'pop_hitrate@{k}']:.3f}"
        cell["paper hr@100 %"] = f"{r['paper_hitrate@100']:.2f} ({r['paper_delta_hitrate@100']:+.2f})"
        lines[r["variant"]] = cell
    return (
        f"mean over seeds [{level:.0%} t interval]; d = paired difference to hstu\n"
        + pd.DataFrame(lines).T.to_string()
    )


def plot_table(table: pd.DataFrame, path: Path, k: int, level: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(table))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, name in zip(axes[:2], (f"hitrate@{k}", f"ndcg@{k}")):
        v = table[name].to_numpy(float)
        err = np.nan_to_num(np.stack([v - table[f"{name}_ci_low"], table[f"{name}_ci_high"] - v]), nan=0.0)
        ax.bar(x, v, yerr=err, capsize=3, color="tab:blue")
        ax.axhline(
            table[f"pop_hitrate@{k}"].iloc[0] if name.startswith("hit") else np.nan,
            color="grey",
            linestyle="--",
            label="popularity",
        )
        ax.set_xticks(x, table["variant"], rotation=45, ha="right")
        ax.set_title(f"held-out {name} (mean over seeds, {level:.0%} t CI)")
    axes[0].legend(fontsize=8)
    axes[2].bar(x, table["paper_hitrate@100"], color="tab:orange")
    axes[2].set_xticks(x, table["variant"], rotation=45, ha="right")
    axes[2].set_title("GPR paper Table 2: HitRate@100 (%)")
    fig.tight_layout()
    atomic_write_bytes(path, figure_bytes(fig, dpi=110))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run (or reuse) every variant x seed, then write and print the table; returns it."""
    args = parse_args(Args, argv, __doc__)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ablation_config.json", dataclasses.asdict(args))
    t0 = time.perf_counter()
    logs, tok = shared_inputs(args, out)
    t_shared = time.perf_counter() - t0
    results: dict[str, dict[int, dict]] = {}
    seconds: dict[str, dict[int, float | None]] = {}
    for variant in args.variant_list():
        for seed in args.seed_list():
            summary, took = run_one(args, variant, seed, logs, tok, out)
            results.setdefault(variant, {})[seed] = summary
            seconds.setdefault(variant, {})[seed] = took
            state = "skipped (done)" if took is None else f"{took:.1f}s"
            print(f"[ablation] {variant} seed {seed}: {state}")
    table = build_table(results, args)
    k = args.top_k
    atomic_write_bytes(out / "table2.csv", table.to_csv(index=False).encode())
    runs = {
        v: {
            str(s): {
                "metrics": _row_metrics(summ, args.select),
                "seconds": seconds[v][s],
                "selected_checkpoint": summ.get("selected_checkpoint"),
            }
            for s, summ in by.items()
        }
        for v, by in results.items()
    }
    write_json(
        out / "table2.json",
        {
            "config": dataclasses.asdict(args),
            "variants": {v: VARIANTS[v] for v in results},
            "table": table.to_dict(orient="records"),
            "runs": runs,
            "seconds": {"shared_inputs": t_shared, "total": time.perf_counter() - t0},
        },
    )
    plot_table(table, out / "table2.png", k, args.level)
    print(format_table(table, k, args.level))
    print(f"[ablation] {out}/table2.csv, table2.json, table2.png ({time.perf_counter() - t0:.1f}s)")
    return table


if __name__ == "__main__":
    run_main(main)
