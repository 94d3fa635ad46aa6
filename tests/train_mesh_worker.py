"""Runs ``jaxllm train`` on meshes of 8 simulated CPU devices beside one device; prints JSON.

``python tests/train_mesh_worker.py CHECK CORPUS WORKDIR``, CHECK one of:

- ``refusals``: the exit status and stderr of mesh flags that do not fit (nothing is trained);
- ``layouts``: a fresh state saved from fsdp=4,tensor=2, loaded onto data=8 and one device;
- ``cli``: two steps of ``jaxllm train --mesh data=2,fsdp=2,tensor=2`` (and with ``--accum 2``)
  beside ``jaxllm train`` on one device: the largest difference of the checkpointed parameters and
  of the logged losses;
- ``reshard``: four steps on fsdp=4,tensor=2 checkpointed at 2 and 4; step 2 restored onto
  data=8, onto one device and onto fsdp=4,tensor=2 again (their differences, and whether each
  landed in its target layout); then ``--resume`` from step 2 on data=8 and on one device, each
  beside four straight steps on one device.

Run in a subprocess by tests/test_train_mesh.py: the device count is fixed when JAX first starts.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"  # simulated CPU devices, on a GPU machine too

import contextlib
import io
import json
import shutil
from pathlib import Path

import jax
import numpy as np

from jaxllm import checkpoint, loop, train
from jaxllm.cli import main
from jaxllm.config import PRESETS

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

TINY = ["--preset", "tiny", "--batch", "8", "--seq", "16", "--eval-batches", "1"]
RUN = {"preset": "tiny", "batch": 8, "seq": 16, "eval_batches": 1, "warmup": 0}


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs), default=0.0)


def _train(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["train", *TINY, *argv])
    return status, err.getvalue()


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def refusals(corpus: str, work: Path) -> dict:
    """Each refused mesh: exit status, the last stderr line, whether --out was created."""
    cases = {
        "batch": ["--mesh", "data=8", "--batch", "4"],
        "micro_batch": ["--mesh", "data=4,tensor=2", "--accum", "4"],
        "heads": ["--mesh", "tensor=8"],
        "devices": ["--mesh", "data=2"],
    }
    out = {}
    for name, flags in cases.items():
        run = work / name
        status, err = _train(["--steps", "2", "--data", corpus, "--out", str(run), *flags])
        out[name] = {"status": status, "err": err, "created": run.exists()}
    return out


def layouts(corpus: str, work: Path) -> dict:
    """A fresh state saved from fsdp=4,tensor=2, loaded onto data=8 and onto one device: the
    largest difference from the saved values, and whether each leaf landed where it was asked."""
    config, settings = PRESETS["tiny"], loop.TrainSettings(batch=8)
    optimizer = loop._optimizer(config, settings, None)
    source = loop.run_mesh({"fsdp": 4, "tensor": 2}, config, settings)
    state = train.init_state(config, optimizer, jax.random.key(0), source)
    checkpoint.save(checkpoint.manager(work), 1, state.params, state.opt_state, config)
    out = {}
    for name, spec in (("data=8", {"data": 8}), ("one device", None)):
        layout = loop.state_layout(config, optimizer, loop.run_mesh(spec, config, settings))
        if isinstance(layout, jax.sharding.SingleDeviceSharding):
            layout = jax.tree.map(lambda _, one=layout: one, state)
        where = (layout.params, layout.opt_state)
        loaded = checkpoint.load_state(work, 1, state.params, state.opt_state, where)
        got = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, loaded))
        out[name] = {
            "diff": _max_diff(loaded, (state.params, state.opt_state)),
            "placed": got == jax.tree.leaves(where),
        }
    return out


def cli(corpus: str, work: Path) -> dict:
    """data=2,fsdp=2,tensor=2 (with --accum 1 and 2) beside one device, two steps each."""
    common = ["--steps", "2", "--warmup", "0", "--data", corpus]
    out = {}
    for accum in ("1", "2"):
        one, mesh = work / f"one{accum}", work / f"mesh{accum}"
        assert _train([*common, "--accum", accum, "--out", str(one)])[0] == 0
        status, err = _train(
            [*common, "--accum", accum, "--mesh", "data=2,fsdp=2,tensor=2", "--out", str(mesh)]
        )
        assert status == 0, err
        out[accum] = {
            "params": _max_diff(checkpoint.load_params(mesh)[1], checkpoint.load_params(one)[1]),
            "loss": _max_diff(_losses(mesh), _losses(one)),
            "steps": len(_losses(mesh)),
        }
    return out


def _restored(run: Path, spec: dict | None):
    config = checkpoint.config_from_meta(checkpoint.read_meta(run, 2), run)
    settings = loop.TrainSettings(**checkpoint.read_meta(run, 2)["train"])
    mesh = loop.run_mesh(spec, config, settings)
    state = loop.restore_state(run, config, settings, lambda _: None, mesh)
    layout = loop.state_layout(config, loop._optimizer(config, settings, mesh), mesh)
    if mesh is None:
        placed = all(x.sharding == layout for x in jax.tree.leaves(state.params))
    else:
        assert not isinstance(layout, jax.sharding.SingleDeviceSharding)
        shardings = jax.tree.map(lambda x: x.sharding, state.params)
        placed = all(
            a.is_equivalent_to(b, x.ndim)
            for a, b, x in zip(
                jax.tree.leaves(shardings),
                jax.tree.leaves(layout.params),
                jax.tree.leaves(state.params),
                strict=True,
            )
        )
    return jax.device_get((state.params, state.opt_state)), placed


def reshard(corpus: str, work: Path) -> dict:
    """Saved on fsdp=4,tensor=2; restored and resumed on data=8 and on one device."""
    quiet = {"stream": io.StringIO(), "data": corpus, "steps": 4, "ckpt_every": 2, **RUN}
    source = work / "fsdp4_tensor2"
    loop.train(source, mesh={"fsdp": 4, "tensor": 2}, **quiet)
    loop.train(work / "straight", **quiet)
    saved, placed_a = _restored(source, {"fsdp": 4, "tensor": 2})
    out: dict = {"placed": {"fsdp=4,tensor=2": placed_a}, "restored": {}, "resumed": {}}
    straight = checkpoint.load_params(work / "straight")[1]
    for name, spec in (("data=8", {"data": 8}), ("one device", None)):
        values, out["placed"][name] = _restored(source, spec)
        out["restored"][name] = _max_diff(values, saved)
        run = work / name.replace(" ", "_").replace("=", "")
        shutil.copytree(source, run)
        shutil.rmtree(run / "4")  # the run continues from step 2
        summary = loop.train(run, resume=True, mesh=spec, stream=io.StringIO(), data=corpus)
        out["resumed"][name] = {
            "step": summary["step"],
            "params": _max_diff(checkpoint.load_params(run)[1], straight),
        }
    return out


def main_worker(argv: list[str]) -> None:
    check, corpus, work = argv
    run = {"refusals": refusals, "layouts": layouts, "cli": cli, "reshard": reshard}[check]
    print(json.dumps(run(corpus, Path(work))))


if __name__ == "__main__":
    main_worker(sys.argv[1:])
