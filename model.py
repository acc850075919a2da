"""model.py: GPT-2 from scratch, numerically the same model as OpenAI's; the same class grows a
Llama-style block (SmolLM2) through four config switches.

A decoder-only transformer is token + position embeddings, N identical blocks of (LayerNorm ->
causal self-attention -> residual, LayerNorm -> MLP -> residual), a final LayerNorm and a linear
head that shares its weight with the token embedding. Llama changes four parts and keeps the rest:
RMSNorm for LayerNorm, rotary position embeddings (RoPE) for the learned table, a SwiGLU MLP for
the GELU one, and fewer key/value heads than query heads (grouped-query attention). Module names
mirror GPT-2's Hugging Face checkpoint keys, so loading GPT-2 is a readable one-to-one copy with a
shape check per tensor; Llama checkpoints (Hugging Face or llama.cpp's GGUF) go through a name
table in plumbing/hf_format.py.

The file reads in four parts: the GPT-2 model and its loss, the four Llama switches, KV-cache
generation, and loading/saving Hugging Face checkpoints. It is a model file: torch and its loading
helpers only. To run it, see scripts/sample.py (sample text, or write a tiny random GPT-2) and
scripts/export_gguf.py (llama.cpp):

    python scripts/sample.py --model gpt2 --prompt "The meaning of life is"  # download, sample
    python scripts/sample.py --model smollm2-135m-instruct-gguf --prompt "Hi" # SmolLM2, offline
    python scripts/sample.py --save-random out/tiny                          # a tiny random GPT-2
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from plumbing.files import atomic_write_text, refuse_lfs_pointer
from plumbing.gguf_io import load_gguf
from plumbing.hf_format import HF, OURS, check_shapes, config_dict, config_kwargs, llama_weights, rename
from plumbing.hub import read_config_dict, resolve_pretrained
from plumbing.safetensors_io import load_safetensors, save_safetensors

# Targets equal to IGNORE_INDEX contribute no loss (prompt tokens, padding): the loss
# below skips them. The value is PyTorch's cross_entropy default; everything in
# handtune refers to it by this name.
IGNORE_INDEX = -100


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class GPTConfig:
    # maximum context length (learned position embeddings, or RoPE positions)
    block_size: int = 1024
    vocab_size: int = 50257  # GPT-2's BPE vocabulary: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention (query) heads per block; n_embd must divide evenly
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # on attention, residual and embeddings (0 for fine-tuning from GPT-2)
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2 has them; Llama has none)
    layer_norm_epsilon: float = 1e-5  # eps of every LayerNorm / RMSNorm (GPT-2 and SmolLM2: 1e-5)
    # Llama-style switches: GPT-2's by default; a Llama flips them together (LLAMA_SWITCHES below).

    # arch: module names and Hugging Face format, "gpt2" (fused
    # attn.c_attn) or "llama" (q/k/v/o_proj)
    arch: str = "gpt2"
    # norm: "layernorm" (GPT-2: subtract the mean, divide by the std,
    # scale + bias) or "rmsnorm" (Llama)
    norm: str = "layernorm"
    # pos_emb: "learned" (GPT-2: a wpe table added to the input) or "rope" (Llama: rotate q and k)
    pos_emb: str = "learned"
    # mlp: "gelu" (GPT-2: c_proj(gelu(c_fc(x)))) or "swiglu" (Llama: down(silu(gate(x)) * up(x)))
    mlp: str = "gelu"
    n_kv_head: int | None = None  # key/value heads; None = n_head. Fewer: grouped-query attention
    intermediate_size: int | None = None  # hidden width of the MLP; None = 4 * n_embd (GPT-2's)
    rope_theta: float = 10000.0  # RoPE base: pair i turns by position * rope_theta^(-2i/head_size)
    # lm_head shares wte's weight (GPT-2, SmolLM2); False: its own matrix
    tie_embeddings: bool = True

    def __post_init__(self):
        # Sizes and counts positive integers, eps and the RoPE base finite and positive: a config file
        # from elsewhere is checked here, before any tensor is sized by it.
        sizes = ["block_size", "vocab_size", "n_layer", "n_head", "n_embd"]
        sizes += [k for k in ("n_kv_head", "intermediate_size") if getattr(self, k) is not None]
        for name in sizes:
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"GPTConfig.{name}={v!r}: must be a positive integer")
        for name in ("layer_norm_epsilon", "rope_theta"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf):
                raise ValueError(f"GPTConfig.{name}={v!r}: must be a finite positive number")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"GPTConfig.dropout={self.dropout!r}: must be in [0, 1)")
        for name, allowed in (("arch", ("gpt2", "llama")), ("norm", ("layernorm", "rmsnorm")),
                              ("pos_emb", ("learned", "rope")), ("mlp", ("gelu", "swiglu"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)!r}: "
                                 f"choose one of {', '.join(allowed)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig: n_head {self.n_head} is not a multiple of n_kv_head "
                             f"{self.kv_heads} (each key/value head serves the same number of query heads)")
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
        """A config from a Hugging Face config.json dict, GPT-2 or Llama
        (plumbing/hf_format.py reads it)."""
        family, kwargs = config_kwargs(d, source)
        try:
            return cls(**{**(LLAMA_SWITCHES if family == "llama" else {}), **kwargs})
        except ValueError as e:  # say which file holds the impossible number
            raise ValueError(f"{source}: {e}") from None


# The switches that turn GPT-2 into a Llama; every Llama config (presets,
# config.json, GGUF) sets them all.
LLAMA_SWITCHES = dict(arch="llama", norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False)
# Hugging Face's SmolLM2-135M (base and chat-tuned: same shape), a Llama: 9
# query heads share 3 K/V heads.
SMOLLM2_135M = GPTConfig(**LLAMA_SWITCHES, block_size=8192, vocab_size=49152, n_layer=30, n_head=9,
                         n_kv_head=3, n_embd=576, intermediate_size=1536, rope_theta=100000.0)
PRESETS = {
    # The four sizes OpenAI released. Only width and depth differ.
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "smollm2-135m": SMOLLM2_135M,  # 135M
    "smollm2-135m-instruct": SMOLLM2_135M,
}


# -----------------------------------------------------------------------------
# The GPT-2 model: attention, MLP, block, the whole stack, and the loss at trained positions


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention: each position mixes the values of itself and the positions
    before it, weighted by softmax(q . k / sqrt(hs)). With n_kv_head < n_head it is grouped-query
    attention (a Llama switch): each key/value head serves n_head / n_kv_head query heads, which
    shrinks the K/V projections and the KV cache."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        q_width, kv_width = config.n_head * config.head_size, config.kv_heads * config.head_size
        self.fused = config.arch == "gpt2"
        if self.fused:
            # query, key and value for all heads in one matmul, as GPT-2's checkpoint stores them
            self.c_attn = nn.Linear(config.n_embd, q_width + 2 * kv_width, bias=config.bias)
            self.c_proj = nn.Linear(q_width, config.n_embd, bias=config.bias)
        else:
            # Llama stores them separately (under GQA k and v are
            # narrower than q); the math is the same
            self.q_proj = nn.Linear(config.n_embd, q_width, bias=config.bias)
            self.k_proj = nn.Linear(config.n_embd, kv_width, bias=config.bias)
            self.v_proj = nn.Linear(config.n_embd, kv_width, bias=config.bias)
            self.o_proj = nn.Linear(q_width, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, cache=None, layer=0, rope=None, mask=None):
        B, T, C = x.size()  # batch, time, channels (n_embd)
        # query heads, K/V heads, head size
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        if self.fused:
            q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            cos, sin = rope  # each (T, hs), for this chunk's positions (after any cached tokens)
            # rotate before caching: a cached key keeps the rotation of
            # the position it was computed at
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nkv, S, hs): the S - T cached tokens come first
        if nkv != nh:
            # GQA: query head j reads K/V head j // (nh // nkv), so
            # repeat each K/V head nh // nkv times
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hs)
        S = k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        # no earlier tokens, no padding: the fused kernel's causal shortcut
        if S == T and mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # Footgun: is_causal=True aligns the triangle to the top-left, which is
            # wrong once T < S. Query i is the token at position S - T + i and may see
            # keys 0 .. S - T + i: shift it.
            # (T, S)
            allowed = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            if mask is not None:
                # Never attend to padding; a padding query sees itself
                # (an all -inf row would be NaN).
                itself = torch.eye(S, dtype=torch.bool, device=x.device)[S - T:]  # (T, S)
                allowed = allowed & (mask[:, None, None, :] | itself)  # (B, 1, T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        # the heads side by side again: (B, nh, T, hs) -> (B, T, nh, hs) -> (B, T, C)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y) if self.fused else self.o_proj(y))


class MLP(nn.Module):
    """GPT-2's MLP: c_proj(gelu(c_fc(x)))."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias)
        # GPT-2 was trained with the tanh approximation of GELU ("gelu_new" in
        # transformers); the exact erf GELU differs by up to ~1e-3 per activation, enough to
        # break logits parity with OpenAI's.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config) if config.mlp == "gelu" else SwiGLU(config)

    def forward(self, x, cache=None, layer=0, rope=None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, layer, rope, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


# The projections that write into the residual stream; GPT-2's init scales them down with depth.
RESIDUAL_PROJECTIONS = ("c_proj.weight", "o_proj.weight", "down_proj.weight")


class GPT(nn.Module):
    """The whole model: ids (B, T) -> embeddings -> n_layer blocks ->
    final norm -> logits (B, T, V).

    trunk() runs everything up to the output head; forward() adds the head and, given targets, the
    loss at the trained positions only. Generation (generate, stream) and checkpoint loading
    (from_pretrained, save_pretrained) are functions further down this file."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embeddings
        if config.pos_emb == "learned":  # RoPE has no table: it rotates queries and keys instead
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # position embeddings
        modules.update(drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                       ln_f=make_norm(config))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying: the output head is the token embedding matrix (one tensor, two uses).
            self.lm_head.weight = self.transformer.wte.weight
        # GPT-2's init: N(0, 0.02) everywhere, zero biases, and the projections that write into the
        # residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth.
        # Norm weights start at 1.
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
        """Parameter count, the tied wte/lm_head once; the position table
        (if any) left out by default."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def trunk(self, idx, cache=None, mask=None):
        """Token ids (B, T) -> final hidden states (B, T, C), before the output head.

        mask (B, cached + T): False at the left padding of prompts of different lengths batched
        together (left, so that every row's next token comes from the last column): never
        attended to, and not counted in positions. cache: the KVCache of generation (below),
        holding the earlier tokens."""
        B, T = idx.size()  # batch, time
        cfg = self.config
        # position of idx[:, 0]: after the cached tokens
        start = 0 if cache is None else cache.length()
        if start + T > cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {cfg.block_size}")
        if mask is None:
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        else:
            # each row counts only its own tokens: left padding does not push the positions along
            pos = (mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, start:]  # (B, T)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if cfg.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)  # (B, T, C)
        else:
            rope = rope_cos_sin(pos, cfg.head_size, cfg.rope_theta)  # each (T, hs) or (B, T, hs)
            if mask is not None:
                rope = tuple(r.unsqueeze(1) for r in rope)  # (B, 1, T, hs): the same for every head
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer, rope, mask)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, reduction="mean", n_trained=None):
        """idx (B, T) -> logits (B, T, vocab_size).

        With targets (B, T) (already shifted: targets[b, t] is the token after idx[b, t]) returns
        (logits, loss), where loss is the cross-entropy over positions whose target is not
        IGNORE_INDEX, averaged ("mean") or summed ("sum"), and logits (N, vocab_size) are computed
        only at those N trained positions: response-only SFT trains a fraction of the positions,
        and the head is ~30% of GPT-2 small's FLOPs. With no trained position the loss is 0 (still
        part of the graph), never NaN. n_trained: N if the caller counted it on the host (the
        training batches do): without it, counting reads a number back from the device, which
        makes the host wait for the GPU (a sync) in the middle of every forward.
        """
        x = self.trunk(idx)  # (B, T, C)
        if targets is None:
            return self.lm_head(x)  # (B, T, vocab_size)
        keep = targets.flatten() != IGNORE_INDEX  # (B*T,) bool
        if n_trained is None:
            n_trained = int(keep.sum())  # a device -> host read
        # the trained positions, in order; with their number given, the result's size is known
        # before the kernel runs (x[keep] would have to ask the device)
        rows = torch.nonzero_static(keep, size=n_trained).squeeze(1)  # (N,)
        logits = self.lm_head(x.flatten(0, 1)[rows])  # (N, vocab_size): only the trained positions
        # Cross-entropy in fp32 even under autocast: a 50k-way softmax in bf16 loses precision.
        loss = F.cross_entropy(logits.float(), targets.flatten()[rows], reduction="sum")
        if reduction == "mean":
            loss = loss / max(n_trained, 1)
        elif reduction != "sum":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return logits, loss


