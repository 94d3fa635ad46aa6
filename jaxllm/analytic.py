"""Closed-form parameters, FLOPs, bytes and memory of each phase, derived from the config and shapes.

Letters as in ``jaxllm.model``: B batch, T query length, S key/value length (cache slots), D width,
F MLP width, N query heads, K key/value heads, H head dim, L layers, V vocabulary.

FLOP convention: matmuls only (2 FLOPs per multiply-add), the way XLA counts a dot. Element-wise work
(norms, GELU/SiLU, softmax, biases, the AdamW update) is left out: it is O(1/D) of the total and XLA
counts it as well, so XLA's figure sits slightly above these (under 3% for D >= 256, H >= 64).
Attention is given two ways:
- ``"xla"``: what the program computes — every query against every key slot it is handed: without a
  cache, each query block against the keys up to its end (``jaxllm.attention.causal_blocks``: T × T
  for T <= 128, about 9/16 of it at T = 1024), or T(T + 1)/2 where cuDNN's fused causal kernel runs
  (``fused``: a GPU in bf16; its backward runs 5 products to XLA's 4, recomputing q·kᵀ), and
  T × (S + T) with a cache of S slots (the model scores the whole allocated cache, filled or not,
  plus the new tokens' own keys);
- ``"causal"``: useful work — query t sees t + 1 new keys plus the filled slots before it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxllm.attention import attention_implementation, causal_blocks
from jaxllm.config import ModelConfig

Attention = Literal["xla", "causal"]
ADAM_MOMENTS = 2  # AdamW keeps two moments per parameter, m and v


def _bytes(dtype: jnp.dtype | str) -> int:
    return jnp.dtype(dtype).itemsize


def _mlp_matrices(config: ModelConfig) -> int:
    return 3 if config.mlp == "swiglu" else 2


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters by component, in closed form (the same keys as ``model.count_params``).

    Per layer: q and o are D × N·H = D², k and v are D × K·H; the MLP has 2 (GELU) or 3 (SwiGLU)
    D × F matrices; each norm has a scale (and a bias for LayerNorm with biases). Biases: N·H + 2·K·H
    on q, k, v (use_bias or qkv_bias), D on o and F (per up/gate) + D on the MLP (use_bias). Embedding
    V × D; learned positions max_len × D; a separate head D × V unless tied; the final norm counts
    under ``norms``.
    """
    D, F, L, KH = config.d_model, config.d_ff, config.n_layers, config.n_kv_heads * config.head_dim
    bias, qkv_bias = config.use_bias, config.use_bias or config.qkv_bias
    n_up = _mlp_matrices(config) - 1
    attention = 2 * D * D + 2 * D * KH + (D + 2 * KH if qkv_bias else 0) + (D if bias else 0)
    mlp = (n_up + 1) * D * F + (n_up * F + D if bias else 0)
    norm = D * (2 if config.norm == "layernorm" and bias else 1)
    counts = {
        "embedding": config.vocab_size * D,
        "positions": config.max_len * D if config.positions == "learned" else 0,
        "attention": L * attention,
        "mlp": L * mlp,
        "norms": (2 * L + 1) * norm,
        "head": 0 if config.tie_embeddings else D * config.vocab_size,
    }
    counts["total"] = sum(counts.values())
    return counts


def param_bytes(config: ModelConfig) -> int:
    """Bytes of all parameters in their storage dtype (``param_dtype``)."""
    return param_counts(config)["total"] * _bytes(config.storage_dtype)


def kv_cache_bytes(
    config: ModelConfig, batch: int, slots: int, dtype: jnp.dtype | str | None = None
) -> int:
    """K and V of every layer: 2 × bytes × B × S × L × K × H (the source article's 2·2·B·T·D·L for
    bf16 multi-head attention, where K·H = D). Default dtype: the compute dtype, as ``KVCache.init``."""
    itemsize = _bytes(dtype or config.compute_dtype)
    return 2 * itemsize * batch * slots * config.n_layers * config.n_kv_heads * config.head_dim


def kv_bytes_per_token(config: ModelConfig) -> int:
    """Bytes of K and V one token adds to one sequence's cache, all layers: 2 × bytes × L × K × H."""
    return kv_cache_bytes(config, 1, 1)


