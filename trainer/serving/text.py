"""Incremental detokenization with stop strings.

Text is released to the client only when it is final: not the tail of an unfinished UTF-8
character (the tokenizer renders it as U+FFFD), and not a tail that could still grow into a stop
string. A stop string ends the completion and is not part of it, as in OpenAI's API.
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters already released
        self.text = ""  # the completion so far, as final text

    def push(self, token: int) -> tuple[str, bool]:
        """Add a generated token; returns (newly final text, whether a stop string was hit)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hit = self._first_stop(text)
        if hit is not None:
            return self._release(text[:hit]), True
        if text.endswith("\ufffd"):
            return "", False
        return self._release(text[:len(text) - self._partial_stop(text)]), False

    def finish(self) -> str:
        """The text still held back when generation ends for another reason (length, EOS)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(text)

    def _release(self, final: str) -> str:
        delta = final[self.sent:]
        self.sent, self.text = len(final), final
        return delta

    def _first_stop(self, text: str) -> int | None:
        # a stop string can only start where it could not have been seen completely before
        found = [i for s in self.stop if (i := text.find(s, max(0, self.sent - len(s) + 1))) >= 0]
        return min(found) if found else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
