"""data.py: chat SFT data: a conversation becomes token ids plus a loss
mask, then shifted, padded batches.

Supervised fine-tuning is ordinary next-token prediction on a rendered conversation, except that the
loss falls only on the assistant's replies (and the end-of-turn token after each, so the model
learns to stop). System prompt, user turns, role headers and padding are context, not targets.

GPT-2 has no chat tokens, so a role header is plain text and its one special token, <|endoftext|>
(id 50256, "EOT"), marks where a message starts. A conversation renders as (EOT shown as <EOT>)

    <EOT>System:\nYou are terse.<EOT>User:\nHi!<EOT>Assistant:\nHello.<EOT>

The EOT after a reply ends the assistant's turn (trained: it is the stop token at inference) and
opens the next message. Mask 1: each reply's content and the EOT right after it. Mask 0: headers,
system and user tokens, and every other EOT. train_on="last" trains only the final reply. Three
rules keep training and inference consistent:
1. Tokenize segment by segment (EOT, header, content apart). Encoded as one string, BPE merges
   across the boundary ("Assistant:\n" + "\n\nHi" gives [..., "\n\n", "\n", "Hi"]), so the prompt
   would not be a prefix of the training ids. render_prompt returns exactly the tokens before the
   reply's first token.
2. Message text is plain text (encode_ordinary): a user who types "<|endoftext|>" gets 13
   characters' ordinary tokens, never id 50256.
3. So id 50256 comes only from the template: a typed "\nAssistant:\n" is never preceded by EOT and
   can never line up with a real turn.

SmolLM2-Instruct was trained on ChatML, with special tokens
<|im_start|> (id 1) and <|im_end|> (id 2):

    <|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n
    <|im_start|>assistant\nHello.<|im_end|>\n                   (one string, wrapped here)

A conversation without a system message gets SmolLM2's default one, as its own template
does. Trained: a reply's content and its <|im_end|>, not the "\n" after it. The three rules
hold; our ids equal Hugging Face's apply_chat_template's (tested) except where its
whole-string encoding breaks rule 1 or 2.

    python data.py --show triage                 # 3 examples, trained tokens marked, then stats
    python data.py --show my_chats.jsonl --tokenizer-dir ~/models/gpt2   # your file, offline tokenizer
    python data.py --show triage --model smollm2-135m-instruct-gguf     # SmolLM2's ChatML rendering
    python data.py --generate                    # rewrite data/ (triage, instruct, knowledge)
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from model import IGNORE_INDEX
from plumbing import cli
from plumbing.hub import resolve_pretrained
from plumbing.records import conversation_key, load_records
from plumbing.report import printable
from plumbing.stats import diversity, format_stats, padding_fraction, percentile
from plumbing.tokenizer_files import EOT_ID, EOT_TEXT, get_tokenizer
from tasks import BUILTIN_DATASETS, DATA_DIR, SPLITS, resolve_dataset, write_dataset

# -----------------------------------------------------------------------------
# The two templates' own text: GPT-2's role headers, ChatML's turn markers and SmolLM2's
# system prompt. (EOT_ID / EOT_TEXT, GPT-2's <|endoftext|>, is a token of GPT-2's
# vocabulary: plumbing/tokenizer_files.py.)

ROLE_HEADERS = {"system": "System:\n", "user": "User:\n", "assistant": "Assistant:\n"}
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML's turn markers (SmolLM2's ids 1 and 2)
# What SmolLM2-Instruct's chat template inserts when a conversation has no system message (a test
# reads the template in the GGUF file and checks this string is in it).
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def check_vocab(tokenizer, vocab_size, model_name):
    """Refuse a tokenizer whose ids run past the model's embedding table (an
    index error later, mid-run)."""
    if tokenizer.n_vocab > vocab_size:
        raise ValueError(f"{model_name}: the {tokenizer.name} tokenizer has {tokenizer.n_vocab} tokens but the "
                         f"model's vocabulary only {vocab_size}; the tokenizer files belong to another model")


# -----------------------------------------------------------------------------
# Chat formats: what train.py and eval.py need to know, whatever the model family


@dataclass(frozen=True)
class ChatFormat:
    family: str  # "gpt2" (handtune's template) or "smollm2" (ChatML): the tokenizer's name
    start_of_turn_id: int  # opens every message: GPT-2's EOT, ChatML's <|im_start|>
    end_of_turn_id: int  # ends every assistant reply: trained, and the stop token when generating
    # every id that ends a generated reply (end_of_turn_id first); cut the reply at the first
    stop_ids: tuple
    # input id at padding positions: never attended to by a real position, never trained
    pad_id: int
    # separates documents in plain-text language modelling (both families: <|endoftext|>)
    document_id: int
    default_system: str  # system prompt inserted when a conversation has none ("" = insert nothing)
    # token id -> how visualise() shows it (unlike text that merely spells the token)
    special_names: dict


def chat_format(tokenizer):
    """The ChatFormat of a tokenizer from get_tokenizer, picked by its name."""
    if tokenizer.name == "gpt2":
        return ChatFormat("gpt2", EOT_ID, EOT_ID, (EOT_ID,), EOT_ID, EOT_ID, "", {EOT_ID: "<EOT>"})
    if tokenizer.name == "smollm2":
        start, end, eot = (tokenizer.encode_single_token(t) for t in (IM_START, IM_END, EOT_TEXT))
        return ChatFormat("smollm2", start, end, (end, eot), end, eot, SMOLLM2_DEFAULT_SYSTEM,
                          {start: "<im_start>", end: "<im_end>", eot: "<EOT>"})
    raise ValueError(f"no chat template for tokenizer {tokenizer.name!r} (expected gpt2 or smollm2: "
                     "use plumbing.tokenizer_files.get_tokenizer)")

# -----------------------------------------------------------------------------
# The chat template: conversation -> (ids, mask); prompt -> ids. The family's
# template is picked automatically.


def render_conversation(messages, tokenizer, train_on="all"):
    """Render a conversation into token ids and a loss mask of the same length: mask[i] = 1 where
    token i is part of a trained assistant reply or the end-of-turn token that ends it.
    train_on="all" trains every assistant turn, "last" only the final one; a reply with "weight": 0
    (OpenAI's format) is never trained."""
    ids, mask, _ = _render(messages, tokenizer, train_on)
    return ids, mask


def render_prompt(messages, tokenizer):
    """The tokens a model is given to write the next assistant reply: the conversation rendered with
    one more, empty, assistant turn, cut where that reply would start. So it equals
    render_conversation(messages + [reply])[0][:len(prompt)] for any reply (rule 1)."""
    ids, _, reply_starts = _render(list(messages) + [{"role": "assistant", "content": ""}], tokenizer, "all")
    return ids[:reply_starts[-1]]


def _render(messages, tokenizer, train_on):
    """(ids, mask, reply_starts): reply_starts[k] is the index of the k-th
    assistant reply's first token."""
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    fmt = chat_format(tokenizer)
    render = _render_chatml if fmt.family == "smollm2" else _render_gpt2
    if fmt.family == "smollm2" and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": fmt.default_system}] + list(messages)
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    trained = [int(m["role"] == "assistant" and m.get("weight", 1) == 1 and (train_on == "all" or i == last_reply))
               for i, m in enumerate(messages)]  # OpenAI's "weight": 0 makes a reply context only
    return render(messages, trained, tokenizer, fmt)


def _render_gpt2(messages, trained, tokenizer, fmt):
    ids, mask, starts = [], [], []
    for i, m in enumerate(messages):
        # opens message i, and ends message i - 1: trained if that was a trained reply
        ids.append(EOT_ID)
        mask.append(trained[i - 1] if i else 0)
        header = tokenizer.encode_ordinary(ROLE_HEADERS[m["role"]])
        content = tokenizer.encode_ordinary(m["content"])  # plain text: never produces EOT_ID
        ids += header
        mask += [0] * len(header)
        if m["role"] == "assistant":
            starts.append(len(ids))
        ids += content
        mask += [trained[i]] * len(content)
    ids.append(EOT_ID)  # closes the conversation (and the final reply)
    mask.append(trained[-1] if messages else 0)
    return ids, mask, starts


def _render_chatml(messages, trained, tokenizer, fmt):
    newline = tokenizer.encode_ordinary("\n")
    ids, mask, starts = [], [], []
    for i, m in enumerate(messages):
        # An assistant turn is split where the reply starts: the head "assistant\n" ends
        # the prompt, the body is trained. Other turns are one string, role + "\n" +
        # content, as Hugging Face tokenizes them.
        if m["role"] == "assistant":
            head, body = tokenizer.encode_ordinary("assistant\n"), tokenizer.encode_ordinary(m["content"])
        else:
            head, body = tokenizer.encode_ordinary(m["role"] + "\n" + m["content"]), []
        ids += [fmt.start_of_turn_id] + head
        mask += [0] * (1 + len(head))
        if m["role"] == "assistant":
            starts.append(len(ids))
        ids += body + [fmt.end_of_turn_id] + newline
        mask += [trained[i]] * (len(body) + 1) + [0] * len(newline)
    return ids, mask, starts


# -----------------------------------------------------------------------------
# A dataset: conversations -> training examples (dedup, length policy, no untrained examples, stats)


def load_conversations(path):
    """All conversations of a chat JSONL or Alpaca file (validated by plumbing/records.py)."""
    return [rec["messages"] for rec in load_records(path)]


def truncate_example(ids, mask, max_len, end_id=EOT_ID):
    """Cut an over-long example to at most max_len tokens. Rule: keep the longest prefix that ends
    right after a trained end-of-turn token (end_id: chat_format(tokenizer).end_of_turn_id), i.e. a
    whole number of complete replies. If even the first trained reply does not fit, keep the first
    max_len tokens: that reply is cut off and trains without its end of turn (so prefer
    overflow="drop" unless few examples are affected)."""
    ends = [i for i in range(min(max_len, len(ids))) if ids[i] == end_id and mask[i] == 1]
    cut = ends[-1] + 1 if ends else max_len
    return ids[:cut], mask[:cut]


def tokenize_dataset(conversations, tokenizer, block_size, train_on="all", overflow="drop", dedup=True):
    """Render conversations into training examples [(ids, mask)] and report what happened in a stats
    dict. An example of L tokens gives L - 1 (input, target) pairs, so it fits a context of
    block_size when L <= block_size + 1. Longer ones are dropped (overflow="drop") or cut by
    truncate_example ("truncate"). Exact duplicate conversations are dropped (dedup=True), and so is
    any example left with no trained target token: it would add nothing but a 0/0 to a mean loss."""
    if overflow not in ("drop", "truncate"):
        raise ValueError(f"overflow must be 'drop' or 'truncate', got {overflow!r}")
    end_id = chat_format(tokenizer).end_of_turn_id
    seen, kept, examples = set(), [], []
    n_dup = n_long = n_untrained = n_trunc = 0
    for conv in conversations:
        key = conversation_key(conv)
        if dedup and key in seen:
            n_dup += 1
            continue
        seen.add(key)
        kept.append(conv)
        ids, mask = render_conversation(conv, tokenizer, train_on)
        if len(ids) > block_size + 1:
            if overflow == "drop":
                n_long += 1
                continue
            ids, mask = truncate_example(ids, mask, block_size + 1, end_id)
            n_trunc += 1
        if sum(mask[1:]) == 0:  # targets are ids[1:], so mask[1:] says what is trained
            n_untrained += 1
            continue
        examples.append((ids, mask))
    lengths = sorted(len(ids) for ids, _ in examples)
    n_targets = sum(n - 1 for n in lengths)
    n_trained = sum(sum(mask[1:]) for _, mask in examples)
    stats = {
        "n_conversations": len(conversations), "n_examples": len(examples),
        "n_duplicates": n_dup, "duplicate_rate": n_dup / max(len(conversations), 1),
        "n_dropped": n_long + n_untrained, "n_too_long": n_long, "n_untrained": n_untrained,
        "n_truncated": n_trunc, "block_size": block_size, "train_on": train_on, "overflow": overflow,
        "len_p50": percentile(lengths, 50), "len_p90": percentile(lengths, 90),
        "len_p99": percentile(lengths, 99), "len_max": lengths[-1] if lengths else 0,
        "n_target_tokens": n_targets, "n_trained_tokens": n_trained,
        "trained_share": n_trained / max(n_targets, 1),
        **diversity(kept),
    }
    return examples, stats

# -----------------------------------------------------------------------------
# Batching: collate with the shift, length-grouped deterministic batches that split across processes


def collate(examples, pad_id=EOT_ID):
    """Stack examples into (input_ids, targets), both LongTensors (B, T) with T = longest example -
    1. inputs = ids[:-1], targets = ids[1:] (position t predicts token t + 1), and the target is
    IGNORE_INDEX wherever mask[1:] is 0 or the position is padding. Padding goes on the right; its
    input id is pad_id, harmless because causal attention never lets a real position see a later
    (padding) one. pad_id must be in the model's vocabulary: the default is GPT-2's; pass
    chat_format(tokenizer).pad_id for any family."""
    B, T = len(examples), max(len(ids) for ids, _ in examples) - 1  # batch, time
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        if sum(mask[1:]) == 0:
            raise ValueError(f"example {b} of the batch has no trained token (tokenize_dataset drops these)")
        n = len(ids) - 1
        input_ids[b, :n] = torch.tensor(ids[:-1])
        trained = torch.tensor(mask[1:], dtype=torch.bool)
        targets[b, :n] = torch.where(trained, torch.tensor(ids[1:]), IGNORE_INDEX)
    return input_ids, targets


GROUP_CHUNK = 64  # length grouping sorts windows of this many global batches: padding vs randomness


def batches(examples, batch_size, seed, epoch, shard=(0, 1), shuffle=True, drop_last=True):
    """One epoch as lists of example indices for process `rank` of `world_size` (shard =
    (rank, world_size); one process: (0, 1)). Global batches of batch_size * world_size come
    first and rank r takes slice r of each: N processes x batch b see what one process x batch
    N*b sees. shuffle: order by (seed, epoch), sort each window of GROUP_CHUNK global batches
    by length (little padding), shuffle the batches, the largest first; else sort all by
    length (evaluation). drop_last drops a short final global batch, so every rank takes the
    same number of equal steps."""
    rank, world_size = shard
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    lengths = [len(ids) for ids, _ in examples]
    G = batch_size * world_size  # global batch size
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(examples)).tolist()
        window = G * GROUP_CHUNK
        groups = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
            groups += [chunk[j:j + G] for j in range(0, len(chunk), G)]
    else:
        order = sorted(range(len(examples)), key=lambda i: lengths[i])
        groups = [order[j:j + G] for j in range(0, len(order), G)]
    if drop_last and groups and len(groups[-1]) < G:  # only the very last group can be short
        groups.pop()
    if shuffle and groups:  # (none: fewer examples than one global batch; the caller says so)
        groups = [groups[k] for k in rng.permutation(len(groups))]
        # The largest batch (longest row x rows) goes first, so that an
        # out-of-memory shows at step 1.
        first = max(range(len(groups)), key=lambda k: max(lengths[i] for i in groups[k]) * len(groups[k]))
        groups.insert(0, groups.pop(first))
    return [g[rank * batch_size:(rank + 1) * batch_size] for g in groups]


