"""The decoder transformer as Flax Linen modules, applied as a pure function by every phase.

Dimension letters, used in einsum equations, shape comments and docstrings across jaxllm:
  B batch, T query length (new tokens), S key/value length (cache slots), D model width,
  F MLP width, N query heads, K key/value heads, G = N / K query heads per key/value head,
  H head dim, L layers, V vocabulary.

``logits, (k, v) = Transformer(cfg).apply({"params": p}, tokens, positions, pad=None, attend=None)``:
- by default, a full forward pass over tokens[B, T]: causal (``jaxllm.attention.causal_attention``),
  with keys in columns below ``pad[b]`` masked (left padding);
- with ``attend`` (a function of the layer index), each layer's attention is the caller's: a KV cache
  (``jaxllm.cache.KVCache.attend``, ``jaxllm.step``) attends the new tokens to what it holds.
Either way the new tokens' keys and values come back ([L, B, K, T, H] each) for a cache to store: the
model itself holds no state and has no mode flag.

Layers sit under ``nn.scan`` (parameters stacked under ``blocks`` with a leading L axis) or in a Python
loop (``block_0`` ... ``block_{L-1}``); ``stack_layers``/``unstack_layers`` convert between the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention import LayerKV, causal_attention
from jaxllm.config import ModelConfig

Params = dict[str, Any]
# attend(q [B, T, N, H], k_new [B, K, T, H], v_new [B, K, T, H]) -> [B, T, N, H]: a layer's attention
# supplied by the caller (a KV cache); LayerAttend maps a layer index to it.
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
LayerAttend = Callable[[int], Attend]

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _normal(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


def project(eqn: str, x: jax.Array, kernel: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``einsum(eqn, x, kernel)`` in ``dtype``, accumulated in float32; x's two leading axes are
    B and T.

    On a CPU the product asks XLA for a float32 result, rounded after: the f32 accumulation took
    gpt2's bf16 decode step at B=8 from 83 to 63 ms there. And a narrow (bf16) product of a single
    row (B = T = 1: a decode step of one sequence) takes a path that converts the whole weight to
    float32 on every call; two rows take the GEMM path. So one row is computed as two (measured,
    gpt2 bf16 decode B=1: 48.9 -> 38.7 ms).

    A GPU's GEMMs accumulate in float32 whatever the result type, so there a product of several
    rows is asked in ``dtype``: a float32 result would make its gradient float32 too (the transpose
    of the rounding), and the backward products run on float32 operands. On an H200, gpt2-medium's
    bf16 train step (B=8, T=1024) ran its backward products as TF32 GEMMs and spent 9 ms of 109
    converting; asked in bf16, the step took 70 ms (jax 0.11.2). A single row stays float32: XLA
    computes it as a multiply and a reduction, which in bf16 missed the float32-accumulated product
    by 3% (tests/test_model.py, on the H200).
    """
    if jax.default_backend() != "cpu" and x.shape[0] * x.shape[1] > 1:
        return jnp.einsum(eqn, x.astype(dtype), kernel.astype(dtype))
    single = _widens_single_rows(dtype) and x.shape[:2] == (1, 1)
    if single:
        x = jnp.concatenate([x, x])
    y = jnp.einsum(eqn, x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
    return (y[:1] if single else y).astype(dtype)


# Each projection's equation, by module name: x's axes, its in_out kernel's, the output's.
EQUATIONS = {
    "q": "BTD,DNH->BTNH",
    "k": "BTD,DKH->BTKH",
    "v": "BTD,DKH->BTKH",
    "o": "BTNH,NHD->BTD",
    "up": "BTD,DF->BTF",
    "gate": "BTD,DF->BTF",
    "down": "BTF,FD->BTD",
    "head": "BTD,DV->BTV",
}
# Rows (B·T) for which an output-major product runs weight-major, by the compute dtype's width in
# bytes: see project_out_in.
WEIGHT_MAJOR_ROWS = {4: range(2, 257), 2: range(32, 257)}


def project_out_in(x: jax.Array, kernel: jax.Array, n_in: int, dtype: jnp.dtype) -> jax.Array:
    """x [..., *in] against an output-major kernel [*out, *in] -> [..., *out], in ``dtype``,
    accumulated in float32 (``kernel_order="out_in"``: the CPU's serving layout).

    For the row counts R of ``WEIGHT_MAJOR_ROWS`` the kernel is applied weight-major, [O, I] x
    [R, I] -> [O, R], then transposed (the optimization barrier keeps XLA from folding the transpose
    back into the product); other counts run row-major, [R, I] x [O, I] -> [R, O], except one
    narrow (bf16) row on a CPU: [1, I] x transpose([O, I]), which XLA:CPU compiles to a loop over
    the weight's rows that reads it in bf16 (its library product converts the whole weight to
    float32 first). Measured on twelve gpt2 MLPs, against the in_out product: f32 1 row 9.5 -> 6.8
    ms (row-major), 8 rows 21.4 -> 10.2 ms, 32 rows 43.7 -> 25.8 ms (weight-major; even from 256
    rows on); bf16 8 rows 24.9 -> 18.4 ms (row-major; weight-major 28.3), 32 rows 52.9 -> 42.8 ms
    (weight-major). bf16 one row, against the row-major product of two rows: twelve [3072, 768]
    kernels 5.2 -> 2.7 ms, twelve [768, 3072] 4.0 -> 2.6 ms, gpt2's tied head 6.6 -> 3.0 ms
    (about 20 GB/s, 2-core VM).
    """
    lead, inner = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :]
    out = kernel.shape[: kernel.ndim - n_in]
    if kernel.shape[kernel.ndim - n_in :] != inner:
        raise ValueError(f"kernel {kernel.shape} does not take inputs {x.shape} over {n_in} axes")
    rows = math.prod(lead)
    x2 = x.reshape(rows, -1).astype(dtype)  # [R, I]
    w = kernel.reshape(math.prod(out), -1).astype(dtype)  # [O, I]
    contract = (((1,), (1,)), ((), ()))
    if rows in WEIGHT_MAJOR_ROWS.get(jnp.dtype(dtype).itemsize, ()):
        y = jax.lax.dot_general(w, x2, contract, preferred_element_type=jnp.float32)  # [O, R]
        y = jax.lax.optimization_barrier(y).T
    elif rows == 1 and _widens_single_rows(dtype):
        # [1, I] x transpose([O, I]): XLA:CPU fuses a vector-matrix product with its operand's
        # transpose into one loop over the weight's rows, reading the narrow weight as it is.
        y = jnp.matmul(x2, w.T, preferred_element_type=jnp.float32)  # [1, O]
    else:
        y = jax.lax.dot_general(x2, w, contract, preferred_element_type=jnp.float32)  # [R, O]
    return y.astype(dtype).reshape(*lead, *out)


