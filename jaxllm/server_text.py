"""Generated tokens to text one token at a time, for streaming: no piece splits a character, and no
piece holds any part of a stop string.

- ``ByteText`` (the byte-level tokenizer of ``jaxllm.data``): an incremental UTF-8 decoder holds the
  bytes of an incomplete character until the character is whole; the pieces joined equal
  ``data.decode`` of all the tokens (invalid bytes become U+FFFD, as there).
- ``TokenizerText`` (any tokenizer with ``decode(ids)``, e.g. a Hugging Face ``tokenizer.json``):
  decodes every token so far and sends what is new, holding a trailing U+FFFD (a byte-level BPE
  character cut between tokens) until a later token completes it.
- ``NoText`` (a model without a tokenizer: prompts and outputs are token ids): every piece is "".
- ``StopStrings``: finds the first stop string in the text as it grows and holds back any tail that
  may be the start of one.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any, Protocol

from jaxllm.errors import InputError

BYTES = 256  # ids below are bytes in the byte-level tokenizer; above, special tokens (no text)


class Detokenizer(Protocol):
    def push(self, token: int) -> str:
        """The text this token completes ("" while a character is incomplete)."""
        ...

    def finish(self) -> str:
        """The text still held at the end (an incomplete character becomes U+FFFD)."""
        ...


class ByteText:
    """Byte tokens to UTF-8 text, holding an incomplete character's bytes."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        if token >= BYTES:
            return ""
        return self._decoder.decode(bytes([token]))

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)


class TokenizerText:
    """Tokens to text through ``tokenizer.decode`` of the whole output so far (what is new is sent)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._sent = 0  # characters of the decoded output already sent

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self._tokenizer.decode(self._ids)
        return "" if text.endswith("\ufffd") else self._new(text)

    def finish(self) -> str:
        return self._new(self._tokenizer.decode(self._ids))

    def _new(self, text: str) -> str:
        piece, self._sent = text[self._sent :], max(self._sent, len(text))
        return piece


class NoText:
    """A model without a tokenizer: its output is token ids only."""

    def push(self, token: int) -> str:
        del token
        return ""

    def finish(self) -> str:
        return ""


def detokenizer(tokenizer: Any) -> Detokenizer:
    """The streaming decoder for a model's tokenizer: ``jaxllm.data`` (bytes), an object with
    ``decode`` (Hugging Face), or None."""
    from jaxllm import data

    if tokenizer is data:
        return ByteText()
    return NoText() if tokenizer is None else TokenizerText(tokenizer)


class StopStrings:
    """The text of a request cut at the first of its stop strings."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise InputError("a stop string must not be empty")
        self.stops = tuple(stops)
        self._held = ""  # text not sent yet: it may be the start of a stop string

    def feed(self, text: str) -> tuple[str, bool]:
        """(the text that can be sent now, whether a stop string was found): on a stop, the text
        before the earliest stop string; nothing after it is ever sent."""
        held = self._held + text
        found = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if found:
            self._held = ""
            return held[: min(found)], True
        keep = self._partial(held)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep], False

    def flush(self) -> str:
        """The text held back at the end of the request (it turned out not to start a stop)."""
        held, self._held = self._held, ""
        return held

    def _partial(self, text: str) -> int:
        """Characters at the end of ``text`` that are the start of some stop string."""
        longest = min(len(text), max((len(s) for s in self.stops), default=1) - 1)
        for k in range(longest, 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):
                return k
        return 0
