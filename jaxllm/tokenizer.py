"""Text to token ids and back for a model: its checkpoint's ``tokenizer.json``, or raw token ids.

A Hugging Face checkpoint directory that holds ``tokenizer.json`` is read with the ``tokenizers``
package (the same Rust tokenizer transformers uses, so ids match the reference exactly). Without one,
text cannot be mapped to that model's ids, and callers take raw ids (``parse_ids``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxllm.errors import InputError

TOKENIZER = "tokenizer.json"


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` package; encode adds the special tokens its
    post-processor adds (e.g. Llama's BOS), as transformers does by default."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.path = path
        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for a malformed file
            raise InputError(f"{path}: not a readable tokenizer ({err})") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_hf_tokenizer(hf_dir: str | Path, vocab_size: int) -> HFTokenizer | None:
    """``hf_dir/tokenizer.json``, or None when there is none (the model then takes raw ids).

    InputError when the tokenizer has ids the model's vocabulary (``vocab_size``) lacks.
    """
    path = Path(hf_dir) / TOKENIZER
    if not path.is_file():
        return None
    tok = HFTokenizer(path)
    if tok.vocab_size > vocab_size:
        raise InputError(
            f"{path}: {tok.vocab_size} tokens, more than the model's vocab_size={vocab_size}"
        )
    return tok


def parse_ids(text: str, vocab_size: int) -> np.ndarray:
    """Comma-separated token ids (``"1,2,3"``) -> [T] int32, each checked to be in [0, vocab_size)."""
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise InputError(f"token ids must be comma-separated integers, got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return np.asarray(ids, np.int32)
