"""eval.py: did fine-tuning work, and what did it cost? Numbers for each
claim, and a chat to try the result.

Fine-tuning is worth it only if it beats prompting and retrieval: the base model zero-shot, with k
solved examples, with retrieved text (BM25), then the fine-tuned model without and with retrieval,
each with its cost (same items, same scorer, greedy). And its price: response loss on train vs test
data (overfitting), and the tuned model's perplexity and KL from the base model on general English
it was not tuned on (forgetting).

    python eval.py                                   # after train.py: reads out/, writes out/eval.json
    python eval.py --adapter out/adapter --limit 50  # a LoRA adapter (its config names its base)
    python eval.py --adapter out/model --model gpt2  # a full fine-tune, against its base model
    python eval.py --data my_test.jsonl              # your own file, evaluated as given (no split)
    python eval.py --chat                            # talk to the tuned model in its training template

Nothing here is specific to one model family: templates, stop and pad
ids come from data.chat_format.
"""

import copy
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
from torch.nn import functional as F
from tqdm import tqdm

from data import chat_format, check_vocab, collate, render_prompt, tokenize_dataset
from lora import load_adapter, merge_lora
from model import GREEDY, Sampling, from_pretrained, generate, stream
from plumbing import cli
from plumbing.chat import repl
from plumbing.device import autocast, choose_device, choose_dtype
from plumbing.files import atomic_write_text
from plumbing.hub import resolve_pretrained
from plumbing.peft_format import read_adapter_config
from plumbing.records import conversation_key, general_tokens, load_records, text_windows
from plumbing.report import format_table
from plumbing.runs import locate_tuned, read_run, remembered
from plumbing.stats import dir_bytes
from plumbing.tokenizer_files import get_tokenizer
from tasks import (BUILTIN_DATASETS, detect_task, item_scores, load_items, load_store, report_columns,
                   resolve_dataset, score, summarize)
from tasks.instruct import HELD_OUT_FAMILIES
from train import summed_loss

RUNGS = ("base_zero_shot", "base_few_shot", "base_retrieval", "fine_tuned", "fine_tuned_retrieval")

# -----------------------------------------------------------------------------
# CLI


@dataclass
class EvalConfig:
    out: str = cli.opt("out", "train.py's output directory: default home of the tuned model, run.json, "
                       "eval.json", group="what to evaluate")
    adapter: str | None = cli.opt(None, "a LoRA adapter or a full fine-tuned model directory "
                                  "(default: OUT/adapter, else OUT/model)")
    model: str | None = cli.opt(None, "the base model (default: the adapter's "
                                "base_model_name_or_path, or OUT/run.json's)")
    data: str | None = cli.opt(None, "built-in dataset or a chat JSONL / Alpaca file, evaluated as "
                               "given (default: OUT/run.json's, else triage)")
    task: str = cli.opt("auto", "scorer: triage (JSON fields), instruct (per family), exact; auto: from "
                        "the data", choices=("auto", "triage", "instruct", "exact"))
    split: str = cli.opt("test", "split of a built-in dataset", choices=("train", "val", "test"))
    limit: int = cli.opt(100, "evaluate the first N items (0: all)", group="evaluation", min=0)
    shots: int = cli.opt(3, "solved examples in the few-shot prompt (0: skip that rung)", min=0)
    shots_data: str | None = cli.opt(None, "where few-shot examples come from (default: the training "
                                     "data)")
    samples: int = cli.opt(3, "test prompts shown side by side", min=0)
    max_new_tokens: int | None = cli.opt(None, "generation cap (default: longest reference + 16; chat "
                                         "256)", min=1)
    batch_size: int = cli.opt(16, "examples per forward pass (losses) and per batched generation",
                              min=1)
    general_text: str | None = cli.opt(None, "plain text for forgetting (default: "
                                       "data/general.txt)")
    general_tokens: int = cli.opt(8192, "at most this many tokens of it", min=1)
    report: str | None = cli.opt(None, "JSON report path (default: OUT/eval.json)")
    seed: int = cli.opt(0, "seed for the few-shot pick and chat sampling")
    base_replies: str | None = cli.opt(None, "keep the base model's rungs (greedy: the same in every run "
                                       "of one base and items) in this directory and reuse them")
    device: str = cli.opt("auto", "cpu, cuda, cuda:N, mps or auto", group="hardware")
    dtype: str = cli.opt("auto", "precision of generation; losses and KL are always fp32",
                         choices=("auto", "float32", "bfloat16", "float16"))
    chat: bool = cli.opt(False, "chat with the tuned model (/reset, /quit, Ctrl-D)", group="chat")
    system: str | None = cli.opt(None, "chat system prompt (\"\": none; default: the training "
                                 "data's)")
    temperature: float = cli.opt(0.7, "chat sampling temperature (0: greedy)", min=0)
    top_k: int | None = cli.opt(50, "sample among the k most likely tokens", min=1)
    top_p: float | None = cli.opt(None, "nucleus sampling probability mass", above=0)


