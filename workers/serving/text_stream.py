"""A completion's tokens as text pieces, cut at the first stop string.

Text is decoded from all tokens so far (a token may end mid-character, and
tokenizers merge spaces across tokens), and the tail that could still grow into a
stop string is held back until the next token decides it.
"""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self._sent = 0  # characters of the text already given out
        self.stopped = False

    def push(self, token: int) -> str:
        """The text this token adds that is safe to send (may be empty)."""
        self.tokens.append(token)
        text = self._text()
        for stop in self.stops:
            at = text.find(stop, max(0, self._sent - len(stop) + 1))
            if at != -1:
                self.stopped = True
                return self._take(text[:at])
        if text.endswith("\ufffd"):  # a character still incomplete: wait for its bytes
            return ""
        return self._take(text[: len(text) - self._held_back(text)])

    def finish(self) -> str:
        """What is left to send once no token follows."""
        return "" if self.stopped else self._take(self._text())

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that begin some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    longest = max(longest, n)
                    break
        return longest

    def _take(self, text: str) -> str:
        piece = text[self._sent :]
        self._sent = max(self._sent, len(text))
        return piece
