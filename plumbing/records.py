"""plumbing/records.py: reading and validating dataset files, so a bad line fails with its file and line.

Two formats, detected from the first record: chat JSONL ({"messages": [{"role", "content"}, ...]} per line;
OpenAI's "weight": 0 on an assistant message makes it context, not trained) and Alpaca ("instruction",
optional "input", "output"; a JSON array or JSONL). Every malformed input raises ValueError naming the file,
the line and the problem. data.load_conversations is the core's entry point.
"""

import json
from pathlib import Path

import numpy as np
import torch

ROLES = ("system", "user", "assistant")


def _line_of(text, pos):
    return text.count("\n", 0, pos) + 1


# Bounds on what one record may hold, checked before it is parsed or tokenized: no model here has a
# context near this long (SmolLM2's 8,192 tokens are ~35,000 characters), and a crafted file with a
# 64 MB record would otherwise cost gigabytes of memory on its way to the length check.
MAX_RECORD_BYTES = 1_000_000
MAX_MESSAGE_CHARS = 100_000


def _read_json_records(path):
    """Yield (line number, parsed object) for a JSONL file or a JSON array file. UTF-8 with or without BOM,
    CRLF line ends and blank lines are fine; anything unparseable raises ValueError naming file and line.
    A JSONL file is read a line at a time (split on "\n" only: JSON allows U+2028 inside strings)."""
    start = b""
    with open(path, "rb") as f:  # the first byte that is not a byte-order mark or white space
        while not start and (chunk := f.read(1 << 16)):
            start = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not start:
        raise ValueError(f"{path}:1: empty file, no records")
    if start.startswith(b"["):  # one JSON array of records (the usual Alpaca layout)
        yield from _read_json_array(path)
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if len(raw) > MAX_RECORD_BYTES:
                raise ValueError(f"{path}:{n}: a record of {len(raw):,} bytes; at most "
                                 f"{MAX_RECORD_BYTES:,} (split or drop it)")
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid UTF-8 ({e.reason}); save the file as UTF-8") from None
            if not line:
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: bad JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise ValueError(f"{path}:{n}: JSON nested too deeply to read") from None


def _read_json_array(path):
    """Yield (line number, object) for each element of a file holding one JSON array."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # -sig: strips a byte-order mark if there is one
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason}); save the file as UTF-8") from None
    del raw
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip()) + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos < len(text) and text[pos] == "]":
            break
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: bad JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError(f"{path}:{_line_of(text, pos)}: JSON nested too deeply to read") from None
        if end - pos > MAX_RECORD_BYTES:
            raise ValueError(f"{path}:{_line_of(text, pos)}: a record of {end - pos:,} characters; at "
                             f"most {MAX_RECORD_BYTES:,} (split or drop it)")
        yield _line_of(text, pos), obj
        pos = end
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif not (pos < len(text) and text[pos] == "]"):
            raise ValueError(f"{path}:{_line_of(text, pos)}: bad JSON (expected ',' or ']' in the array)")


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
        if len(m["content"]) > MAX_MESSAGE_CHARS:
            raise ValueError(f"{where}: message {k} has {len(m['content']):,} characters; at most "
                             f"{MAX_MESSAGE_CHARS:,} (no context here holds more): split or drop it")
        if m["role"] == "system" and k != 1:
            raise ValueError(f"{where}: message {k} is a system message; only the first message may be one")
        extra = sorted(set(m) - {"role", "content", "weight"})
        if extra:  # OpenAI's name, tool_calls, function_call...: refused, never silently half-used
            raise ValueError(f"{where}: message {k} has {', '.join(map(repr, extra))}, which handtune does not use "
                             "(a message is role, content and, on an assistant reply, weight 0 or 1); remove it")
        if "weight" in m and (m["role"] != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
            raise ValueError(f"{where}: message {k}: weight {m['weight']!r} on a {m['role']} message; OpenAI's "
                             "format allows weight 0 (context only, not trained) or 1 (trained) on assistant replies")
        clean.append({"role": m["role"], "content": m["content"], **({"weight": m["weight"]} if "weight" in m else {})})
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
    return _check_messages([{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}],
                           where)


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


def conversation_key(conv):
    """What makes two conversations the same (exact duplicates): every message's role, content and weight."""
    return tuple((m["role"], m["content"], m.get("weight", 1)) for m in conv)


def holdout_split(conversations, fraction, seed, split):
    """A file without a val split: after removing exact duplicates (so no validation conversation is
    also trained on), a fixed random fraction of the conversations is validation, the rest training."""
    unique = list({conversation_key(c): c for c in conversations}.values())
    order = np.random.default_rng(seed).permutation(len(unique)).tolist()
    n_val = round(fraction * len(unique))
    chosen = order[:n_val] if split == "val" else order[n_val:]
    return [unique[i] for i in sorted(chosen)]


# -----------------------------------------------------------------------------
# Plain text for language modelling (eval.py's forgetting check)


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


def general_tokens(path, tok, max_tokens, document_id):
    """The general text as one document: the family's document separator (<|endoftext|> in GPT-2 and
    SmolLM2, at different ids) then its tokens, at most max_tokens predicted ones."""
    with open(path, encoding="utf-8") as f:
        ids = [document_id] + tok.encode_ordinary(f.read())
    if len(ids) < 2:
        raise ValueError(f"{path}: empty; the forgetting check needs some plain text")
    return ids[:max_tokens + 1]
