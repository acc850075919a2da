"""GGUF export (plumbing/gguf_export.py, `python scripts/export_gguf.py [--adapter-only]`): what
handtune writes reads back through its own GGUF reader as the same config and weights, the tokenizer metadata
rebuilds the same token ids, the chat templates render render_prompt's ids, and a LoRA adapter GGUF applied
the way llama.cpp applies it gives the merged model's weights. (That llama.cpp itself then generates the same
greedy tokens is scripts/llama_cpp_check.py, whose output README records: llama-cpp-python is no CI package.)
"""

import glob
import json
import os
import sys

import export_gguf
import pytest
import torch
from conftest import permute_like_llama_cpp

import data
from lora import apply_lora, save_adapter
from model import GPT, LLAMA_SWITCHES, GPTConfig, from_pretrained, save_pretrained
from plumbing.gguf_export import bpe_merges
from plumbing.gguf_io import permute_gguf_qk, unpermute_gguf_qk
from plumbing.tokenizer_files import copy_tokenizer_files, get_tokenizer

gguf = pytest.importorskip("gguf")

TEXTS = ["Hello, world! It's 2026.", "  two  spaces and\ttabs\n\nnew lines", "ünïcödé — 東京 🙂",
         "numbers 1234567 and 3.14", "<|endoftext|> is plain text here", "The capital of France is"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name a colour.\nJust one."}],
]


def export(*args):
    """scripts/export_gguf.py's command line, in-process."""
    export_gguf.main(list(args))


def gguf_tensors(path):
    """{name: fp32 tensor (numpy's outer-first shape)} of a GGUF file, read with the gguf package directly."""
    reader = gguf.GGUFReader(path)
    return {t.name: torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(
        tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}


def randomise(model, seed=0):
    """Every parameter random, norm weights too: a swapped or skipped tensor cannot hide behind ones/zeros."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.05) + (1.0 if p.ndim == 1 else 0.0))
    return model


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """A random 2-block Llama with SmolLM2's tokenizer (GQA: 4 query heads, 2 key/value heads), untied."""
    d = tmp_path_factory.mktemp("tiny_llama")
    m = randomise(GPT(GPTConfig(**LLAMA_SWITCHES, block_size=64, vocab_size=49152, n_layer=2, n_head=4,
                                n_kv_head=2, n_embd=32, intermediate_size=48, rope_theta=500.0,
                                tie_embeddings=False)))
    save_pretrained(m, str(d))
    for f in ("vocab.json", "merges.txt", "tokenizer.json"):
        (d / f).write_bytes((smollm2_tokenizer_dir / f).read_bytes())
    return str(d)


@pytest.fixture(params=["gpt2", "llama"])
def model_dir(request, tiny_model_dir):
    return tiny_model_dir if request.param == "gpt2" else request.getfixturevalue("tiny_llama_dir")


def test_permutation_is_llama_cpp_converters_and_unpermute_inverts_it():
    w = torch.randn(4 * 8, 5)
    assert torch.equal(permute_gguf_qk(w, 4), permute_like_llama_cpp(w, 4))
    assert torch.equal(unpermute_gguf_qk(permute_gguf_qk(w, 4), 4), w)
    assert not torch.equal(permute_gguf_qk(w, 4), w)


def test_f32_export_round_trips_config_weights_and_tokenizer(model_dir, tmp_path):
    out = str(tmp_path / "m.gguf")
    export("--model", model_dir, "--out", out, "--dtype", "f32")
    ours, back = from_pretrained(model_dir), from_pretrained(out)
    assert back.config == ours.config
    want = ours.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, want[k]), k
    enc, enc_back = get_tokenizer(model_dir), get_tokenizer(out)
    assert enc_back.name == enc.name and enc_back.n_vocab == enc.n_vocab
    assert enc_back.special_tokens_set == enc.special_tokens_set
    for text in TEXTS:
        assert enc_back.encode_ordinary(text) == enc.encode_ordinary(text), text
    assert glob.glob(str(tmp_path / "*.tmp")) == []
    # train.py --full from the GGUF saves a directory: weights + tokenizer files written out of the metadata
    d = str(tmp_path / "dir")
    save_pretrained(back, d)
    copy_tokenizer_files(out, d)
    enc_dir = get_tokenizer(d)
    assert enc_dir.name == enc.name and enc_dir.special_tokens_set == enc.special_tokens_set
    assert [enc_dir.encode_ordinary(t) for t in TEXTS] == [enc.encode_ordinary(t) for t in TEXTS]


