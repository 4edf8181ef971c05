#!/usr/bin/env bash
# the 15 runs of run_cpu_demo.sh again with --best-rule resolved (the training is the same to the bit: the rule
# changes only which evaluation OUT/best keeps); then eval_pairs.sh and aggregate_pairs.py
cd "$(dirname "$0")/../../.." && source .venv/bin/activate
run() { python -m agents.hepo --env ads-v0 --pretrain-dir runs/demo/pretrain --algo $1 --seed $2 --eval-every 2 \
  --best-rule resolved --threads 1 --no-progress --out runs/margin_resolved/$1_s$2 > runs/margin_resolved/$1_s$2.log 2>&1; }
mkdir -p runs/margin_resolved
for s in 0 1 2 3 4; do
  run hepo $s & run ppo $s; wait; run grpo $s
done
echo done > runs/margin_resolved/DONE
