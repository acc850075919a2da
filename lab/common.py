"""lab/common.py: what every lab experiment shares, so that each lab script shows only its experiment.

An experiment is: a base model, a few fine-tuning runs on different data or settings, the same evaluation
for each, and a results file. The pieces are train.py's and eval.py's own, called in-process, never copies:

- LabConfig: the flags of every lab script (--model, --out, --quick, ...); a script adds its own fields.
- setup(cfg): device and dtype (decided and printed by plumbing.device), the tokenizer and the base model,
  or with --quick a tiny random model of the same family and tokenizer, so CI runs a script in seconds.
- finetune(lab, conversations, steps, ...): LoRA or full fine-tuning with train.py's BatchStream, optimizer,
  schedule and train_step; a callback sees the model every N steps (per-epoch curves); a Resume keeps
  checkpoints, so a run longer than a sitting continues in the next.
- replies / scored(...): eval.py's batched generation and the task's own scorer (tasks.score).
- save_results(...): results/NAME.json (every number), NAME.md (table, command, hardware, wall time), NAME.png.
"""

import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
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
    generate_tokens,
    reply_text,
    run_rung,
    split_reply,
)
from model import GPT, Sampling, from_pretrained, load_config  # noqa: E402
from plumbing import cli  # noqa: E402
from plumbing.checkpoint import checkpoint_names, load_checkpoint, restore, save_run_checkpoint  # noqa: E402
from plumbing.device import setup_runtime  # noqa: E402
from plumbing.files import atomic_write_text, read_json  # noqa: E402
from plumbing.hub import resolve_pretrained  # noqa: E402
from plumbing.intervals import item_rate  # noqa: E402
from plumbing.plots import save_figure  # noqa: E402
from plumbing.records import general_tokens, text_windows  # noqa: E402
from plumbing.report import hardware  # noqa: E402
from plumbing.tokenizer_files import get_tokenizer  # noqa: E402
from tasks import item_scores, score, summarize  # noqa: E402

# -----------------------------------------------------------------------------
# Flags


@dataclass
class LabConfig:
    model: str = cli.opt("smollm2-135m-instruct-gguf", "base model: a preset, a Hugging Face directory or a .gguf",
                         group="lab")
    out: str = cli.opt("results", "where NAME.json, NAME.md and NAME.png go (--quick: a temporary "
                       "directory unless given)")
    quick: bool = cli.opt(False, "a tiny random model of --model's family and a handful of steps (CI, seconds)")
    batch_size: int = cli.opt(8, "conversations per optimizer step", min=1)
    eval_items: int = cli.opt(250, "test items scored per model (greedy; 250: triage's whole test split, at most "
                              "each split's size)", min=1)
    seed: int = cli.opt(1337, "seed for data sampling, LoRA init and data order")
    seeds: str = cli.opt("", "comma-separated seeds of LoRA init and data order, one run each (default: "
                         "--seed); each (configuration, seed) run is cached as it finishes")
    device: str = cli.opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = cli.opt("auto", "autocast precision", choices=("auto", "float32", "bfloat16", "float16"))
    lora_dropout: float = cli.opt(0.0, "LoRA dropout (train.py's default; the sweeps cached before "
                                  "2026-12-03 used 0.05: pass it to resume them)", min=0)


# Where --quick writes when --out is not given: never results/, whose files are the real runs' numbers.
QUICK_OUT = os.path.join(tempfile.gettempdir(), "handtune-lab-quick")


def parse(config_cls, description, argv=None):
    """The script's config from argv (every script runs each configuration once per --seeds seed)."""
    cfg, given = cli.parse(config_cls, argv, description)
    cli.check_ranges(cfg)
    if cfg.quick:
        cfg.batch_size, cfg.eval_items = 4, 4
        if "--out" not in given:
            cfg.out = QUICK_OUT
    return cfg


def run(main):
    """Run a lab script's main: bad input (a missing model, too little data) is one line and exit 1."""
    try:
        main()
    except cli.USER_ERRORS as e:
        sys.exit(cli.error_line(e))


# -----------------------------------------------------------------------------
# The base model, loaded once; each run fine-tunes a copy


