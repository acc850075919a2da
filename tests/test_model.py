"""Tests for model.py: logits parity with Hugging Face transformers, the safetensors reader/writer, KV-cache
generation, the loss, and the facts model.py's comments state. Offline: every checkpoint is a tiny random one
written by transformers' own save_pretrained into a temporary directory.

    python -m pytest tests/test_model.py -q
"""

import gc
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import no_cache_greedy
from torch.nn import functional as F

import plumbing.files
import plumbing.hub
from model import (GPT, IGNORE_INDEX, PRESETS, GPTConfig, KVCache, Sampling, from_pretrained,
                   generate, load_hf_state_dict, sample_next, save_pretrained, stream)
from plumbing.device import choose_device, choose_dtype
from plumbing.files import atomic_write_bytes
from plumbing.safetensors_io import load_safetensors, save_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shapes the parity tests cover: (n_layer, n_head, n_embd, vocab_size, block_size). The last has GPT-2's real
# width, head count and vocabulary (only depth is cut, to stay fast).
SHAPES = [(1, 1, 8, 17, 16), (2, 4, 64, 100, 64), (3, 6, 48, 257, 32), (2, 12, 768, 50257, 64)]


def hf_checkpoint(tmp_path, n_layer, n_head, n_embd, vocab_size, block_size, seed=0):
    """Write a random GPT2LMHeadModel with transformers' save_pretrained; return (dir, hf_model)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                                  n_positions=block_size, bos_token_id=vocab_size - 1,
                                  eos_token_id=vocab_size - 1)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    # transformers' init leaves biases and LayerNorms at 0/1; randomise everything so that a transposed,
    # skipped or swapped tensor cannot hide behind a symmetric value
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    d = tmp_path / f"hf_{n_layer}_{n_head}_{n_embd}_{vocab_size}"
    hf.save_pretrained(d)
    return str(d), hf


# -----------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}H{}C{}V{}T{}".format(*s))
def test_logits_match_transformers(tmp_path, shape):
    d, hf = hf_checkpoint(tmp_path, *shape)
    ours = from_pretrained(d).eval()
    idx = torch.randint(0, shape[3], (2, shape[4]))
    with torch.no_grad():
        want = hf(idx).logits
        got = ours(idx)
    assert got.shape == want.shape == (2, shape[4], shape[3])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_save_pretrained_round_trips_into_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    d, _ = hf_checkpoint(tmp_path, 2, 4, 64, 100, 32)
    ours = from_pretrained(d).eval()
    out = tmp_path / "saved"
    save_pretrained(ours, out)
    back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 100, (3, 32))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, ours(idx), atol=1e-4, rtol=0)
    # and our own reader gets the identical tensors back
    again = from_pretrained(str(out))
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_hub_key_layout_loads(tmp_path):
    """The files on the hub name tensors without "transformer." and carry attn.bias mask buffers."""
    d, hf = hf_checkpoint(tmp_path, 2, 2, 32, 50, 16)
    sd = load_safetensors(os.path.join(d, "model.safetensors"))
    hub = {k.removeprefix("transformer."): v.clone() for k, v in sd.items()}
    for i in range(2):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
        hub[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_safetensors(hub, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    ours = from_pretrained(d).eval()
    idx = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_loss_matches_transformers_labels(tmp_path):
    """Our targets are pre-shifted (targets[t] = idx[t + 1]); transformers shifts labels inside the model.
    Same masked positions -> same mean loss."""
    d, hf = hf_checkpoint(tmp_path, 2, 4, 64, 100, 32)
    ours = from_pretrained(d).eval()
    ids = torch.randint(0, 100, (2, 20))
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, 5:12] = True
    mask[1, 15:] = True
    labels = ids.masked_fill(~mask, IGNORE_INDEX)
    targets = labels[:, 1:]
    with torch.no_grad():
        want = hf(ids, labels=labels).loss
        logits, got = ours(ids[:, :-1], targets)
    assert logits.shape == (int((targets != IGNORE_INDEX).sum()), 100)  # logits only at trained positions
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# Generation


def test_greedy_generate_matches_transformers(tmp_path):
    d, hf = hf_checkpoint(tmp_path, 2, 4, 64, 100, 64)
    ours = from_pretrained(d)
    idx = torch.randint(0, 100, (1, 10))
    want = hf.generate(idx, max_new_tokens=30, do_sample=False, pad_token_id=99, eos_token_id=None)
    got = generate(ours, idx, 30)
    assert torch.equal(got, want)




def test_kv_cache_equals_recompute_including_past_block_size():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=24, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 64, (2, 7))
    # 7 + 40 tokens > block_size 24: the window slides and the cache must be dropped, not reused
    assert torch.equal(generate(m, idx, 40), no_cache_greedy(m, idx, 40))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_generation_with_left_padding_equals_one_prompt_at_a_time(family):
    """Prompts of 3, 9 and 6 tokens, left-padded into one batch: every row's greedy tokens equal its own
    run alone, also after the window slides past block_size (9 + 40 > 32)."""
    from model import LLAMA_SWITCHES

    torch.manual_seed(0)
    switches = LLAMA_SWITCHES if family == "llama" else {}
    m = GPT(GPTConfig(**switches, block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32,
                      n_kv_head=2 if family == "llama" else None)).eval()
    prompts = [torch.randint(1, 64, (n,)).tolist() for n in (3, 9, 6)]
    T = max(map(len, prompts))
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])  # (3, 9), pad id 0 on the left
    mask = idx != 0
    out = generate(m, idx, 40, mask=mask)
    for row, p in zip(out, prompts):
        alone = generate(m, torch.tensor([p]), 40)
        assert row[T:].tolist() == alone[0, len(p):].tolist()
    with torch.no_grad():  # the next-token logits too (a random model's greedy tokens may repeat one id)
        batched = m.lm_head(m.trunk(idx, mask=mask))[:, -1]  # (3, vocab)
        unmasked = m.lm_head(m.trunk(idx))[:, -1]
        for i, p in enumerate(prompts):
            alone = m.lm_head(m.trunk(torch.tensor([p])))[0, -1]
            torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=0)
            if len(p) < T:  # without the mask, padding is attended to and positions are shifted
                assert (unmasked[i] - alone).abs().max() > 1e-3


def test_chunked_prefill_with_cache_equals_one_forward():
    """The comment on is_causal: feeding T > 1 tokens after a cached prefix needs the shifted mask."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = m.lm_head(m.trunk(idx))
        cache = KVCache(2)
        a = m.lm_head(m.trunk(idx[:, :8], cache))
        b = m.lm_head(m.trunk(idx[:, 8:], cache))
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, atol=1e-5, rtol=0)


