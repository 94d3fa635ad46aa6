"""One phase timed three ways, with where its device time goes: for comparing XLA flags or code
variants on a GPU (run once per variant: ``XLA_FLAGS`` is read when the backend starts).

Usage: python3 scripts/gpu_profile.py LABEL PHASE PRESET BATCH SEQ [--trace FILE] [--generate]
  PHASE: train (bf16 compute) or decode (bf16 weights and cache: served as ``jaxllm generate``).

Prints one JSON line:
- ``sync_s``: the median call as ``jaxllm analyze --measure`` times it (fresh arguments, the clock
  stopped on the outputs);
- ``chained_s``: seconds a step over ``STEPS`` steps dispatched back to back, each fed the state
  (train) or cache (decode) the last one returned, synchronised once: a loop's steady state;
- ``busy_s``: seconds a step that the device ran kernels (the union of their intervals in a profile
  of the chained steps), and ``span_s``, first kernel start to last kernel end, a step;
- ``generate_s`` (``--generate``, decode): a step inside ``jaxllm.generate``'s on-device loop;
- ``digest``: the first call's loss (train) or logits (decode) in a few numbers, to compare variants.
``--options JSON``: the train step's XLA compile options instead of ``xla_options.train_options``.
``--hlo FILE`` writes the compiled program's HLO. Code variants: ``--out-in``, kernels served
output-major; ``--written`` (decode), attention over the cache with the new keys written first;
``--split-softmax`` (decode), the two blocks' softmax combined without concatenating the scores;
``--cudnn`` (decode), the new keys written first, then cuDNN's fused attention over the filled slots;
``--pallas`` (decode), the same with JAX's Pallas flash-decoding kernel in place of cuDNN's;
``--rolled`` (train), the layers run as a loop (``scan_unroll=1``; XLA's options unless
``--options`` says otherwise); ``--unstacked`` (train), each layer's parameters their own arrays
(``scan_layers=False``: no stacked gradient concatenated; round 20's H200 step spent 1.8 ms in
three concatenation fusions, not traced to their source); ``--pad-vocab`` (train), the head over a padded vocabulary
(``padded_vocabulary``). Round 13's ``--single-bf16`` and round 20's ``--two-rows``
are gone: the first was not kept, the second ships (``products.single_row_as_two``).
``--trace FILE`` writes the profile's kernels (device) and events (host) by total time.
"""

import functools
import gzip
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import phases, train, xla_options
from jaxllm.config import get_preset
from jaxllm.timing import time_compiled

STEPS = 10
VARIANTS = (
    "--out-in",
    "--rolled",
    "--unstacked",
    "--pad-vocab",
    "--written",
    "--split-softmax",
    "--cudnn",
    "--pallas",
)


def chain(compiled, first: tuple, phase: str, steps: int) -> float:
    """Seconds a step over ``steps`` steps, each fed the last one's donated output."""
    start = time.perf_counter()
    if phase == "train":
        state, data = first
        for _ in range(steps):
            state, metrics = compiled(state, data)
        jax.block_until_ready((state, metrics))
    else:
        weights, cache, ids = first
        for _ in range(steps):
            logits, cache = compiled(weights, cache, ids)
        jax.block_until_ready((logits, cache))
    return (time.perf_counter() - start) / steps


def digest(outputs: tuple, phase: str) -> dict:
    """A first call's result in a few numbers, the same for every variant of a phase (the arguments
    come from one key): the train step's loss, or the decode step's float32 logits summed and their
    argmax per row. Variants that compute the same step agree within bf16 rounding."""
    if phase == "train":
        return {"loss": float(outputs[1]["loss"])}
    logits = np.asarray(outputs[0], np.float32).reshape(outputs[0].shape[0], -1)
    return {"logits_sum": float(logits.sum()), "argmax": logits.argmax(-1).tolist()}


