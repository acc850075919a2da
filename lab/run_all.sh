#!/usr/bin/env bash
# lab/run_all.sh: every lab experiment with 3 seeds and the full triage test split, then the claims table.
# Meant for one GPU (CUDA, bf16): untested until a GPU is available. Each (configuration, seed) run is cached
# under results/cache/ as it finishes (scripts that take --seeds), so a stopped run resumes.
#     bash lab/run_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
common=(--eval-items 250 --dtype bfloat16 --device "${DEVICE:-cuda}")
seeds=(--seeds 1337,1338,1339)
status=0
for script in masking quality self_generated forgetting data_size overfitting lora_rank instruct_vs_task; do
    echo "== lab/$script.py"
    case $script in  # the scripts converted to seeds so far; the others run one seed and refuse --seeds
        masking|quality|self_generated|forgetting|data_size|instruct_vs_task|overfitting) extra=("${seeds[@]}") ;;
        *) extra=() ;;
    esac
    python "lab/$script.py" "${common[@]}" "${extra[@]}" || { echo "lab/$script.py failed"; status=1; }
done
python lab/claims.py || status=1
exit $status
