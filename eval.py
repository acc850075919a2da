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

import argparse
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

from data import (BUILTIN_DATASETS, HELD_OUT_FAMILIES, TRIAGE_FIELDS, chat_format, collate, get_tokenizer,
                  load_records, parse_triage, render_prompt, resolve_dataset, tokenize_dataset)
from lora import ADAPTER_CONFIG, load_adapter, merge_lora, read_adapter_config
from model import GPT, IGNORE_INDEX, atomic_write_text, choose_device, choose_dtype, resolve_pretrained

# -----------------------------------------------------------------------------
# CLI


@dataclass
class EvalConfig:
    out: str = "out"  # train.py's output directory: the default place for the tuned model, run.json, eval.json
    model: str | None = None  # base model (preset or directory); None: the adapter's config or run.json says
    adapter: str | None = None  # LoRA adapter dir or full fine-tuned model dir; None: out/adapter, else out/model
    data: str | None = None  # built-in dataset name or a file; None: the data run.json records, else "triage"
    task: str = "auto"  # scorer: triage | instruct | exact | auto (from the dataset)
    split: str = "test"  # split of a built-in dataset to evaluate (a file is evaluated as given)
    limit: int = 100  # evaluate the first N items (0: all); 100 keeps a CPU run of gpt2 to a few minutes
    shots: int = 3  # solved training examples in the base model's few-shot prompt (0 skips that rung)
    shots_data: str | None = None  # where few-shot examples come from; None: the training data of the run
    samples: int = 3  # test prompts shown side by side (base vs tuned)
    max_new_tokens: int | None = None  # generation cap; None: longest reference + 16 (scoring), 256 (chat)
    batch_size: int = 8  # examples per forward pass for the loss
    general_text: str | None = None  # plain text for forgetting; None: data/general.txt shipped with handtune
    general_tokens: int = 8192  # use at most this many tokens of the general text
    report: str | None = None  # JSON report path; None: <out>/eval.json
    device: str = "auto"  # cpu | cuda | cuda:N | mps | auto
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (autocast precision of forward passes)
    seed: int = 0  # picks the few-shot examples; seeds chat sampling
    chat: bool = False  # interactive chat instead of the evaluation
    system: str | None = None  # chat: system prompt ("" for none: SmolLM2 gets its default); None: the data's
    temperature: float = 0.7  # chat: softmax temperature (0 is greedy)
    top_k: int | None = 50  # chat: sample among the k most likely tokens
    top_p: float | None = None  # chat: sample from the smallest set of tokens with this much probability


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a fine-tuned GPT-2 or SmolLM2 against its base model: "
                                "task accuracy ladder (zero-shot, few-shot, fine-tuned), loss, forgetting, "
                                "side-by-side; or chat with it (--chat).")
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--out", default="out", help="train.py's output directory (default: out); the tuned model, "
                   "run.json and the report default to paths inside it")
    g.add_argument("--adapter", help="a LoRA adapter directory (adapter_config.json) or a full fine-tuned "
                   "model directory (config.json + model.safetensors); default: OUT/adapter, else OUT/model")
    g.add_argument("--model", help="the base model, preset or directory (default: the adapter's "
                   "base_model_name_or_path, or the model in OUT/run.json)")
    g.add_argument("--data", help="built-in dataset (triage, instruct) or a chat JSONL / Alpaca JSON file, "
                   "evaluated as given (default: the data in OUT/run.json, else triage)")
    g.add_argument("--task", default="auto", choices=("auto", "triage", "instruct", "exact"),
                   help="scorer: triage (JSON exact match + per field), instruct (per-family accuracy), exact "
                   "(reply equals reference); auto picks from the dataset (default)")
    g.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="split of a built-in dataset to evaluate (default: test)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--limit", type=int, default=100, help="evaluate the first N items, 0 for all (default: "
                   "100, a few minutes for gpt2 on a laptop CPU)")
    g.add_argument("--shots", type=int, default=3, help="solved examples in the base model's few-shot prompt; "
                   "0 skips the few-shot rung (default: 3)")
    g.add_argument("--shots-data", help="dataset the few-shot examples come from (default: the built-in "
                   "dataset's train split, or the training data of the run when --data is a file)")
    g.add_argument("--samples", type=int, default=3, help="test prompts to show side by side (default: 3)")
    g.add_argument("--max-new-tokens", type=int, help="cap on generated tokens (default: longest reference "
                   "reply + 16 when scoring, 256 in chat)")
    g.add_argument("--batch-size", type=int, default=8, help="examples per forward pass for losses (default: 8)")
    g.add_argument("--general-text", help="plain-text file for the forgetting check (default: data/general.txt)")
    g.add_argument("--general-tokens", type=int, default=8192, help="use at most this many tokens of the "
                   "general text (default: 8192)")
    g.add_argument("--report", help="where to write the JSON report (default: OUT/eval.json)")
    g.add_argument("--seed", type=int, default=0, help="seed for choosing few-shot examples and for chat "
                   "sampling (default: 0)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="autocast precision of every forward pass (default: auto: bf16 on recent GPUs, fp32 "
                   "on CPU); log-softmax, losses and KL are computed in fp32 regardless")
    g = p.add_argument_group("chat (--chat)")
    g.add_argument("--chat", action="store_true", help="chat with the fine-tuned model instead of evaluating "
                   "(commands: /reset, /quit; Ctrl-D exits)")
    g.add_argument("--system", help="system prompt for the chat; \"\" for none, which for SmolLM2 means its "
                   "default system prompt, as in training (default: the one in the training data's first "
                   "conversation, if it has one)")
    g.add_argument("--temperature", type=float, default=0.7, help="chat sampling temperature; 0 is greedy "
                   "(default: 0.7)")
    g.add_argument("--top-k", type=int, default=50, help="chat: sample among the k most likely tokens "
                   "(default: 50)")
    g.add_argument("--top-p", type=float, help="chat: nucleus sampling, keep the smallest set of tokens with "
                   "this much probability (default: off)")
    args = p.parse_args(argv)
    return EvalConfig(**vars(args))


def check_config(cfg):
    """Refuse settings that cannot work, before anything is loaded."""
    for name in ("limit", "shots", "samples"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("batch_size", "general_tokens", "max_new_tokens", "top_k"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if cfg.temperature < 0 or (cfg.top_p is not None and not 0 < cfg.top_p <= 1):
        raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")


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


def autocast_for(device, dtype):
    """Autocast context for forward passes in dtype (a no-op in float32)."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


@torch.no_grad()
def response_loss(model, examples, batch_size, device, dtype="float32", *, pad_id):
    """(mean NLL, number of tokens) over the trained tokens of examples [(ids, mask)], with exactly training's
    masking (data.collate; pad_id: chat_format(tokenizer).pad_id, an id in the model's vocabulary). The mean is
    token-weighted: sum over every response token / their count, not a mean of per-batch means, which would
    over-weight the tokens of batches with short replies."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y = collate(examples[i:i + batch_size], pad_id=pad_id)  # (B, T) each
        x, y = x.to(device), y.to(device)
        with autocast_for(device, dtype):
            _, nll = model(x, y, reduction="sum")
        total += float(nll)
        count += int((y != IGNORE_INDEX).sum())
    return total / max(count, 1), count


def perplexity(loss):
    """exp(mean NLL): the model is, on average, as unsure as a uniform choice among this many tokens."""
    return math.exp(loss)


# -----------------------------------------------------------------------------
# Task scoring: greedy replies, compared with the reference replies


def score_triage(reply, reference):
    """{"exact", "valid", <field>...} each 0 or 1 for one reply. The format is part of the task: a reply that
    parse_triage refuses (not one line holding exactly one JSON object with the four keys: extra text, an
    extra or missing key, a second line) is invalid and scores 0 everywhere. Whitespace around it is fine."""
    got, want = parse_triage(reply), parse_triage(reference)
    if want is None:
        raise ValueError(f"reference reply is not a triage label: {reference!r}")
    scores = {"valid": int(got is not None), "exact": int(got == want)}
    for f in TRIAGE_FIELDS:
        scores[f] = int(got is not None and got[f] == want[f])
    return scores


def score_exact(reply, reference):
    """{"exact": 1} if the reply equals the reference after stripping surrounding whitespace, else 0."""
    return {"exact": int(reply.strip() == reference.strip())}


def mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


def summarize(task, scores, families, held_out):
    """Aggregate per-item scores into the task's metrics. triage: exact match, valid-JSON rate and accuracy
    per field. instruct: accuracy overall, per family, and over seen vs held-out families. exact: accuracy."""
    out = {"n": len(scores)}
    if task == "triage":
        out["exact_match"] = mean([s["exact"] for s in scores])
        out["valid"] = mean([s["valid"] for s in scores])
        out["fields"] = {f: mean([s[f] for s in scores]) for f in TRIAGE_FIELDS}
    elif task == "instruct":
        out["accuracy"] = mean([s["exact"] for s in scores])
        per = {}
        for s, fam in zip(scores, families):
            per.setdefault(fam, []).append(s["exact"])
        out["families"] = {fam: {"accuracy": mean(v), "n": len(v), "held_out": fam in held_out}
                           for fam, v in sorted(per.items())}
        out["seen"] = mean([s["exact"] for s, f in zip(scores, families) if f not in held_out])
        out["held_out"] = mean([s["exact"] for s, f in zip(scores, families) if f in held_out])
    else:
        out["accuracy"] = mean([s["exact"] for s in scores])
    return out


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
        with autocast_for(device, dtype):
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
        with autocast_for(device, dtype):
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
# Report


def pct(x):
    return f"{100 * x:5.1f}%"


RUNG_LABELS = {"base_zero_shot": "base, zero-shot", "base_few_shot": "base, {k}-shot", "fine_tuned": "fine-tuned"}


def format_table(report):
    """The report's headline numbers as a short plain-text table."""
    task, lines = report["task"], []
    lines.append(f"eval: {report['tuned']} ({report['kind']}) vs base {report['model']} | data {report['data']}"
                 f"{' ' + report['split'] if report['split'] else ''}, {report['n_items']} items | "
                 f"{report['device']} {report['dtype']}")
    lines.append("")
    if task == "triage":
        cols = ["exact", "valid", *TRIAGE_FIELDS]
        get = lambda m: [m["exact_match"], m["valid"], *(m["fields"][f] for f in TRIAGE_FIELDS)]
    elif task == "instruct":
        cols = ["accuracy", "seen", "held-out"]
        get = lambda m: [m["accuracy"], m["seen"], m["held_out"]]
    else:
        cols = ["accuracy"]
        get = lambda m: [m["accuracy"]]
    width = max(len(c) for c in cols) + 2
    lines.append(f"{'ladder (same items, same scorer)':34}" + "".join(f"{c:>{max(width, 8)}}" for c in cols))
    for rung, m in report["ladder"].items():
        label = RUNG_LABELS[rung].format(k=m.get("shots"))
        if m.get("skipped"):
            lines.append(f"  {label:32}skipped: {m['skipped']}")
            continue
        lines.append(f"  {label:32}" + "".join(f"{pct(v):>{max(width, 8)}}" for v in get(m)))
    if task == "instruct":  # which families the tuned model gets right; * marks families never trained on
        fams = report["ladder"]["fine_tuned"]["families"]
        per = [f"{name}{'*' if v['held_out'] else ''} {round(v['accuracy'] * v['n'])}/{v['n']}"
               for name, v in fams.items()]
        row = "  fine-tuned per family (* held out):"
        for i, item in enumerate(per):
            if len(row) + len(item) + 2 > 110:  # wrap between items, never inside one
                lines.append(row + ("," if i else ""))
                row = "    " + item
            else:
                row += (", " if i else " ") + item
        lines.append(row)
    lines.append("")
    lines.append(f"{'response loss':34}base {report['base_loss']:.3f} (ppl {report['base_perplexity']:.1f})   "
                 f"tuned {report['loss']:.3f} (ppl {report['perplexity']:.1f})   "
                 f"[{report['n_response_tokens']} tokens]")
    o = report["overfitting"]
    if o.get("skipped"):
        lines.append(f"{'overfitting':34}skipped: {o['skipped']}")
    else:
        lines.append(f"{'overfitting (tuned)':34}train loss {o['train_loss']:.3f}   test loss {o['test_loss']:.3f}"
                     f"   gap {o['gap']:+.3f}")
    f = report["forgetting"]
    lines.append(f"{'forgetting (general text)':34}ppl base {f['base_perplexity']:.1f} -> tuned "
                 f"{f['tuned_perplexity']:.1f} ({100 * f['perplexity_change']:+.1f}%)   KL(base||tuned) "
                 f"{f['kl_base_tuned']:.3g} nats/token   [{f['n_tokens']} tokens]")
    if report["samples"]:
        lines.append("")
        lines.append("side by side (greedy)")
        for i, s in enumerate(report["samples"], 1):
            lines.append(f"[{i}] user:      {one_line(s['user'], 100)}")
            lines.append(f"    reference: {one_line(s['reference'], 100)}")
            lines.append(f"    base:      {one_line(s['base'], 100) or '(empty reply)'}")
            lines.append(f"    tuned:     {one_line(s['tuned'], 100) or '(empty reply)'}")
    return "\n".join(lines)


def one_line(text, width):
    """Text on one line (newlines shown as the two characters \\n), cut to width characters."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 3] + "..."


def dir_bytes(d):
    """Total size of the files in a directory (the adapter, or the full model): what a fine-tune costs to store."""
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if os.path.isfile(os.path.join(d, f)))


# -----------------------------------------------------------------------------
# Main: setup, then each measurement in turn


def evaluate(cfg):
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
    loss, n_tok = response_loss(tuned, examples, cfg.batch_size, device, dtype, pad_id=pad_id)
    base_loss, _ = response_loss(base, examples, cfg.batch_size, device, dtype, pad_id=pad_id)
    if split is not None and split != "train":
        train_records, _, _ = load_items(data, "train", len(records))
        train_examples, _ = tokenize_dataset([r["messages"] for r in train_records], tok, max_len,
                                             train_on=train_on, overflow=overflow, dedup=False)
        train_loss, _ = response_loss(tuned, train_examples, cfg.batch_size, device, dtype, pad_id=pad_id)
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
    held_out = set(HELD_OUT_FAMILIES) if task == "instruct" else set()
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
    forget = {"general_text": general, "window": window, **forgetting(base, tuned, windows, device, dtype)}

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
    cfg = parse_args(argv)
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
        report = evaluate(cfg)
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
