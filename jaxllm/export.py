"""A jaxllm run as a Hugging Face checkpoint directory: the inverse of ``jaxllm.hf``.

``export_run(run_dir, out)`` writes into a new directory ``out``:
- ``config.json``: the family's fields transformers reads (``model_type``, ``architectures``, the
  sizes, norm epsilon, rotary base and scaling, ``tie_word_embeddings``, bos/eos ids, the dtype);
- ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` of at most
  ``max_shard_bytes`` each (5 GB, as transformers' ``save_pretrained``) listed in
  ``model.safetensors.index.json``;
- the tokenizer: a fine-tuned run's copy of its checkpoint's tokenizer files, or for a byte-level run
  a ``tokenizer.json`` (``tokenizer.byte_level_tokenizer``) with a ``tokenizer_config.json``.

Families, by the config: GPT-2 (LayerNorm, learned positions, GELU, biases, as many key/value heads
as query heads), Llama (RMSNorm, rotary, SwiGLU, no biases) and Qwen2 (Llama with q/k/v biases);
another combination is refused. Layouts are ``hf``'s read backwards: GPT-2's Conv1D weights are
[in, out] with q, k, v side by side in ``c_attn``; Llama's Linear weights are [out, in]; a tied head
is not stored. Rotary settings are written in the layout transformers 4 wrote and 5 still reads
(``rope_theta`` beside ``rope_scaling``), the dtype as both ``torch_dtype`` (4) and ``dtype`` (5).

Tensors are planned from their names and shapes, then read from the device one at a time while
their shard is written, so the host holds at most one shard.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import typing
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxllm import checkpoint, data, finetune, hf
from jaxllm.config import DType, ModelConfig
from jaxllm.errors import InputError, check_directory
from jaxllm.model import Params
from jaxllm.tokenizer import EOT_TOKEN, TOKENIZER, byte_level_tokenizer

MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"
DTYPES: tuple[str, ...] = typing.get_args(DType)
_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# The config fields that make each family (Qwen2 is Llama with qkv_bias=True).
_FAMILY_FIELDS = {
    "gpt2": {"norm": "layernorm", "positions": "learned", "mlp": "gelu", "use_bias": True},
    "llama": {"norm": "rmsnorm", "positions": "rotary", "mlp": "swiglu", "use_bias": False},
}


class ExportError(InputError):
    """A run or a request that cannot be exported; the message names the value and the problem."""


def family(config: ModelConfig) -> str:
    """The Hugging Face ``model_type`` whose model computes what ``config`` does."""
    fields = {name: getattr(config, name) for name in _FAMILY_FIELDS["gpt2"]}
    if fields == _FAMILY_FIELDS["gpt2"] and config.n_kv_heads == config.n_heads:
        return "gpt2"
    if fields == _FAMILY_FIELDS["llama"]:
        return "qwen2" if config.qkv_bias else "llama"
    wanted = "; ".join(
        f"{name}: {', '.join(f'{k}={v}' for k, v in want.items())}"
        for name, want in _FAMILY_FIELDS.items()
    )
    raise ExportError(
        f"the config ({', '.join(f'{k}={v}' for k, v in fields.items())}, n_heads={config.n_heads}, "
        f"n_kv_heads={config.n_kv_heads}) is no Hugging Face family jaxllm exports ({wanted}, "
        "gpt2 with n_kv_heads = n_heads; qwen2 is llama with qkv_bias=True)"
    )


def _rope_fields(config: ModelConfig) -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling``: null, or the rope type with its parameters."""
    scaling: dict[str, Any] | None = None
    if config.rope_scaling == "linear":
        scaling = {"rope_type": "linear", "factor": config.rope_factor}
    elif config.rope_scaling == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": config.rope_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_len,
        }
    return {"rope_theta": config.rope_base, "rope_scaling": scaling}


