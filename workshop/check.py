"""workshop/check.py: checks a learner's exercise against handtune's own implementation, in plain words.

Each exercise is one mechanism in workshop/exercises/exN_*.py, a stub to fill in. The checker runs it on
exact cases (token ids, tensors to a tolerance) next to the function handtune itself uses, and says what
differs and why that usually happens ("position 12 is the user's text and is trained"). Every classic SFT
bug has its own check. --reference runs the same checks on handtune's implementation (they all pass).

    python workshop/check.py 1                  # exercise 1, your file
    python workshop/check.py 1 --reference      # the same checks on handtune's own code
    python workshop/check.py all                # every exercise
    python workshop/check.py 1 --file my_ex1.py # another file with the same function
    python workshop/check.py ready              # is this machine ready? packages, weights, step time
"""

import argparse
import importlib.util
import math
import os
import sys
import traceback
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import eval as ev  # noqa: E402
import lora  # noqa: E402
import train  # noqa: E402
from model import GPT, IGNORE_INDEX, GPTConfig  # noqa: E402
from plumbing.tokenizer_files import EOT_ID, get_tokenizer  # noqa: E402
from tasks import resolve_dataset  # noqa: E402

EXERCISES = {1: "ex1_template.py", 2: "ex2_collate.py", 3: "ex3_accumulate.py", 4: "ex4_lora.py",
             5: "ex5_merge.py", 6: "ex6_schedule.py", 7: "ex7_bm25.py", 8: "ex8_forgetting.py"}
TITLES = {1: "the chat template and its loss mask", 2: "collate: the shift and IGNORE_INDEX",
          3: "token-weighted accumulation", 4: "the LoRA layer", 5: "merge and unmerge",
          6: "the learning rate and the update", 7: "BM25 retrieval", 8: "the forgetting measure"}


# -----------------------------------------------------------------------------
# handtune's own implementations, in the exercises' signatures


class Reference:
    """Exercise N's functions as handtune implements them."""

    render_conversation = staticmethod(data.render_conversation)
    collate = staticmethod(data.collate)

    @staticmethod
    def accumulate(model, micro_batches):
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        counted = [(x, y, int((y != IGNORE_INDEX).sum())) for x, y in micro_batches]  # train.py's triples
        loss_sum, counts = train.accumulate(model, counted, nullcontext(), scaler)
        return float(loss_sum) / max(float(counts[0]), 1.0)

    @staticmethod
    def LoRALinear(base, rank, alpha):  # noqa: N802 (a class in the exercise)
        return lora.LoRALinear(base, rank, alpha, dropout=0.0)

    @staticmethod
    def merged_weight(weight, lora_A, lora_B, alpha, rank):
        layer = lora.LoRALinear(torch.nn.Linear(weight.size(1), weight.size(0), bias=False), rank, alpha)
        with torch.no_grad():
            layer.base.weight.copy_(weight), layer.lora_A.copy_(lora_A), layer.lora_B.copy_(lora_B)
        layer.merge()
        return layer.base.weight.detach().clone()

    @staticmethod
    def unmerged_weight(weight, lora_A, lora_B, alpha, rank):
        return weight - (lora_B @ lora_A) * (alpha / rank)

    @staticmethod
    def lr_at(step, max_lr, warmup, max_steps, min_lr):
        return train.lr_at(step, train.Schedule(max_lr, warmup, max_steps, min_lr))

    @staticmethod
    def optimizer_step(optimizer, params, grad_clip):
        return train.optimizer_step(optimizer, torch.amp.GradScaler("cpu", enabled=False), params, grad_clip)

    @staticmethod
    def bm25_scores(documents, query, k1=1.5, b=0.75):
        return ev.BM25(documents, k1, b).scores(query)

    @staticmethod
    def mean_kl(logits_base, logits_tuned):
        lp, lq = (torch.log_softmax(x.float(), dim=-1) for x in (logits_base, logits_tuned))
        return float(ev.kl_divergence(lp, lq).mean())


