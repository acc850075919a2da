"""plumbing/device.py: which device and precision a run uses, decided in one place, with the reason.

Every script calls choose_device and choose_dtype once, prints both answers with their reasons, and takes
--device / --dtype to override them. autocast() is the one mixed-precision context every forward pass uses.
"""

from contextlib import nullcontext

import torch

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
