"""eval.py: did fine-tuning work, and what did it cost? Numbers for each claim, and a chat to try the result.

Fine-tuning is worth it only if it beats prompting: so the base model is scored zero-shot, then with k solved
examples in the prompt, then the fine-tuned model -- same test items, same scorer, greedy decoding. The price
is measured too: the response-token loss on train vs test data (overfitting), and the tuned model's
perplexity and KL divergence from the base model on general English text it was not tuned on (forgetting).

    python eval.py                                   # after `python train.py`: reads out/, writes out/eval.json
    python eval.py --adapter out/adapter --limit 50  # a LoRA adapter (its base model comes from its config)
    python eval.py --adapter out/model --model gpt2  # a full fine-tune, against its base model
    python eval.py --data my_test.jsonl              # your own file, evaluated as given (no split)
    python eval.py --chat                            # talk to the fine-tuned model in its training template

The same for SmolLM2 (train.py --model smollm2-135m-instruct-gguf): its ChatML template, end-of-turn token and
padding come from data.chat_format, so nothing here is specific to one model family.
"""

import codecs
import copy
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F
from tqdm import tqdm

from data import BUILTIN_DATASETS, chat_format, collate, get_tokenizer, load_records, render_prompt, resolve_dataset, \
    tokenize_dataset
from lora import load_adapter, merge_lora
from model import GPT
from plumbing import cli
from plumbing.device import autocast, choose_device, choose_dtype
from plumbing.files import atomic_write_text
from plumbing.hub import resolve_pretrained
from plumbing.peft_format import ADAPTER_CONFIG, read_adapter_config
from plumbing.report import dir_bytes, format_table, one_line
from tasks import instruct, triage
from tasks.instruct import score_exact
from tasks.triage import parse_triage, score_triage
from train import summed_loss

# -----------------------------------------------------------------------------
# CLI


@dataclass
class EvalConfig:
    out: str = cli.opt("out", "train.py's output directory; the tuned model, run.json and the report default to "
                       "paths inside it", group="what to evaluate")
    adapter: str | None = cli.opt(None, "a LoRA adapter directory (adapter_config.json) or a full fine-tuned model "
                                  "directory (config.json + model.safetensors); default: OUT/adapter, else "
                                  "OUT/model", group="what to evaluate")
    model: str | None = cli.opt(None, "the base model, preset or directory (default: the adapter's "
                                "base_model_name_or_path, or the model in OUT/run.json)", group="what to evaluate")
    data: str | None = cli.opt(None, "built-in dataset (triage, instruct) or a chat JSONL / Alpaca JSON file, "
                               "evaluated as given (default: the data in OUT/run.json, else triage)",
                               group="what to evaluate")
    task: str = cli.opt("auto", "scorer: triage (JSON exact match + per field), instruct (per-family accuracy), "
                        "exact (reply equals reference); auto picks from the dataset", group="what to evaluate",
                        choices=("auto", "triage", "instruct", "exact"))
    split: str = cli.opt("test", "split of a built-in dataset to evaluate", group="what to evaluate",
                         choices=("train", "val", "test"))
    limit: int = cli.opt(100, "evaluate the first N items, 0 for all (100: a few minutes for gpt2 on a laptop "
                         "CPU)", group="evaluation", min=0)
    shots: int = cli.opt(3, "solved examples in the base model's few-shot prompt; 0 skips the few-shot rung",
                         group="evaluation", min=0)
    shots_data: str | None = cli.opt(None, "dataset the few-shot examples come from (default: the built-in "
                                     "dataset's train split, or the run's training data when --data is a file)",
                                     group="evaluation")
    samples: int = cli.opt(3, "test prompts to show side by side", group="evaluation", min=0)
    max_new_tokens: int | None = cli.opt(None, "cap on generated tokens (default: longest reference reply + 16 "
                                         "when scoring, 256 in chat)", group="evaluation", min=1)
    batch_size: int = cli.opt(8, "examples per forward pass for losses", group="evaluation", min=1)
    general_text: str | None = cli.opt(None, "plain-text file for the forgetting check (default: "
                                       "data/general.txt)", group="evaluation")
    general_tokens: int = cli.opt(8192, "use at most this many tokens of the general text", group="evaluation",
                                  min=1)
    report: str | None = cli.opt(None, "where to write the JSON report (default: OUT/eval.json)",
                                 group="evaluation")
    seed: int = cli.opt(0, "seed for choosing few-shot examples and for chat sampling", group="evaluation")
    device: str = cli.opt("auto", "cpu, cuda, cuda:N, mps or auto", group="hardware")
    dtype: str = cli.opt("auto", "precision of generation (auto: bf16 on recent GPUs, fp32 on CPU); losses, "
                         "perplexity and KL are always computed in fp32", group="hardware",
                         choices=("auto", "float32", "bfloat16", "float16"))
    chat: bool = cli.opt(False, "chat with the fine-tuned model instead of evaluating (commands: /reset, /quit; "
                         "Ctrl-D exits)", group="chat (--chat)")
    system: str | None = cli.opt(None, "system prompt for the chat; \"\" for none, which for SmolLM2 means its "
                                 "default system prompt, as in training (default: the one in the training data's "
                                 "first conversation, if it has one)", group="chat (--chat)")
    temperature: float = cli.opt(0.7, "chat sampling temperature; 0 is greedy", group="chat (--chat)", min=0)
    top_k: int | None = cli.opt(50, "chat: sample among the k most likely tokens", group="chat (--chat)", min=1)
    top_p: float | None = cli.opt(None, "chat: nucleus sampling, keep the smallest set of tokens with this much "
                                  "probability", group="chat (--chat)", above=0)