def matmul_flops_per_token(config: ModelConfig) -> int:
    """Forward FLOPs of the weight matmuls for one token: 2 × (weights a token multiplies).

    Per layer q, o: D² each; k, v: D·K·H each; the MLP 2 or 3 × D·F. The head D·V (tied or not: the
    tied embedding is multiplied as the head). Embedding and position lookups are gathers: no FLOPs.
    """
    D, KH = config.d_model, config.n_kv_heads * config.head_dim
    layer = 2 * D * D + 2 * D * KH + _mlp_matrices(config) * D * config.d_ff
    return 2 * (config.n_layers * layer + D * config.vocab_size)


def attention_flops(config: ModelConfig, batch: int, queries: int, keys: int) -> int:
    """Forward FLOPs of scores q·kᵀ and probs·v over all layers: 2 matmuls × 2 × B·N·H·queries·keys
    per layer (``keys`` is the number of (query, key) pairs per query, i.e. the key length)."""
    return 4 * batch * config.n_layers * config.d_model * queries * keys


def blocked_pairs(seq: int) -> int:
    """(query, key) pairs the blocked causal pass over ``seq`` tokens scores (``causal_blocks``)."""
    return sum((b - a) * b for a, b in causal_blocks(seq))


def fused(config: ModelConfig) -> bool:
    """Whether this device runs ``config``'s whole-sequence attention as cuDNN's fused kernel."""
    return attention_implementation(config.compute_dtype, config.head_dim) == "cudnn"


def _sequence_pairs(config: ModelConfig, seq: int) -> int:
    """(query, key) pairs the whole-sequence causal pass scores: the fused kernel's causal ones,
    else the blocked pass's."""
    return _causal_pairs(seq, 0) if fused(config) else blocked_pairs(seq)


def _causal_pairs(new: int, filled: int) -> int:
    """(query, key) pairs a causal pass needs: query t sees ``filled`` old keys and t + 1 new ones."""
    return new * filled + new * (new + 1) // 2


def weight_flops(
    config: ModelConfig, batch: int, seq: int, head_positions: int | None = None
) -> int:
    """Forward FLOPs of the weight matmuls for tokens[B, T]: B·T × ``matmul_flops_per_token``, with
    the head (2·D·V per position) at ``head_positions`` positions per sequence (default: all T)."""
    head = 2 * config.d_model * config.vocab_size
    dropped = seq - (seq if head_positions is None else head_positions)
    return batch * (seq * matmul_flops_per_token(config) - dropped * head)


def forward_flops(config: ModelConfig, batch: int, seq: int, attention: Attention = "xla") -> int:
    """A full forward pass over tokens[B, T] with no cache (the train-step forward): the weights at
    every position, and attention over the pairs the pass scores ("xla") or T(T + 1)/2 ("causal")."""
    pairs = _sequence_pairs(config, seq) if attention == "xla" else _causal_pairs(seq, 0)
    return weight_flops(config, batch, seq) + attention_flops(config, batch, pairs, 1)


def _recompute_flops(config: ModelConfig, batch: int, seq: int, attention: Attention) -> int:
    """Forward work the backward pass redoes under the remat policy (the head is never rematted).

    none: nothing; full: the layer forward except its two last matmuls, ``o`` and ``down``, whose
    outputs the backward does not need (their gradients need only their inputs and dy); dots: nothing
    (matmul outputs are saved); dots_no_batch: the attention matmuls (batch dimensions: not saved).
    Fused attention is no dot, so "dots" recomputes it too.
    """
    D = config.d_model
    forward = forward_flops(config, batch, seq, attention)
    attn = forward - weight_flops(config, batch, seq)
    unneeded = 2 * D * (D + config.d_ff) * config.n_layers + 2 * D * config.vocab_size
    layers = forward - batch * seq * unneeded
    dots = attn if fused(config) else 0
    return {"none": 0, "full": layers, "dots": dots, "dots_no_batch": attn}[config.remat]


