"""The training loop: settings, data, resume, evaluation, checkpoints, signals.

``train(run_dir, ...)`` trains a model into ``run_dir`` (orbax steps, ``metrics.jsonl``, ``summary.json``)
and returns the summary. Everything the user can get wrong is checked before anything is traced.

Resuming is exact: a checkpoint holds the parameters, the optimizer state, the model config, the
training settings and a fingerprint of the data; batch ``s`` is a pure function of (seed, s), so the
run continues with the batches an uninterrupted run would have drawn.

A run starts from a preset (fresh weights, the byte tokenizer) or, fine-tuning (``hf_dir``), from a
Hugging Face checkpoint's weights and tokenizer (``jaxllm.finetune``); its checkpoints then record
that origin, and the run directory holds a copy of the tokenizer, so resuming needs neither again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import math
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from jaxllm import analytic, checkpoint, data, distributed, finetune, memory, runlock, tensorboard
from jaxllm import mesh as meshes
from jaxllm.config import ModelConfig, apply_overrides, get_preset
from jaxllm.errors import InputError, RunError, positive_int
from jaxllm.finite import NonFiniteError, require_finite
from jaxllm.model import Params, count_params
from jaxllm.progress import METRICS_FILE, Reporter, format_seconds, truncate_metrics
from jaxllm.train import (
    MAX_STEPS,
    TrainState,
    init_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    state_from_params,
    state_shardings,
    training_config,
)

DEFAULT_PRESET = "small"
SUMMARY_FILE = "summary.json"
# Settings a resumed run may change: they do not alter the parameters it computes.
RESUME_FREE = frozenset(
    {"eval_every", "eval_batches", "ckpt_every", "keep", "log_every", "tensorboard", "data"}
)


MAX_SEED = 2**32 - 1  # jax.random.key takes the seed modulo 2**32: larger seeds would alias


class DivergedError(RunError):
    """A non-finite loss, gradient norm or parameter; the last good checkpoint is left in place."""


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How a run trains. Sizes: B = batch rows, T = seq tokens per row (a batch is [B, T+1])."""

    steps: int = 300  # optimizer updates in the whole run
    batch: int = 16  # B
    seq: int = 128  # T
    lr: float = 3e-3  # peak learning rate
    warmup: int | None = None  # linear warm-up steps; None: a tenth of the steps
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    accum: int = 1  # micro-batches per update (B must divide by it)
    seed: int = 0  # parameter init and batch order
    val_fraction: float = 0.1  # the end of the token stream held out for validation
    eval_every: int = 50  # steps between validation losses
    eval_batches: int = 4  # validation batches of B rows
    ckpt_every: int = 100  # steps between checkpoints (and one at the end)
    keep: int = 3  # checkpoints kept
    log_every: int = 10  # steps between log lines when not on a terminal
    tensorboard: str | None = None  # directory for TensorBoard scalars; None: none written
    data: str | None = None  # text file or directory; None: the built-in corpus

    def __post_init__(self) -> None:
        positive_int("steps", self.steps, MAX_STEPS)
        for name in (
            "batch",
            "seq",
            "accum",
            "eval_every",
            "eval_batches",
            "ckpt_every",
            "keep",
            "log_every",
        ):
            positive_int(name, getattr(self, name))
        if self.warmup is None:
            object.__setattr__(self, "warmup", self.steps // 10)
        if not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        if self.batch % self.accum:
            raise InputError(f"batch {self.batch} is not divisible by accum {self.accum}")
        make_optimizer(self.lr, self.steps, self.warmup or 0, self.weight_decay, self.clip_norm)
        if not 0 < self.val_fraction < 1:  # NaN fails too
            raise InputError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def check(self, config: ModelConfig, byte_level: bool = True) -> None:
        """InputError unless the model can train on these batches (of bytes, when ``byte_level``;
        a fine-tuning run's tokenizer is checked against the vocabulary when it is read)."""
        if self.seq > config.max_len:
            raise InputError(f"seq {self.seq} exceeds the model's context max_len={config.max_len}")
        if byte_level and config.vocab_size < data.VOCAB_SIZE:
            raise InputError(
                f"vocab_size {config.vocab_size} is below the byte tokenizer's {data.VOCAB_SIZE}"
            )


def _differences(saved: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    return [
        f"{k}={saved.get(k)!r} (requested {v!r})" for k, v in requested.items() if saved.get(k) != v
    ]


@dataclasses.dataclass(frozen=True)
class ModelRequest:
    """The model a run asks for: a preset, or a Hugging Face checkpoint to fine-tune (neither: the
    default preset, or the checkpoint's own config when resuming), with ``FIELD=VALUE`` overrides."""

    preset: str | None = None
    hf_dir: str | None = None
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.preset is not None and self.hf_dir is not None:
            raise InputError("give a preset or a Hugging Face checkpoint (--hf-dir), not both")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run trains, resolved from the request and (when resuming) its checkpoint."""

    config: ModelConfig
    settings: TrainSettings
    meta: dict[str, Any] | None  # the checkpoint's metadata when resuming, else None
    origin: finetune.Origin | None  # the checkpoint fine-tuned from; None: a preset
    mesh: Mesh | None = None  # the devices the run trains on; None: one device


def resolve(
    run_dir: Path,
    resume: bool,
    model: ModelRequest,
    requested: dict[str, Any],
    mesh: dict[str, int] | None = None,
) -> Plan:
    """The config, settings, mesh (from axis sizes ``mesh``, ``jaxllm.mesh.parse_mesh``) and (when
    resuming) checkpoint metadata of a run, all checked.

    A fresh run needs a directory without checkpoints. A resumed run takes what is not requested from
    the newest checkpoint whose metadata reads; what is requested must match, except the
    ``RESUME_FREE`` settings. The mesh is not a setting: a run may resume on another one.
    """
    plan = _resolve(run_dir, resume, model, requested)
    plan.settings.check(plan.config, byte_level=plan.origin is None)
    if plan.settings.tensorboard is not None:
        tensorboard.require()
    check_layout(run_dir, plan.settings.data)
    check_memory(plan.config, plan.settings)
    return dataclasses.replace(plan, mesh=run_mesh(mesh, plan.config, plan.settings))


def run_mesh(
    sizes: dict[str, int] | None, config: ModelConfig, settings: TrainSettings
) -> Mesh | None:
    """The mesh of ``sizes`` over every process's devices (None: one device, which one process
    alone may use); InputError naming the axis if it does not divide the model, the batch B or,
    with ``accum`` > 1, the micro-batch B / accum."""
    if sizes is None:
        if jax.distributed.is_initialized() and jax.process_count() > 1:
            raise InputError(
                f"{jax.process_count()} processes need --mesh over their {jax.device_count()} "
                f"devices (e.g. --mesh data={jax.device_count()})"
            )
        return None
    mesh = meshes.make_mesh(sizes)
    meshes.check_divides(mesh, config, settings.batch)
    rows, micro = (
        mesh.shape[meshes.DATA] * mesh.shape[meshes.FSDP],
        settings.batch // settings.accum,
    )
    if micro % rows:
        raise InputError(
            f"mesh axis data x fsdp={rows} does not divide the micro-batch "
            f"batch/accum={settings.batch}/{settings.accum}={micro}"
        )
    return mesh


def _resolve(run_dir: Path, resume: bool, model: ModelRequest, requested: dict[str, Any]) -> Plan:
    preset, hf_dir, overrides = model.preset, model.hf_dir, model.overrides
    if not resume:
        steps = checkpoint.complete_steps(run_dir)
        if steps:
            raise InputError(
                f"{run_dir} already holds a checkpoint (step {steps[-1]}); "
                "pass --resume to continue it or choose another --out"
            )
        if hf_dir is not None:
            config = training_config(finetune.load_config(hf_dir, overrides), overrides)
            return Plan(config, TrainSettings(**requested), None, finetune.Origin.read(hf_dir))
        config = apply_overrides(get_preset(preset or DEFAULT_PRESET), overrides)
        return Plan(training_config(config, overrides), TrainSettings(**requested), None, None)
    meta = checkpoint.load_meta(run_dir)
    origin = finetune.Origin.from_meta(meta)
    _check_origin(run_dir, origin, hf_dir)
    saved_config = checkpoint.config_from_meta(meta, run_dir)
    # A preset named again is trained as a fresh run would (training_config), to match its save.
    config = (
        training_config(apply_overrides(get_preset(preset), overrides), overrides)
        if preset
        else apply_overrides(saved_config, overrides)
    )
    changed = _differences(saved_config.to_dict(), config.to_dict())
    if changed:
        raise checkpoint.CheckpointError(
            f"cannot resume {run_dir}: its checkpoint has a different config: {', '.join(changed)}"
        )
    fixed = {k: v for k, v in requested.items() if k not in RESUME_FREE}
    changed = _differences(meta["train"], fixed)
    if changed:
        raise checkpoint.CheckpointError(
            f"cannot resume {run_dir}: its checkpoint was trained with {', '.join(changed)}"
        )
    return Plan(config, TrainSettings(**{**meta["train"], **requested}), meta, origin)


def _check_origin(run_dir: Path, origin: finetune.Origin | None, hf_dir: str | None) -> None:
    """CheckpointError if ``--hf-dir`` is given on resume and is not where the run started."""
    if hf_dir is None:
        return
    if origin is None:
        raise checkpoint.CheckpointError(
            f"cannot resume {run_dir} with --hf-dir {hf_dir}: it was trained from a preset"
        )
    if Path(hf_dir).absolute() != Path(origin.hf_dir):
        raise checkpoint.CheckpointError(
            f"cannot resume {run_dir} with --hf-dir {hf_dir}: it was fine-tuned from {origin.hf_dir}"
        )


def check_layout(run_dir: Path, data_path: str | None) -> None:
    """InputError if the run directory lies inside the ``--data`` directory: its checkpoints would
    be read as corpus, and the corpus would change under every resume."""
    if data_path is None or not Path(data_path).is_dir():
        return
    out, corpus = run_dir.resolve(), Path(data_path).resolve()
    if out.is_relative_to(corpus):
        raise InputError(
            f"--out {run_dir} is inside --data {data_path}: the run's own files would be read as "
            "training data; choose an --out outside the data directory"
        )


def memory_needed(config: ModelConfig, settings: TrainSettings) -> dict[str, int]:
    """Bytes a run holds at once: the train step's (``analytic.train_memory`` of one micro-batch of
    B / accum rows) and the validation set (int32 [eval_batches, B, T+1]), counted twice: the host
    copy it is built in and the device copy it is moved to."""
    s = settings
    step = analytic.train_memory(config, s.batch // s.accum, s.seq)["total"]
    val = 2 * s.eval_batches * s.batch * (s.seq + 1) * 4
    return {"train_step": step, "validation_set": val, "total": step + val}


def check_memory(config: ModelConfig, settings: TrainSettings) -> None:
    """InputError, before anything is allocated, if the run needs more memory than this process may
    use (``memory.available_bytes``: RAM, cgroup and ``ulimit -v`` limits, or device memory)."""
    need, free = memory_needed(config, settings), memory.available_bytes()
    if need["total"] > free:
        raise InputError(
            f"training needs about {memory.gib(need['total'])} (train step "
            f"{memory.gib(need['train_step'])} at --batch {settings.batch} --seq {settings.seq} "
            f"--accum {settings.accum}, validation set {memory.gib(need['validation_set'])} at "
            f"--eval-batches {settings.eval_batches}) but this process may use "
            f"{memory.gib(free)}; lower them"
        )


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The token streams of a run (uint16 [n], possibly memory-mapped) and what checkpoints record
    about them."""

    train: np.ndarray
    val: np.ndarray
    info: dict[str, Any]  # source, tokens, sha256, unigram_entropy (nats/token)
    unit: str = "byte"  # what a token is: a byte, or a token of a fine-tuning run's tokenizer


