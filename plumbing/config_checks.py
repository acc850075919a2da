"""plumbing/config_checks.py: train.py's settings refused in one line that says which flags clash and
what to do: check_config before anything is loaded, check_examples once the data is tokenized (before
the model is). Machinery beside the learning path: nothing here trains.
"""

import os

from plumbing import cli
from plumbing.checkpoint import LATEST, checkpoint_names


def check_config(cfg, flags_given, has_val):
    """Refuse impossible settings before anything is loaded. flags_given: the option strings on the
    command line (to tell "--lora-rank 8 given" from "default 8"); has_val: the run has a validation
    set (train.has_val)."""
    cli.check_ranges(cfg)
    lora_flags = sorted(f for f in flags_given if f.startswith("--lora-"))
    if cfg.full and lora_flags:
        raise ValueError(f"--full trains every weight; {', '.join(lora_flags)} only apply to LoRA (drop one)")
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise ValueError("--max-steps and --epochs both given; the schedule needs exactly one")
    if not cfg.lora_dropout < 1 or not cfg.val_fraction < 1 or not cfg.min_lr_ratio <= 1:
        raise ValueError("--lora-dropout and --val-fraction must be in [0, 1), --min-lr-ratio in [0, 1]")
    if cfg.early_stop_patience and not has_val:
        raise ValueError("--early-stop-patience needs a validation set (--val-data or --val-fraction > 0)")
    if cfg.benchmark_vs_hf and not cfg.benchmark:
        raise ValueError("--benchmark-vs-hf is a benchmark option: add --benchmark")
    if cfg.benchmark_vs_hf and cfg.full:
        raise ValueError("--benchmark-vs-hf compares LoRA against PEFT: drop --full")
    if cfg.benchmark and cfg.resume:
        raise ValueError("--benchmark does not train: drop --resume")
    ckpt = os.path.join(cfg.out, "ckpt")
    if not cfg.benchmark and not cfg.resume and (checkpoint_names(ckpt) or os.path.isfile(os.path.join(ckpt, LATEST))):
        raise ValueError(f"{cfg.out} already holds a run with checkpoints: add --resume to continue it, or "
                         f"choose another --out (or delete {cfg.out})")


def check_examples(stats, cfg, global_batch, max_len, block_size):
    """Refuse a training set with less than one global batch left, saying why examples were dropped (with
    data.tokenize_dataset's counts) and which flags bring them back."""
    n, why = stats["n_examples"], []
    if stats["n_too_long"]:
        longer = (f"--max-len up to the context of {block_size}" if max_len < block_size
                  else "a model with a longer context")
        why.append(f"{stats['n_too_long']} longer than {max_len} tokens (--overflow truncate keeps their first "
                   f"replies; or {longer})")
    if stats["n_untrained"]:
        why.append(f"{stats['n_untrained']} with no trained token (every reply has weight 0, or truncation cut "
                   "off every trained reply)")
    if stats["n_duplicates"]:
        why.append(f"{stats['n_duplicates']} exact duplicates of another conversation")
    if n < global_batch:
        dropped = f": dropped {'; '.join(why)}" if why else ""
        raise ValueError(f"--data {cfg.data}: {n} training examples left of {stats['n_conversations']} conversations"
                         f"{dropped}. That is fewer than one global batch of {global_batch} (--batch-size x "
                         "processes)" + ("; lower --batch-size" if n else ""))