class Einsum(nn.Module):
    """One projection, ``einsum(eqn, x, kernel) (+ bias)``: FLOPs read off the equation.

    ``merge_heads``: x [B, T, N, H] and the kernel [N, H, D] contract as [B, T, N·H] and [N·H, D],
    one axis (the same product). Written with two contracted axes, XLA:CPU copied the whole kernel
    into [H, N, D] order on every decode step (measured: gpt2's f32 decode step at B=1, 45 -> 30 ms).
    """

    eqn: str
    shape: tuple[int, ...]  # kernel shape
    bias_shape: tuple[int, ...] | None
    config: ModelConfig
    std: float = 0.02
    merge_heads: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        n_in = input_axes(self.eqn)
        out_in = cfg.kernel_order == "out_in"
        shape = self.shape[n_in:] + self.shape[:n_in] if out_in else self.shape
        kernel = self.param("kernel", _normal(self.std), shape, cfg.storage_dtype)
        if out_in:
            y = project_out_in(x, kernel, n_in, cfg.compute_dtype)
        else:
            y = self._in_out(x, kernel)
        if self.bias_shape is not None:
            bias = self.param("bias", nn.initializers.zeros, self.bias_shape, cfg.storage_dtype)
            y = y + bias.astype(cfg.compute_dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
        return y

    def _in_out(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        eqn = self.eqn
        if self.merge_heads:
            eqn = "BTE,ED->BTD"
            x, kernel = x.reshape(*x.shape[:-2], -1), kernel.reshape(-1, kernel.shape[-1])
        return project(eqn, x, kernel, self.config.compute_dtype)


def input_axes(eqn: str) -> int:
    """How many leading axes of an in_out kernel an equation contracts: "BTNH,NHD->BTD" -> 2."""
    x, kernel = eqn.split("->")[0].split(",")
    return sum(axis in x for axis in kernel)


def _widens_single_rows(dtype: jnp.dtype) -> bool:
    """Whether XLA widens a whole narrow weight to float32 for a product with one row (XLA:CPU)."""
    return jnp.dtype(dtype).itemsize < 4 and jax.default_backend() == "cpu"


class _StandardPromotion(nn.Module):
    """A Flax norm applied under standard dtype promotion: flax's norms mix bf16 activations with
    their f32 statistics inside, which strict promotion (``jax_numpy_dtype_promotion='strict'``, the
    test configuration) refuses."""

    norm: nn.Module

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.numpy_dtype_promotion("standard"):
            return self.norm(x)


def make_norm(config: ModelConfig, name: str) -> nn.Module:
    return _StandardPromotion(_flax_norm(config, name))


def _flax_norm(config: ModelConfig, name: str) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(
            epsilon=config.norm_eps,
            dtype=config.compute_dtype,
            param_dtype=config.storage_dtype,
            name=name,
        )
    return nn.LayerNorm(
        epsilon=config.norm_eps,
        use_bias=config.use_bias,
        dtype=config.compute_dtype,
        param_dtype=config.storage_dtype,
        name=name,
    )


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """Rotary angular frequencies [H/2] in radians per position, float64 on the host:
    ``rope_base**(-2i/H)``, scaled as ``config.rope_scaling`` says (transformers' rope types)."""
    H, factor = config.head_dim, config.rope_factor
    freq = config.rope_base ** (-np.arange(0, H, 2) / H)
    if config.rope_scaling == "linear":
        return freq / factor
    if config.rope_scaling == "llama3":
        # 0 for wavelengths beyond original_len / low_freq_factor (scaled), 1 below original_len /
        # high_freq_factor (kept), linear in original_len / wavelength between.
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        keep = np.clip((config.rope_original_len * freq / (2 * np.pi) - low) / (high - low), 0, 1)
        return (1 - keep) * freq / factor + keep * freq
    return freq


def rope(x: jax.Array, positions: jax.Array, freq: np.ndarray) -> jax.Array:
    """Rotary position embedding of x[B, T, heads, H] at positions[B, T], halves convention.

    Feature i < H/2 pairs with i + H/2 and rotates by ``position * freq[i]`` radians
    (``rope_frequencies``).
    """
    half = x.shape[-1] // 2
    freq32 = jnp.asarray(freq, jnp.float32)[None, None, :]  # [1, 1, H/2]
    angle = positions.astype(jnp.float32)[:, :, None] * freq32  # [B, T, H/2]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]  # [B, T, 1, H/2]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with N query heads sharing K key/value heads in groups of G."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T]
        pad: jax.Array | None,  # [B], or None: no padding
        attend: Attend | None = None,  # the caller's attention (None: causal over x alone)
    ) -> tuple[jax.Array, LayerKV]:
        """Returns the output [B, T, D] and the new tokens' keys and values ([B, K, T, H] each)."""
        cfg = self.config
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias, qkv_bias = cfg.use_bias, cfg.use_bias or cfg.qkv_bias
        q = Einsum(EQUATIONS["q"], (D, N, H), (N, H) if qkv_bias else None, cfg, name="q")(x)
        k = Einsum(EQUATIONS["k"], (D, K, H), (K, H) if qkv_bias else None, cfg, name="k")(x)
        v = Einsum(EQUATIONS["v"], (D, K, H), (K, H) if qkv_bias else None, cfg, name="v")(x)
        if cfg.positions == "rotary":
            freq = rope_frequencies(cfg)
            q, k = rope(q, positions, freq), rope(k, positions, freq)
        k_new, v_new = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
        if attend is None:
            out = causal_attention(q, k, v, pad)
        else:
            out = attend(q, k_new, v_new).astype(q.dtype)
            # A data dependency from this layer's reads of the cache to its new keys and values: it
            # orders the in-place cache write after the reads. Without it XLA cannot tell the order
            # and copies the whole cache (measured: 2 full copies per layer). The first and the last
            # output elements depend on every read (the engine's step reads the cache in two
            # segments: the decode tokens first, the prefill lanes last). x * 0 is kept by XLA for
            # floats; it is 0 unless the output is already inf/NaN.
            flat = out.reshape(-1)
            tie = ((flat[0] + flat[-1]) * 0).astype(k_new.dtype)
            k_new, v_new = k_new + tie, v_new + tie
        std = 0.02 / math.sqrt(2 * cfg.n_layers)
        o_bias = (D,) if bias else None
        # Over a cache (T small), one N·H axis: see Einsum.merge_heads. A whole sequence keeps two
        # axes, so that the backward pass saves no reshaped copy of the kernel as a residual.
        o = Einsum(EQUATIONS["o"], (N, H, D), o_bias, cfg, std, attend is not None, name="o")
        y = o(out)
        return y, (k_new, v_new)


class MLP(nn.Module):
    """GELU (tanh approximation) MLP D -> F -> D, or SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        D, F = cfg.d_model, cfg.d_ff
        b_f, b_d = ((F,), (D,)) if cfg.use_bias else (None, None)
        std = 0.02 / math.sqrt(2 * cfg.n_layers)
        h = Einsum(EQUATIONS["up"], (D, F), b_f, cfg, name="up")(x)
        if cfg.mlp == "swiglu":
            h = jax.nn.silu(Einsum(EQUATIONS["gate"], (D, F), b_f, cfg, name="gate")(x)) * h
        else:
            h = jax.nn.gelu(h, approximate=True)
        return Einsum(EQUATIONS["down"], (F, D), b_d, cfg, std, name="down")(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,
        pad: jax.Array | None,
        attend: Attend | None = None,
    ) -> tuple[jax.Array, LayerKV]:
        cfg = self.config
        h, new_kv = Attention(cfg, name="attn")(
            make_norm(cfg, "attn_norm")(x), positions, pad, attend
        )
        x = x + h
        x = x + MLP(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(x))
        return x, new_kv


def _block_class(config: ModelConfig) -> Any:
    if config.remat == "none":
        return Block
    # Inside a rolled nn.scan the CSE barrier is unnecessary (and costs speed); unrolled, it keeps XLA
    # from merging the recomputation back into the forward pass.
    rolled = config.scan_layers and config.scan_unroll == 1
    return nn.remat(Block, policy=_REMAT_POLICIES[config.remat], prevent_cse=not rolled)


class Transformer(nn.Module):
    """Token + position embedding, L blocks, final norm, output head (tied or separate)."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int
        positions: jax.Array,  # [B, T] int, each in [0, max_len)
        pad: jax.Array | None = None,  # [B] left-padding columns (causal attention over tokens)
        attend: LayerAttend | None = None,
        logits_at: jax.Array | None = None,  # [B, R] int: the positions whose logits are wanted
    ) -> tuple[jax.Array, LayerKV]:
        """Returns logits [B, T, V] (float32; [B, R, V] at ``logits_at``) and the new tokens' keys
        and values, each [L, B, K, T, H], for a cache to store. Layer i's attention is
        ``attend(i)`` (unrolled layers only; a cache supplies it) or, by default, causal over
        ``tokens`` with ``pad`` masked."""
        cfg = self.config
        if attend is not None and cfg.scan_layers:
            raise ValueError("attend= needs unrolled layers (scan_layers=False)")
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=_normal(0.02),
            dtype=cfg.compute_dtype,
            param_dtype=cfg.storage_dtype,
            name="embed",
        )
        x = embed(tokens)
        if cfg.positions == "learned":
            x = x + nn.Embed(
                cfg.max_len,
                cfg.d_model,
                embedding_init=_normal(0.02),
                dtype=cfg.compute_dtype,
                param_dtype=cfg.storage_dtype,
                name="pos_embed",
            )(positions)
        x, kv = self._layers(x, positions, pad, attend)
        if logits_at is not None:  # the head only where it is read
            x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)
        x = make_norm(cfg, "final_norm")(x)
        if cfg.tie_embeddings and cfg.kernel_order == "out_in":  # the table is output-major
            logits = project_out_in(x, embed.embedding, 1, cfg.compute_dtype)
        elif cfg.tie_embeddings:
            logits = project("BTD,VD->BTV", x, embed.embedding, cfg.compute_dtype)
        else:
            shape = (cfg.d_model, cfg.vocab_size)
            logits = Einsum(EQUATIONS["head"], shape, None, cfg, name="head")(x)
        return logits.astype(jnp.float32), kv

    def _layers(
        self,
        x: jax.Array,
        positions: jax.Array,
        pad: jax.Array | None,
        attend: LayerAttend | None,
    ) -> tuple[jax.Array, LayerKV]:
        """Runs the L blocks; returns x and the new keys and values stacked to [L, B, K, T, H]."""
        cfg = self.config
        block = _block_class(cfg)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),  # pyright: ignore[reportArgumentType]
                length=cfg.n_layers,
                unroll=cfg.scan_unroll,
            )
            return stack(cfg, name="blocks")(x, positions, pad)
        new_k, new_v = [], []
        for i in range(cfg.n_layers):
            layer_attend = None if attend is None else attend(i)
            x, (k, v) = block(cfg, name=f"block_{i}")(x, positions, pad, layer_attend)
            new_k.append(k)
            new_v.append(v)
        return x, (jnp.stack(new_k), jnp.stack(new_v))


