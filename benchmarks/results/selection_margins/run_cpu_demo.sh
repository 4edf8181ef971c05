#!/usr/bin/env bash
# HEPO, PPO, GRPO x seeds 0-4 from the demo's pre-training, evaluated every 2 iterations: the paired margins
# needs runs/demo/pretrain (`make demo` writes it); every run reuses that pre-training
cd "$(dirname "$0")/../../.." && source .venv/bin/activate && mkdir -p runs/margin
run() { python -m agents.hepo --env ads-v0 --pretrain-dir runs/demo/pretrain --algo $1 --seed $2 --eval-every 2 \
  --threads 1 --no-progress --out runs/margin/$1_s$2 > runs/margin/$1_s$2.log 2>&1; }
for s in 0 1 2 3 4; do
  run hepo $s & run ppo $s; wait; run grpo $s
done
echo done > runs/margin/DONE
