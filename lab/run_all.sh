#!/usr/bin/env bash
# lab/run_all.sh: every lab experiment with 3 seeds and the full triage test split, then the claims table.
# Meant for one GPU (CUDA, bf16): untested until a GPU is available. Each (configuration, seed) run is cached
# under results/cache/ as it finishes (scripts that take --seeds), so a stopped run resumes.
#     bash lab/run_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
common=(--seeds 1337,1338,1339 --eval-items 250 --dtype bfloat16 --device "${DEVICE:-cuda}")
status=0
for script in masking quality data_size overfitting self_generated lora_rank instruct_vs_task forgetting; do
    echo "== lab/$script.py"
    python "lab/$script.py" "${common[@]}" || { echo "lab/$script.py failed"; status=1; }
done
python lab/claims.py || status=1
exit $status
