"""The serving engine: requests in, token streams out, over B slots of a ``SlotCache``.

A request waits in a queue until a slot is free, is prefilled into that slot, then decodes one token
per step until a stop token, its ``max_new_tokens`` or a cancel; its slot is then free for the next.
Every step is one compiled program (``jaxllm.step``) chosen by the policy:

- ``static`` (the baseline of one padded batch): when every slot is free, admit up to B waiting
  requests and prefill them together, each padded to the longest; then decode until the last of them
  finishes (a finished request's slot idles), then admit the next B.
- ``continuous`` (prefill-first): whenever a slot is free and a request waits, prefill as many
  waiting requests as there are free slots in one step (decodes pause for it); otherwise decode every
  running request.
- ``chunked`` (Sarathi-Serve's stall-free batching): every step decodes every running request and
  carries up to ``chunk`` prompt tokens of one request being prefilled (the token budget per step is
  B + chunk); a long prompt is prefilled over several steps, never stalling the decodes.

Programs compiled (each once per engine configuration): lane counts P are powers of two up to B,
chunk lengths C powers of two from ``MIN_CHUNK`` up to the longest prompt (``chunked``: up to
``chunk``); static and continuous run prefill-only programs (P, C) and one decode program;
chunked runs (decode, C) programs with and without reading the slot's earlier chunks.

Thread safety: ``submit`` and ``cancel`` may be called from any thread (they enqueue); ``step`` runs
in one thread at a time and applies them at its start.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxllm import memory, serve, shard_memory
from jaxllm import mesh as meshes
from jaxllm.batching import bucket
from jaxllm.cache import cache_dtype
from jaxllm.config import ModelConfig
from jaxllm.errors import InputError, positive_int
from jaxllm.model import Params
from jaxllm.sampling import Sampler, greedy, sample_rows
from jaxllm.slots import SlotCache
from jaxllm.step import StepInput, make_step

POLICIES = ("static", "continuous", "chunked")
MIN_CHUNK = 16  # the shortest compiled lane: shorter prompts are padded to it
MAX_SEED = 2**32 - 1
MAX_TOP_K = (
    2**31 - 1
)  # top-k travels to the step as int32; any k >= the vocabulary keeps every token
MAX_RECORDS = 100_000  # steps whose record is kept (a long-running server forgets the oldest)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling: temperature (0 = greedy), top-k (None: off), top-p (None: off), and the
    seed of the request's own random stream."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        sampler = Sampler(self.temperature, self.top_k, self.top_p)  # validates the three
        object.__setattr__(self, "temperature", sampler.temperature)
        if self.top_k is not None and self.top_k > MAX_TOP_K:
            raise InputError(f"top_k must be at most {MAX_TOP_K} (int32), got {self.top_k}")
        if not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")


@dataclasses.dataclass(frozen=True)
class Event:
    """Something that happened to a request in a step: a new token (``token``), its end
    (``finish``: "stop", "length" or "cancelled"; ``token`` is None on a stop token, which is not
    part of the output), or both. ``time``: the engine clock, seconds."""

    request: int
    token: int | None
    finish: str | None
    time: float


@dataclasses.dataclass(eq=False)
class Request:
    """One request and its progress (owned by the engine; read it, do not change it)."""

    id: int
    prompt: np.ndarray  # [n] int32
    max_new_tokens: int
    sampling: SamplingParams
    stop: frozenset[int]
    on_event: Callable[[Event], None] | None
    submitted: float  # engine clock at submit
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in the cache
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated, stop token excluded
    times: list[float] = dataclasses.field(default_factory=list)  # clock at each generated token
    finish: str | None = None
    finished: float | None = None  # clock at the end

    @property
    def filled(self) -> int:
        """Positions of its slot holding this request's keys and values."""
        return self.prefilled + max(len(self.tokens) - 1, 0)


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What one step ran: its program shape, the work in it, and its wall-clock seconds."""

    decode: bool
    read: bool
    lanes: int  # P
    chunk: int  # C
    live: tuple[int, ...]  # filled positions of each decoding slot (one token each)
    chunks: tuple[tuple[int, int], ...]  # (start, real tokens) of each used lane
    seconds: float


@dataclasses.dataclass(frozen=True)
class _Plan:
    decode: bool
    read: bool
    lanes: list[tuple[Request, int]]  # (request, tokens of its prompt this step)


class Engine:
    """Continuous-batching engine over ``slots`` slots of ``capacity`` positions (default: the
    model's context)."""

    def __init__(
        self,
        config: ModelConfig,
        params: Params,
        *,
        slots: int = 8,
        capacity: int | None = None,
        policy: str = "continuous",
        chunk: int = 64,
        clock: Callable[[], float] = time.perf_counter,
        mesh: Mesh | None = None,
    ) -> None:
        capacity = config.max_len if capacity is None else capacity
        _check_engine_args(config, slots, capacity, policy, chunk)
        if mesh is not None:
            meshes.check_engine_mesh(mesh, config)
        self.config, self.params = serve.for_serving(config, params, mesh)
        self.slots, self.capacity, self.policy, self.chunk = slots, capacity, policy, chunk
        self.clock, self.mesh = clock, mesh
        empty = functools.partial(SlotCache.init, self.config, slots, capacity)
        if mesh is None:
            self.cache = empty()
        else:  # the weights and the cache split over tensor, the cache made in place
            at = meshes.ServeLayout.of(mesh, self.config)
            self.params = jax.device_put(self.params, at.params)
            self.cache = jax.jit(empty, out_shardings=at.slots)()
        self.running: list[Request | None] = [None] * slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.records: collections.deque[StepRecord] = collections.deque(maxlen=MAX_RECORDS)
        self.compiled: dict[tuple[bool, bool, int, int], Any] = {}
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._live: dict[int, Request] = {}
        self._lock = threading.Lock()

    # -- the library API ----------------------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int] | np.ndarray,
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        stop: Sequence[int] = (),
        on_event: Callable[[Event], None] | None = None,
    ) -> Request:
        """Queue a request; ValueError (one line, naming the value and the limit) if it cannot run."""
        ids = serve.check_tokens(self.config, prompt, "prompt token").reshape(-1)
        stops = serve.check_tokens(
            self.config, np.asarray(stop, np.int32).reshape(-1), "stop token"
        )
        self.check_lengths(ids.size, max_new_tokens)
        with self._lock:
            request = Request(
                id=next(self._ids),
                prompt=ids,
                max_new_tokens=max_new_tokens,
                sampling=sampling or SamplingParams(),
                stop=frozenset(int(s) for s in stops),
                on_event=on_event,
                submitted=self.clock(),
            )
            self._live[request.id] = request
        self._inbox.put(("submit", request))
        return request

    def cancel(self, request_id: int) -> None:
        """End a request at the next step (its slot is freed then); unknown or finished: nothing."""
        self._inbox.put(("cancel", request_id))

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing running, nothing submitted since the last step."""
        return self._inbox.empty() and not self.waiting and not any(self.running)

    def step(self) -> list[Event]:
        """Apply submits and cancels, then run one program as the policy plans (none if idle)."""
        events = self._drain()
        plan = self._plan()
        if plan is not None:
            events += self._run(plan)
        for event in events:
            request = self._live[event.request]
            if event.finish is not None:
                del self._live[event.request]
            if request.on_event is not None:
                request.on_event(event)
        return events

    def run_until_idle(self) -> None:
        """Step until every submitted request has finished."""
        while not self.idle:
            self.step()

    # -- validation ----------------------------------------------------------------------------

    def check_lengths(self, prompt_len: int, max_new_tokens: Any) -> None:
        """InputError unless a prompt of ``prompt_len`` tokens and ``max_new_tokens`` fit a slot:
        what ``submit`` checks of a request's sizes, for a caller to check before making the prompt."""
        if prompt_len == 0:
            raise InputError("the prompt is empty")
        positive_int("max_new_tokens", max_new_tokens)
        if prompt_len + max_new_tokens > self.capacity:
            what = "context (max_len)" if self.capacity == self.config.max_len else "slot capacity"
            raise InputError(
                f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} = "
                f"{prompt_len + max_new_tokens} is beyond the {what} {self.capacity}"
            )

    # -- scheduling ------------------------------------------------------------------------------

    def _drain(self) -> list[Event]:
        events = []
        while not self._inbox.empty():
            kind, item = self._inbox.get()
            if kind == "submit":
                self.waiting.append(item)
            elif item in self._live:
                events += self._end(self._live[item], "cancelled")
        return events

    def _free(self) -> list[int]:
        return [b for b, r in enumerate(self.running) if r is None]

    def _decoding(self) -> list[Request]:
        return [r for r in self.running if r is not None and r.prefilled == r.prompt.size]

    def _admit(self, n: int) -> list[Request]:
        admitted = []
        for slot in self._free()[:n]:
            if not self.waiting:
                break
            request = self.waiting.popleft()
            request.slot, self.running[slot] = slot, request
            admitted.append(request)
        return admitted

    def _plan(self) -> _Plan | None:
        decoding = self._decoding()
        if self.policy == "chunked":
            return self._plan_chunked(decoding)
        if self.policy == "static" and any(self.running):
            return _Plan(True, False, []) if decoding else None
        admitted = self._admit(len(self._free()))
        if admitted:
            return _Plan(False, False, [(r, r.prompt.size) for r in admitted])
        return _Plan(True, False, []) if decoding else None

    def _plan_chunked(self, decoding: list[Request]) -> _Plan | None:
        prefilling = [r for r in self.running if r is not None and r.prefilled < r.prompt.size]
        lane = prefilling[0] if prefilling else next(iter(self._admit(1)), None)
        if lane is None:
            return _Plan(True, False, []) if decoding else None
        n = min(self.chunk, lane.prompt.size - lane.prefilled)
        return _Plan(bool(decoding), lane.prefilled > 0, [(lane, n)])

    # -- running a step ---------------------------------------------------------------------------

    def _inputs(self, plan: _Plan, decoding: list[Request]) -> StepInput:
        B = self.slots
        dec_tokens, dec_pos = np.zeros(B, np.int32), np.zeros(B, np.int32)
        dec_live = np.zeros(B, bool)
        for r in decoding:
            assert r.slot is not None
            dec_tokens[r.slot], dec_pos[r.slot], dec_live[r.slot] = r.tokens[-1], r.filled, True
        longest = max((n for _, n in plan.lanes), default=0)
        P = bucket(len(plan.lanes)) if plan.lanes else 0
        inp = _blank_input(B, P, self._chunk_len(longest) if plan.lanes else 1)
        for p, (r, n) in enumerate(plan.lanes):
            assert r.slot is not None
            inp.lane_tokens[p, :n] = r.prompt[r.prefilled : r.prefilled + n]
            inp.lane_slot[p], inp.lane_start[p], inp.lane_len[p] = r.slot, r.prefilled, n
        return inp.replace(dec_tokens=dec_tokens, dec_pos=dec_pos, dec_live=dec_live)

    def shapes(self, longest_prompt: int) -> list[tuple[bool, bool, int, int]]:
        """Every (decode, read, P, C) program the policy runs for prompts up to ``longest_prompt``."""
        ceiling = self.chunk if self.policy == "chunked" else self.capacity
        most = min(longest_prompt, ceiling)
        chunks = sorted({self._chunk_len(n) for n in range(1, most + 1)})
        if self.policy == "chunked":
            lanes = [(d, r, 1, c) for d in (True, False) for r in (False, True) for c in chunks]
        else:
            counts = sorted({bucket(k) for k in range(1, self.slots + 1)})
            lanes = [(False, False, p, c) for p in counts for c in chunks]
        return [(True, False, 0, 1), *lanes]

    def compile_programs(
        self, longest_prompt: int, cancelled: Callable[[], bool] | None = None
    ) -> float:
        """Compile ``shapes(longest_prompt)`` ahead and run each once (an executable's first call
        costs more than the next), so that no step of a run pays for either; seconds. Idle inputs
        write nothing: the cache's contents are unchanged. ``cancelled`` is asked before each
        program: once it is true, the rest are left uncompiled."""
        start = time.perf_counter()
        for decode, read, P, C in self.shapes(longest_prompt):
            if cancelled is not None and cancelled():
                break
            blank = _blank_input(self.slots, P, C)
            logits, self.cache = self.program(decode, read, blank)(self.params, self.cache, blank)
            idle = _idle_rows(logits.shape[0])  # both samplers: greedy, and per-row sampling
            warm = dataclasses.replace(idle, temperature=np.ones_like(idle.temperature))
            jax.block_until_ready((_sample(logits, idle), _sample(logits, warm)))
        return time.perf_counter() - start

    def _chunk_len(self, n: int) -> int:
        """C: the compiled lane length for a lane of n real tokens."""
        ceiling = self.chunk if self.policy == "chunked" else self.capacity
        return min(bucket(n, MIN_CHUNK), bucket(ceiling))

    def program(self, decode: bool, read: bool, inp: StepInput) -> Any:
        """The compiled step for this shape (compiled ahead on first use, then reused)."""
        shape = (decode, read, inp.lanes, inp.chunk)
        if shape not in self.compiled:
            cache = jax.eval_shape(lambda: self.cache)
            jitted = make_step(self.config, decode, read, self.mesh)
            self.compiled[shape] = jitted.lower(self.params, cache, inp).compile()
        return self.compiled[shape]

    def _run(self, plan: _Plan) -> list[Event]:
        decoding = self._decoding() if plan.decode else []
        inp = self._inputs(plan, decoding)
        program = self.program(plan.decode, plan.read, inp)
        rows = _sampled_rows(self.slots if plan.decode else 0, decoding, plan.lanes)
        start = time.perf_counter()
        logits, self.cache = program(self.params, self.cache, inp)
        tokens = np.asarray(_sample(logits, rows))
        seconds = time.perf_counter() - start
        self.records.append(
            StepRecord(
                plan.decode,
                plan.read,
                inp.lanes,
                inp.chunk,
                tuple(r.filled for r in decoding),
                tuple((r.prefilled, n) for r, n in plan.lanes),
                seconds,
            )
        )
        return self._advance(plan, decoding, tokens)

    def _advance(self, plan: _Plan, decoding: list[Request], tokens: np.ndarray) -> list[Event]:
        now, events = self.clock(), []
        for r in decoding:
            assert r.slot is not None
            events += self._emit(r, int(tokens[r.slot]), now)
        offset = self.slots if plan.decode else 0
        for p, (r, n) in enumerate(plan.lanes):
            r.prefilled += n
            if r.prefilled == r.prompt.size:
                events += self._emit(r, int(tokens[offset + p]), now)
        return events

    def _emit(self, r: Request, token: int, now: float) -> list[Event]:
        if token in r.stop:
            return self._end(r, "stop", now)
        r.tokens.append(token)
        r.times.append(now)
        if len(r.tokens) >= r.max_new_tokens:
            return self._end(r, "length", now, token)
        return [Event(r.id, token, None, now)]

    def _end(
        self, r: Request, finish: str, now: float | None = None, token: int | None = None
    ) -> list[Event]:
        now = self.clock() if now is None else now
        r.finish, r.finished = finish, now
        if r.slot is not None:
            self.running[r.slot] = None
        elif r in self.waiting:
            self.waiting.remove(r)
        return [Event(r.id, token, finish, now)]


