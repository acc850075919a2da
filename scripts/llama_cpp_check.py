"""scripts/llama_cpp_check.py: does llama.cpp run what handtune exports, token for token?

Exports --model (and --adapter) with `python scripts/export_gguf.py` as F32 GGUF files, then, for a few chat
prompts rendered by handtune's template, compares handtune's greedy continuation with llama.cpp's (through
llama-cpp-python) for two ways of serving the fine-tune:
  merged    one GGUF with the adapter folded into the weights (full fine-tuning's kind of file);
  base+lora the base model's GGUF plus the adapter's GGUF, which llama.cpp adds at load time;
  original+lora  the adapter on the quantized GGUF handtune trained from (when --model is a .gguf): its
            matmuls round activations to 8 bits, so near-ties may flip there;
each with llama.cpp's KV cache in f32 (the export alone is compared) and in f16 (its default).
It also checks that llama.cpp, from the GGUF's chat template and tokenizer alone, makes the very prompt ids
handtune's render_prompt makes. Greedy on both sides is the argmax of each side's own logits, one token at
a time, stopping at the family's end of turn. Where the two differ, the script prints handtune's margin
between its top two tokens there: a near-tie (a margin of the order of the logit differences between the two
programs) is rounding, anything else is a bug. Writes --out.md and --out.json (sizes on disk included).

    CMAKE_ARGS="-DGGML_NATIVE=OFF ..." pip install llama-cpp-python     # README "Serve it": from source
    python scripts/llama_cpp_check.py --adapter out/adapter              # SmolLM2 (the GGUF preset) + adapter
    python scripts/llama_cpp_check.py --model /tmp/tiny --adapter /tmp/tiny_run/adapter --out results/x
"""

import itertools
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import export_gguf  # noqa: E402

import data  # noqa: E402
from lora import load_adapter  # noqa: E402
from model import from_pretrained, generate  # noqa: E402
from plumbing import cli  # noqa: E402
from plumbing.files import atomic_write_text  # noqa: E402
from plumbing.hub import resolve_pretrained  # noqa: E402
from plumbing.report import hardware, markdown_table  # noqa: E402
from plumbing.tokenizer_files import get_tokenizer  # noqa: E402
from tasks import load_items  # noqa: E402

GGML_TYPE_F32 = 0  # ggml's type id for float32 (llama.cpp's type_k / type_v)
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give me three tips for staying focused."}],
    [{"role": "system", "content": "You sort support tickets."},
     {"role": "user", "content": "My invoice shows the wrong amount and I was charged twice."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku about the sea."}],
]  # + two triage test prompts (main), where a triage adapter changes the reply


@dataclass
class Config:
    model: str = cli.opt("smollm2-135m-instruct-gguf", "base model (preset, directory or .gguf)")
    adapter: str | None = cli.opt(None, "LoRA adapter directory (train.py's OUT/adapter)", metavar="DIR")
    max_new_tokens: int = cli.opt(48, "greedy tokens per prompt (fewer if the reply ends)", min=1)
    work: str = cli.opt("/tmp/llama_cpp_check", "where the exported GGUF files go")
    out: str = cli.opt("results/llama_cpp_check", "report path without extension (.md and .json written)")
    threads: int = cli.opt(2, "llama.cpp CPU threads", min=1)


def handtune_greedy(model, prompt, n, stops):
    """(tokens, logits (len, V) at every generated position) of handtune's greedy continuation, fp32."""
    out = generate(model, torch.tensor([prompt]), n, stop_token=stops[0])[0, len(prompt):].tolist()
    out = out[:next((i + 1 for i, t in enumerate(out) if t in stops), len(out))]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out]))[0, len(prompt) - 1:-1].float()  # predicts out[i] at row i
    return out, logits


def llama_cpp_greedy(llm, prompt, n, stops):
    """The same with llama.cpp: argmax of its logits at each step, its KV cache carrying the context."""
    llm.reset()
    llm.eval(prompt)
    out, rows = [], []
    for _ in range(n):
        row = torch.tensor(llm.scores[llm.n_tokens - 1])
        rows.append(row)
        out.append(int(row.argmax()))
        if out[-1] in stops:
            break
        llm.eval([out[-1]])
    return out, torch.stack(rows)


