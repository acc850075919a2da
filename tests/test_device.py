"""Tests for the GPU-facing machinery that must be right before it first runs on a GPU: the dtype choice by
compute capability (CUDA faked), the CPU's native bf16, the peak-FLOPs table, and the FLOP count of a step
against torch's FlopCounterMode. CPU only, offline.

    python -m pytest -q tests/test_device.py
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import lora
from model import GPT, IGNORE_INDEX, LLAMA_SWITCHES, GPTConfig
from plumbing import device
from plumbing.flops import flop_costs, padding_flops, peak_for_name, step_flops

# -----------------------------------------------------------------------------
# dtype: by compute capability on CUDA, by the instruction set on the CPU


@pytest.mark.parametrize("capability, gpu, expect", [
    ((7, 0), "V100", "float16"), ((7, 5), "T4", "float16"), ((8, 0), "A100", "bfloat16"),
    ((8, 9), "L4", "bfloat16"), ((9, 0), "H100", "bfloat16")])
def test_auto_dtype_follows_compute_capability_not_is_bf16_supported(capability, gpu, expect, monkeypatch):
    # What a T4 answers: is_bf16_supported() is True there (bf16 emulated), so it must not decide.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    dtype, reason = device.choose_dtype("cuda", "auto")
    assert dtype == expect, gpu
    assert f"{capability[0]}.{capability[1]}" in reason


def test_requested_bf16_on_an_old_gpu_is_allowed_but_flagged_slow(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    dtype, reason = device.choose_dtype("cuda:0", "bfloat16")
    assert dtype == "bfloat16" and "emulated" in reason
    with pytest.raises(ValueError, match="--dtype half"):
        device.choose_dtype("cpu", "half")


def test_cpu_bf16_only_where_the_processor_multiplies_it(tmp_path):
    for flags, native in (("fpu sse2 avx2 fma", False), ("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert device.cpu_multiplies_bf16(str(info)) is native, flags
    assert device.cpu_multiplies_bf16(str(tmp_path / "missing")) is False  # not Linux: fp32
    assert device.choose_dtype("cpu", "auto", cpu_bf16=True)[0] == "bfloat16"
    assert device.choose_dtype("cpu", "auto", cpu_bf16=False)[0] == "float32"
    assert device.choose_dtype("mps", "auto")[0] == "float32"


def test_requested_bf16_on_a_cpu_without_it_is_allowed_but_flagged_slow():
    dtype, reason = device.choose_dtype("cpu", "bfloat16", cpu_bf16=False)
    assert dtype == "bfloat16" and "emulated" in reason  # the user asked: obeyed, and told the cost
    assert "emulated" not in device.choose_dtype("cpu", "bfloat16", cpu_bf16=True)[1]
    assert device.choose_dtype("cpu", "float32", cpu_bf16=False) == ("float32", "requested with --dtype")


# -----------------------------------------------------------------------------
# The peak table: whole-word names as torch.cuda.get_device_name() spells them


def test_peak_flops_matches_whole_words_of_real_device_names():
    expect = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
              "NVIDIA H200": 989e12, "NVIDIA H800": 989e12, "NVIDIA B200": 2250e12, "NVIDIA A100-SXM4-80GB": 312e12,
              "NVIDIA L4": 121e12, "NVIDIA L40": 181e12, "NVIDIA L40S": 362e12, "NVIDIA A10": 125e12,
              "Tesla T4": 65e12, "Tesla V100-SXM2-16GB": 125e12, "Tesla V100-PCIE-32GB": 112e12,
              "NVIDIA GeForce RTX 4090": 165e12, "NVIDIA A10G": None, "NVIDIA GeForce RTX 4080": None}
    for name, peak in expect.items():
        assert peak_for_name(name) == peak, name


# -----------------------------------------------------------------------------
# FLOPs: counted from what the step runs, checked against torch's own counter


def tiny(arch, full):
    torch.manual_seed(0)
    switches = LLAMA_SWITCHES if arch == "llama" else {}
    m = GPT(GPTConfig(**switches, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else None, n_embd=64,
                      vocab_size=300, block_size=64, tie_embeddings=arch != "llama"))
    if full:
        m.requires_grad_(True)
    else:
        lora.apply_lora(m, 4, 8.0, 0.1)
    return m


def counted(m, batches):
    """FLOPs torch's FlopCounterMode sees in forward + backward (attention on the math path, which it counts)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        for x, y, _ in batches:
            m(x, y, reduction="sum")[1].backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("full", [False, True])
def test_step_flops_agree_with_flop_counter_mode(arch, full):
    m = tiny(arch, full)
    batches = []
    for B, T, prompt in ((3, 40, 20), (2, 17, 5)):  # two micro-batches of different shapes
        x = torch.randint(0, 300, (B, T))
        y = torch.roll(x, -1, 1)
        y[:, :prompt] = IGNORE_INDEX
        y[0, T - 6:] = IGNORE_INDEX  # row 0 ends in 6 padding positions
        batches.append((x, y, int((y != IGNORE_INDEX).sum())))
    costs = flop_costs(m)
    ours, padding = step_flops(costs, batches), padding_flops(costs, batches, IGNORE_INDEX)
    assert abs(ours / counted(m, batches) - 1) < 0.01
    assert 0 < padding < ours / 10


def test_frozen_weights_cost_4_flops_not_6_and_the_first_projection_2():
    full, lo = flop_costs(tiny("gpt2", True)), flop_costs(tiny("gpt2", False))
    C, r = 64, 4
    shapes = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]  # (in, out) of c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert full[0] == 2 * sum(6 * i * o for i, o in shapes)  # every weight trained, every input needs a gradient
    frozen = 2 * sum(4 * i * o for i, o in shapes) - 2 * C * 3 * C  # layer 0's c_attn reads frozen embeddings
    adapters = 2 * sum(6 * r * (i + o) for i, o in shapes) - 2 * r * C  # ... so its A needs no input gradient
    recomputed = 2 * sum(2 * r * i for i, _ in shapes)  # both blocks run x @ A.T again in backward
    assert lo[0] == frozen + adapters + recomputed
    assert lo[1] * 3 == full[1] * 2  # the tied head: frozen under LoRA, so no weight gradient