# -----------------------------------------------------------------------------
# The mask visualiser: python data.py --show NAME_OR_PATH

TRAINED_ON, TRAINED_OFF = "\x1b[1;32m", "\x1b[0m"  # ANSI bold green on a terminal
PLAIN_ON, PLAIN_OFF = "«", "»"  # markers when stdout is a file or a pipe


def visualise(ids, mask, tokenizer, color):
    """Decode an example with its trained spans highlighted (color=True) or wrapped in «...».
    The template's special tokens are shown by their chat_format special_names (GPT-2's id 50256
    as <EOT>, ChatML's as <im_start>, <im_end>); text that merely spells <|endoftext|> or
    <|im_end|> is shown as typed."""
    names = chat_format(tokenizer).special_names
    on, off = (TRAINED_ON, TRAINED_OFF) if color else (PLAIN_ON, PLAIN_OFF)
    out, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and mask[j] == mask[i]:  # a run of tokens with the same mask value
            j += 1
        pieces, k = [], i
        # decode between special tokens; never token by token (that splits UTF-8 characters)
        while k < j:
            if ids[k] in names:
                pieces.append(names[ids[k]])
                k += 1
                continue
            m = k
            while m < j and ids[m] not in names:
                m += 1
            pieces.append(printable(tokenizer.decode(ids[k:m])))  # a file's escape codes shown, not run
            k = m
        text = "".join(pieces)
        out.append(on + text + off if mask[i] else text)
        i = j
    return "".join(out)


