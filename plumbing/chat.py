"""plumbing/chat.py: the read-eval-print loop behind `python eval.py --chat`: input, /reset and /quit,
the history trimmed to fit the context, tokens printed as they arrive (whole UTF-8 characters only).
eval.chat passes in the generation (model.stream in its precision), data.render_prompt and the family's
chat format, so nothing here imports the core.
"""

import codecs

from plumbing.report import one_line, printable


def repl(reply_tokens, render_prompt, tok, fmt, system, room):
    """Read user turns from stdin, stream each reply token by token: reply_tokens(ids, turn) yields the
    token ids of the reply to prompt ids. The prompt is the whole conversation (after the system prompt,
    if not empty) rendered by render_prompt(messages) (data.render_prompt); fmt is the family's
    data.chat_format; room = (context length, longest reply). /reset forgets the conversation, /quit or
    Ctrl-D ends it."""
    block, max_new = room
    print("chat with the fine-tuned model: /reset starts over, /quit (or Ctrl-D) exits", flush=True)
    if system or fmt.default_system:  # no system message: render_prompt inserts the family's default (SmolLM2)
        print(f"system prompt: {one_line(system or fmt.default_system, 100)}", flush=True)
    history, turn = [], 0
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        text = line.strip()
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history = []
            print("(conversation cleared)", flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        head = [{"role": "system", "content": system}] if system else []  # never an empty system message
        # Forget the oldest exchanges (never the system prompt) until the prompt leaves room to answer.
        while True:
            ids = render_prompt(head + history)
            if len(ids) + max_new <= block or len(history) <= 1:
                break
            history = history[2:]
        print("assistant> ", end="", flush=True)
        # Multi-byte characters can span tokens: an incremental decoder prints them once they are complete.
        decoder, reply = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
        for token in reply_tokens(ids[-block:], turn):
            if token in fmt.stop_ids:
                break
            reply.append(token)
            # the model's text, its control characters escaped (never run by the terminal)
            print(printable(decoder.decode(tok.decode_single_token_bytes(token))), end="", flush=True)
        print(printable(decoder.decode(b"", final=True)), flush=True)
        # Kept as text and re-rendered next turn, as render_conversation renders a training reply.
        history.append({"role": "assistant", "content": tok.decode(reply)})
        turn += 1