def check_config(cfg):
    """Refuse settings that cannot work, before anything is loaded."""
    cli.check_ranges(cfg)
    if cfg.top_p is not None and cfg.top_p > 1:
        raise ValueError(f"--top-p must be in (0, 1], got {cfg.top_p}")


# -----------------------------------------------------------------------------
# Setup: which tuned model, which base model, which data


def load_models(cfg, tuned_dir, kind, run):
    """(base GPT, tuned GPT, base name, tokenizer). A LoRA adapter is loaded onto a copy of the base
    model and merged (a plain GPT, as fast as the base); a full fine-tune loads as it is."""
    base_name = (cfg.model or (read_adapter_config(tuned_dir).get("base_model_name_or_path") if kind == "lora"
                               else None) or run.get("args", {}).get("model"))
    if base_name is None:
        raise ValueError(f"{tuned_dir}: cannot tell which base model it was tuned from; pass --model")
    base_dir = resolve_pretrained(base_name)
    base = from_pretrained(base_dir)
    if kind == "lora":
        tuned = copy.deepcopy(base)
        load_adapter(tuned, tuned_dir)
        tuned = merge_lora(tuned)
    else:
        tuned = from_pretrained(tuned_dir)
    # The tokenizer files next to the tuned weights (train.py writes them
    # there), else the base model's.
    has_files = lambda d: all(os.path.isfile(os.path.join(d, f))  # noqa: E731
                              for f in ("vocab.json", "merges.txt"))
    tok = get_tokenizer(tuned_dir if has_files(tuned_dir) else base_dir)
    check_vocab(tok, base.config.vocab_size, base_name)
    check_vocab(tok, tuned.config.vocab_size, tuned_dir)
    return base.eval(), tuned.eval(), base_name, tok


# -----------------------------------------------------------------------------
# Response-token loss: the training objective, measured


def response_loss(model, examples, batch_size, device, *, pad_id):
    """(mean NLL, number of tokens) over the trained tokens of examples [(ids, mask)], with
    exactly training's masking (data.collate) and token weighting (train.summed_loss), in fp32.
    pad_id: chat_format(tok).pad_id."""
    batches = ((x.to(device), y.to(device)) for x, y in
               (collate(examples[i:i + batch_size], pad_id=pad_id) for i in range(0, len(examples), batch_size)))
    total = summed_loss(model, batches, nullcontext(), device)
    return total[0].item() / max(total[1].item(), 1), int(total[1].item())


def perplexity(loss):
    """exp(mean NLL): the model is, on average, as unsure as a uniform
    choice among this many tokens."""
    return math.exp(loss)


# -----------------------------------------------------------------------------
# Prompts: the test conversation up to its last reply, with or without solved examples before it


