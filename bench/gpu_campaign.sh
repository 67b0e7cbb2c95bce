#!/usr/bin/env bash
# The one command a lent GPU runs (README, "Paper budgets on a GPU"), after bench/gpu_pack.sh here:
#   device run, carry [".device_data"], timeout_s 600:
#     bash bench/gpu_campaign.sh campaigns/paper_omniglot.yaml 500
# installs the carried wheels, points the data at the carried copy, runs one campaign slice of BUDGET seconds,
# and puts what comes back under $OUT: the campaign's table and log, and one tar of every run's small files
# (config.yaml, run.json, eval.json, metrics.csv; never checkpoints). Unpack it here with
#   tar -xzf <files_at>/runs_small.tgz -C docs/results/gpu_campaign
# Unfinished runs continue on the next GPU: copy runs_small.tgz and runs_ckpt.tgz (every last.ckpt, brought back
# when under 16 MB) into .device_data/resume/ before the next call; the script restores them first.
# CPU rehearsal (times the set-up and the whole path): KM_CAMPAIGN_SMOKE=1 OUT=/tmp/out bash bench/gpu_campaign.sh ...
set -uo pipefail
FILE="${1:?campaign file}"; BUDGET="${2:-500}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
t0=$(date +%s)
PY="${PYTHON:-python3}"  # the device image's python3 holds torch and Lightning
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .device_data/whl/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" KM_DATA_DIR="$PWD/.device_data/data" WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/machine.txt" 2>&1
"$PY" -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)" >> "$OUT/machine.txt"
echo "set-up: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/machine.txt"
DIR=runs/campaigns/gpu
mkdir -p "$DIR"
for t in .device_data/resume/runs_small.tgz .device_data/resume/runs_ckpt.tgz; do  # an earlier GPU's slice
  [ -f "$t" ] && tar -xzf "$t" -C "$DIR" && echo "restored $t"
done
SMOKE=(); [ "${KM_CAMPAIGN_SMOKE:-0}" = 1 ] && SMOKE=(--smoke)   # the CPU rehearsal of this script
"$PY" -m km.cli campaign "$FILE" --dir "$DIR" --budget-s "$BUDGET" --progress-s 60 "${SMOKE[@]}" 2>&1 | tee "$OUT/campaign.log"
rc=${PIPESTATUS[0]}
cp "$DIR/table.md" "$DIR/campaign.json" "$OUT/" 2>/dev/null
(cd "$DIR" && find runs logs 2>/dev/null \( -name config.yaml -o -name run.json -o -name eval.json -o -name metrics.csv -o -name '*.log' \) -print0 \
  | tar -czf "$OUT/runs_small.tgz" --null -T -)
(cd "$DIR" && find runs -name last.ckpt 2>/dev/null -print0 | tar -czf "$OUT/runs_ckpt.tgz" --null -T -)
[ "$(stat -c %s "$OUT/runs_ckpt.tgz")" -gt 16000000 ] && rm -f "$OUT/runs_ckpt.tgz"
echo "total: $(( $(date +%s) - t0 )) s, campaign exit $rc" | tee -a "$OUT/machine.txt"
exit $rc