# -----------------------------------------------------------------------------
# The four Llama switches: RMSNorm, rotary positions (RoPE), the SwiGLU MLP, and grouped-query
# attention (the n_kv_head lines of CausalSelfAttention above)


def make_norm(config):
    """The block's normalisation layer, as config.norm says: GPT-2's
    LayerNorm or Llama's RMSNorm."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.layer_norm_epsilon)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)


class RMSNorm(nn.Module):
    """Llama's norm: x / sqrt(mean(x^2) + eps) * weight. Unlike LayerNorm it neither
    subtracts the mean nor adds a bias (on zero-mean rows the two agree), so it needs
    one reduction instead of two."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # The mean of squares in fp32 even when x is bf16/fp16 (squares of large
        # activations overflow fp16's 65504), then back to x's dtype before the weight,
        # exactly as transformers' LlamaRMSNorm.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(pos, head_size, theta):
    """RoPE's cos and sin, each (..., T, hs) in fp32, for the positions pos: (T,), or (B, T) when
    each row of a left-padded batch counts its own positions.

    Channel pair (i, i + hs/2) of every query and key head is turned by the angle position *
    theta^(-2i/hs): Hugging Face's "rotate_half" layout. The RoPE paper and llama.cpp pair
    neighbours (2i, 2i + 1) instead, which is why GGUF files store the rows of q_proj/k_proj
    permuted (see plumbing/gguf_io.py)."""
    exponent = torch.arange(0, head_size, 2, dtype=torch.float32, device=pos.device) / head_size
    inv_freq = 1.0 / theta ** exponent  # (hs/2,)
    angles = pos.float().unsqueeze(-1) * inv_freq  # (..., T, hs/2)
    # (..., T, hs): channel i and i + hs/2 share an angle
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each channel pair (x_i, x_{i + hs/2}) of x (B, nh, T, hs) by its position's angle:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). A query at position m and a key at position n
    then score q R(m)^T R(n) k = q R(n - m) k: only their distance matters."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, nh, T, hs): (-x2, x1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)). The gate decides, per hidden unit,
    how much of up(x) passes; three matrices instead of two, so Llama picks a
    narrower hidden width (SmolLM2: 1536 =
    2.67 * 576)."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias)
        self.down_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