def split_reply(messages):
    """(prompt messages, reference reply): the conversation up to its last
    assistant turn, and that turn."""
    return messages[:-1], messages[-1]["content"]


def few_shot(prompt, shots):
    """The prompt with the shots' user/assistant turns inserted after its system prompt (if any):
    the model sees k finished exchanges in the very template it will answer in."""
    head = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    turns = [m for shot in shots for m in shot if m["role"] != "system"]
    return head + turns + prompt[len(head):]


def fit_prompt(messages, shots, tok, room):
    """Prompt token ids with as many of the shots as fit in `room` tokens (dropping the earliest
    first), so the system prompt is never cut off; returns (ids, shots used)."""
    k = len(shots)
    while True:
        ids = render_prompt(few_shot(messages, shots[len(shots) - k:]), tok)
        if len(ids) <= room or k == 0:
            return ids, k
        k -= 1


def shot_pool(source, evaluated):
    """(solved training conversations a prompt may show, reason if none): the train
    split of source (a built-in name, or a file as given; None: no source), never one of
    the evaluated conversations."""
    if source is None:
        return [], "no training data to take examples from (pass --shots-data)"
    path = resolve_dataset(source, "train")  # a built-in's train split, or the file as given
    taken = {conversation_key(c) for c in evaluated}
    pool = [r["messages"] for r in load_records(path) if conversation_key(r["messages"]) not in taken]
    return pool, None if pool else f"{path} has no conversation that is not also evaluated"


def shots_source(cfg, data, data_path, train_data):
    """Where few-shot examples come from: --shots-data, a built-in's own train split, else the
    training run's data file (when it is not the evaluated file itself); None if there is none."""
    if cfg.shots_data is not None:
        return cfg.shots_data
    if data in BUILTIN_DATASETS:
        return data
    if train_data and os.path.abspath(train_data) != os.path.abspath(data_path):
        return train_data
    return None


def sample_shots(pool, k, seed):
    """A seeded random pick of k solved conversations from the pool:
    the same shots for every item."""
    return random.Random(seed).sample(pool, min(k, len(pool)))


# -----------------------------------------------------------------------------
# Retrieval: BM25 over a small document store, by hand


def words(text):
    """BM25's tokens: lower-cased runs of letters and digits (retrieval
    matches words, not BPE pieces)."""
    return re.findall(r"[a-z0-9]+", text.lower())


class BM25:
    """Okapi BM25. A document d scores, for each distinct query word w it contains f(w, d) times,
        idf(w) * f(w, d) * (k1 + 1) / (f(w, d) + k1 * (1 - b + b * |d| / avgdl)),
        idf(w) = ln(1 + (N - n(w) + 0.5) / (n(w) + 0.5)),
    N documents, n(w) of them containing w, avgdl their mean length in words: rare words
    weigh more, repeats saturate (k1), long documents are discounted (b).
    tests/test_eval.py checks it by hand."""

    def __init__(self, documents, k1=1.5, b=0.75):
        self.k1, self.b = k1, b
        self.tf = [Counter(words(d)) for d in documents]  # word counts per document
        self.length = [sum(tf.values()) for tf in self.tf]
        self.avgdl = sum(self.length) / len(self.length)
        df = Counter(w for tf in self.tf for w in tf)  # documents containing each word
        self.idf = {w: math.log(1 + (len(documents) - n + 0.5) / (n + 0.5)) for w, n in df.items()}

    def scores(self, query):
        return [sum(self.idf[w] * tf[w] * (self.k1 + 1) / (tf[w] + self.k1 * (1 - self.b + self.b * n / self.avgdl))
                    for w in set(words(query)) if w in tf) for tf, n in zip(self.tf, self.length)]

    def top_k(self, query, k):
        # the indices of the k best documents, best first (ties: the earlier one)
        s = self.scores(query)
        return sorted(range(len(s)), key=lambda i: -s[i])[:k]


