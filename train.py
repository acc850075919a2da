"""train.py: supervised fine-tuning of GPT-2 or SmolLM2, LoRA or full, in one plain PyTorch loop.

Each optimizer step runs --grad-accum micro-batches forward and backward and then updates the
weights. The loss of a step is the summed next-token loss over every trained (assistant) token of
the step divided by how many there are, across micro-batches and processes: not a mean of per-batch
means, which would weigh a token in a short reply more than one in a long reply. Checkpoints carry
everything (weights, optimizer, schedule, random generators, data position), so a stopped run
resumes to exactly the same result. With --dtype float16 the gradient scaler skips a step whose gradient overflowed: the
weights stay as they were while the step counter and the learning rate move on; skipped steps are
counted in the progress bar and the final line, and logged with "skipped": true and grad_norm null.

The file reads setup -> data -> model -> optimizer -> step -> loop: train_loop() is the loop on one
screen, run_training() sets it up and writes the outputs.

    python train.py                                   # gpt2 + LoRA on the built-in triage task -> out/
    python train.py --full --lr 5e-5 --out out/full   # full fine-tune instead of LoRA
    python train.py --resume                          # continue the run in out/ from its checkpoint
    python train.py --model smollm2-135m-instruct-gguf --out out/smol  # SmolLM2 (ChatML), offline
    torchrun --nproc_per_node=2 train.py              # data parallel on 2 GPUs (or 2 CPU processes)
    python train.py --benchmark --benchmark-vs-hf     # tokens/s, memory, MFU; and vs transformers + PEFT

Outputs under --out: adapter/ (LoRA, PEFT's format) or model/ (--full: Hugging Face layout with the
base's tokenizer files; from a .gguf base they are written out of its metadata), metrics.jsonl
(step, loss, lr, tokens_per_s, grad_norm, val_loss when measured), loss.png, ckpt/ (the latest
checkpoint and the one before) and run.json (arguments, device, dtype, status, final validation
loss, wall time, parameter counts). The built-in datasets have a val split; a --data file is
validated on --val-data, else on --val-fraction of it.
"""

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import lora
from model import GPT, IGNORE_INDEX, from_pretrained, load_config, save_pretrained
from plumbing import benchmark as bench
from plumbing import cli
from plumbing.checkpoint import StopFlag, check_resume, load_checkpoint, read_latest, restore
from plumbing.checkpoint import save_run_checkpoint
from plumbing.config_checks import check_config, check_examples
from plumbing.device import Runtime, all_reduce_sum, any_process, autocast, seed_everything
from plumbing.device import setup_runtime
from plumbing.flops import flop_costs, peak_flops, step_flops
from plumbing.hub import resolve_pretrained
from plumbing.plots import save_plot
from plumbing.records import holdout_split
from plumbing.runs import append_metrics, keep_metrics, remove_stray_temps, write_run_json
from plumbing.stats import format_stats
from plumbing.tokenizer_files import copy_tokenizer_files, get_tokenizer
from tasks import BUILTIN_DATASETS, resolve_dataset

# -----------------------------------------------------------------------------
# Setup: every setting is a field of TrainConfig; the parser is built from it (plumbing/cli.py)

MODEL_HELP = ("preset (gpt2[-medium|-large|-xl], smollm2-135m[-instruct], smollm2-135m-instruct-gguf), "
              "a Hugging Face directory or a .gguf file")