def check_config(cfg):
    """Refuse settings that cannot work, before anything is loaded."""
    cli.check_ranges(cfg)
    if cfg.top_p is not None and cfg.top_p > 1:
        raise ValueError(f"--top-p must be in (0, 1], got {cfg.top_p}")


# -----------------------------------------------------------------------------
# Setup: which tuned model, which base model, which data


def read_run(out_dir):
    """train.py's run.json as a dict ({} if there is none): "args" holds the run's TrainConfig (model, data,
    train_on, max_len, overflow...), next to "wall_time_s", "status", "trainable_params" and more."""
    path = os.path.join(out_dir, "run.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-run train.py or pass --model/--data") from None


def locate_tuned(cfg):
    """(directory, kind) of the model to evaluate: kind "lora" for an adapter dir, "full" for a model dir."""
    d = cfg.adapter
    if d is None:
        candidates = [os.path.join(cfg.out, name) for name in ("adapter", "model")]
        d = next((c for c in candidates if os.path.isdir(c)), None)
        if d is None:
            raise FileNotFoundError(f"{cfg.out}: neither {cfg.out}/adapter nor {cfg.out}/model exists; run "
                                    "train.py first, or pass --adapter DIR (and --out where train.py wrote)")
    if not os.path.isdir(d):
        raise FileNotFoundError(f"--adapter {d}: no such directory")
    if os.path.isfile(os.path.join(d, ADAPTER_CONFIG)):
        return d, "lora"
    if os.path.isfile(os.path.join(d, "config.json")):
        return d, "full"
    raise FileNotFoundError(f"{d}: neither a LoRA adapter ({ADAPTER_CONFIG}) nor a model directory "
                            "(config.json + model.safetensors)")