def prepare_data(
    settings: TrainSettings,
    meta: dict[str, Any] | None,
    tokenizer: finetune.CorpusTokenizer | None = None,
) -> Corpus:
    """Load and split the corpus (as bytes, or with a fine-tuning run's ``tokenizer``); DataError if
    a split is too short or (resuming) the data changed."""
    if tokenizer is None:
        tokens, vocab, unit = data.load_corpus(settings.data), data.VOCAB_SIZE, "byte"
    else:
        tokens, vocab, unit = tokenizer.corpus(settings.data), tokenizer.vocab_size, "token"
    train, val = data.split(tokens, settings.val_fraction)
    data.check_windows(train, settings.seq, "training")
    data.check_windows(val, settings.seq, "validation")
    info = {
        "source": data.describe(settings.data),
        "tokens": len(tokens),
        "sha256": data.fingerprint(tokens),
        "unigram_entropy": data.unigram_entropy(tokens, vocab),
    }
    if meta is not None and meta["data"]["sha256"] != info["sha256"]:
        raise data.DataError(
            f"the data at {info['source']} differs from the data the checkpoint was trained on "
            f"({meta['data']['source']}, {meta['data']['tokens']} tokens)"
        )
    return Corpus(train, val, info, unit)


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """While open, SIGINT and SIGTERM append their number to the yielded list instead of stopping the
    process; a second signal of the same kind acts as usual (its handler is restored at once)."""
    received: list[int] = []
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        received.append(signum)
        signal.signal(signum, previous[signum])

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@functools.lru_cache(maxsize=4)
def compiled_steps(
    config: ModelConfig,
    lr: float,
    steps: int,
    warmup: int,
    weight_decay: float,
    clip_norm: float,
    accum: int,
    mesh: Mesh | None = None,
) -> tuple[Any, Any, Any]:
    """(optimizer, train step, eval step), made once per process for the same settings and mesh,
    so training the same model again in one process (a resume, a sweep) reuses the compiled steps."""
    optimizer = make_optimizer(lr, steps, warmup, weight_decay, clip_norm)
    step = make_train_step(config, optimizer, accum, mesh)
    return optimizer, step, make_eval_step(config, mesh)


