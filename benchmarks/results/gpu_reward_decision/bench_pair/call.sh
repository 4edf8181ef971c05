#!/usr/bin/env bash
# One process alone vs two side by side on the one GPU: how much of the GPU one RL iteration leaves idle.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
S="--device cuda --sessions 8192 --precision bf16 --compile regions --ffn-layout segments --optimizer fused --warmup 1 --iters 2"
start=$(date +%s)
timeout 150 python benchmarks/bench_rl_iteration.py $S --profile 20 --out $OUT/alone.json > $OUT/alone.log 2>&1
echo "alone rc=$? at $(($(date +%s)-start)) s" >> $OUT/rc.txt
timeout 110 python benchmarks/bench_rl_iteration.py $S --out $OUT/pair_a.json > $OUT/pair_a.log 2>&1 &
timeout 110 python benchmarks/bench_rl_iteration.py $S --out $OUT/pair_b.json > $OUT/pair_b.log 2>&1 &
wait
echo "pair done at $(($(date +%s)-start)) s" >> $OUT/rc.txt
cat $OUT/rc.txt; tail -4 $OUT/alone.log $OUT/pair_a.log $OUT/pair_b.log
