#!/usr/bin/env bash
# call.sh's seed, run across two calls on one warm machine: the run folders live in the checkout's ignored
# runs/ (kept between calls while the machine is held), every run checkpoints every 4 iterations, and the
# second call (FINAL_S > 0) resumes them and ends with the paired final evaluation (W names another folder, e.g. for
# another PRETRAIN).
# Usage: SEED=1 DEADLINE=575 FINAL_S=0 bash benchmarks/results/gpu_d6/chain.sh; then
#        SEED=1 DEADLINE=470 FINAL_S=100 bash benchmarks/results/gpu_d6/chain.sh
SEED=${SEED:-1}
mkdir -p runs
export W=${W:-$PWD/runs/d6_seed$SEED} TORCHINDUCTOR_CACHE_DIR=$PWD/runs/inductor CKPT_EVERY=4
[ -d $W ] && echo "resuming $W: $(ls $W | tr '\n' ' ')" || echo "fresh $W"
export FINAL_S=${FINAL_S:-0}
bash benchmarks/results/gpu_d6/call.sh
