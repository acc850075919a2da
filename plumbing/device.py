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


def choose_dtype(device, requested="auto"):
    """Return (dtype name, reason): the precision the forward pass runs in under autocast. Weights and
    optimizer state stay fp32 either way; "auto" picks bf16 on GPUs that support it, fp16 (with a gradient
    scaler) on older CUDA GPUs, and fp32 on CPU and MPS."""
    if requested != "auto":
        if requested not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {requested}: choose auto, float32, bfloat16 or float16")
        if requested == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            raise RuntimeError("--dtype bfloat16: this GPU has no bf16 support (use float16)")
        return requested, "requested with --dtype"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "CUDA GPU supports bf16: half the memory traffic, fp32's range"
        return "float16", "CUDA GPU without bf16: fp16 autocast with a gradient scaler"
    return "float32", f"autocast to half precision is slow or unsupported on {device}"


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
    if world_size > 1:
        if device.startswith("cuda"):
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            device, reason = f"cuda:{local_rank}", f"torchrun: one GPU per process ({reason})"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    dtype, dtype_reason = choose_dtype(device, dtype_flag)
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
    """True if flag is set on any process (so that all of them stop at the same step)."""
    return all_reduce_sum(torch.tensor([float(flag)], device=rt.device), rt).item() > 0