def init_params(config: ModelConfig, key: jax.Array) -> Params:
    """Fresh parameters, GPT-2 scheme: normal 0.02, residual outputs 0.02/sqrt(2L)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(lambda k: Transformer(config).init(k, tokens, tokens)["params"])
    return init(key)


def param_shapes(config: ModelConfig) -> Params:
    """Parameter shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), allocating nothing."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    fn = lambda k, t: Transformer(config).init(k, t, t)["params"]  # noqa: E731
    return jax.eval_shape(fn, jax.ShapeDtypeStruct((2,), jnp.uint32), tokens)


_COMPONENTS = {
    "embed": "embedding",
    "pos_embed": "positions",
    "head": "head",
    "attn": "attention",
    "mlp": "mlp",
}


def count_params(config: ModelConfig) -> dict[str, int]:
    """Parameter counts by component (embedding, positions, attention, mlp, norms, head) and total.

    Tied embeddings are counted once, under ``embedding``.
    """
    counts = dict.fromkeys(["embedding", "positions", "attention", "mlp", "norms", "head"], 0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes(config)):
        names = path_names(path).split("/")
        component = next((_COMPONENTS[n] for n in names if n in _COMPONENTS), "norms")
        counts[component] += math.prod(leaf.shape)
    counts["total"] = sum(counts.values())
    return counts