def test_generate_stops_at_stop_token_and_pads_finished_rows():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=20, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 20, (1, 5))
    free = generate(m, idx, 20)
    stop = int(free[0, 8])  # the 4th generated token: make it the stop token
    out = generate(m, idx, 20, stop_token=stop)
    first = (free[0, 5:] == stop).nonzero()[0].item() + 5
    assert torch.equal(out[0], free[0, :first + 1])  # prompt + tokens up to and including the stop token
    streamed = list(stream(m, idx, 20, stop_token=stop))
    assert streamed == out[0, 5:].tolist()
    # two rows: the finished one is padded with the stop token until both are done
    two = torch.cat([idx, torch.randint(0, 20, (1, 5))])
    out2 = generate(m, two, 20, stop_token=stop)
    row = out2[0, 5:].tolist()
    if stop in row:
        k = row.index(stop)
        assert all(t == stop for t in row[k:])


def test_sampling_options():
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    greedy = logits.argmax(-1, keepdim=True)
    assert torch.equal(sample_next(logits, Sampling(0.0)), greedy)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next(logits, Sampling(1.0, top_k=1), g), greedy)  # top-1 is greedy
    assert torch.equal(sample_next(logits, Sampling(1.0, top_p=1e-6), g), greedy)  # tiny nucleus keeps 1
    # top_k: only the k largest can ever be drawn
    draws = torch.cat([sample_next(logits, Sampling(2.0, top_k=3), g) for _ in range(200)], dim=1)
    top3 = logits.topk(3).indices
    assert all(set(draws[b].tolist()) <= set(top3[b].tolist()) for b in range(4))
    # top_p: with probabilities 0.5, 0.3, 0.2 and top_p 0.7, the smallest set reaching 0.7 is {0, 1}
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    seen = {int(sample_next(lp, Sampling(1.0, top_p=0.7), g)) for _ in range(300)}
    assert seen == {0, 1}
    # a seed makes sampling reproducible
    m = GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=1, n_head=1, n_embd=8))
    idx = torch.zeros(1, 1, dtype=torch.long)
    assert torch.equal(generate(m, idx, 15, Sampling(seed=3)), generate(m, idx, 15, Sampling(seed=3)))


# -----------------------------------------------------------------------------
# Loss


def test_all_masked_batch_gives_zero_loss_not_nan():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 30, (2, 8))
    targets = torch.full((2, 8), IGNORE_INDEX)
    for reduction in ("mean", "sum"):
        _, loss = m(idx, targets, reduction=reduction)
        assert loss.item() == 0.0
        loss.backward()  # still part of the graph
        assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in m.parameters())
        m.zero_grad(set_to_none=True)