def train_flops(config: ModelConfig, batch: int, seq: int, attention: Attention = "xla") -> int:
    """One AdamW train step on tokens[B, T] (the batch is [B, T + 1]: inputs and shifted targets).

    Backward = 2 × forward: each matmul y = x·w needs dx = dy·wᵀ and dw = xᵀ·dy, and every layer needs
    its input gradient (the embedding is trained). Total ≈ 6·N_matmul per token + 3 × attention
    (3.5 × with fused attention, whose backward recomputes q·kᵀ), plus the forward work recomputed
    under remat. Gradient accumulation splits B without changing this.
    """
    forward = forward_flops(config, batch, seq, attention)
    extra = (forward - weight_flops(config, batch, seq)) // 2 if fused(config) else 0
    return 3 * forward + extra + _recompute_flops(config, batch, seq, attention)


def prefill_flops(
    config: ModelConfig,
    batch: int,
    seq: int,
    slots: int = 0,
    attention: Attention = "xla",
    head_positions: int | None = None,
) -> int:
    """A prefill of tokens[B, T] into an empty cache, reading S = ``slots`` cache slots (0 when the
    pass skips the empty cache, as ``jaxllm.serve``'s prefill does; its capacity when it scores every
    slot).

    Weights: 2·N_matmul per token, the head at ``head_positions`` positions per sequence (None: all
    T, for a pass that computes logits at every position — XLA does not remove the head work of
    positions whose logits are discarded, measured in tests/test_analytic.py; 1 for
    ``jaxllm.serve``'s prefill, which runs the head at the last position only). Attention: the new
    tokens against the S read slots (empty, masked) and against each other, so "xla" counts
    T × (S + T) pairs (with S = 0: the causal pass's, ``_sequence_pairs``) and "causal"
    T(T + 1)/2.
    """
    xla = seq * (slots + seq) if slots else _sequence_pairs(config, seq)
    pairs = xla if attention == "xla" else _causal_pairs(seq, 0)
    return weight_flops(config, batch, seq, head_positions) + attention_flops(
        config, batch, pairs, 1
    )


def decode_flops(
    config: ModelConfig, batch: int, filled: int, slots: int, attention: Attention = "xla"
) -> int:
    """One decode step: one new token per sequence with ``filled`` tokens already cached.

    Weights: 2·N_matmul per sequence. Attention: the step scores the token against the S = ``slots``
    cache slots it reads (the capacity) plus itself ("xla":
    S + 1 keys) — only ``filled`` + 1 are useful ("causal").
    """
    keys = slots + 1 if attention == "xla" else filled + 1
    return batch * matmul_flops_per_token(config) + attention_flops(config, batch, 1, keys)


def weight_bytes_read(config: ModelConfig, rows: int) -> int:
    """Bytes of the weights a pass over ``rows`` tokens must read: every parameter once, except the
    lookup tables that are only gathered (an untied token embedding, learned positions), of which
    it reads the rows' own (counted for two tables)."""
    itemsize = _bytes(config.storage_dtype)
    counts = param_counts(config)
    gathered = counts["positions"] + (0 if config.tie_embeddings else counts["embedding"])
    return (counts["total"] - gathered) * itemsize + 2 * rows * config.d_model * itemsize


def decode_bytes(
    config: ModelConfig,
    batch: int,
    filled: int,
    slots: int,
    kv_dtype: jnp.dtype | str | None = None,
) -> dict[str, int]:
    """Bytes one decode step must move at least (each byte once, no re-reads).

    weights: every parameter, except lookup tables that are only gathered (an untied token
    embedding, learned positions), which give B rows; kv_read: K and V of the S = ``slots`` slots the
    step reads (``allocated``: the capacity) or of the ``filled`` ones;
    kv_write: the new token's K and V; io: tokens in, float32 logits out. The cache is in
    ``kv_dtype`` (default: the compute dtype; see ``jaxllm.cache.cache_dtype``).
    """
    out = {
        "weights": weight_bytes_read(config, batch),
        "kv_read_allocated": kv_cache_bytes(config, batch, slots, kv_dtype),
        "kv_read_filled": kv_cache_bytes(config, batch, filled, kv_dtype),
        "kv_write": kv_cache_bytes(config, batch, 1, kv_dtype),
        "io": batch * 4 + batch * config.vocab_size * 4,
    }
    fixed = out["weights"] + out["kv_write"] + out["io"]
    out["total_allocated"] = fixed + out["kv_read_allocated"]
    out["total_filled"] = fixed + out["kv_read_filled"]
    return out


