#!/usr/bin/env bash
# The one command a lent GPU runs (README, "Paper budgets on a GPU"), after bench/gpu_pack.sh here:
#   device run, carry [".device_data"], timeout_s 600:
#     bash bench/gpu_campaign.sh campaigns/paper_omniglot.yaml 500
# installs the carried wheels, points the data at the carried copy, runs one campaign slice of BUDGET seconds,
# and puts what comes back under $OUT: the campaign's table and log, and one tar of every run's small files
# (config.yaml, run.json, eval.json, metrics.csv; never checkpoints). Unpack it here with
#   tar -xzf <files_at>/runs_small.tgz -C docs/results/gpu_campaign
# The checkpoints stay on the device, which is given back: a slice that did not finish a run continues on the
# next GPU from the start of that run unless its checkpoints are brought back (runs_ckpt.tgz, when it fits).
set -uo pipefail
FILE="${1:?campaign file}"; BUDGET="${2:-500}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .device_data/whl/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" KM_DATA_DIR="$PWD/.device_data/data" WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/machine.txt" 2>&1
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)" >> "$OUT/machine.txt"
echo "set-up: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/machine.txt"
DIR=runs/campaigns/gpu
python3 -m km.cli campaign "$FILE" --dir "$DIR" --budget-s "$BUDGET" --progress-s 60 2>&1 | tee "$OUT/campaign.log"
rc=${PIPESTATUS[0]}
cp "$DIR/table.md" "$DIR/campaign.json" "$OUT/" 2>/dev/null
(cd "$DIR" && find runs logs \( -name config.yaml -o -name run.json -o -name eval.json -o -name metrics.csv -o -name '*.log' \) -print0 \
  | tar -czf "$OUT/runs_small.tgz" --null -T -)
(cd "$DIR" && find runs -name last.ckpt -print0 | tar -czf "$OUT/runs_ckpt.tgz" --null -T -)
[ "$(stat -c %s "$OUT/runs_ckpt.tgz")" -gt 16000000 ] && rm -f "$OUT/runs_ckpt.tgz"
echo "total: $(( $(date +%s) - t0 )) s, campaign exit $rc" | tee -a "$OUT/machine.txt"
exit $rc
