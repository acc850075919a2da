"""Exercise 1: the chat template and its response-only loss mask (the heart of SFT).

GPT-2 has no chat tokens, so handtune renders a conversation as plain text headers, each message opened by
GPT-2's one special token <|endoftext|> (id 50256, EOT):

    <EOT>System:\\nBe terse.<EOT>User:\\nHi!<EOT>Assistant:\\nHello.<EOT>

Write render_conversation: token ids and a loss mask of the same length, mask[i] = 1 where token i is
trained. Trained: each assistant reply's content AND the EOT right after it (that EOT is how the model
learns to stop). Not trained: the headers, the system and user text, and every other EOT. Tokenize each
piece on its own (EOT, header, content) with tokenizer.encode_ordinary, never the whole string at once.

    python workshop/check.py 1          # checks this file against handtune's data.render_conversation
"""

EOT_ID = 50256  # GPT-2's <|endoftext|>
HEADERS = {"system": "System:\n", "user": "User:\n", "assistant": "Assistant:\n"}


def render_conversation(messages, tokenizer):
    """messages: [{"role": "system" | "user" | "assistant", "content": str}] -> (ids, mask), two lists
    of the same length; mask[i] is 1 where ids[i] is trained, else 0."""
    ids, mask = [], []
    # TODO: for each message: append EOT (trained only if the previous message was an assistant reply),
    # then the header (never trained), then the content (trained only for the assistant). Finish with a
    # closing EOT, trained if the last message is the assistant's.
    raise NotImplementedError("exercise 1: write render_conversation")
    return ids, mask