def path_names(path: tuple[Any, ...]) -> str:
    """``a/b/c`` from a pytree key path: its dict keys and attribute names (sequence indices,
    such as the position of a state in an optax chain, are left out)."""
    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    return "/".join(n for n in names if n)


def output_major(params: Params) -> Params:
    """in_out parameters -> out_in (``kernel_order``): every projection kernel's input axes moved
    last ([D, N, H] -> [N, H, D], [N, H, D] -> [D, N, H]); embeddings, norms and biases unchanged."""

    def move(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
        names = path_names(path).split("/")
        if names[-1] != "kernel":
            return leaf
        n_in = input_axes(EQUATIONS[names[-2]])
        return jnp.moveaxis(leaf, tuple(range(n_in)), tuple(range(leaf.ndim - n_in, leaf.ndim)))

    return jax.tree_util.tree_map_with_path(move, params)


def stack_layers(params: Params, n_layers: int) -> Params:
    """Unrolled parameters (``block_i``) -> scanned parameters (``blocks``, leading L axis)."""
    rest = {k: v for k, v in params.items() if not k.startswith("block_")}
    layers = [params[f"block_{i}"] for i in range(n_layers)]
    return {**rest, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params: Params, n_layers: int) -> Params:
    """Scanned parameters (``blocks``) -> unrolled parameters (``block_i``)."""
    rest = {k: v for k, v in params.items() if k != "blocks"}
    layers = {
        f"block_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"]) for i in range(n_layers)
    }
    return {**rest, **layers}
