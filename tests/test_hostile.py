"""Files from strangers: every reader bounds what a header claims before it parses or allocates, and every
malformed input ends in one line, `error: FILE[:LINE]: what is wrong, what to do`, within seconds and well
under 1 GB (each CLI runs under an address-space cap). One test per class of crafted input; each file is
bytes, not gigabytes.

    python -m pytest tests/test_hostile.py -q
"""

import json
import os
import shutil
import struct
import time
import tracemalloc

import pytest
import torch
from conftest import one_error_line, run_limited

from model import GPT, GPTConfig, save_pretrained
from plumbing.files import read_json
from plumbing import gguf_io
from plumbing.gguf_io import scan_gguf
from plumbing.peft_format import check_target_regex
from plumbing.records import load_records
from plumbing.report import printable
from plumbing.safetensors_io import save_safetensors
from plumbing.tokenizer_files import copy_tokenizer_files

# -----------------------------------------------------------------------------
# GGUF: handtune's own bounded scan runs before the gguf package parses anything


def gguf_string(b):
    return struct.pack("<Q", len(b)) + b


def gguf_header(kv=b"", n_kv=0, tensors=b"", n_tensors=0):
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tensors


def tensor_info(name, dims, kind=0, offset=0):
    return (gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<IQ", kind, offset))


def test_a_gguf_array_claiming_2_to_the_40_elements_is_one_line_in_milliseconds(tmp_path):
    kv = gguf_string(b"general.architecture") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 1 << 40)
    path = tmp_path / "evil.gguf"
    path.write_bytes(gguf_header(kv, n_kv=1) + b"\0" * 16)  # 96 bytes
    t0 = time.time()
    with pytest.raises(ValueError, match="claims 1,099,511,627,776 elements"):
        scan_gguf(str(path))
    assert time.time() - t0 < 1
    r = run_limited(["scripts/sample.py", "--model", path])
    one_error_line(r, path, "claims 1,099,511,627,776 elements")


@pytest.mark.parametrize("case", ["overlapping", "misaligned", "past the end", "too many dims", "count"])
def test_gguf_tensor_data_must_lie_inside_the_file_aligned_and_disjoint(tmp_path, case):
    infos = {"overlapping": [tensor_info(b"a", [8]), tensor_info(b"b", [8], offset=0)],
             "misaligned": [tensor_info(b"a", [8], offset=4)],
             "past the end": [tensor_info(b"a", [1 << 30])],
             "too many dims": [tensor_info(b"a", [1, 1, 1, 1, 1])],
             "count": []}[case]
    n = 1 << 40 if case == "count" else len(infos)
    head = gguf_header(tensors=b"".join(infos), n_tensors=n)
    path = tmp_path / "t.gguf"
    path.write_bytes(head + b"\0" * (-len(head) % 32) + b"\0" * 64)
    with pytest.raises(ValueError, match=str(path)):
        scan_gguf(str(path))


def test_the_real_gguf_scans_clean_to_the_gguf_packages_metadata(smollm2_gguf):
    import gguf

    metadata, tensors = scan_gguf(smollm2_gguf)
    assert len(tensors) == 272 and tensors["token_embd.weight"][0] == (49152, 576)
    fields = gguf.GGUFReader(smollm2_gguf).fields  # the reference: every key, 49,152 tokens, 48,900 merges
    assert metadata == {k: f.contents() for k, f in fields.items() if not k.startswith("GGUF.")}
    elements = sum(len(v) for v in metadata.values() if isinstance(v, list))
    assert elements == 147_205 and elements * 20 < gguf_io.MAX_METADATA_ELEMENTS  # the cap's comment


