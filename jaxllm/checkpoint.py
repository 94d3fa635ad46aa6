"""Checkpoints with orbax: a run directory holds numbered steps, each saved atomically.

Layout: ``RUN_DIR/<step>/{params, opt_state, meta}``. ``params`` and ``opt_state`` are pytrees saved with
orbax's standard handler; ``meta`` is JSON holding at least ``{"config": ModelConfig fields}`` plus
whatever the caller adds (data state, training settings); a config saved before some of today's fields
existed loads with their defaults (``config_from_meta``). Orbax writes each step into a temporary
directory and renames it when it is complete; which steps are complete is orbax's call
(``CheckpointManager.all_steps``), so a save interrupted at any point is never loaded as a whole one.

A complete step can still be damaged afterwards (a truncated or deleted file, non-finite weights).
Loading the latest step therefore tries the steps newest first and takes the first that restores,
reporting each one it skipped and why; ``DamagedCheckpointError`` (exit status 1) only if none restores.
Serving reads ``params`` and ``meta`` alone; resuming training also restores ``opt_state``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

from jaxllm.config import LATER_FIELDS, ModelConfig, field_names
from jaxllm.errors import InputError, RunError
from jaxllm.finite import require_finite
from jaxllm.model import Params, param_shapes

T = TypeVar("T")
Warn = Callable[[str], None]


class CheckpointError(InputError):
    """A missing or foreign checkpoint, or one that does not match the request (exit status 2)."""


class DamagedCheckpointError(RunError):
    """Damage: a step whose saved config has jaxllm's fields but invalid values, or a run none of
    whose complete steps restores (exit status 1)."""


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
    stale = Path(mngr.directory) / str(step)
    if stale.exists() and step not in mngr.all_steps():
        shutil.rmtree(stale)  # the remains of a save orbax does not count: it would refuse the step
        mngr.reload()
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()


def complete_steps(run_dir: str | Path) -> list[int]:
    """The steps orbax counts as complete in ``run_dir``, oldest first (none without the directory)."""
    path = Path(run_dir)
    if not path.is_dir():
        return []
    return sorted(manager(path, keep=None).all_steps())


def _steps_newest_first(path: Path) -> list[int]:
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    steps = complete_steps(path)
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {path}")
    return steps[::-1]


def latest_step(run_dir: str | Path) -> int:
    """The newest complete step in ``run_dir``; CheckpointError if there is none."""
    return _steps_newest_first(Path(run_dir))[0]


def set_aside(run_dir: str | Path, step: int) -> Path:
    """Rename step ``step`` to ``<step>.damaged`` (``.damaged-2``, ...), out of orbax's sight (so its
    retention never keeps it in place of a good step) but kept for inspection; returns the new path."""
    path = Path(run_dir) / str(step)
    target, n = path.with_name(f"{step}.damaged"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{step}.damaged-{n}")
    return path.rename(target)


def _reason(err: Exception) -> str:
    lines = str(err).strip().splitlines() or [""]
    text = lines[0] if len(lines[0]) <= 200 else lines[0][:200] + "..."
    return f"{type(err).__name__}: {text}"


def _restore_leftover(unraisable: Any) -> bool:
    """Whether an unraisable exception is debris of a failed orbax restore: its pending reads, which
    report the error already raised again, or find orbax's event loop closed when they finish."""
    err, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
        return True
    return code is not None and "orbax" in code.co_filename


