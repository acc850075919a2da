"""Exercise 3: the loss of a training step, token-weighted over micro-batches.

A step runs several micro-batches before one update. Its loss must be the summed loss over ALL trained
tokens of the step divided by how many there are: the gradient one big batch would give. The tempting
alternative, the mean of each micro-batch's mean loss, weighs a token in a short reply more than one in a
long reply. model(x, y, reduction="sum") returns (logits, summed loss over the trained positions).

    python workshop/check.py 3          # checks this file against handtune's train.accumulate
"""

IGNORE_INDEX = -100


def accumulate(model, micro_batches):
    """Forward and backward every (x, y) micro-batch, leaving in each parameter's .grad the gradient of
    (sum of token losses over all trained tokens) / (number of trained tokens). Returns that loss as a
    float."""
    # TODO: count the trained tokens of all micro-batches first (targets != IGNORE_INDEX); then for each
    # micro-batch: _, loss_sum = model(x, y, reduction="sum"); (loss_sum / total).backward().
    raise NotImplementedError("exercise 3: write accumulate")
