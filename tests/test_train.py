import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import cost, phases, train
from jaxllm.config import PRESETS
from jaxllm.errors import InputError
from jaxllm.model import Transformer

CFG = PRESETS["tiny"]  # biases on, layers scanned: biases and norm scales are stacked to 2-D
B, T = 4, 16


@pytest.fixture(scope="module")
def state0():
    """A fresh tiny state; tests copy it before donating it to a step."""
    return train.init_state(CFG, train.make_optimizer(1e-2, 20, 0), jax.random.key(0))


def _copy(state):
    return jax.tree.map(jnp.copy, state)


def _batch(seed=0, rows=B):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 257, (rows, T + 1)), jnp.int32)


def _leaf_names(tree):
    return {
        "/".join(str(getattr(p, "key", p)) for p in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_weight_decay_mask_spares_biases_and_norm_scales(state0):
    mask = _leaf_names(train.decay_mask(state0.params))
    decayed = sorted(name for name, on in mask.items() if on)
    assert decayed == sorted(
        [
            "blocks/attn/q/kernel",
            "blocks/attn/k/kernel",
            "blocks/attn/v/kernel",
            "blocks/attn/o/kernel",
            "blocks/mlp/up/kernel",
            "blocks/mlp/down/kernel",
            "embed/embedding",
            "pos_embed/embedding",
        ]
    )
    # Some spared leaves have ndim >= 2 here (stacked biases [L, F], attention biases [L, N, H]).
    params = _leaf_names(state0.params)
    assert any(params[n].ndim >= 2 for n, on in mask.items() if not on)


def test_zero_gradient_update_is_pure_decay_of_weight_matrices(state0):
    lr, wd = 0.1, 0.5
    opt = train.make_optimizer(lr, total_steps=10, warmup=0, weight_decay=wd)
    params = state0.params

    @jax.jit
    def update(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = opt.update(zeros, opt.init(params), params)
        return optax.apply_updates(params, updates)

    new = _leaf_names(update(params))
    old, mask = _leaf_names(params), _leaf_names(train.decay_mask(params))
    for name in old:
        expected = old[name] * (1 - lr * wd) if mask[name] else old[name]
        np.testing.assert_allclose(new[name], expected, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("scale", [0.01, 100.0], ids=["below the limit", "above the limit"])
def test_clip_by_global_norm_equals_optax(scale):
    keys = jax.random.split(jax.random.key(0), 2)
    tree = {"a": jax.random.normal(keys[0], (3, 4)) * scale, "b": jax.random.normal(keys[1], (5,))}
    ours, state = train.clip_by_global_norm(1.0).update(tree, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(1.0).update(tree, optax.EmptyState())
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6)
    assert float(optax.tree.norm(ours)) <= 1.0 + 1e-6
    assert state == optax.clip_by_global_norm(1.0).init(tree)


def test_loss_is_mean_next_token_cross_entropy(state0):
    batch = _batch()
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    apply = jax.jit(Transformer(CFG).apply)
    logits = np.asarray(apply({"params": state0.params}, batch[:, :-1], positions)[0], np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = np.asarray(batch[:, 1:])
    expected = -np.take_along_axis(logp, targets[..., None], -1).mean()
    loss = jax.jit(train.loss_fn, static_argnums=2)(state0.params, batch, CFG)
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_step_learns_reports_metrics_compiles_once_and_aliases_the_state(state0):
    opt = train.make_optimizer(1e-2, 20, 0)
    step = train.make_train_step(CFG, opt)
    state, batch = _copy(state0), _batch()
    losses = []
    for _ in range(20):  # one batch, learnt by heart
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 20
    assert losses[0] == pytest.approx(np.log(257), abs=0.1)
    assert losses[-1] < losses[0] - 1.0
    assert float(metrics["lr"]) == pytest.approx(float(train.make_schedule(1e-2, 20, 0)(19)))
    assert float(metrics["grad_norm"]) > 0
    assert step._cache_size() == 1
    # Donation: XLA reuses the buffers of the whole state (parameters and AdamW moments) for the output.
    memory = step.lower(state, batch).compile().memory_analysis()
    nbytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    assert memory.alias_size_in_bytes >= nbytes


def test_accumulating_micro_batches_equals_the_full_batch_step(state0):
    # SGD, so parameters move by lr * gradient: Adam's first update, ~sign(g), would magnify the
    # rounding noise of near-zero gradients.
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
    start = train.TrainState(
        step=state0.step, params=state0.params, opt_state=sgd.init(state0.params)
    )
    batch = _batch(1, rows=8)
    full, m_full = train.make_train_step(CFG, sgd)(_copy(start), batch)
    accum, m_accum = train.make_train_step(CFG, sgd, accum_steps=4)(_copy(start), batch)
    assert float(m_accum["loss"]) == pytest.approx(float(m_full["loss"]), rel=1e-6)
    assert float(m_accum["grad_norm"]) == pytest.approx(float(m_full["grad_norm"]), rel=1e-5)
    moved = jax.tree.map(lambda a, b: a - b, full.params, start.params)
    assert all(float(jnp.abs(m).max()) > 0 for m in jax.tree.leaves(moved))
    chex.assert_trees_all_close(accum.params, full.params, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="accum_steps"):
        train.make_train_step(CFG, sgd, accum_steps=0)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {
            "positions": "rotary",
            "mlp": "swiglu",
            "norm": "rmsnorm",
            "use_bias": False,
            "tie_embeddings": False,
            "n_kv_heads": 2,
            "remat": "full",
        },
    ],
)
def test_step_lowers_from_abstract_state_without_allocating(changes):
    cfg = CFG.replace(**changes)
    opt = train.make_optimizer()
    shapes = jax.eval_shape(lambda: train.init_state(cfg, opt, jax.random.key(0)))
    batch = jax.ShapeDtypeStruct((B, T + 1), jnp.int32)
    lowered = train.make_train_step(cfg, opt, accum_steps=2).lower(shapes, batch)
    out_state, metrics = lowered.out_info
    assert jax.tree.structure(out_state) == jax.tree.structure(shapes)
    assert set(metrics) == {"loss", "grad_norm", "lr"}


@pytest.mark.standard_promotion  # bf16 gradients through jax.nn.dot_product_attention
def test_mixed_precision_keeps_storage_dtype_and_f32_optimizer_state():
    cfg = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
    opt = train.make_optimizer(1e-2, 20, 0)
    shapes = jax.eval_shape(lambda: train.init_state(cfg, opt, jax.random.key(0)))
    batch = jax.ShapeDtypeStruct((B, T + 1), jnp.int32)
    state, metrics = train.make_train_step(cfg, opt).lower(shapes, batch).out_info
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    for tree in (shapes.opt_state, state.opt_state):
        floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
    assert all(v.dtype == jnp.float32 for v in metrics.values())


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"lr": 0.0}, "learning rate"),
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 10, "warmup": 10}, "warmup"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"clip_norm": 0.0}, "clip_norm"),
    ],
)
def test_bad_optimizer_settings_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        train.make_optimizer(**kwargs)


