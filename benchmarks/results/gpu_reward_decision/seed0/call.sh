#!/usr/bin/env bash
# The reward decision at GPU scale: the platform (and the RL reward's learned pCTR / pCVR) fitted on 1M requests;
# learned reward vs learned + KL anchor 1.0 vs privileged (reference), side by side from one VAFT model.
export PROFILE="--profile gpu-large --collect-steps 8 --mtp-steps 600 --vaft-steps 200 --num-envs 8192 --rollout-steps 2 --eval-every 4 --eval-sessions 4096 --eval-envs 4096 --eval-states 512"
export RUNS="learned:--label learned1m;kl1:--loss.kl-coef 1.0 --label kl1;priv:--reward privileged --label priv"
export DEADLINE=565
bash benchmarks/results/gpu_learned_reward/run_side_by_side.sh
