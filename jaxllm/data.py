"""Byte-level tokens, corpora and fixed-shape batches.

Tokens: the 256 byte values of UTF-8 text, plus ``EOT`` (256), the end-of-text token that ends every
document. A corpus is one uint16 token stream: its documents' bytes, each followed by EOT; a corpus of
more than ``MEMMAP_BYTES`` is written to an unlinked temporary file (in ``$TMPDIR``) and memory-mapped,
so its size is bounded by disk rather than RAM. Batches are int32. The built-in
default corpus is the top-level ``.py`` sources of the running interpreter's standard library (≈ 4.7 MB),
read in sorted order, so every machine with the same Python has the same corpus.

Batches are [B, T+1] windows of the stream at offsets drawn by a NumPy generator seeded with
``(seed, step)``: batch ``step`` is the same whether a run is fresh or resumed, so resuming is exact.
"""

from __future__ import annotations

import hashlib
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxllm.errors import InputError

EOT = 256  # end-of-text token
VOCAB_SIZE = 257  # 256 byte values + EOT
_EOT_ARRAY = np.array([EOT], np.uint16)
MEMMAP_BYTES = 256 * 2**20  # corpora above this many bytes of text are memory-mapped
_CHUNK = 64 * 2**20  # tokens (or bytes) handled at once when a stream is read in pieces


class DataError(InputError):
    """Unusable training data: unreadable, empty, or too short for the requested windows."""


def encode(text: str) -> np.ndarray:
    """The UTF-8 bytes of ``text`` as token ids, int32 [n]."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(ids: object) -> str:
    """Text from token ids: bytes decoded as UTF-8 with errors="replace"; EOT tokens are dropped."""
    arr = np.asarray(ids).reshape(-1)
    bad = arr[(arr < 0) | (arr >= VOCAB_SIZE)]
    if bad.size:
        raise InputError(f"token id {int(bad[0])} is outside the vocabulary [0, {VOCAB_SIZE})")
    return arr[arr != EOT].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def default_corpus_files() -> list[Path]:
    """The built-in corpus: the standard library's top-level ``.py`` files, sorted by name."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def corpus_files(path: str | Path | None) -> list[Path]:
    """The documents of a corpus: a text file, every file under a directory (sorted, hidden files
    skipped), or, for ``None``, the built-in corpus."""
    if path is None:
        return default_corpus_files()
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if path.exists():
        raise DataError(f"data path {path} is neither a file nor a directory")
    raise DataError(f"data path {path} does not exist")


def _pieces(path: Path) -> Iterator[np.ndarray]:
    """The bytes of ``path`` as uint16 tokens, ``_CHUNK`` at a time."""
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                yield np.frombuffer(chunk, np.uint8).astype(np.uint16)
    except OSError as err:
        raise DataError(f"cannot read data file {path}: {err.strerror or err}") from None


def _documents(files: list[Path]) -> Iterator[np.ndarray]:
    """The token stream of ``files`` in pieces: each non-empty file's bytes, then EOT."""
    for path in files:
        empty = True
        for piece in _pieces(path):
            empty = False
            yield piece
        if not empty:
            yield _EOT_ARRAY


def _mapped(files: list[Path]) -> np.ndarray:
    """The stream written to an unlinked temporary file and memory-mapped read-only (the mapping
    keeps the file alive; the system frees it when the mapping goes)."""
    with tempfile.TemporaryFile(prefix="jaxllm-corpus-") as out:
        n = 0
        for piece in _documents(files):
            out.write(piece.tobytes())
            n += piece.size
        out.flush()
        return np.memmap(out, np.uint16, mode="r", shape=(n,)) if n else np.empty(0, np.uint16)


def load_corpus(path: str | Path | None = None) -> np.ndarray:
    """Token stream uint16 [n] of a text file, of every file under a directory (sorted, hidden files
    skipped), or, for ``None``, of the built-in corpus. Each document is followed by EOT. Above
    ``MEMMAP_BYTES`` of text the stream is a read-only ``np.memmap``."""
    files = corpus_files(path)
    if sum(f.stat().st_size for f in files) > MEMMAP_BYTES:
        tokens = _mapped(files)
    else:
        tokens = np.concatenate([np.empty(0, np.uint16), *_documents(files)])
    if not tokens.size:
        where = "the built-in corpus" if path is None else str(path)
        raise DataError(f"no text in {where} ({len(files)} files, 0 bytes)")
    return tokens


def describe(path: str | Path | None) -> str:
    """The corpus source as stored in checkpoints: the path, or the built-in corpus's directory."""
    if path is None:
        return f"stdlib:{sysconfig.get_paths()['stdlib']}"
    return str(Path(path).absolute())


def fingerprint(tokens: np.ndarray) -> str:
    """SHA-256 of the token stream as int32 (little-endian) bytes, hashed ``_CHUNK`` tokens at a time:
    a resumed run checks it trains on the same data."""
    digest = hashlib.sha256()
    for start in range(0, len(tokens), _CHUNK):
        digest.update(np.asarray(tokens[start : start + _CHUNK], "<i4").tobytes())
    return digest.hexdigest()


def split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): the first ``1 - val_fraction`` of the stream and the rest."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = len(tokens) - max(1, round(len(tokens) * val_fraction))
    return tokens[:cut], tokens[cut:]


def check_windows(tokens: np.ndarray, seq_len: int, name: str) -> None:
    """DataError unless ``tokens`` holds at least one window of T+1 tokens."""
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"the {name} split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use more data or a shorter --seq"
        )


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    return tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)  # [B, T+1]


def train_batch(
    tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int
) -> np.ndarray:
    """Batch ``step``: int32 [B, T+1], B windows at uniformly random offsets, a pure function of
    (seed, step)."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    return _windows(tokens, starts, seq_len)


def eval_batches(tokens: np.ndarray, n_batches: int, batch_size: int, seq_len: int) -> np.ndarray:
    """A fixed validation set: int32 [n, B, T+1], n·B windows at evenly spaced offsets over the split."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, n_batches * batch_size).astype(np.int64)
    return _windows(tokens, starts, seq_len).reshape(n_batches, batch_size, seq_len + 1)


def unigram_entropy(tokens: np.ndarray, vocab_size: int = VOCAB_SIZE) -> float:
    """Entropy of the token frequencies of ``tokens`` (ids below ``vocab_size``) in nats per token:
    the loss of the best model that ignores context."""
    counts = np.zeros(vocab_size, np.float64)
    for start in range(0, len(tokens), _CHUNK):
        counts += np.bincount(tokens[start : start + _CHUNK], minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
