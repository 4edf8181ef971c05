"""Pre-train the GPR generator on logs: MTP (GPR §4.1), then value-aware fine-tuning (VAFT, §4.2).

    python -m agents.pretrain --env ads-v0 --stage mtp --out runs/pretrain/mtp [--logs L.parquet] \
        [--tokenizer DIR] [--steps 200 --batch-size 128 --lr 1e-3 --seed 0 --device cpu]
    python -m agents.pretrain --stage vaft --init runs/pretrain/mtp/checkpoint.pt --logs ... \
        --tokenizer runs/pretrain/mtp/tokenizer --out runs/pretrain/vaft

Without ``--logs`` a small cascade log of the ``--preset`` world is collected into ``OUT/logs.parquet``
(``agents.collection``), by the privileged cascade or, with ``--behaviour learned-cascade``, by the learned
cascade ``OUT/../platform`` (fitted when absent on a privileged bootstrap log ``OUT/../funnel/logs.parquet``:
the chain a real platform has, laid out as ``agents.hepo``'s pipeline); without ``--tokenizer`` an RQ-Kmeans+ tokenizer (small, fast settings) is fitted on
the log's world into ``OUT/tokenizer``. Requests are split into train / held-out by session (``episode_id``)
with a fixed split seed, so every stage and seed sees the same held-out sessions.

Loop (``agents.pretraining``: ``config``, ``data``, ``trainer``, ``evaluation``, ``checkpoint``): seed -> data
(tokens, MTP targets, per-level legal masks from the trie, VAFT weights) -> model / AdamW -> {sample a batch,
``mtp_loss``, step, log, evaluate, checkpoint}. The run folder holds
``config.json``, ``metrics.jsonl`` (``train/loss``, ``eval/loss``, ``eval/hitrate@K``, ``eval/ndcg@K``,
``eval/pop_hitrate@K``, ``eval/pop_ndcg@K``, ``train/loss_value``, ``eval/loss_value``, ``eval/value_r2``),
``checkpoint.pt`` (model, optimiser, sampler RNG, step, model config; written atomically), ``best.pt`` and
``summary.json``. Running again into the same folder resumes from ``checkpoint.pt``: the folder is locked
while a run writes it, and a run with other flags than the folder's (bar ``RESUME_IGNORES``: more ``--steps``
continue it) is refused, naming them (``gpr_sim.runs.RunFolder``). A resumed run keeps ``config.json``; a
finished run asked for fewer ``--steps`` keeps its ``summary.json``.

HTE: with ``--value-coef`` > 0 (default 0.5) the value of every prefix of a request's shown ad regresses on
that ad's final_value (``gpr_sim.model.targets.value_targets``: the scoring API's expected value given the
impression, from the logged price and true funnel probabilities), in units of the train side's std
(``summary.json["value_scale"]``). The HTE reads the context detached (as HEPO's critic does) unless
``--value-trunk``: jointly trained, the value loss lowered held-out HitRate@10 in the Table 2 ablation
(``agents.ablation``'s ``+hte``, which sets it; see ``benchmarks/RESULTS.md``). Measured on a
25,600-request cascade log: a ridge regression on user, context and ad one-hot explains about 8% of that
value's variance on held-out rows (most of it is the auction's price, set by the request's competing
bids); ``eval/value_r2`` reaches about 0 after 400 steps, from about -5 cold.

Speed: ``--precision bf16`` runs each training step's forward under bfloat16 autocast (the weights, gradients,
AdamW and the evaluation stay float32; ``gpr_sim.model.precision``) and ``--compile blocks|regions`` compiles the
model's parts in place (``GPRModel.compile_regions``); ``agents.hepo`` passes its ``--pretrain-precision``
(fp32 by default: bf16 cost the gpu-large MTP stage HitRate, benchmarks/RESULTS.md) and ``--compile`` (the gpu-large
profile: regions).

Components: ``--[no-]hybrid-attention``, ``--[no-]token-aware-ln``, ``--[no-]token-aware-ffn``,
``--[no-]mixture-of-recursions``, ``--[no-]thinking``, ``--[no-]refining``, ``--[no-]hte`` and
``--mtp-heads`` switch the GPR parts of Table 2 (``GPRConfig``; defaults as there, MoR off).

Best checkpoint: ``best.pt`` (same format as ``checkpoint.pt``) holds the model of the evaluation with
the highest ``eval/hitrate@K`` so far (ties keep the earlier one); ``summary.json["best"]`` records its
step and metrics. An improvement also writes ``checkpoint.pt``, so ``best.pt`` is never ahead of the
resumable state and a resumed run re-derives the best from the kept ``metrics.jsonl`` rows. The best is
selected on the held-out requests themselves, so its metrics are optimistic. ``--select best|last``
names the file downstream users should load: ``summary.json["selected_checkpoint"]``.

Data parallel: ``torchrun --standalone --nproc-per-node W -m agents.pretrain ...`` (``agents.rl.distributed``).
Every rank loads the same data and draws the same global batch of ``--batch-size`` requests (the
sampler RNG is identical on all ranks); rank r trains on its contiguous slice of ``batch_size / W``
rows (``--batch-size`` must be a multiple of W) in ``DistributedDataParallel``, whose gradient average
equals the global-batch gradient; the refiner's noise rows are those of one process. Only rank 0
collects / fits the inputs, evaluates and writes the run folder; logged train losses are global.
"""

from __future__ import annotations

from agents.cli import parse_args, run_main
from agents.pretraining.config import ENTRY, PretrainConfig
from agents.pretraining.trainer import pretrain
from agents.rl import distributed

Args = PretrainConfig
"""CLI of ``python -m agents.pretrain``: one flag per field."""


def main(argv: list[str] | None = None) -> dict:
    """Train one stage; returns the summary (also written to ``OUT/summary.json``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains data-parallel (module doc); every rank returns
    the summary rank 0 wrote.
    """
    return distributed.launch(pretrain, parse_args(Args, argv, __doc__, entry=ENTRY))


if __name__ == "__main__":
    run_main(main)