def _blank_input(B: int, P: int, C: int) -> StepInput:
    """Host arrays of a step with B slots and P lanes of C tokens, nothing live."""
    i32 = functools.partial(np.zeros, dtype=np.int32)
    return StepInput(i32(B), i32(B), np.zeros(B, bool), i32((P, C)), i32(P), i32(P), i32(P))


def check_memory(config: ModelConfig, slots: int, capacity: int, mesh: Mesh | None = None) -> None:
    """InputError, before the weights are loaded, if serving ``config`` over ``slots`` slots of
    ``capacity`` positions needs more memory than this process may use (``memory.available_bytes``):
    the served weights and the slot cache (on a mesh, one device's share of each)."""
    _check_sizes(config, slots, capacity)
    if mesh is None:
        need, each = serve.serving_memory(config, slots, capacity), ""
    else:
        served, sizes = serve.serving_config(config, mesh), dict(mesh.shape)
        kv = cache_dtype(served)
        need = shard_memory.serve_memory_per_device(served, sizes, slots, 1, capacity, kv)
        each = " per device"
    free = memory.available_bytes()
    if need["total"] > free:
        raise InputError(
            f"slots {slots} of capacity {capacity} need a {memory.gib(need['kv_cache'])} KV cache"
            f"{each} beside {memory.gib(need['params'])} of weights, but this process may use "
            f"{memory.gib(free)}; lower the slots"
        )