def hf_config(
    config: ModelConfig, dtype: str, bos: int | list[int] | None, eos: int | list[int] | None
) -> dict[str, Any]:
    """config.json for ``config``, its tensors stored in ``dtype``, with these bos/eos ids."""
    kind = family(config)
    D, N = config.d_model, config.n_heads
    fields: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if kind == "gpt2":
        return fields | {
            "n_positions": config.max_len,
            "n_embd": D,
            "n_layer": config.n_layers,
            "n_head": N,
            "n_inner": None if config.d_ff == 4 * D else config.d_ff,  # None: 4 * n_embd
            "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "add_cross_attention": False,
        }
    fields |= {
        "max_position_embeddings": config.max_len,
        "hidden_size": D,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": N,
        "num_key_value_heads": config.n_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        **_rope_fields(config),
    }
    if kind == "qwen2":
        return fields | {"use_sliding_window": False, "sliding_window": None}
    return fields | {"head_dim": config.head_dim, "attention_bias": False, "mlp_bias": False}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor of the checkpoint: its name, its shape and how to read it (a host array in the
    Hugging Face layout, in the params' dtype)."""

    name: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]


Reader = Callable[..., Callable[[], np.ndarray]]  # leaf path -> reader of that leaf's host copy


def _reader(params: Params, config: ModelConfig, i: int | None) -> Reader:
    """Readers of the leaves of layer ``i`` (None: the top-level leaves); a scanned layer's leaf is
    sliced from its [L, ...] stack when read."""

    stacked = i is not None and config.scan_layers
    tree: Any = params if i is None else params["blocks" if stacked else f"block_{i}"]

    def leaf(*path: str) -> Callable[[], np.ndarray]:
        node = tree
        for key in path:
            node = node[key]
        return (lambda: np.asarray(node[i])) if stacked else (lambda: np.asarray(node))

    return leaf


def _transposed(read: Callable[[], np.ndarray], rows: int, cols: int) -> Callable[[], np.ndarray]:
    """A [rows, cols] view of a kernel, transposed to torch Linear's [cols, rows] ([out, in])."""
    return lambda: read().reshape(rows, cols).T


def _gpt2_layer(leaf: Reader, prefix: str, cfg: ModelConfig) -> Iterator[Tensor]:
    """One GPT-2 block: Conv1D weights [in, out], so kernels are only reshaped."""
    D, F = cfg.d_model, cfg.d_ff
    q, k, v = (leaf("attn", name, "kernel") for name in "qkv")
    qb, kb, vb = (leaf("attn", name, "bias") for name in "qkv")
    yield Tensor(
        prefix + "attn.c_attn.weight",
        (D, 3 * D),
        lambda: np.concatenate([r().reshape(D, D) for r in (q, k, v)], axis=1),
    )
    yield Tensor(
        prefix + "attn.c_attn.bias",
        (3 * D,),
        lambda: np.concatenate([qb().ravel(), kb().ravel(), vb().ravel()]),
    )
    o = leaf("attn", "o", "kernel")
    yield Tensor(prefix + "attn.c_proj.weight", (D, D), lambda: o().reshape(D, D))
    yield Tensor(prefix + "attn.c_proj.bias", (D,), leaf("attn", "o", "bias"))
    for hf_name, name in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        yield Tensor(f"{prefix}{hf_name}.weight", (D,), leaf(name, "scale"))
        yield Tensor(f"{prefix}{hf_name}.bias", (D,), leaf(name, "bias"))
    yield Tensor(prefix + "mlp.c_fc.weight", (D, F), leaf("mlp", "up", "kernel"))
    yield Tensor(prefix + "mlp.c_fc.bias", (F,), leaf("mlp", "up", "bias"))
    yield Tensor(prefix + "mlp.c_proj.weight", (F, D), leaf("mlp", "down", "kernel"))
    yield Tensor(prefix + "mlp.c_proj.bias", (D,), leaf("mlp", "down", "bias"))