def load_exercise(n, path):
    """The learner's module for exercise n, from path."""
    spec = importlib.util.spec_from_file_location(f"exercise_{n}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -----------------------------------------------------------------------------
# The checks: each yields (what was checked, None if right else (what is wrong, hint))


def conversations():
    return [
        [{"role": "user", "content": "My router keeps dropping."}, {"role": "assistant", "content": "bug"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "\n\nAgain?"},
         {"role": "assistant", "content": "\n\nYes."}],
    ]


def check_1(impl, tok):
    for k, conv in enumerate(conversations(), start=1):
        want_ids, want_mask = data.render_conversation(conv, tok)
        ids, mask = impl.render_conversation(conv, tok)
        what = f"conversation {k} ({len(conv)} messages)"
        if list(ids) != want_ids:
            i = next((i for i, (a, b) in enumerate(zip(ids, want_ids)) if a != b), min(len(ids), len(want_ids)))
            yield what, (f"token ids differ first at position {i} (yours {list(ids)[i:i + 3]}, expected "
                         f"{want_ids[i:i + 3]})", "tokenize the EOT, the header and the content each on "
                         "its own: encoded together, BPE merges across the boundary ('\\n' + '\\n\\n')")
            continue
        for i, (m, w) in enumerate(zip(mask, want_mask)):
            if m != w:
                piece = tok.decode([ids[i]]).replace("\n", "\\n")
                if ids[i] == EOT_ID:
                    why = ("the EOT after a reply must be trained: it is how the model learns to stop" if w
                           else "only the EOT right after an assistant reply is trained")
                else:
                    why = ("it is the assistant's reply and must be trained" if w else
                           "it is a header or the system/user text: context, never trained")
                yield what, (f"position {i} ({piece!r}) has mask {m}, expected {w}", why)
                break
        else:
            yield what, None


def check_2(impl, tok):
    examples = [data.render_conversation(c, tok) for c in conversations()]
    want_x, want_y = data.collate(examples, pad_id=EOT_ID)
    x, y = impl.collate(examples, EOT_ID)
    yield "shapes", None if tuple(x.shape) == tuple(want_x.shape) and tuple(y.shape) == tuple(want_y.shape) \
        else (f"inputs {tuple(x.shape)} and targets {tuple(y.shape)}, expected {tuple(want_x.shape)}",
              "T is the longest example minus one: the last token is only ever a target")
    if x.shape != want_x.shape or y.shape != want_y.shape:
        return
    yield "inputs", None if torch.equal(x, want_x) else ("inputs differ", "inputs are ids[:-1], padded with "
                                                          "pad_id on the right")
    unshifted = torch.full_like(want_y, IGNORE_INDEX)  # the classic bug: targets = the inputs themselves
    for row, (ids, mask) in enumerate(examples):
        for t in range(len(ids) - 1):
            unshifted[row, t] = ids[t] if mask[t] else IGNORE_INDEX
    bad = (y != want_y).nonzero()
    if len(bad):
        b, t = bad[0].tolist()
        if torch.equal(y, unshifted) or (y[b, t] != IGNORE_INDEX and y[b, t] == x[b, t]):
            hint = "targets are unshifted: position t must predict token t + 1 (ids[1:], mask[1:])"
        elif y[b, t] != IGNORE_INDEX and want_y[b, t] == IGNORE_INDEX:
            hint = "a position that is padding or not trained must be IGNORE_INDEX"
        else:
            hint = "a trained target is missing: use mask[1:] to decide, the mask of the target token"
        yield "targets", (f"row {b}, position {t}: {int(y[b, t])}, expected {int(want_y[b, t])}", hint)
    else:
        yield "targets", None


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16))


