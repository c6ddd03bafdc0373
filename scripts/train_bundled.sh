#!/usr/bin/env bash
# Train both bundled models side by side on one device (issue 20): a short timing run measures
# steps per minute, so the cosine schedule ends inside the wall-clock budget; then the real run,
# then a bf16 export of each. Usage:
#   bash scripts/train_bundled.sh RUNS_DIR MINUTES [DEVICE] [PYTHON]
# RUNS_DIR/{llada,dream}/data.pt may be prepared beforehand (the corpus is the running CPython's
# standard library, so prepare it with the interpreter whose stdlib the model card names).
set -euo pipefail
runs=$1; minutes=$2; device=${3:-cuda}; py=${4:-python3}
mix=0.55,0.30,0.15
common=(--device "$device" --bf16 --threads 4 --mix "$mix" --log-every 100 --checkpoint-minutes 2)
for fam in llada dream; do
  mkdir -p "$runs/$fam" "$runs/probe-$fam"
  [ -f "$runs/$fam/data.pt" ] && ln -sf "$(realpath "$runs/$fam/data.pt")" "$runs/probe-$fam/data.pt"
  $py -m dllm_export.train --family "$fam" --out "$runs/probe-$fam" --minutes 0.75 "${common[@]}" \
    --log-every 10 > "$runs/probe-$fam.log" 2>&1 &
done
wait
rate() {  # steps per minute from the probe's last log lines (both families ran side by side, as below)
  awk '/ step / {for (i = 1; i <= NF; i++) if ($i == "step") s = $(i + 1)} END {gsub(/[^0-9]/, "", s); print s}' "$runs/probe-$1.log"
}
for fam in llada dream; do
  n=$(rate "$fam"); steps=$(( n * 100 * ${minutes%.*} / 75 * 95 / 100 ))  # 0.75-min probe, 5% margin
  echo "$fam: $n steps in the 0.75-min probe -> --steps $steps in $minutes min"
  $py -m dllm_export.train --family "$fam" --out "$runs/$fam" --minutes "$minutes" --steps "$steps" \
    "${common[@]}" > "$runs/$fam.log" 2>&1 &
done
wait
for fam in llada dream; do
  $py -m dllm_export.train --out "$runs/$fam" --export "$runs/export-$fam"
done
