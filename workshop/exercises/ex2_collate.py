"""Exercise 2: collate, where the shift and IGNORE_INDEX happen.

An example is (ids, mask) from exercise 1. The model reads ids[:-1] and predicts ids[1:]: position t's
target is token t + 1, trained only if mask[t + 1] is 1. Targets that are not trained are IGNORE_INDEX
(-100, PyTorch's cross_entropy skips them), and so is every padding position. Pad on the right with pad_id
up to the longest example minus one.

    python workshop/check.py 2          # checks this file against handtune's data.collate
"""

import torch

IGNORE_INDEX = -100


def collate(examples, pad_id):
    """[(ids, mask)] -> (inputs, targets), two LongTensors (B, T) with T = longest example - 1."""
    B, T = len(examples), max(len(ids) for ids, _ in examples) - 1  # batch, time
    inputs = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    # TODO: for each example b with n = len(ids) - 1: inputs[b, :n] are ids[:-1]; targets[b, :n] are
    # ids[1:] where mask[1:] is 1, IGNORE_INDEX elsewhere.
    raise NotImplementedError("exercise 2: write collate")
    return inputs, targets