# -----------------------------------------------------------------------------
# Generation: one new token a step, reusing the keys and values of the tokens before it


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so generation feeds
    one new token a step. Under grouped-query attention it holds the n_kv_head shared
    heads, before their repetition."""

    def __init__(self, n_layer):
        self.k = [None] * n_layer  # per layer: (B, n_kv_head, S, hs)
        self.v = [None] * n_layer

    def length(self):
        return 0 if self.k[0] is None else self.k[0].size(2)

    def append(self, layer, k, v):
        """Add this step's keys/values (B, nkv, T, hs) to a layer; return
        all of them (B, nkv, S+T, hs)."""
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits."""

    temperature: float = 1.0  # 0: greedy (always the most likely token)
    top_k: int | None = None  # sample among the k most likely tokens only
    top_p: float | None = None  # ... and/or the smallest set whose probability reaches top_p
    seed: int | None = None  # a seeded generator: the same seed, the same sample


GREEDY = Sampling(temperature=0.0)


def sample_next(logits, sampling, generator=None):
    """Pick the next token from logits (B, V): greedy at temperature 0, else sample from the
    softmax of logits / temperature, keeping only the top_k tokens and/or the smallest set whose
    probability is top_p. Returns (B, 1)."""
    if sampling.temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        k = min(sampling.top_k, logits.size(-1))
        kth = torch.topk(logits, k).values[:, -1:]  # (B, 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # the mass before it already reaches top_p
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        # the most likely token stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