def test_unrolled_scan_is_the_rolled_step_without_its_loop():
    cfg = CFG.replace(n_layers=3, remat="full")  # remat: unrolled, its CSE barrier is back
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
    start, batch = train.init_state(cfg, sgd, jax.random.key(0)), _batch(2)
    rolled, unrolled = (
        train.make_train_step(c, sgd).lower(start, batch).compile()
        for c in (cfg, cfg.replace(scan_unroll=3))
    )
    # XLA's own counts: the rolled loop's body counted 3 times (loop-corrected) is the unrolled step.
    cost_a, cost_b = (cost.analyze_compiled(c, 0.0) for c in (rolled, unrolled))
    assert 3 in cost_a.loops and 3 not in cost_b.loops
    assert cost_b.flops == pytest.approx(cost_a.flops, rel=0.01), (
        cost_a.loop_note,
        cost_b.loop_note,
    )
    a, m_a = rolled(_copy(start), batch)
    b, m_b = unrolled(_copy(start), batch)
    assert float(m_b["loss"]) == pytest.approx(float(m_a["loss"]), rel=1e-6)
    chex.assert_trees_all_close(b.params, a.params, rtol=1e-5, atol=1e-7)


def test_training_config_unrolls_scanned_layers_on_a_cpu_or_gpu_unless_overridden():
    assert train.training_config(CFG, backend="cpu").scan_unroll == CFG.n_layers
    assert train.training_config(CFG, ["scan_unroll = 1"], backend="cpu").scan_unroll == 1
    assert train.training_config(CFG, backend="gpu").scan_unroll == CFG.n_layers
    assert train.training_config(CFG, backend="tpu") == CFG
    unrolled = CFG.replace(scan_layers=False)
    assert train.training_config(unrolled, backend="cpu") == unrolled
    recomputed = CFG.replace(remat="full")  # straight-line layers would keep what remat frees
    assert train.training_config(recomputed, backend="cpu") == recomputed


def test_remat_saves_memory_in_the_step_train_compiles():
    """XLA's temporaries of the train step (B=8, T=64) as ``training_config`` lays it out: with full
    recomputation, less than without (on a CPU 3.2 against 5.8 MB; unrolled, both 5.8 MB)."""

    def temp_bytes(remat: str) -> int:
        program = phases.build(train.training_config(CFG.replace(remat=remat)), "train", 8, 64)
        compiled = program.jitted.lower(*program.abstract_args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("full") < 0.8 * temp_bytes("none")


def test_training_refuses_a_serving_kernel_order():
    """An out_in run could be neither served (``serve.for_serving`` refuses it) nor exported."""
    with pytest.raises(InputError, match="kernel_order='out_in' is a serving layout"):
        train.training_config(CFG.replace(kernel_order="out_in"))