def test_sum_reduction_is_mean_times_count():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 30, (2, 8))
    targets = torch.randint(0, 30, (2, 8))
    targets[0, :3] = IGNORE_INDEX
    _, mean = m(idx, targets)
    _, total = m(idx, targets, reduction="sum")
    torch.testing.assert_close(total, mean * 13)
    # and both equal the plain full-logits computation
    ref = F.cross_entropy(m(idx).view(-1, 30), targets.view(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(mean, ref)


# -----------------------------------------------------------------------------
# Facts stated in model.py's comments


def test_weights_are_tied_and_init_is_gpt2s():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=1000, n_layer=8, n_head=4, n_embd=256)
    m = GPT(cfg)
    assert m.lm_head.weight is m.transformer.wte.weight
    assert m.transformer.h[0].mlp.gelu.approximate == "tanh"
    assert m.transformer.h[0].ln_1.eps == 1e-5
    fc = m.transformer.h[0].mlp.c_fc.weight
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in m.transformer.h])
    assert abs(fc.std().item() - 0.02) < 0.001
    assert abs(proj.std().item() - 0.02 / math.sqrt(2 * cfg.n_layer)) < 0.0005
    assert not m.transformer.h[0].attn.c_attn.bias.any()


def test_exact_gelu_would_break_parity():
    """Why the tanh GELU: the erf GELU differs by enough to matter (up to ~1e-3 per activation)."""
    x = torch.linspace(-6, 6, 10001)
    diff = (F.gelu(x) - F.gelu(x, approximate="tanh")).abs().max().item()
    assert 1e-4 < diff < 1e-3


def test_lm_head_is_about_30_percent_of_gpt2_small_flops():
    with torch.device("meta"):
        m = GPT(PRESETS["gpt2"])
    head = m.config.vocab_size * m.config.n_embd
    share = head / m.num_params()  # matmul FLOPs are proportional to weights used per token
    assert 0.28 < share < 0.34
    assert 123e6 < m.num_params(non_embedding=False) < 125e6  # the "124M" in the preset comment


def test_preset_sizes():
    expect = {"gpt2": 124, "gpt2-medium": 355, "gpt2-large": 774, "gpt2-xl": 1558}
    for name, millions in expect.items():
        with torch.device("meta"):
            m = GPT(PRESETS[name])
        assert abs(m.num_params(non_embedding=False) / 1e6 - millions) < 2, name


# -----------------------------------------------------------------------------
# safetensors


def test_safetensors_round_trip_all_dtypes(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(7), "i8": torch.tensor([-3, 4], dtype=torch.int8), "bool": torch.tensor([1, 0]).bool(),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "noncontig": torch.randn(4, 3).t(),
    }
    p = tmp_path / "t.safetensors"
    save_safetensors(tensors, p, metadata={"format": "pt", "note": "x"})
    back = load_safetensors(p)
    assert list(back) == list(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    header_len = int.from_bytes(p.read_bytes()[:8], "little")
    assert header_len % 8 == 0  # the padding comment


def test_save_safetensors_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """The writer never joins the payload into one blob: each write is the header or one tensor's bytes."""
    import plumbing.safetensors_io as st

    tensors = {f"w{i}": torch.randn(64, 32) for i in range(5)}
    chunks = []

    class Recorder:
        def write(self, b):
            chunks.append(memoryview(b).nbytes)

    monkeypatch.setattr(st, "atomic_write", lambda path, write: write(Recorder()))
    st.save_safetensors(tensors, tmp_path / "x.safetensors")
    assert chunks[1:] == [64 * 32 * 4] * 5 and chunks[0] < 1000


def test_safetensors_compatible_with_the_reference_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).bfloat16()}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_safetensors(tensors, ours)
    st.save_file(tensors, str(theirs), metadata={"format": "pt"})
    for k, v in st.load_file(str(ours)).items():
        assert torch.equal(v, tensors[k])
    for k, v in load_safetensors(theirs).items():
        assert torch.equal(v, tensors[k])


def test_loaded_tensors_outlive_the_mapping(tmp_path):
    """The comment on frombuffer: tensors keep the memory map alive after load_safetensors returns."""
    p = tmp_path / "t.safetensors"
    save_safetensors({"x": torch.arange(1000, dtype=torch.float32)}, p)
    x = load_safetensors(p)["x"]
    gc.collect()
    assert x.sum().item() == sum(range(1000))
    x.add_(1)  # copy-on-write: writable in memory, the file is untouched
    assert load_safetensors(p)["x"][0].item() == 0.0