def with_documents(prompt, documents):
    """The prompt with retrieved documents appended to its system message (one is added if it has
    none): what the model knows at answer time changes, its weights do not."""
    context = "Use these documents:\n\n" + "\n\n".join(documents)
    if prompt and prompt[0]["role"] == "system":
        return [{"role": "system", "content": prompt[0]["content"] + "\n\n" + context}] + prompt[1:]
    return [{"role": "system", "content": context}] + prompt


def retrieved(prompts, texts, k, tok, room, as_shots):
    """(prompt ids, seconds to build the index): each prompt with the k texts BM25 ranks highest
    for its last message, as documents in its system message, or (as_shots: texts are
    conversations) as its shots."""
    t0 = time.time()
    index = BM25([" ".join(m["content"] for m in t) if as_shots else t for t in texts])
    seconds = time.time() - t0  # an update of the knowledge = rebuilding this index
    best = [[texts[i] for i in index.top_k(p[-1]["content"], k)] for p in prompts]
    if as_shots:  # the most similar first in the list = nearest the question in the prompt
        return [fit_prompt(p, b[::-1], tok, room)[0] for p, b in zip(prompts, best)], seconds
    return [fit_prompt(with_documents(p, b), [], tok, room)[0] for p, b in zip(prompts, best)], seconds


@dataclass
class Decoding:
    """How replies are generated: the tokenizer (its chat format gives the stop and pad ids), the
    cap, where and in what precision, how many prompts at once, and how each token is picked."""

    tok: object  # a tiktoken Encoding from get_tokenizer
    max_new_tokens: int
    device: str = "cpu"
    dtype: str = "float32"  # autocast precision of generation
    batch_size: int = 8  # prompts per batched generate
    sampling: Sampling = GREEDY  # its seed is offset by each batch's start


@torch.no_grad()
def generate_tokens(model, prompts, dec):
    """The new token ids for a batch of prompts (lists of ids), in one KV-cached generate:
    padded on the left, with a mask, so every row's next token comes from the last column; done
    when every row has ended its turn. Each row is cut after its first stop id (kept: it says
    the reply ended by itself)."""
    fmt = chat_format(dec.tok)
    T = max(map(len, prompts))
    # (B, T)
    idx = torch.tensor([[fmt.pad_id] * (T - len(p)) + p for p in prompts], device=dec.device)
    mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts],
                        device=dec.device)  # (B, T): False at the left padding
    out = generate(model, idx, dec.max_new_tokens, dec.sampling, stop_token=fmt.end_of_turn_id,
                   mask=mask)
    rows = []
    for row in out[:, T:].tolist():
        stops = [i for i, t in enumerate(row) if t in fmt.stop_ids]
        rows.append(row[:stops[0] + 1] if stops else row)
    return rows


def reply_text(row, tok):
    """A reply's text: its tokens up to, not including, the first stop id (SmolLM2 may also end with
    <|endoftext|>)."""
    stops = chat_format(tok).stop_ids
    return tok.decode(row[:-1] if row and row[-1] in stops else row)


def generate_replies(model, prompts, dec):
    """The model's replies to a batch of prompts, as text. Equal to one prompt at a time
    (tests/test_model.py)."""
    return [reply_text(row, dec.tok) for row in generate_tokens(model, prompts, dec)]