def test_gguf_metadata_arrays_are_capped_in_elements_and_each_costs_at_most_64_bytes(tmp_path, monkeypatch):
    n = 100_000  # two-character strings: 10 bytes on disk, the costliest element as a Python object
    kv = (gguf_string(b"tokenizer.ggml.tokens") + struct.pack("<I", 9) + struct.pack("<IQ", 8, n)
          + b"".join(gguf_string(b"%02x" % (i % 256)) for i in range(n)))
    path = tmp_path / "many.gguf"
    path.write_bytes(gguf_header(kv, n_kv=1))
    scan_gguf(str(path))  # imports the gguf package outside the measurement
    tracemalloc.start()
    metadata, _ = scan_gguf(str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(metadata["tokenizer.ggml.tokens"]) == n and peak < 64 * n  # the cap's memory bound
    monkeypatch.setattr(gguf_io, "MAX_METADATA_ELEMENTS", n - 1)
    with pytest.raises(ValueError, match=f"{n:,} metadata array elements, more than the {n - 1:,}"):
        scan_gguf(str(path))


# -----------------------------------------------------------------------------
# Shapes before memory: a config that asks for more than its weights hold is refused before building


def test_a_config_asking_for_a_huge_model_beside_empty_weights_is_refused_at_once(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 200, "n_embd": 12800,
                                               "n_head": 100}))  # ~400B parameters: 1.6 TB in fp32
    save_safetensors({}, str(d / "model.safetensors"))
    t0 = time.time()
    r = run_limited(["scripts/sample.py", "--model", d])
    one_error_line(r, d / "model.safetensors", "parameters, more than the")
    assert time.time() - t0 < 30


def test_a_gguf_header_describing_a_huge_model_is_refused_before_building_it(tmp_path):
    import gguf

    path = tmp_path / "huge.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("add_context_length", 8192), ("add_embedding_length", 1 << 16),
                       ("add_block_count", 1 << 12), ("add_feed_forward_length", 1 << 18),
                       ("add_head_count", 64), ("add_layer_norm_rms_eps", 1e-5)):
        getattr(w, key)(value)
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", torch.zeros(2, 8).numpy())  # one small tensor: ~5 TB claimed
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t0 = time.time()
    one_error_line(run_limited(["scripts/sample.py", "--model", path]), path, "parameters, more than the")
    assert time.time() - t0 < 30


def test_a_safetensors_shape_of_2_to_the_64_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [1 << 64, 0], "data_offsets": [0, 0]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    from plumbing.safetensors_io import load_safetensors

    with pytest.raises(ValueError, match=f"{path}: not a valid safetensors file"):
        load_safetensors(str(path))


def test_weights_of_another_shape_are_refused_before_the_model_is_built(tmp_path):
    small, big = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16), dict(n_layer=1, n_head=2, n_embd=32)
    save_pretrained(GPT(small), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, **big}))
    r = run_limited(["scripts/sample.py", "--model", tmp_path / "m"])
    one_error_line(r, "model.safetensors", "not a GPT-2 checkpoint of this shape")


# -----------------------------------------------------------------------------
# Every number of a config checked: positive integer sizes, finite positive eps, a JSON object


@pytest.mark.parametrize("change, why", [
    ({"layer_norm_epsilon": float("nan")}, "layer_norm_epsilon=nan"),
    ({"n_layer": -1}, "n_layer=-1"),
    ({"n_head": 0}, "n_head=0"),
    ({"n_embd": "768"}, "n_embd='768'"),
])
def test_impossible_config_numbers_are_one_line_naming_the_file(tmp_path, change, why):
    save_pretrained(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))  # NaN: JSON's NaN extension
    one_error_line(run_limited(["scripts/sample.py", "--model", tmp_path / "m"]), path, why)


@pytest.mark.parametrize("text, why", [("[1, 2]", "the top level is a JSON list"),
                                      ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                      ("{\"model_type\": ", "not valid JSON")],
                         ids=["a list", "nested 100,000 deep", "cut short"])
