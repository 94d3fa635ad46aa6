"""Fine-tuning: a training run that starts from a Hugging Face checkpoint instead of a preset.

The run takes the checkpoint's config (``--override`` may change numerics and layout only), its
weights as the step-0 parameters, and its ``tokenizer.json``, which is copied into the run directory
with the tokenizer files beside it, so that a resumed run (and ``jaxllm export``) reads the same
tokenizer even if the checkpoint directory moves. Every checkpoint of the run records the ``Origin``
(``meta["origin"]``). Everything else — schedule, checkpoints, resume — is the training loop's, as
for a preset.

The corpus is the byte corpus's documents (``data.corpus_files``) read as UTF-8 text and encoded with
the tokenizer (with the special tokens its post-processor adds, e.g. Llama's BOS, as transformers
does), each followed by the checkpoint's first ``eos_token_id`` when config.json names one. The
stream is held in memory, uint16 when the vocabulary fits, else uint32.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm import data, hf
from jaxllm.config import ModelConfig, parse_override
from jaxllm.errors import InputError
from jaxllm.finite import require_finite
from jaxllm.model import Params
from jaxllm.tokenizer import TOKENIZER, HFTokenizer, load_hf_tokenizer

# Overrides that leave the function the checkpoint computes unchanged (up to rounding).
TRAINABLE_OVERRIDES = ("dtype", "param_dtype", "scan_layers", "scan_unroll", "remat")
# Files of a checkpoint's tokenizer copied into the run (tokenizer.json is required).
TOKENIZER_FILES = (TOKENIZER, "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass(frozen=True)
class Origin:
    """The checkpoint a run was fine-tuned from, as its checkpoints record it (``meta["origin"]``)."""

    hf_dir: str  # absolute path of the checkpoint directory
    model_type: str  # config.json's: gpt2, llama or qwen2
    bos_token_id: int | list[int] | None  # config.json's, as written there
    eos_token_id: int | list[int] | None

    @classmethod
    def read(cls, hf_dir: str | Path) -> Origin:
        raw = hf.read_json(Path(hf_dir) / hf.CONFIG)
        return cls(
            str(Path(hf_dir).absolute()),
            raw.get("model_type", ""),
            raw.get("bos_token_id"),
            raw.get("eos_token_id"),
        )

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Origin | None:
        """The origin a checkpoint's metadata records; None for a run trained from a preset."""
        raw = meta.get("origin")
        if raw is None:
            return None
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(raw, dict) or sorted(raw) != sorted(fields):
            raise InputError(f"the checkpoint's origin record {raw!r} lacks {', '.join(fields)}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(hf_dir: str | Path, overrides: list[str] | tuple[str, ...]) -> ModelConfig:
    """The checkpoint's config with ``overrides``; ValueError for an override of any field outside
    ``TRAINABLE_OVERRIDES`` (it would change the architecture the weights were trained for)."""
    for text in overrides:
        name, _ = parse_override(text)
        if name not in TRAINABLE_OVERRIDES:
            raise InputError(
                f"--override {text} would change the architecture of --hf-dir {hf_dir}; "
                f"fine-tuning takes overrides of {', '.join(TRAINABLE_OVERRIDES)} only"
            )
    return hf.load_config(hf_dir, overrides)


def initial_params(hf_dir: str | Path, config: ModelConfig) -> Params:
    """The checkpoint's weights in ``config``'s layout and ``param_dtype`` (float32 master weights
    unless overridden); NonFiniteError if any is NaN or infinite."""
    params = hf.load_params(hf_dir, config)
    require_finite(params, f"{hf_dir}: the weights")
    return params


def copy_tokenizer(hf_dir: str | Path, run_dir: Path) -> None:
    """Copy the checkpoint's tokenizer files (``TOKENIZER_FILES`` that exist) into ``run_dir``."""
    for name in TOKENIZER_FILES:
        if (Path(hf_dir) / name).is_file():
            shutil.copyfile(Path(hf_dir) / name, run_dir / name)


@dataclasses.dataclass(frozen=True)
class CorpusTokenizer:
    """Tokenizes a corpus for a fine-tuning run: ``tokenizer.json`` of ``directory`` (the checkpoint
    for a fresh run, the run directory when resuming) and the origin's end-of-sequence id."""

    tokenizer: HFTokenizer
    eos: int | None  # appended after every document
    vocab_size: int  # the model's V: every id is below it

    @classmethod
    def load(cls, directory: str | Path, config: ModelConfig, origin: Origin) -> CorpusTokenizer:
        """ValueError when ``directory`` has no tokenizer.json or one with ids beyond the model's."""
        tokenizer = load_hf_tokenizer(directory, config.vocab_size)
        if tokenizer is None:
            raise InputError(
                f"{Path(directory) / TOKENIZER}: missing; fine-tuning reads the checkpoint's "
                "tokenizer to tokenize --data"
            )
        eos = hf.ids_in_vocab(origin.eos_token_id, config.vocab_size)
        return cls(tokenizer, eos[0] if eos else None, config.vocab_size)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint16 if self.vocab_size <= 2**16 else np.uint32

    def document(self, path: Path) -> np.ndarray:
        """The tokens of one file [n] (empty for an empty file), EOS appended; DataError if the
        file is not UTF-8 text."""
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as err:
            raise data.DataError(f"cannot read data file {path}: {err.strerror or err}") from None
        except UnicodeDecodeError as err:
            raise data.DataError(
                f"data file {path} is not UTF-8 text (byte {err.start}); the checkpoint's "
                "tokenizer reads text"
            ) from None
        if not text:
            return np.empty(0, self.dtype)
        ids = self.tokenizer.encode(text).astype(self.dtype)
        return ids if self.eos is None else np.append(ids, self.dtype(self.eos))

    def corpus(self, path: str | Path | None) -> np.ndarray:
        """The token stream [n] of the corpus at ``path`` (None: the built-in corpus)."""
        files = data.corpus_files(path)
        tokens = np.concatenate([np.empty(0, self.dtype), *map(self.document, files)])
        if not tokens.size:
            where = "the built-in corpus" if path is None else str(path)
            raise data.DataError(f"no text in {where} ({len(files)} files, 0 tokens)")
        return tokens
