"""lab/common.py: what every lab experiment shares, so that each lab script shows only its experiment.

An experiment is: a base model, a few fine-tuning runs on different data or settings, the same evaluation
for each, and a results file. The pieces are train.py's and eval.py's own, called in-process, never copies:

- LabConfig: the flags of every lab script (--model, --out, --quick, ...); a script adds its own fields.
- setup(cfg): device and dtype (decided and printed by plumbing.device), the tokenizer and the base model,
  or with --quick a tiny random model of the same family and tokenizer, so CI runs a script in seconds.
- finetune(lab, conversations, steps, ...): LoRA or full fine-tuning with train.py's BatchStream, optimizer,
  schedule and train_step; a callback sees the model every N steps (per-epoch curves).
- replies / scored(...): eval.py's batched generation and the task's own scorer (tasks.score).
- save_results(...): results/NAME.json (every number), NAME.md (table, command, hardware, wall time), NAME.png.
"""

import copy
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import train  # noqa: E402
from eval import (  # noqa: E402
    FORGET_WINDOW,
    Decoding,
    fit_prompt,
    forgetting,
    generate_replies,
    run_rung,
    split_reply,
)
from model import GPT, Sampling, from_pretrained, load_config  # noqa: E402
from plumbing import cli  # noqa: E402
from plumbing.device import setup_runtime  # noqa: E402
from plumbing.files import atomic_write_text  # noqa: E402
from plumbing.hub import resolve_pretrained  # noqa: E402
from plumbing.plots import save_figure  # noqa: E402
from plumbing.records import general_tokens, text_windows  # noqa: E402
from plumbing.report import hardware  # noqa: E402
from plumbing.tokenizer_files import get_tokenizer  # noqa: E402
from tasks import score, summarize  # noqa: E402

# -----------------------------------------------------------------------------
# Flags


@dataclass
class LabConfig:
    model: str = cli.opt("smollm2-135m-instruct-gguf", "base model: a preset, a Hugging Face directory or a .gguf",
                         group="lab")
    out: str = cli.opt("results", "where NAME.json, NAME.md and NAME.png go")
    quick: bool = cli.opt(False, "a tiny random model of --model's family and a handful of steps (CI, seconds)")
    batch_size: int = cli.opt(8, "conversations per optimizer step", min=1)
    eval_items: int = cli.opt(40, "test items scored per model (greedy)", min=1)
    seed: int = cli.opt(1337, "seed for data sampling, LoRA init and data order")
    device: str = cli.opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = cli.opt("auto", "autocast precision", choices=("auto", "float32", "bfloat16", "float16"))


def parse(config_cls, description, argv=None):
    cfg, _ = cli.parse(config_cls, argv, description)
    cli.check_ranges(cfg)
    if cfg.quick:
        cfg.batch_size, cfg.eval_items = 4, 4
    return cfg


def run(main):
    """Run a lab script's main: bad input (a missing model, too little data) is one line and exit 1."""
    try:
        main()
    except cli.USER_ERRORS as e:
        sys.exit(cli.error_line(e))


# -----------------------------------------------------------------------------
# The base model, loaded once; each run fine-tunes a copy


@dataclass
class Lab:
    cfg: LabConfig
    rt: object  # plumbing.device.Runtime: device, dtype
    tok: object  # the base model's tokenizer
    fmt: data.ChatFormat
    base: GPT  # never trained: finetune() loads its own (with --quick: trains a copy)
    model_dir: str
    t0: float


def setup(cfg):
    t0 = time.time()
    model_dir = resolve_pretrained(cfg.model)
    rt, _, _ = setup_runtime(cfg.device, cfg.dtype, print)
    tok = get_tokenizer(model_dir)
    config = load_config(model_dir)  # the family, vocabulary and context of --model
    if cfg.quick:  # the same family and tokenizer, 2 blocks of width 32: random weights, seconds per run
        torch.manual_seed(cfg.seed)
        llama = config.arch == "llama"
        base = GPT(dataclasses.replace(config, n_layer=2, n_head=2, n_embd=32, n_kv_head=1 if llama else None,
                                       intermediate_size=64 if llama else None, block_size=512))
    else:
        base = from_pretrained(model_dir)
    print(f"model: {cfg.model}{' (--quick: tiny random)' if cfg.quick else ''}, "
          f"{sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters")
    return Lab(cfg, rt, tok, data.chat_format(tok), base.to(rt.device).eval(), model_dir, t0)


# -----------------------------------------------------------------------------
# Fine-tuning in-process: train.py's step, schedule and data stream


def finetune(lab, conversations, steps, on_step=None, every=0, desc="train", dedup=True, mask_fn=None,
             **overrides):
    """A fine-tuned copy of lab.base after `steps` optimizer steps on the conversations. overrides: any
    TrainConfig field (full, lr, lora_rank, train_on, warmup, ...). on_step(step, model, losses, optimizer) runs
    every `every` steps (the model in eval mode; training resumes after). dedup=False keeps exact duplicate
    conversations (train.py drops them); mask_fn(ids, mask) -> mask changes what is trained (lab/masking.py).
    Returns (model in eval mode, per-step losses)."""
    cfg = train_config(lab, steps, **overrides)
    examples, _ = data.tokenize_dataset(conversations, lab.tok, lab.base.config.block_size, cfg.train_on,
                                        dedup=dedup)
    if mask_fn is not None:
        examples = [(ids, mask_fn(ids, mask)) for ids, mask in examples]
    # train.py's setup: the same seeds, LoRA init (the base loaded from disk: its init draws random numbers
    # too), optimizer and gradient scaler. --quick's random model has no files: a copy is trained instead.
    base = copy.deepcopy(lab.base) if lab.cfg.quick else lab.model_dir
    s = train.setup_training(cfg, lab.rt, base, lambda *a: None)
    stream = train.BatchStream(examples, cfg.batch_size, cfg.seed, lab.rt, lab.fmt.pad_id)
    max_lr = train.default_lr(cfg)
    schedule = train.Schedule(max_lr, cfg.warmup, steps, max_lr * cfg.min_lr_ratio)
    losses, model = [], s.raw_model
    model.train()
    for step in tqdm(range(steps), desc=desc, leave=False):
        loss, _, _ = train.train_step(s, [stream.next()], train.lr_at(step, schedule), cfg.grad_clip)
        losses.append(loss)
        if on_step and every and (step + 1) % every == 0:
            model.eval()
            on_step(step + 1, model, losses, s.optimizer)
            model.train()
    return model.eval(), losses


