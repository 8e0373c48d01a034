"""`IncrementalText`: committed token ids in, new text out, cut before the first stop string.

Both the HTTP API and the terminal chat stream text as tokens are committed. A
piece is released only when it can no longer change: a half-decoded multi-byte
character waits for its next token, and text that may be the start of a stop
string waits until it is either one (and is cut) or cannot become one.
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalText:
    """Turns committed token ids into text pieces; `stopped` once a stop string appeared (it and after: dropped)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.released = 0  # characters of the decoded text handed out so far
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> str:
        """The text that ``token_ids`` make certain; empty when nothing is certain yet or after a stop."""
        if self.stopped:
            return ""
        self.tokens += token_ids
        text = self._text()
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        found = [i for s in self.stop if (i := text.find(s, self.released)) >= 0]
        if found:
            self.stopped = True
            return self._release(text, min(found))
        return self._release(text, len(text) - self._stop_prefix(text))

    def flush(self) -> str:
        """What is still held back, at the end of the generation (nothing after a stop)."""
        return "" if self.stopped else self._release(self._text(), None)

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _release(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else max(end, self.released)
        piece, self.released = text[self.released : end], end
        return piece