@torch.no_grad()
def next_tokens(model, idx, max_new_tokens, sampling, mask=None):
    """Yield (B, 1) next-token tensors, one per step, feeding only the
    newest token through a KV cache."""
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(sampling.seed)
    block = model.config.block_size
    seq, cache, fresh = idx, KVCache(model.config.n_layer), idx
    for _ in range(max_new_tokens):
        if cache is not None and cache.length() + fresh.size(1) > block:
            # The window must slide: every kept token's position changes, so cached
            # keys are stale. From here on recompute the last block_size tokens each
            # step (what nanoGPT always does).
            cache = None
        if cache is None:
            h = model.trunk(seq[:, -block:], mask=None if mask is None else mask[:, -block:])
        else:
            h = model.trunk(fresh, cache, mask)
        # (B, vocab_size): only the last position matters
        logits = model.lm_head(h[:, -1, :]).float()
        nxt = sample_next(logits, sampling, generator)  # (B, 1)
        seq, fresh = torch.cat([seq, nxt], dim=1), nxt
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt, dtype=torch.bool)], dim=1)  # (B, S + 1)
        yield nxt


@torch.no_grad()
def generate(model, idx, max_new_tokens, sampling=GREEDY, stop_token=None, mask=None):
    """Continue idx (B, T); returns (B, T + n): the prompt followed by n <= max_new_tokens new
    tokens. Greedy unless sampling says otherwise. A row that emits stop_token keeps it and is
    padded with it afterwards; generation ends when every row has stopped. mask (B, T): False at
    left padding (see GPT.trunk)."""
    was_training = model.training
    model.eval()
    out, done = [idx], torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for nxt in next_tokens(model, idx, max_new_tokens, sampling, mask):
        if stop_token is not None:
            nxt = torch.where(done.unsqueeze(1), torch.full_like(nxt, stop_token), nxt)
            done |= nxt.squeeze(1) == stop_token
        out.append(nxt)
        if stop_token is not None and bool(done.all()):
            break
    model.train(was_training)
    return torch.cat(out, dim=1)


