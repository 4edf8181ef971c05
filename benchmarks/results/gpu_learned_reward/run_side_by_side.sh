#!/usr/bin/env bash
# One shared pre-training, then RL runs side by side on the one GPU, each from the same VAFT model
# (RUNS="name:flags;name:flags;..."; default: {e2, e1} x seeds {0, 1}; RUNS="" pre-trains only); metrics of every run come back in
# $OUT/results.tgz. With FINAL_S=N the runs stop N seconds before DEADLINE and every run's best checkpoint
# (RUN/best, by held-out reward per session), the MTP and VAFT generators, the learned cascade and FINAL_REFS
# (default cascade-privileged, a labelled reference) are evaluated with
# agents.evaluate on other sessions (--seed FINAL_SEED, default 54321; FINAL_FLAGS sizes it), paired by user
# against the first run's best: the comparison that chose nothing. With W on a folder that outlives the call
# (a warm machine keeps ignored files of the checkout) and CKPT_EVERY=N, a second call resumes every run from its
# last checkpoint and the pre-training is reused; a run stopped by the deadline checkpoints its last iteration.
# After the final evaluation, in the time left: benchmarks/exit_diagnosis.py on the same GPR agents and the learned
# cascade (DIAG_ENVS slots x DIAG_STEPS steps), into final/exit_diagnosis.json.
# Moving the pre-training between calls (benchmarks/pretrain_bundle.py; a machine is released 30 s after a call, so
# W does not outlive it): BUNDLE_OUT=1 packs W/pre into $OUT (parts of <= 15 MiB, the weights in bf16, of the
# stages BUNDLE_STAGES, default vaft) once the pre-training is done; BUNDLE_IN=DIR (a carried folder of those
# parts) unpacks it into an empty W/pre first.
# Moving the compiled kernels between calls: CACHE_OUT=1 packs the inductor cache (TORCHINDUCTOR_CACHE_DIR: the
# FX-graph, AOTAutograd and Triton caches) into $OUT/inductor.tgz.NN parts of <= 15 MiB once the runs are done,
# unless it exceeds CACHE_MAX_MIB (default 12: what a call carrying a bundle, the wheels and ~10 MiB of tracked
# files has left of its 64 MiB); CACHE_IN=DIR (a carried folder of those parts) unpacks them first, so the runs'
# torch.compile finds its graphs compiled (the same torch, GPU and code; anything else misses and compiles).
# Moving the references' sessions between calls: the references REFS (comma-separated, default oracle: the one that
# scores the whole catalog at every request) read no learned model, so their sessions on the final evaluation's
# sessions (FINAL_FLAGS, FINAL_SEED, the runs' preset) are the same for every pipeline seed. They are recorded on
# REFS_SESSIONS sessions (default 8,192: each slot's first at 8,192 envs; agents.evaluate --sessions-of) and paired
# with the others on those: the oracle ran at 57 sessions/s on an H200, eager (fifteenth session; 16,384 sessions did not
# end in 385 s alone), so 65,536 would take a call and a half. REFS_OUT=1 (0 or empty: off) evaluates them in the
# background from the call's start (beside whatever runs; cut at DEADLINE) with REFS_FLAGS (default FINAL_FLAGS: the
# learner call's final flags, which a pre-training call must pass) into W/final_refs, packed into
# $OUT/final_refs.tgz; REFS_IN=DIR (a folder holding it: carried, or tracked) seeds the final evaluation's folder with
# it, and every reference found there joins the final's agents taken from that cache only (agents.evaluate
# --cached-only: one evaluated with other settings is left out with a line, never simulated in the final's time).
set -u
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
# the caching allocator's expandable segments (ignored without CUDA): four learners side by side peaked at 102 GB
# of the H200 with them, three at 103 GB without (benchmarks/results/gpu_d6/seed{1,2}/call2/smi.csv)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
W=${W:-/tmp/L}; OUT=${OUT:-/tmp/L_out}; mkdir -p $W $OUT/runs
PROFILE=${PROFILE:-"--profile gpu-large --collect-steps 16 --funnel-steps 8 --mtp-steps 1000 --vaft-steps 300 --num-envs 8192 --rollout-steps 2 --eval-every 5 --eval-sessions 4096 --eval-envs 4096 --eval-states 512"}
COMMON="$PROFILE --pretrain-dir $W/pre --checkpoint-every ${CKPT_EVERY:-1000} --iterations ${ITERS:-60} --no-progress"
DEADLINE=${DEADLINE:-565}
FINAL_S=${FINAL_S:-0}
GRACE=${GRACE:-40}  # seconds a SIGTERMed run may take to finish its iteration and checkpoint
start=$(date +%s)
profile_world() {  # "preset beam" as agents.hepo parses PROFILE (the world and served beam of every run)
  python -c "import sys; from agents.cli import parse_args; from agents.rl.config import PROFILES, RLConfig; a = parse_args(RLConfig, sys.argv[1:], '', PROFILES); print(a.preset, a.eval_beam)" $PROFILE
}
torch_device() { python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"; }
enabled() { case "${1:-}" in "" | 0) return 1 ;; esac; }  # a switch: unset, empty or 0 is off
REFS=${REFS:-oracle}
# --sessions-of for the references: "oracle=8192" (each of REFS with REFS_SESSIONS)
refs_sessions_of() { local r out=""; for r in ${1//,/ }; do out="${out:+$out,}$r=${REFS_SESSIONS:-8192}"; done; echo "$out"; }
if enabled "${REFS_OUT:-}"; then
  # the references' final sessions, beside whatever the call runs (module doc), packed when done
  (
    read -r preset beam < <(profile_world)
    timeout $((DEADLINE - 10)) python -m agents.evaluate --preset $preset --device $(torch_device) --agents "$REFS" \
      --sessions-of "$(refs_sessions_of "$REFS")" --seed ${FINAL_SEED:-54321} --no-plots --out $W/final_refs \
      ${REFS_FLAGS:-${FINAL_FLAGS:-}} > $OUT/final_refs.log 2>&1
    rc=$?
    echo "final refs rc=$rc at $(($(date +%s) - start)) s" >> $OUT/rc.txt
    if [ $rc -eq 0 ]; then
      tar -C $W/final_refs -czf $OUT/final_refs.tgz . && echo "final refs packed: $(wc -c < $OUT/final_refs.tgz) bytes" \
        >> $OUT/rc.txt
      mkdir -p $OUT/runs/final_refs && cp $W/final_refs/summary.csv $W/final_refs/config.json $OUT/runs/final_refs/
    fi
  ) &
  REFS_PID=$!
fi
CACHE=${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_$(whoami)}
if [ -n "${CACHE_IN:-}" ] && ls $CACHE_IN/inductor.tgz.* > /dev/null 2>&1; then
  mkdir -p $CACHE && cat $CACHE_IN/inductor.tgz.* | tar -xzf - -C $CACHE
  echo "compile cache unpacked rc=$? ($(du -sm $CACHE | cut -f1) MiB) at $(($(date +%s) - start)) s" >> $OUT/rc.txt
fi
pack_cache() {
  enabled "${CACHE_OUT:-}" && [ -d $CACHE ] || return 0
  tar -C $CACHE -czf - . | split -b 15m -d - $OUT/inductor.tgz.
  local bytes=$(cat $OUT/inductor.tgz.* | wc -c)
  if [ $bytes -gt $((${CACHE_MAX_MIB:-12} << 20)) ]; then
    rm -f $OUT/inductor.tgz.*  # the results must come back: $OUT returns at most 64 MiB
    echo "compile cache not packed: $bytes bytes > CACHE_MAX_MIB ${CACHE_MAX_MIB:-12}" >> $OUT/rc.txt
  else
    echo "compile cache packed: $bytes bytes at $(($(date +%s) - start)) s" >> $OUT/rc.txt
  fi
}
if [ -n "${BUNDLE_IN:-}" ] && [ ! -d $W/pre/vaft ]; then
  python benchmarks/pretrain_bundle.py unpack $BUNDLE_IN $W/pre > $OUT/bundle.log 2>&1
  echo "unpacked $BUNDLE_IN rc=$? at $(($(date +%s) - start)) s" >> $OUT/rc.txt
fi
pack_bundle() {
  if enabled "${BUNDLE_OUT:-}" && [ -f $W/pre/vaft/summary.json ]; then
    python benchmarks/pretrain_bundle.py pack $W/pre $OUT --stages ${BUNDLE_STAGES:-vaft} >> $OUT/bundle.log 2>&1
    echo "packed rc=$? at $(($(date +%s) - start)) s" >> $OUT/rc.txt
  fi
}
(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 5 > $OUT/smi.csv 2>&1) &
SMI=$!
run() {
  local name=$1; shift
  local left=$((DEADLINE - FINAL_S - ($(date +%s) - start)))
  if [ $((left - GRACE)) -le 0 ]; then  # (timeout 0 would mean no limit at all)
    echo "$name not started: ${left} s left, GRACE ${GRACE} s" >> $OUT/rc.txt; return
  fi
  # SIGTERM at left - GRACE: the run finishes its iteration, checkpoints and exits 143; SIGKILL at left
  timeout -k $GRACE $((left - GRACE)) python -m agents.hepo $COMMON --out $W/$name "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? at $(($(date +%s) - start)) s" >> $OUT/rc.txt
}
IFS=';' read -ra SPECS <<< "${RUNS-e2_s0:--seed 0 --label e2;e1_s0:--seed 0 --epochs 1 --label e1;e2_s1:--seed 1 --label e2;e1_s1:--seed 1 --epochs 1 --label e1}"
if [ ${#SPECS[@]} -eq 0 ]; then
  # RUNS="": the pre-training alone (agents.hepo --pretrain-only), then the final evaluation of its stages beside
  # the references: the comparison of a VAFT start that fits one call
  first=""
  run pretrain --pretrain-only
  [ -f $W/pre/vaft/summary.json ] && echo "pre-trained at $(($(date +%s) - start)) s" >> $OUT/rc.txt
  pack_bundle
else
  first=${SPECS[0]}
  run ${first%%:*} ${first#*:} &
  FIRST=$!
  while [ ! -f $W/pre/vaft/summary.json ]; do
    kill -0 $FIRST 2>/dev/null || { echo "pre-training process ended without a VAFT model"; break; }
    sleep 2
  done
  echo "pre-trained at $(($(date +%s) - start)) s" >> $OUT/rc.txt
  pack_bundle &
  for spec in "${SPECS[@]:1}"; do run ${spec%%:*} ${spec#*:} & done
  wait $FIRST
  # the other runs only: a bare `wait` (one run, no others) would also wait for the GPU monitor, which never ends
  others=$(jobs -p | grep -v -x -e "$SMI" -e "${REFS_PID:-none}")  # (the references' job is awaited at the end)
  [ -n "$others" ] && wait $others 2>/dev/null
  pack_cache &  # on the host beside the final evaluation on the GPU (tens of seconds of gzip), awaited at the end
  CACHE_PID=$!
fi
if [ "$FINAL_S" -gt 0 ]; then
  # the runs' world and their served beam (agents.sweep's agent_specs serves the same way): the first run's record,
  # else (no runs) PROFILE's flags as agents.hepo parses them
  if [ -n "$first" ] && [ -f $W/${first%%:*}/config.json ]; then
    read -r preset beam < <(python -c "import json,sys; a=json.load(open(sys.argv[1]))['args']; print(a['preset'], a['eval_beam'])" $W/${first%%:*}/config.json)
  else
    read -r preset beam < <(profile_world)
  fi
  device=$(torch_device)
  agents=""; ref=""
  for spec in ${SPECS[@]+"${SPECS[@]}"}; do
    n=${spec%%:*}
    [ -f $W/$n/best/policy.pt ] || continue
    agents="$agents,gpr:$W/$n/best@beam_width=$beam"; [ -z "$ref" ] && ref="gpr:$W/$n/best@beam_width=$beam"
  done
  [ -f $W/pre/platform/funnel.pt ] && agents="$agents,learned-cascade:$W/pre/platform"
  # labelled references that read hidden state (FINAL_REFS, comma-separated; the oracle is REFS_IN's, module doc)
  refs=${FINAL_REFS-cascade-privileged}
  cached=""
  if [ -n "${REFS_IN:-}" ] && [ -f $REFS_IN/final_refs.tgz ]; then
    # the references' sessions from an earlier call (module doc): seeded into the final's folder (its owner record
    # too when the folder is new), and each one found there joins the agents, from that cache only
    refs_in=$(mktemp -d) && mkdir -p $W/final/agents && tar -xzf $REFS_IN/final_refs.tgz -C $refs_in
    [ -f $W/final/run.json ] || cp $refs_in/run.json $W/final/
    for r in ${REFS//,/ }; do
      [ -d $refs_in/agents/$r ] || continue
      [ -e $W/final/agents/$r ] || cp -r $refs_in/agents/$r $W/final/agents/
      case ",$refs," in *",$r,"*) ;; *) refs="${refs:+$refs,}$r" ;; esac
      cached="${cached:+$cached,}$r"
    done
    echo "references from $REFS_IN: $cached" >> $OUT/rc.txt
  fi
  [ -n "$refs" ] && agents="$agents,$refs"
  # the VAFT and MTP generators where the pipeline holds their models (a stage moved by a bundle may have come
  # without it: BUNDLE_STAGES): the stages MTP < VAFT < RL on the same sessions
  for s in vaft mtp; do
    { [ -f $W/pre/$s/checkpoint.pt ] || [ -f $W/pre/$s/policy.pt ]; } && agents="gpr:$W/pre/$s@beam_width=$beam,$agents"
  done
  agents=${agents#,}; agents=${agents%,}; agents=${agents//,,/,}
  [ -z "$ref" ] && ref="gpr:$W/pre/vaft@beam_width=$beam"  # no runs: the pairs are against the VAFT start
  left=$((DEADLINE - ($(date +%s) - start)))
  [ "$left" -lt 1 ] && left=1  # (timeout 0 would mean no limit at all)
  refs_flags=()
  [ -n "$cached" ] && refs_flags=(--sessions-of "$(refs_sessions_of "$cached")" --cached-only "$cached")
  timeout $left python -m agents.evaluate --preset $preset --device $device --agents "$agents" \
    --reference "$ref" --seed ${FINAL_SEED:-54321} --no-plots --out $W/final ${FINAL_FLAGS:-} ${refs_flags[@]+"${refs_flags[@]}"} \
    > $OUT/final.log 2>&1
  echo "final rc=$? at $(($(date +%s) - start)) s" >> $OUT/rc.txt
  mkdir -p $OUT/runs/final
  cp $W/final/summary.csv $W/final/paired.csv $W/final/config.json $OUT/runs/final/ 2>/dev/null
  # what each shows and how often its users leave (benchmarks/exit_diagnosis.py), paired against the cascade
  left=$((DEADLINE - ($(date +%s) - start)))
  if [ "$left" -gt 20 ] && [ -f $W/pre/platform/funnel.pt ]; then
    gpr=$(echo "$agents" | tr ',' '\n' | grep '^gpr:' | paste -sd, -)
    timeout $left python $(dirname "$0")/../../exit_diagnosis.py --preset $preset --device $device --num-envs ${DIAG_ENVS:-4096} \
      --steps ${DIAG_STEPS:-32} --agents "learned-cascade:$W/pre/platform,$gpr" --out $OUT/runs/final/exit_diagnosis.json \
      > $OUT/exit_diagnosis.log 2>&1
    echo "exit diagnosis rc=$? at $(($(date +%s) - start)) s" >> $OUT/rc.txt
  fi
fi
kill $SMI 2>/dev/null
[ -n "${CACHE_PID:-}" ] && wait $CACHE_PID
[ -n "${REFS_PID:-}" ] && wait $REFS_PID
for d in $W/*/; do
  n=$(basename $d); [ "$n" = pre ] && continue
  mkdir -p $OUT/runs/$n; cp $d/config.json $d/metrics.jsonl $d/summary.json $OUT/runs/$n/ 2>/dev/null
done
for s in mtp vaft; do mkdir -p $OUT/pre/$s; cp $W/pre/$s/summary.json $OUT/pre/$s/ 2>/dev/null; done
cp $W/pre/platform/report.json $OUT/pre/ 2>/dev/null
mv $OUT/*.log $OUT/smi.csv $OUT/runs/ 2>/dev/null; mv $OUT/pre $OUT/runs/
tar -C $OUT -czf $OUT/results.tgz runs && rm -rf $OUT/runs
cat $OUT/rc.txt