# The defaults are the main job: GPT-2 small + LoRA (r=16, alpha=32 on every block Linear,
# lr 5e-4: a common, robust setting) on triage, batch 16 x 2 epochs of 3000 conversations =
# 374 steps, minutes on one GPU.
@dataclass
class TrainConfig:
    model: str = cli.opt("gpt2", MODEL_HELP, group="model")
    full: bool = cli.opt(False, "full fine-tune (every weight) instead of LoRA")
    data: str = cli.opt("triage", "built-in dataset (triage, instruct, knowledge) or a chat JSONL / "
                        "Alpaca file", group="data")
    val_data: str | None = cli.opt(None, "validation file for a --data file")
    val_fraction: float = cli.opt(0.05, "share of a --data file held out when there is no --val-data",
                                  min=0)
    train_on: str = cli.opt("all", "loss on every assistant reply or only the last",
                            choices=("all", "last"))
    max_len: int | None = cli.opt(None, "longest example in tokens (default: the context length)", min=1)
    overflow: str = cli.opt("drop", "longer examples: drop, or truncate after the last reply that fits",
                            choices=("drop", "truncate"))
    lora_rank: int = cli.opt(16, "rank r of each adapter", group="LoRA", min=1)
    lora_alpha: float = cli.opt(32.0, "the update is B A * alpha / r")
    lora_dropout: float = cli.opt(0.0, "dropout on the adapters' input (PEFT's default is 0 too)", min=0)
    lora_targets: str = cli.opt("", "comma-separated Linear names (default: every block projection)")
    batch_size: int = cli.opt(16, "examples per micro-batch, per process", group="optimisation", min=1)
    grad_accum: int = cli.opt(1, "micro-batches per optimizer step", min=1)
    lr: float | None = cli.opt(None, "peak learning rate (default 5e-4 LoRA, 5e-5 --full)", above=0)
    weight_decay: float = cli.opt(0.01, "AdamW weight decay on matrices")
    beta1: float = cli.opt(0.9, "AdamW beta1")
    beta2: float = cli.opt(0.999, "AdamW beta2")
    grad_clip: float = cli.opt(1.0, "clip the gradient norm to this (0: off)", min=0)
    max_steps: int | None = cli.opt(None, "optimizer steps to train", group="schedule", min=1)
    epochs: float | None = cli.opt(None, "passes over the data (2 without --max-steps)", above=0)
    warmup: int = cli.opt(20, "linear warmup steps, then cosine decay", min=0)
    min_lr_ratio: float = cli.opt(0.1, "the cosine ends at lr * this", min=0)
    stop_after: int | None = cli.opt(None, "stop with a checkpoint after this step (continue with "
                                     "--resume)", min=1)
    out: str = cli.opt("out", "output directory", group="outputs")
    eval_every: int = cli.opt(50, "validation loss every N steps and at the end", min=0)
    log_every: int = cli.opt(10, "metrics.jsonl record every N steps", min=1)
    save_every: int = cli.opt(100, "checkpoint every N steps and at the end", min=0)
    early_stop_patience: int = cli.opt(0, "stop after N evaluations without a better val loss (0: off)",
                                       min=0)
    resume: bool = cli.opt(False, "continue from the latest checkpoint in --out")
    seed: int = cli.opt(1337, "seed for LoRA init, dropout and data order", group="system")
    device: str = cli.opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = cli.opt("auto", "autocast precision; weights stay fp32",
                         choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = cli.opt(False, "torch.compile the model")
    benchmark: bool = cli.opt(False, "time steps instead of training; writes nothing", group="benchmark")
    benchmark_steps: int = cli.opt(10, "timed steps", min=1)
    benchmark_warmup: int = cli.opt(3, "untimed steps first", min=0)
    benchmark_seq_len: int | None = cli.opt(None, "synthetic rows of this length, second half trained",
                                            min=1)
    benchmark_vs_hf: bool = cli.opt(False, "also time transformers + PEFT on the same batches")


def default_lr(cfg):
    """LoRA's few small matrices take a ~10x larger step than a full
    fine-tune of all 124M weights."""
    return cfg.lr if cfg.lr is not None else (5e-5 if cfg.full else 5e-4)


def settings_line(cfg):
    """The training settings in one line, from TrainConfig itself (the lab prints this)."""
    method = "full fine-tune" if cfg.full else (f"LoRA r={cfg.lora_rank}, alpha {cfg.lora_alpha:g}, "
                                                f"dropout {cfg.lora_dropout:g}")
    return (f"{method}; AdamW lr {default_lr(cfg):g} (betas {cfg.beta1:g}/{cfg.beta2:g}, weight decay "
            f"{cfg.weight_decay:g}), {cfg.warmup} warmup steps then cosine to {cfg.min_lr_ratio:g} x lr, "
            f"gradient clip {cfg.grad_clip:g}, batch {cfg.batch_size} x {cfg.grad_accum}")


def has_val(cfg):
    """Does the run have a validation set: a built-in's val split,
    --val-data, or a held-out share?"""
    return cfg.data in BUILTIN_DATASETS or cfg.val_data is not None or cfg.val_fraction > 0


# -----------------------------------------------------------------------------
# Data: conversations -> token examples -> an endless, resumable stream of micro-batches


def load_split(cfg, split, tokenizer, block_size):
    """Tokenized examples [(ids, mask)] of one split of --data (or
    --val-data), plus the stats dict."""
    if cfg.data in BUILTIN_DATASETS:
        conversations = data.load_conversations(resolve_dataset(cfg.data, split))
    elif split == "val" and cfg.val_data is not None:
        conversations = data.load_conversations(cfg.val_data)
    else:
        if not os.path.isfile(cfg.data):
            raise FileNotFoundError(f"--data {cfg.data}: neither a file nor a built-in dataset "
                                    f"({', '.join(BUILTIN_DATASETS)})")
        fraction = 0.0 if cfg.val_data is not None else cfg.val_fraction  # --val-data: train on all
        conversations = holdout_split(data.load_conversations(cfg.data), fraction, cfg.seed, split)
    return data.tokenize_dataset(conversations, tokenizer, block_size, cfg.train_on, cfg.overflow)


class BatchStream:
    """This process's micro-batches, epoch after epoch, as (input_ids, targets, n_trained): tensors
    on the device, and the number of trained targets counted on the host (never read back).

    The position is (epoch, index of the next batch in that epoch). An epoch's batch order is a
    function of (seed, epoch) alone (data.batches), so a resumed run rebuilds it and continues at
    the same batch, and N processes x batch b see the same examples per step as one process x batch
    N*b. rt: the Runtime (rank, world size, device); pad_id: chat_format(tokenizer).pad_id."""

    def __init__(self, examples, batch_size, seed, rt, pad_id):
        self.examples, self.batch_size, self.seed, self.rt, self.pad_id = (examples, batch_size, seed,
                                                                           rt, pad_id)
        self.seek(0, 0)
        if not self.order:
            raise ValueError(f"{len(examples)} training examples are fewer than one global batch of "
                             f"{batch_size * rt.world_size} (--batch-size x processes): lower "
                             "--batch-size")

    def batches_per_epoch(self):
        return len(self.order)

    def position(self):
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, epoch, index):
        """Continue at batch `index` of `epoch` (a new stream starts at 0, 0; resume seeks)."""
        self.epoch, self.index = epoch, index
        shard = (self.rt.rank, self.rt.world_size)  # this process's share of each global batch
        self.order = data.batches(self.examples, self.batch_size, self.seed, epoch, shard)

    def next(self):
        if self.index >= len(self.order):
            self.seek(self.epoch + 1, 0)
        batch = [self.examples[i] for i in self.order[self.index]]
        self.index += 1
        x, y = data.collate(batch, pad_id=self.pad_id)  # (B, T) each
        n_trained = sum(sum(mask[1:]) for _, mask in batch)  # collate's targets at mask[1:] == 1
        if self.rt.device.startswith("cuda"):  # page-locked: the copy need not wait for the GPU
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.rt.device, non_blocking=True), y.to(self.rt.device, non_blocking=True), n_trained


