"""plumbing/gguf_export.py: what handtune trained, written as llama.cpp GGUF files: a whole model (GPT-2 or
Llama/SmolLM2), or a LoRA adapter alone that llama.cpp applies on top of the base model's GGUF at load time.

A GGUF file is metadata (the architecture's numbers, the tokenizer, the chat template) followed by tensors
under llama.cpp's names. The gguf package (optional, as for reading) does the byte layout; what is ours to get
right is the meaning: the names (plumbing/hf_format.py's tables), the q/k row order llama.cpp's RoPE kernel
expects (plumbing/gguf_io.permute_gguf_qk), and a tokenizer plus chat template that give llama.cpp the very
token ids handtune trained on; otherwise the served model rambles past its stop token. The chat
template and its special tokens come from the caller (scripts/export_gguf.py writes them from data.py's
templates):

    python scripts/export_gguf.py --model M [--adapter A] --out out.gguf [--dtype f16]  # merged with A
    python scripts/export_gguf.py --model M --adapter A --adapter-only --out adapter.gguf   # A alone
"""

import os

import torch

from plumbing.files import atomic_file
from plumbing.gguf_io import gguf_package, permute_gguf_qk
from plumbing.hf_format import GGUF, OURS, config_dict, rename
from plumbing.tokenizer_files import GGUF_TOKENIZERS, _byte_decoder

FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32}  # general.file_type: llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / BF16


# -----------------------------------------------------------------------------
# The tokenizer: tiktoken keeps ranks, GGUF (like Hugging Face) keeps tokens + merges


def bpe_merges(enc):
    """(tokens, merges) of a byte-level BPE tiktoken Encoding, in GGUF's spelling: tokens[i] is id i in GPT-2's
    printable byte alphabet (special tokens as their text), merges are "a b" strings in priority order.

    tiktoken stores no merges, only each token's rank (= its id here). Merge n is recovered by running BPE on
    token n's bytes with the merges ranked below n: it stops at the two parts whose merge makes token n."""
    alphabet = {b: c for c, b in _byte_decoder().items()}
    specials = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    raw = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]
    ranks = {b: i for i, b in enumerate(raw) if i not in specials}
    tokens = [raw[i].decode() if i in specials else "".join(alphabet[b] for b in raw[i]) for i in range(enc.n_vocab)]
    merges = []
    for i, token in enumerate(raw):
        if i in specials or len(token) == 1:
            continue
        parts = [token[j:j + 1] for j in range(len(token))]
        while len(parts) > 2:  # merge the lowest-ranked adjacent pair, as encoding does, until two parts remain
            pair_ranks = [ranks.get(a + b, enc.n_vocab) for a, b in zip(parts, parts[1:])]
            j = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[j] >= i:
                raise ValueError(f"token {i} ({token!r}) is not reachable by merges ranked below it")
            parts[j:j + 2] = [parts[j] + parts[j + 1]]
        merges.append(" ".join("".join(alphabet[b] for b in p) for p in parts))
    return tokens, merges


def add_tokenizer(writer, enc, chat):
    """The tokenizer, its special ids and its chat template, as llama.cpp reads them (tokenizer.ggml.*).
    chat: {"template": Jinja text, "special_tokens": {role (bos, eos, eot, pad, unk): token text}}."""
    gguf = gguf_package("writing")
    family = enc.name
    (model, pre), = [kind for kind, (name, _) in GGUF_TOKENIZERS.items() if name == family]
    tokens, merges = bpe_merges(enc)
    specials = set(enc.special_tokens_set)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    for role, text in chat["special_tokens"].items():
        getattr(writer, f"add_{role}_token_id")(enc.encode_single_token(text))
    writer.add_add_bos_token(False)  # both templates put every special token in themselves
    writer.add_chat_template(chat["template"])


# -----------------------------------------------------------------------------
# Tensors


