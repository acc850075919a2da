"""model.py: GPT-2 from scratch, numerically the same model as OpenAI's, and its weights on disk.

A decoder-only transformer is token + position embeddings, N identical blocks of (LayerNorm -> causal
self-attention -> residual, LayerNorm -> MLP -> residual), a final LayerNorm and a linear head that shares
its weight with the token embedding. Module names mirror the Hugging Face checkpoint keys, so loading
OpenAI's weights is a readable one-to-one copy with a shape check per tensor.

    python model.py --model gpt2 --prompt "The meaning of life is"    # download (once) and sample
    python model.py --model path/to/hf_dir --temperature 0             # a local checkpoint, greedy
    python model.py --save-random out/tiny                              # a tiny random GPT-2, offline
"""

import argparse
import json
import math
import mmap
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

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
    block_size: int = 1024  # maximum context length (number of learned position embeddings)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads per block; n_embd must divide evenly
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # dropout on attention, residual and embeddings (0 for fine-tuning from GPT-2)
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2 has them)
    layer_norm_epsilon: float = 1e-5  # LayerNorm eps, as in GPT-2

    @classmethod
    def from_hf_dict(cls, d, source="config.json"):
        """Build a config from a Hugging Face GPT-2 config.json dict, refusing variants we do not implement."""
        if d.get("model_type") != "gpt2":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, expected 'gpt2'")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU ('gelu_new')")
        for flag, want in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                           ("scale_attn_weights", True), ("tie_word_embeddings", True)):
            if d.get(flag, want) != want:
                raise ValueError(f"{source}: {flag}={d[flag]} is not supported (GPT-2 uses {want})")
        return cls(block_size=d["n_positions"], vocab_size=d["vocab_size"], n_layer=d["n_layer"],
                   n_head=d["n_head"], n_embd=d["n_embd"],
                   layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5))

    def to_hf_dict(self):
        """The config.json that transformers' GPT2LMHeadModel reads back."""
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size, "n_positions": self.block_size, "n_ctx": self.block_size,
            "n_embd": self.n_embd, "n_layer": self.n_layer, "n_head": self.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.dropout, "embd_pdrop": self.dropout, "attn_pdrop": self.dropout,
            "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
            "bos_token_id": self.vocab_size - 1, "eos_token_id": self.vocab_size - 1,  # <|endoftext|> is the last id
        }


# The four sizes OpenAI released. Only width and depth differ.
PRESETS = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