def git_commit():
    """The commit the code ran at ("+changes" if the tree differed from it), or "unknown"."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                        timeout=10).stdout.strip()
        commit = run("rev-parse", "HEAD")
        return (commit + ("+changes" if run("status", "--porcelain", "--untracked-files=no") else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_flags():
    """The CPU features that decide bf16 numerics and speed here (avx512_bf16, amx_bf16, avx2, ...)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(set(flags) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})


@dataclass
class Lab:
    cfg: LabConfig
    rt: object  # plumbing.device.Runtime: device, dtype
    tok: object  # the base model's tokenizer
    fmt: data.ChatFormat
    base: GPT  # never trained: finetune() loads its own (with --quick: trains a copy)
    model_dir: str
    t0: float
    dtype_reason: str = ""  # why plumbing.device chose the dtype (native bf16, requested, ...)
    commit: str = "unknown"  # the git commit the run started at (git_commit)
    cached: int = 0  # runs cached_runs loaded from an earlier sitting (the results files say how many)
    fresh: int = 0  # runs cached_runs ran in this sitting (none: the results are re-rendered from cache)


def setup(cfg):
    t0 = time.time()
    model_dir = resolve_pretrained(cfg.model)
    rt, _, dtype_reason = setup_runtime(cfg.device, cfg.dtype, print)
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
    return Lab(cfg, rt, tok, data.chat_format(tok), base.to(rt.device).eval(), model_dir, t0, dtype_reason,
               git_commit())


# -----------------------------------------------------------------------------
# Fine-tuning in-process: train.py's step, schedule and data stream


@dataclass
class Resume:
    """Where a lab run longer than a sitting keeps its checkpoints: FOLDER/ckpt (train.py's, via
    plumbing.checkpoint: weights, optimizer, data position, random generators) and FOLDER/losses.json,
    written every `every` steps. A run killed mid-way (a session's end) continues from its last one to
    the same losses and weights as a run never stopped."""

    folder: str
    every: int = 25
    earlier_s: float = 0.0  # set on resuming: the seconds earlier sittings spent, up to their checkpoint


def read_lab_json(path, keys, remedy):
    """The JSON object in path, which this lab wrote itself (atomically), read by plumbing's bounded
    read_json: one that is missing, does not parse or lacks one of keys is one line naming the file and
    the remedy, not a traceback."""
    try:
        obj = read_json(path, kind=None)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot be read ({e}); {remedy}") from None
    if not isinstance(obj, dict) or not set(keys) <= set(obj):
        raise ValueError(f"{path}: not an object with {', '.join(keys)}; {remedy}")
    return obj


def resumed(resume, cfg, s, stream):
    """(step, losses) to continue from: the newest checkpoint in resume.folder/ckpt restored into setup
    s and the stream (and resume.earlier_s set), or (0, []) when there is none. Refuses one made with
    other training settings."""
    ckpt = os.path.join(resume.folder, "ckpt")
    if not checkpoint_names(ckpt):
        return 0, []
    tensors, state = load_checkpoint(ckpt)
    if state.get("args") != json.loads(json.dumps(dataclasses.asdict(cfg))):
        raise ValueError(f"{ckpt}: made with other training settings than this run's; delete "
                         f"{resume.folder} to start it again")
    step = restore(tensors, state, s, stream)["step"]
    done = read_lab_json(os.path.join(resume.folder, "losses.json"), ("losses", "seconds"),
                         f"delete {resume.folder} to start this run again")
    losses = done["losses"][:step]  # written before the checkpoint: it may hold a step or more past it
    resume.earlier_s = done["seconds"]
    print(f"{state['loaded_from']}: resumed at step {step}")
    return step, losses