def load_models(cfg, tuned_dir, kind, run):
    """(base GPT, tuned GPT, base name, tokenizer). A LoRA adapter is loaded onto a copy of the base model
    and merged (a plain GPT, as fast as the base); a full fine-tune loads as it is."""
    base_name = cfg.model
    if base_name is None and kind == "lora":
        base_name = read_adapter_config(tuned_dir).get("base_model_name_or_path")
    if base_name is None:
        base_name = run.get("args", {}).get("model")
    if base_name is None:
        raise ValueError(f"{tuned_dir}: cannot tell which base model it was tuned from; pass --model")
    base_dir = resolve_pretrained(base_name)
    base = GPT.from_pretrained(base_dir)
    if kind == "lora":
        tuned = copy.deepcopy(base)
        load_adapter(tuned, tuned_dir)
        tuned = merge_lora(tuned)
    else:
        tuned = GPT.from_pretrained(tuned_dir)
    # The tokenizer files next to the tuned weights, else the base model's: its directory or .gguf file (a full
    # fine-tune of a .gguf base has no tokenizer files of its own; train.py's run.json says the same).
    has_files = lambda d: all(os.path.isfile(os.path.join(d, f)) for f in ("vocab.json", "merges.txt"))
    tok = get_tokenizer(tuned_dir if has_files(tuned_dir) else base_dir)
    for name, m in (("base", base), ("tuned", tuned)):
        if tok.n_vocab > m.config.vocab_size:
            raise ValueError(f"the {tok.name} tokenizer has {tok.n_vocab} tokens, the {name} model's vocabulary "
                             f"only {m.config.vocab_size}: the tokenizer files belong to another model")
    return base.eval(), tuned.eval(), base_name, tok


def load_items(data, split, limit):
    """(records, path, split or None): the evaluated records (dicts with "messages" and any other keys). A
    built-in name gives that split; a file is evaluated as given."""
    path = resolve_dataset(data, split)  # a built-in's split file, or the file itself (ValueError if missing)
    if data not in BUILTIN_DATASETS:
        split = None
    records = load_records(path)
    return (records[:limit] if limit > 0 else records), path, split


def detect_task(records, data):
    """The scorer for these records: the built-in name, else triage if every reference is a triage label,
    instruct if every record names its family, else exact match."""
    if data in BUILTIN_DATASETS:
        return data
    if all(parse_triage(r["messages"][-1]["content"]) is not None for r in records):
        return "triage"
    if all("family" in r for r in records):
        return "instruct"
    return "exact"

# -----------------------------------------------------------------------------
# Response-token loss: the training objective, measured


def response_loss(model, examples, batch_size, device, *, pad_id):
    """(mean NLL, number of tokens) over the trained tokens of examples [(ids, mask)], with exactly training's
    masking (data.collate) and token weighting (train.summed_loss), in fp32. pad_id: chat_format(tok).pad_id."""
    batches = ((x.to(device), y.to(device)) for x, y in
               (collate(examples[i:i + batch_size], pad_id=pad_id) for i in range(0, len(examples), batch_size)))
    total = summed_loss(model, batches, nullcontext(), device)
    return total[0].item() / max(total[1].item(), 1), int(total[1].item())


def perplexity(loss):
    """exp(mean NLL): the model is, on average, as unsure as a uniform choice among this many tokens."""
    return math.exp(loss)

# -----------------------------------------------------------------------------
# Task scoring: each task's scorer lives with its generator (tasks/)


def summarize(task, scores, families, held_out):
    """The task's metrics over per-item scores: tasks.triage.summarize, tasks.instruct.summarize, or accuracy."""
    if task == "triage":
        return triage.summarize(scores)
    if task == "instruct":
        return instruct.summarize(scores, families, held_out)
    return {"n": len(scores), "accuracy": mean([s["exact"] for s in scores])}


def mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


# -----------------------------------------------------------------------------
# Prompts: the test conversation up to its last reply, with or without solved examples before it


def split_reply(messages):
    """(prompt messages, reference reply): the conversation up to its last assistant turn, and that turn."""
    return messages[:-1], messages[-1]["content"]


