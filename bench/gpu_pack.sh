#!/usr/bin/env bash
# Prepare a GPU campaign on the CPU machine (seconds): what the device's image lacks, in .device_data/
# (git-ignored; it travels with `carry: [".device_data"]`, about 20 MB):
#   .device_data/whl/   omegaconf, hydra-core, antlr4 (pure-Python wheels; torch and lightning are on the image)
#   .device_data/data/  binarised MNIST and Omniglot (the device cannot see ../shared/data)
# Then one device call runs bench/gpu_campaign.sh (README, "Paper budgets on a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${KM_DATA_DIR:-../shared/data}"
PY="${PY:-.venv/bin/python}"
t0=$(date +%s)
mkdir -p .device_data/whl .device_data/data
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w .device_data/whl \
  omegaconf==2.3.1 hydra-core==1.3.8 antlr4-python3-runtime==4.9.3 2>&1 | { grep -v "is ignored: it is neither" || true; }
for d in binarized_mnist omniglot MNIST/raw; do  # MNIST/raw: the labels of the one-class test episodes
  mkdir -p ".device_data/data/$d"
  cp -u "$DATA/$d"/* ".device_data/data/$d/"
done
rm -f .device_data/data/omniglot/*.zip  # the small background splits: not used by any paper config
[ -f "$DATA/MD5SUMS" ] && cp -u "$DATA/MD5SUMS" .device_data/data/ || true
echo "packed .device_data ($(du -sh .device_data | cut -f1)) in $(( $(date +%s) - t0 )) s"
