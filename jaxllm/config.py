"""ModelConfig: the one description of a decoder transformer, and its presets.

A config is frozen and validated once, in ``__post_init__``; derived sizes are properties. Presets are
plain constants: ``tiny`` for tests, ``small`` for CPU experiments, OpenAI GPT-2 shapes, and the
published shapes of Llama-2-7B, Llama-3-8B, Llama-3.1-8B/70B, Llama-3.2-1B and Qwen2.5-7B (analysed without
allocating weights).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import jax.numpy as jnp

from jaxllm.errors import InputError, positive_int

MAX_SIZE = 2**31 - 1  # sizes index int32 arrays (token ids, positions, shapes)
Norm = Literal["layernorm", "rmsnorm"]
Positions = Literal["learned", "rotary"]
RopeScaling = Literal["none", "linear", "llama3"]
MLPKind = Literal["gelu", "swiglu"]
DType = Literal["float32", "bfloat16", "float16"]
# Remat policies, by what the backward pass may keep from the forward pass of a layer:
#   none: everything (no recomputation); full: only the layer input (recompute the whole layer);
#   dots: matmul outputs; dots_no_batch: matmul outputs without batch dimensions (not attention).
Remat = Literal["none", "full", "dots", "dots_no_batch"]
# Axis order of the projection kernels: in_out stores [in..., out...] (x @ W, as trained); out_in
# stores [out..., I] (W @ x, output-major, as torch's nn.Linear and ggml do; I: the input axes
# merged into one): the CPU's serving layout (``jaxllm.serve.serving_config``).
KernelOrder = Literal["in_out", "out_in"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a GPT-style decoder.

    Dimension letters (see ``jaxllm.model``): V vocab_size, D d_model, L n_layers, N n_heads,
    K n_kv_heads, H = D / N head_dim, F d_ff.
    """

    vocab_size: int = 257  # 256 byte values + end-of-text (jaxllm.data)
    max_len: int = 64  # context length: the most positions the model attends over
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4  # = n_heads: multi-head; 1: multi-query; in between: grouped-query
    d_ff: int = 128
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    positions: Positions = "learned"
    rope_base: float = 10000.0  # rotary base frequency (only with positions="rotary")
    # Rotary scaling, as transformers' rope types: none; linear divides every frequency by rope_factor;
    # llama3 divides those of wavelength above rope_original_len / rope_low_freq_factor positions by
    # rope_factor, keeps those below rope_original_len / rope_high_freq_factor, blends in between.
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_len: int = 8192  # llama3: the context the model was pretrained with
    mlp: MLPKind = "gelu"  # gelu: tanh-approximated GELU MLP; swiglu: gated SiLU MLP (3 matrices)
    use_bias: bool = True  # biases on projections and LayerNorm
    qkv_bias: bool = False  # biases on the q, k and v projections even without use_bias (Qwen2)
    tie_embeddings: bool = True  # the output head reuses the token embedding
    dtype: DType = "float32"  # compute dtype of matmuls and activations
    param_dtype: DType = "float32"  # storage dtype of parameters (master weights when training)
    scan_layers: bool = True  # layers under nn.scan (one compiled layer) vs a Python loop
    # Scanned layers per loop iteration (nn.scan's unroll); n_layers compiles the L layers straight
    # (no loop, stacked parameters kept): XLA:CPU runs them faster (jaxllm.train.training_config).
    scan_unroll: int = 1
    remat: Remat = "none"
    kernel_order: KernelOrder = "in_out"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "max_len",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_ff",
            "rope_original_len",
        ):
            positive_int(name, getattr(self, name), MAX_SIZE)
        positive_int(
            f"scan_unroll (layers per scan step, of n_layers={self.n_layers})",
            self.scan_unroll,
            self.n_layers,
        )
        for name in (
            "norm_eps",
            "rope_base",
            "rope_factor",
            "rope_low_freq_factor",
            "rope_high_freq_factor",
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise InputError(f"{name} must be a positive finite number, got {value!r}")
        for field in dataclasses.fields(self):
            choices = _literal_choices(field.name)
            value = getattr(self, field.name)
            if choices and value not in choices:
                raise InputError(f"{field.name} must be one of {', '.join(choices)}; got {value!r}")
        if self.d_model % self.n_heads:
            raise InputError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise InputError(
                f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.positions == "rotary" and self.head_dim % 2:
            raise InputError(f"rotary positions need an even head_dim, got {self.head_dim}")
        low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
        if self.rope_scaling == "llama3" and high <= low:
            raise InputError(
                f"llama3 rope scaling needs rope_high_freq_factor={high} above "
                f"rope_low_freq_factor={low}"
            )

    @property
    def head_dim(self) -> int:
        """H: width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def groups(self) -> int:
        """Query heads that share one key/value head (N / K)."""
        return self.n_heads // self.n_kv_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (and validated)."""
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise InputError(
                f"unknown ModelConfig field {unknown[0]!r}; fields are: {', '.join(field_names())}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields added after checkpoints were first written. A saved config without them takes these defaults,
# which describe the model that wrote it (jaxllm.checkpoint.config_from_meta).
LATER_FIELDS = (
    "rope_scaling",
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_len",
    "qkv_bias",
    "kernel_order",
    "scan_unroll",
)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def _field_type(name: str) -> Any:
    return typing.get_type_hints(ModelConfig)[name]


def _literal_choices(name: str) -> tuple[str, ...]:
    hint = _field_type(name)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``FIELD=VALUE`` to the field's type, e.g. ``n_layers=4`` -> ("n_layers", 4).

    Raises InputError naming the field and what it accepts.
    """
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep:
        raise InputError(f"override {text!r} must look like FIELD=VALUE")
    if name not in field_names():
        raise InputError(
            f"unknown ModelConfig field {name!r}; fields are: {', '.join(field_names())}"
        )
    hint = _field_type(name)
    raw = raw.strip()
    if typing.get_origin(hint) is Literal:
        return name, raw  # validated against the choices by __post_init__
    if hint is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return name, True
        if lowered in ("false", "0", "no"):
            return name, False
        raise InputError(f"override {name} expects true or false, got {raw!r}")
    kind = hint if isinstance(hint, type) else None
    if isinstance(hint, types.UnionType):
        kind = float
    try:
        return name, int(raw) if kind is int else float(raw)
    except ValueError:
        kind_name = "an integer" if kind is int else "a number"
        raise InputError(f"override {name} expects {kind_name}, got {raw!r}") from None


def apply_overrides(config: ModelConfig, overrides: list[str] | tuple[str, ...]) -> ModelConfig:
    """``config`` with each ``FIELD=VALUE`` override applied, validated once at the end."""
    return config.replace(**dict(parse_override(o) for o in overrides))


_GPT2 = ModelConfig(
    vocab_size=50257,
    max_len=1024,
    d_model=768,
    n_layers=12,
    n_heads=12,
    n_kv_heads=12,
    d_ff=3072,
    norm="layernorm",
    positions="learned",
    mlp="gelu",
    use_bias=True,
    tie_embeddings=True,
)

_LLAMA = ModelConfig(
    vocab_size=32000,
    max_len=4096,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=32,
    d_ff=11008,
    norm="rmsnorm",
    positions="rotary",
    rope_base=10000.0,
    mlp="swiglu",
    use_bias=False,
    tie_embeddings=False,
)

_LLAMA31 = _LLAMA.replace(
    vocab_size=128256,
    max_len=131072,
    n_kv_heads=8,
    d_ff=14336,
    rope_base=500000.0,
    rope_scaling="llama3",
    rope_factor=8.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_len=8192,
)

PRESETS: dict[str, ModelConfig] = {
    # Fast tests: 2 layers, 32 wide, byte vocabulary.
    "tiny": ModelConfig(),
    # CPU experiments: ~3.3 M parameters, trains visibly in minutes on 2 cores.
    "small": ModelConfig(max_len=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=1024),
    # OpenAI GPT-2 (Radford et al. 2019; the released checkpoints' config.json).
    "gpt2": _GPT2,
    "gpt2-medium": _GPT2.replace(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=4096),
    "gpt2-large": _GPT2.replace(d_model=1280, n_layers=36, n_heads=20, n_kv_heads=20, d_ff=5120),
    "gpt2-xl": _GPT2.replace(d_model=1600, n_layers=48, n_heads=25, n_kv_heads=25, d_ff=6400),
    # Meta Llama 2 7B (Touvron et al. 2023; the released config.json).
    "llama2-7b": _LLAMA,
    # Meta Llama 3 8B: 128K vocabulary, grouped-query attention with 8 KV heads, rope base 500000.
    "llama3-8b": _LLAMA.replace(
        vocab_size=128256, max_len=8192, n_kv_heads=8, d_ff=14336, rope_base=500000.0
    ),
    # Meta Llama 3.1 8B and 70B: the Llama 3 shapes with the context extended to 131072 by llama3 rope
    # scaling of the 8192-token pretraining context.
    "llama3.1-8b": _LLAMA31,
    "llama3.1-70b": _LLAMA31.replace(d_model=8192, n_layers=80, n_heads=64, d_ff=28672),
    # Meta Llama 3.2 1B: tied embeddings, 16 layers. The published model extends its context to 131072
    # with llama3 rope scaling (as llama3.1-8b); this preset keeps the native 8192 context and plain
    # RoPE, which the memory experiment sizes. --hf-dir loads the published scaling.
    "llama3.2-1b": _LLAMA.replace(
        vocab_size=128256,
        max_len=8192,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        d_ff=8192,
        rope_base=500000.0,
        tie_embeddings=True,
    ),
    # Qwen2.5 7B (Qwen team 2024; the released config.json): the Llama layout with biases on q, k and
    # v, 4 KV heads for 28 query heads, rope base 1e6, untied head.
    "qwen2.5-7b": _LLAMA.replace(
        vocab_size=152064,
        max_len=131072,
        d_model=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        d_ff=18944,
        norm_eps=1e-6,
        rope_base=1000000.0,
        qkv_bias=True,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """The preset called ``name``; InputError listing the presets if there is none."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown preset {name!r}; presets are: {', '.join(PRESETS)}") from None
