"""plumbing/gguf_io.py: llama.cpp's GGUF files (Llama and GPT-2), read into Hugging Face's terms (config.json,
tensor names).

A GGUF file holds metadata key/values, then tensors, many quantized in blocks (Q4_1: 32 weights share a
scale and a minimum, 4 bits each). scan_gguf walks the header itself, every claim bounded by the file's
size; the gguf package (an optional dependency, imported only inside the functions that read or write
GGUF) dequantizes the blocks; the naming, the config and the q/k row order are ours to get right.
model.py turns the result into a GPT exactly as it would a Hugging Face directory.
plumbing/gguf_export.py writes the other way.
"""

import math
import mmap
import os
import struct

import numpy as np
import torch

from plumbing.files import refuse_lfs_pointer
from plumbing.hf_format import GGUF, HF, rename


def gguf_package(doing="reading"):
    """The gguf package, imported when a GGUF file is read or written, not at load time (it is optional);
    missing, it is one line saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise RuntimeError(f"{doing} .gguf files needs the gguf package: pip install gguf") from None
    return gguf


# -----------------------------------------------------------------------------
# The header, read with every count, length and offset it claims checked against the bytes that follow
# (the gguf package's own reader loops over a claimed count without bound; the tests use it as reference).

# GGUF's fixed-size metadata value types (uint8 ... float64) as struct formats; 8 is a string, 9 an array.
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
# Array elements in all of a header's metadata: SmolLM2 has 147,205 (tokens, token types, merges), a
# 128k-token vocabulary with its merges about 0.5M. Each becomes a Python object of up to ~60 bytes (from
# a 10-byte string on disk), so the cap, not the file's size, bounds what a hostile header costs: ~250 MB.
MAX_METADATA_ELEMENTS = 1 << 22


def scan_gguf(path):
    """Walk a GGUF file's header with every claim bounded by the file's size, and return (metadata
    {key: value}, as the gguf package's field.contents() gives it, {tensor name: (shape outermost first,
    ggml type, byte range)}) in the file's order.
    Refuses, in one ValueError naming the file: a bad magic or version, a string, array or count longer
    than the bytes left, text that is not UTF-8, more than 4 dimensions, an empty or unknown tensor type,
    tensor data outside the file, misaligned or overlapping, more than MAX_METADATA_ELEMENTS array elements
    in all. Reading the metadata here, not with the gguf package's reader (which parses every field
    element by element: ~3 s for SmolLM2's 49,152 tokens), makes a tokenizer or config from a GGUF cost a
    tenth of a second."""
    gguf = gguf_package()

    def bad(why):
        return ValueError(f"{path}: not a readable GGUF file ({why}); re-download it")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    pos, elements = 0, 0

    def take(fmt):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise bad(f"header cut short at byte {pos}")
        values = struct.unpack_from(fmt, buf, pos)
        pos += n
        return values[0] if len(values) == 1 else values

    def string():
        nonlocal pos
        n = take("<Q")
        if n > size - pos:
            raise bad(f"a string of {n:,} bytes at byte {pos} runs past the end of the file")
        pos += n
        try:
            return bytes(buf[pos - n:pos]).decode("utf-8")
        except UnicodeDecodeError:
            raise bad(f"a string at byte {pos - n} is not UTF-8") from None

    def value(kind, depth=0):
        nonlocal pos, elements
        if kind in GGUF_SCALARS:
            return take("<" + GGUF_SCALARS[kind])
        if kind == GGUF_STRING:
            return string()
        if kind != GGUF_ARRAY or depth > 0:
            raise bad(f"metadata value type {kind} at byte {pos}")
        item, count = take("<I"), take("<Q")
        # an element takes at least this many bytes (a string: its 8-byte length)
        least = struct.calcsize("<" + GGUF_SCALARS[item]) if item in GGUF_SCALARS else 8
        if count * least > size - pos:
            raise bad(f"an array claims {count:,} elements, more than the {size - pos:,} bytes left hold")
        elements += count
        if elements > MAX_METADATA_ELEMENTS:
            raise bad(f"{elements:,} metadata array elements, more than the {MAX_METADATA_ELEMENTS:,} "
                      "handtune reads")
        if item in GGUF_SCALARS:  # numbers: one read of the whole array
            pos += count * least
            return np.frombuffer(buf, "<" + GGUF_SCALARS[item], count, pos - count * least).tolist()
        return [value(item, depth + 1) for _ in range(count)]

    if take("<4s") != b"GGUF":
        raise bad("no GGUF magic")
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    if version not in (2, 3):
        raise bad(f"version {version}; handtune reads versions 2 and 3")
    if n_kv * 13 > size - pos or n_tensors * 29 > size - pos:  # the smallest entry of each kind
        raise bad(f"{n_kv:,} metadata entries and {n_tensors:,} tensors cannot fit in {size:,} bytes")
    alignment, metadata = gguf.GGUF_DEFAULT_ALIGNMENT, {}
    for _ in range(n_kv):
        key, kind = string(), take("<I")
        v = metadata[key] = value(kind)
        if key == "general.alignment":
            if not (isinstance(v, int) and 1 <= v <= 1 << 20 and v & (v - 1) == 0):
                raise bad(f"general.alignment {v!r} is not a power of two")
            alignment = v
    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), take("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise bad(f"tensor {name!r} has {n_dims} dimensions")
        dims = [take("<Q") for _ in range(n_dims)]
        kind, offset = take("<I"), take("<Q")
        infos.append((name, dims, kind, offset))
    data_start = pos + (-pos % alignment)
    tensors, spans = {}, []
    for name, dims, kind, offset in infos:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise bad(f"tensor {name!r} has unknown type {kind}") from None
        n = math.prod(dims)
        if n == 0 or n % block or dims[0] % block:
            raise bad(f"tensor {name!r} has shape {dims}, not whole blocks of {block}")
        nbytes = n // block * type_size
        begin = data_start + offset
        if offset % alignment or begin + nbytes > size:
            raise bad(f"tensor {name!r}: {nbytes:,} bytes at offset {offset:,} are misaligned or run "
                      f"past the end of the {size:,}-byte file")
        spans.append((begin, begin + nbytes, name))
        tensors[name] = (tuple(reversed(dims)), kind, (begin, begin + nbytes))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise bad(f"tensors {a!r} and {b!r} overlap")
    if len(tensors) != len(infos):
        raise bad("two tensors share a name")
    return metadata, tensors


def gguf_metadata(path):
    """(metadata {key: value}, tensor names) of a GGUF file, read by scan_gguf's bounded walk of its header;
    no tensor is read."""
    refuse_lfs_pointer(path)
    metadata, tensors = scan_gguf(path)
    return metadata, set(tensors)


def gguf_config(path, metadata, tensor_names):
    """The config.json-style dict of a llama or gpt2 GGUF file (its header's metadata and tensor names), as
    transformers' LlamaConfig or GPT2Config would write it."""

    def meta(key, default=None):
        if key not in metadata:
            if default is None:
                raise ValueError(f"{path}: GGUF metadata has no {key}")
            return default
        return metadata[key]

    def f32(x):  # GGUF stores floats as float32: 1e-5 arrives as 9.99999975e-06; keep the shortest decimal
        return float(str(np.float32(x)))

    arch = meta("general.architecture")
    if arch not in ("llama", "gpt2"):
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama' and 'gpt2')")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens) if tokens is not None else meta(f"{arch}.vocab_size")
    n_head, n_embd = meta(f"{arch}.attention.head_count"), meta(f"{arch}.embedding_length")
    if arch == "gpt2":
        n_inner = meta("gpt2.feed_forward_length")
        return {"model_type": "gpt2", "vocab_size": vocab_size, "n_positions": meta("gpt2.context_length"),
                "n_embd": n_embd, "n_layer": meta("gpt2.block_count"), "n_head": n_head,
                "n_inner": None if n_inner == 4 * n_embd else n_inner,  # GPT2Config's None means 4 * n_embd
                "layer_norm_epsilon": f32(meta("gpt2.attention.layer_norm_epsilon"))}
    for key, plain in (("llama.rope.scaling.type", "none"), ("llama.expert_count", 0)):
        if meta(key, plain) != plain:
            raise ValueError(f"{path}: {key} = {meta(key)!r} is not supported (plain Llama only)")
    if meta("llama.rope.dimension_count", n_embd // n_head) != n_embd // n_head:
        raise ValueError(f"{path}: RoPE on {meta('llama.rope.dimension_count')} of {n_embd // n_head} head "
                         "channels (partial rotary) is not supported")
    d = {"model_type": "llama", "max_position_embeddings": meta("llama.context_length"), "vocab_size": vocab_size,
         "num_hidden_layers": meta("llama.block_count"), "num_attention_heads": n_head, "hidden_size": n_embd,
         "num_key_value_heads": meta("llama.attention.head_count_kv", n_head),
         "intermediate_size": meta("llama.feed_forward_length"),
         "rope_theta": f32(meta("llama.rope.freq_base", 10000.0)),
         "rms_norm_eps": f32(meta("llama.attention.layer_norm_rms_epsilon")),
         "tie_word_embeddings": "output.weight" not in tensor_names}
    return d


def read_gguf_config(path):
    """gguf_config of a GGUF file. Cheap: only the header is read."""
    return gguf_config(path, *gguf_metadata(path))


def load_gguf(path):
    """Read a GGUF file of architecture "llama" or "gpt2" into (config.json-style dict, state dict under
    LlamaForCausalLM's or GPT2LMHeadModel's names and layouts, fp32): q_proj/k_proj rows back in Hugging
    Face's order, GPT-2's Conv1D weights back to (in, out)."""
    from tqdm import tqdm

    gguf = gguf_package()  # one line if it is missing
    refuse_lfs_pointer(path)
    metadata, tensors = scan_gguf(path)
    config, arch = gguf_config(path, metadata, set(tensors)), metadata["general.architecture"]
    raw = np.memmap(path, np.uint8, mode="r")  # nothing is read until a tensor's bytes are used
    sd = {}
    for name, (shape, kind, (begin, end)) in tqdm(tensors.items(), desc=f"dequantizing "
                                                  f"{os.path.basename(path)}", leave=False):
        # shape is (out, in), nn.Linear's and nn.Embedding's order (ggml lists dimensions innermost first)
        # (rows, bytes per row): scan_gguf checked that a row is whole blocks, as dequantize expects
        rows = raw[begin:end].reshape(math.prod(shape[:-1]), -1)
        # torch.tensor copies: F32 tensors come back as read-only views of the memory-mapped file
        w = torch.tensor(gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(kind)), dtype=torch.float32)
        w = w.reshape(shape)
        if arch == "llama" and name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = config["num_key_value_heads" if ".attn_k." in name else "num_attention_heads"]
            w = unpermute_gguf_qk(w, heads)
        if arch == "gpt2" and name.startswith("blk.") and w.dim() == 2:
            w = w.t()  # Hugging Face's GPT-2 keeps every block matrix as Conv1D (in, out)
        sd[rename(name, GGUF, HF, arch)] = w
    return config, sd


def permute_gguf_qk(w, n_head):
    """What llama.cpp's converter does to a q_proj or k_proj weight (n_head * hs, in): interleave each head's
    two halves of rows (see unpermute_gguf_qk, its inverse). Also right for a LoRA B (n_head * hs, r)."""
    out_features, in_features = w.shape
    hs = out_features // n_head
    return (w.reshape(n_head, 2, hs // 2, in_features)  # (nh, 2, hs/2, in): Hugging Face's halves
             .transpose(1, 2)  # (nh, hs/2, 2, in): row 2i + j is half j's row i
             .reshape(out_features, in_features))


def unpermute_gguf_qk(w, n_head):
    """Undo llama.cpp's converter on a q_proj or k_proj weight (n_head * hs, in).

    Hugging Face rotates channel pairs (i, i + hs/2) of each head (rotate_half); llama.cpp's kernel rotates
    neighbours (2i, 2i + 1). Its converter therefore reorders each head's rows: the row it stores at 2i + j is
    Hugging Face's row j * hs/2 + i (j = 0, 1), i.e. the halves are interleaved. Reading them back is the
    inverse: view a head's rows as (hs/2, 2) and transpose to (2, hs/2)."""
    out_features, in_features = w.shape
    hs = out_features // n_head
    return (w.reshape(n_head, hs // 2, 2, in_features)  # (nh, hs/2, 2, in): rows as llama.cpp stored them
             .transpose(1, 2)  # (nh, 2, hs/2, in): first half, then second half, as Hugging Face has them
             .reshape(out_features, in_features))
