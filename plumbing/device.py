"""plumbing/device.py: which device and precision a run uses, decided in one place, with the reason.

Every script calls choose_device and choose_dtype once, prints both answers with their reasons, and takes
--device / --dtype to override them; autocast() is the one mixed-precision context every forward pass uses.
setup_runtime does both for train.py and joins torchrun's process group; all_reduce_sum and any_process are
the two collectives the loop needs.
"""

import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def choose_device(requested="auto"):
    """Return (device string, reason). "auto" prefers CUDA, then Apple's MPS, then the CPU."""
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"--device {requested}: CUDA is not available on this machine (try --device cpu)")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError("--device mps: MPS is not available on this machine (try --device cpu)")
        return requested, "requested with --device"
    if torch.cuda.is_available():
        return "cuda", f"CUDA GPU found: {torch.cuda.get_device_name(0)}"
    if torch.backends.mps.is_available():
        return "mps", "Apple GPU (MPS) found, no CUDA"
    return "cpu", "no CUDA or MPS GPU found"


def cpu_multiplies_bf16(cpuinfo="/proc/cpuinfo"):
    """True if this CPU has bf16 matrix instructions (AVX512-BF16 or AMX, read from Linux's cpuinfo flags):
    there bf16 autocast is faster than fp32; elsewhere it is emulated and slower."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False  # not Linux: no way to tell cheaply, so fp32
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(device, requested="auto", capability=None, cpu_bf16=None):
    """Return (dtype name, reason): the precision the forward pass runs in under autocast. Weights and
    optimizer state stay fp32 either way. "auto": bf16 on CUDA GPUs of compute capability >= 8.0 (Ampere
    on), fp16 with a gradient scaler below (T4 7.5, V100 7.0), bf16 on CPUs that multiply it natively,
    fp32 elsewhere. capability and cpu_bf16 default to asking the hardware (tests pass them)."""
    if requested not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {requested}: choose auto, float32, bfloat16 or float16")
    if device.startswith("cuda"):
        # Footgun: torch.cuda.is_bf16_supported() says True on a T4 or V100, where bf16 is emulated (slow).
        major, minor = capability or torch.cuda.get_device_capability(device)
        if requested == "auto":
            if major >= 8:
                return "bfloat16", f"compute capability {major}.{minor} >= 8.0: native bf16, fp32's range"
            return "float16", f"compute capability {major}.{minor} < 8.0: no native bf16; fp16 + gradient scaler"
        if requested == "bfloat16" and major < 8:
            return requested, f"requested with --dtype (emulated on compute capability {major}.{minor}: slow)"
    elif device == "cpu":
        native = cpu_multiplies_bf16() if cpu_bf16 is None and requested in ("auto", "bfloat16") else cpu_bf16
        if requested == "auto":
            if native:
                return "bfloat16", "this CPU multiplies bf16 natively (AVX512-BF16 / AMX)"
            return "float32", "no AVX512-BF16 or AMX on this CPU: no native half-precision matmul"
        # Footgun: without those instructions PyTorch emulates bf16 matmuls; README's Performance section
        # measured a SmolLM2 LoRA step over 20x slower than fp32 on such a CPU (297 s vs 13 s, one thread).
        if requested == "bfloat16" and not native:
            return requested, ("requested with --dtype (emulated on this CPU, no AVX512-BF16 / AMX: "
                               "far slower than float32)")
    elif requested == "auto":
        return "float32", f"no native half-precision matmul on {device}"
    return requested, "requested with --dtype"


def enable_tf32(device):
    """fp32 matmuls on Ampere+ tensor cores in TF32 (10-bit mantissa, fp32 range): ~8x faster, and only
    fp32 work is affected (the loss, the optimizer); autocast's bf16/fp16 matmuls are unchanged."""
    if device.startswith("cuda") and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device, dtype):
    """Mixed precision for forward passes: matmuls in bf16/fp16 while weights stay fp32. float32: nothing."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


@dataclass
class Runtime:
    rank: int  # this process's index among world_size (0 when not distributed)
    world_size: int  # number of processes (torchrun's WORLD_SIZE, else 1)
    device: str  # where tensors live, e.g. "cuda:0" or "cpu"
    dtype: str  # autocast precision: float32 (no autocast), bfloat16 or float16
    ddp: bool  # running under torchrun with more than one process

    @property
    def master(self):
        return self.rank == 0  # only rank 0 prints progress and writes files


def setup_runtime(device_flag, dtype_flag, log):
    """Choose device and dtype (printed with the reason) and join the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device, reason = choose_device(device_flag)
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # so the current GPU (its random state, saved for resume) is this one
    if world_size > 1:
        if device.startswith("cuda"):
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            device, reason = f"cuda:{local_rank}", f"torchrun: one GPU per process ({reason})"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    dtype, dtype_reason = choose_dtype(device, dtype_flag)
    enable_tf32(device)
    rt = Runtime(rank=rank, world_size=world_size, device=device, dtype=dtype, ddp=world_size > 1)
    log(f"device: {device} ({reason})" + (f", {world_size} processes" if rt.ddp else ""))
    log(f"dtype: {dtype} ({dtype_reason})")
    return rt, reason, dtype_reason


def seed_everything(seed):
    """Seed every generator a run may draw from: Python's, NumPy's and torch's (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce_sum(t, rt):
    """Sum a tensor over processes, in place; a no-op for one process."""
    if rt.ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_process(flag, rt):
    """True if flag is set on any process (so that all of them stop at the same step). One process:
    the flag itself, without a trip to the device and back."""
    if not rt.ddp:
        return bool(flag)
    return all_reduce_sum(torch.tensor([float(flag)], device=rt.device), rt).item() > 0