def _gpt2_tensors(params: Params, cfg: ModelConfig) -> Iterator[Tensor]:
    top, D = _reader(params, cfg, None), cfg.d_model
    yield Tensor("transformer.wte.weight", (cfg.vocab_size, D), top("embed", "embedding"))
    yield Tensor("transformer.wpe.weight", (cfg.max_len, D), top("pos_embed", "embedding"))
    for i in range(cfg.n_layers):
        yield from _gpt2_layer(_reader(params, cfg, i), f"transformer.h.{i}.", cfg)
    yield Tensor("transformer.ln_f.weight", (D,), top("final_norm", "scale"))
    yield Tensor("transformer.ln_f.bias", (D,), top("final_norm", "bias"))


def _llama_layer(leaf: Reader, prefix: str, cfg: ModelConfig) -> Iterator[Tensor]:
    """One Llama (or Qwen2, with q/k/v biases) block: torch Linear weights [out, in]."""
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    a, m = prefix + "self_attn.", prefix + "mlp."
    for name, heads in (("q", N), ("k", K), ("v", K)):
        kernel = leaf("attn", name, "kernel")  # [D, heads, H]
        yield Tensor(f"{a}{name}_proj.weight", (heads * H, D), _transposed(kernel, D, heads * H))
        if cfg.qkv_bias:
            bias = leaf("attn", name, "bias")
            yield Tensor(f"{a}{name}_proj.bias", (heads * H,), lambda b=bias: b().ravel())
    yield Tensor(
        a + "o_proj.weight", (D, N * H), _transposed(leaf("attn", "o", "kernel"), N * H, D)
    )
    for name, rows, cols in (("gate", D, F), ("up", D, F), ("down", F, D)):
        kernel = _transposed(leaf("mlp", name, "kernel"), rows, cols)
        yield Tensor(f"{m}{name}_proj.weight", (cols, rows), kernel)
    yield Tensor(prefix + "input_layernorm.weight", (D,), leaf("attn_norm", "scale"))
    yield Tensor(prefix + "post_attention_layernorm.weight", (D,), leaf("mlp_norm", "scale"))


def _llama_tensors(params: Params, cfg: ModelConfig) -> Iterator[Tensor]:
    top, D = _reader(params, cfg, None), cfg.d_model
    yield Tensor("model.embed_tokens.weight", (cfg.vocab_size, D), top("embed", "embedding"))
    for i in range(cfg.n_layers):
        yield from _llama_layer(_reader(params, cfg, i), f"model.layers.{i}.", cfg)
    yield Tensor("model.norm.weight", (D,), top("final_norm", "scale"))


def tensors(config: ModelConfig, params: Params) -> list[Tensor]:
    """The checkpoint's tensors in the layout of ``family(config)``; an untied head is
    ``lm_head.weight`` [V, D]."""
    plan = list((_gpt2_tensors if family(config) == "gpt2" else _llama_tensors)(params, config))
    if not config.tie_embeddings:
        head = _reader(params, config, None)("head", "kernel")  # [D, V]
        plan.append(Tensor("lm_head.weight", (config.vocab_size, config.d_model), lambda: head().T))
    return plan


def shards(plan: list[Tensor], itemsize: int, max_bytes: int) -> list[list[Tensor]]:
    """``plan`` cut in order into shards of at most ``max_bytes`` (a larger tensor alone in its
    own), as transformers cuts them."""
    cut: list[list[Tensor]] = [[]]
    size = 0
    for tensor in plan:
        nbytes = math.prod(tensor.shape) * itemsize
        if cut[-1] and size + nbytes > max_bytes:
            cut.append([])
            size = 0
        cut[-1].append(tensor)
        size += nbytes
    return cut


