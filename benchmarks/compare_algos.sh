#!/usr/bin/env bash
# The issue-5 comparison: HEPO vs PPO / GRPO / DPO on the same generator, ablations, then online tables.
#   bash benchmarks/compare_algos.sh [ROOT] [SEEDS] [JOBS]      (defaults: runs/compare "0 1 2" 16)
# Every run is `python -m agents.hepo` with the default config and one flag changed; runs of a seed share
# its MTP/VAFT stages. Processes use one torch thread each and run JOBS at a time.
set -euo pipefail
ROOT=${1:-runs/compare}
SEEDS=${2:-"0 1 2"}
JOBS=${3:-16}
PY=${PYTHON:-python}
mkdir -p "$ROOT"
# 1) pre-training per seed (collect -> tokenizer -> MTP -> VAFT), in parallel over seeds
for s in $SEEDS; do
  echo "$PY -m agents.hepo --seed $s --iterations 1 --eval-every 1 --threads 1 --no-progress --pretrain-dir $ROOT/pretrain/seed$s --out $ROOT/warmup/seed$s"
done | xargs -P "$JOBS" -I{} bash -c "{} > /dev/null"
# 2) RL runs: algorithms and HEPO ablations
for s in $SEEDS; do
  common="--seed $s --threads 1 --no-progress --pretrain-dir $ROOT/pretrain/seed$s"
  echo "$PY -m agents.hepo $common --algo hepo --out $ROOT/hepo/seed$s"
  echo "$PY -m agents.hepo $common --algo ppo --out $ROOT/ppo/seed$s"
  echo "$PY -m agents.hepo $common --algo grpo --out $ROOT/grpo/seed$s"
  echo "$PY -m agents.hepo $common --algo dpo --out $ROOT/dpo/seed$s"
  echo "$PY -m agents.hepo $common --algo hepo --no-arr --label hepo_no_arr --out $ROOT/hepo_no_arr/seed$s"
  echo "$PY -m agents.hepo $common --algo hepo --no-loss.process-rewards --label hepo_no_process --out $ROOT/hepo_no_process/seed$s"
done | xargs -P "$JOBS" -I{} bash -c "{} > /dev/null"
echo "runs done: $(ls -d "$ROOT"/*/seed* | wc -l)"
