"""workshop/see.py: see what your exercise does, plugged into handtune's real pipeline on SmolLM2-135M.

check.py says whether a mechanism is right; see.py shows what it does to a model in a short run on a
laptop: your chat template trained for a few steps (and again with the end-of-turn token left untrained:
does the model still stop?), your collate against labels that were never shifted, your accumulation against
a mean of per-batch means on the same batches, your LoRA layer and merge inside the real model, your
schedule and update step driving a run, your BM25 feeding the retrieval rung, your KL measuring what a too
high learning rate costs. Each run prints what to look at, and its wall time.

    python workshop/see.py 1                 # your exercise 1 (workshop/exercises/ex1_template.py)
    python workshop/see.py 1 --reference     # the same run with handtune's implementation
    python workshop/see.py 3 --file mine.py  # another file with the exercise's functions
    python workshop/see.py all --quick       # every run with a tiny random model, seconds (what CI runs)
"""

import argparse
import copy
import os
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "lab"))
sys.path.insert(2, os.path.join(ROOT, "workshop"))
import common  # noqa: E402  (lab/common.py: the lab's in-process fine-tuning and scoring)
from check import TITLES, Reference, exercise_numbers, learner_module  # noqa: E402

import data  # noqa: E402
import eval as ev  # noqa: E402
import lora  # noqa: E402
import train  # noqa: E402
from model import IGNORE_INDEX, generate  # noqa: E402
from tasks import load_items, load_store, score  # noqa: E402

# -----------------------------------------------------------------------------
# Plumbing shared by the runs: the model, a learner's function swapped into handtune's, a few replies


@contextmanager
def plugged(module, name, replacement):
    """module.name is replacement inside the block: handtune's pipeline then calls the learner's code."""
    saved = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, saved)


def triage(split, n):
    return load_items("triage", split, n)[0]


def reply(lab, model, prompt_ids, max_new):
    """Greedy reply to one prompt: (text, stopped by itself?)."""
    idx = torch.tensor([prompt_ids], device=lab.rt.device)
    with torch.no_grad(), torch.autocast(lab.rt.device.split(":")[0], enabled=False):
        out = generate(model, idx, max_new, stop_token=lab.fmt.stop_ids[0])[0, len(prompt_ids):].tolist()
    stop = next((i for i, t in enumerate(out) if t in lab.fmt.stop_ids), None)
    return lab.tok.decode(out[:stop]), stop is not None


def show_replies(lab, model, prompts, max_new, label):
    stopped = 0
    for p in prompts:
        text, stop = reply(lab, model, p, max_new)
        stopped += stop
        print(f"  [{label}] {'stops' if stop else 'RUNS ON'}: {text[:110]!r}")
    return stopped