def eval_batches(examples, batch_size, rt, pad_id):
    """Every validation example exactly once, split over the processes
    (some get a short last batch)."""
    order = data.batches(examples, batch_size, seed=0, epoch=0, shard=(rt.rank, rt.world_size),
                         shuffle=False, drop_last=False)
    for idx in order:
        if idx:
            x, y = data.collate([examples[i] for i in idx], pad_id=pad_id)
            yield x.to(rt.device), y.to(rt.device)


# -----------------------------------------------------------------------------
# Model: the pretrained GPT-2 or SmolLM2 with LoRA adapters (or all weights trainable)


def build_model(cfg, base, device):
    """Load the base model (a directory, or a GPT the lab passes in); wrap the target layers with
    LoRA unless --full. Returns (model, summary line)."""
    model = from_pretrained(base) if isinstance(base, str) else base
    if cfg.full:
        model.requires_grad_(True)
        n = sum(p.numel() for p in model.parameters())
        summary = f"full fine-tune: all {n:,} parameters trainable"
    else:
        # None (no names given) lets apply_lora pick DEFAULT_TARGETS for the architecture; an empty
        # tuple would be a request for no layers at all.
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()) or None
        summary = str(lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets))
    return model.to(device), summary


def trainable_named(model):
    """[(name, parameter)] of what the optimizer updates, in a fixed
    order (checkpoints rely on it)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# Optimizer


def decay_groups(model):
    """Split the trainable parameters by whether weight decay applies: matrices (Linear and
    embedding weights, LoRA's A and B) yes; 1-D tensors (biases, LayerNorm gains and shifts)
    no, since shrinking a gain or a bias toward 0 is not a sensible prior. Returns (decay,
    no_decay) as [(name, parameter)]."""
    decay = [(n, p) for n, p in trainable_named(model) if p.dim() >= 2]
    no_decay = [(n, p) for n, p in trainable_named(model) if p.dim() < 2]
    return decay, no_decay


def make_optimizer(model, cfg, device):
    decay, no_decay = decay_groups(model)
    groups = [{"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    # (LoRA has no 1-D trainable tensors: its second group is empty and left out)
    return adamw([g for g in groups if g["params"]], cfg, device)


def adamw(groups, cfg, device):
    """AdamW, fused where PyTorch has the kernel (CUDA; CPU since torch 2.4): one pass over
    each tensor for the whole update instead of ~10 elementwise ops, each reading and
    writing it (2-3x faster on CPU)."""
    torch_version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    fused = device.startswith("cuda") or (device == "cpu" and torch_version >= (2, 4))
    return torch.optim.AdamW(groups, lr=default_lr(cfg), betas=(cfg.beta1, cfg.beta2),
                             fused=fused or None)


# -----------------------------------------------------------------------------
# The step: schedule, token-weighted accumulation, update


@dataclass
class Schedule:
    """The learning rate's course: linear warmup, then a half cosine down
    to min_lr at the last step."""

    max_lr: float
    warmup: int  # steps of linear warmup
    max_steps: int  # the cosine reaches min_lr at step max_steps - 1
    min_lr: float


def lr_at(step, schedule):
    """Learning rate of optimizer step `step` (0-based): linear warmup from max_lr /
    warmup to max_lr over `warmup` steps, then a half cosine from max_lr down to
    min_lr, reached at the last step."""
    s = schedule
    if step < s.warmup:
        return s.max_lr * (step + 1) / s.warmup
    decay_steps = max(s.max_steps - 1 - s.warmup, 1)
    progress = min((step - s.warmup) / decay_steps, 1.0)
    return s.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (s.max_lr - s.min_lr)


def accumulate(model, micro_batches, autocast, scaler, rt=None):
    """Forward + backward every micro-batch (x, y, n_trained) of one optimizer step, leaving in
    .grad the gradient of

        (sum of the token losses over the trained tokens of all micro-batches of all processes)
        / (number of those tokens)

    i.e. the same gradient one big batch would give. Each micro-batch's summed loss is divided by
    the whole window's trained-token count, known before any backward (counted on the host, summed
    over processes). DDP averages gradients over processes, so each process scales its loss up by
    world_size to undo that mean. A window with no trained token contributes exactly zero (0 / 1),
    never 0 / 0 = NaN. rt: the Runtime (None: one process). Returns (summed loss over this
    process's micro-batches (a detached device tensor), counts [trained tokens, all input
    positions] over all processes (float64; on the device under DDP, else on the host))."""
    device = micro_batches[0][0].device
    counts = torch.tensor([float(sum(n for _, _, n in micro_batches)),
                           float(sum(x.numel() for x, _, _ in micro_batches))], dtype=torch.float64)
    ddp, world_size = (rt.ddp, rt.world_size) if rt is not None else (False, 1)
    if ddp:  # every process's counts, summed on the device (the host never waits for the sum)
        counts = all_reduce_sum(counts.to(device), rt)
    scale = world_size / counts[0].clamp(min=1.0)  # a tensor: reading it would be a sync under DDP
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for i, (x, y, n_trained) in enumerate(micro_batches):
        # DDP all-reduces gradients at every backward; only the last micro-batch needs it
        last = i == len(micro_batches) - 1
        grad_sync = nullcontext() if not ddp or last else model.no_sync()
        with grad_sync:
            with autocast:  # the loss summed over trained positions (0 if none)
                _, nll = model(x, y, reduction="sum", n_trained=n_trained)
            scaler.scale(nll * scale.to(nll.dtype)).backward()
        loss_sum += nll.detach().float()
    return loss_sum, counts


def optimizer_step(optimizer, scaler, params, grad_clip, loss=None):
    """The end of every step: unscale (fp16), clip the global gradient norm, update, clear the
    gradients. Returns the norm before clipping (a device tensor). A non-finite norm (or loss)
    raises FloatingPointError before the weights change; that check is the step's one read from
    the device, the host waiting for the GPU to finish the backward. fp16 skips it: its scaler
    reads the gradients itself and skips an overflowing step."""
    scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    if not scaler.is_enabled():  # fp16: the scaler has checked the gradients already
        checked = norm if loss is None else torch.stack([norm.double(), loss.double()])
        if not torch.isfinite(checked).all():  # the read
            bad = ("loss", loss) if loss is not None and not torch.isfinite(loss) else ("gradient norm", norm)
            raise FloatingPointError(f"{bad[0]} ({bad[1].item()})")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


@dataclass
class Setup:
    """What setup_training builds, the same for a run, --benchmark and the lab."""

    raw_model: GPT  # the model itself: what is saved
    model: torch.nn.Module  # what the step runs: raw_model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16's loss scaling; a no-op for bf16 and fp32
    named: list  # [(name, parameter)] the optimizer updates (trainable_named)
    rt: Runtime  # device, dtype, rank, world size


def setup_training(cfg, rt, base, log):
    """The Setup for base (see build_model): model, optimizer and gradient scaler, seeded."""
    # LoRA's A init: identical on every process (DDP broadcasts rank 0's too)
    seed_everything(cfg.seed)
    raw_model, summary = build_model(cfg, base, rt.device)
    log(f"model: {cfg.model}: {summary}")  # the summary counts parameters (LoRA adds its own)
    model = raw_model
    if cfg.compile:
        # compile for any batch length (and number of trained positions) at once, not once each
        model = torch.compile(raw_model, dynamic=True)
    if rt.ddp:
        model = DDP(model, device_ids=[rt.device] if rt.device.startswith("cuda") else None)
    optimizer = make_optimizer(raw_model, cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.split(":")[0], enabled=rt.dtype == "float16")
    seed_everything(cfg.seed + rt.rank)  # dropout: a different stream on each process
    return Setup(raw_model, model, optimizer, scaler, trainable_named(raw_model), rt)


def train_step(s, micro_batches, lr, grad_clip):
    """One optimizer step of Setup s on a window of micro-batches. Returns (loss, gradient norm,
    counts): loss is the mean over the window's trained tokens on all processes; loss and norm are
    device tensors, read by the caller only when it logs them. A non-finite loss or gradient raises
    FloatingPointError before the weights are touched, so the last checkpoint stays the last good
    state."""
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    loss_sum, counts = accumulate(s.model, micro_batches, autocast(s.rt.device, s.rt.dtype), s.scaler,
                                  s.rt)
    loss = all_reduce_sum(loss_sum.double(), s.rt) / counts[0].clamp(min=1.0).to(loss_sum.device)
    norm = optimizer_step(s.optimizer, s.scaler, [p for _, p in s.named], grad_clip, loss)
    return loss, norm, counts


# -----------------------------------------------------------------------------
# Evaluation during training: the validation loss, and keeping the best weights for early stopping


@torch.no_grad()
def summed_loss(model, batches, autocast_ctx, device):
    """[summed loss, trained tokens] (float64) over (x, y) batches: the numerator and
    denominator of a token-weighted mean, which a mean of per-batch means is not.
    eval.py's response loss is this too."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        with autocast_ctx:
            _, nll = model(x, y, reduction="sum")
        total[0] += nll.double()
        total[1] += (y != IGNORE_INDEX).sum()
    return total


