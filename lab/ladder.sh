#!/usr/bin/env bash
# lab/ladder.sh: the ladder (claims 4, 5, 6) with one training run per seed: train.py then eval.py for
# knowledge (LoRA and full fine-tuning, 5 epochs) and triage (LoRA, --triage-steps), every test item,
# then lab/ladder_report.py merges each run's seeds into results/ladder (per-item scores, 95% intervals).
# Each finished run's eval.json is kept in results/cache/ladder (named by model, run, training, items, dtype
# and seed; committed as it lands) and a kept run is never trained again, so a stopped sweep resumes, also
# from a fresh clone; the base model's rungs (greedy, the same in every run) are generated once. The triage
# run is the README's command (100 LoRA steps of 8, as results/headline trains it). float32 by default: it
# runs at full speed on every CPU (bf16 is emulated without AVX512-BF16). Measured on a 2-core AVX2 CPU
# (float32, one thread, beside another job): a 100-step triage run ~35 min plus ~15 min of scoring; a GPU:
# minutes.
#     bash lab/ladder.sh                                   # 3 seeds, float32, the device train.py picks
#     SEEDS="1337" TRIAGE_STEPS=40 bash lab/ladder.sh      # one seed, a shorter triage run
#     ONLY="triage-lora" bash lab/ladder.sh                # some runs only (two CPUs' share), no merge
# Also: MODEL, DTYPE, RUNS (training outputs), OUT (results; the cache beside it), KNOW_STEPS (instead of
# 5 epochs), LIMIT (eval items, 0: all), EVAL_EXTRA (more eval.py flags): tests/test_eval.py runs it on a
# tiny model this way.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1337 1338 1339"}
TRIAGE_STEPS=${TRIAGE_STEPS:-100}  # 800 conversations, about a quarter of triage's training split
RUNS=${RUNS:-out/ladder}
MODEL=${MODEL:-smollm2-135m-instruct-gguf}
OUT=${OUT:-results/ladder}
CACHE="$(dirname "$OUT")/cache/ladder"
DTYPE=${DTYPE:-float32}
ALL="know-lora know-full triage-lora"  # every run; ladder_report merges only when all of them ran
ONLY=${ONLY:-$ALL}
common=(--model "$MODEL" --batch-size 8 --dtype "$DTYPE" --save-every 0)
know=(--epochs 5)
[ -n "${KNOW_STEPS:-}" ] && know=(--max-steps "$KNOW_STEPS" --warmup 0)
read -r -a eval_extra <<< "${EVAL_EXTRA:-}"
reports=()
for seed in $SEEDS; do
    for run in $ONLY; do
        out="$RUNS/$run-s$seed"
        case $run in
            know-lora) train=(--data knowledge "${know[@]}") ;;
            know-full) train=(--data knowledge "${know[@]}" --full) ;;
            triage-lora) train=(--data triage --max-steps "$TRIAGE_STEPS" --warmup $((TRIAGE_STEPS / 10))) ;;
            *) echo "lab/ladder.sh: ONLY=\"$ONLY\": no run $run; use one of: $ALL" >&2
               exit 1 ;;
        esac
        trained=${KNOW_STEPS:+$KNOW_STEPS-steps}
        [ "$run" = triage-lora ] && trained=$TRIAGE_STEPS-steps
        kept="$CACHE/$(basename "$MODEL")-$run-${trained:-5-epochs}-items${LIMIT:-0}-$DTYPE-s$seed.json"
        if [ ! -f "$kept" ]; then
            if [ ! -f "$out/eval.json" ]; then
                python train.py "${common[@]}" "${train[@]}" --seed "$seed" --out "$out"
                python eval.py --out "$out" --limit "${LIMIT:-0}" --dtype "$DTYPE" \
                    --base-replies "$RUNS/base-replies" "${eval_extra[@]}"
            fi
            mkdir -p "$CACHE" && cp "$out/eval.json" "$kept.tmp" && mv "$kept.tmp" "$kept"
        fi
        name=${run/know/knowledge}
        [ "$run" = triage-lora ] && name="triage-lora-$TRIAGE_STEPS-steps"
        reports+=(--report "$name=$kept")
    done
done
if [ "$ONLY" != "$ALL" ]; then
    echo "lab/ladder.sh: ONLY=\"$ONLY\": those runs are kept in $CACHE; run without ONLY to merge them"
    exit 0
fi
python lab/ladder_report.py "${reports[@]}" --out "$OUT" \
    --note "# The ladder, measured"$'\n\n'"\`bash lab/ladder.sh\` (seeds: $SEEDS; triage: $TRIAGE_STEPS LoRA steps)."