def test_malformed_json_files_are_one_line_naming_the_file(tmp_path, text, why):
    save_pretrained(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(text)
    one_error_line(run_limited(["scripts/sample.py", "--model", tmp_path / "m"]), "config.json", why)
    with pytest.raises(ValueError, match=why):
        read_json(tmp_path / "m" / "config.json")


# -----------------------------------------------------------------------------
# Adapters: numbers validated, target_modules a list of names or a regex that matches in bounded time


def adapter_dir(tmp_path, **config):
    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"]}
    (d / "adapter_config.json").write_text(json.dumps({**base, **config}))
    save_safetensors({}, str(d / "adapter_model.safetensors"))
    return d


@pytest.mark.parametrize("config, why", [({"lora_alpha": float("nan")}, "lora_alpha=nan"),
                                         ({"r": 0}, "r=0"), ({"target_modules": 3}, "target_modules"),
                                         ({"target_modules": "(.|.)*!"}, "repeats a group")])
def test_adapter_configs_are_validated_before_use(tiny_model_dir, tmp_path, config, why):
    d = adapter_dir(tmp_path, **config)
    t0 = time.time()
    r = run_limited(["scripts/sample.py", "--model", tiny_model_dir, "--adapter", d])
    one_error_line(r, "adapter_config.json", why)
    assert time.time() - t0 < 30  # the (.|.)* pattern stalled for an hour per module name


def test_target_regexes_peft_writes_still_load():
    for pattern in (r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.(q|v)_proj", "c_attn"):
        check_target_regex(pattern, "adapter_config.json")
    for pattern in ("(a+)+$", "(.*)*", ".*.*.*.*.*x"):
        with pytest.raises(ValueError):
            check_target_regex(pattern, "adapter_config.json")


# -----------------------------------------------------------------------------
# Nothing from outside a model directory reaches an output


def test_a_symlink_out_of_the_model_dir_never_reaches_out_model(tiny_model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not upload")
    os.symlink(secret, d / "tokenizer_config.json")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="outside the model directory"):
        copy_tokenizer_files(str(d), str(out))
    assert not (out / "tokenizer_config.json").exists()


def test_a_hub_cache_snapshot_may_link_into_its_blobs_and_nowhere_else(tiny_model_dir, tmp_path):
    """A Hugging Face cache stores files once under blobs/ and links snapshots/REV/NAME to them: those
    links are allowed, a link from the snapshot to any other folder of the cache is not."""
    repo = tmp_path / "models--x--y"
    snap, blobs, refs = repo / "snapshots" / "abc123", repo / "blobs", repo / "refs"
    shutil.copytree(tiny_model_dir, snap)
    blobs.mkdir()
    refs.mkdir()
    (blobs / "sha").write_bytes((snap / "vocab.json").read_bytes())
    (snap / "vocab.json").unlink()
    os.symlink(os.path.join("..", "..", "blobs", "sha"), snap / "vocab.json")  # how the hub links them
    out = tmp_path / "out"
    out.mkdir()
    copy_tokenizer_files(str(snap), str(out))
    assert (out / "vocab.json").read_bytes() == (blobs / "sha").read_bytes() and not (out / "vocab.json").is_symlink()
    (refs / "main").write_text("{}")
    os.symlink(refs / "main", snap / "tokenizer_config.json")
    with pytest.raises(ValueError, match="outside the model directory"):
        copy_tokenizer_files(str(snap), str(tmp_path / "out2"))


def test_copied_json_files_are_parsed_first(tiny_model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    (d / "tokenizer_config.json").write_text("not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        copy_tokenizer_files(str(d), str(tmp_path))


def test_a_checkpoint_state_naming_a_file_outside_it_is_skipped(tmp_path):
    from plumbing.checkpoint import verified

    ck = tmp_path / "step_0000001"
    ck.mkdir()
    save_safetensors({"x": torch.zeros(1)}, str(ck / "tensors.safetensors"))
    state = {k: 0 for k in ("step", "best_val", "bad_evals", "data", "args", "world_size", "optimizer",
                            "scaler", "rng")}
    (ck / "state.json").write_text(json.dumps({**state, "files": {"../../etc/hostname": {"bytes": 1,
                                                                                     "sha256": "0"}}}))
    with pytest.raises(ValueError, match="not a file of a checkpoint"):
        verified(str(ck))
    from plumbing.checkpoint import check_resume
    from train import TrainConfig

    with pytest.raises(ValueError, match="lacks step, best_val"):  # keys resuming reads are missing
        check_resume({"files": {}, "loaded_from": str(ck)}, TrainConfig(out=str(tmp_path)), 1)


# -----------------------------------------------------------------------------
# Datasets: a size cap per record and per message, checked before tokenizing, in bounded memory


def test_a_64_mb_record_is_refused_in_one_line_and_bounded_memory(tmp_path, gpt2_tokenizer_dir):
    path = tmp_path / "big.jsonl"
    ok = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    with open(path, "w") as f:
        f.write(ok + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "x" * (64 << 20)},
                                         {"role": "assistant", "content": "y"}]}) + "\n")
    t0 = time.time()
    r = run_limited(["data.py", "--show", path, "--tokenizer-dir", gpt2_tokenizer_dir])
    one_error_line(r, f"{path}:2", "at most 1,000,000")
    assert time.time() - t0 < 30


