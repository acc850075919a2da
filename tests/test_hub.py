"""The downloader, against a stand-in hub on 127.0.0.1 (never the network): what arrives is kept only once
it verifies (every announced byte, not an HTML page, the pinned sha256, a sound file of its kind); two
processes fetching the same preset at once both succeed; a redirect off https is refused; a damaged file in
the cache is reported with what to do.

    python -m pytest tests/test_hub.py -q
"""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

import plumbing.hub as hub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cached(tmp_path, preset="gpt2-medium"):
    d = tmp_path / "cache" / preset
    return sorted(f for f in os.listdir(d) if not f.endswith(".lock")) if d.is_dir() else []


def test_a_preset_downloads_once_and_verified_files_are_recorded(hub_server, tmp_path):
    d = hub.resolve_pretrained("gpt2-medium")
    assert cached(tmp_path) == sorted([*hub.HUB_FILES, hub.DOWNLOADS])  # nothing temporary left
    assert hub_server.hits[0] == "/openai-community/gpt2-medium/resolve/main/config.json"
    record = json.loads((tmp_path / "cache" / "gpt2-medium" / hub.DOWNLOADS).read_text())
    assert record["vocab.json"]["bytes"] == 2
    hub.resolve_pretrained("gpt2-medium")
    assert len(hub_server.hits) == len(hub.HUB_FILES)  # the second call finds everything cached
    assert d == str(tmp_path / "cache" / "gpt2-medium")


def test_a_pinned_preset_fetches_its_revision_and_refuses_another_file(hub_server, tmp_path):
    with pytest.raises(ValueError, match="sha256 .* is not the pinned 248dfc39"):
        hub.resolve_pretrained("gpt2")
    revision = hub.HUB_PINS["gpt2"][0]
    assert f"/openai-community/gpt2/resolve/{revision}/model.safetensors" in hub_server.hits
    assert "model.safetensors" not in cached(tmp_path, "gpt2")  # the wrong file was not kept


@pytest.mark.parametrize("mode, why", [("truncated", "closed after"), ("html", "HTML page"),
                                       ("redirect-http", "refused a redirect")])
def test_a_bad_download_leaves_nothing_in_the_cache(hub_server, tmp_path, mode, why):
    hub_server.modes["model.safetensors"] = mode
    with pytest.raises((ValueError, RuntimeError), match=why):
        hub.resolve_pretrained("gpt2-medium")
    assert "model.safetensors" not in cached(tmp_path)
    assert not [f for f in cached(tmp_path) if f.endswith(".part")]
    hub_server.modes.clear()  # the next run fetches it whole
    hub.resolve_pretrained("gpt2-medium")
    assert "model.safetensors" in cached(tmp_path)


def test_a_json_file_that_does_not_parse_is_not_cached(hub_server, tmp_path):
    hub_server.files["config.json"] = b"{ not json"
    with pytest.raises(ValueError, match="config.json.*not valid JSON"):
        hub.resolve_pretrained("gpt2-medium")
    assert cached(tmp_path) == []


def test_redirects_may_leave_the_host_over_https_only():
    handler = hub.HttpsOnlyRedirects()
    req = urllib.request.Request("https://huggingface.co/x/resolve/main/model.safetensors")
    follow = handler.redirect_request(req, None, 302, "Found", {}, "https://cdn-lfs.huggingface.co/blob")
    assert follow.full_url == "https://cdn-lfs.huggingface.co/blob"
    with pytest.raises(urllib.error.URLError, match="not https"):
        handler.redirect_request(req, None, 302, "Found", {}, "http://cdn-lfs.huggingface.co/blob")


def test_two_processes_fetching_the_same_preset_both_succeed(hub_server, tmp_path):
    hub_server.modes["model.safetensors"] = "slow"
    code = "import plumbing.hub as h; print(h.resolve_pretrained('gpt2-medium'))"
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert cached(tmp_path) == sorted([*hub.HUB_FILES, hub.DOWNLOADS])
    assert hub_server.hits.count("/openai-community/gpt2-medium/resolve/main/model.safetensors") == 1


def test_a_damaged_cached_file_is_reported_with_what_to_do(hub_server, tmp_path):
    d = hub.resolve_pretrained("gpt2-medium")
    with open(os.path.join(d, "model.safetensors"), "ab") as f:
        f.write(b"junk")  # a later write, a disk error: not what was verified
    with pytest.raises(ValueError, match=r"delete it \(rm .*model.safetensors\) and run again"):
        hub.resolve_pretrained("gpt2-medium")


def test_offline_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDTUNE_HUB", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(RuntimeError, match="Offline.*pass that directory"):
        hub.resolve_pretrained("gpt2-medium", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path / "gpt2-medium") in ([], ["config.json.lock"])
    with pytest.raises(FileNotFoundError, match="neither a model directory nor a preset"):
        hub.resolve_pretrained(str(tmp_path / "nope"))


def test_an_http_error_is_named_not_taken_for_being_offline(hub_server, tmp_path):
    del hub_server.files["merges.txt"]  # the stand-in answers 404
    with pytest.raises(RuntimeError, match=r"merges.txt: HTTP 404"):
        hub.resolve_pretrained("gpt2-medium")
    assert "merges.txt" not in cached(tmp_path) and not any(f.endswith(".part") for f in cached(tmp_path))