def finetune(lab, conversations, steps, on_step=None, every=0, desc="train", dedup=True, mask_fn=None,
             render=None, resume=None, **overrides):
    """A fine-tuned copy of lab.base after `steps` optimizer steps on the conversations. overrides: any
    TrainConfig field (full, lr, lora_rank, train_on, warmup, ...). on_step(step, model, losses, optimizer) runs
    every `every` steps (the model in eval mode; training resumes after). dedup=False keeps exact duplicate
    conversations (train.py drops them); mask_fn(ids, mask) -> mask changes what is trained (lab/masking.py);
    render(messages) -> (ids, mask) renders with another template than data.py's (workshop/see.py: a
    learner's). resume: a Resume, for a run that may outlive the sitting (no on_step: a resumed run could
    not replay the callbacks of the steps before). Returns (model in eval mode, per-step losses)."""
    if resume and on_step:
        raise ValueError("finetune: resume and on_step together are not supported (the callbacks before "
                         "the checkpoint would be lost)")
    cfg, t0 = train_config(lab, steps, **overrides), time.time()
    if render is None:
        examples, _ = data.tokenize_dataset(conversations, lab.tok, lab.base.config.block_size, cfg.train_on,
                                            dedup=dedup)
    else:  # whole examples that fit the context, as tokenize_dataset keeps them
        examples = [e for e in map(render, conversations) if len(e[0]) <= lab.base.config.block_size + 1]
    if mask_fn is not None:
        examples = [(ids, mask_fn(ids, mask)) for ids, mask in examples]
    # train.py's setup: the same seeds, LoRA init (the base loaded from disk: its init draws random numbers
    # too), optimizer and gradient scaler. --quick's random model has no files: a copy is trained instead.
    base = copy.deepcopy(lab.base) if lab.cfg.quick else lab.model_dir
    s = train.setup_training(cfg, lab.rt, base, lambda *a: None)
    stream = train.BatchStream(examples, cfg.batch_size, cfg.seed, lab.rt, lab.fmt.pad_id)
    max_lr = train.default_lr(cfg)
    schedule = train.Schedule(max_lr, cfg.warmup, steps, max_lr * cfg.min_lr_ratio)
    start, losses = resumed(resume, cfg, s, stream) if resume else (0, [])
    model = s.raw_model
    model.train()
    for step in tqdm(range(start, steps), desc=desc, leave=False, initial=start, total=steps):
        loss, _, _ = train.train_step(s, [stream.next()], train.lr_at(step, schedule), cfg.grad_clip)
        losses.append(float(loss))
        if resume and (step + 1) % resume.every == 0 and step + 1 < steps:  # losses first: see resumed
            os.makedirs(resume.folder, exist_ok=True)
            done = {"losses": losses, "seconds": resume.earlier_s + time.time() - t0}
            atomic_write_text(os.path.join(resume.folder, "losses.json"), json.dumps(done) + "\n")
            progress = train.Progress(step=step + 1)
            save_run_checkpoint(os.path.join(resume.folder, "ckpt"), s, progress, stream, cfg)
        if on_step and every and (step + 1) % every == 0:
            model.eval()
            on_step(step + 1, model, losses, s.optimizer)
            model.train()
    return model.eval(), losses