def test_a_long_message_is_refused_with_its_line(tmp_path):
    path = tmp_path / "long.jsonl"
    msg = [{"role": "user", "content": "x" * 150_000}, {"role": "assistant", "content": "y"}]
    path.write_text(json.dumps({"messages": msg}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:1: message 1 has 150,000 characters"):
        load_records(path)


def test_deeply_nested_records_are_one_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ValueError, match=f"{path}:1: JSON nested too deeply"):
        load_records(path)


# -----------------------------------------------------------------------------
# Tokenizer files: malformed merges, ids and added tokens are one line naming the file


@pytest.mark.parametrize("damage, where", [
    (lambda d: (d / "merges.txt").write_text("#version: 0.2\nĠ t h\n"), "merges.txt:2"),
    (lambda d: (d / "merges.txt").write_text("#version: 0.2\n\x01 \x02\n"), "merges.txt:2"),
    (lambda d: (d / "vocab.json").write_text(json.dumps({"a": "one"})), "vocab.json"),
])
def test_gpt2_tokenizer_files_with_wrong_fields_are_one_line(tiny_model_dir, tmp_path, damage, where):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    damage(d)
    one_error_line(run_limited(["scripts/sample.py", "--model", d]), where)


@pytest.mark.parametrize("added", [[{"content": "<|im_start|>"}], {"id": 1}, [{"content": 3, "id": 1}]],
                         ids=["no id", "not a list", "content not text"])
def test_a_tokenizer_json_with_malformed_added_tokens_is_one_line(smollm2_tokenizer_dir, tmp_path, added):
    from plumbing.tokenizer_files import get_tokenizer

    d = tmp_path / "tok"
    shutil.copytree(smollm2_tokenizer_dir, d)
    obj = json.loads((d / "tokenizer.json").read_text())
    (d / "tokenizer.json").write_text(json.dumps({**obj, "added_tokens": added}))
    with pytest.raises(ValueError, match="tokenizer.json: added_tokens must be a list"):
        get_tokenizer(d)


# -----------------------------------------------------------------------------
# Control characters from a dataset or a model are shown escaped, never run by the terminal


def test_show_escapes_a_datasets_control_characters(tmp_path, gpt2_tokenizer_dir):
    path = tmp_path / "ansi.jsonl"
    msg = [{"role": "user", "content": "clear\x1b[2Jscreen \u202eevil"}, {"role": "assistant", "content": "ok"}]
    path.write_text(json.dumps({"messages": msg}) + "\n")
    r = run_limited(["data.py", "--show", path, "--color", "never", "--tokenizer-dir", gpt2_tokenizer_dir])
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\u202e" not in r.stdout
    assert "clear\\x1b[2Jscreen \\u202eevil" in r.stdout
    assert printable("a\tb\nc\x07") == "a\tb\nc\\x07"
