#!/usr/bin/env bash
# lab/run_all.sh: every lab experiment with 3 seeds and the full test splits, then the claims table.
# Meant for one GPU (CUDA, bf16): untested until a GPU is available. Each (configuration, seed) run is cached
# under results/cache/ as it finishes, so a stopped run resumes where it stopped.
#     bash lab/run_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
common=(--eval-items 250 --seeds 1337,1338,1339 --dtype bfloat16 --device "${DEVICE:-cuda}")
status=0
for script in headline masking quality self_generated forgetting data_size overfitting lora_rank instruct_vs_task; do
    echo "== lab/$script.py"
    python "lab/$script.py" "${common[@]}" || { echo "lab/$script.py failed"; status=1; }
done
echo "== lab/ladder.sh"
DTYPE=bfloat16 bash lab/ladder.sh || { echo "lab/ladder.sh failed"; status=1; }
python lab/claims.py || status=1
exit $status
