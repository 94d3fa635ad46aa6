"""The training phase: the optax optimizer, the TrainState pytree and the compiled train step.

``step = make_train_step(config, optimizer)`` is a ``jax.jit`` function ``(state, batch[B, T+1] int32) ->
(state, metrics)`` with the state donated, so XLA updates parameters and optimizer moments in place.
Row b of a batch holds T+1 consecutive tokens: the model reads the first T and predicts the last T.

Mixed precision: parameters are stored in ``config.param_dtype`` and the model computes in
``config.dtype``; gradients, the AdamW moments, the loss and the update are float32, so with f32 master
weights and bf16 compute only the matmuls run in bf16.

Nothing here needs concrete parameters before the step is traced: the optimizer is built from
hyperparameters alone and its weight-decay mask is a function of the parameter tree, so the step of a
large preset can be lowered from ``jax.eval_shape(lambda: init_state(...))``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from jaxllm import mesh as meshes
from jaxllm import xla_options
from jaxllm.config import ModelConfig, parse_override
from jaxllm.errors import InputError, positive_int
from jaxllm.loss import head_cross_entropy
from jaxllm.model import Params, Transformer, head_kernel, init_params, param_shapes

Batch = jax.Array  # [B, T+1] int32 token ids
Metrics = dict[str, jax.Array]  # loss (nats/token), grad_norm, lr: float32 scalars

# Leaves that weight decay applies to: projection kernels and embedding tables. Biases and norm scales
# are left alone. Names rather than ndim >= 2, because under nn.scan a bias [F] is stored as [L, F] and an
# attention bias is [N, H] even unscanned.
DECAYED = ("kernel", "embedding")
MAX_STEPS = 2**31 - 1  # the step count (TrainState.step, the schedule's count) is int32


class TrainState(struct.PyTreeNode):
    """Everything a train step reads and rewrites; donated to the step."""

    step: jax.Array  # [] int32: updates applied so far
    params: Params  # in config.param_dtype
    opt_state: optax.OptState  # float32: clipping state, AdamW moments m and v, schedule count


def training_config(
    config: ModelConfig, overrides: tuple[str, ...] | list[str] = (), backend: str | None = None
) -> ModelConfig:
    """The config a fresh run trains on ``backend`` (default: JAX's): on a CPU or a GPU, scanned
    layers fully unrolled (``scan_unroll=n_layers``) unless ``overrides`` (``FIELD=VALUE``) set
    ``scan_unroll`` or ``remat`` asks for recomputation; elsewhere ``config`` as given. A serving
    kernel order is refused.

    The parameters stay stacked [L, ...] (checkpoints are unchanged); XLA compiles the layers as
    straight-line code. gpt2's f32 step (B=4, T=256, tcmalloc, 2-core VM) took 5.6 s unrolled
    against 6.4 s rolled; compiling took 9 s against 5.5 s. In its profiles, the loop's dynamic
    slices and updates of the stacked weights, gradients and saved activations and the zeroed
    buffers they fill (0.9 s of op time) became static slices and concatenations (0.25 s), and the
    unrolled step's op times sum to 1.15x its wall time (ops run side by side on the two cores;
    rolled: 0.99x). On an H200, gpt2-medium's bf16 step (B=8, T=1024) took 57.0 ms unrolled against
    69.6 ms rolled (compiled in 10.0 and 10.4 s); the rolled loop's copies and dynamic updates took
    about 10 ms of it (jax 0.11.2). Other backends keep the loop (not measured).

    Recomputation (``remat``) keeps the loop: in straight-line layers XLA:CPU schedules each
    layer's recomputed forward pass early, so the step pays its FLOPs and holds what it was to
    save. ``small``'s f32 step (B=8, T=256): XLA's temporaries 271 MB unrolled with ``remat`` none
    or full alike (263 MB unstacked), 411 MB rolled without it, 105 MB rolled with full, 187 MB
    with dots.
    """
    if config.kernel_order != "in_out":
        raise InputError(
            f"kernel_order={config.kernel_order!r} is a serving layout (jaxllm.serve picks it per "
            "device); training and its checkpoints keep 'in_out' kernels"
        )
    named = {parse_override(text)[0] for text in overrides}
    backend = backend or jax.default_backend()
    kept = not config.scan_layers or "scan_unroll" in named or config.remat != "none"
    if backend not in ("cpu", "gpu") or kept:
        return config
    return config.replace(scan_unroll=config.n_layers)


def decay_mask(params: Params) -> Params:
    """A bool tree: True where weight decay applies (``DECAYED`` leaves)."""

    def is_weight(path: tuple[Any, ...], _: Any) -> bool:
        return str(getattr(path[-1], "key", path[-1])) in DECAYED

    return jax.tree_util.tree_map_with_path(is_weight, params)


def make_schedule(lr: float, total_steps: int, warmup: int, final_fraction: float = 0.1) -> Any:
    """Learning rate by step: linear from 0 to ``lr`` over ``warmup`` steps, then cosine decay to
    ``final_fraction * lr`` at ``total_steps``."""
    if not 0 < lr < math.inf:
        raise InputError(f"learning rate must be a positive finite number, got {lr}")
    positive_int("total_steps", total_steps, MAX_STEPS)
    if not 0 <= warmup < total_steps:
        raise InputError(f"warmup must be in [0, total_steps={total_steps}), got {warmup}")
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, total_steps, end_value=lr * final_fraction
    )


def make_optimizer(
    lr: float = 1e-3,
    total_steps: int = 1000,
    warmup: int = 100,
    weight_decay: float = 0.1,
    clip_norm: float = 1.0,
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (β1 0.9, β2 0.95, decay masked to weight matrices) on a
    warmup-cosine schedule. The learning rate of each update is kept in the optimizer state
    (``optax.inject_hyperparams``) so the step can report it."""
    if not 0 <= weight_decay < math.inf:
        raise InputError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    if not 0 < clip_norm < math.inf:
        raise InputError(f"clip_norm must be a positive finite number, got {clip_norm}")
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
    chain = optax.chain(
        clip_by_global_norm(clip_norm),
        adamw(
            learning_rate=make_schedule(lr, total_steps, warmup),
            b1=0.9,
            b2=0.95,
            weight_decay=weight_decay,
            mask=decay_mask,
        ),
    )
    return _standard_promotion(chain)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` as a product: each update times ``min(1, max_norm / norm)``.

    optax's transform divides each update by the norm under a ``select``; XLA does not repeat a
    division in each of its consumers (AdamW's two moments), so the clipped gradient is written out
    and read back, a pass over every gradient (optax's source notes the faster form too). The
    product fuses into the moments' updates. AdamW on gpt2-sized leaves (123.5M f32 parameters,
    2-core Zen 5 VM): 109 -> 88 ms; gpt2's bf16 train step (B=4, T=256, alternated in one
    process): 1.378 -> 1.352 s. Its state is optax's (``EmptyState``), so checkpoints are
    unchanged."""

    def update(updates: Any, state: optax.OptState, params: Any = None) -> tuple[Any, Any]:
        del params
        scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
        return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` with ``init`` and ``update`` traced under standard dtype promotion: optax's schedules
    and Adam's bias correction mix Python floats with the int32 step count, which strict promotion
    (the tests' setting) refuses. The model and the loss stay under whatever promotion is set."""

    def init(params: Any) -> optax.OptState:
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update(updates: Any, state: optax.OptState, params: Any = None) -> tuple[Any, Any]:
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(init, update)


def learning_rate(opt_state: optax.OptState) -> jax.Array:
    """The learning rate of the last update, as recorded by ``optax.inject_hyperparams``."""
    found = optax.tree_utils.tree_get_all_with_path(
        opt_state, "learning_rate", filtering=lambda _, value: isinstance(value, jax.Array)
    )
    if len(found) != 1:
        raise ValueError(
            "the optimizer must record one learning rate with optax.inject_hyperparams "
            f"(found {len(found)}); build it with jaxllm.train.make_optimizer"
        )
    return found[0][1]


def _f32(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def state_from_params(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    """A step-0 state around ``params`` with float32 optimizer state (traceable)."""
    opt_state = optimizer.init(_f32(params))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def state_shardings(
    config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """Where each leaf of a train state lives on ``mesh`` (``jaxllm.mesh.state_specs``)."""
    abstract = jax.eval_shape(lambda p: state_from_params(p, optimizer), param_shapes(config))
    return meshes.shardings(mesh, meshes.state_specs(abstract))


def init_state(
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    mesh: Mesh | None = None,
) -> TrainState:
    """Fresh parameters (``init_params``) and float32 optimizer state, at step 0; one compiled call,
    its outputs laid out on ``mesh`` as the partition rules say (None: one device)."""
    out = None if mesh is None else state_shardings(config, optimizer, mesh)
    init = jax.jit(
        lambda k: state_from_params(init_params(config, k), optimizer), out_shardings=out
    )
    return init(key)


def loss_fn(
    params: Params, batch: Batch, config: ModelConfig, mesh: Mesh | None = None
) -> jax.Array:
    """Mean next-token cross entropy of batch[B, T+1], in nats per token, computed in float32 with
    the head's product (``jaxllm.loss.head_cross_entropy``).

    On a ``mesh`` the weights are gathered over fsdp where they are used (ZeRO-3; their gradients
    flow back through the gather, reduced as ``jaxllm.collectives`` counts) and the batch stays split
    across data and fsdp: without this, XLA keeps the weights sharded on D and reshards the
    activations instead (measured: all-to-alls).
    """
    if mesh is not None:
        params = meshes.gather_fsdp(params, mesh)
        batch = jax.lax.with_sharding_constraint(batch, meshes.shardings(mesh, meshes.batch_spec()))
    inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, T] each
    B, T = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x, _ = Transformer(config).apply(
        {"params": params}, inputs, positions, hidden=True
    )  # [B, T, D]
    kernel, out_major = head_kernel(params, config)
    rows = x.reshape(B * T, -1)
    with jax.named_scope("head_loss"):  # its ops' names, for ``jaxllm profile``
        targets = targets.reshape(-1)
        return head_cross_entropy(rows, kernel, targets, config.compute_dtype, out_major)


def loss_and_grads(
    params: Params, batch: Batch, config: ModelConfig, mesh: Mesh | None = None
) -> tuple[jax.Array, Params]:
    """The loss and its float32 gradient with respect to the parameters (whatever their dtype)."""

    def from_f32(params32: Params) -> jax.Array:
        stored = jax.tree.map(lambda p32, p: p32.astype(p.dtype), params32, params)
        return loss_fn(stored, batch, config, mesh)

    return jax.value_and_grad(from_f32)(_f32(params))


def accumulated_grads(
    params: Params, batch: Batch, config: ModelConfig, accum_steps: int, mesh: Mesh | None = None
) -> tuple[jax.Array, Params]:
    """Loss and gradient of batch[B, T+1] as the mean over ``accum_steps`` micro-batches of B/k rows,
    one at a time under ``lax.scan`` (activation memory of one micro-batch)."""
    if accum_steps == 1:
        return loss_and_grads(params, batch, config, mesh)
    B = batch.shape[0]
    if B % accum_steps:
        raise InputError(f"batch size {B} is not divisible by accum_steps={accum_steps}")
    micro = batch.reshape(accum_steps, B // accum_steps, batch.shape[1])

    def add(total: Any, micro_batch: Batch) -> tuple[Any, None]:
        return jax.tree.map(jnp.add, total, loss_and_grads(params, micro_batch, config, mesh)), None

    zero = (
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
    )
    total, _ = jax.lax.scan(add, zero, micro)
    return jax.tree.map(lambda x: x / accum_steps, total)


def make_train_step(
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    accum_steps: int = 1,
    mesh: Mesh | None = None,
) -> Any:
    """The compiled step ``(state, batch[B, T+1] int32) -> (state, metrics)``, state donated.

    Metrics: ``loss`` (nats/token, before the update), ``grad_norm`` (global L2 norm before clipping),
    ``lr`` (the learning rate applied). On a ``mesh`` the state comes in and goes out laid out as the
    partition rules say (``jaxllm.mesh``), the batch split across data and fsdp, the metrics
    replicated; XLA inserts the collectives.
    """
    positive_int("accum_steps", accum_steps)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        loss, grads = accumulated_grads(state.params, batch, config, accum_steps, mesh)
        with jax.named_scope("optimizer"):  # its ops' names, for ``jaxllm profile``
            params32 = _f32(state.params)
            updates, opt_state = optimizer.update(grads, state.opt_state, params32)
            # The update is added in float32 and rounded once to the storage dtype.
            params = jax.tree.map(
                lambda p, u, stored: (p + u).astype(stored.dtype), params32, updates, state.params
            )
            metrics = {
                "loss": loss,
                "grad_norm": optax.tree.norm(grads),
                "lr": learning_rate(opt_state).astype(jnp.float32),
            }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    options = xla_options.train_options(config)
    if mesh is None:
        return jax.jit(train_step, donate_argnums=0, compiler_options=options)
    state = state_shardings(config, optimizer, mesh)
    batch = meshes.shardings(mesh, meshes.batch_spec())
    return jax.jit(
        train_step,
        donate_argnums=0,
        compiler_options=options,
        in_shardings=(state, batch),
        out_shardings=(state, meshes.replicated(mesh)),
    )


def make_eval_step(config: ModelConfig, mesh: Mesh | None = None) -> Any:
    """The compiled ``(params, batch[B, T+1]) -> loss`` (nats/token), nothing donated; on a
    ``mesh``, the parameters laid out as the rules say, the batch split across data and fsdp."""
    if mesh is None:
        return jax.jit(lambda params, batch: loss_fn(params, batch, config))
    params = meshes.shardings(mesh, meshes.param_specs(param_shapes(config)))
    batch = meshes.shardings(mesh, meshes.batch_spec())
    return jax.jit(
        lambda params, batch: loss_fn(params, batch, config, mesh),
        in_shardings=(params, batch),
        out_shardings=meshes.replicated(mesh),
    )