@torch.no_grad()
def stream(model, idx, max_new_tokens, sampling=GREEDY, stop_token=None):
    """Like generate for one prompt (1, T), but yields each new token id (int) as soon as it exists.
    The stop token, if produced, is yielded last."""
    assert idx.size(0) == 1, "stream() takes a single prompt"
    was_training = model.training
    model.eval()
    try:
        for nxt in next_tokens(model, idx, max_new_tokens, sampling):
            token = int(nxt)
            yield token
            if token == stop_token:
                break
    finally:
        model.train(was_training)


# -----------------------------------------------------------------------------
# Loading and saving Hugging Face checkpoints (and llama.cpp's GGUF): a checked one-to-one copy


# The four weights Hugging Face's GPT-2 stores transposed (Conv1D); all
# other tensors copy as they are.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def match_hf_state_dict(model, sd, source="checkpoint"):
    """(our parameters by name, the checkpoint's tensors in our layout by the same names), after checking
    every name and shape: a Hugging Face state dict (GPT2LMHeadModel's or LlamaForCausalLM's, as
    config.arch says) against model. Nothing is copied, so model may live on the meta device."""
    if model.config.arch == "llama":
        # LlamaForCausalLM's keys <-> ours through plumbing/hf_format.py's LLAMA_NAMES; both sides use
        # nn.Linear, so nothing is transposed.
        tied = model.config.tie_embeddings
        ours = {rename(k, OURS, HF): p for k, p in model.state_dict().items()
                if not (tied and k == "lm_head.weight")}
        sd, family = llama_weights(sd, tied, source), "Llama"
    else:
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}  # the hub's files omit it
        # Not weights: the causal-mask buffers older transformers versions saved with the model.
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if "lm_head.weight" in sd:  # tied: only allowed if it really is the embedding
            if not torch.equal(sd.pop("lm_head.weight"), sd.get("wte.weight")):
                raise ValueError(f"{source}: lm_head.weight differs from wte.weight; GPT-2 ties them")
        # Hugging Face's GPT-2 uses Conv1D, which stores (in, out); nn.Linear stores (out, in).
        sd = {k: (w.t() if k.endswith(CONV1D_WEIGHTS) else w) for k, w in sd.items()}
        ours = {k.removeprefix("transformer."): p for k, p in model.state_dict().items()
                if k != "lm_head.weight"}
        family = "GPT-2"
    expected = {k: p.shape for k, p in ours.items()}
    check_shapes(expected, sd, source, f"not a {family} checkpoint of this shape")
    return ours, sd