def losses_line(losses):
    return " ".join(f"{x:.2f}" for x in losses[:: max(1, len(losses) // 10)])


# -----------------------------------------------------------------------------
# The runs, one per exercise


def see_1(impl, lab, args):
    """Your template trains SmolLM2; then the same run with the end-of-turn token after each reply
    left out of the loss."""
    eot = lab.fmt.document_id  # SmolLM2's <|endoftext|> plays GPT-2's EOT in the exercise's template
    if impl is not Reference:
        impl.EOT_ID = eot
        render = lambda msgs: impl.render_conversation(msgs, lab.tok)  # noqa: E731
        prompt_of = lambda msgs: render(msgs + [{"role": "assistant", "content": ""}])[0][:-1]  # noqa: E731
        print("your template (plain headers, EOT = SmolLM2's <|endoftext|>): a format SmolLM2 never saw, so "
              "stopping after a reply is something only the trained EOT can teach it")
    else:
        render = lambda msgs: data.render_conversation(msgs, lab.tok)  # noqa: E731
        prompt_of = lambda msgs: data.render_prompt(msgs, lab.tok)  # noqa: E731
        print("handtune's template for SmolLM2 is ChatML, whose end token the instruct model already emits")
    convs = [r["messages"] for r in triage("train", 200)]
    if any(t >= lab.base.config.vocab_size for t in render(convs[0])[0]):
        raise ValueError("your render_conversation wrote a token id past SmolLM2's vocabulary: use EOT_ID, "
                         "not the number 50256, so see.py can swap in SmolLM2's EOT")
    stops = set(lab.fmt.stop_ids)

    def no_stop(msgs):  # the token that closes each reply (trained, a stop id) no longer trained
        ids, mask = render(msgs)
        return ids, [0 if t in stops else m for t, m in zip(ids, mask)]
    prompts = [prompt_of(ev.split_reply(r["messages"])[0]) for r in triage("test", args.items)]
    for name, fn in (("EOT trained", render), ("EOT not trained", no_stop)):
        model, losses = common.finetune(lab, convs, args.steps, desc=name, render=fn, dedup=False)
        print(f"{name}: loss {losses_line(losses)}")
        n = show_replies(lab, model, prompts, args.max_new, name)
        print(f"{name}: {n} of {len(prompts)} replies stop by themselves within {args.max_new} tokens")
    print("look at: how many replies stop by themselves. A new end token takes more than a few steps to learn "
          "(with your template neither run stopped within 12 steps when this was measured; with handtune's "
          "ChatML the instruct model stops either way); lab/masking.py measures the difference at 32 steps "
          "of 8 on 250 messages (results/masking.md)")


def see_2(impl, lab, args):
    """Your collate feeds the training loop; then a collate that forgot the shift."""
    collate = data.collate  # handtune's, before the swap below

    def unshifted(examples, pad_id):  # the classic bug: the target of position t is token t itself
        x, y = collate(examples, pad_id)
        y = torch.where(y == IGNORE_INDEX, y, x)
        return x, y
    convs = [r["messages"] for r in triage("train", 200)]
    prompts = [common.prompts_of(lab, [r], args.max_new)[0] for r in triage("test", args.items)]
    for name, fn in (("your collate", lambda b, pad_id: impl.collate(b, pad_id)), ("unshifted labels", unshifted)):
        with plugged(data, "collate", fn):
            model, losses = common.finetune(lab, convs, args.steps, desc=name)
        print(f"{name}: loss {losses_line(losses)}")
        show_replies(lab, model, prompts, args.max_new, name)
    print("look at: unshifted labels train the model to copy its input: the loss starts far above the "
          "shifted run's and falls fast as it learns to, while the replies fall apart into loops")


def see_3(impl, lab, args):
    """Your accumulation against one big batch and against a mean of per-batch means, same batches."""
    examples, _ = data.tokenize_dataset([r["messages"] for r in triage("train", 40)], lab.tok,
                                        lab.base.config.block_size)
    # micro-batches of unequal weight: one short example, then the six with the most trained tokens
    examples.sort(key=lambda e: sum(e[1]))
    micro = [data.collate(examples[:1], lab.fmt.pad_id), data.collate(examples[-6:], lab.fmt.pad_id)]
    model = copy.deepcopy(lab.base).float()
    lora.apply_lora(model, 8, 16.0)

    def grads(fn):
        model.zero_grad()
        fn()
        return torch.cat([p.grad.flatten() for p in lora.lora_parameters(model)])
    ours = grads(lambda: impl.accumulate(model, micro))
    x = torch.cat([torch.nn.functional.pad(a, (0, max(b.size(1) for b, _ in micro) - a.size(1)),
                                           value=lab.fmt.pad_id) for a, _ in micro])
    y = torch.cat([torch.nn.functional.pad(b, (0, x.size(1) - b.size(1)), value=IGNORE_INDEX) for _, b in micro])
    big = grads(lambda: model(x, y)[1].backward())
    means = grads(lambda: sum(model(a, b)[1] / len(micro) for a, b in micro).backward())
    rel = lambda g: float((g - big).norm() / big.norm())  # noqa: E731
    counts = [int((b != IGNORE_INDEX).sum()) for _, b in micro]
    print(f"two micro-batches with {counts[0]} and {counts[1]} trained tokens")
    print(f"  your accumulate vs one big batch: relative gradient difference {rel(ours):.2e}")
    print(f"  a mean of per-batch means vs one big batch: {rel(means):.2e}")
    print("look at: token weighting gives the big batch's gradient (up to rounding); the mean of means weighs "
          f"each of the {counts[0]} tokens of the first batch like {counts[1] / max(counts[0], 1):.0f} of the "
          "second's")


def see_4(impl, lab, args):
    """Your LoRA layer inside SmolLM2: the start equals the base model, then a short run."""
    convs = [r["messages"] for r in triage("train", 200)]
    swap = nullcontext()
    if impl is not Reference:
        class Yours(impl.LoRALinear):  # lora.apply_lora's call, with the exercise's signature
            def __init__(self, base, rank, alpha, dropout=0.0):
                super().__init__(base, rank, alpha)
        swap = plugged(lora, "LoRALinear", Yours)
    with swap:
        probe = copy.deepcopy(lab.base)
        lora.apply_lora(probe, 16, 32.0)
        x = torch.tensor([common.prompts_of(lab, triage("test", 1), args.max_new)[0]], device=lab.rt.device)
        with torch.no_grad():
            start = float((probe(x) - lab.base(x)).abs().max())
        trained = sum(p.numel() for p in probe.parameters() if p.requires_grad)
        model, losses = common.finetune(lab, convs, args.steps, desc="your LoRA")
    print(f"at the start: logits differ from the base model's by at most {start:.2e} (B = 0: exactly the base)")
    print(f"trained parameters: {trained:,} of {sum(p.numel() for p in probe.parameters()):,}")
    print(f"loss {losses_line(losses)}")
    show_replies(lab, model, common.prompts_of(lab, triage("test", args.items), args.max_new), args.max_new, "tuned")


def see_5(impl, lab, args):
    """Your merge folds a trained adapter into the weights: the same outputs, no adapter left."""
    model, _ = common.finetune(lab, [r["messages"] for r in triage("train", 200)], args.steps, desc="adapter")
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in lora.lora_layers(merged):
            layer.base.weight.copy_(impl.merged_weight(layer.base.weight, layer.lora_A, layer.lora_B,
                                                       layer.alpha, layer.rank))
            layer.lora_B.zero_()  # the adapter's share now lives in the weight
    x = torch.tensor([common.prompts_of(lab, triage("test", 1), args.max_new)[0]], device=lab.rt.device)
    with torch.no_grad():
        diff = float((merged(x) - model(x)).abs().max())
        layer = lora.lora_layers(model)[0][1]
        back = impl.unmerged_weight(impl.merged_weight(layer.base.weight, layer.lora_A, layer.lora_B, layer.alpha,
                                                       layer.rank), layer.lora_A, layer.lora_B, layer.alpha, layer.rank)
        round_trip = float((back - layer.base.weight).abs().max())
    print(f"merged model vs model + adapter: logits differ by at most {diff:.2e} (float rounding)")
    print(f"unmerge(merge(W)) - W: at most {round_trip:.2e}")
    print("look at: a merged model is a plain model: no extra matmul at inference, one whole copy on disk")


def see_6(impl, lab, args):
    """Your schedule and update step drive a run: the learning rate per step, the loss, the norm."""
    seen, norms = [], []
    real_lr_at, real_step = train.lr_at, train.optimizer_step  # handtune's, before the swap below

    def lr_at(step, schedule):
        if impl is Reference:
            lr = real_lr_at(step, schedule)
        else:
            lr = impl.lr_at(step, schedule.max_lr, schedule.warmup, schedule.max_steps, schedule.min_lr)
        seen.append(lr)
        return lr

    def optimizer_step(optimizer, scaler, params, grad_clip, loss=None):
        if impl is Reference:
            norm = real_step(optimizer, scaler, params, grad_clip, loss)
        else:
            norm = impl.optimizer_step(optimizer, params, grad_clip)
        norms.append(float(norm))
        return torch.as_tensor(norm)
    with plugged(train, "lr_at", lr_at), plugged(train, "optimizer_step", optimizer_step):
        _, losses = common.finetune(lab, [r["messages"] for r in triage("train", 200)], args.steps, desc="your step")
    print("step  lr        loss    grad norm (before clipping at 1.0)")
    for i, (lr, loss, norm) in enumerate(zip(seen, losses, norms)):
        print(f"{i:4d}  {lr:.2e}  {loss:.3f}  {norm:.3f}")
    print("look at: the lr climbs through warmup, then follows the cosine down to min_lr; the loss falls")


def see_7(impl, lab, args):
    """Your BM25 picks the document for each knowledge question: the retrieval rung against zero-shot."""
    docs = load_store("knowledge", 1)
    items = load_items("knowledge", "test", args.items * 2)[0]
    prompts = [ev.split_reply(r["messages"])[0] for r in items]
    room = lab.base.config.block_size - args.max_new
    zero = [ev.fit_prompt(p, [], lab.tok, room)[0] for p in prompts]
    found = []
    for p in prompts:
        s = impl.bm25_scores(docs, p[-1]["content"])
        best = max(range(len(docs)), key=lambda i: s[i])
        found.append(ev.fit_prompt(ev.with_documents(p, [docs[best]]), [], lab.tok, room)[0])
    for name, ids in (("zero-shot", zero), ("with your BM25's top document", found)):
        right = sum(score("knowledge", reply(lab, lab.base, p, args.max_new)[0], r) == "right"
                    for p, r in zip(ids, items))
        print(f"{name}: {right} of {len(items)} facts right")
    print("look at: the same weights answer what the prompt now holds: retrieval changes knowledge")


def see_8(impl, lab, args):
    """Your KL measures forgetting: a gentle and a too-high learning rate, on text neither run saw."""
    windows = common.general_windows(lab, 256 if args.quick else 1024)
    convs = [r["messages"] for r in triage("train", 200)]
    for lr in (1e-4, 5e-3):
        model, losses = common.finetune(lab, convs, args.steps, desc=f"lr {lr:g}", lr=lr)
        with torch.no_grad():
            kls = [float(impl.mean_kl(lab.base(x.to(lab.rt.device)), model(x.to(lab.rt.device)))) for x, _ in windows]
        print(f"lr {lr:g}: loss {losses_line(losses)}; your KL(base || tuned) on general text "
              f"{sum(kls) / len(kls):.4f}")
    print("look at: the higher rate moves the model much further on text it was never tuned on: forgetting")


RUNS = {1: see_1, 2: see_2, 3: see_3, 4: see_4, 5: see_5, 6: see_6, 7: see_7, 8: see_8}


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description="See what your exercise does in handtune's pipeline (SmolLM2).")
    p.add_argument("exercise", help="1-8, or all")
    p.add_argument("--reference", action="store_true", help="run handtune's implementation instead")
    p.add_argument("--file", help="the file with your functions (default: workshop/exercises/exN_*.py)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of each training run")
    p.add_argument("--items", type=int, default=4, help="test messages answered after training")
    p.add_argument("--max-new", type=int, default=40, help="longest reply")
    p.add_argument("--quick", action="store_true", help="a tiny random model of SmolLM2's family (CI, seconds)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    args = p.parse_args(argv)
    numbers = exercise_numbers(args.exercise, args.file)  # RUNS has one run per exercise
    if args.quick:
        args.steps, args.items, args.max_new = 2, 2, 6
    cfg = common.LabConfig(quick=args.quick, batch_size=4, device=args.device, dtype=args.dtype, out="")
    try:
        lab = common.setup(cfg)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    written = True
    for n in numbers:
        impl = Reference if args.reference else learner_module(n, args.file)
        print(f"\n== see {n}: {TITLES[n]} ({'handtune' if args.reference else os.path.relpath(impl.__file__)})")
        t0 = time.time()
        try:
            RUNS[n](impl, lab, args)
        except NotImplementedError as e:
            print(f"not written yet: {e} (fill in the TODO, then python workshop/check.py {n})")
            written = False
            continue
        except Exception as e:  # the learner's code (or input) raised: say what and where, in one line
            frame = traceback.extract_tb(e.__traceback__)[-1]
            print(f"error: {type(e).__name__}: {e} (at {os.path.basename(frame.filename)}:{frame.lineno}); "
                  f"python workshop/check.py {n} names what differs from handtune's")
            return 1
        print(f"({time.time() - t0:.0f} s)")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