def _check_engine_args(
    config: ModelConfig, slots: int, capacity: int, policy: str, chunk: int
) -> None:
    if policy not in POLICIES:
        raise InputError(f"unknown policy {policy!r}; policies are: {', '.join(POLICIES)}")
    positive_int("chunk", chunk)
    _check_sizes(config, slots, capacity)


def _check_sizes(config: ModelConfig, slots: int, capacity: int) -> None:
    positive_int("slots", slots)
    positive_int("capacity", capacity)
    if capacity > config.max_len:
        raise InputError(
            f"capacity {capacity} is beyond the model's context (max_len) {config.max_len}"
        )


@dataclasses.dataclass(frozen=True)
class _Rows:
    """Per-row sampling settings of a step's R logits rows (idle rows: greedy)."""

    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    seed: np.ndarray
    count: np.ndarray

    @property
    def greedy(self) -> bool:
        return not self.temperature.any()


def _idle_rows(R: int) -> _Rows:
    zeros = functools.partial(np.zeros, R)
    return _Rows(
        zeros(np.float32),
        zeros(np.int32),
        np.ones(R, np.float32),
        zeros(np.uint32),
        zeros(np.int32),
    )


def _sampled_rows(B: int, decoding: list[Request], lanes: list[tuple[Request, int]]) -> _Rows:
    """Rows of a step with B decode rows (0: no decode segment) and its lanes."""
    rows = _idle_rows(B + (bucket(len(lanes)) if lanes else 0))
    placed = [(r.slot, r) for r in decoding] + [(B + p, r) for p, (r, _) in enumerate(lanes)]
    for row, r in placed:
        s = r.sampling
        rows.temperature[row], rows.top_k[row] = s.temperature, s.top_k or 0
        rows.top_p[row], rows.seed[row], rows.count[row] = s.top_p or 1.0, s.seed, len(r.tokens)
    return rows


@functools.cache
def _samplers() -> tuple[Any, Any]:
    return jax.jit(greedy), jax.jit(sample_rows)


def _sample(logits: jax.Array, rows: _Rows) -> jax.Array:
    """Tokens [R]: argmax when every row is greedy, else each row's own sampler."""
    argmax, sample = _samplers()
    if rows.greedy:
        return argmax(logits)
    return sample(logits, rows.temperature, rows.top_k, rows.top_p, rows.seed, rows.count)
