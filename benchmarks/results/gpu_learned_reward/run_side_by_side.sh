#!/usr/bin/env bash
# One epoch vs two at GPU scale: one shared pre-training, then 4 RL runs side by side on the one GPU
# ({e2, e1} x seeds {0, 1}, each from the same VAFT model); metrics of every run come back under $OUT/runs.
set -u
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
W=${W:-/tmp/L}; OUT=${OUT:-/tmp/L_out}; mkdir -p $W $OUT/runs
PROFILE=${PROFILE:-"--profile gpu-large --collect-steps 16 --funnel-steps 8 --mtp-steps 1000 --vaft-steps 300 --num-envs 8192 --rollout-steps 2 --eval-every 5 --eval-sessions 4096 --eval-envs 4096 --eval-states 512"}
COMMON="$PROFILE --pretrain-dir $W/pre --checkpoint-every 1000 --iterations ${ITERS:-60} --no-progress"
DEADLINE=${DEADLINE:-565}
start=$(date +%s)
(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 5 > $OUT/smi.csv 2>&1) &
SMI=$!
run() {
  local name=$1; shift
  local left=$((DEADLINE - ($(date +%s) - start)))
  timeout $left python -m agents.hepo $COMMON --out $W/$name "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? at $(($(date +%s) - start)) s" >> $OUT/rc.txt
}
IFS=';' read -ra SPECS <<< "${RUNS:-e2_s0:--seed 0 --label e2;e1_s0:--seed 0 --epochs 1 --label e1;e2_s1:--seed 1 --label e2;e1_s1:--seed 1 --epochs 1 --label e1}"
first=${SPECS[0]}
run ${first%%:*} ${first#*:} &
FIRST=$!
while [ ! -f $W/pre/vaft/summary.json ]; do
  kill -0 $FIRST 2>/dev/null || { echo "pre-training process ended without a VAFT model"; break; }
  sleep 2
done
echo "pre-trained at $(($(date +%s) - start)) s" >> $OUT/rc.txt
for spec in "${SPECS[@]:1}"; do run ${spec%%:*} ${spec#*:} & done
wait $FIRST; wait $(jobs -p | grep -v "^$SMI$") 2>/dev/null
kill $SMI 2>/dev/null
for d in $W/*/; do
  n=$(basename $d); [ "$n" = pre ] && continue
  mkdir -p $OUT/runs/$n; cp $d/config.json $d/metrics.jsonl $d/summary.json $OUT/runs/$n/ 2>/dev/null
done
for s in mtp vaft; do mkdir -p $OUT/pre/$s; cp $W/pre/$s/summary.json $OUT/pre/$s/ 2>/dev/null; done
cp $W/pre/platform/report.json $OUT/pre/ 2>/dev/null
mv $OUT/*.log $OUT/smi.csv $OUT/runs/ 2>/dev/null; mv $OUT/pre $OUT/runs/
tar -C $OUT -czf $OUT/results.tgz runs && rm -rf $OUT/runs
cat $OUT/rc.txt
