"""scripts/gpu_check.py: the GPU numbers README reports, measured on one CUDA GPU (run by gpu_check.sh).

Random GPT-2 weights in the shapes of the real models (no download: the GPU machine may be offline), the
built-in triage data for the default step, synthetic 16 x 1024 rows for gpt2-xl's peak memory:
  1. the default LoRA step and a full step (gpt2 small, batch 16, --dtype auto): ms/step, tokens/s, MFU, our
     FLOP count vs torch's FlopCounterMode, the GPU busy fraction (torch.profiler: kernel time / wall time);
  2. the host-device syncs of 3 steps (torch.cuda.set_sync_debug_mode);
  3. peak GPU memory of gpt2-xl-shaped weights at 16 x 1024 tokens, full and LoRA.
Prints a markdown table and writes it with the raw numbers to --out (json + md).

    python scripts/gpu_check.py --out results/gpu_check
"""

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402
from model import IGNORE_INDEX  # noqa: E402
from plumbing.benchmark import cuda_sync, synthetic_windows  # noqa: E402
from plumbing.device import setup_runtime  # noqa: E402
from plumbing.files import atomic_write_text  # noqa: E402
from plumbing.flops import (  # noqa: E402
    flop_costs,
    peak_flops,  # noqa: E402
    step_flops,
)
from plumbing.tokenizer_files import get_tokenizer  # noqa: E402

DEVICE = "cuda"
SHAPES = {"gpt2": (12, 12, 768), "gpt2-xl": (48, 25, 1600)}  # n_layer, n_head, n_embd


def random_gpt2(root, name, tokenizer_dir):
    d = os.path.join(root, name)
    n_layer, n_head, n_embd = SHAPES[name]
    sample.main(["--save-random", d, "--tokenizer-dir", tokenizer_dir, "--n-layer", str(n_layer), "--n-head",
                 str(n_head), "--n-embd", str(n_embd), "--block-size", "1024"])
    return d


def make_step(model_dir, full, log=lambda *a: None):
    """train.py's own step on the GPU: (step(window) -> loss, raw model, runtime, config)."""
    cfg = train.TrainConfig(model=model_dir, full=full, device=DEVICE, lr=1e-5)
    rt, _, _ = setup_runtime(cfg.device, cfg.dtype, log)
    s = train.setup_training(cfg, rt, model_dir, log)
    step = lambda w: train.train_step(s, w, 1e-5, cfg.grad_clip)[0]
    return step, s.raw_model, rt, cfg


def timed(step, windows, rt, warmup=3):
    for w in windows[:warmup]:
        step(w)
    cuda_sync(rt)
    t0 = time.perf_counter()
    for w in windows[warmup:]:
        step(w)
    cuda_sync(rt)
    return (time.perf_counter() - t0) / len(windows[warmup:])


def default_step(model_dir, full):
    step, raw, rt, cfg = make_step(model_dir, full)
    tok = get_tokenizer(model_dir)
    examples, _ = train.load_split(cfg, "train", tok, 1024)
    stream = train.BatchStream(examples, cfg.batch_size, cfg.seed, rt, data.chat_format(tok).pad_id)
    windows = [[stream.next()] for _ in range(13)]
    seconds = timed(step, windows, rt)
    costs = flop_costs(raw)
    flops = sum(step_flops(costs, w, IGNORE_INDEX) for w in windows[3:]) / 10
    with FlopCounterMode(display=False) as fc:
        step(windows[3])
    counted = fc.get_total_flops()
    ours_same = step_flops(costs, windows[3], IGNORE_INDEX)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for w in windows[3:8]:
            step(w)
        cuda_sync(rt)
        wall_us = (time.perf_counter() - t0) * 1e6
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        for w in windows[8:11]:
            step(w)
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(c.message).splitlines()[0] for c in caught if "synchroniz" in str(c.message)]
    tokens = sum(x.numel() for w in windows[3:] for x, _ in w) / 10
    peak = peak_flops(rt)
    return {"kind": "full" if full else "lora", "dtype": rt.dtype, "ms_per_step": 1000 * seconds,
            "tokens_per_s": tokens / seconds, "flops_per_step": flops,
            "mfu": flops / seconds / peak if peak else None, "flops_vs_flop_counter": ours_same / counted,
            "gpu_busy": kernel_us / wall_us, "syncs_in_3_steps": len(syncs), "sync_kinds": sorted(set(syncs))[:5]}


def peak_memory(model_dir, full):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step, raw, rt, cfg = make_step(model_dir, full)
    windows = synthetic_windows(2, 1, 16, 1024, raw.config.vocab_size, 0, rt.device, IGNORE_INDEX)
    for w in windows:
        step(w)
    cuda_sync(rt)
    return {"kind": "full" if full else "lora", "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
    p = argparse.ArgumentParser(description="Measure handtune's training step on one CUDA GPU.")
    p.add_argument("--out", default="results/gpu_check", help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--tokenizer-dir", required=True, help="GPT-2's vocab.json + merges.txt (gpu_check.sh finds them)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU; scripts/gpu_check.py measures the GPU path only")
    gpu = torch.cuda.get_device_name(0)
    result = {"gpu": gpu, "torch": torch.__version__, "capability": list(torch.cuda.get_device_capability(0))}
    with tempfile.TemporaryDirectory() as root:
        small = random_gpt2(root, "gpt2", args.tokenizer_dir)
        result["default_step"] = [default_step(small, full) for full in (False, True)]
        xl = random_gpt2(root, "gpt2-xl", args.tokenizer_dir)
        result["gpt2_xl_16x1024"] = [peak_memory(xl, full) for full in (False, True)]
    rows = [f"GPU: {gpu} (compute capability {result['capability'][0]}.{result['capability'][1]}), "
            f"torch {torch.__version__}", "",
            "| step (gpt2 shapes, triage, batch 16) | dtype | ms/step | tokens/s | MFU | ours / FlopCounterMode "
            "| GPU busy | syncs in 3 steps |", "|---|---|---|---|---|---|---|---|"]
    for r in result["default_step"]:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        rows.append(f"| {r['kind']} | {r['dtype']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                    f"{r['flops_vs_flop_counter']:.3f} | {r['gpu_busy']:.0%} | {r['syncs_in_3_steps']} |")
    rows += ["", "| gpt2-xl shapes, 16 x 1024 tokens | peak GPU memory |", "|---|---|"]
    rows += [f"| {r['kind']} | {r['peak_gib']:.1f} GiB |" for r in result["gpt2_xl_16x1024"]]
    table = "\n".join(rows)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "gpu_check.json"), json.dumps(result, indent=2) + "\n")
    atomic_write_text(os.path.join(args.out, "gpu_check.md"), table + "\n")


if __name__ == "__main__":
    main()