def micro_batches():
    """Two micro-batches with very different numbers of trained tokens (where a mean of means is wrong)."""
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randint(0, 64, (2, 12), generator=g), torch.randint(0, 64, (2, 12), generator=g)
    y1, y2 = x1.roll(-1, 1).clone(), x2.roll(-1, 1).clone()
    y1[:, :10] = IGNORE_INDEX  # 4 trained tokens
    y2[:, :1] = IGNORE_INDEX  # 22 trained tokens
    return [(x1, y1), (x2, y2)]


def check_3(impl, tok):
    ref, mine = tiny_model(), tiny_model()
    want = Reference.accumulate(ref, micro_batches())
    got = impl.accumulate(mine, micro_batches())
    yield "the loss", None if got is not None and math.isclose(float(got), want, rel_tol=1e-5) else \
        (f"{got} , expected {want:.6f}", "sum the token losses over all micro-batches, divide by all "
         "trained tokens (a mean of per-batch means weighs the 4-token batch like the 22-token one)")
    diffs = [(n, (p.grad - q.grad).abs().max().item() if p.grad is not None else math.inf)
             for (n, p), (_, q) in zip(mine.named_parameters(), ref.named_parameters())]
    worst = max(diffs, key=lambda d: d[1])
    yield "the gradient", None if worst[1] < 1e-5 else \
        (f"{worst[0]}'s gradient differs by {worst[1]:.2e}", "divide each micro-batch's summed loss by the "
         "whole step's trained-token count before backward, not by its own count")


def check_4(impl, tok):
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    layer = impl.LoRALinear(base, rank=2, alpha=4.0)
    x = torch.randn(3, 8)
    yield "starts as the pretrained layer", None if torch.allclose(layer(x), base(x), atol=1e-6) else \
        ("at initialisation the output differs from the frozen layer's", "B must start at zero (B random "
         "makes the first step start from a different model)")
    with torch.no_grad():
        layer.lora_A.normal_(), layer.lora_B.normal_()
    want = base(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * (4.0 / 2)
    yield "the update is B A x * alpha / r", None if torch.allclose(layer(x), want, atol=1e-5) else \
        ("with non-zero A and B the output is not W x + (alpha / r) B A x", "scale the update by alpha / "
         "rank, and compute x @ A.T @ B.T")
    yield "only A and B are trained", None if not any(p.requires_grad for p in base.parameters()) else \
        ("the pretrained weight still requires a gradient", "freeze base (requires_grad_(False))")


def check_5(impl, tok):
    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(6, 8, generator=g), torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    want = Reference.merged_weight(w, a, b, 4.0, 2)
    got = impl.merged_weight(w.clone(), a, b, 4.0, 2)
    scale_bug = torch.allclose(got, w + b @ a, atol=1e-5)
    yield "merge", None if torch.allclose(got, want, atol=1e-5) else \
        ("the merged weight is not W + B A * alpha / r", "you left out the alpha / r scale" if scale_bug
         else "the update is lora_B @ lora_A, shape (out, in)")
    back = impl.unmerged_weight(got, a, b, 4.0, 2)
    yield "unmerge undoes merge", None if torch.allclose(back, w, atol=1e-5) else \
        ("unmerge(merge(W)) is not W", "subtract exactly what merge added")


def check_6(impl, tok):
    cases = [(s, 1.0, 5, 50, 0.1) for s in (0, 2, 4, 5, 20, 49)] + [(0, 1.0, 0, 5, 0.0)]
    for case in cases:
        want, got = Reference.lr_at(*case), impl.lr_at(*case)
        if not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12):
            yield "the schedule", (f"lr_at{case} = {got}, expected {want}", "warmup reaches max_lr at step "
                                   "warmup - 1; the cosine reaches min_lr at step max_steps - 1")
            break
    else:
        yield "the schedule", None
    runs = []
    for step_fn in (Reference.optimizer_step, impl.optimizer_step):
        model = tiny_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x, y = micro_batches()[1]
        model(x, y)[1].mul(1000).backward()  # a large gradient: clipping matters
        norm = step_fn(opt, list(model.parameters()), 1.0)
        runs.append((float(norm), [p.detach().clone() for p in model.parameters()],
                     all(p.grad is None or not p.grad.any() for p in model.parameters())))
    (want_norm, want_params, _), (norm, params, cleared) = runs
    yield "the norm returned", None if math.isclose(norm, want_norm, rel_tol=1e-4) else \
        (f"{norm:.4g}, expected {want_norm:.4g}", "return the global norm before clipping")
    same = all(torch.allclose(p, q, atol=1e-6) for p, q in zip(params, want_params))
    yield "the update", None if same else ("the weights after the step differ", "clip the global norm of "
                                           "all parameters together (clip_grad_norm_), then step")
    yield "gradients cleared", None if cleared else ("gradients left after the step",
                                                     "call optimizer.zero_grad() after stepping")