SHOW_BATCH = 8  # the batch size --show's padding share is measured at


def show(cfg, tokenizer, color=False):
    """Print cfg.n rendered examples of the dataset cfg.show (a ShowConfig: its split, block_size,
    train_on, overflow) with the trained tokens marked, then its stats."""
    path = resolve_dataset(cfg.show, cfg.split)
    conversations = load_conversations(path)
    legend = "bold green" if color else f"{PLAIN_ON}...{PLAIN_OFF}"
    specials = ", ".join(f"{name} = token {i}" for i, name in chat_format(tokenizer).special_names.items())
    print(f"legend: {legend} = trained tokens (the loss falls here), the rest is context (so is a reply with "
          f'"weight": 0); {specials}')
    for k, conv in enumerate(conversations[:cfg.n], start=1):
        ids, mask = render_conversation(conv, tokenizer, cfg.train_on)
        print(f"=== {path} | example {k} of {len(conversations)} | {len(ids)} tokens, {sum(mask)} trained ===")
        print(visualise(ids, mask, tokenizer, color))
        print()
    examples, stats = tokenize_dataset(conversations, tokenizer, cfg.block_size, cfg.train_on,
                                       cfg.overflow)
    print(f"--- stats: {path} ---")
    print(format_stats(stats))
    if examples:
        pad = padding_fraction(examples, batches(examples, SHOW_BATCH, seed=0, epoch=0, drop_last=False))
        print(f"padding    {pad:.1%} of input positions with length-grouped batches of {SHOW_BATCH}")


