"""One of N processes of a data-parallel train step; process 0 writes the result.

``python tests/distributed_worker.py HOST:PORT N I OUT.npz``: joins the coordinator as process I of
N (2 simulated CPU devices each), lays a fresh ``tiny`` train state out on ``data=2N`` over every
process's devices, feeds its own rows of the fixed global batch (``BATCH``) and takes one step.
Process 0 saves the loss and the updated parameters (gathered from every process) to OUT.npz,
for tests/test_distributed.py to set beside the same step on one device.
"""

import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxllm import distributed, train
from jaxllm import mesh as meshes
from jaxllm.config import PRESETS

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

CONFIG = PRESETS["tiny"]
B, T = 8, 16


def batch() -> np.ndarray:
    """The fixed global batch [B, T+1], the same in every process (and in the test)."""
    return np.random.default_rng(1).integers(0, CONFIG.vocab_size, (B, T + 1), dtype=np.int32)


def optimizer():
    return train.make_optimizer(warmup=0, total_steps=10)


def main(coordinator: str, n: int, pid: int, out: str) -> None:
    distributed.initialize(distributed.Processes(coordinator, n, pid))
    mesh = meshes.make_mesh({"data": jax.device_count()})
    opt = optimizer()
    state = train.init_state(CONFIG, opt, jax.random.key(0), mesh)
    step = train.make_train_step(CONFIG, opt, mesh=mesh)
    tokens = distributed.global_batch(batch(), meshes.shardings(mesh, meshes.batch_spec()))
    state, metrics = step(state, tokens)
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if distributed.is_primary():
        leaves = {
            jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)
        }
        np.savez(out, loss=np.asarray(metrics["loss"]), devices=jax.device_count(), **leaves)


if __name__ == "__main__":
    # Set here, not at import: tests/test_distributed.py imports this module, and its process must
    # keep one device. XLA reads the flag when the backend starts, at the first device query.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"  # gloo collectives between CPU processes
    address, count, index, path = sys.argv[1:]
    main(address, int(count), int(index), path)