def validation_loss(model, examples, batch_size, rt, pad_id):
    """Token-weighted mean loss over every validation example, over all processes. None without
    examples."""
    if not examples:
        return None
    was_training = model.training
    model.eval()  # dropout off
    batches = eval_batches(examples, batch_size, rt, pad_id)
    total = all_reduce_sum(summed_loss(model, batches, autocast(rt.device, rt.dtype), rt.device), rt)
    model.train(was_training)
    return (total[0] / total[1]).item() if total[1] > 0 else None


@dataclass
class Progress:
    """Where the run is: what a checkpoint saves besides weights, optimizer and generators."""

    step: int = 0  # optimizer steps done
    best_val: float | None = None  # lowest validation loss so far
    bad_evals: int = 0  # evaluations since best_val last improved (early stopping)
    # CPU copy of the trainable weights at best_val (early stopping)
    best_weights: dict | None = None
    skipped: int = 0  # fp16 steps the scaler skipped this sitting (a device count until logged)

    def update_best(self, val_loss, named_params, keep_weights):
        """Early stopping's bookkeeping after an evaluation: a new best (its weights kept when
        keep_weights), or one more evaluation without improvement."""
        if self.best_val is None or val_loss < self.best_val:
            self.best_val, self.bad_evals = val_loss, 0
            if keep_weights:
                self.best_weights = {n: p.detach().cpu().clone() for n, p in named_params}
        else:
            self.bad_evals += 1


