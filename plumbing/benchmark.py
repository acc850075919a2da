"""plumbing/benchmark.py: `python train.py --benchmark`: speed, memory and MFU of the training step, and
(--benchmark-vs-hf) the same step in transformers + PEFT on the same weights and batches.

Speed is measured here, never in a timed test. train.py builds the step functions (its own train_step, and
optimizer pieces for the reference); this file makes the batches, times the steps, and prints the result.
"""

import ctypes
import gc
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from plumbing.device import autocast
from plumbing.flops import flop_costs, padding_flops, peak_flops, step_flops


def synthetic_windows(n, grad_accum, batch_size, seq_len, vocab_size, seed, device, ignore_index):
    """n optimizer steps of grad_accum micro-batches (x, y, trained positions) of random tokens (B, T), the
    second half of every row trained (a prompt, then a reply)."""
    gen = torch.Generator().manual_seed(seed)
    T = seq_len
    windows = []
    for _ in range(n):
        window = []
        for _ in range(grad_accum):
            ids = torch.randint(0, vocab_size, (batch_size, T + 1), generator=gen)
            y = ids[:, 1:].clone()
            y[:, :T // 2] = ignore_index
            window.append((ids[:, :-1].to(device), y.to(device), int((y != ignore_index).sum())))
        windows.append(window)
    return windows


def make_hf_step(cfg, rt, model_dir, arch, adapter_dir, hooks):
    """The same training step with Hugging Face transformers + PEFT, on the same weights and adapter
    (test-only packages: imported here only). hooks.make_optimizer and hooks.optimizer_step are
    train.py's, so both sides update alike."""
    ignore_index = hooks.ignore_index
    try:
        from peft import PeftModel
        from transformers import GPT2LMHeadModel, LlamaForCausalLM
    except ImportError as e:
        raise RuntimeError(f"--benchmark-vs-hf needs transformers and peft ({e}); pip install -r "
                           "requirements-dev.txt") from None
    if arch == "llama":
        kw = dict(dtype=torch.float32, attention_dropout=0.0, attn_implementation="sdpa")
        if model_dir.endswith(".gguf"):  # transformers dequantizes the file too (with the gguf package)
            hf = LlamaForCausalLM.from_pretrained(os.path.dirname(model_dir), gguf_file=os.path.basename(model_dir),
                                                  **kw)
        else:
            hf = LlamaForCausalLM.from_pretrained(model_dir, **kw)
    else:  # dropout 0 in the base model as in ours (OpenAI's config.json says 0.1; our GPT ignores it)
        hf = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32, resid_pdrop=0.0, embd_pdrop=0.0,
                                             attn_pdrop=0.0, attn_implementation="sdpa")
    hf = PeftModel.from_pretrained(hf, adapter_dir, is_trainable=True).to(rt.device)
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    optimizer = hooks.make_optimizer(params)  # as ours
    scaler = torch.amp.GradScaler(rt.device.split(":")[0], enabled=rt.dtype == "float16")

    def hf_step(window):
        n_total = sum(n for _, _, n in window)
        loss = 0.0
        for x, y, n_mb in window:
            # HF convention: labels are the input ids (masked), shifted inside the model: label t+1 is the
            # target of position t. Our targets are already shifted, so move them one to the right.
            labels = torch.full_like(y, ignore_index)
            labels[:, 1:] = y[:, :-1]
            with autocast(rt.device, rt.dtype):
                out = hf(input_ids=x, labels=labels)
            part = out.loss * n_mb / n_total  # HF's mean over this micro-batch -> share of the window's sum
            scaler.scale(part).backward()
            loss += part.item()
        hooks.optimizer_step(optimizer, scaler, params, cfg.grad_clip)
        return loss

    return hf_step


def time_steps(step_fns, windows, cfg, rt, ignore_index):
    """Run every step function over the same windows and time each step after the warmup. With several
    functions the timed steps alternate between them (A, B, A, B, ...), so a busy neighbour on a shared
    machine slows both alike; the peak memory is then that of all models together, so it is reported only
    for a single function. Returns one dict per function."""
    results = [{"losses": [fn(w) for w in windows[:cfg.benchmark_warmup]], "step_seconds": []} for fn in step_fns]
    baseline = reset_peak_memory(rt)
    for w in windows[cfg.benchmark_warmup:]:
        for fn, r in zip(step_fns, results):
            cuda_sync(rt)
            t0 = time.perf_counter()
            r["losses"].append(fn(w))
            cuda_sync(rt)
            r["step_seconds"].append(time.perf_counter() - t0)
    timed = windows[cfg.benchmark_warmup:]
    tokens = sum(x.numel() for w in timed for x, _, _ in w) * rt.world_size
    trained = sum(n for w in timed for _, _, n in w) * rt.world_size
    peak, how = peak_memory(rt) if len(step_fns) == 1 else (None, "")
    for r in results:
        dt = sum(r["step_seconds"])
        r.update(tokens_per_s=tokens / dt, trained_per_s=trained / dt, ms_per_step=1000 * dt / len(timed),
                 peak_bytes=peak, peak_how=how, baseline_bytes=baseline)
    return results