def check_7(impl, tok):
    docs = ["The router drops the connection", "Refund my order", "router router firmware update",
            "Support opens at 8 am"]
    for query in ("router dropping", "refund order", "router router firmware"):
        want, got = Reference.bm25_scores(docs, query), impl.bm25_scores(docs, query)
        if not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(got, want)) or \
                len(got) != len(want):
            yield f"query {query!r}", (f"scores {[round(s, 4) for s in got]}, expected "
                                       f"{[round(s, 4) for s in want]}", "count each distinct query word "
                                       "once; idf = ln(1 + (N - n + 0.5) / (n + 0.5))")
        else:
            yield f"query {query!r}", None


def check_8(impl, tok):
    g = torch.Generator().manual_seed(0)
    lb, lt = torch.randn(2, 5, 40, generator=g), torch.randn(2, 5, 40, generator=g)
    want = Reference.mean_kl(lb, lt)
    got = impl.mean_kl(lb, lt)
    reversed_kl = Reference.mean_kl(lt, lb)
    yield "KL(base || tuned)", None if math.isclose(float(got), want, rel_tol=1e-4) else \
        (f"{float(got):.5f}, expected {want:.5f}", "that is KL(tuned || base): weigh by the base model's "
         "probabilities" if math.isclose(float(got), reversed_kl, rel_tol=1e-4) else
         "sum p_base * (log p_base - log p_tuned) over the vocabulary, then average over positions")
    same = impl.mean_kl(lb, lb)
    yield "zero for identical models", None if abs(float(same)) < 1e-6 else (f"{float(same)}", "KL(p || p) is 0")
    small = impl.mean_kl(lb.bfloat16(), (lb + 0.01).bfloat16())
    yield "precise for a small change", None if float(small) >= 0 else \
        (f"{float(small)}: negative", "take log_softmax in float32 (.float()), not in bf16")


CHECKS = {1: check_1, 2: check_2, 3: check_3, 4: check_4, 5: check_5, 6: check_6, 7: check_7, 8: check_8}


# -----------------------------------------------------------------------------


def run_checks(n, impl, tok, out=print):
    """Run exercise n's checks on impl; print each in plain words; return True if all passed."""
    out(f"exercise {n}: {TITLES[n]}")
    passed = failed = 0
    try:
        for what, problem in CHECKS[n](impl, tok):
            if problem is None:
                passed += 1
                out(f"  ok    {what}")
            else:
                failed += 1
                out(f"  FAIL  {what}: {problem[0]}\n        hint: {problem[1]}")
    except NotImplementedError as e:
        out(f"  not written yet: {e} (fill in the TODO in workshop/exercises/{EXERCISES[n]})")
        return False
    except Exception as e:  # the learner's code raised: say where, in one line
        frame = traceback.extract_tb(e.__traceback__)[-1]
        out(f"  your code raised {type(e).__name__}: {e} (at {os.path.basename(frame.filename)}:"
            f"{frame.lineno})")
        return False
    out(f"  {'passed' if not failed else f'{failed} of {passed + failed} checks failed'}")
    return failed == 0