def first_args(program: phases.Program, make: Callable[[], tuple], steps: int) -> tuple:
    """Fresh arguments from ``make`` (``program.make_args(key)``) for ``steps`` chained calls: a
    decode cache ``steps`` slots short of the context ``seq``."""
    args = make()
    if program.phase == "train":
        return args
    weights, cache, ids = args
    return weights, cache.replace(index=jnp.int32(program.seq - 1 - steps)), ids


def summarize_trace(path: Path, steps: int, out: Path | None) -> dict:
    """Device busy and span seconds a step from a Perfetto trace; writes the top events to ``out``."""
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    by_proc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    intervals: list[tuple[float, float]] = []
    for e in events:
        if e.get("ph") != "X":
            continue
        proc = names.get(e["pid"], str(e["pid"]))
        by_proc[proc][e["name"]].append(float(e.get("dur", 0)))
        if "/device:" in proc:
            intervals.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))))
    busy, end = 0.0, -np.inf
    for a, b in sorted(intervals):
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    span = (max(b for _, b in intervals) - min(a for a, _ in intervals)) if intervals else 0.0
    if out is not None:
        lines = []
        for proc, table in by_proc.items():
            total = sum(sum(v) for v in table.values())
            lines.append(
                f"## {proc}: {sum(map(len, table.values()))} events, sum {total / 1e3:.2f} ms"
            )
            top = sorted(table.items(), key=lambda kv: -sum(kv[1]))[:40]
            lines += [f"  {sum(v) / 1e3:9.3f} ms {len(v):6d}x  {n[:110]}" for n, v in top]
        out.write_text("\n".join(lines) + "\n")
    return dict(busy_s=busy / 1e6 / steps, span_s=span / 1e6 / steps)


def profile(
    compiled, program: phases.Program, make: Callable[[], tuple], steps: int, out: Path | None
) -> dict:
    with tempfile.TemporaryDirectory() as d:
        args = first_args(program, make, steps)
        jax.block_until_ready(args)
        with jax.profiler.trace(d, create_perfetto_trace=True):
            chain(compiled, args, program.phase, steps)
        trace = next(Path(d).rglob("perfetto_trace.json.gz"))
        return summarize_trace(trace, steps, out)


def generate_step_s(config, seq: int, batch: int) -> float:
    """Seconds a decode step inside ``generate``'s loop: prompts of seq - 48 tokens, 48 new."""
    from jaxllm.generate import generate
    from jaxllm.model import param_shapes

    params = phases.filler_params(param_shapes(config))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, seq - 48).tolist() for _ in range(batch)]
    generate(config, params, prompts, 48)
    g = generate(config, params, prompts, 48)
    return g.decode_s / max(g.decode_steps, 1)


def _grouped_queries(q: jax.Array, heads: int, dtype: jnp.dtype) -> jax.Array:
    """q [B, T, N, H] scaled by 1/sqrt(H), in ``dtype``, as [B, T, K, N/K, H] for K kv heads."""
    B, T, N, H = q.shape
    return q.astype(dtype).reshape(B, T, heads, N // heads, H) * jnp.asarray(H**-0.5, dtype)


def _by_query(out: jax.Array) -> jax.Array:
    """[B, K, G, T, H] -> [B, T, K·G, H]."""
    B, K, G, T, H = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H)


def _written(kv, k_new, v_new, offset):
    """The cache's keys and values [B, K, S, H] with the new ones [B, K, T, H] written at slot
    ``offset`` (one offset for every row)."""
    return tuple(
        jax.lax.dynamic_update_slice(old, new.astype(old.dtype), (0, 0, offset, 0))
        for old, new in zip(kv, (k_new, v_new), strict=True)
    )


def _visible(pad: jax.Array, offset, T: int, S: int) -> jax.Array:
    """[B, T, S]: which slots of a cache with the T new tokens written at ``offset`` each new token
    sees (its row's from ``pad`` [B] on, up to its own)."""
    slot = jnp.arange(S)[None, None, :]
    return (slot >= pad[:, None, None]) & (slot <= offset + jnp.arange(T)[None, :, None])


