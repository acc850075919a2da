"""plumbing/flops.py: the FLOPs one training step computes, counted from what it runs (for MFU).

The usual 6N per token (forward 2, backward 4 per weight) is right for pretraining and about 2x too high for
a LoRA step. Each matmul y = x W costs 2 FLOPs per weight and row forward; backward it costs 2 more for the
input's gradient only if x needs one, and 2 more for W's gradient only if W is trained. A frozen weight
thus costs 4, not 6; the first layer's projections (whose input, frozen embeddings, needs no gradient) cost 2.
LoRA's x @ A.T runs forward twice: lora.py recomputes its branch in backward rather than keep its tensors,
and the recompute stops once it has what backward needs (x @ A.T, not the @ B.T after it). The output head runs only at the trained positions (model.forward selects them). Attention's QK^T and AV
cost 4 T hs per query position per head forward, twice that backward. Padding positions are computed too,
so they are counted, and reported apart. tests/test_train.py checks the count against torch's
FlopCounterMode.
"""

import torch
from torch import nn


def matmul_flops(model):
    """[(name, in_features x out_features, input needs a gradient, weight is trained, forward run twice)] for
    every matmul with a
    weight, seen by running one token through the model with hooks (autograd knows which inputs need a
    gradient), in eval mode so that no dropout draws a random number. LoRA's A and B are listed as
    name.lora_A and name.lora_B."""
    seen, hooks = [], []

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            if isinstance(module, nn.Linear):
                seen.append((name, module.in_features * module.out_features, x.requires_grad,
                             module.weight.requires_grad, False))
            else:  # LoRALinear: x @ A.T (in -> r), then @ B.T (r -> out); B's input comes from trained A
                r = module.lora_A.size(0)
                seen.append((name + ".lora_A", r * module.lora_A.size(1), x.requires_grad, True, True))
                seen.append((name + ".lora_B", r * module.lora_B.size(0), True, True, False))
        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or hasattr(module, "lora_A"):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            idx = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
            model.lm_head(model.trunk(idx))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


def flop_costs(model):
    """(FLOPs per position in the blocks' matmuls, per trained position in the head, attention's forward
    FLOPs per query position per key): forward + backward, measured once per model."""
    per_position, head = 0, 0
    for name, weights, input_grad, trained, twice in matmul_flops(model):
        flops = 2 * weights * (1 + twice + input_grad + trained)
        if name == "lm_head":
            head += flops
        else:
            per_position += flops
    cfg = model.config
    return per_position, head, 4 * cfg.n_layer * cfg.n_head * cfg.head_size


def step_flops(costs, micro_batches):
    """FLOPs of one optimizer step on this process. costs: flop_costs(model); micro_batches: [(x (B, T),
    targets (B, T), trained positions counted on the host)]: nothing is read from the device."""
    per_position, head, attention = costs
    total = 0
    for x, _, n_trained in micro_batches:
        B, T = x.size()  # batch, time
        block = per_position + 3 * attention * T  # every position, forward + backward (2x) of attention
        total += block * B * T + head * n_trained
    return total


def padding_flops(costs, micro_batches, ignore_index):
    """The part of step_flops spent on padding: the positions after a row's last trained one (collate pads
    on the right). Reported by --benchmark, not computed in the training loop."""
    per_position, _, attention = costs
    padding = 0
    for x, y, _ in micro_batches:
        T = x.size(1)
        trained = y != ignore_index  # (B, T)
        upto_last = (trained * torch.arange(1, T + 1, device=y.device)).amax(1)  # (B,) 0 if nothing trained
        padding += (per_position + 3 * attention * T) * int((T - upto_last).sum())
    return padding


# -----------------------------------------------------------------------------
# The hardware side of MFU (model FLOPs utilisation): FLOPs per second over what the GPU can do


# Dense (no sparsity) half-precision tensor-core peak FLOP/s from the vendors' datasheets; GeForce cards at
# fp32 accumulation, which is what PyTorch's matmuls use. A key matches when each of its words is a whole
# word of the device name, in any case ("L4" is not "L40", "A10" is not "A100"); the key with most words wins.
PEAK_FLOPS = {"B200": 2250e12, "H200": 989e12, "H200 NVL": 835e12, "H100": 989e12, "H100 PCIe": 756e12,
              "H100 NVL": 835e12, "H800": 989e12, "H800 PCIe": 756e12, "A100": 312e12, "A800": 312e12,
              "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
              "V100": 125e12, "V100 PCIe": 112e12, "T4": 65e12}


def peak_for_name(name):
    """The peak FLOP/s of a GPU by its torch.cuda.get_device_name(), e.g. "NVIDIA H100 PCIe"; None if unknown."""
    words = set(name.lower().replace("-", " ").split())
    keys = [key for key in PEAK_FLOPS if set(key.lower().split()) <= words]
    return PEAK_FLOPS[max(keys, key=lambda k: len(k.split()))] if keys else None


def peak_flops(rt):
    """The GPU's half-precision peak, or None (CPU, MPS, fp32, bf16 emulated before Ampere, or not in the table)."""
    if not rt.device.startswith("cuda") or rt.dtype == "float32":
        return None
    if rt.dtype == "bfloat16" and torch.cuda.get_device_capability(rt.device)[0] < 8:
        return None
    return peak_for_name(torch.cuda.get_device_name(rt.device))
