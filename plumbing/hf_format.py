"""plumbing/hf_format.py: Hugging Face's config.json and the Llama family's tensor names, as plain data.

model.py builds a GPTConfig from config_kwargs() and writes config.json with config_dict(); the GPT-2 key
mapping (the Conv1D transpose) stays in model.py, where a learner reads it. Llama checkpoints name the same
modules differently in three places (ours, transformers' LlamaForCausalLM, llama.cpp's GGUF): LLAMA_NAMES is
that table (GPT2_NAMES is GPT-2's, for GGUF) and rename() translates between its columns. Nothing here
imports the core files.
"""

import re

import torch

# Fields transformers fills in when a config.json leaves them out (GPT2Config() and LlamaConfig() defaults;
# a test compares): a file that transformers opens opens here too.
GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                 "layer_norm_epsilon": 1e-5}
LLAMA_DEFAULTS = {"vocab_size": 32000, "max_position_embeddings": 2048, "hidden_size": 4096,
                  "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "rms_norm_eps": 1e-6, "rope_theta": 10000.0}


def _check_sizes(d, keys, source):
    """The size and count fields a config's arithmetic uses are positive integers (a crafted file may
    say 0, -1, "768" or 1e400); GPTConfig checks the rest."""
    for k in keys:
        v = d.get(k)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ValueError(f"{source}: {k}={v!r}; it must be a positive integer")


def config_kwargs(d, source="config.json"):
    """(family, GPTConfig keyword arguments) from a config.json dict, GPT-2 or Llama, refusing variants
    handtune does not implement. family "llama" means: add model.LLAMA_SWITCHES."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: not a JSON object")
    if d.get("model_type") == "llama":
        d = {**LLAMA_DEFAULTS, **d}
        _check_sizes(d, ("num_attention_heads", "hidden_size", "num_key_value_heads", "head_dim"), source)
        return "llama", _llama_kwargs(d, source)
    if d.get("model_type") != "gpt2":
        raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, expected 'gpt2' or 'llama'")
    d = {**GPT2_DEFAULTS, **d}
    act = d.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU ('gelu_new')")
    for flag, want in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                       ("scale_attn_weights", True), ("tie_word_embeddings", True)):
        if d.get(flag, want) != want:
            raise ValueError(f"{source}: {flag}={d[flag]} is not supported (GPT-2 uses {want})")
    return "gpt2", dict(block_size=d["n_positions"], vocab_size=d["vocab_size"], n_layer=d["n_layer"],
                        n_head=d["n_head"], n_embd=d["n_embd"], intermediate_size=d.get("n_inner"),
                        layer_norm_epsilon=d["layer_norm_epsilon"])


def _llama_kwargs(d, source):
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (Llama's SwiGLU uses silu)")
    # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters {rope_type, rope_theta}
    rope = dict(d.get("rope_parameters") or {})
    rope_type = rope.pop("rope_type", "default")
    theta = rope.pop("rope_theta", d["rope_theta"])
    if d.get("rope_scaling") or rope_type != "default" or rope:
        raise ValueError(f"{source}: RoPE scaling ({d.get('rope_scaling') or d.get('rope_parameters')}) is "
                         "not supported; only plain RoPE (rope_type 'default')")
    n_head, n_embd = d["num_attention_heads"], d["hidden_size"]
    if d.get("head_dim") not in (None, n_embd // n_head) or n_embd % n_head:
        raise ValueError(f"{source}: head_dim {d.get('head_dim')} != hidden_size / num_attention_heads "
                         f"({n_embd} / {n_head}) is not supported")
    if d.get("attention_bias", False) != d.get("mlp_bias", False):
        raise ValueError(f"{source}: attention_bias={d.get('attention_bias')} with mlp_bias="
                         f"{d.get('mlp_bias')} is not supported (one `bias` switch covers every Linear)")
    return dict(bias=bool(d.get("attention_bias", False)), block_size=d["max_position_embeddings"],
                vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
                n_kv_head=d.get("num_key_value_heads") or n_head, intermediate_size=d["intermediate_size"],
                rope_theta=float(theta) if type(theta) in (int, float) else theta, layer_norm_epsilon=d["rms_norm_eps"],
                dropout=d.get("attention_dropout", 0.0),
                tie_embeddings=d.get("tie_word_embeddings", False))  # LlamaConfig's default is untied


def config_dict(c):
    """The config.json that transformers' GPT2LMHeadModel (c.arch "gpt2") or LlamaForCausalLM ("llama") reads
    back, for a GPTConfig c. Switch combinations neither family has (say, GPT-2 with RoPE) have no such file."""
    switches = (c.norm, c.pos_emb, c.mlp)
    if c.arch == "llama":
        if switches != ("rmsnorm", "rope", "swiglu"):
            raise ValueError(f"no Hugging Face Llama config for norm/pos_emb/mlp = {switches}")
        return {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": c.vocab_size, "max_position_embeddings": c.block_size,
            "hidden_size": c.n_embd, "intermediate_size": c.mlp_width, "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads,
            "head_dim": c.head_size, "hidden_act": "silu", "rms_norm_eps": c.layer_norm_epsilon,
            "rope_theta": c.rope_theta, "rope_scaling": None,  # transformers 4.x reads these two,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},  # 5.x this one
            "attention_bias": c.bias, "mlp_bias": c.bias, "attention_dropout": c.dropout,
            "tie_word_embeddings": c.tie_embeddings, "initializer_range": 0.02,
        }
    if switches != ("layernorm", "learned", "gelu") or c.kv_heads != c.n_head or not c.tie_embeddings:
        raise ValueError(f"no Hugging Face GPT-2 config for norm/pos_emb/mlp = {switches}, "
                         f"n_kv_head {c.kv_heads}, tie_embeddings {c.tie_embeddings}")
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": c.intermediate_size,
        "activation_function": "gelu_new", "layer_norm_epsilon": c.layer_norm_epsilon,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "bos_token_id": c.vocab_size - 1, "eos_token_id": c.vocab_size - 1,  # <|endoftext|> is the last id
    }


# The Llama family's tensor names, one row per module: ours, Hugging Face LlamaForCausalLM's, llama.cpp GGUF's.
# N stands for the layer number; ".weight" (and ".bias" where a layer has one) follows each name.
OURS, HF, GGUF = 0, 1, 2  # column numbers
LLAMA_NAMES = [
    ("transformer.wte", "model.embed_tokens", "token_embd"),
    ("transformer.h.N.ln_1", "model.layers.N.input_layernorm", "blk.N.attn_norm"),  # RMSNorm
    ("transformer.h.N.attn.q_proj", "model.layers.N.self_attn.q_proj", "blk.N.attn_q"),  # GGUF: rows permuted
    ("transformer.h.N.attn.k_proj", "model.layers.N.self_attn.k_proj", "blk.N.attn_k"),  # GGUF: rows permuted
    ("transformer.h.N.attn.v_proj", "model.layers.N.self_attn.v_proj", "blk.N.attn_v"),
    ("transformer.h.N.attn.o_proj", "model.layers.N.self_attn.o_proj", "blk.N.attn_output"),
    ("transformer.h.N.ln_2", "model.layers.N.post_attention_layernorm", "blk.N.ffn_norm"),  # RMSNorm
    ("transformer.h.N.mlp.gate_proj", "model.layers.N.mlp.gate_proj", "blk.N.ffn_gate"),
    ("transformer.h.N.mlp.up_proj", "model.layers.N.mlp.up_proj", "blk.N.ffn_up"),
    ("transformer.h.N.mlp.down_proj", "model.layers.N.mlp.down_proj", "blk.N.ffn_down"),
    ("transformer.ln_f", "model.norm", "output_norm"),  # RMSNorm
    ("lm_head", "lm_head", "output"),  # only in untied checkpoints
]
# GPT-2's, in the same columns: ours are Hugging Face's, and llama.cpp stores the Conv1D weights as (out, in).
GPT2_NAMES = [(ours, ours, gguf) for ours, gguf in [
    ("transformer.wte", "token_embd"), ("transformer.wpe", "position_embd"),
    ("transformer.h.N.ln_1", "blk.N.attn_norm"), ("transformer.h.N.attn.c_attn", "blk.N.attn_qkv"),
    ("transformer.h.N.attn.c_proj", "blk.N.attn_output"), ("transformer.h.N.ln_2", "blk.N.ffn_norm"),
    ("transformer.h.N.mlp.c_fc", "blk.N.ffn_up"), ("transformer.h.N.mlp.c_proj", "blk.N.ffn_down"),
    ("transformer.ln_f", "output_norm"), ("lm_head", "output")]]
NAMES = {"llama": LLAMA_NAMES, "gpt2": GPT2_NAMES}


def rename(key, src, dst, arch="llama"):
    """Translate a tensor name from column src of NAMES[arch] to column dst, e.g.
    rename("blk.3.attn_q.weight", GGUF, HF) -> "model.layers.3.self_attn.q_proj.weight". Unknown names come
    back unchanged (and then fail the missing/unexpected check with their own name)."""
    module, _, param = key.rpartition(".")  # "blk.3.attn_q", "weight"
    layer = re.search(r"\.(\d+)\.", module)  # the layer number, if any
    template = module if layer is None else module[:layer.start()] + ".N." + module[layer.end():]
    table = {row[src]: row[dst] for row in NAMES[arch]}
    if template not in table:
        return key
    out = table[template] if layer is None else table[template].replace(".N.", f".{layer.group(1)}.")
    return f"{out}.{param}"


def hf_name(arch, name):
    """Our module name -> the same module's name in the Hugging Face model. GPT2LMHeadModel's names are ours;
    LlamaForCausalLM's come from LLAMA_NAMES (transformer.h.3.attn.q_proj -> model.layers.3.self_attn.q_proj).
    Names outside that table (a block, an attention module) come back unchanged."""
    if arch == "llama":
        return rename(name + ".weight", OURS, HF).removesuffix(".weight")
    return name


def llama_weights(sd, tied, source):
    """A LlamaForCausalLM state dict minus what is not a weight, and with a stored head dropped when the
    config ties it to the embedding (after checking that it is the embedding)."""
    # Not weights: the RoPE frequency buffers some older transformers versions saved with the model.
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if tied and "lm_head.weight" in sd:  # some tied checkpoints store the head anyway: it must be the embedding
        if not torch.equal(sd.pop("lm_head.weight"), sd.get("model.embed_tokens.weight")):
            raise ValueError(f"{source}: lm_head.weight differs from model.embed_tokens.weight, but the "
                             "config ties them (tie_word_embeddings)")
    return sd


def check_shapes(expected, sd, source, hint):
    """Refuse sd unless it has exactly the keys of expected {name: shape}, each of that shape: one clear error
    instead of a silently half-loaded model. hint says what a mismatch probably means."""
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: {hint}: missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
                         f"unexpected keys {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise ValueError(f"{source}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(shape)} ({hint})")