def saved_per_layer(config: ModelConfig, seq: int) -> dict[str, int]:
    """Values one layer keeps for the backward pass per sequence, under ``config.remat``.

    Counted from what a train step saves (``jax.ad_checkpoint.saved_residuals`` of the loss, unrolled
    layers; checked in tests/test_analytic.py). Per token: each of the 2 norms keeps 4 width-D tensors
    (x², x - mean, normalized, scaled) and 2 scalars; attention (``jaxllm.attention``'s blocked causal
    pass) keeps the scaled queries (D), keys and values (K·H each), its output before and after the
    softmax normalisation (D each) and 2 row statistics per query head; rotary keeps sin and cos for q
    and k (4 × H/2); the MLP keeps 6 width-F tensors (GELU: pre-activation and the tanh
    approximation's intermediates, one fewer from jax 0.11 on: ``_mlp_saved``; SwiGLU: gate, up,
    silu's 3, the product). Each query block but the
    last keeps the prefix of keys and values it read (``key_slices``). Per scored (query, key) pair and
    query head (``causal_blocks``): exp(scores) in float32, and its cast to a narrower compute dtype
    (``score_bytes``).
    Remat "full" keeps only the layer input (D per token); "dots" keeps the matmul outputs q, k, v,
    o, the float32 scores and probs·v, up (and gate) and down; "dots_no_batch" the same without the
    two attention matmuls (their outputs have batch dimensions). Fused attention (``fused``) keeps
    no scores and reads no key prefixes; the rest is counted as for the blocked pass (not yet checked
    against ``saved_residuals`` on a GPU).

    ``head_values`` is the part of ``values`` that belongs to one query or key/value head or one MLP
    column, which tensor parallelism splits (``jaxllm.mesh``: q, k, v, up and gate column-parallel):
    queries, keys, values, the attention outputs, the softmax statistics and the MLP's width-F
    tensors; ``score_bytes`` are per head too. The rest — the norms' [B, T, D] tensors, rotary's sin
    and cos, the layer input, and the outputs of ``o`` and ``down`` (row-parallel: each device holds a
    full-width partial sum) — is replicated.
    """
    D, F, KH = config.d_model, config.d_ff, config.n_kv_heads * config.head_dim
    N, H = config.n_heads, config.head_dim
    n_up = _mlp_matrices(config) - 1
    blocks = [] if fused(config) else causal_blocks(seq)
    pairs = 0 if fused(config) else N * blocked_pairs(seq)
    if config.remat == "full":
        return {"values": seq * D, "head_values": 0, "score_bytes": 0}
    if config.remat in ("dots", "dots_no_batch"):
        attention = config.remat == "dots"
        per_head = D + 2 * KH + n_up * F  # q, k, v, up (gate)
        return {
            "values": seq * (per_head + 2 * D),  # + the outputs of o and down
            "head_values": seq * per_head,
            "score_bytes": (pairs + seq * D) * 4 if attention else 0,  # scores, probs·v: float32
        }
    itemsize = _bytes(config.compute_dtype)
    rotary = 2 * H if config.positions == "rotary" else 0
    key_slices = 2 * KH * sum(b for _, b in blocks[:-1])
    per_head = 3 * D + 2 * KH + 2 * N + _mlp_saved(config) * F
    return {
        "values": seq * (2 * (4 * D + 2) + rotary + per_head) + key_slices,
        "head_values": seq * per_head + key_slices,
        "score_bytes": pairs * (4 + (itemsize if itemsize != 4 else 0)),
    }


@functools.cache
def _gelu_saved() -> int:
    """Tensors of its input's shape that JAX keeps for the backward of the tanh-approximated GELU:
    5 in jax 0.10 (tanh and 1 - tanh among them), 4 in jax 0.11 (whose tanh keeps 1 - tanh² alone;
    seen on the H200's jax 0.11.2), read off ``jax.vjp``'s residuals."""
    _, backward = jax.vjp(lambda h: jax.nn.gelu(h, approximate=True), jnp.ones(3))
    return sum(1 for leaf in jax.tree.leaves(backward) if jnp.shape(leaf) == (3,))