def few_shot(prompt, shots):
    """The prompt with solved examples inserted as earlier user/assistant turns, after the system prompt
    (if any) and before the test item's own turns: the model sees k finished exchanges in the very template
    it will answer in. Each shot contributes its non-system turns."""
    head = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    turns = [m for shot in shots for m in shot if m["role"] != "system"]
    return head + turns + prompt[len(head):]


def fit_prompt(messages, shots, tok, room):
    """Prompt token ids with as many of the shots as fit in `room` tokens (dropping the earliest first), so
    the system prompt is never cut off; returns (ids, shots used)."""
    k = len(shots)
    while True:
        ids = render_prompt(few_shot(messages, shots[len(shots) - k:]), tok)
        if len(ids) <= room or k == 0:
            return ids, k
        k -= 1


def pick_shots(cfg, data, data_path, train_data, evaluated):
    """(list of k solved conversations, reason if none): a seeded random pick from a training split (the
    same k for every test item), never one of the evaluated conversations themselves."""
    if cfg.shots <= 0:
        return [], "--shots 0"
    source = cfg.shots_data
    if source is None:
        if data in BUILTIN_DATASETS:
            source = data
        elif train_data and os.path.abspath(train_data) != os.path.abspath(data_path):
            source = train_data
        else:
            return [], "no training data to take examples from (pass --shots-data)"
    path = resolve_dataset(source, "train")  # a built-in's train split, or the file as given
    key = lambda conv: tuple((m["role"], m["content"]) for m in conv)
    taken = {key(c) for c in evaluated}
    pool = [r["messages"] for r in load_records(path) if key(r["messages"]) not in taken]
    if not pool:
        return [], f"{path} has no conversation that is not also evaluated"
    rng = random.Random(cfg.seed)
    return rng.sample(pool, min(cfg.shots, len(pool))), None


@torch.no_grad()
def greedy_reply(model, prompt_ids, max_new_tokens, device, tok):
    """The model's greedy reply to a prompt (KV-cached; stops at the end-of-turn token). The reply is cut at
    the first of the family's stop ids (SmolLM2 may also end with <|endoftext|>), which is not returned."""
    fmt = chat_format(tok)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    out = model.generate(idx, max_new_tokens, temperature=0.0, stop_token=fmt.end_of_turn_id)
    out = out[0, len(prompt_ids):].tolist()
    stops = [i for i, t in enumerate(out) if t in fmt.stop_ids]
    return tok.decode(out[:stops[0]] if stops else out)


def run_rung(name, model, prompts, references, task, max_new_tokens, device, tok, dtype="float32"):
    """(replies, scores): one model's greedy replies to the given prompt ids, each scored against its
    reference with the task's scorer."""
    score = score_triage if task == "triage" else score_exact
    replies, scores = [], []
    for ids, ref in tqdm(list(zip(prompts, references)), desc=name, leave=False):
        with autocast(device, dtype):
            reply = greedy_reply(model, ids, max_new_tokens, device, tok)
        replies.append(reply)
        scores.append(score(reply, ref))
    return replies, scores


# -----------------------------------------------------------------------------
# Forgetting: does the tuned model still model ordinary English like the base model did?


# Longest forgetting window: GPT-2's whole context. SmolLM2's is 8192, and one window that long would hold several
# (T, V) = (8192, 49152) fp32 tensors of 1.5 GiB each (two models' logits, their log-softmaxes): too much for a
# laptop. Both models always see the same windows, so the comparison stays fair.
FORGET_WINDOW = 1024


def text_windows(ids, block_size):
    """Cut one token sequence into (inputs, targets) windows of at most block_size positions that together
    predict every token after the first exactly once (no overlap: each window starts with no context, a
    little pessimistic for both models alike)."""
    windows = []
    for start in range(0, len(ids) - 1, block_size):
        chunk = ids[start:start + block_size + 1]
        if len(chunk) >= 2:
            windows.append((torch.tensor([chunk[:-1]]), torch.tensor([chunk[1:]])))  # (1, T) each
    return windows