def llama_cpp_prompt(llm, messages):
    """The prompt ids llama.cpp makes of a conversation by itself: the GGUF's Jinja chat template rendered by
    llama-cpp-python's formatter, then llama.cpp's tokenizer with special tokens parsed."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    text = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="",
                               bos_token="")(messages=messages).prompt
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def compare(ours, theirs):
    """One row: where the two continuations part (None: never), handtune's top-2 margin there, the largest
    logit difference while they agree, and handtune's smallest top-2 margin meanwhile: a greedy token can
    only flip where a margin is as small as the logit differences."""
    (a, la), (b, lb) = ours, theirs
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    same = min(len(a), len(b)) if common is None else common
    diff = float((la[:same + 1] - lb[:same + 1]).abs().max()) if min(len(la), len(lb)) else 0.0
    top2 = la.topk(2, dim=-1).values  # (len, 2): handtune's two best logits at every position
    margins = top2[:, 0] - top2[:, 1]
    return dict(tokens=len(a), equal=a == b, diverge_at=common, max_logit_diff=diff,
                smallest_margin=float(margins[:same + 1].min()) if len(margins) else None,
                margin_there=None if common is None else float(margins[common]))


def main(argv=None):
    cfg, _ = cli.parse(Config, argv, "Compare handtune's greedy replies with llama.cpp's on exported GGUF files.")
    try:
        check(cfg, argv)
    except ImportError:
        sys.exit("error: needs llama-cpp-python; README's 'Serve it' has the install command")
    except cli.USER_ERRORS as e:
        sys.exit(cli.error_line(e))


def check(cfg, argv):
    from llama_cpp import Llama
    os.makedirs(cfg.work, exist_ok=True)
    path = resolve_pretrained(cfg.model)
    files = {k: os.path.join(cfg.work, f"{k}.gguf") for k in ("base", "merged", "lora")}
    export_gguf.main(["--model", path, "--out", files["base"], "--dtype", "f32"])
    models = {"base": from_pretrained(path).eval()}
    serve = {"base": dict(model_path=files["base"])}
    if cfg.adapter:
        export_gguf.main(["--model", path, "--adapter", cfg.adapter, "--out", files["merged"],
                          "--dtype", "f32"])
        export_gguf.main(["--model", path, "--adapter", cfg.adapter, "--adapter-only", "--out",
                          files["lora"]])
        tuned = from_pretrained(path)
        load_adapter(tuned, cfg.adapter)
        models["merged"] = models["base+lora"] = tuned.eval()  # LoRA unmerged: as llama.cpp applies it
        serve["merged"] = dict(model_path=files["merged"])
        serve["base+lora"] = dict(model_path=files["base"], lora_path=files["lora"])
        if path.endswith(".gguf"):  # the adapter on the very file handtune trained from (quantized: not exact)
            models["original+lora"] = tuned
            serve["original+lora"] = dict(model_path=path, lora_path=files["lora"])
    tok = get_tokenizer(path)
    fmt = data.chat_format(tok)
    prompts = PROMPTS + [item["messages"][:-1] for item in load_items("triage", "test", 2)[0]]
    rows, raw, ours_of = [], [], {}  # handtune's side depends only on (model, prompt): computed once each
    # llama.cpp keeps its KV cache in f16 unless told otherwise: that alone moves logits by ~1e-2. The f32 cache
    # isolates the export (same weights, same math); the f16 one is what a plain llama.cpp server does.
    caches = {"f32 cache": dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32), "f16 cache (default)": {}}
    for (kind, kwargs), (cache, cache_kwargs) in itertools.product(serve.items(), caches.items()):
        llm = Llama(**kwargs, **cache_kwargs, n_ctx=1024, n_threads=cfg.threads, logits_all=True, verbose=False)
        for i, messages in enumerate(prompts):
            prompt = data.render_prompt(messages, tok)
            key = (id(models[kind]), i)
            if key not in ours_of:
                ours_of[key] = handtune_greedy(models[kind], prompt, cfg.max_new_tokens, fmt.stop_ids)
            ours = ours_of[key]
            theirs = llama_cpp_greedy(llm, prompt, cfg.max_new_tokens, fmt.stop_ids)
            r = dict(serving=kind, kv_cache=cache, prompt=i, same_prompt=llama_cpp_prompt(llm, messages) == prompt,
                     **compare(ours, theirs), reply=tok.decode(ours[0]), llama_cpp_reply=tok.decode(theirs[0]))
            raw.append(r)
            print(json.dumps(r, ensure_ascii=False))
            same = "yes" if r["equal"] else f"no, at {r['diverge_at']} (margin {r['margin_there']:.2g})"
            rows.append([kind, cache, i, "yes" if r["same_prompt"] else "NO", r["tokens"], same,
                         f"{r['max_logit_diff']:.1g}", f"{r['smallest_margin']:.2g}",
                         r["reply"][:60].replace("\n", "⏎").replace("|", "\\|")])
        del llm
    sizes = {k: os.path.getsize(f) for k, f in files.items() if os.path.exists(f)}
    if path.endswith(".gguf"):
        sizes["original " + os.path.basename(path)] = os.path.getsize(path)
    table = markdown_table(["serving", "llama.cpp KV cache", "prompt", "prompt ids equal", "tokens", "same tokens",
                            "max \\|Δlogit\\|", "smallest top-2 margin", "handtune's reply (start)"], rows)
    size_lines = "\n".join(f"- {k}: {v / 1e6:.1f} MB" for k, v in sizes.items())
    command = "python scripts/llama_cpp_check.py " + " ".join(argv or sys.argv[1:])
    md = (f"# llama.cpp vs handtune, greedy\n\n`{command}` on {hardware('cpu')}; model {cfg.model}, adapter "
          f"{cfg.adapter}\n\n{table}\n\nSizes on disk:\n{size_lines}\n")
    print(md)
    atomic_write_text(cfg.out + ".md", md)
    atomic_write_text(cfg.out + ".json", json.dumps(dict(config=asdict(cfg), rows=raw, sizes=sizes), indent=1,
                                                    ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