def _write_shard(path: Path, shard: list[Tensor], dtype: np.dtype, mode: int) -> None:
    """Read the tensors of ``shard``, cast them to ``dtype`` and write them to ``path`` with the
    permissions ``mode`` (safetensors writes its files readable by their owner alone)."""
    arrays = {}
    for tensor in shard:
        array = np.ascontiguousarray(tensor.read(), dtype=dtype)
        assert array.shape == tensor.shape, (tensor.name, array.shape, tensor.shape)
        arrays[tensor.name] = array
    save_file(arrays, str(path), metadata={"format": "pt"})
    path.chmod(mode)


def save(
    out: str | Path,
    config: ModelConfig,
    params: Params,
    *,
    dtype: str | None = None,
    bos: int | list[int] | None = None,
    eos: int | list[int] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """Write config.json and the weights of ``params`` (in ``dtype``, default the config's
    ``param_dtype``) into the existing directory ``out``: one ``model.safetensors``, or shards of at
    most ``max_shard_bytes`` bytes with ``model.safetensors.index.json``."""
    dtype = _checked_dtype(dtype or config.param_dtype)
    out, np_dtype = Path(out), jnp.dtype(dtype)
    (out / hf.CONFIG).write_text(json.dumps(hf_config(config, dtype, bos, eos), indent=2) + "\n")
    mode = (out / hf.CONFIG).stat().st_mode & 0o777  # what the umask gives a new file
    plan = tensors(config, params)
    cut = shards(plan, np_dtype.itemsize, max_shard_bytes)
    if len(cut) == 1:
        _write_shard(out / hf.SINGLE, plan, np_dtype, mode)
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(cut):
        name = f"model-{i + 1:05d}-of-{len(cut):05d}.safetensors"
        _write_shard(out / name, shard, np_dtype, mode)
        weight_map |= {tensor.name: name for tensor in shard}
    count = sum(math.prod(t.shape) for t in plan)
    index = {
        "metadata": {"total_size": count * np_dtype.itemsize, "total_parameters": count},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / hf.INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_byte_tokenizer(out: str | Path, config: ModelConfig) -> None:
    """tokenizer.json of jaxllm's byte tokenizer and a tokenizer_config.json naming its end-of-text
    token, so that transformers' ``AutoTokenizer`` loads it and decodes without touching spaces."""
    byte_level_tokenizer().save(str(Path(out) / TOKENIZER))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT_TOKEN,
        "eos_token": EOT_TOKEN,
        "model_max_length": config.max_len,
        "clean_up_tokenization_spaces": False,
    }
    (Path(out) / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def _checked_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


def _check_out(out: Path) -> None:
    check_directory("--out", out)
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {out} is not empty; export writes a new or empty directory")


def export_run(
    run_dir: str | Path,
    out: str | Path,
    dtype: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    warn: checkpoint.Warn = lambda _: None,
) -> list[str]:
    """Export the newest step of ``run_dir`` that loads into ``out`` (new or empty: refused
    otherwise); returns the names of the files written. Written into a temporary directory beside
    ``out`` and renamed into place, so an interrupted export leaves no partial checkpoint at
    ``out``."""
    out = Path(out)
    _check_out(out)
    if dtype is not None:
        _checked_dtype(dtype)
    origin = finetune.Origin.from_meta(checkpoint.load_meta(run_dir, warn=warn))
    config, params = checkpoint.load_params(run_dir, warn=warn)
    family(config)  # refused here, before anything is written
    if origin is not None and not (Path(run_dir) / TOKENIZER).is_file():
        raise ExportError(f"{Path(run_dir) / TOKENIZER}: missing (the run's copy of its tokenizer)")
    if origin is None:  # a byte-level run: EOT begins and ends a document, as GPT-2's <|endoftext|>
        special = {"bos": data.EOT, "eos": data.EOT}
    else:
        special = {"bos": origin.bos_token_id, "eos": origin.eos_token_id}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        save(staging, config, params, dtype=dtype, max_shard_bytes=max_shard_bytes, **special)
        if origin is None:
            write_byte_tokenizer(staging, config)
        else:
            finetune.copy_tokenizer(run_dir, staging)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(path.name for path in out.iterdir())
