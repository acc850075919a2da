"""What the first GPU run needs, checked on the CPU: a training step waits for the device at most once
outside logging steps, the busy fraction counts device kernels once (never above 100%), out of memory says
what to change and run.json records it, fp16's skipped steps are counted and metrics.jsonl stays valid
JSON.

    python -m pytest tests/test_gpu_check.py -q
"""

import json

import pytest
import torch
from conftest import base_args, run_main
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

import train
from plumbing.benchmark import HostReads, busy_fraction
from plumbing.runs import append_metrics


def test_host_reads_sees_what_would_make_the_host_wait_for_a_gpu():
    t = torch.arange(-3.0, 5.0)
    with HostReads("cpu") as reads:
        t[t > 0]  # boolean-mask indexing: the result's size depends on the data
        t.sum().item()  # a value read back
        reads.mark()
        torch.nonzero_static(t > 0, size=4)  # the size given: nothing to wait for
        t[torch.tensor([1, 2])] * 2  # integer indices: the size is known
    assert reads.counts == [["aten::index.Tensor", "aten::_local_scalar_dense"], []]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_training_step_waits_for_the_device_at_most_once_outside_logging(dtype, tiny_model_dir, chats,
                                                                           tmp_path):
    """train.py's loop, 2 micro-batches per step, every wait counted per iteration: the non-finite check is
    the only one (fp16 leaves it to the scaler, whose own read of its CPU flag is not dispatched); loss,
    norm, speed and the skipped-step count are read when logged."""
    import gpu_check

    args = base_args(tiny_model_dir, chats, tmp_path / "s", **{"--log-every": 4, "--eval-every": 0,
                                                                 "--save-every": 0, "--dtype": dtype})
    r = gpu_check.loop_reads(args, "cpu")
    assert r["logged"] == [4, 8] and len(r["per_step"]) == 8
    quiet = [n for step, n in enumerate(r["per_step"], 1) if step not in (4, 8)]
    assert quiet == [1 if dtype == "float32" else 0] * 6, r


def event(start, end, device):
    return FunctionEvent(id=0, name="k", thread=0, start_us=start, end_us=end, device_type=device)


def test_busy_fraction_counts_each_kernel_once_and_never_exceeds_one():
    events = [event(0, 100, DeviceType.CPU),  # a CPU op spanning its kernels: not device time
              event(10, 30, DeviceType.CUDA), event(20, 40, DeviceType.CUDA),  # overlapping streams: 30 us
              event(60, 70, DeviceType.CUDA)]
    assert busy_fraction(events, 100) == pytest.approx(0.4)
    assert busy_fraction(events, 20) == 1.0  # a wall shorter than the kernels (clock skew) caps at 100%
    assert busy_fraction([event(0, 50, DeviceType.CPU)], 100) == 0.0


def test_out_of_memory_says_what_to_change_and_run_json_records_it(tiny_model_dir, chats, tmp_path, capsys,
                                                                 monkeypatch):
    def oom(*args, **kwargs):
        raise train.OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_step", oom)
    out = tmp_path / "o"
    assert run_main(base_args(tiny_model_dir, chats, out, **{"--batch-size": 4})) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1:]  # (the progress bar writes to stderr too)
    assert err[0].startswith("error: out of memory on cpu at batch 4")
    assert "--batch-size 2 --grad-accum 4" in err[0] and "a shorter --max-len" in err[0]
    assert "LoRA instead" not in err[0]  # a LoRA run: advice it can follow
    assert json.loads((out / "run.json").read_text())["status"] == "out_of_memory"


def test_metrics_lines_stay_valid_json_with_a_non_finite_number(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, {"step": 1, "loss": 2.0, "grad_norm": float("inf"), "skipped": True})
    assert json.loads(path.read_text()) == {"step": 1, "loss": 2.0, "grad_norm": None, "skipped": True}


def test_fp16_steps_the_scaler_skips_are_counted(tiny_model_dir, chats, tmp_path, capsys, monkeypatch):
    """A forced overflow (a huge gradient at every step) under fp16's scaler on the CPU: every step is
    skipped, counted in the final line, and logged as skipped with a null gradient norm."""
    real = train.accumulate

    def overflowing(model, micro, autocast, scaler, rt=None):
        loss_sum, counts = real(model, micro, autocast, scaler, rt)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(float("inf"))
        return loss_sum, counts

    monkeypatch.setattr(train, "accumulate", overflowing)
    out = tmp_path / "o"
    assert run_main(base_args(tiny_model_dir, chats, out, **{"--max-steps": 3, "--dtype": "float16"})) == 0
    assert "(3 fp16 steps skipped by the scaler)" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["skipped"] is True and r["grad_norm"] is None for r in records)


def test_gpu_check_runs_every_stage_with_the_device_swapped_and_ends_in_a_summary(gpt2_tokenizer_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--quick", "--out",
                        str(tmp_path), "--tokenizer-dir", str(gpt2_tokenizer_dir)], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = r.stdout.split("## summary", 1)[1]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| stage")}
    assert set(rows) == {"tokenizer", "random gpt2", "step lora", "step full", "random gpt2-xl",
                         "host waits per step (train.py's loop, LoRA)", "peak lora (gpt2-xl, 2 x 64)",
                         "peak full (gpt2-xl, 2 x 64)"}
    assert rows["host waits per step (train.py's loop, LoRA)"].startswith("1 per step outside logging")
    assert not any(v.startswith("FAILED") for v in rows.values())
    for kind in ("lora", "full"):
        ratio = float(rows[f"step {kind}"].split("FLOPs vs FlopCounterMode ")[1].split(",")[0])
        assert 0.8 < ratio < 1.2, rows[f"step {kind}"]  # our FLOP count against torch's, on the CPU too
    assert (tmp_path / "gpu_check.md").read_text().strip().endswith(summary.strip().splitlines()[-1])
