"""One engine step: a single static-shape program that runs a decode token for every slot and/or
prefill chunks ("lanes"), all tokens sharing one pass through the weights (Sarathi-Serve's
piggybacking: the decodes ride along with the prefill's matmuls).

``make_step(config, decode, read)(params, cache, inp) -> (logits [R, V], cache)``, jitted, the
``SlotCache`` donated and updated in place. The inputs (``StepInput``, built on the host):

- decode segment (when ``decode``): slot b's token ``dec_tokens[b]`` at position ``dec_pos[b]`` (its
  filled positions), attending to positions [0, dec_pos[b]) of its slot and to itself; a slot that is
  not ``dec_live`` computes too (static shapes) but writes nothing.
- P lanes of C tokens: lane p continues the request in slot ``lane_slot[p]`` from position
  ``lane_start[p]`` with ``lane_len[p]`` real tokens (right-padded; 0: an unused lane). With ``read``
  a lane attends to its slot's first ``lane_start[p]`` positions (a continued chunk); without, only
  causally within itself (a whole prompt: nothing is cached yet, nothing is read).

The logits: slot b's next-token logits (rows [0, B) when ``decode``), then each lane's last real
token's (the head runs only at those R = B + P positions). The program's shape is (decode, read, P, C);
each distinct one compiles once.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxllm import mesh as meshes
from jaxllm.attention import cached_attention, causal_attention
from jaxllm.config import ModelConfig
from jaxllm.errors import InputError
from jaxllm.model import Attend, Params, Transformer
from jaxllm.slots import SlotCache
from jaxllm.xla_options import serve_options

Array = Any  # numpy arrays when the host builds them, jax.Array inside the program


class StepInput(struct.PyTreeNode):
    dec_tokens: Array  # [B] int32
    dec_pos: Array  # [B] int32: positions filled in each slot = the new token's position
    dec_live: Array  # [B] bool: the slot's token is written (an idle slot's is not)
    lane_tokens: Array  # [P, C] int32, right-padded
    lane_slot: Array  # [P] int32
    lane_start: Array  # [P] int32: positions of the slot filled before this chunk
    lane_len: Array  # [P] int32: real tokens in the lane, 0..C

    @property
    def lanes(self) -> int:
        return self.lane_tokens.shape[0]

    @property
    def chunk(self) -> int:
        return self.lane_tokens.shape[1]


def _flat(
    decode: bool, inp: StepInput, capacity: int, max_len: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The step's N tokens in order (decode segment, then lanes row by row): ids, positions (clipped
    into the model's context for padding), and where each is written (slot, position; S: dropped)."""
    C = inp.chunk
    lane_pos = inp.lane_start[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]  # [P, C]
    real = jnp.arange(C)[None, :] < inp.lane_len[:, None]
    ids, pos = [inp.lane_tokens.reshape(-1)], [lane_pos.reshape(-1)]
    rows = [jnp.repeat(inp.lane_slot, C)]
    write = [jnp.where(real, lane_pos, capacity).reshape(-1)]
    if decode:
        ids.insert(0, inp.dec_tokens)
        pos.insert(0, inp.dec_pos)
        rows.insert(0, jnp.arange(inp.dec_tokens.shape[0], dtype=jnp.int32))
        write.insert(0, jnp.where(inp.dec_live, inp.dec_pos, capacity))
    positions = jnp.clip(jnp.concatenate(pos), 0, max_len - 1)
    return jnp.concatenate(ids), positions, jnp.concatenate(rows), jnp.concatenate(write)


