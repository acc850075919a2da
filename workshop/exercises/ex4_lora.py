"""Exercise 4: LoRA's layer, y = W x + (alpha / r) * B A x, with W frozen.

A (r, in) and B (out, r) are the only trained weights. B starts at zero, so at the start the layer is
exactly the pretrained one (and A random, or neither would ever get a gradient). Compute the update left to
right, x @ A.T then @ B.T, never B @ A (that builds the whole (out, in) matrix every call).

    python workshop/check.py 4          # checks this file against handtune's lora.LoRALinear
"""

import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # TODO: initialise lora_B so that the layer starts as exactly the pretrained one
        raise NotImplementedError("exercise 4: initialise lora_B")

    def forward(self, x):
        # TODO: base(x) plus the scaled low-rank update of x
        raise NotImplementedError("exercise 4: write forward")