def corrupt_variants(good):
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])

    def with_header(h):
        b = json.dumps(h).encode()
        return len(b).to_bytes(8, "little") + b + good[8 + n:]

    bad_offsets = json.loads(json.dumps(header))
    bad_offsets["w"]["data_offsets"] = [0, 10 ** 9]
    bad_dtype = json.loads(json.dumps(header))
    bad_dtype["w"]["dtype"] = "Q4"
    bad_shape = json.loads(json.dumps(header))
    bad_shape["w"]["shape"] = [3, 5]
    overlap = json.loads(json.dumps(header))
    overlap["b"]["data_offsets"] = [0, overlap["b"]["data_offsets"][1] - overlap["b"]["data_offsets"][0]]
    return {
        "empty": b"",
        "short": good[:5],
        "truncated_data": good[:-10],
        "truncated_header": good[:8 + n // 2],
        "huge_header_length": (10 ** 12).to_bytes(8, "little") + good[8:],
        "not_json": good[:8] + b"\xff" * n + good[8 + n:],
        "json_list": with_header([1, 2]),
        "offsets_out_of_range": with_header(bad_offsets),
        "unknown_dtype": with_header(bad_dtype),
        "shape_mismatch": with_header(bad_shape),
        "overlap": with_header(overlap),
    }


@pytest.mark.parametrize("case", [
    "empty", "short", "truncated_data", "truncated_header", "huge_header_length", "not_json", "json_list",
    "offsets_out_of_range", "unknown_dtype", "shape_mismatch", "overlap"])
def test_corrupted_safetensors_rejected(tmp_path, case):
    p = tmp_path / "good.safetensors"
    save_safetensors({"w": torch.randn(4, 4), "b": torch.randn(4)}, p)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(corrupt_variants(p.read_bytes())[case])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_safetensors(bad)


def test_checkpoint_key_and_shape_errors(tmp_path):
    d, _ = hf_checkpoint(tmp_path, 2, 2, 32, 50, 16)
    path = os.path.join(d, "model.safetensors")
    sd = {k: v.clone() for k, v in load_safetensors(path).items()}
    m = from_pretrained(d)
    missing = dict(sd)
    missing.pop("transformer.h.1.mlp.c_fc.bias")
    with pytest.raises(ValueError, match="missing keys.*h.1.mlp.c_fc.bias"):
        load_hf_state_dict(m, missing)
    extra = dict(sd, **{"transformer.h.2.ln_1.weight": torch.ones(32)})
    with pytest.raises(ValueError, match="unexpected keys.*h.2.ln_1.weight"):
        load_hf_state_dict(m, extra)
    wrong = dict(sd, **{"transformer.h.0.mlp.c_fc.weight": torch.zeros(128, 32)})  # not transposed
    with pytest.raises(ValueError, match=r"h.0.mlp.c_fc.weight has shape \(32, 128\), expected \(128, 32\)"):
        load_hf_state_dict(m, wrong)


def test_bad_weights_file_gives_one_line_error(tmp_path):
    d, _ = hf_checkpoint(tmp_path, 1, 2, 16, 30, 16)
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    r = subprocess.run([sys.executable, "scripts/sample.py", "--model", d], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "truncated" in lines[0]


# -----------------------------------------------------------------------------
# Atomic writes (the downloader: tests/test_hub.py)




def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(plumbing.files.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # the temporary file was cleaned up


def test_choose_device_and_dtype_on_cpu():
    dev, reason = choose_device("cpu")
    assert dev == "cpu" and "requested" in reason
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert choose_device("auto")[0] == "cpu"
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            choose_device("cuda")
    assert choose_dtype("cpu", cpu_bf16=False)[0] == "float32"  # tests/test_device.py: where bf16 is native
    with pytest.raises(ValueError):
        choose_dtype("cpu", "float8")


def test_atomic_write_gives_ordinary_file_permissions(tmp_path):
    """The comment on mkstemp: outputs are readable like any file open() creates, not private."""
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "f.bin").st_mode & 0o777) == 0o644


def test_config_json_fields_left_out_default_as_transformers_defaults_them():
    """plumbing/hf_format.py's GPT2_DEFAULTS / LLAMA_DEFAULTS are GPT2Config()'s and LlamaConfig()'s: a
    config.json that transformers opens without n_positions (or rope_theta, ...) opens here the same way."""
    transformers = pytest.importorskip("transformers")
    from model import GPTConfig
    from plumbing.hf_format import GPT2_DEFAULTS, LLAMA_DEFAULTS

    gpt2, llama = transformers.GPT2Config(), transformers.LlamaConfig()
    for k, v in GPT2_DEFAULTS.items():
        assert getattr(gpt2, k) == v, k
    for k, v in LLAMA_DEFAULTS.items():  # transformers 5 keeps rope_theta in rope_parameters
        got = getattr(llama, k, None) if k != "rope_theta" or hasattr(llama, k) else llama.rope_parameters[k]
        assert got == v, k
    c = GPTConfig.from_hf_dict({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2})
    assert c.block_size == 1024 == transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2).n_positions
    c = GPTConfig.from_hf_dict({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 2, "num_attention_heads": 4})
    assert (c.block_size, c.rope_theta, c.layer_norm_epsilon, c.vocab_size) == (2048, 10000.0, 1e-6, 32000)