def _layer_attend(decode: bool, read: bool, cache: SlotCache, inp: StepInput, i: int) -> Attend:
    """Layer i's attention over the flat tokens: q [1, N, Nh, H], k_new, v_new [1, K, N, H]."""

    def attend(q: jax.Array, k_new: jax.Array, v_new: jax.Array) -> jax.Array:
        Nh, H = q.shape[2:]
        K, P, C = k_new.shape[1], inp.lanes, inp.chunk
        outs, n = [], 0
        if decode:
            B = inp.dec_tokens.shape[0]
            k_dec, v_dec = (x[0, :, :B].transpose(1, 0, 2)[:, :, None] for x in (k_new, v_new))
            zeros = jnp.zeros((B,), jnp.int32)
            kv = (cache.k[i], cache.v[i])
            out = cached_attention(q[0, :B, None], k_dec, v_dec, kv, zeros, inp.dec_pos)
            outs.append(out.reshape(B, Nh, H).astype(q.dtype))
            n = B
        if P:
            q_lane = q[0, n:].reshape(P, C, Nh, H)
            k_lane, v_lane = (x[0, :, n:].reshape(K, P, C, H) for x in (k_new, v_new))
            if read:
                rows = (_rows(cache.k[i], inp.lane_slot), _rows(cache.v[i], inp.lane_slot))
                k_heads, v_heads = k_lane.transpose(1, 0, 2, 3), v_lane.transpose(1, 0, 2, 3)
                zeros = jnp.zeros((P,), jnp.int32)
                out = cached_attention(q_lane, k_heads, v_heads, rows, zeros, inp.lane_start)
            else:  # [P, C, K, H]
                k_seq, v_seq = k_lane.transpose(1, 2, 0, 3), v_lane.transpose(1, 2, 0, 3)
                out = causal_attention(q_lane, k_seq, v_seq, None)
            outs.append(out.reshape(P * C, Nh, H).astype(q.dtype))
        return jnp.concatenate(outs)[None]

    return attend


def _rows(x: jax.Array, slots: jax.Array) -> jax.Array:
    """x[slots]: [P, K, S, H] of x [B, K, S, H] (one lane: a dynamic slice, cheaper than a gather)."""
    if slots.shape[0] == 1:
        return jax.lax.dynamic_slice_in_dim(x, slots[0], 1, axis=0)
    return x[slots]


def _logit_rows(decode: bool, inp: StepInput) -> jax.Array:
    """Indices [R] into the flat tokens whose logits the step returns."""
    B = inp.dec_tokens.shape[0] if decode else 0
    lanes = (
        B + jnp.arange(inp.lanes, dtype=jnp.int32) * inp.chunk + jnp.maximum(inp.lane_len - 1, 0)
    )
    return jnp.concatenate([jnp.arange(B, dtype=jnp.int32), lanes])


def _step(
    config: ModelConfig, decode: bool, read: bool, params: Params, cache: SlotCache, inp: StepInput
) -> tuple[jax.Array, SlotCache]:
    ids, positions, rows, write = _flat(decode, inp, cache.capacity, config.max_len)
    attend = functools.partial(_layer_attend, decode, read, cache, inp)
    out: Any = Transformer(config).apply(
        {"params": params},
        ids[None],
        positions[None],
        attend=attend,
        logits_at=_logit_rows(decode, inp)[None],
    )
    logits, (k_new, v_new) = out
    return logits[0], cache.store(k_new, v_new, rows, write)


@functools.cache
def make_step(config: ModelConfig, decode: bool, read: bool, mesh: Mesh | None = None) -> Any:
    """The step program family for ``config`` (unrolled layers: ``serve.serving_config``), jitted
    with the cache (argument 1) donated; P and C come from the input's shapes. On a tensor-parallel
    ``mesh`` (``jaxllm.mesh.check_engine_mesh``) the weights and the cache are split over tensor as
    ``jaxllm.mesh.ServeLayout`` says; the host's inputs and the logits are replicated."""
    if config.scan_layers:
        raise InputError(
            "the engine serves unrolled layers: use jaxllm.serve.serving_config(config)"
        )
    fn = functools.partial(_step, config, decode, read)
    options = serve_options()
    if mesh is None:
        return jax.jit(fn, donate_argnums=1, compiler_options=options)
    at = meshes.ServeLayout.of(mesh, config)
    return jax.jit(
        fn,
        donate_argnums=1,
        in_shardings=(at.params, at.slots, at.replicated),
        out_shardings=(at.replicated, at.slots),
        compiler_options=options,
    )
