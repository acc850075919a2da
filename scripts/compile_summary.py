"""scripts/compile_summary.py: one line on a --compile run (gpu_check.sh's second stage): recompiles and graph
breaks in its TORCH_LOGS output, and tokens/s at the compiling step vs the median of steps 11-20.

    python scripts/compile_summary.py out/compiled/metrics.jsonl out/compile.log
"""

import json
import sys

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print("usage: compile_summary.py METRICS_JSONL COMPILE_LOG")
        sys.exit(0 if len(sys.argv) == 2 else 1)
    with open(sys.argv[1], encoding="utf-8") as f:
        rec = [json.loads(line) for line in f if line.strip()]
    with open(sys.argv[2], encoding="utf-8") as f:
        log = f.read()
    median = sorted(r["tokens_per_s"] for r in rec[10:])[len(rec[10:]) // 2] if rec[10:] else float("nan")
    print(f"--compile, {len(rec)} steps: recompiles {log.count('Recompiling function')}, graph breaks "
          f"{log.lower().count('graph break')}, step 1 (compiling) {rec[0]['tokens_per_s']:,.0f} tokens/s, "
          f"steps 11-{len(rec)} median {median:,.0f} tokens/s")