def nonfinite_message(error, step, ckpt_dir):
    """The error for a NaN/inf loss or gradient norm: where the last good state is, what to try."""
    latest = read_latest(ckpt_dir)
    keep = f"the last good checkpoint is {ckpt_dir}/{latest}" if latest else "no checkpoint was written yet"
    return (f"non-finite {error} at step {step + 1}: stopped before updating the weights; {keep}. "
            "Lower --lr, or use --dtype float32, then --resume")


def logged_numbers(loss, norm, fp16):
    """A logging step's loss and gradient norm, read from the device: the only reads of a step
    besides the non-finite check. A step the fp16 scaler skipped logs grad_norm null (JSON has
    no NaN) and "skipped": true."""
    loss, norm = float(loss), float(norm)
    skipped = fp16 and not math.isfinite(norm)
    return {"loss": loss, "grad_norm": None if skipped else norm, **({"skipped": True} if skipped else {})}


# -----------------------------------------------------------------------------
# The training loop


@dataclass
class Run:
    """Everything the loop needs, built by prepare_run."""

    cfg: TrainConfig
    s: Setup  # model, optimizer, scaler, trainable parameters, runtime
    stream: BatchStream  # the training micro-batches
    val_examples: list  # [(ids, mask)] for the validation loss ([] without a validation set)
    pad_id: int  # input id at padding positions (the model family's)
    schedule: Schedule
    progress: Progress  # step, best validation loss (restored on --resume)
    info: dict  # what run.json records
    log: object  # print on rank 0, nothing elsewhere

    @property
    def ckpt_dir(self):
        return os.path.join(self.cfg.out, "ckpt")

    @property
    def metrics_path(self):
        return os.path.join(self.cfg.out, "metrics.jsonl")