def add_tensor(writer, name, w, dtype="f32"):
    """One tensor under its GGUF name. Matrices in dtype; vectors (norms, biases) always F32, as llama.cpp's
    converter writes them."""
    gguf = gguf_package("writing")
    w = w.detach().float().cpu().contiguous()
    if w.dim() < 2 or dtype == "f32":
        writer.add_tensor(name, w.numpy())
    elif dtype == "f16":
        writer.add_tensor(name, w.half().numpy())
    else:  # numpy has no bfloat16: hand over the raw 16-bit patterns and say what they are
        writer.add_tensor(name, w.bfloat16().view(torch.int16).numpy(), raw_dtype=gguf.GGMLQuantizationType.BF16)


def gguf_tensor(config, name, w):
    """(GGUF name, tensor) for one of our tensors: renamed, and q/k rows permuted for llama.cpp's RoPE."""
    gguf_name = rename(name, OURS, GGUF, config.arch)
    if config.arch == "llama" and gguf_name.endswith((".attn_q.weight", ".attn_k.weight")):
        w = permute_gguf_qk(w, config.n_head if ".attn_q." in gguf_name else config.kv_heads)
    return gguf_name, w


def _write(path, writer):
    with atomic_file(path) as tmp:  # a crash mid-write leaves no half file under the real name
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


# -----------------------------------------------------------------------------
# The two files


def write_gguf_model(path, config, state_dict, enc, chat, dtype="f16", name="handtune"):
    """Write a GPT (its GPTConfig, its own state_dict with LoRA merged, its tiktoken tokenizer and chat
    template: see add_tokenizer) as a GGUF file llama.cpp runs: architecture "gpt2" or "llama", matrices
    in dtype ("f32", "f16" or "bf16")."""
    gguf = gguf_package("writing")
    c = config
    config_dict(c)  # refuses switch combinations neither family has, before writing anything
    if c.arch == "llama" and c.bias:
        raise ValueError("a Llama with biases has no llama.cpp export here (SmolLM2 has none)")
    if enc.n_vocab != c.vocab_size:
        raise ValueError(f"the tokenizer has {enc.n_vocab} tokens but the model {c.vocab_size} embeddings; "
                         "llama.cpp needs one token per embedding row")
    writer = gguf.GGUFWriter(None, c.arch)  # writes general.architecture
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.mlp_width)
    writer.add_head_count(c.n_head)
    if c.arch == "llama":
        writer.add_head_count_kv(c.kv_heads)
        writer.add_rope_dimension_count(c.head_size)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_layer_norm_rms_eps(c.layer_norm_epsilon)
        writer.add_vocab_size(c.vocab_size)
    else:
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
    add_tokenizer(writer, enc, chat)
    for k, w in state_dict.items():
        if k == "lm_head.weight" and c.tie_embeddings:
            continue  # tied: llama.cpp reuses token_embd as the head when there is no output.weight
        add_tensor(writer, *gguf_tensor(c, k, w), dtype)
    _write(path, writer)


def write_gguf_adapter(path, config, layers):
    """Write LoRA layers [(our module name, LoRALinear)] as a llama.cpp LoRA adapter: general.type "adapter",
    adapter.lora.alpha, and per layer W its A (r, in) and B (out, r) as W's GGUF name + ".lora_a" / ".lora_b",
    F32. llama.cpp adds (alpha / r) * B A x to W x, the same update as lora.py's."""
    gguf = gguf_package("writing")
    if not layers:
        raise ValueError("no LoRA layers to export: load an adapter (--adapter DIR) first")
    alphas = {layer.alpha for _, layer in layers}
    if len(alphas) != 1:
        raise ValueError(f"the LoRA layers have different alphas {sorted(alphas)}; llama.cpp has one per adapter")
    writer = gguf.GGUFWriter(None, config.arch)  # llama.cpp refuses an adapter of another architecture
    writer.add_type("adapter")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alphas.pop()))
    for name, layer in layers:
        gguf_name, B = gguf_tensor(config, f"{name}.weight", layer.lora_B)  # B's rows are W's rows: same permutation
        add_tensor(writer, f"{gguf_name}.lora_a", layer.lora_A)
        add_tensor(writer, f"{gguf_name}.lora_b", B)
    _write(path, writer)
