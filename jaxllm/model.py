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
from jaxllm.products import add_bias, project, project_out_in

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
        shape = (*self.shape[n_in:], math.prod(self.shape[:n_in])) if out_in else self.shape
        kernel = self.param("kernel", _normal(self.std), shape, cfg.storage_dtype)
        if out_in:
            y = project_out_in(x, kernel, n_in, cfg.compute_dtype)
        else:
            y = self._in_out(x, kernel)
        if self.bias_shape is not None:
            bias = self.param("bias", nn.initializers.zeros, self.bias_shape, cfg.storage_dtype)
            y = add_bias(y, bias, cfg.compute_dtype)
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
    """GELU (tanh approximation) MLP D -> F -> D, or SwiGLU: down(silu(gate(x)) * up(x)).

    The activation is computed in float32 from the projections' outputs and rounded once to the
    compute dtype: in bf16, XLA:CPU rounds after each of its elementwise ops, forward and backward.
    gpt2's bf16 train step (B=4, T=256; 2-core Zen 5 VM, alternated in one process): 1.393 ->
    1.303 s with ``jaxllm.train.clip_by_global_norm``'s change against neither (that change
    alone: 1.378 -> 1.352 s)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        D, F = cfg.d_model, cfg.d_ff
        b_f, b_d = ((F,), (D,)) if cfg.use_bias else (None, None)
        std = 0.02 / math.sqrt(2 * cfg.n_layers)
        h = Einsum(EQUATIONS["up"], (D, F), b_f, cfg, name="up")(x)
        f32 = jnp.float32
        if cfg.mlp == "swiglu":
            gate = Einsum(EQUATIONS["gate"], (D, F), b_f, cfg, name="gate")(x)
            h = (jax.nn.silu(gate.astype(f32)) * h.astype(f32)).astype(h.dtype)
        else:
            h = jax.nn.gelu(h.astype(f32), approximate=True).astype(h.dtype)
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
        hidden: bool = False,  # the final norm's output in place of the logits
    ) -> tuple[jax.Array, LayerKV]:
        """Returns logits [B, T, V] (float32; [B, R, V] at ``logits_at``) and the new tokens' keys
        and values, each [L, B, K, T, H], for a cache to store. Layer i's attention is
        ``attend(i)`` (unrolled layers only; a cache supplies it) or, by default, causal over
        ``tokens`` with ``pad`` masked. With ``hidden``, the final norm's output [B, T, D] (compute
        dtype) in place of the logits, for a loss that applies the head itself (``jaxllm.loss``;
        the head's kernel: ``head_kernel``)."""
        cfg = self.config
        if attend is not None and cfg.scan_layers:
            raise ValueError("attend= needs unrolled layers (scan_layers=False)")
        # Rows are gathered from the stored table, then converted: the lookup's gradient is then a
        # float32 scatter that XLA adds into a tied head's gradient in place (gpt2's bf16 train
        # step on the Zen 5 VM, alternated: 1.292 -> 1.243 s; converted first, XLA zeroed a
        # [V, D] array for the scatter and added it to the head's gradient in a pass of its own).
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=_normal(0.02),
            dtype=cfg.storage_dtype,
            param_dtype=cfg.storage_dtype,
            name="embed",
        )
        x = embed(tokens).astype(cfg.compute_dtype)
        if cfg.positions == "learned":
            table = nn.Embed(
                cfg.max_len,
                cfg.d_model,
                embedding_init=_normal(0.02),
                dtype=cfg.storage_dtype,
                param_dtype=cfg.storage_dtype,
                name="pos_embed",
            )
            with jax.named_scope("pos_embed"):  # the sum's name too, for ``jaxllm profile``
                x = x + table(positions).astype(cfg.compute_dtype)
        x, kv = self._layers(x, positions, pad, attend)
        if logits_at is not None:  # the head only where it is read
            x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)
        x = make_norm(cfg, "final_norm")(x)
        if hidden:
            return x, kv
        with jax.named_scope("head"):  # its ops' names, for ``jaxllm profile``
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


def head_kernel(params: Params, config: ModelConfig) -> tuple[jax.Array, bool]:
    """The output head's kernel in ``params`` and whether it is output-major: the tied embedding
    table [V, D] (output-major), else the head's own kernel ([D, V]; [V, D] if ``kernel_order`` is
    out_in)."""
    if config.tie_embeddings:
        return params["embed"]["embedding"], True
    return params["head"]["kernel"], config.kernel_order == "out_in"


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
    last and merged into one ([D, N, H] -> [N, H, D], [N, H, D] -> [D, N·H]); embeddings, norms and
    biases unchanged."""

    def move(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
        names = path_names(path).split("/")
        if names[-1] != "kernel":
            return leaf
        n_in = input_axes(EQUATIONS[names[-2]])
        moved = jnp.moveaxis(leaf, tuple(range(n_in)), tuple(range(leaf.ndim - n_in, leaf.ndim)))
        return moved.reshape(*moved.shape[: leaf.ndim - n_in], -1)

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
