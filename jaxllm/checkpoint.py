"""Checkpoints with orbax: a run directory holds numbered steps, each saved atomically.

Layout: ``RUN_DIR/<step>/{params, opt_state, meta}``. ``params`` and ``opt_state`` are pytrees saved with
orbax's standard handler; ``meta`` is JSON holding at least ``{"config": ModelConfig fields}`` plus
whatever the caller adds (data state, training settings). Orbax writes each step into a temporary
directory, writes its commit marker (``commit_success.txt``) there and renames the directory when it is
complete. A step counts only if its directory holds that marker, so a save interrupted at any point (a
temporary directory left behind, or a step directory without its marker) is never loaded as a whole one.
Serving reads ``params`` and ``meta`` alone; resuming training also restores ``opt_state``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxllm.config import ModelConfig, field_names
from jaxllm.model import Params, param_shapes

COMMIT_MARKER = "commit_success.txt"  # orbax's marker of a finished step (atomicity_types)


class CheckpointError(ValueError):
    """A missing, incomplete or foreign checkpoint."""


def manager(run_dir: str | Path, keep: int | None = 3) -> ocp.CheckpointManager:
    """An orbax manager over ``run_dir`` keeping the last ``keep`` steps, saving synchronously."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        Path(run_dir).absolute(), options=options, item_names=("params", "opt_state", "meta")
    )


def is_complete(run_dir: str | Path, step: int) -> bool:
    """Whether step ``step`` of ``run_dir`` was saved to the end (its commit marker exists)."""
    return (Path(run_dir) / str(step) / COMMIT_MARKER).is_file()


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    params: Params,
    opt_state: Any,
    config: ModelConfig,
    meta: dict[str, Any] | None = None,
) -> None:
    """Save step ``step`` (blocking until it is complete on disk)."""
    items: dict[str, Any] = {
        "params": ocp.args.StandardSave(params),  # pyright: ignore[reportCallIssue]
        "meta": ocp.args.JsonSave({"config": config.to_dict(), **(meta or {})}),  # pyright: ignore[reportCallIssue]
    }
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)  # pyright: ignore[reportCallIssue]
    stale = Path(mngr.directory) / str(step)
    if stale.exists() and not is_complete(stale.parent, step):
        shutil.rmtree(stale)  # the remains of an interrupted save: orbax would refuse the step
        mngr.reload()
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()


def complete_steps(run_dir: str | Path) -> list[int]:
    """The complete steps in ``run_dir``, oldest first (none if the directory does not exist)."""
    path = Path(run_dir)
    if not path.is_dir():
        return []
    return [s for s in manager(path, keep=None).all_steps() if is_complete(path, s)]


def latest_step(run_dir: str | Path) -> int:
    """The newest complete step in ``run_dir``; CheckpointError if there is none."""
    path = Path(run_dir)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    steps = complete_steps(path)
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {path}")
    return steps[-1]


def _step_or_latest(path: Path, step: int | None) -> int:
    if step is None:
        return latest_step(path)
    if not is_complete(path, step):
        raise CheckpointError(f"{path} has no complete step {step} (no {COMMIT_MARKER})")
    return step


def load_meta(run_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of ``step`` (default: latest)."""
    path = Path(run_dir)
    step = _step_or_latest(path, step)
    meta_file = path / str(step) / "meta" / "metadata"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} step {step} has no jaxllm metadata ({meta_file} missing)")
    return json.loads(meta_file.read_text())


def config_from_meta(meta: dict[str, Any], source: str | Path) -> ModelConfig:
    raw = meta.get("config")
    if not isinstance(raw, dict) or set(raw) != set(field_names()):
        raise CheckpointError(f"{source} is not a jaxllm checkpoint: its config does not match")
    return ModelConfig(**raw)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), tree)


def load_params(run_dir: str | Path, step: int | None = None) -> tuple[ModelConfig, Params]:
    """The config and parameters of ``step`` (default: the latest complete one)."""
    path = Path(run_dir)
    step = _step_or_latest(path, step)
    config = config_from_meta(load_meta(path, step), path)
    restored = manager(path, keep=None).restore(
        step,
        args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(param_shapes(config)))),  # pyright: ignore[reportCallIssue]
    )
    return config, restored["params"]


def load_state(run_dir: str | Path, step: int, params: Any, opt_state: Any) -> tuple[Params, Any]:
    """Parameters and optimizer state of ``step``, restored into the structure, shapes and dtypes of
    ``params`` and ``opt_state`` (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
    path = Path(run_dir)
    step = _step_or_latest(path, step)
    restored = manager(path, keep=None).restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params)),  # pyright: ignore[reportCallIssue]
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)),  # pyright: ignore[reportCallIssue]
        ),
    )
    return restored["params"], restored["opt_state"]
