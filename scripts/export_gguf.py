"""scripts/export_gguf.py: serve what you trained in llama.cpp (or Ollama): a model, with a LoRA adapter
merged in, written as one GGUF file; or the adapter alone as a llama.cpp LoRA GGUF.

The file holds the weights under llama.cpp's names, the tokenizer, and the chat template in Jinja,
written here from data.py's two templates so that llama.cpp renders the very token ids handtune trained
on (tests/test_gguf_export.py renders them and compares). plumbing/gguf_export.py does the format work;
it needs the optional gguf package (pip install gguf).

    python scripts/export_gguf.py --model gpt2 --adapter out/adapter --out out/model.gguf
    python scripts/export_gguf.py --model smollm2-135m-instruct-gguf --adapter out/smol/adapter \
        --out out/smol.gguf --dtype f32
    python scripts/export_gguf.py --model M --adapter A --adapter-only --out out/adapter.gguf
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import IM_END, IM_START, SMOLLM2_DEFAULT_SYSTEM  # noqa: E402
from lora import load_adapter, lora_layers, merge_lora  # noqa: E402
from model import from_pretrained  # noqa: E402
from plumbing import cli  # noqa: E402
from plumbing.gguf_export import write_gguf_adapter, write_gguf_model  # noqa: E402
from plumbing.hub import resolve_pretrained  # noqa: E402
from plumbing.tokenizer_files import EOT_TEXT, get_tokenizer  # noqa: E402

# Each family's chat template as Jinja, the language llama.cpp, Ollama and transformers render templates
# in. They produce the text of data.render_conversation / render_prompt (a test compares the token ids):
# handtune's own template for GPT-2 (every message opens with <|endoftext|>, which also closes a reply),
# ChatML for SmolLM2.
CHAT_TEMPLATES = {
    "gpt2": ("{% for message in messages %}" + EOT_TEXT + "{{ message['role'] | capitalize }}:\n"
             "{{ message['content'] }}{% endfor %}"
             "{% if add_generation_prompt %}" + EOT_TEXT + "Assistant:\n"
             "{% else %}" + EOT_TEXT + "{% endif %}"),
    "smollm2": ("{% if messages[0]['role'] != 'system' %}" + IM_START + "system\n"
                + SMOLLM2_DEFAULT_SYSTEM + IM_END + "\n{% endif %}"
                "{% for message in messages %}" + IM_START + "{{ message['role'] }}\n"
                "{{ message['content'] }}" + IM_END + "\n{% endfor %}"
                "{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"),
}
# Which special token plays which part, by its text: llama.cpp stops at eos/eot and pads with pad.
SPECIAL_TOKENS = {"gpt2": dict(bos=EOT_TEXT, eos=EOT_TEXT, eot=EOT_TEXT, pad=EOT_TEXT),
                  "smollm2": dict(bos=IM_START, eos=IM_END, eot=IM_END, pad=IM_END, unk=EOT_TEXT)}


@dataclass
class ExportConfig:
    model: str = cli.opt("gpt2", "the base model: a preset, a Hugging Face directory or a .gguf file")
    adapter: str | None = cli.opt(None, "a LoRA adapter directory to merge into --model", metavar="DIR")
    out: str = cli.opt("out/model.gguf", "the GGUF file to write", metavar="FILE")
    dtype: str = cli.opt("f16", "tensor type of the matrices (vectors stay f32)",
                         choices=("f32", "f16", "bf16"))
    adapter_only: bool = cli.opt(False, "write --adapter alone as a llama.cpp LoRA GGUF (llama.cpp adds "
                                 "it to the base model's GGUF at load time)")


def main(argv=None):
    cfg, _ = cli.parse(ExportConfig, argv, "Write a model (with a LoRA adapter merged) or an adapter "
                       "alone as a GGUF file for llama.cpp.")
    try:
        model_path = resolve_pretrained(cfg.model)  # a directory, or a .gguf file's path
        model = from_pretrained(model_path)
        if cfg.adapter:
            print(load_adapter(model, cfg.adapter))
        if cfg.adapter_only:
            write_gguf_adapter(cfg.out, model.config, lora_layers(model))
            return
        enc = get_tokenizer(model_path)  # GPT-2's or SmolLM2's, as the checkpoint says
        chat = {"template": CHAT_TEMPLATES[enc.name], "special_tokens": SPECIAL_TOKENS[enc.name]}
        # one whole model: the adapter folded into its weights
        write_gguf_model(cfg.out, model.config, merge_lora(model).state_dict(), enc, chat, cfg.dtype)
    except cli.USER_ERRORS as e:
        sys.exit(cli.error_line(e))


if __name__ == "__main__":
    main()
