#!/usr/bin/env bash
# Train methods C (dual sampling) and D (ResNeXt + LSTM) side by side on one GPU, from
# phantoms generated once, all within a fixed time (a GPU lent for minutes).
#
#   deployment/train-on-gpu.sh OUT [CASES] [VAL_CASES] [DEADLINE_S]
#
# 1. `ct-ai-node prepare` generates CASES training + VAL_CASES validation phantoms on
#    every core and caches what both trainers read;
# 2. three trainers share the GPU: method C (uniform, then size-balanced model) and two
#    method D runs, with and without the deep-supervision loss (the one with the lower
#    validation loss is the one to ship; runs with the same settings differ about as
#    much); each stops its epochs so that all end by DEADLINE_S seconds after the start
#    (`--set time_budget_s`).
# OUT receives the weights and the training reports: OUT/c, OUT/d_aux, OUT/d_noaux,
# and train.log. Environment: PYTHON (default python3), CACHE (default a temp folder),
# SHAPE (phantom shape z,y,x; default full: drawn realistic geometries).
set -euo pipefail
OUT=${1:?usage: train-on-gpu.sh OUT [CASES] [VAL_CASES] [DEADLINE_S]}
CASES=${2:-300}
VAL=${3:-60}
DEADLINE=${4:-560}
PY=${PYTHON:-python3}
CACHE=${CACHE:-$(mktemp -d)}
SHAPE=${SHAPE:-full}
t0=$(date +%s)
mkdir -p "$OUT/c"
log="$OUT/train.log"
node() { "$PY" -m ct_ai_node "$@"; }

node prepare --methods dual-sampling,resnext-lstm --cache-dir "$CACHE" --cases "$CASES" --val-cases "$VAL" \
    --shape "$SHAPE" 2>&1 | tee -a "$log"
# what is left, less the time the runs need after their last epoch (final validation
# with heat maps, calibration, saving)
left=$(( DEADLINE - ($(date +%s) - t0) - 60 ))
if (( left < 60 )); then echo "only ${left} s left for training after preparing the phantoms" | tee -a "$log"; exit 1; fi
echo "preparation took $(( $(date +%s) - t0 )) s; ${left} s left for training" | tee -a "$log"

common=(--cases "$CASES" --val-cases "$VAL" --cache-dir "$CACHE" --shape "$SHAPE" --device auto)
export OMP_NUM_THREADS=4
# method C trains its two models one after the other: half the time each
node train dual-sampling --out "$OUT/c" "${common[@]}" --set width=16 --set batch_size=8 --set epochs=60 \
    --set lr_step_epochs=15 --set time_budget_s=$(( left / 2 - 15 )) >"$OUT/c/stdout.json" 2>"$OUT/c.log" &
pc=$!
node train resnext-lstm --out "$OUT/d_aux" "${common[@]}" --set epochs=60 \
    --set time_budget_s="$left" >"$OUT/d_aux.json" 2>"$OUT/d_aux.log" &
pd1=$!
node train resnext-lstm --out "$OUT/d_noaux" "${common[@]}" --set epochs=60 --set aux_weight=0 \
    --set time_budget_s="$left" >"$OUT/d_noaux.json" 2>"$OUT/d_noaux.log" &
pd2=$!
status=0
for p in $pc $pd1 $pd2; do wait "$p" || status=1; done
cat "$OUT"/c.log "$OUT"/d_aux.log "$OUT"/d_noaux.log >>"$log" 2>/dev/null || true
echo "all runs ended after $(( $(date +%s) - t0 )) s (status ${status})" | tee -a "$log"
exit $status
