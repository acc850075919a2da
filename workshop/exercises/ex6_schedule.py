"""Exercise 6: the end of a training step, and its learning rate.

Learning rate of step s (0-based): a linear warmup from max_lr / warmup up to max_lr over `warmup` steps,
then a half cosine from max_lr down to min_lr, reached at the last step (max_steps - 1).

The update: clip the GLOBAL gradient norm (all parameters together, not each tensor) to grad_clip, step
the optimizer, clear the gradients. Return the norm before clipping.

    python workshop/check.py 6          # checks this file against handtune's train.lr_at / optimizer_step
"""

import math  # noqa: F401 (you will need it)

import torch  # noqa: F401


def lr_at(step, max_lr, warmup, max_steps, min_lr):
    # TODO
    raise NotImplementedError("exercise 6: write lr_at")


def optimizer_step(optimizer, params, grad_clip):
    # TODO: torch.nn.utils.clip_grad_norm_ over params, optimizer.step(), optimizer.zero_grad()
    raise NotImplementedError("exercise 6: write optimizer_step")
