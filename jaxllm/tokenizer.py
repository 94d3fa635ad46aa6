"""Text to token ids and back for a model: its checkpoint's ``tokenizer.json``, or raw token ids.

A Hugging Face checkpoint directory that holds ``tokenizer.json`` is read with the ``tokenizers``
package (the same Rust tokenizer transformers uses, so ids match the reference exactly). Without one,
text cannot be mapped to that model's ids, and callers take raw ids (``parse_ids``). The other way,
``byte_level_tokenizer`` is jaxllm's byte tokenizer as a ``tokenizers`` object, which
``jaxllm.export`` saves as the tokenizer.json of a byte-level run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


EOT_TOKEN = (
    "<|endoftext|>"  # the end-of-text token's text in an exported tokenizer.json, as GPT-2's
)


def _byte_characters() -> list[str]:
    """GPT-2's byte-level alphabet: the character that stands for byte b in a tokenizer.json (the
    printable Latin-1 bytes stand for themselves, the others for code points from 256 up)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return [chars[b] for b in range(256)]


def byte_level_tokenizer() -> Any:
    """jaxllm's byte tokenizer (``jaxllm.data``) as a ``tokenizers.Tokenizer`` to save as
    tokenizer.json: ids 0-255 are the bytes of the UTF-8 text and ``EOT`` (256) is the special token
    ``EOT_TOKEN``. A byte-level BPE with no merges, so encoding text gives ``data.encode``'s ids;
    decoding drops EOT and decodes the bytes with replacement, as ``data.decode`` does. One
    difference, as in GPT-2's own tokenizer: the literal text ``<|endoftext|>`` encodes to EOT, where
    ``data.encode`` gives its 13 bytes."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    vocab = {char: b for b, char in enumerate(_byte_characters())}
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT_TOKEN, special=True)])
    return tok