@pytest.mark.parametrize("dtype, torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_16_bit_exports_round_matrices_and_keep_vectors_f32(tiny_llama_dir, tmp_path, dtype, torch_dtype):
    out = str(tmp_path / "m.gguf")
    export("--model", tiny_llama_dir, "--out", out, "--dtype", dtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_up.weight"] == dtype.upper()
    ours, back = from_pretrained(tiny_llama_dir).state_dict(), from_pretrained(out).state_dict()
    for k, v in back.items():
        expect = ours[k] if ours[k].dim() < 2 else ours[k].to(torch_dtype).float()
        assert torch.equal(v, expect), k


def test_tokenizer_metadata_is_the_source_files(tiny_model_dir, gpt2_tokenizer_dir, smollm2_gguf):
    """bpe_merges recovers tiktoken's ranks as the very merges list of GPT-2's merges.txt and of SmolLM2's GGUF,
    and the token strings of vocab.json / the GGUF, in order."""
    tokens, merges = bpe_merges(get_tokenizer(tiny_model_dir))
    lines = (gpt2_tokenizer_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges == [ln for ln in lines if ln.strip() and not ln.startswith("#version")]
    vocab = json.loads((gpt2_tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert tokens == sorted(vocab, key=vocab.get)
    fields = gguf.GGUFReader(smollm2_gguf).fields
    tokens, merges = bpe_merges(get_tokenizer(smollm2_gguf))
    assert tokens == fields["tokenizer.ggml.tokens"].contents()
    assert merges == fields["tokenizer.ggml.merges"].contents()


def test_special_ids_and_template_in_the_metadata(model_dir, tmp_path):
    out = str(tmp_path / "m.gguf")
    export("--model", model_dir, "--out", out)
    fields = gguf.GGUFReader(out).fields
    enc = get_tokenizer(model_dir)
    fmt = data.chat_format(enc)
    meta = {k.removeprefix("tokenizer."): f.contents() for k, f in fields.items() if k.startswith("tokenizer.")}
    assert meta["chat_template"] == export_gguf.CHAT_TEMPLATES[enc.name]
    assert meta["ggml.eos_token_id"] == meta["ggml.eot_token_id"] == fmt.end_of_turn_id  # where replies stop
    assert meta["ggml.padding_token_id"] == fmt.pad_id and meta["ggml.add_bos_token"] is False


def render_with_jinja(template, messages, tokenizer, add_generation_prompt):
    """Token ids of a Jinja chat template's text, tokenized the way llama.cpp does with special tokens
    parsed: the special tokens' text becomes their ids, the text between them is encoded as ordinary text."""
    jinja2 = pytest.importorskip("jinja2")
    text = jinja2.Environment().from_string(template).render(messages=messages,
                                                             add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text, allowed_special="all")


def test_chat_templates_render_the_ids_handtune_trains_on(chat_tokenizer):
    """The exported template is the one handtune trains with: same ids as render_prompt (a generation prompt)
    and as render_conversation (a whole conversation), both families, with and without a system message."""
    template = export_gguf.CHAT_TEMPLATES[chat_tokenizer.name]
    for messages in CONVERSATIONS:
        assert render_with_jinja(template, messages, chat_tokenizer, True) == data.render_prompt(messages,
                                                                                                   chat_tokenizer)
        whole = messages + [{"role": "assistant", "content": "Paris, of course."}]
        assert render_with_jinja(template, whole, chat_tokenizer, False) == \
            data.render_conversation(whole, chat_tokenizer)[0]


@pytest.fixture()
def adapter_dir(model_dir, tmp_path):
    """A LoRA adapter for model_dir with non-zero A and B on every default target (r 4, alpha 8)."""
    m = from_pretrained(model_dir)
    apply_lora(m, rank=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    d = str(tmp_path / "adapter")
    save_adapter(m, d)
    return d


def test_adapter_gguf_applied_as_llama_cpp_does_equals_the_merged_export(model_dir, adapter_dir, tmp_path):
    """llama.cpp computes W x + (alpha / r) * B (A x) with W from the base GGUF and A, B from the adapter GGUF.
    Folding that update into every base tensor gives the merged export's tensors: the names match, B's rows
    are permuted like W's (q/k under Llama), and the scale is the same."""
    base, merged, lora = (str(tmp_path / f) for f in ("base.gguf", "merged.gguf", "lora.gguf"))
    export("--model", model_dir, "--out", base, "--dtype", "f32")
    export("--model", model_dir, "--adapter", adapter_dir, "--out", merged, "--dtype", "f32")
    export("--model", model_dir, "--adapter", adapter_dir, "--adapter-only", "--out", lora)
    fields = gguf.GGUFReader(lora).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    alpha = fields["adapter.lora.alpha"].contents()
    assert alpha == 8.0
    pairs = gguf_tensors(lora)
    applied = gguf_tensors(base)
    targets = {k.removesuffix(".lora_a") for k in pairs if k.endswith(".lora_a")}
    assert targets and targets <= set(applied)
    for name in targets:
        A, B = pairs[name + ".lora_a"], pairs[name + ".lora_b"]
        applied[name] = applied[name] + alpha / B.shape[1] * B @ A  # rank = B's columns, as llama.cpp takes it
    want = gguf_tensors(merged)
    assert sorted(applied) == sorted(want)
    for k, v in want.items():
        torch.testing.assert_close(applied[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_export_errors_are_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="error: no LoRA layers to export"):
        export("--model", tiny_model_dir, "--adapter-only", "--out", str(tmp_path / "a.gguf"))
    assert not os.path.exists(tmp_path / "a.gguf")
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit, match="out is a directory; give the name of the file to write inside it"):
        export("--model", tiny_model_dir, "--out", str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any((tmp_path / "out").iterdir())


def test_missing_gguf_package_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(SystemExit, match="^error: writing .gguf files needs the gguf package: pip install gguf$"):
        export("--model", tiny_model_dir, "--out", str(tmp_path / "m.gguf"))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_neither_file_nor_temp(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the previous export")

    def crash(self, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(SystemExit, match="disk full"):
        export("--model", tiny_model_dir, "--out", str(out))
    assert out.read_bytes() == b"the previous export" and glob.glob(str(tmp_path / "*.tmp")) == []