def run_rung(name, model, prompts, dec, replies_of=generate_replies):
    """One model's replies to the prompts, dec.batch_size at a time (prompts of similar length
    together: little padding); greedy unless dec.sampling says otherwise, seeded per batch.
    replies_of(model, prompts, dec): a batch's replies (a lab script may record more on the way)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = [None] * len(prompts)
    for start in tqdm(range(0, len(order), dec.batch_size), desc=name, leave=False):
        batch = order[start:start + dec.batch_size]
        seed = (dec.sampling.seed or 0) + start
        with autocast(dec.device, dec.dtype):
            out = replies_of(model, [prompts[i] for i in batch],
                             replace(dec, sampling=replace(dec.sampling, seed=seed)))
        for i, reply in zip(batch, out):
            replies[i] = reply
    return replies


# -----------------------------------------------------------------------------
# Forgetting: does the tuned model still model ordinary English like the base model did?


# Longest forgetting window: GPT-2's context. SmolLM2's 8192 would hold several (8192,
# 49152) fp32 tensors of 1.5 GiB each: too much for a laptop. Both models see the same
# windows, so the comparison stays fair.
FORGET_WINDOW = 1024


def kl_divergence(logp_p, logp_q):
    """KL(p || q) = sum_v p(v) * (log p(v) - log q(v)) at every position, from log-probabilities
    (..., V) -> (...). Not symmetric: it weighs the words p (the base model) finds likely."""
    return (logp_p.exp() * (logp_p - logp_q)).sum(dim=-1)


@torch.no_grad()
def forgetting(base, tuned, windows, device, dtype="float32"):
    """Mean next-token NLL of both models on general text, and the mean over positions of
    KL(base || tuned) = sum_v p_base(v) * (log p_base(v) - log p_tuned(v)): how far fine-tuning
    moved the predicted distribution, on text the tuning never showed (0 iff the two
    distributions are identical)."""
    nll_base = nll_tuned = kl = 0.0
    n = 0
    for x, y in tqdm(windows, desc="forgetting", leave=False):
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits_b, logits_t = base(x), tuned(x)  # (1, T, V) each
        # Log-softmax in fp32 even when autocast made the logits bf16: bf16 log-probabilities are so
        # coarse that a small KL comes out wrong, even negative (a test shows it).
        logp_b = F.log_softmax(logits_b.float(), dim=-1)  # (1, T, V)
        logp_t = F.log_softmax(logits_t.float(), dim=-1)
        nll_base -= float(logp_b.gather(-1, y.unsqueeze(-1)).sum())
        nll_tuned -= float(logp_t.gather(-1, y.unsqueeze(-1)).sum())
        kl += float(kl_divergence(logp_b, logp_t).sum())
        n += y.numel()
    loss_b, loss_t = nll_base / n, nll_tuned / n
    ppl_b, ppl_t = perplexity(loss_b), perplexity(loss_t)
    return {"n_tokens": n, "base_loss": loss_b, "tuned_loss": loss_t, "base_perplexity": ppl_b,
            "tuned_perplexity": ppl_t, "perplexity_change": (ppl_t - ppl_b) / ppl_b, "kl_base_tuned": kl / n}


# -----------------------------------------------------------------------------
# Chat: the tuned model, in the exact template it was trained on


def chat(model, tok, cfg, device, system):
    """Read user turns from stdin and stream each reply (plumbing/chat.py runs the loop).
    The prompt is the whole conversation rendered by data.render_prompt, the function that
    built the training prompts, so the model sees exactly the token layout it learned; a
    reply ends at end-of-turn. Sampled as
    --temperature/--top-k/--top-p say, in the --dtype precision."""
    fmt = chat_format(tok)
    dtype, why = choose_dtype(device, cfg.dtype)
    print(f"dtype: {dtype} ({why})")
    max_new = cfg.max_new_tokens or 256

    def reply_tokens(ids, turn):
        sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, seed=cfg.seed + turn)
        idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
        with autocast(device, dtype):
            yield from stream(model, idx, max_new, sampling, stop_token=fmt.end_of_turn_id)

    repl(reply_tokens, lambda messages: render_prompt(messages, tok), tok, fmt, system,
         (model.config.block_size, max_new))


# -----------------------------------------------------------------------------
# Main: setup, then each measurement in turn


def run_eval(cfg):
    t0 = time.time()
    device, why = choose_device(cfg.device)
    dtype, why_dtype = choose_dtype(device, cfg.dtype)
    print(f"device: {device} ({why}); dtype: {dtype} ({why_dtype})")

    tuned_dir, kind = locate_tuned(cfg)
    # train.py wrote it next to adapter/ or model/
    run = read_run(os.path.dirname(os.path.abspath(tuned_dir)))
    # the training run's settings, when eval.py runs on train.py's output
    args = run.get("args", {})
    data = cfg.data or args.get("data") or "triage"
    # checked before the slow loading
    records, data_path, split = load_items(data, cfg.split, cfg.limit)
    if not records:
        raise ValueError(f"{data_path}: no records to evaluate")
    task = detect_task(records, data) if cfg.task == "auto" else cfg.task
    here = os.path.dirname(os.path.abspath(__file__))
    general = cfg.general_text or os.path.join(here, "data", "general.txt")
    if not os.path.isfile(general):
        raise FileNotFoundError(f"--general-text {general}: no such file")
    base, tuned, base_name, tok = load_models(cfg, tuned_dir, kind, run)
    base.to(device)
    tuned.to(device)
    print(f"tuned: {tuned_dir} ({kind}); base: {base_name}")
    print(f"data: {data_path} ({len(records)} items, task {task})")

    # Response-token loss, base and tuned, on the evaluated items; the same on training
    # items: overfitting. Tokenized exactly as train.py did (its train_on, max_len and
    # overflow), so the masks are the same.
    block = tuned.config.block_size
    max_len = min(args.get("max_len") or block, block)
    train_on, overflow = args.get("train_on", "all"), args.get("overflow", "drop")
    conversations = [r["messages"] for r in records]
    examples, stats = tokenize_dataset(conversations, tok, max_len, train_on=train_on, overflow=overflow,
                                       dedup=False)
    if not examples:
        raise ValueError(f"{data_path}: no example fits {max_len} tokens with a trained token")
    # fmt.pad_id is in this model's vocabulary (GPT-2's 50256 is not in SmolLM2's)
    fmt = chat_format(tok)
    loss, n_tok = response_loss(tuned, examples, cfg.batch_size, device, pad_id=fmt.pad_id)
    base_loss, _ = response_loss(base, examples, cfg.batch_size, device, pad_id=fmt.pad_id)
    if split is not None and split != "train":
        train_records, _, _ = load_items(data, "train", len(records))
        train_examples, _ = tokenize_dataset([r["messages"] for r in train_records], tok, max_len,
                                             train_on=train_on, overflow=overflow, dedup=False)
        train_loss, _ = response_loss(tuned, train_examples, cfg.batch_size, device, pad_id=fmt.pad_id)
        overfit = {"train_loss": train_loss, "test_loss": loss, "gap": loss - train_loss,
                   "n_train_items": len(train_records)}
    else:
        overfit = {"skipped": "needs a built-in dataset's train split next to a held-out split"}

    # The ladder: five rungs, the same items and scorer, greedy. Retrieval is BM25 over the
    # knowledge task's document store (the top 2 documents in the system message), or for a
    # behaviour task over the training conversations (the k most like the test message become its
    # shots: nearest-neighbour few-shot).
    references = [split_reply(r["messages"])[1] for r in records]
    max_new = cfg.max_new_tokens or max(len(tok.encode_ordinary(ref)) for ref in references) + 16
    room = block - max_new  # prompt tokens that still leave room for a whole reply
    families = [r.get("family", "") for r in records]
    held_out = set(HELD_OUT_FAMILIES) if task == "instruct" else set()
    # the training conversations: few-shot examples (a seeded pick) and nearest-neighbour retrieval
    source = shots_source(cfg, data, data_path, args.get("data"))
    pool, why_no_pool = shot_pool(source, conversations)
    shots = sample_shots(pool, cfg.shots, cfg.seed)
    why_no_shots = "--shots 0" if cfg.shots <= 0 else why_no_pool
    tuned_cost = {"stored_bytes": dir_bytes(tuned_dir), "update_seconds": run.get("wall_time_s")}

    def ladder_on(items, store):
        """({rung: metrics and cost}, {rung: replies}); retrieval searches store,
        else the training examples."""
        prompts = [split_reply(r["messages"])[0] for r in items]
        zero = [fit_prompt(p, [], tok, room)[0] for p in prompts]
        rungs = {"base_zero_shot": (base, zero, {}), "fine_tuned": (tuned, zero, tuned_cost)}
        if shots:
            rungs["base_few_shot"] = (base, [fit_prompt(p, shots, tok, room)[0] for p in prompts], {})
        texts = store or pool
        if texts:
            found, index_s = retrieved(prompts, texts, 2 if store else max(cfg.shots, 1), tok, room, not store)
            # what retrieval stores: the documents or the examples
            size = len(json.dumps(texts).encode())
            rungs["base_retrieval"] = (base, found, {"stored_bytes": size, "update_seconds": index_s})
            rungs["fine_tuned_retrieval"] = (tuned, found, {"stored_bytes": tuned_cost["stored_bytes"] + size,
                                                            "update_seconds": index_s})
        out, replies = {name: {"skipped": why_no_shots if "few" in name else why_no_pool} for name in RUNGS}, {}
        for name, (model, ids, cost) in sorted(rungs.items(), key=lambda kv: RUNGS.index(kv[0])):
            dec = Decoding(tok, max_new, device, dtype, cfg.batch_size)
            # what the base model's greedy replies depend on: a rung of another run with this key is the same
            key = [base_name, str(device), str(dtype), max_new, cfg.batch_size, ids]
            replies[name] = (remembered(cfg.base_replies, key, lambda: run_rung(name, model, ids, dec))
                             if model is base else run_rung(name, model, ids, dec))
            scores = [score(task, x, r) for x, r in zip(replies[name], items)]
            out[name] = {**summarize(task, scores, families, held_out), "shots": len(shots),
                         "prompt_tokens": sum(map(len, ids)) / len(ids), **cost,
                         "items": item_scores(scores), "replies": replies[name]}  # re-scorable later
        return out, replies

    # the built-in store's two versions: as the model was tuned on it (1), and as it is now (2)
    docs = [load_store(data, v) for v in (1, 2)] if data == "knowledge" else None
    ladder, replies = ladder_on(records, docs[0] if docs else None)
    ladder_v2 = ladder_on(load_items(data, "test_v2", cfg.limit)[0], docs[1])[0] if docs else None
    prompts = [split_reply(r["messages"])[0] for r in records]

    # Forgetting: general English the fine-tuning data never contained.
    window = min(block, FORGET_WINDOW)
    windows = text_windows(general_tokens(general, tok, cfg.general_tokens, fmt.document_id), window)
    # fp32
    forget = {"general_text": general, "window": window, **forgetting(base, tuned, windows, device)}

    report = {
        "model": base_name, "tuned": tuned_dir, "kind": kind, "data": data, "data_path": str(data_path),
        "split": split, "task": task, "n_items": len(records), "limit": cfg.limit, "device": device,
        "dtype": dtype, "max_new_tokens": max_new,
        "loss": loss, "perplexity": perplexity(loss), "base_loss": base_loss,
        "base_perplexity": perplexity(base_loss), "n_response_tokens": n_tok, "n_loss_examples": len(examples),
        "n_loss_dropped": stats["n_dropped"],
        "ladder": ladder, "ladder_v2": ladder_v2, "overfitting": overfit, "forgetting": forget,
        "samples": [{"user": prompts[i][-1]["content"] if prompts[i] else "", "reference": references[i],
                     "base": replies["base_zero_shot"][i], "tuned": replies["fine_tuned"][i]}
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
    except cli.USER_ERRORS as e:
        sys.exit(cli.error_line(e))
    print()
    print(format_table(report, report_columns(report["task"])))
    print(f"\nreport: {path}")


if __name__ == "__main__":
    main()