def train_loop(run):
    """Train from run.progress.step to the end (or --stop-after, Ctrl-C, early stopping). Returns
    (status, the last validation loss): status "finished", "interrupted" or "early_stopped"."""
    cfg, s, progress = run.cfg, run.s, run.progress
    rt, max_steps = s.rt, run.schedule.max_steps
    end_step = min(max_steps, cfg.stop_after or max_steps)
    costs = flop_costs(s.raw_model)  # what a step computes: LoRA skips frozen weights' gradients
    peak = peak_flops(rt)  # the GPU's peak FLOP/s for MFU (None off CUDA)
    status, val_loss = "finished", None
    t_last, tokens_since, flops_since = time.time(), 0.0, 0.0
    s.model.train()
    with tqdm(total=max_steps, initial=progress.step, disable=not rt.master, dynamic_ncols=True,
              desc="train") as bar, StopFlag() as stop:
        while progress.step < end_step:
            # the learning rate of this step: warmup, then cosine decay
            lr = lr_at(progress.step, run.schedule)
            # the step: grad_accum micro-batches, token-weighted, then one update; the non-finite
            # check stops the run before a NaN/inf loss or gradient reaches the weights
            micro = [run.stream.next() for _ in range(cfg.grad_accum)]
            try:
                loss, norm, counts = train_step(s, micro, lr, cfg.grad_clip)
            except FloatingPointError as e:
                raise RuntimeError(nonfinite_message(e, progress.step, run.ckpt_dir)) from None
            progress.step += 1
            step = progress.step
            bar.update(1)
            # speed from the host's own counts; loss and norm stay on the device until logged
            tokens_since += counts[1]
            flops_since += step_flops(costs, micro) * rt.world_size
            # fp16 only: an overflowing step is skipped by the scaler (weights unchanged, lr moves on)
            if s.scaler.is_enabled():
                progress.skipped += ~torch.isfinite(norm)  # counted on the device
            record = {"step": step, "lr": lr}

            # evaluation: the validation loss (every process takes part); its time is not training's
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == max_steps:
                t_eval = time.time()
                val_loss = validation_loss(s.raw_model, run.val_examples, cfg.batch_size, rt,
                                           run.pad_id)
                t_last += time.time() - t_eval
                if val_loss is not None:
                    record["val_loss"] = val_loss
                    if rt.master:
                        bar.write(f"step {step}: train loss {float(loss):.4f}, val loss {val_loss:.4f}")
                    # early stopping: remember the best loss (and its weights, if it may stop)
                    progress.update_best(val_loss, s.named, keep_weights=cfg.early_stop_patience > 0)

            # logging: loss, norm and speed since the last record, read from the device only now,
            # to the progress bar and metrics.jsonl (rank 0)
            logged = "val_loss" in record or step % cfg.log_every == 0 or step == end_step
            if logged:
                seconds = max(time.time() - t_last, 1e-9)
                record.update(logged_numbers(loss, norm, s.scaler.is_enabled()),
                              tokens_per_s=float(tokens_since) / seconds)
                progress.skipped = int(progress.skipped)
                post = {"loss": f"{record['loss']:.4f}", "lr": f"{lr:.2e}",
                        "tok/s": f"{record['tokens_per_s']:,.0f}"}
                if progress.skipped:
                    post["skipped"] = progress.skipped
                if peak:  # model FLOPs per second over the GPUs' peak
                    post["mfu"] = f"{flops_since / seconds / (peak * rt.world_size):.1%}"
                bar.set_postfix(post)
                t_last, tokens_since, flops_since = time.time(), 0.0, 0.0
                if rt.master:
                    append_metrics(run.metrics_path, record)

            # stopping: Ctrl-C on any process (asked across processes at logging steps only: a
            # device round trip), or too many evaluations without a better val loss
            if (logged or not rt.ddp) and any_process(stop.requested, rt):
                status = "interrupted"
            elif cfg.early_stop_patience and progress.bad_evals >= cfg.early_stop_patience:
                status = "early_stopped"

            # checkpoint: on schedule, at the end, and whenever the run stops early
            if status != "finished" or step == end_step or (cfg.save_every and step % cfg.save_every == 0):
                save_run_checkpoint(run.ckpt_dir, s, progress, run.stream, cfg)
            if status != "finished":
                break
    return status, val_loss


# -----------------------------------------------------------------------------
# The run: set up, train, write the outputs