def _mlp_saved(config: ModelConfig) -> int:
    """Width-F tensors a layer's MLP keeps per token: the activation's residuals and the input of
    ``down`` (GELU), or 6 (SwiGLU)."""
    return _gelu_saved() + 1 if config.mlp == "gelu" else 6


def activation_bytes(config: ModelConfig, batch: int, seq: int, tensor: int = 1) -> int:
    """Activations a train step holds between forward and backward, bytes, on one device when heads
    and MLP columns are split ``tensor`` ways (1: the whole step).

    L layers' saved values (``saved_per_layer``, at the compute dtype; its ``head_values`` and
    ``score_bytes`` divided by ``tensor``) + the final norm's (4·D + 2 per token) + the loss's float32
    exp(logits) [B, T, V] and per-token normaliser; with a tied head, one more [V, D] table in the
    compute dtype: XLA's footprint holds it (tests/test_mesh.py; without it the closed form fell 17%
    under XLA's footprint at tensor=8), while in float32 ``saved_residuals`` lists only the
    embedding itself, an argument. The final norm, logits and head are replicated on tensor (the head's
    rule splits only D, on fsdp). Casts of the other weights to a narrower compute dtype are not
    counted (bf16 training with f32 weights holds about 30% more than this count, measured with
    ``saved_residuals`` on the test models).
    """
    saved = saved_per_layer(config, seq)
    itemsize = _bytes(config.compute_dtype)
    values = saved["values"] - saved["head_values"] + saved["head_values"] // tensor
    layer = values * itemsize + saved["score_bytes"] // tensor
    final = seq * (4 * config.d_model + 2) * itemsize + seq * (config.vocab_size + 1) * 4
    table = config.d_model * config.vocab_size * itemsize if config.tie_embeddings else 0
    return batch * (config.n_layers * layer + final) + table


def train_memory(config: ModelConfig, batch: int, seq: int) -> dict[str, int]:
    """Bytes a train step holds: params (param dtype) + grads and AdamW m and v (float32: jaxllm.train
    keeps the optimizer in float32 whatever the parameter dtype; the article's N × 4 and N × 2 × 4) +
    activations (``activation_bytes``) + the int32 batch [B, T + 1]."""
    n = param_counts(config)["total"]
    out = {
        "params": param_bytes(config),
        "grads": n * 4,
        "adam": ADAM_MOMENTS * n * 4,
        "activations": activation_bytes(config, batch, seq),
        "batch": batch * (seq + 1) * 4,
    }
    out["total"] = sum(out.values())
    return out


def serve_memory(
    config: ModelConfig, batch: int, slots: int, kv_dtype: jnp.dtype | str | None = None
) -> dict[str, int]:
    """Bytes serving holds: params + a KV cache of S = ``slots`` slots per sequence (in ``kv_dtype``,
    default the compute dtype)."""
    kv = kv_cache_bytes(config, batch, slots, kv_dtype)
    out = {"params": param_bytes(config), "kv_cache": kv}
    out["total"] = sum(out.values())
    return out


@dataclasses.dataclass(frozen=True)
class AnalyticView:
    """The closed-form view of one phase at one shape (``jaxllm.phases.analytic_view``)."""

    flops: int  # matmul FLOPs, attention over every slot the program scores ("xla" convention)
    flops_causal: int  # the same over the useful causal (query, key) pairs only
    flops_convention: str  # the two conventions in words
    bytes: int  # compulsory bytes moved per call
    memory: dict[str, int]  # train_memory (train) or serve_memory (prefill, decode), bytes
    params: int  # parameter count
    tokens: int  # tokens per call: B·T, or B for a decode step
    capacity: int  # cache slots allocated (0 for train)
    slots_read: int  # cache slots the program reads and scores (prefill 0, decode all)
    decode_bytes: dict[str, int] | None = None  # decode only: ``decode_bytes``' parts

    def to_dict(self) -> dict[str, Any]:
        """As ``jaxllm analyze --json`` prints it: ``decode_bytes`` only for a decode step."""
        out = dataclasses.asdict(self)
        if self.decode_bytes is None:
            del out["decode_bytes"]
        return out