def ready(tokenizer_dir):
    """Is this machine ready for the workshop? The packages, GPT-2's tokenizer (the exercises' checks),
    SmolLM2's weights (the runs), and how long one LoRA training step of SmolLM2 takes here. Returns the
    exit code."""
    import time

    from plumbing.device import setup_runtime
    from plumbing.hub import find_smollm2_gguf

    problems = []
    for name in ("numpy", "tiktoken", "tqdm", "matplotlib", "gguf"):
        if importlib.util.find_spec(name) is None:
            problems.append(f"the {name} package is missing: pip install -r requirements.txt gguf")
    try:
        get_tokenizer(tokenizer_dir)
        print("ok    GPT-2's tokenizer (the exercises' checks)")
    except (OSError, ValueError, RuntimeError) as e:
        problems.append(f"GPT-2's tokenizer: {e}")
    try:
        gguf_path = find_smollm2_gguf()
        print(f"ok    SmolLM2-135M-Instruct: {gguf_path}")
    except FileNotFoundError as e:
        problems.append(str(e))
        gguf_path = None
    if gguf_path and not problems:
        cfg = train.TrainConfig(model=gguf_path, batch_size=8)
        rt, _, _ = setup_runtime("auto", "auto", lambda *a: None)
        s = train.setup_training(cfg, rt, gguf_path, lambda *a: None)
        tok = get_tokenizer(gguf_path)
        convs = data.load_conversations(resolve_dataset("triage", "train"))[:16]
        examples, _ = data.tokenize_dataset(convs, tok, 1024)
        stream = train.BatchStream(examples, 8, 0, rt, data.chat_format(tok).pad_id)
        times = []
        for _ in range(3):
            t0 = time.time()
            train.train_step(s, [stream.next()], 1e-4, 1.0)
            times.append(time.time() - t0)
        step = min(times[1:])
        print(f"ok    one LoRA step of SmolLM2 (batch 8) takes {step:.1f} s on {rt.device} ({rt.dtype}): "
              f"a 20-step run about {20 * step / 60:.1f} min")
    for p in problems:
        print(f"FAIL  {p}")
    print("ready" if not problems else "not ready: fix the lines above")
    return 0 if not problems else 1


def exercise_numbers(arg, file):
    """[N] or every exercise for "all"; anything else (or --file with several) exits in one line."""
    numbers = list(EXERCISES) if arg == "all" else [arg]
    try:
        numbers = [int(n) for n in numbers]
        if not set(numbers) <= set(EXERCISES) or (file and len(numbers) > 1):
            raise ValueError
    except ValueError:
        sys.exit(f"error: exercise {arg}: choose 1-{len(EXERCISES)} or all (--file: one exercise)")
    return numbers


def learner_module(n, file):
    """The learner's module for exercise n (file, else the shipped stub); a file that does not load exits in
    one line."""
    path = file or os.path.join(ROOT, "workshop", "exercises", EXERCISES[n])
    try:
        return load_exercise(n, path)
    except Exception as e:  # a syntax error in the learner's file: one line, where
        sys.exit(f"error: {path}: {type(e).__name__}: {e}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Check a workshop exercise against handtune's own code.")
    p.add_argument("exercise", help="1-8, all, or ready (is this machine ready for the workshop?)")
    p.add_argument("--reference", action="store_true", help="check handtune's implementation instead")
    p.add_argument("--file", help="the file with your functions (default: workshop/exercises/exN_*.py)")
    p.add_argument("--tokenizer-dir", help="GPT-2's vocab.json + merges.txt (default: tiktoken's gpt2)")
    args = p.parse_args(argv)
    if args.exercise == "ready":
        return ready(args.tokenizer_dir)
    numbers = exercise_numbers(args.exercise, args.file)
    try:
        tok = get_tokenizer(args.tokenizer_dir)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    ok = True
    for n in numbers:
        impl = Reference if args.reference else learner_module(n, args.file)
        ok = run_checks(n, impl, tok) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