def cuda_sync(rt):
    """Wait for the GPU: CUDA calls return before the work is done."""
    if rt.device.startswith("cuda"):
        torch.cuda.synchronize(rt.device)


def busy_fraction(events, wall_us):
    """The share of wall time the GPU was running a kernel, from a torch.profiler run's events
    (prof.events()): only device-side events count (a CPU op's "CUDA time" is its kernels again), and
    overlapping kernels (several streams) count once, as the union of their time ranges. At most 1."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return min(busy / wall_us, 1.0) if wall_us > 0 else 0.0


class HostReads:
    """Counts the times the host waits for the device inside a `with` block, per iteration (mark()
    starts the next one). On CUDA: torch's sync debug mode, which warns at every synchronizing call.
    On the CPU nothing waits, so it counts the operations that would make the host wait for a GPU:
    reading a value back (.item(), float(), int(), bool(): aten._local_scalar_dense), and results
    whose size depends on the data (nonzero, boolean-mask indexing, masked_select, unique). Not seen
    on the CPU: .tolist(), .numpy(), .cpu() (no operation is dispatched for them there)."""

    SIZED_BY_DATA = ("aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
                     "aten::unique_consecutive", "aten::equal", "aten::_local_scalar_dense")

    def __init__(self, device):
        self.cuda = device.startswith("cuda")
        self.counts = [[]]  # per iteration: the name of each wait

    def mark(self):
        self.counts.append([])

    def __enter__(self):
        if self.cuda:
            import warnings
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._warned
            torch.cuda.set_sync_debug_mode("warn")
        else:
            from torch.utils._python_dispatch import TorchDispatchMode

            reads = self

            class Mode(TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    reads._saw(func, args)
                    return func(*args, **(kwargs or {}))
            self._mode = Mode()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
            self._warnings.__exit__(*exc)
        else:
            self._mode.__exit__(*exc)

    def _warned(self, message, *args, **kwargs):
        if "synchroniz" in str(message):
            self.counts[-1].append(str(message).splitlines()[0])

    def _saw(self, func, args):
        name = func.name()
        masked = name.startswith(("aten::index.", "aten::index_put")) and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if name.split(".")[0] in self.SIZED_BY_DATA or masked:
            self.counts[-1].append(name)


def reset_peak_memory(rt):
    """Start a new peak-memory window; return the memory in use now (the baseline: weights, optimizer
    state). CUDA: the caching allocator's counters. CPU (Linux): hand freed heap pages back to the OS
    (glibc's malloc_trim; else the peak RSS would keep what loading the checkpoint left behind), then write 5
    to /proc/self/clear_refs, which resets the kernel's peak resident set size (VmHWM) to the current RSS."""
    if rt.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(rt.device)
        return torch.cuda.memory_allocated(rt.device)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux with glibc: peak_memory falls back to the lifetime peak
    return proc_status_bytes("VmRSS:")


def proc_status_bytes(field):
    """A memory field of /proc/self/status (Linux) in bytes, or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(rt):
    """(bytes, how it was measured) since reset_peak_memory."""
    if rt.device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(rt.device), "CUDA max_memory_allocated: tensors"
    hwm = proc_status_bytes("VmHWM:")
    if hwm is not None:
        return hwm, "peak RSS of the process during the timed steps (VmHWM)"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "lifetime peak RSS (getrusage)"


def format_benchmark(label, r, rt):
    if r["peak_bytes"] is None:
        memory = "n/a: both models are resident while their steps alternate (run --benchmark alone)"
    else:
        base = r["baseline_bytes"]
        memory = (f"{r['peak_bytes'] / 2**20:,.0f} MiB ({r['peak_how']}; in use before them: "
                  f"{base / 2**20 if base is not None else float('nan'):,.0f} MiB)")
    peak = peak_flops(rt)
    achieved = r["flops_per_step"] / (r["ms_per_step"] / 1000) if "flops_per_step" in r else None
    mfu = f"{achieved / (peak * rt.world_size):.1%} of {peak * rt.world_size / 1e12:,.0f} TFLOP/s peak" \
        if peak and achieved else "n/a (needs a CUDA GPU in the peak table, bf16/fp16)"
    if achieved:
        mfu += f"; achieved {achieved / 1e12:.3f} TFLOP/s"
    median = sorted(r["step_seconds"])[len(r["step_seconds"]) // 2]
    return (f"{label}:\n"
            f"  tokens/s     {r['tokens_per_s']:,.0f} (all positions), {r['trained_per_s']:,.0f} (trained)\n"
            f"  ms/step      {r['ms_per_step']:.1f} (median {median * 1000:.1f})\n"
            f"  peak memory  {memory}\n"
            f"  MFU          {mfu}\n"
            f"  loss         step 1 {r['losses'][0]:.4f}, last {r['losses'][-1]:.4f}")


def report(cfg, rt, results, flops_per_step, padding_share, source, log):
    """Print the timed results (ours first, then transformers + PEFT if it ran) and how they compare."""
    ours = results[0]
    ours["flops_per_step"] = flops_per_step
    log(f"flops per step: {flops_per_step:.0f} ({padding_share:.1%} of them on padding positions; "
        "plumbing/flops.py)")
    log(f"benchmark: {cfg.benchmark_steps} steps after {cfg.benchmark_warmup} warmup, {cfg.grad_accum} x "
        f"{cfg.batch_size} rows per step and process, {source}, {rt.device} {rt.dtype}, "
        f"{torch.get_num_threads()} CPU threads")
    log(format_benchmark("ours (" + ("full fine-tune" if cfg.full else "LoRA") + ")", ours, rt))
    if not cfg.benchmark_vs_hf:
        return 0
    hf = results[1]
    log(format_benchmark("transformers + PEFT", hf, rt))
    diffs = [abs(a - b) for a, b in zip(ours["losses"], hf["losses"])]
    paired = sorted(h / o for o, h in zip(ours["step_seconds"], hf["step_seconds"]))
    # Step 1 is equal whatever the dropout: B = 0, so the LoRA branch (the only place with dropout) adds 0.
    # Later steps draw different dropout masks unless --lora-dropout 0.
    which = "every step" if cfg.lora_dropout == 0 else "step 1 (later steps differ by dropout noise)"
    log(f"speedup: {paired[len(paired) // 2]:.2f}x tokens/s (median of the per-step time ratios; from total "
        f"times {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x); loss |ours - hf| at step 1: {diffs[0]:.2e}, "
        f"max over all {len(diffs)} steps: {max(diffs):.2e} (equal expected at {which})")
    return 0


@dataclass
class Hooks:
    """train.py's and lora.py's own functions, which the benchmark times and gives the reference."""

    step: object  # step(window) -> loss: one optimizer step of handtune's
    make_optimizer: object  # make_optimizer(params) -> AdamW as train.py builds it
    optimizer_step: object  # optimizer_step(optimizer, scaler, params, grad_clip) -> norm
    save_adapter: object  # save_adapter(model, dir, base_model_name_or_path=...) (PEFT's start)
    ignore_index: int  # the target id that trains nothing


def run(cfg, rt, model_dir, model, stream, hooks, log):
    """Time --benchmark-steps optimizer steps after --benchmark-warmup untimed ones, on batches from stream (or
    synthetic rows with --benchmark-seq-len); with --benchmark-vs-hf, the same steps on the same batches with
    transformers + PEFT LoRA from the same weights. The callables are train.py's and lora.py's, so both sides
    start and update alike. Prints the result; returns the exit code."""
    ignore_index, save_adapter = hooks.ignore_index, hooks.save_adapter
    n = cfg.benchmark_warmup + cfg.benchmark_steps
    if cfg.benchmark_seq_len:
        windows = synthetic_windows(n, cfg.grad_accum, cfg.batch_size, cfg.benchmark_seq_len,
                                    model.config.vocab_size, cfg.seed, rt.device, ignore_index)
        source = f"synthetic rows of {cfg.benchmark_seq_len} tokens, second half trained"
    else:
        windows = [[stream.next() for _ in range(cfg.grad_accum)] for _ in range(n)]
        source = f"--data {cfg.data}"
    steps = [hooks.step]
    if cfg.benchmark_vs_hf:
        # transformers shifts labels inside the model, so it cannot see the target of the last position.
        # Drop that target for both models: then both train exactly the same tokens.
        for window in windows:
            for i, (x, y, _) in enumerate(window):
                y[:, -1] = ignore_index
                window[i] = (x, y, int((y != ignore_index).sum()))
        adapter_dir = tempfile.mkdtemp(prefix="handtune-bench-")
        try:  # PEFT starts from our initial adapter: the same A (random) and B (zero)
            save_adapter(model, adapter_dir, base_model_name_or_path=model_dir)
            steps.append(make_hf_step(cfg, rt, model_dir, model.config.arch, adapter_dir, hooks))
        finally:
            shutil.rmtree(adapter_dir, ignore_errors=True)
    results = time_steps(steps, windows, cfg, rt, ignore_index)
    costs = flop_costs(model)
    timed = windows[cfg.benchmark_warmup:]
    flops = sum(step_flops(costs, w) for w in timed)
    flops_per_step = flops / len(timed) * rt.world_size
    padding_share = sum(padding_flops(costs, w, ignore_index) for w in timed) / max(flops, 1)
    return report(cfg, rt, results, flops_per_step, padding_share, source, log)
