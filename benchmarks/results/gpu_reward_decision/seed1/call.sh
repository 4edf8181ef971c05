#!/usr/bin/env bash
# The reward decision at GPU scale, a second pipeline seed: platform fitted on 1M requests; learned reward vs
# learned + KL anchor 1.0, two runs side by side (longer horizon than three) from one VAFT model.
export PROFILE="--profile gpu-large --collect-steps 8 --mtp-steps 600 --vaft-steps 200 --num-envs 8192 --rollout-steps 2 --eval-every 4 --eval-sessions 4096 --eval-envs 4096 --eval-states 512 --seed 1"
export RUNS="learned:--label learned1m;kl1:--loss.kl-coef 1.0 --label kl1"
export DEADLINE=575
bash benchmarks/results/gpu_learned_reward/run_side_by_side.sh