def _drop_restore_leftovers() -> None:
    """From now on, pass every unraisable exception but a failed restore's debris to the hook that
    was in place (installed once per process)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_restore_leftovers", False):
        return

    def hook(unraisable: Any) -> None:
        if not _restore_leftover(unraisable):
            previous(unraisable)

    hook.drops_restore_leftovers = True  # pyright: ignore[reportFunctionMemberAccess]
    sys.unraisablehook = hook


def newest_that_loads(
    run_dir: str | Path, load: Callable[[int], T], warn: Warn, step: int | None = None
) -> tuple[int, T]:
    """``(step, load(step))`` for the newest complete step (or only ``step``) for which ``load``
    succeeds, calling ``warn`` with each newer step skipped and why. DamagedCheckpointError if none loads;
    CheckpointError if there is no complete step (or ``step`` is not one)."""
    path = Path(run_dir)
    steps = _steps_newest_first(path)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{path} has no complete step {step} (complete: {steps[::-1]})")
        steps = [step]
    skipped = []
    _drop_restore_leftovers()  # before a restore fails: its debris may come from other threads
    for s in steps:
        try:
            loaded = load(s)
        except Exception as err:  # a damaged step fails in many ways (OSError, ValueError, ...)
            skipped.append(f"step {s} ({_reason(err)})")
            continue
        for line in skipped:
            warn(f"{path}: skipped {line}")
        return s, loaded
    raise DamagedCheckpointError(f"no checkpoint in {path} loads: {'; '.join(skipped)}")


def _quiet(_: str) -> None:
    """A ``Warn`` that says nothing."""


def read_meta(run_dir: str | Path, step: int) -> dict[str, Any]:
    """The JSON metadata of complete step ``step``; CheckpointError if it has none."""
    meta_file = Path(run_dir) / str(step) / "meta" / "metadata"
    if not meta_file.is_file():
        raise CheckpointError(f"{run_dir} step {step} has no jaxllm metadata ({meta_file} missing)")
    meta = json.loads(meta_file.read_text())
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file} is not a JSON object")
    return meta


def load_meta(run_dir: str | Path, step: int | None = None, warn: Warn = _quiet) -> dict[str, Any]:
    """The JSON metadata of ``step`` (default: the newest step whose metadata reads and whose
    config, if it has jaxllm's fields, is valid; a foreign one is left for the caller to refuse)."""

    def usable(s: int) -> dict[str, Any]:
        meta = read_meta(run_dir, s)
        with contextlib.suppress(CheckpointError):  # foreign, not damaged
            config_from_meta(meta, run_dir)
        return meta

    return newest_that_loads(run_dir, usable, warn, step)[1]


def config_from_meta(meta: dict[str, Any], source: str | Path) -> ModelConfig:
    """The saved ModelConfig. A config saved before a field of ``LATER_FIELDS`` existed lacks it and
    takes its default; any other missing or unknown field means a foreign checkpoint
    (CheckpointError); invalid values, a damaged step (DamagedCheckpointError)."""
    raw = meta.get("config")
    known = set(field_names())
    if not isinstance(raw, dict) or set(raw) - known or known - set(raw) - set(LATER_FIELDS):
        raise CheckpointError(f"{source} is not a jaxllm checkpoint: its config does not match")
    try:
        return ModelConfig(**raw)
    except (TypeError, ValueError) as err:
        raise DamagedCheckpointError(f"{source}: its saved config is invalid ({err})") from None


def _abstract(tree: Any, shardings: Any = None) -> Any:
    """``jax.ShapeDtypeStruct`` leaves of ``tree``'s shapes and dtypes, each carrying its sharding
    from ``shardings`` (a tree of the same structure) when given: orbax restores into that layout,
    whatever the layout the step was saved from."""
    if shardings is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), tree)
    return jax.tree.map(
        lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), tree, shardings
    )


def _restore_params(path: Path, step: int) -> tuple[ModelConfig, Params]:
    """The config and parameters of ``step``, on the first device (whatever mesh they were saved
    from: without a target layout orbax refuses a step saved on other devices)."""
    config = config_from_meta(read_meta(path, step), path)
    shapes = param_shapes(config)
    first = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), shapes)
    restored = manager(path, keep=None).restore(
        step,
        args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(shapes, first))),  # pyright: ignore[reportCallIssue]
    )
    require_finite(restored["params"], f"{path} step {step}")
    return config, restored["params"]


def load_params(
    run_dir: str | Path, step: int | None = None, warn: Warn = _quiet
) -> tuple[ModelConfig, Params]:
    """The config and parameters of ``step`` (default: the newest complete step that restores with
    finite parameters; ``warn`` hears of each newer step skipped)."""
    path = Path(run_dir)
    if step is None:  # a foreign directory is bad input, not damage: refuse it as such
        config_from_meta(load_meta(path), path)
    return newest_that_loads(path, lambda s: _restore_params(path, s), warn, step)[1]


def load_state(
    run_dir: str | Path,
    step: int,
    params: Any,
    opt_state: Any,
    shardings: tuple[Any, Any] | None = None,
) -> tuple[Params, Any]:
    """Parameters and optimizer state of complete step ``step``, restored into the structure, shapes
    and dtypes of ``params`` and ``opt_state`` (arrays or ``jax.ShapeDtypeStruct`` leaves) and, when
    given, laid out as ``shardings`` = (params', opt_state's): a step saved from one mesh restores
    onto another, or onto one device. NonFiniteError if either holds NaN or infinite values."""
    path = Path(run_dir)
    where = (None, None) if shardings is None else shardings
    restored = manager(path, keep=None).restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params, where[0])),  # pyright: ignore[reportCallIssue]
            opt_state=ocp.args.StandardRestore(_abstract(opt_state, where[1])),  # pyright: ignore[reportCallIssue]
        ),
    )
    params, opt_state = restored["params"], restored["opt_state"]
    require_finite((params, opt_state), f"{path} step {step}")
    return params, opt_state