def general_tokens(path, tok, max_tokens):
    """The general text as one document: the family's document separator (<|endoftext|> in GPT-2 and
    SmolLM2, at different ids) then its tokens, at most max_tokens predicted ones."""
    with open(path, encoding="utf-8") as f:
        ids = [chat_format(tok).document_id] + tok.encode_ordinary(f.read())
    if len(ids) < 2:
        raise ValueError(f"{path}: empty; the forgetting check needs some plain text")
    return ids[:max_tokens + 1]


@torch.no_grad()
def forgetting(base, tuned, windows, device, dtype="float32"):
    """Mean next-token NLL of both models on general text, and the mean over positions of
    KL(base || tuned) = sum_v p_base(v) * (log p_base(v) - log p_tuned(v)): how far fine-tuning moved the
    predicted distribution, on text the tuning never showed (0 iff the two distributions are identical)."""
    nll_base = nll_tuned = kl = 0.0
    n = 0
    for x, y in tqdm(windows, desc="forgetting", leave=False):
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits_b, logits_t = base(x), tuned(x)  # (1, T, V) each
        # Log-softmax in fp32 even when autocast made the logits bf16: bf16 log-probabilities are so coarse
        # that a small KL comes out wrong, even negative (a test shows it).
        logp_b = F.log_softmax(logits_b.float(), dim=-1)  # (1, T, V)
        logp_t = F.log_softmax(logits_t.float(), dim=-1)
        nll_base -= float(logp_b.gather(-1, y.unsqueeze(-1)).sum())
        nll_tuned -= float(logp_t.gather(-1, y.unsqueeze(-1)).sum())
        kl += float((logp_b.exp() * (logp_b - logp_t)).sum())
        n += y.numel()
    loss_b, loss_t = nll_base / n, nll_tuned / n
    ppl_b, ppl_t = perplexity(loss_b), perplexity(loss_t)
    return {"n_tokens": n, "base_loss": loss_b, "tuned_loss": loss_t, "base_perplexity": ppl_b,
            "tuned_perplexity": ppl_t, "perplexity_change": (ppl_t - ppl_b) / ppl_b, "kl_base_tuned": kl / n}


# -----------------------------------------------------------------------------
# Chat: the tuned model, in the exact template it was trained on


