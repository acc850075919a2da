"""Exercise 8: how far did fine-tuning move the model? KL(base || tuned).

At every position of some general text both models predict a distribution over the vocabulary. The KL
divergence KL(p || q) = sum_v p(v) (log p(v) - log q(v)) with p the BASE model and q the tuned one is 0 iff
they agree, and grows as fine-tuning moves the model on text it was never tuned on. Compute it from the
logits with log_softmax in float32 (bf16 log-probabilities are too coarse: a small KL comes out wrong).

    python workshop/check.py 8          # checks this file against handtune's eval.kl_divergence
"""

import torch  # noqa: F401
from torch.nn import functional as F  # noqa: F401


def mean_kl(logits_base, logits_tuned):
    """logits (..., V) of the two models at the same positions -> mean over positions of
    KL(base || tuned), a float."""
    # TODO
    raise NotImplementedError("exercise 8: write mean_kl")
