#!/usr/bin/env bash
# lab/ladder.sh: the ladder (claims 4, 5, 6) with one training run per seed: train.py then eval.py for
# knowledge (LoRA and full fine-tuning, 5 epochs) and triage (LoRA, --triage-steps), every test item,
# then lab/ladder_report.py merges each run's seeds into results/ladder (per-item scores, 95% intervals).
# A run whose eval.json exists is skipped, so a stopped sweep resumes; the base model's rungs (greedy, the
# same in every run) are generated once and kept in $RUNS/base-replies. Untested end to end at this size
# (CPU estimate: ~25 min per seed for knowledge, ~1 h per seed for triage at 400 steps; a GPU: minutes).
#     bash lab/ladder.sh                                   # 3 seeds, bf16, the device train.py picks
#     SEEDS="1337" TRIAGE_STEPS=100 bash lab/ladder.sh     # one seed, a shorter triage run
# Also: MODEL, DTYPE, RUNS (training outputs), OUT (results), KNOW_STEPS (instead of 5 epochs), LIMIT (eval
# items, 0: all), EVAL_EXTRA (more eval.py flags): tests/test_eval.py runs it on a tiny model this way.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1337 1338 1339"}
TRIAGE_STEPS=${TRIAGE_STEPS:-400}  # ~1 epoch of triage's 3,000 conversations at batch 8
RUNS=${RUNS:-out/ladder}
MODEL=${MODEL:-smollm2-135m-instruct-gguf}
common=(--model "$MODEL" --batch-size 8 --dtype "${DTYPE:-bfloat16}" --save-every 0)
know=(--epochs 5)
[ -n "${KNOW_STEPS:-}" ] && know=(--max-steps "$KNOW_STEPS" --warmup 0)
read -r -a eval_extra <<< "${EVAL_EXTRA:-}"
reports=()
for seed in $SEEDS; do
    for run in know-lora know-full triage-lora; do
        out="$RUNS/$run-s$seed"
        case $run in
            know-lora) train=(--data knowledge "${know[@]}") ;;
            know-full) train=(--data knowledge "${know[@]}" --full) ;;
            triage-lora) train=(--data triage --max-steps "$TRIAGE_STEPS" --warmup $((TRIAGE_STEPS / 8))) ;;
        esac
        if [ ! -f "$out/eval.json" ]; then
            python train.py "${common[@]}" "${train[@]}" --seed "$seed" --out "$out"
            python eval.py --out "$out" --limit "${LIMIT:-0}" --dtype "${DTYPE:-bfloat16}" \
                --base-replies "$RUNS/base-replies" "${eval_extra[@]}"
        fi
        name=${run/know/knowledge}
        [ "$run" = triage-lora ] && name="triage-lora-$TRIAGE_STEPS-steps"
        reports+=(--report "$name=$out/eval.json")
    done
done
python lab/ladder_report.py "${reports[@]}" --out "${OUT:-results/ladder}" \
    --note "# The ladder, measured"$'\n\n'"\`bash lab/ladder.sh\` (seeds: $SEEDS; triage: $TRIAGE_STEPS LoRA steps)."
