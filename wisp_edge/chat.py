"""`wisp-edge chat`: a conversation in the terminal, straight to the verification server (no HTTP in between).

The whole history goes through the model's chat template each turn and the
reply streams as it is committed. Ctrl-C during a reply stops that reply (its
session is cancelled, and the part shown stays in the history); Ctrl-C or
Ctrl-D at the prompt ends the chat.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from wisp_common.config import EdgeConfig
from wisp_common.request import SamplingParams, Slo
from wisp_edge.client import EdgeClient
from wisp_edge.detokenize import IncrementalText


def conversation_ids(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """A conversation's token ids through the model's chat template, ready for the assistant's turn."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_chat(
    client: EdgeClient,
    tokenizer,
    config: EdgeConfig,
    read_line: Callable[[str], str] = input,
    write: Callable[[str], None] = _write,
) -> int:
    """Runs the conversation until end of input or Ctrl-C at the prompt; returns the exit status."""
    if not tokenizer.chat_template:
        raise SystemExit("wisp-edge chat: the draft's tokenizer has no chat template")
    sampling = SamplingParams(config.temperature, config.top_p, config.top_k, config.seed)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = read_line("> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        text = IncrementalText(tokenizer)
        reply: list[str] = []

        def show(tokens: list[int], text: IncrementalText = text, reply: list[str] = reply) -> None:
            piece = text.add(tokens)
            reply.append(piece)
            write(piece)

        try:
            client.generate(
                conversation_ids(tokenizer, history),
                max_new_tokens=config.max_new_tokens,
                draft_tokens=config.draft_tokens,
                sampling=sampling,
                slo=Slo(config.ttft_slo, config.tpot_slo),
                on_tokens=show,
            )
            reply.append(text.flush())
            write(reply[-1])
        except KeyboardInterrupt:  # generate's own clean-up has cancelled the session
            write(" [stopped]")
        write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