def _optimizer(config: ModelConfig, settings: TrainSettings, mesh: Mesh | None) -> Any:
    """The run's optimizer, from the compiled steps of its settings and mesh."""
    s = settings
    args = (config, s.lr, s.steps, s.warmup or 0, s.weight_decay, s.clip_norm, s.accum)
    return compiled_steps(*args, mesh)[0]


def state_layout(
    config: ModelConfig, optimizer: Any, mesh: Mesh | None
) -> TrainState | SingleDeviceSharding:
    """Where a run's state lives: laid out on ``mesh`` by the partition rules, or on the first
    device (committed, like the step's own output: a state of uncommitted or mixed arrays is a
    different call signature and would make the step compile again)."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return state_shardings(config, optimizer, mesh)


class Run:
    """One training process over a run directory: the compiled steps, the state, the checkpoints."""

    def __init__(
        self,
        run_dir: Path,
        config: ModelConfig,
        settings: TrainSettings,
        corpus: Corpus,
        reporter: Reporter,
        origin: finetune.Origin | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        self.run_dir, self.config, self.settings, self.corpus = run_dir, config, settings, corpus
        self.reporter, self.origin, self.mesh = reporter, origin, mesh
        s = settings
        args = (config, s.lr, s.steps, s.warmup or 0, s.weight_decay, s.clip_norm, s.accum)
        self.optimizer, self.train_step, self.eval_step = compiled_steps(*args, mesh)
        evals = data.eval_batches(corpus.val, s.eval_batches, s.batch, s.seq)
        self.eval_set = jnp.asarray(evals) if mesh is None else [self.place(b) for b in evals]
        self.manager = checkpoint.manager(run_dir, s.keep)
        self.saved_step: int | None = None
        self.last_metrics: dict[str, float] = {}

    def place(self, batch: np.ndarray) -> Any:
        """A batch [B, T+1] as the train and eval steps take it: as it is on one device, split
        across data and fsdp on a mesh (each process transferring its own rows)."""
        if self.mesh is None:
            return batch
        return distributed.global_batch(batch, meshes.shardings(self.mesh, meshes.batch_spec()))

    def initial_state(
        self, restored: TrainState | None, params: Params | None = None
    ) -> TrainState:
        """Step 0 around ``params`` (fine-tuning) or fresh ones from the seed, else the ``restored``
        state; laid out as ``state_layout`` says either way."""
        if restored is None and params is not None:
            state = state_from_params(params, self.optimizer)
        elif restored is None:
            key = jax.random.key(self.settings.seed)
            state = init_state(self.config, self.optimizer, key, self.mesh)
        else:
            state = restored
            self.saved_step = int(restored.step)
        return jax.device_put(state, state_layout(self.config, self.optimizer, self.mesh))

    def evaluate(self, state: TrainState, step: int) -> None:
        losses = [float(self.eval_step(state.params, batch)) for batch in self.eval_set]
        self.reporter.val(step, statistics.fmean(losses))

    def kept(self) -> str:
        """Where the last good checkpoint is, in words."""
        if self.saved_step is None:
            return "no checkpoint was saved"
        return f"the last good checkpoint is step {self.saved_step} in {self.run_dir}"

    def save(self, state: TrainState, step: int) -> None:
        """Save step ``step``; DivergedError instead if its parameters or optimizer state are not
        all finite (such a state is never saved or called good)."""
        try:
            require_finite((state.params, state.opt_state), f"the state after step {step}")
        except NonFiniteError as err:
            raise DivergedError(f"{err}; not saved, {self.kept()}") from None
        meta = {
            "step": step,
            "train": dataclasses.asdict(self.settings),
            "data": self.corpus.info,
            "metrics": self.last_metrics,
        }
        if self.origin is not None:
            meta["origin"] = self.origin.to_dict()
        checkpoint.save(self.manager, step, state.params, state.opt_state, self.config, meta)
        self.saved_step = step

    def advance(self, state: TrainState, step: int) -> TrainState:
        """Apply update ``step`` (0-based), checking its loss and gradient norm are finite."""
        s = self.settings
        batch = self.place(data.train_batch(self.corpus.train, step, s.batch, s.seq, s.seed))
        began = time.perf_counter()
        state, metrics = self.train_step(state, batch)
        values = {k: float(v) for k, v in metrics.items()}  # waits for the step
        seconds = time.perf_counter() - began
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            raise DivergedError(
                f"step {step + 1}: loss {values['loss']} / grad_norm {values['grad_norm']} "
                f"is not finite; stopped, {self.kept()}"
            )
        self.last_metrics = values
        self.reporter.train(step + 1, values, seconds)
        return state

    def loop(self, state: TrainState, start: int, stop: list[int]) -> int:
        """Steps from ``start`` to the end or to a stop request; returns the step reached."""
        s = self.settings
        if start == 0:
            self.evaluate(state, 0)
        for step in range(start, s.steps):
            state = self.advance(state, step)
            done = step + 1
            if done % s.eval_every == 0 or done == s.steps:
                self.evaluate(state, done)
            if done % s.ckpt_every == 0 or done == s.steps or stop:
                self.save(state, done)
            if stop:
                return done
        return s.steps


def _summary(
    records: list[dict[str, Any]],
    run_dir: Path,
    corpus: Corpus,
    step: int,
    settings: TrainSettings,
    reporter: Reporter,
) -> dict[str, Any]:
    vals = [r for r in records if r["kind"] == "val"]
    timed = reporter.step_times
    return {
        "run_dir": str(run_dir),
        "step": step,
        "steps": settings.steps,
        "unigram_entropy": corpus.info["unigram_entropy"],
        "unit": corpus.unit,
        "first_val_loss": vals[0]["val_loss"] if vals else None,
        "first_val_step": vals[0]["step"] if vals else None,
        "last_val_loss": vals[-1]["val_loss"] if vals else None,
        "last_val_step": vals[-1]["step"] if vals else None,
        "tokens_per_s": settings.batch * settings.seq / statistics.median(timed) if timed else None,
        "wall_s": time.perf_counter() - reporter.start,
    }


def _header(config: ModelConfig, settings: TrainSettings, corpus: Corpus, start: int) -> str:
    s = settings
    return (
        f"model {count_params(config)['total']:,} parameters; data {corpus.info['source']}: "
        f"{corpus.info['tokens']:,} tokens ({len(corpus.train):,} train, {len(corpus.val):,} "
        f"validation), {corpus.unit}-unigram entropy {corpus.info['unigram_entropy']:.4f} "
        f"nats/{corpus.unit}; "
        f"B={s.batch} T={s.seq} steps {start}->{s.steps}"
    )


def restore_state(
    run_dir: Path,
    config: ModelConfig,
    settings: TrainSettings,
    warn: checkpoint.Warn,
    mesh: Mesh | None = None,
) -> TrainState:
    """The state of the newest checkpoint of ``run_dir`` that restores with ``config`` and finite
    values, laid out as ``state_layout(mesh)`` says (whatever the mesh it was saved from); each
    newer step is skipped (``warn`` hears why) and set aside by process 0, since the run is about
    to write new steps in its place."""
    optimizer = _optimizer(config, settings, mesh)
    shapes = jax.eval_shape(lambda: init_state(config, optimizer, jax.random.key(settings.seed)))
    layout = state_layout(config, optimizer, mesh)
    if isinstance(layout, SingleDeviceSharding):
        layout = jax.tree.map(lambda _: layout, shapes)

    def load(step: int) -> tuple[Any, Any]:
        saved = checkpoint.config_from_meta(checkpoint.read_meta(run_dir, step), run_dir)
        if saved != config:
            raise checkpoint.CheckpointError(f"step {step} holds another model config")
        where = (layout.params, layout.opt_state)
        return checkpoint.load_state(run_dir, step, shapes.params, shapes.opt_state, where)

    step, (params, opt_state) = checkpoint.newest_that_loads(run_dir, load, warn)
    for newer in [n for n in checkpoint.complete_steps(run_dir) if n > step]:
        if distributed.is_primary():
            warn(f"moved damaged step {newer} aside to {checkpoint.set_aside(run_dir, newer)}")
    return TrainState(step=np.int32(step), params=params, opt_state=opt_state)  # pyright: ignore[reportArgumentType]


def train(
    run_dir: str | Path,
    *,
    preset: str | None = None,
    hf_dir: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
    stream: TextIO | None = None,
    mesh: dict[str, int] | None = None,
    **requested: Any,
) -> dict[str, Any]:
    """Train into ``run_dir`` from ``preset`` or, fine-tuning, from the Hugging Face checkpoint in
    ``hf_dir`` (at most one of them); ``requested`` holds ``TrainSettings`` fields; ``mesh`` the
    axis sizes of a device mesh (``jaxllm.mesh.parse_mesh``; None: one device). Returns the
    summary (also written to ``RUN_DIR/summary.json``); ``summary["stopped_by"]`` names a signal that
    stopped the run early (its checkpoint saved), else None.

    Bad input is refused before the directory is created; the run then holds the directory's lock
    (``runlock``) and checks again under it, so a second process on the same directory is refused.
    With many processes (``jaxllm.distributed``) process 0 alone holds the lock and writes the
    metrics, the summary and the progress lines; the others return a summary without validation
    losses (they read no metrics file)."""
    if str(run_dir) == "":
        raise InputError("the run directory (--out) must not be empty")
    model = ModelRequest(preset, hf_dir, tuple(overrides))
    path = Path(run_dir)
    if resume and not path.is_dir():
        raise checkpoint.CheckpointError(f"no checkpoint directory at {path}")
    corpus = None
    if not resume:  # everything checked before the directory is made
        plan = resolve(path, resume, model, requested, mesh)
        corpus = prepare_data(plan.settings, None, _tokenizer(plan, hf_dir or path))
        path.mkdir(parents=True, exist_ok=True)
    primary = distributed.is_primary()
    with runlock.hold(path) if primary else contextlib.nullcontext():
        request = (resume, model, requested, mesh)
        return _train_locked(path, request, stream or sys.stderr, corpus, primary)


def _tokenizer(plan: Plan, directory: str | Path) -> finetune.CorpusTokenizer | None:
    """The tokenizer of a fine-tuning run, read from ``directory`` (the checkpoint for a fresh run,
    the run's own copy when resuming); None for a byte-level run."""
    if plan.origin is None:
        return None
    return finetune.CorpusTokenizer.load(directory, plan.config, plan.origin)


def _train_locked(
    path: Path,
    request: tuple[bool, ModelRequest, dict[str, Any], dict[str, int] | None],
    stream: TextIO,
    corpus: Corpus | None,
    primary: bool,
) -> dict[str, Any]:
    """``train`` while holding the directory: resolved again, since another process may have saved
    into it meanwhile; ``request``: (resume, model, settings, mesh sizes); ``corpus``: already
    loaded for a fresh run; ``primary``: this is process 0 (it alone writes into the directory)."""
    plan = resolve(path, *request)
    config, settings, meta = plan.config, plan.settings, plan.meta
    if corpus is None:
        corpus = prepare_data(settings, meta, _tokenizer(plan, path))
    elif plan.origin is not None and primary:
        finetune.copy_tokenizer(plan.origin.hf_dir, path)
    notes: list[str] = []
    restored = None
    if meta is not None:
        restored = restore_state(path, config, settings, notes.append, plan.mesh)
    params = None
    if restored is None and plan.origin is not None:
        params = finetune.initial_params(plan.origin.hf_dir, config)
    start = 0 if restored is None else int(restored.step)
    if restored is not None and primary:
        notes += truncate_metrics(path, start)
    reporter = _reporter(path, settings, corpus.unit, start, stream if primary else None)
    for note in notes:
        reporter.line(f"warning: {note}")
    reporter.line(_header(config, settings, corpus, start))
    try:
        run = Run(path, config, settings, corpus, reporter, plan.origin, plan.mesh)
        with stop_requests() as stop:
            step = run.loop(run.initial_state(restored, params), start, stop)
    finally:
        reporter.close()
    records = []
    if primary:
        lines = (path / METRICS_FILE).read_text().splitlines()
        records = [json.loads(line) for line in lines]
    summary = _summary(records, path, corpus, step, settings, reporter)
    summary["stopped_by"] = signal.Signals(stop[0]).name if stop else None
    if primary:
        (path / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _reporter(
    path: Path, settings: TrainSettings, unit: str, start: int, stream: TextIO | None
) -> Reporter:
    """The run's reporter, appending to the metrics of a resumed run (``start`` > 0); with no
    ``stream`` (a process other than 0), one that writes no file and shows nothing."""
    events = None
    if settings.tensorboard is not None and stream is not None:
        events = tensorboard.EventWriter(
            settings.tensorboard, purge_step=start + 1 if start else None
        )
    return Reporter(
        path if stream is not None else None,
        settings.steps,
        settings.batch * settings.seq,
        stream or io.StringIO(),
        settings.log_every,
        append=start > 0,
        unit=unit,
        events=events,
    )


def describe_summary(summary: dict[str, Any]) -> str:
    """The summary as a few lines for people."""
    lines = [f"run {summary['run_dir']}: step {summary['step']} of {summary['steps']}"]
    if summary["stopped_by"]:
        lines.append(
            f"stopped by {summary['stopped_by']}: checkpoint saved; continue with --resume"
        )
    unit = summary["unit"]
    lines.append(f"{unit + '-unigram entropy':<22}{summary['unigram_entropy']:.4f} nats/{unit}")
    if summary["first_val_loss"] is not None:
        lines.append(
            f"validation loss       {summary['first_val_loss']:.4f} nats/{unit} at step {summary['first_val_step']}"
        )
        lines.append(
            f"                   -> {summary['last_val_loss']:.4f} nats/{unit} at step {summary['last_val_step']}"
        )
    if summary["tokens_per_s"] is not None:
        lines.append(f"throughput            {summary['tokens_per_s']:,.0f} tokens/s (median step)")
    lines.append(f"wall time             {format_seconds(summary['wall_s'])}")
    return "\n".join(lines)