def chat(model, tok, cfg, device, system):
    """Read user turns from stdin, stream each reply token by token. The prompt is the whole conversation
    (after the system prompt, if not empty) rendered by data.render_prompt, the function that built the
    training prompts, so the model sees exactly the token layout it learned; a reply ends at end-of-turn."""
    max_new = cfg.max_new_tokens or 256
    block = model.config.block_size
    fmt = chat_format(tok)
    print("chat with the fine-tuned model: /reset starts over, /quit (or Ctrl-D) exits", flush=True)
    if system or fmt.default_system:  # no system message: render_prompt inserts the family's default (SmolLM2)
        print(f"system prompt: {one_line(system or fmt.default_system, 100)}", flush=True)
    history, turn = [], 0
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        text = line.strip()
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history = []
            print("(conversation cleared)", flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        head = [{"role": "system", "content": system}] if system else []  # never an empty system message
        # Forget the oldest exchanges (never the system prompt) until the prompt leaves room to answer.
        while True:
            ids = render_prompt(head + history, tok)
            if len(ids) + max_new <= block or len(history) <= 1:
                break
            history = history[2:]
        print("assistant> ", end="", flush=True)
        # Multi-byte characters can span tokens: an incremental decoder prints them once they are complete.
        decoder, reply = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
        idx = torch.tensor([ids[-block:]], dtype=torch.long, device=device)  # (1, T)
        for token in model.stream(idx, max_new, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                  stop_token=fmt.end_of_turn_id, seed=cfg.seed + turn):
            if token in fmt.stop_ids:
                break
            reply.append(token)
            print(decoder.decode(tok.decode_single_token_bytes(token)), end="", flush=True)
        print(decoder.decode(b"", final=True), flush=True)
        # Kept as text and re-rendered next turn, as render_conversation renders a training reply.
        history.append({"role": "assistant", "content": tok.decode(reply)})
        turn += 1


# -----------------------------------------------------------------------------
# Main: setup, then each measurement in turn


def run_eval(cfg):
    t0 = time.time()
    device, why = choose_device(cfg.device)
    dtype, why_dtype = choose_dtype(device, cfg.dtype)
    print(f"device: {device} ({why}); dtype: {dtype} ({why_dtype})")

    tuned_dir, kind = locate_tuned(cfg)
    run = read_run(os.path.dirname(os.path.abspath(tuned_dir)))  # train.py wrote it next to adapter/ or model/
    args = run.get("args", {})  # the training run's settings, when eval.py runs on train.py's output
    data = cfg.data or args.get("data") or "triage"
    records, data_path, split = load_items(data, cfg.split, cfg.limit)  # checked before the slow loading
    if not records:
        raise ValueError(f"{data_path}: no records to evaluate")
    task = detect_task(records, data) if cfg.task == "auto" else cfg.task
    general = cfg.general_text or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "general.txt")
    if not os.path.isfile(general):
        raise FileNotFoundError(f"--general-text {general}: no such file")
    base, tuned, base_name, tok = load_models(cfg, tuned_dir, kind, run)
    base.to(device)
    tuned.to(device)
    print(f"tuned: {tuned_dir} ({kind}); base: {base_name}")
    print(f"data: {data_path} ({len(records)} items, task {task})")

    # Response-token loss, base and tuned, on the evaluated items; the same on training items: overfitting.
    # Tokenized exactly as train.py did (its train_on, max_len and overflow), so the masks are the same.
    block = tuned.config.block_size
    max_len = min(args.get("max_len") or block, block)
    train_on, overflow = args.get("train_on", "all"), args.get("overflow", "drop")
    conversations = [r["messages"] for r in records]
    examples, stats = tokenize_dataset(conversations, tok, max_len, train_on=train_on, overflow=overflow,
                                       dedup=False)
    if not examples:
        raise ValueError(f"{data_path}: no example fits {max_len} tokens with a trained token")
    pad_id = chat_format(tok).pad_id  # in this model's vocabulary (GPT-2's 50256 is not in SmolLM2's)
    loss, n_tok = response_loss(tuned, examples, cfg.batch_size, device, pad_id=pad_id)
    base_loss, _ = response_loss(base, examples, cfg.batch_size, device, pad_id=pad_id)
    if split is not None and split != "train":
        train_records, _, _ = load_items(data, "train", len(records))
        train_examples, _ = tokenize_dataset([r["messages"] for r in train_records], tok, max_len,
                                             train_on=train_on, overflow=overflow, dedup=False)
        train_loss, _ = response_loss(tuned, train_examples, cfg.batch_size, device, pad_id=pad_id)
        overfit = {"train_loss": train_loss, "test_loss": loss, "gap": loss - train_loss,
                   "n_train_items": len(train_records)}
    else:
        overfit = {"skipped": "needs a built-in dataset's train split next to a held-out split"}

    # The ladder: base zero-shot, base k-shot, tuned -- same items, same scorer, greedy.
    prompts = [split_reply(r["messages"])[0] for r in records]
    references = [split_reply(r["messages"])[1] for r in records]
    max_new = cfg.max_new_tokens or max(len(tok.encode_ordinary(ref)) for ref in references) + 16
    room = block - max_new  # prompt tokens that still leave room for a whole reply
    families = [r.get("family", "") for r in records]
    held_out = set(instruct.HELD_OUT_FAMILIES) if task == "instruct" else set()
    gen = (references, task, max_new, device, tok, dtype)  # the same for every rung
    zero_ids = [fit_prompt(p, [], tok, room)[0] for p in prompts]
    base_replies, scores = run_rung("base zero-shot", base, zero_ids, *gen)
    ladder = {"base_zero_shot": summarize(task, scores, families, held_out)}
    shots, why_no_shots = pick_shots(cfg, data, data_path, args.get("data"), conversations)
    if shots:
        fitted = [fit_prompt(p, shots, tok, room) for p in prompts]  # [(ids, shots that fit)]
        _, scores = run_rung(f"base {len(shots)}-shot", base, [ids for ids, _ in fitted], *gen)
        ladder["base_few_shot"] = {"shots": len(shots), "mean_shots_used": mean([k for _, k in fitted]),
                                   **summarize(task, scores, families, held_out)}
    else:
        ladder["base_few_shot"] = {"shots": cfg.shots, "skipped": why_no_shots}
    tuned_replies, scores = run_rung("fine-tuned", tuned, zero_ids, *gen)
    ladder["fine_tuned"] = summarize(task, scores, families, held_out)

    # Forgetting: general English the fine-tuning data never contained.
    window = min(block, FORGET_WINDOW)
    windows = text_windows(general_tokens(general, tok, cfg.general_tokens), window)
    forget = {"general_text": general, "window": window, **forgetting(base, tuned, windows, device)}  # fp32

    report = {
        "model": base_name, "tuned": tuned_dir, "kind": kind, "data": data, "data_path": str(data_path),
        "split": split, "task": task, "n_items": len(records), "limit": cfg.limit, "device": device,
        "dtype": dtype, "max_new_tokens": max_new,
        "loss": loss, "perplexity": perplexity(loss), "base_loss": base_loss,
        "base_perplexity": perplexity(base_loss), "n_response_tokens": n_tok, "n_loss_examples": len(examples),
        "n_loss_dropped": stats["n_dropped"],
        "ladder": ladder, "overfitting": overfit, "forgetting": forget,
        "samples": [{"user": prompts[i][-1]["content"] if prompts[i] else "", "reference": references[i],
                     "base": base_replies[i], "tuned": tuned_replies[i]}
                    for i in range(min(cfg.samples, len(records)))],
        "tuned_bytes": dir_bytes(tuned_dir),
        "train": {k: run.get(k) for k in ("status", "steps", "wall_time_s", "device", "dtype", "trainable_params",
                                          "total_params", "final_val_loss")} if run else None,
        "eval_seconds": time.time() - t0, "config": asdict(cfg),
    }
    return report