# -----------------------------------------------------------------------------
# CLI


@dataclass
class ShowConfig:
    show: str | None = cli.opt(None, "print examples with the trained tokens marked, then stats: a built-in "
                               "dataset or a chat/Alpaca file", group="what to do (one)", metavar="NAME_OR_PATH")
    generate: bool = cli.opt(False, "regenerate the built-in datasets under --out")
    n: int = cli.opt(3, "examples to print", group="--show", flag="-n", min=0)
    split: str = cli.opt("train", "split of a built-in dataset", choices=SPLITS)
    tokenizer_dir: str | None = cli.opt(None, "model directory or .gguf file whose tokenizer and template to use "
                                        "(default: tiktoken's gpt2)")
    model: str | None = cli.opt(None, "model preset or path, as train.py takes it")
    block_size: int = cli.opt(1024, "context length for the length policy", min=1)
    train_on: str = cli.opt("all", "train every reply or the last", choices=("all", "last"))
    overflow: str = cli.opt("drop", "too-long examples: drop or truncate", choices=("drop", "truncate"))
    color: str = cli.opt("auto", "colour trained tokens (auto: on a terminal)", choices=("auto", "always", "never"))
    out: str = cli.opt(str(DATA_DIR), "output directory of --generate", group="--generate")


def main(argv=None):
    cfg, _ = cli.parse(ShowConfig, argv, "Inspect or regenerate handtune's chat SFT datasets.")
    try:
        cli.check_ranges(cfg)
        if (cfg.show is None) == (not cfg.generate):
            raise ValueError("pick one of --show NAME_OR_PATH and --generate")
        if cfg.model is not None and cfg.tokenizer_dir is not None:
            raise ValueError("--model and --tokenizer-dir both name a tokenizer: pass one")
        if cfg.generate:
            for name in BUILTIN_DATASETS:
                for path in write_dataset(name, cfg.out):
                    print(f"wrote {path} ({path.stat().st_size} bytes)")
            return
        # a missing file fails here, before a tokenizer is loaded
        resolve_dataset(cfg.show, cfg.split)
        tokenizer = get_tokenizer(resolve_pretrained(cfg.model) if cfg.model else cfg.tokenizer_dir)
        color = cfg.color == "always" or (cfg.color == "auto" and sys.stdout.isatty())
        show(cfg, tokenizer, color)
    except BrokenPipeError:  # stdout piped into e.g. `head`, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except cli.USER_ERRORS as e:  # bad input: one line, non-zero exit, no traceback
        sys.exit(cli.error_line(e))


if __name__ == "__main__":
    main()
