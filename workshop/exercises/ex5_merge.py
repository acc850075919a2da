"""Exercise 5: merge and unmerge, LoRA's "no extra latency" trick.

Because B A has W's shape (out, in), the update can be folded into the weight for serving:
W <- W + B A * (alpha / r), and taken out again. Exact up to float rounding in fp32.

    python workshop/check.py 5          # checks this file against handtune's LoRALinear.merge
"""

import torch


@torch.no_grad()
def merged_weight(weight, lora_A, lora_B, alpha, rank):
    """The weight (out, in) with the update folded in: weight + (lora_B @ lora_A) * alpha / rank."""
    # TODO
    raise NotImplementedError("exercise 5: write merged_weight")


@torch.no_grad()
def unmerged_weight(weight, lora_A, lora_B, alpha, rank):
    """The inverse of merged_weight."""
    # TODO
    raise NotImplementedError("exercise 5: write unmerged_weight")