def written_attention(q, k_new, v_new, kv, pad, offset):
    """The variant ``--written``: a decode step's attention over the cache with its new keys and
    values written in first, one product over the S slots, where ``jaxllm.attention.cached_attention``
    scores the cache and the new tokens as two blocks and concatenates the scores (on an H200, round
    20: a fusion of 11.3 us a layer in llama3.2-1b's B=1 step, the new key's rotary embedding, its
    score and the concatenation). One write offset for every row (``generate``'s step). On the
    2-core CPU, gpt2 f32: B=1 over 96 slots 11.2 -> 11.6 ms, over 1008 13.1 -> 19.4 ms."""
    k, v = _written(kv, k_new, v_new, offset)
    q = _grouped_queries(q, k.shape[1], k.dtype)
    logits = jnp.einsum("BTKGH,BKSH->BKGTS", q, k).astype(jnp.float32)
    mask = _visible(pad, offset, q.shape[1], k.shape[2])[:, None, None]  # [B, 1, 1, T, S]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    return _by_query(jnp.einsum("BKGTS,BKSH->BKGTH", probs, v))


def split_softmax_attention(q, k_new, v_new, kv, pad, offset):
    """The variant ``--split-softmax``: ``jaxllm.attention.cached_attention`` with the softmax of
    its two blocks (cache, new tokens) combined through their common maximum and summed weights,
    not over concatenated scores, so that no fusion holds the new key's score and the
    concatenation. On the 2-core CPU, gpt2, the two forms alternated: within 2% (f32 B=1 over 96
    slots 11.28 -> 11.22 ms, bf16 B=8 13.96 -> 13.91, f32 B=32 over 1008 86.4 -> 84.8)."""
    from jaxllm.attention import attention_mask

    k_old, v_old = kv
    dtype = k_old.dtype
    k_new, v_new = k_new.astype(dtype), v_new.astype(dtype)
    q = _grouped_queries(q, k_old.shape[1], dtype)
    T = q.shape[1]

    def scores(k: jax.Array, new: bool) -> jax.Array:
        visible = attention_mask(pad, offset, T, k.shape[2], new=new)
        logits = jnp.einsum("BTKGH,BKSH->BKGTS", q, k).astype(jnp.float32)
        return jnp.where(visible, logits, jnp.finfo(jnp.float32).min)

    def weigh(w: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.einsum(
            "BKGTS,BKSH->BKGTH", w.astype(dtype), v, preferred_element_type=jnp.float32
        )

    s_old, s_new = scores(k_old, False), scores(k_new, True)
    top = jnp.maximum(s_old.max(-1), s_new.max(-1))[..., None]
    w_old, w_new = jnp.exp(s_old - top), jnp.exp(s_new - top)
    out = (weigh(w_old, v_old) + weigh(w_new, v_new)) / (w_old.sum(-1) + w_new.sum(-1))[..., None]
    return _by_query(out.astype(dtype))


def fused_attention(q, k, v, bias, kv_len, implementation: str) -> jax.Array:
    """Attention of q [B, N, T, H] to k and v [B, K, S, H] (K divides N), bias [B, 1, T, S] added
    to the scores and slots from ``kv_len`` [B] on skipped: [B, N, T, H]. "cudnn": cuDNN's fused
    kernel on the cache's own layout (BNTH); "xla": ``jax.nn.dot_product_attention``'s XLA
    implementation on transposed copies (a CPU's stand-in, which checks the arguments)."""
    B, _, T, H = q.shape
    if implementation == "cudnn":
        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        q_len = jnp.full((B,), T, jnp.int32)
        out = cudnn.dot_product_attention(
            q, k, v, bias, None, q_len, kv_len, scale=H**-0.5,
            mask_type=cudnn.MaskType.PADDING, qkv_layout="BNTH",
        )  # fmt: skip
        return cast(jax.Array, out)  # no residual asked
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, key_value_seq_lengths=kv_len, implementation="xla"
    )
    return out.transpose(0, 2, 1, 3)


