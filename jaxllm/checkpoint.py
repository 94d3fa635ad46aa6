"""Checkpoints with orbax: a run directory holds numbered steps, each saved atomically.

Layout: ``RUN_DIR/<step>/{params, opt_state, meta}``. ``params`` and ``opt_state`` are pytrees saved with
orbax's standard handler; ``meta`` is JSON holding at least ``{"config": ModelConfig fields}`` plus
whatever the caller adds (data state, training settings). Orbax writes each step into a temporary
directory and renames it when complete, so an interrupted save is never listed as a step.
Serving reads ``params`` and ``meta`` alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxllm.config import ModelConfig, field_names
from jaxllm.model import Params, param_shapes


class CheckpointError(ValueError):
    """A missing, incomplete or foreign checkpoint."""


def manager(run_dir: str | Path, keep: int | None = 3) -> ocp.CheckpointManager:
    """An orbax manager over ``run_dir`` keeping the last ``keep`` steps, saving synchronously."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        Path(run_dir).absolute(), options=options, item_names=("params", "opt_state", "meta")
    )


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
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()


def latest_step(run_dir: str | Path) -> int:
    """The newest complete step in ``run_dir``; CheckpointError if there is none."""
    path = Path(run_dir)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    step = manager(path, keep=None).latest_step()
    if step is None:
        raise CheckpointError(f"no complete checkpoint in {path}")
    return step


def load_meta(run_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of ``step`` (default: latest)."""
    path = Path(run_dir)
    step = latest_step(path) if step is None else step
    meta_file = path / str(step) / "meta" / "metadata"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} step {step} has no jaxllm metadata ({meta_file} missing)")
    return json.loads(meta_file.read_text())


def config_from_meta(meta: dict[str, Any], source: str | Path) -> ModelConfig:
    raw = meta.get("config")
    if not isinstance(raw, dict) or set(raw) != set(field_names()):
        raise CheckpointError(f"{source} is not a jaxllm checkpoint: its config does not match")
    return ModelConfig(**raw)


def load_params(run_dir: str | Path, step: int | None = None) -> tuple[ModelConfig, Params]:
    """The config and parameters of ``step`` (default: the latest complete one)."""
    path = Path(run_dir)
    step = latest_step(path) if step is None else step
    config = config_from_meta(load_meta(path, step), path)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), param_shapes(config))
    restored = manager(path, keep=None).restore(
        step,
        args=ocp.args.Composite(params=ocp.args.StandardRestore(target)),  # pyright: ignore[reportCallIssue]
    )
    return config, restored["params"]
