"""plumbing/gguf_io.py: llama.cpp's GGUF files (Llama and GPT-2), read into Hugging Face's terms (config.json,
tensor names).

A GGUF file holds metadata key/values, then tensors, many quantized in blocks (Q4_1: 32 weights share a
scale and a minimum, 4 bits each). The gguf package (an optional dependency, imported only inside the
functions that read or write GGUF) parses the file and dequantizes; the naming, the config and the q/k row
order are ours to get right. model.py turns the result into a GPT exactly as it would a Hugging Face
directory. plumbing/gguf_export.py writes the other way.
"""

import os

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


def open_gguf(path):
    """A gguf.GGUFReader over path. The file is memory-mapped: nothing is read until a field or tensor is used."""
    gguf = gguf_package()
    refuse_lfs_pointer(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the parser raises assorted errors on a damaged file
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def read_gguf_config(path):
    """(config.json-style dict of a llama or gpt2 GGUF file, as transformers' LlamaConfig or GPT2Config would
    write it, the open gguf.GGUFReader). Cheap: the file is memory-mapped and no tensor is read."""
    reader = open_gguf(path)

    def meta(key, default=None):
        field = reader.fields.get(key)
        if field is None:
            if default is None:
                raise ValueError(f"{path}: GGUF metadata has no {key}")
            return default
        return field.contents()

    def f32(x):  # GGUF stores floats as float32: 1e-5 arrives as 9.99999975e-06; keep the shortest decimal
        return float(str(np.float32(x)))

    arch = meta("general.architecture")
    if arch not in ("llama", "gpt2"):
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama' and 'gpt2')")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens.data) if tokens is not None else meta(f"{arch}.vocab_size")
    n_head, n_embd = meta(f"{arch}.attention.head_count"), meta(f"{arch}.embedding_length")
    if arch == "gpt2":
        n_inner = meta("gpt2.feed_forward_length")
        return {"model_type": "gpt2", "vocab_size": vocab_size, "n_positions": meta("gpt2.context_length"),
                "n_embd": n_embd, "n_layer": meta("gpt2.block_count"), "n_head": n_head,
                "n_inner": None if n_inner == 4 * n_embd else n_inner,  # GPT2Config's None means 4 * n_embd
                "layer_norm_epsilon": f32(meta("gpt2.attention.layer_norm_epsilon"))}, reader
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
         "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors)}
    return d, reader


def load_gguf(path):
    """Read a GGUF file of architecture "llama" or "gpt2" into (config.json-style dict, state dict under
    LlamaForCausalLM's or GPT2LMHeadModel's names and layouts, fp32): q_proj/k_proj rows back in Hugging
    Face's order, GPT-2's Conv1D weights back to (in, out)."""
    from tqdm import tqdm

    config, reader = read_gguf_config(path)  # says "pip install gguf" in one line if the package is missing
    import gguf
    arch = config["model_type"]
    sd = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {os.path.basename(path)}", leave=False):
        # ggml lists dimensions innermost first (ne = [in, out]); numpy and torch list them outermost first
        shape = tuple(int(n) for n in reversed(t.shape))  # (out, in), nn.Linear's and nn.Embedding's order
        # torch.tensor copies: F32 tensors come back as read-only views of the memory-mapped file
        w = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type), dtype=torch.float32).reshape(shape)
        if arch == "llama" and t.name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = config["num_key_value_heads" if ".attn_k." in t.name else "num_attention_heads"]
            w = unpermute_gguf_qk(w, heads)
        if arch == "gpt2" and t.name.startswith("blk.") and w.dim() == 2:
            w = w.t()  # Hugging Face's GPT-2 keeps every block matrix as Conv1D (in, out)
        sd[rename(t.name, GGUF, HF, arch)] = w
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