def main(argv=None):
    cfg, _ = cli.parse(EvalConfig, argv, "Evaluate a fine-tuned GPT-2 or SmolLM2 against its base model: task "
                       "accuracy ladder (zero-shot, few-shot, fine-tuned), loss, forgetting, side-by-side; or chat "
                       "with it (--chat).")
    try:
        check_config(cfg)
        if cfg.chat:
            device, why = choose_device(cfg.device)
            print(f"device: {device} ({why})")
            tuned_dir, kind = locate_tuned(cfg)
            run = read_run(os.path.dirname(os.path.abspath(tuned_dir)))
            _, tuned, _, tok = load_models(cfg, tuned_dir, kind, run)
            system = cfg.system
            if system is None:  # the system prompt the model was tuned with, if its data has one
                data = cfg.data or run.get("args", {}).get("data") or "triage"
                first = load_items(data, "train", 1)[0][0]["messages"][0]
                system = first["content"] if first["role"] == "system" else ""
            chat(tuned.to(device), tok, cfg, device, system)
            return
        report = run_eval(cfg)
        path = cfg.report or os.path.join(cfg.out, "eval.json")
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        msg = str(e).replace("\n", " ")
        sys.exit(f"error: {msg}")
    print()
    print(format_table(report))
    print(f"\nreport: {path}")


if __name__ == "__main__":
    main()