def cudnn_attention(q, k_new, v_new, kv, pad, offset, implementation: str = "cudnn"):
    """The variant ``--cudnn`` (decode): the new keys and values written into the cache first (as
    ``--written``), then one fused attention over the slots up to the last one written, which
    cuDNN's kernel reads and no further. The shipped step runs seven kernels a layer there (round
    20's H200 profile of llama3.2-1b at B=1: two products, the scores' concatenation, two
    reductions, a conversion, the normalisation; about 23 us a layer). Left padding and the new
    tokens' causal order are an additive bias. One write offset for every row (``generate``'s)."""
    k, v = _written(kv, k_new, v_new, offset)
    B, T = q.shape[:2]
    visible = _visible(pad, offset, T, k.shape[2])
    big = jnp.asarray(-0.7 * float(jnp.finfo(k.dtype).max), k.dtype)
    bias = jnp.where(visible, jnp.zeros((), k.dtype), big)[:, None]  # [B, 1, T, S]
    kv_len = jnp.full((B,), offset + T, jnp.int32)
    out = fused_attention(
        q.astype(k.dtype).transpose(0, 2, 1, 3), k, v, bias, kv_len, implementation
    )
    return out.transpose(0, 2, 1, 3)  # [B, T, N, H]


def _splits(slots: int) -> tuple[int, int]:
    """(k_splits, block_k) for ``decode_attention.gqa`` over ``slots`` (a power of two >= 16, as
    ``jaxllm.generate`` sizes caches): up to 16 splits of at least 64 slots, blocks of up to 128."""
    if slots < 16 or slots & (slots - 1):
        raise ValueError(f"--pallas needs a cache of a power-of-two >= 16 slots, got {slots}")
    splits = max(1, min(16, slots // 64))
    return splits, min(128, slots // splits)


def pallas_attention(q, k_new, v_new, kv, pad, offset, interpret: bool = False):
    """The variant ``--pallas`` (decode, one new token a row): the new keys and values written into
    the cache first (as ``--cudnn``), then JAX's Pallas flash-decoding kernel for a GPU
    (``jax.experimental.pallas.ops.gpu.decode_attention.gqa``): the slots cut into splits, each
    split's blocks read up to the last slot written and no further, left padding skipped by a start
    index; a small XLA reduction combines the splits. Its two transpositions of the cache ([B, K,
    S, H] -> [B, S, K, H] here, back in ``gqa``) cancel. ``interpret``: Pallas's interpreter, which
    runs anywhere (the CPU check)."""
    from jax.experimental.pallas.ops.gpu import decode_attention

    B, T = q.shape[:2]
    if T != 1:
        raise ValueError(f"--pallas computes one new token a row, got T={T}")
    k, v = _written(kv, k_new, v_new, offset)
    splits, block_k = _splits(k.shape[2])
    out = decode_attention.gqa(
        q[:, 0].astype(k.dtype), k.swapaxes(1, 2), v.swapaxes(1, 2),
        start_idx=pad, kv_seq_len=jnp.broadcast_to(offset + 1, (B,)),
        k_splits=splits, block_k=block_k, interpret=interpret,
    )  # fmt: skip
    return out[:, None]  # [B, 1, N, H]


def padded_vocabulary(multiple: int = 64) -> None:
    """The variant ``--pad-vocab`` (train): the tied head's product and the loss over a vocabulary
    padded with zero rows to a multiple of ``multiple`` (gpt2's 50257 -> 50304), the padded logits
    masked out of the softmax, so that cuBLAS gets aligned shapes and XLA no pad of the logits'
    gradient (round 20's H200 step: a ``loop_pad_fusion`` of 0.63 ms, the head's three GEMMs 3.25
    ms). Same loss and gradients: the padded columns weigh nothing and their rows' gradient is
    sliced off by the pad's transpose."""
    from jaxllm import loss, products, train

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def padded(x, w, targets, out_major, vocab):
        return forward(x, w, targets, out_major, vocab)[0]

    def forward(x, w, targets, out_major, vocab):
        logits = products.matmul(x, w, out_major)  # [R, Vp] float32
        logits = jnp.where(jnp.arange(logits.shape[1]) < vocab, logits, -jnp.inf)
        return loss._forward_from_logits(logits, x, w, targets)

    def backward(out_major, vocab, res, cotangent):
        return loss._backward(out_major, res, cotangent)

    padded.defvjp(forward, backward)

    def head_cross_entropy(x, kernel, targets, dtype, out_major):
        vocab = kernel.shape[0 if out_major else 1]
        extra = -vocab % multiple
        kernel = jnp.pad(kernel, ((0, extra), (0, 0)) if out_major else ((0, 0), (0, extra)))
        x, kernel = products.operands(dtype, x.shape[0], x, kernel)
        return padded(x, kernel, targets, out_major, vocab)

    train.head_cross_entropy = head_cross_entropy


def output_major_serving() -> None:
    """The variant ``--out-in``: served kernels output-major ([out, in], as on one CPU device): the
    GEMMs read their weights transposed; every row count row-major (the CPU's weight-major products
    left off)."""
    from jaxllm import products, serve

    serving_config = serve.serving_config
    serve.serving_config = lambda config, mesh=None: serving_config(config, mesh).replace(
        kernel_order="out_in"
    )
    products.WEIGHT_MAJOR_ROWS = {}


def main(argv: list[str]) -> None:
    if "--out-in" in argv:
        output_major_serving()
    if "--pad-vocab" in argv:
        padded_vocabulary()
    variants = {
        "--written": written_attention,
        "--split-softmax": split_softmax_attention,
        "--cudnn": cudnn_attention,
        "--pallas": pallas_attention,
    }
    for flag, attention in variants.items():
        if flag in argv:
            import jaxllm.cache

            jaxllm.cache.cached_attention = attention
    label, phase, preset, batch, seq = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4])
    trace = Path(argv[argv.index("--trace") + 1]) if "--trace" in argv else None
    hlo = Path(argv[argv.index("--hlo") + 1]) if "--hlo" in argv else None
    if "--options" in argv:
        options = json.loads(argv[argv.index("--options") + 1])
        xla_options.train_options = lambda config, backend=None: options
    config = get_preset(preset).replace(dtype="bfloat16")
    if phase == "decode":
        config = config.replace(param_dtype="bfloat16")
    else:
        config = train.training_config(config)  # as `jaxllm train` and `analyze` compile it
        config = config.replace(scan_unroll=1) if "--rolled" in argv else config
        config = config.replace(scan_layers=False) if "--unstacked" in argv else config
    program = phases.build(config, phase, batch, seq)
    start = time.perf_counter()
    compiled = program.jitted.lower(*program.abstract_args).compile()
    row = dict(
        label=label,
        phase=phase,
        preset=preset,
        batch=batch,
        seq=seq,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        compile_s=round(time.perf_counter() - start, 1),
        options=xla_options.train_options(config) if phase == "train" else {},
        code=[a for a in VARIANTS if a in argv],
    )
    if hlo is not None:
        hlo.write_text(compiled.as_text())
    make = program.make_args(jax.random.key(0))  # the weights made once, the rest per call
    row["digest"] = digest(compiled(*make()), phase)
    row["sync_s"] = time_compiled(compiled, make, 5, 2).seconds_median
    chain(compiled, first_args(program, make, STEPS), phase, STEPS)  # warm
    row["chained_s"] = float(
        np.median(
            [chain(compiled, first_args(program, make, STEPS), phase, STEPS) for _ in range(3)]
        )
    )
    row |= profile(compiled, program, make, STEPS, trace)
    if "--generate" in argv and phase == "decode":
        row["generate_s"] = generate_step_s(config, seq, batch)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