def load_hf_state_dict(model, sd, source="checkpoint"):
    """Copy a Hugging Face state dict into model, one tensor at a time, after checking every name and
    shape (match_hf_state_dict)."""
    ours, sd = match_hf_state_dict(model, sd, source)
    with torch.no_grad():
        for k, p in ours.items():
            p.copy_(sd[k])


def load_config(path):
    """The GPTConfig of a resolved checkpoint (config.json, or a .gguf's
    metadata); no weights read."""
    return GPTConfig.from_hf_dict(*read_config_dict(path))


def param_count(c):
    """The parameter count GPT(c) would have (the tied head once), from the config alone."""
    hs_kv = c.kv_heads * c.head_size
    attn = c.n_embd * (c.n_embd + 2 * hs_kv) + c.n_embd * c.n_embd  # q, k, v, and the output projection
    attn += (c.n_embd + 2 * hs_kv + c.n_embd) if c.bias else 0
    mlp = (3 if c.mlp == "swiglu" else 2) * c.n_embd * c.mlp_width
    mlp += (c.mlp_width * (2 if c.mlp == "swiglu" else 1) + c.n_embd) if c.bias else 0
    norm = c.n_embd * (2 if c.norm == "layernorm" and c.bias else 1)
    n = c.vocab_size * c.n_embd + c.n_layer * (attn + mlp + 2 * norm) + norm
    n += c.block_size * c.n_embd if c.pos_emb == "learned" else 0
    return n + (0 if c.tie_embeddings else c.vocab_size * c.n_embd)


def from_pretrained(name_or_dir, cache_dir=None):
    """A GPT with pretrained weights. A preset name ("gpt2", "smollm2-135m", ...) downloads the
    weights once; a directory loads a local checkpoint in Hugging Face layout (config.json +
    model.safetensors, GPT-2 or Llama); a .gguf file (or the preset "smollm2-135m-instruct-gguf")
    loads llama.cpp's format, dequantized to fp32."""
    path = resolve_pretrained(name_or_dir, cache_dir)
    config = load_config(path)  # config.json, or the .gguf's metadata: no weights read yet
    source = path if path.endswith(".gguf") else os.path.join(path, "model.safetensors")
    refuse_lfs_pointer(source)  # a clone without git-lfs: say so, not "too small"
    # Shapes before memory. First the size: no format stores a weight in less than one bit, so a config
    # that asks for more weights than the file could hold is refused at once, whatever it claims.
    n_params = param_count(config)
    if n_params / 8 > os.path.getsize(source):
        raise ValueError(f"{source}: its config describes {n_params:,} parameters, more than the "
                         f"{os.path.getsize(source):,}-byte file can hold; not this model's weights")
    # a .gguf is dequantized to fp32 in Hugging Face's names; safetensors are only memory-mapped
    sd = load_gguf(path)[1] if path.endswith(".gguf") else load_safetensors(source)
    # Then every tensor's name and shape, against a model on the meta device (shapes, no storage).
    with torch.device("meta"):
        match_hf_state_dict(GPT(config), sd, source)
    model = GPT(config)
    load_hf_state_dict(model, sd, source=source)
    return model


def hf_state_dict(model):
    """The model's weights under Hugging Face's key names: GPT2LMHeadModel's (with its Conv1D
    orientation) or LlamaForCausalLM's, as config.arch says."""
    sd = {}
    for k, p in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_embeddings:
            continue  # tied to wte; transformers re-ties it on load
        w = p.detach()
        if model.config.arch == "llama":
            sd[rename(k, OURS, HF)] = w.contiguous().cpu()
        else:
            sd[k] = (w.t() if k.endswith(CONV1D_WEIGHTS) else w).contiguous().cpu()
    return sd


def save_pretrained(model, out_dir):
    """Write config.json + model.safetensors in Hugging Face layout, so transformers and other tools
    open the result (GPT2LMHeadModel / LlamaForCausalLM.from_pretrained(out_dir))."""
    hf_config = config_dict(model.config)  # first: a config with no Hugging Face format fails here
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors(hf_state_dict(model), os.path.join(out_dir, "model.safetensors"),
                     metadata={"format": "pt"})
    atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(hf_config, indent=2) + "\n")
