"""GPU tests: what the CPU suite cannot show. Opt-in and skipped without CUDA; a user with a GPU runs

    python -m pytest -q -m gpu tests/test_gpu.py

(the plain `pytest` hides GPUs so that the rest of the suite is exact on every machine; see conftest.py).
bf16 and fp16 LoRA / full steps, exact resume on the GPU, --compile without recompiles, the KV cache, the
dtype the capability implies, and the FLOP count against FlopCounterMode with the GPU's attention kernels.
"""

import json
import os

import pytest
import torch
from conftest import adapter_weights, base_args, metrics, no_cache_greedy, run_main, run_script

import lora
from model import GPT, IGNORE_INDEX, GPTConfig, generate
from plumbing.device import choose_dtype
from plumbing.flops import flop_costs, step_flops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """Every test here starts from full-precision fp32 matmuls, whatever an earlier test (or --compile's
    defaults) left: TF32 rounds to 10 bits and would break exact comparisons by chance of order."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def gpu_args(model_dir, chats, out, **over):
    return base_args(model_dir, chats, out, **{"--device": DEVICE, **over})


def test_auto_dtype_is_what_the_compute_capability_implies():
    major, _ = torch.cuda.get_device_capability()
    assert choose_dtype(DEVICE)[0] == ("bfloat16" if major >= 8 else "float16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("full", [False, True])
def test_half_precision_steps_train(dtype, full, tiny_model_dir, chats, tmp_path):
    if dtype == "bfloat16" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 is emulated before compute capability 8.0")
    out = tmp_path / "o"
    over = {"--dtype": dtype, "--max-steps": 12, "--lr": 5e-3 if full else 1e-2, "--full": full,
            "--lora-dropout": None if full else 0.2}
    assert run_main(gpu_args(tiny_model_dir, chats, out, **over)) == 0
    losses = [r["loss"] for r in metrics(out)]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    run = json.loads((out / "run.json").read_text())
    assert run["dtype"] == dtype and run["device"].startswith("cuda")


def test_resume_on_the_gpu_reproduces_the_uninterrupted_run(tiny_model_dir, chats, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    device = f"cuda:{torch.cuda.device_count() - 1}"  # the last GPU: its random state must be the one saved
    common = {"--device": device, "--dtype": "float32"}
    assert run_main(base_args(tiny_model_dir, chats, a, **common)) == 0
    assert run_main(base_args(tiny_model_dir, chats, b, **common, **{"--stop-after": 3})) == 0
    assert run_main(base_args(tiny_model_dir, chats, b, **common, **{"--resume": True})) == 0
    for ra, rb in zip(metrics(a), metrics(b)):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    wa, wb = adapter_weights(a), adapter_weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)


def test_compile_on_the_gpu_traces_once(tiny_model_dir, chats, tmp_path):
    env = dict(os.environ, TORCH_LOGS="recompiles,graph_breaks")
    r = run_script(gpu_args(tiny_model_dir, chats, tmp_path / "c", **{"--compile": True, "--eval-every": 0,
                                                                       "--save-every": 0, "--dtype": "auto"}),
                   env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "raph break" not in log and log.count("Recompiling function") <= 1


def test_kv_cache_generation_equals_recompute_on_the_gpu():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=24, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).to(DEVICE).eval()
    idx = torch.randint(0, 64, (2, 7), device=DEVICE)
    assert torch.equal(generate(m, idx, 40), no_cache_greedy(m, idx, 40))


@pytest.mark.parametrize("full", [False, True])
def test_step_flops_agree_with_flop_counter_mode_on_gpu_kernels(full):
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=256, n_layer=2, n_head=4, n_embd=256)).to(DEVICE)
    if full:
        m.requires_grad_(True)
    else:
        lora.apply_lora(m, 16, 32.0, 0.0)
    x = torch.randint(0, 50257, (4, 256), device=DEVICE)
    y = torch.roll(x, -1, 1)
    y[:, :128] = IGNORE_INDEX
    with torch.autocast("cuda", dtype=torch.bfloat16), FlopCounterMode(display=False) as fc:
        m(x, y, reduction="sum")[1].backward()
    ours = step_flops(flop_costs(m), [(x, y, int((y != IGNORE_INDEX).sum()))])
    assert abs(ours / fc.get_total_flops() - 1) < 0.10


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8,
                    reason="bf16 is emulated before compute capability 8.0")
def test_batched_generation_equals_one_at_a_time_in_bf16():
    """Left-padded prompts in one batch under bf16 autocast against each prompt alone. Padding changes the
    shapes the kernels reduce over, so bf16 (8 significant bits) can round differently: the next-token
    logits must agree within 0.05 (a few roundings of a logit of size ~4), and the greedy token wherever
    the prompt's own top-2 margin is wider than that."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64)).to(DEVICE).eval()
    prompts = [torch.randint(1, 256, (n,)).tolist() for n in (5, 17, 11, 3)]
    T = max(map(len, prompts))
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=DEVICE)  # pad id 0 on the left
    mask = idx != 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        batched = m.lm_head(m.trunk(idx, mask=mask))[:, -1].float()  # (4, vocab)
        first = generate(m, idx, 1, mask=mask)[:, T]
        for i, p in enumerate(prompts):
            alone = m.lm_head(m.trunk(torch.tensor([p], device=DEVICE)))[0, -1].float()
            assert (batched[i] - alone).abs().max() < 0.05
            top2 = alone.topk(2).values
            if top2[0] - top2[1] > 0.05:
                assert first[i] == alone.argmax()