def train_config(lab, steps, **overrides):
    """The TrainConfig of a lab run: train.py's defaults, the lab's batch and seed, warmup steps/8."""
    return train.TrainConfig(**{"batch_size": lab.cfg.batch_size, "seed": lab.cfg.seed,
                                "warmup": max(1, steps // 8), **overrides})


def training_settings(lab, steps, **overrides):
    """A lab run's training settings in words, read from its TrainConfig (train.settings_line)."""
    return train.settings_line(train_config(lab, steps, **overrides))


def val_loss(lab, model, conversations, train_on="all"):
    """Token-weighted loss on the assistant tokens of conversations (train.validation_loss)."""
    examples, _ = data.tokenize_dataset(conversations, lab.tok, lab.base.config.block_size, train_on, dedup=False)
    return train.validation_loss(model, examples, lab.cfg.batch_size, lab.rt, lab.fmt.pad_id)


# -----------------------------------------------------------------------------
# Evaluation: eval.py's batched generation, the task's scorer


def replies(lab, model, records, max_new_tokens, sampling=Sampling(0.0, seed=0), desc="generate",
            replies_of=generate_replies):
    """The model's replies to each record's prompt (its messages up to the last reply); greedy unless
    sampling says otherwise. replies_of: see eval.run_rung."""
    room = lab.base.config.block_size - max_new_tokens
    prompts = [fit_prompt(split_reply(r["messages"])[0], [], lab.tok, room)[0] for r in records]
    dec = Decoding(lab.tok, max_new_tokens, lab.rt.device, lab.rt.dtype, 16, sampling)
    return run_rung(desc, model, prompts, dec, replies_of)


def scored(lab, model, records, task="triage", max_new_tokens=48, desc="score", replies_of=generate_replies):
    """(the task's summary over records: exact match, valid format, ...; the replies), greedy."""
    out = replies(lab, model, records, max_new_tokens, desc=desc, replies_of=replies_of)
    scores = [score(task, reply, r) for reply, r in zip(out, records)]
    return summarize(task, scores, [r.get("family", "") for r in records], set()), out


def general_windows(lab, n_tokens=4096):
    """eval.py's forgetting text (data/general.txt) as windows, n_tokens predicted tokens in all."""
    path = os.path.join(ROOT, "data", "general.txt")
    ids = general_tokens(path, lab.tok, n_tokens, lab.fmt.document_id)
    return text_windows(ids, min(lab.base.config.block_size, FORGET_WINDOW))


def forgot(lab, model, windows):
    """eval.forgetting: the tuned model's perplexity change and KL(base || tuned) on general text (fp32)."""
    return forgetting(lab.base, model, windows, lab.rt.device)


# -----------------------------------------------------------------------------
# Results: NAME.json, NAME.md, NAME.png


def save_results(lab, name, claim, settings, results, table, fig, notes=""):
    """Write OUT/NAME.json, OUT/NAME.md and OUT/NAME.png (atomically) and print the table."""
    cfg = lab.cfg
    wall = time.time() - lab.t0
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    meta = {"name": name, "claim": claim, "model": cfg.model, "quick": cfg.quick, "hardware": hardware(lab.rt.device),
            "device": lab.rt.device, "dtype": lab.rt.dtype, "command": command, "wall_time_s": wall,
            "date": time.strftime("%Y-%m-%d"), "config": dataclasses.asdict(cfg), "settings": settings}
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_text(os.path.join(cfg.out, f"{name}.json"), json.dumps({**meta, "results": results}, indent=2) + "\n")
    md = [f"# {name}", "", f"Claim tested: {claim}", "",
          f"Model: {cfg.model}{' (--quick: a tiny random model; the numbers mean nothing)' if cfg.quick else ''}. "
          f"Hardware: {meta['hardware']}; device {lab.rt.device}, {lab.rt.dtype}. Wall time {wall / 60:.1f} min, "
          f"{meta['date']}.", "", "```bash", command, "```", "",
          "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".", "", table, "",
          f"![{name}]({name}.png)", ""] + ([notes, ""] if notes else [])
    atomic_write_text(os.path.join(cfg.out, f"{name}.md"), "\n".join(md))
    save_figure(fig, os.path.join(cfg.out, f"{name}.png"))
    print(table)
    print(f"\nresults: {cfg.out}/{name}.json, .md, .png ({wall:.0f} s)")


def grouped_bars(ax, rows, cols, labels, name):
    """One group of bars per metric (cols, shown as labels), one bar per row (a run, named by row[name]), in %."""
    width = 0.8 / len(rows)
    for j, r in enumerate(rows):
        ax.bar([i + j * width for i in range(len(cols))], [100 * r[c] for c in cols], width, label=r[name])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cols))])
    ax.set_xticklabels(labels, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