def train_config(lab, steps, **overrides):
    """The TrainConfig of a lab run: train.py's defaults, the lab's batch, seed and LoRA dropout,
    warmup steps/8."""
    return train.TrainConfig(**{"batch_size": lab.cfg.batch_size, "seed": lab.cfg.seed,
                                "lora_dropout": lab.cfg.lora_dropout, "warmup": max(1, steps // 8),
                                **overrides})


def training_settings(lab, steps, **overrides):
    """A lab run's training settings in words, read from its TrainConfig (train.settings_line)."""
    return train.settings_line(train_config(lab, steps, **overrides))


def val_loss(lab, model, conversations, train_on="all"):
    """Token-weighted loss on the assistant tokens of conversations (train.validation_loss)."""
    examples, _ = data.tokenize_dataset(conversations, lab.tok, lab.base.config.block_size, train_on, dedup=False)
    return train.validation_loss(model, examples, lab.cfg.batch_size, lab.rt, lab.fmt.pad_id)


# -----------------------------------------------------------------------------
# Evaluation: eval.py's batched generation, the task's scorer


def prompts_of(lab, records, max_new_tokens):
    """Each record's prompt ids (its messages up to the last reply), leaving room for the reply."""
    room = lab.base.config.block_size - max_new_tokens
    return [fit_prompt(split_reply(r["messages"])[0], [], lab.tok, room)[0] for r in records]


def replies(lab, model, records, max_new_tokens, sampling=Sampling(0.0, seed=0), desc="generate",
            replies_of=generate_replies):
    """The model's replies to each record's prompt (its messages up to the last reply); greedy unless
    sampling says otherwise. replies_of: see eval.run_rung."""
    prompts = prompts_of(lab, records, max_new_tokens)
    dec = Decoding(lab.tok, max_new_tokens, lab.rt.device, lab.rt.dtype, 16, sampling)
    return run_rung(desc, model, prompts, dec, replies_of)


class StopRecorder:
    """eval.py's batch generation, recording its raw tokens: for each prompt, did the reply end with a
    stop token before the cap? (The reply text alone cannot say: it is cut at the stop.)"""

    def __init__(self, stop_ids):
        self.stop_ids, self.stopped = set(stop_ids), {}

    def __call__(self, model, prompts, dec):
        rows = generate_tokens(model, prompts, dec)
        for prompt, row in zip(prompts, rows):
            self.stopped[tuple(prompt)] = any(t in self.stop_ids for t in row)
        return [reply_text(row, dec.tok) for row in rows]


def scored(lab, model, records, task="triage", max_new_tokens=48, desc="score", replies_of=generate_replies):
    """(the task's summary over records: exact match, valid format, ...; the replies), greedy. The
    summary's "items" holds each record's own scores ({score name: [0/1 per record]}), so any result can
    be compared item by item, or re-scored from the replies, without retraining."""
    out = replies(lab, model, records, max_new_tokens, desc=desc, replies_of=replies_of)
    scores = [score(task, reply, r) for reply, r in zip(out, records)]
    summary = summarize(task, scores, [r.get("family", "") for r in records], set())
    summary["items"] = item_scores(scores)
    return summary, out


# -----------------------------------------------------------------------------
# Text measures of a set of replies: how varied, how repetitive


def trigrams(text):
    """The word 3-grams of a text, lower-cased, in order."""
    words = text.lower().split()
    return [" ".join(words[i:i + 3]) for i in range(len(words) - 2)]


def distinct(texts, n):
    """Unique word n-grams / all word n-grams over texts (distinct-n): low = a narrow vocabulary."""
    grams = [tuple(t.lower().split()[i:i + n]) for t in texts for i in range(len(t.split()) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def word_entropy(texts):
    """Bits per word of the word distribution over all texts."""
    counts = Counter(w for t in texts for w in t.lower().split())
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def char_repeats(text):
    """1 - compressed / raw bytes: low (about 0.1) for a sentence of prose, high for a character loop."""
    raw = text.encode("utf-8")
    return max(0.0, 1 - len(zlib.compress(raw, 9)) / len(raw)) if len(raw) > 20 else 0.0


# -----------------------------------------------------------------------------
# Seeds: one run per seed, each cached as it finishes, merged into one row with per-item scores


def seed_list(cfg):
    """The seeds a script runs: --seeds, else --seed alone."""
    try:
        return [int(s) for s in cfg.seeds.split(",")] if cfg.seeds.strip() else [cfg.seed]
    except ValueError:
        raise ValueError(f"--seeds {cfg.seeds}: expected integers like 1337,1338,1339") from None


def dropout_suffix(lab):
    """The cache key's note of the LoRA dropout: none for 0.05, train.py's default when the first sweeps
    were cached, so those files still name their runs and a run at another dropout never reads them."""
    dropout = lab.cfg.lora_dropout
    return "" if dropout == 0.05 else f"-dropout{dropout:g}"


def dtype_suffix(lab):
    """The cache key's note of the autocast dtype: none for bf16, the dtype of every sweep committed
    before dtypes were keyed, so those files keep their names and a float32 run (the choice on a CPU
    without native bf16) never reads a bf16 result as its own."""
    return "" if lab.rt.dtype == "bfloat16" else f"-{lab.rt.dtype}"


def run_path(lab, name, config, seed):
    """OUT/cache/NAME/<model>-<config>-...-s<seed>: where one run's result (.json) and, for a run that
    may outlive a sitting, its Resume folder (.partial) live. The key holds every setting that changes
    the result (config: a short string naming the configuration)."""
    model = os.path.basename(lab.cfg.model) + ("-quick" if lab.cfg.quick else "")
    key = f"{model}-{config}{dropout_suffix(lab)}{dtype_suffix(lab)}-s{seed}"
    key = key.replace("/", "_").replace(" ", "_").replace(",", "")
    return os.path.join(lab.cfg.out, "cache", name, key)


def cached_runs(lab, name, config, run_one, same_for_every_seed=False):
    """[run_one(seed) for each seed], each loaded from run_path(...).json when an earlier sitting finished
    it, else run and saved there at once (atomically; its Resume folder, if any, then deleted): a sweep
    stopped by a session's end resumes where it stopped. run_one returns a JSON-able dict; the cache key
    holds every setting that changes the result (config: a short string naming the configuration).
    same_for_every_seed: the run has nothing random (the untrained base model, greedy replies), so it is
    run once and its result stored for each seed."""
    runs = []
    for seed in seed_list(lab.cfg):
        stem = run_path(lab, name, config, seed)
        path = stem + ".json"
        if os.path.isfile(path):
            runs.append(read_lab_json(path, ("seed",), "delete it to run this again"))
            print(f"{name} {config} seed {seed}: cached ({path})")
            lab.cached += 1
            continue
        result = {**runs[0], "seed": seed} if same_for_every_seed and runs else {"seed": seed, **run_one(seed)}
        lab.fresh += 1
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps(result) + "\n")
        shutil.rmtree(stem + ".partial", ignore_errors=True)  # its Resume folder, no longer needed
        runs.append(result)
    return runs


def merge_seeds(runs, metrics):
    """One row from per-seed runs: each metric the mean over seeds (and items), its per-seed values under
    "per_seed", and the per-item scores of every seed under "items" ({metric: [[item scores] per seed]})."""
    row = {"seeds": [r["seed"] for r in runs], "per_seed": {m: [r[m] for r in runs] for m in metrics}}
    row.update({m: sum(r[m] for r in runs) / len(runs) for m in metrics})
    row["items"] = {m: [r["items"][m] for r in runs] for m in metrics if all(m in r.get("items", {}) for r in runs)}
    return row


@torch.no_grad()
def reply_nll(lab, model, records):
    """Per record: the mean next-token NLL (nats) of its reference reply, teacher-forced, in fp32. A
    measure of what the model knows that needs no output format: a model can lose a task's answers in
    its likelihoods while its greedy replies still fail for other reasons, or the other way round."""
    out = []
    for r in records:
        ids, mask = data.render_conversation(r["messages"], lab.tok, train_on="last")
        x, y = data.collate([(ids[:lab.base.config.block_size + 1], mask[:lab.base.config.block_size + 1])],
                            pad_id=lab.fmt.pad_id)
        out.append(float(model(x.to(lab.rt.device), y.to(lab.rt.device), reduction="mean")[1]))
    return out


@torch.no_grad()
def window_nll(lab, model, windows):
    """Per window of general text: the mean next-token NLL (nats), fp32."""
    return [float(model(x.to(lab.rt.device), y.to(lab.rt.device), reduction="mean")[1]) for x, y in windows]


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


def computed_on(lab, name):
    """Where the runs of a re-rendering were computed: when every run came from cache/ and the previous
    OUT/NAME.json had the same configuration (each setting it recorded equal now; a setting added since
    must be given its value of then, as the cache key asks), its hardware, CPU flags, dtype and date
    (carried on through later re-renderings), else None (also when that file is not a results JSON).
    A results file re-rendered on another CPU must still name the one whose numerics made its numbers.
    (Not a commit: a cache file does not record the commit it was computed at, only that it was by
    that date.)"""
    path = os.path.join(lab.cfg.out, f"{name}.json")
    if lab.fresh or not lab.cached or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # not ours to trust: the provenance is lost
        print(f"{path}: not a results JSON ({e}); its earlier provenance is not carried on")
        return None
    now = dataclasses.asdict(lab.cfg)
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict) or not old["config"]:
        return None
    if any(k not in now or now[k] != v for k, v in old["config"].items()):
        return None
    keys = ("hardware", "cpu_flags", "device", "dtype", "date")
    return old.get("computed") or {k: old.get(k) for k in keys}


def save_results(lab, name, claim, settings, results, table, fig, notes=""):
    """Write OUT/NAME.json, OUT/NAME.md and OUT/NAME.png (atomically) and print the table. Both name the
    command, the git commit, the seeds, the CPU's relevant flags and the dtype with the reason for it."""
    cfg = lab.cfg
    wall = time.time() - lab.t0
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    meta = {"name": name, "claim": claim, "model": cfg.model, "quick": cfg.quick, "hardware": hardware(lab.rt.device),
            "device": lab.rt.device, "dtype": lab.rt.dtype, "dtype_reason": lab.dtype_reason,
            "cpu_flags": cpu_flags(), "commit": lab.commit, "seeds": seed_list(cfg), "command": command,
            "wall_time_s": wall, "runs_from_cache": lab.cached, "date": time.strftime("%Y-%m-%d"), "config": dataclasses.asdict(cfg),
            "settings": settings, "computed": computed_on(lab, name)}
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_text(os.path.join(cfg.out, f"{name}.json"), json.dumps({**meta, "results": results}, indent=2) + "\n")
    reused = f" (this sitting; {lab.cached} runs loaded from cache/, timed in earlier ones)" if lab.cached else ""
    c = meta["computed"]
    flags = ", ".join(c["cpu_flags"]) or "none listed" if c else ""
    computed = (f" The runs in cache/ were computed on {c['hardware']}; CPU flags {flags}; device {c['device']}, "
                f"{c['dtype']}; by {c['date']}: this file re-renders them." if c else "")
    md = [f"# {name}", "", f"Claim tested: {claim}", "",
          f"Model: {cfg.model}{' (--quick: a tiny random model; the numbers mean nothing)' if cfg.quick else ''}. "
          f"Hardware: {meta['hardware']}; CPU flags {', '.join(meta['cpu_flags']) or 'none listed'}; device "
          f"{lab.rt.device}, {lab.rt.dtype} ({lab.dtype_reason}). Wall time {wall / 60:.1f} min{reused}, {meta['date']}. "
          f"Commit {meta['commit']}; seeds {', '.join(map(str, meta['seeds']))}.{computed}", "", "```bash", command,
          "```", "",
          "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".", "", table, "",
          f"![{name}]({name}.png)", ""] + ([notes, ""] if notes else [])
    atomic_write_text(os.path.join(cfg.out, f"{name}.md"), "\n".join(md))
    save_figure(fig, os.path.join(cfg.out, f"{name}.png"))
    print(table)
    print(f"\nresults: {cfg.out}/{name}.json, .md, .png ({wall:.0f} s)")


def rate_interval(row, metric):
    """(rate, low, high) of a row's metric over its per-item scores of every seed (row["items"][metric]),
    the interval plumbing.intervals.item_rate's (items and seeds); None when the row holds no per-item
    scores for it."""
    items = row.get("items", {}).get(metric)
    if not items:
        return None
    return item_rate(items)


def rate_bar(row, metric):
    """(rate, below, above) in % for one bar: the row's rate over its items and seeds and its 95% interval
    (rate_interval) as distances below and above it; an older row without per-item scores gets its rate and
    no error bar."""
    ci = rate_interval(row, metric) or (row[metric],) * 3
    return 100 * ci[0], 100 * (ci[0] - ci[1]), 100 * (ci[2] - ci[0])


def rate_bars(rows, metric):
    """(rates in %, yerr in %) for matplotlib's bar(): one rate_bar per row, yerr as [belows, aboves]."""
    rates, below, above = zip(*(rate_bar(r, metric) for r in rows))
    return list(rates), [list(below), list(above)]


def rate_text(row, metric):
    """A rate as the results tables print it: "35% [22, 50]" (its 95% interval), or "35%" alone for an
    older row without per-item scores."""
    ci = rate_interval(row, metric)
    if ci is None:
        return f"{row[metric]:.0%}"
    return f"{ci[0]:.0%} [{100 * ci[1]:.0f}, {100 * ci[2]:.0f}]"


def grouped_bars(ax, rows, cols, labels, name):
    """One group of bars per metric (cols, shown as labels), one bar per row (a run, named by row[name]), in
    %, each with its 95% interval as an error bar where the row holds per-item scores."""
    width = 0.8 / len(rows)
    for j, r in enumerate(rows):
        rates, below, above = zip(*(rate_bar(r, c) for c in cols))
        ax.bar([i + j * width for i in range(len(cols))], rates, width, label=r[name], yerr=[below, above],
               capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cols))])
    ax.set_xticklabels(labels, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