def load_data(cfg, rt, model_dir, log, with_val=True):
    """(train examples, validation examples, ChatFormat) of --data, tokenized for the model in
    model_dir, summarised in the log, and refused in one line if less than one batch is left."""
    tokenizer = get_tokenizer(model_dir)  # GPT-2's or SmolLM2's, as the checkpoint says
    fmt = data.chat_format(tokenizer)  # the family's chat tokens: pad id, end of turn, ...
    # config.json or the .gguf's metadata; no weights read yet
    model_config = load_config(model_dir)
    data.check_vocab(tokenizer, model_config.vocab_size, cfg.model)
    max_len = min(cfg.max_len or model_config.block_size, model_config.block_size)
    train_examples, stats = load_split(cfg, "train", tokenizer, max_len)
    val_examples = []
    if with_val and has_val(cfg):
        val_examples, _ = load_split(cfg, "val", tokenizer, max_len)
    log(f"data: {cfg.data}: {len(train_examples)} train / {len(val_examples)} val examples")
    log(format_stats(stats))
    # too few examples left: one line that says why they were dropped and what to do
    check_examples(stats, cfg, cfg.batch_size * rt.world_size, max_len, model_config.block_size)
    return train_examples, val_examples, fmt


def prepare_run(cfg, rt, model_dir, saved):
    """Data, schedule, model and optimizer for train_loop; a resumed run's state restored from the
    checkpoint `saved` = (tensors, state), or (None, None). Writes run.json ("running")."""
    log = print if rt.master else (lambda *a, **k: None)
    train_examples, val_examples, fmt = load_data(cfg, rt, model_dir, log)
    # Padding must be a token of this model's vocabulary: GPT-2's 50256 is past SmolLM2's 49152.
    stream = BatchStream(train_examples, cfg.batch_size, cfg.seed, rt, fmt.pad_id)
    per_epoch = stream.batches_per_epoch() / cfg.grad_accum  # optimizer steps per epoch
    max_steps = cfg.max_steps or max(1, math.ceil((cfg.epochs or 2.0) * per_epoch))
    schedule = Schedule(default_lr(cfg), cfg.warmup, max_steps, default_lr(cfg) * cfg.min_lr_ratio)
    log(f"schedule: {max_steps} steps of {cfg.batch_size * cfg.grad_accum * rt.world_size} examples "
        f"({per_epoch:g} steps per epoch), lr {schedule.max_lr:g}, {cfg.warmup} warmup steps then "
        f"cosine to {schedule.min_lr:g}")
    s = setup_training(cfg, rt, model_dir, log)
    progress, (tensors, state) = Progress(), saved
    if state is not None:
        progress = Progress(**restore(tensors, state, s, stream))
        log(f"resumed from {state['loaded_from']} at step {progress.step} (epoch {stream.epoch}, "
            f"batch {stream.index})")
    run = Run(cfg, s, stream, val_examples, fmt.pad_id, schedule, progress, {}, log)
    if rt.master:  # a new log, or the resumed one without the steps about to be redone
        keep_metrics(run.metrics_path, progress.step)
    # "tokenizer": where get_tokenizer reads the base model's tokenizer (a directory or a .gguf)
    run.info = {"args": asdict(cfg), "model_dir": os.path.abspath(model_dir),
                "tokenizer": os.path.abspath(model_dir), "device": rt.device, "dtype": rt.dtype,
                "world_size": rt.world_size, "kind": "full" if cfg.full else "lora",
                "weights": "model" if cfg.full else "adapter", "max_steps": max_steps,
                "trainable_params": sum(p.numel() for _, p in s.named),
                "total_params": sum(p.numel() for p in s.raw_model.parameters())}
    return run


def finish(run, status, val_loss, model_dir, t_start):
    """After the loop: say how it ended; keep the best weights after an early stop; write the
    adapter (or the whole model), loss.png and run.json. Returns the exit code."""
    cfg, s, step, log = run.cfg, run.s, run.progress.step, run.log
    save_status = lambda st: write_run_json(cfg.out, s.rt.master, run.info, st, step, t_start)
    if status == "interrupted":
        log(f"interrupted: checkpoint saved at step {step} in {run.ckpt_dir}; continue with "
            f"python train.py --resume --out {cfg.out}")
        save_status(status)
        return 130
    if status == "early_stopped":
        log(f"early stop: no better val loss in {run.progress.bad_evals} evaluations; keeping the best "
            f"weights (val loss {run.progress.best_val:.4f})")
        with torch.no_grad():
            for n, p in s.named:
                p.copy_(run.progress.best_weights[n])
        val_loss = run.progress.best_val
    elif step < run.schedule.max_steps:
        log(f"stopped after step {step} of {run.schedule.max_steps} (--stop-after); continue with "
            "--resume")
        save_status("stopped")
        return 0
    elif val_loss is None:  # resumed a run that had already finished: measure it again
        val_loss = validation_loss(s.raw_model, run.val_examples, cfg.batch_size, s.rt, run.pad_id)
    if not s.rt.master:
        return 0
    if cfg.full:
        out_dir = os.path.join(cfg.out, "model")
        # Hugging Face layout (GPT-2 or Llama), also from a .gguf
        save_pretrained(s.raw_model, out_dir)
        copy_tokenizer_files(model_dir, out_dir)  # so out/model is a complete model directory
    else:
        out_dir = os.path.join(cfg.out, "adapter")
        lora.save_adapter(s.raw_model, out_dir, base_model_name_or_path=cfg.model)
    save_plot(run.metrics_path, os.path.join(cfg.out, "loss.png"))
    run.info.update(final_val_loss=val_loss, best_val_loss=run.progress.best_val)
    save_status(status)
    vl = f"{val_loss:.4f}" if val_loss is not None else "n/a (no validation set)"
    n_skipped = int(run.progress.skipped)
    skipped = f" ({n_skipped} fp16 steps skipped by the scaler)" if n_skipped else ""
    log(f"done: {step} steps{skipped} in {time.time() - t_start:.0f}s, final val loss {vl}; "
        f"{'model' if cfg.full else 'adapter'} in {out_dir}")
    return 0


OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def oom_advice(cfg, rt):
    """What to change when a step does not fit in memory: the same step in smaller pieces first."""
    same = (f"--batch-size {max(cfg.batch_size // 2, 1)} --grad-accum {cfg.grad_accum * 2} (the same step "
            "in smaller pieces)")
    other = ["LoRA instead of --full"] * cfg.full + ["a shorter --max-len", "a smaller model"]
    return f"out of memory on {rt.device} at batch {cfg.batch_size}: try {same}, or {', or '.join(other)}"


def run_training(cfg, flags_given=()):
    """The whole run. Returns the process exit code (0 done, 130 stopped by Ctrl-C)."""
    t_start = time.time()
    # Everything that can be checked cheaply is checked before anything slow (or a process group).
    check_config(cfg, flags_given, has_val(cfg))
    remove_stray_temps(cfg.out)  # what a killed write left (plumbing/files.atomic_write's *.tmp)
    ckpt_dir = os.path.join(cfg.out, "ckpt")
    saved = load_checkpoint(ckpt_dir) if cfg.resume else (None, None)
    if saved[1] is not None:
        check_resume(saved[1], cfg, int(os.environ.get("WORLD_SIZE", "1")))
    model_dir = resolve_pretrained(cfg.model)
    log = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)
    rt, device_reason, dtype_reason = setup_runtime(cfg.device, cfg.dtype, log)
    if cfg.benchmark:
        return benchmark(cfg, rt, model_dir)
    run = prepare_run(cfg, rt, model_dir, saved)
    run.info.update(device_reason=device_reason, dtype_reason=dtype_reason)
    write_run_json(cfg.out, rt.master, run.info, "running", run.progress.step, t_start)
    try:
        status, val_loss = train_loop(run)
    except OUT_OF_MEMORY:
        write_run_json(cfg.out, rt.master, run.info, "out_of_memory", run.progress.step, t_start)
        raise RuntimeError(oom_advice(cfg, rt)) from None
    return finish(run, status, val_loss, model_dir, t_start)


# -----------------------------------------------------------------------------
# --benchmark: the same step, timed (plumbing/benchmark.py measures and prints)


def benchmark(cfg, rt, model_dir):
    """--benchmark: time the training step on --data's batches (or synthetic rows of
    --benchmark-seq-len); plumbing/benchmark.py makes the batches, times and prints."""
    log = print if rt.master else (lambda *a, **k: None)
    stream = None
    if not cfg.benchmark_seq_len:  # synthetic rows need no dataset
        examples, _, fmt = load_data(cfg, rt, model_dir, log, with_val=False)
        stream = BatchStream(examples, cfg.batch_size, cfg.seed, rt, fmt.pad_id)
    s = setup_training(cfg, rt, model_dir, log)
    hooks = bench.Hooks(
        step=lambda window: float(train_step(s, window, default_lr(cfg), cfg.grad_clip)[0]),
        make_optimizer=lambda ps: adamw([{"params": ps, "weight_decay": cfg.weight_decay}], cfg,
                                        rt.device),
        optimizer_step=optimizer_step, save_adapter=lora.save_adapter, ignore_index=IGNORE_INDEX)
    return bench.run(cfg, rt, model_dir, s.raw_model, stream, hooks, log)


# -----------------------------------------------------------------------------


def main(argv=None):
    """Run the training and turn bad input into one line on stderr and exit code 1: no traceback for
    errors that are the user's to fix (our checks raise ValueError / FileNotFoundError /
    RuntimeError with the fix)."""
    cfg, flags_given = cli.parse(TrainConfig, argv, "Fine-tune GPT-2 or SmolLM2 (LoRA or full) on chat "
                                 "data.")
    try:
        return run_training(cfg, flags_given)
    except cli.USER_ERRORS as e:
        print(cli.error_line(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (no checkpoint written since the last one)", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