# -----------------------------------------------------------------------------
# The model


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so generation feeds one new token a step."""

    def __init__(self, n_layer):
        self.k = [None] * n_layer  # per layer: (B, nh, S, hs)
        self.v = [None] * n_layer

    def length(self):
        return 0 if self.k[0] is None else self.k[0].size(2)

    def append(self, layer, k, v):
        """Add this step's keys/values (B, nh, T, hs) to a layer; return all of them (B, nh, S + T, hs)."""
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # query, key and value projections for all heads in one matmul, as GPT-2's checkpoint stores them
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.size()  # batch, time, channels (n_embd)
        nh, hs = self.n_head, C // self.n_head  # number of heads, head size
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nh, S, hs): the S - T cached tokens come first
        S = k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        if S == T:  # no earlier tokens: the usual lower-triangular mask, with the fused kernel's shortcut
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # Footgun: is_causal=True aligns the triangle to the top-left, which is wrong once T < S. Query i
            # is the token at position S - T + i and may see keys 0 .. S - T + i: shift the diagonal.
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh, hs) -> (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 was trained with the tanh approximation of GELU ("gelu_new" in transformers); the exact erf
        # GELU differs by up to ~1e-3 per activation, enough to break logits parity with OpenAI's model.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the output head is the token embedding matrix (one tensor, two uses), as in GPT-2.
        self.lm_head.weight = self.transformer.wte.weight
        # GPT-2's init: N(0, 0.02) everywhere, zero biases, and the two projections that write into the
        # residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
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
        token embedding is counted once: it is also the output head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def trunk(self, idx, cache=None):
        """Token ids (B, T) -> final hidden states (B, T, C), before the output head."""
        B, T = idx.size()  # batch, time
        start = 0 if cache is None else cache.length()
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
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
        """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's QK^T and AV
        (12 * n_layer * n_embd * seq_len), as in the PaLM paper's appendix B."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * seq_len

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
        """A preset name ("gpt2", ...) downloads OpenAI's weights once; a directory loads a local checkpoint
        in Hugging Face layout (config.json + model.safetensors)."""
        model_dir = resolve_pretrained(name_or_dir, cache_dir)
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            config = GPTConfig.from_hf_dict(json.load(f), source=os.path.join(model_dir, "config.json"))
        model = cls(config)
        weights = os.path.join(model_dir, "model.safetensors")
        model.load_hf_state_dict(load_safetensors(weights), source=weights)
        return model

    def load_hf_state_dict(self, sd, source="checkpoint"):
        """Copy a Hugging Face GPT-2 state dict into this model, one tensor at a time, checking every shape."""
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}  # the hub's files omit the prefix
        # Not weights: the causal-mask buffers older transformers versions saved with the model.
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if "lm_head.weight" in sd:  # tied: only allowed if it really is the embedding
            if not torch.equal(sd.pop("lm_head.weight"), sd.get("wte.weight")):
                raise ValueError(f"{source}: lm_head.weight differs from wte.weight; GPT-2 ties them")
        ours = {k.removeprefix("transformer."): p for k, p in self.state_dict().items()
                if k != "lm_head.weight"}
        missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
        if missing or unexpected:
            raise ValueError(f"{source}: not a GPT-2 checkpoint of this shape: missing keys {missing[:5]}, "
                             f"unexpected keys {unexpected[:5]}")
        with torch.no_grad():
            for k, p in ours.items():
                w = sd[k]
                if k.endswith(CONV1D_WEIGHTS):
                    # Hugging Face's GPT-2 uses Conv1D, which stores (in, out); nn.Linear stores (out, in).
                    w = w.t()
                if w.shape != p.shape:
                    raise ValueError(f"{source}: {k} has shape {tuple(w.shape)}, expected {tuple(p.shape)}")
                p.copy_(w)

    def hf_state_dict(self):
        """This model's weights under Hugging Face GPT2LMHeadModel's key names and Conv1D orientation."""
        sd = {}
        for k, p in self.state_dict().items():
            if k == "lm_head.weight":
                continue  # tied to wte; transformers re-ties it on load
            w = p.detach()
            sd[k] = (w.t() if k.endswith(CONV1D_WEIGHTS) else w).contiguous().cpu()
        return sd

    def save_pretrained(self, out_dir):
        """Write config.json + model.safetensors in Hugging Face layout, so transformers and other tools
        open the result (GPT2LMHeadModel.from_pretrained(out_dir))."""
        os.makedirs(out_dir, exist_ok=True)
        save_safetensors(self.hf_state_dict(), os.path.join(out_dir, "model.safetensors"),
                         metadata={"format": "pt"})
        atomic_write_text(os.path.join(out_dir, "config.json"),
                          json.dumps(self.config.to_hf_dict(), indent=2) + "\n")


# The four weights Hugging Face stores transposed (Conv1D); all other tensors copy as they are.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


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
# Downloading OpenAI's checkpoints from the Hugging Face hub

HUB_URL = "https://huggingface.co/openai-community/{name}/resolve/main/{file}"
HUB_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")


def default_cache_dir():
    """Where downloads go: $HANDTUNE_CACHE, else ~/.cache/handtune."""
    return os.environ.get("HANDTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "handtune")


def resolve_pretrained(name_or_dir, cache_dir=None):
    """Return a local directory holding the checkpoint: the directory itself, or the preset's download."""
    if os.path.isdir(name_or_dir):
        for f in ("config.json", "model.safetensors"):
            if not os.path.isfile(os.path.join(name_or_dir, f)):
                raise FileNotFoundError(f"{name_or_dir}: no {f} here; a model directory needs config.json "
                                        "and model.safetensors (Hugging Face layout)")
        return name_or_dir
    if name_or_dir not in PRESETS:
        raise FileNotFoundError(f"{name_or_dir}: neither a model directory nor a preset "
                                f"(presets: {', '.join(PRESETS)})")
    model_dir = os.path.join(cache_dir or default_cache_dir(), name_or_dir)
    os.makedirs(model_dir, exist_ok=True)
    for f in HUB_FILES:
        path = os.path.join(model_dir, f)
        if not os.path.isfile(path):
            download(HUB_URL.format(name=name_or_dir, file=f), path)
    return model_dir


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
            f"could not download {url} ({e}). Offline? Fetch config.json, model.safetensors, vocab.json and "
            f"merges.txt of the model on a machine with internet, copy them into a directory and pass that "
            f"directory instead of the preset name (e.g. --model path/to/gpt2)") from None
    os.replace(part, path)


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


def atomic_write_bytes(path, data):
    """Write to a temporary file in the same directory, fsync it, then rename over path (atomic on POSIX
    and Windows): readers see the old file or the new one, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
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
        description="Sample text from GPT-2, or write a small random-init model for offline experiments.")
    g = parser.add_argument_group("sampling")
    g.add_argument("--model", default="gpt2", help="preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl; "
                   "downloaded once) or a Hugging Face-layout directory")
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
        model_dir = resolve_pretrained(args.model)
        model = GPT.from_pretrained(model_dir)
        enc = data.get_tokenizer(model_dir)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    idx = torch.tensor([enc.encode_ordinary(args.prompt)], dtype=torch.long)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         seed=args.seed)
    print(enc.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
