"""The serving side of the HTTP server, on the event loop: admission, each request's stream of text
pieces, the metrics, readiness and the shutdown deadline.

A request is admitted while fewer than ``slots + max_queue`` requests are in the server (else 429)
and the engine is ready (else 503). Its events come from the stepping thread through
``loop.call_soon_threadsafe`` into its own ``asyncio.Queue``; ``Generation.pieces`` turns them into
text (``jaxllm.server_text``), ends the request at a stop string (cancelling it in the engine), and
cancels it if its consumer goes away (a client that disconnects frees its slot at the next step).
A request counts against the limit until the engine reports its end.

States: ``starting`` (compiling the engine's programs), ``ready``, ``draining`` (shutdown: nothing new
is admitted; what runs may finish until the deadline, then is cancelled), ``failed`` (a step raised).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from jaxllm.engine import Engine, Event, Request
from jaxllm.errors import InputError, positive_int
from jaxllm.server_metrics import Metrics
from jaxllm.server_request import ApiError, Completion
from jaxllm.server_text import Detokenizer, StopStrings, detokenizer
from jaxllm.server_worker import EngineWorker

RETRY_AFTER_S = 1  # the Retry-After of a 429 (queue full) or a 503 while starting, seconds
STOP_JOIN_S = 5.0  # how long shutdown waits for the stepping thread's last step, seconds


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server admits: ``max_queue`` requests waiting beyond the engine's slots, request
    bodies up to ``max_body`` bytes; on shutdown, in-flight requests get ``shutdown_s`` seconds."""

    max_queue: int = 64
    max_body: int = 2**20
    shutdown_s: float = 10.0

    def __post_init__(self) -> None:
        positive_int("max_queue", self.max_queue, least=0)
        positive_int("max_body", self.max_body)
        if not 0 <= self.shutdown_s < float("inf"):
            raise InputError(
                f"shutdown_s must be a finite number of seconds >= 0, got {self.shutdown_s!r}"
            )


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """The model as clients see it: its name, its tokenizer (``jaxllm.data``, a Hugging Face
    tokenizer, or None: token ids only) and the token ids that end a request."""

    name: str
    tokenizer: Any
    stop_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Piece:
    """What one engine event adds to a response: text (possibly ""), the token (None on a stop
    token or an end without one), and the finish reason on the last piece."""

    text: str
    token: int | None
    finish: str | None


class Generation:
    """One admitted request, seen from the event loop."""

    def __init__(self, service: Service, request: Request, stops: tuple[str, ...]) -> None:
        self.service, self.request = service, request
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.tokens: list[int] = []  # generated, in order (a stop token excluded)
        self.finish: str | None = None  # the finish reason the client sees
        self.cancelled: str | None = None  # why the server cancelled it, if it did
        self.last_time: float | None = None  # engine clock of the latest token
        self._text: Detokenizer = detokenizer(service.model.tokenizer)
        self._stops = StopStrings(stops)

    @property
    def prompt_tokens(self) -> int:
        return int(self.request.prompt.size)

    async def pieces(self) -> AsyncIterator[Piece]:
        """The response, a piece per engine event, until the finish; leaving early cancels it."""
        try:
            while self.finish is None:
                yield self._piece(await self.events.get())
        finally:
            if self.finish is None:
                self.cancel("disconnected")
            self.service.metrics.requests.labels(self.finish or "disconnected").inc()

    def cancel(self, reason: str) -> None:
        """End the request in the engine (its slot is freed at the next step)."""
        if self.cancelled is None:
            self.cancelled = reason
            self.service.worker.cancel(self.request.id)

    def _piece(self, event: Event) -> Piece:
        text = ""
        if event.token is not None:
            self.tokens.append(event.token)
            text = self._text.push(event.token)
        if event.finish is not None:
            text += self._text.finish()
        sent, stopped = self._stops.feed(text)
        if stopped:
            self.cancel("stop")
            self.finish = "stop"
        elif event.finish is not None:
            sent += self._stops.flush()
            self.finish = event.finish
        return Piece(sent, event.token, self.finish)


class Service:
    """The engine behind the HTTP routes."""

    def __init__(
        self,
        engine: Engine,
        model: ServedModel,
        limits: Limits | None = None,
        on_ready: Callable[[float], None] | None = None,
    ) -> None:
        self.engine, self.model, self.limits = engine, model, limits or Limits()
        self.worker = EngineWorker(engine)
        self.metrics = Metrics(engine.slots, self.waiting, self.running)
        self.state = "starting"
        self.error: str | None = None  # why the engine failed
        self.compile_s: float | None = None
        self._on_ready = on_ready
        self._active: dict[int, Generation] = {}  # by request id, until the engine ends it
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- life cycle (the app's lifespan and the server's shutdown) ------------------------------

    async def start(self) -> None:
        """Start the stepping thread (it compiles first; ``state`` turns ``ready`` after)."""
        self._loop = asyncio.get_running_loop()
        self.worker.start(self._thread_safe(self._ready), self._thread_safe(self._failed))

    async def stop(self) -> None:
        """End the stepping thread (after its current step)."""
        await asyncio.to_thread(self.worker.stop, STOP_JOIN_S)

    def drain(self) -> None:
        """Shutdown: admit nothing more; cancel what still runs after ``limits.shutdown_s``."""
        if self.state in ("starting", "ready"):
            self.state = "draining"
        assert self._loop is not None
        self._loop.call_later(self.limits.shutdown_s, self._cancel_all)

    def _cancel_all(self) -> None:
        for generation in list(self._active.values()):
            generation.cancel("cancelled")

    def _ready(self, compile_s: float) -> None:
        self.compile_s = compile_s
        if self.state == "starting":
            self.state = "ready"
            if self._on_ready is not None:
                self._on_ready(compile_s)

    def _failed(self, error: BaseException) -> None:
        self.state, self.error = "failed", f"{type(error).__name__}: {error}"
        print(f"jaxllm serve: the engine failed: {self.error}", file=sys.stderr, flush=True)
        clock = self.engine.clock()
        for request_id in list(self._active):
            self._deliver(Event(request_id, None, "error", clock))

    # -- admission -----------------------------------------------------------------------------

    def submit(self, completion: Completion) -> Generation:
        """Admit a request (ApiError: 503 not ready, 404 another model, 429 queue full, 400 a
        request the model cannot run)."""
        self._check_open()
        if completion.model is not None and completion.model != self.model.name:
            message = f"model {completion.model!r} is not served here; this server serves {self.model.name!r}"
            raise ApiError(404, message, "model", "model_not_found")
        limit = self.engine.slots + self.limits.max_queue
        if len(self._active) >= limit:
            message = (
                f"the queue is full: {len(self._active)} requests in the server, at most "
                f"{limit} ({self.engine.slots} slots + max-queue {self.limits.max_queue})"
            )
            raise ApiError(429, message, headers={"Retry-After": str(RETRY_AFTER_S)})
        prompt = self._encode(completion)
        self._check_context(len(prompt), completion.max_tokens)
        sampling = completion.sampling
        if sampling.top_k is not None and sampling.top_k > self.engine.config.vocab_size:
            sampling = dataclasses.replace(sampling, top_k=self.engine.config.vocab_size)
        try:
            request = self.worker.submit(
                prompt,
                completion.max_tokens,
                sampling=sampling,
                stop=self.model.stop_ids,
                on_event=self._thread_safe(self._deliver),
            )
        except ValueError as err:
            raise ApiError(400, str(err), "prompt") from None
        generation = Generation(self, request, completion.stop)
        self._active[request.id] = generation
        self.metrics.prompt_tokens.inc(generation.prompt_tokens)
        return generation

    def _check_open(self) -> None:
        if self.state == "starting":
            raise ApiError(
                503,
                "the server is starting (compiling the model's programs)",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        if self.state == "draining":
            raise ApiError(503, "the server is shutting down")
        if self.state == "failed":
            raise ApiError(500, f"the engine failed: {self.error}")

    def _encode(self, completion: Completion) -> list[int]:
        tokenizer = self.model.tokenizer
        if tokenizer is None and isinstance(completion.prompt, str):
            raise ApiError(
                400, "this model has no tokenizer: give the prompt as token ids", "prompt"
            )
        if tokenizer is None and completion.stop:
            raise ApiError(
                400, "this model has no tokenizer: stop strings cannot be matched", "stop"
            )
        if isinstance(completion.prompt, str):
            return self.model.tokenizer.encode(completion.prompt).tolist()
        return list(completion.prompt)

    def _check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        capacity = self.engine.capacity
        if prompt_tokens + max_tokens > capacity:
            param = "prompt" if prompt_tokens >= capacity else "max_tokens"
            message = (
                f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} = "
                f"{prompt_tokens + max_tokens} is beyond the context of {capacity} tokens"
            )
            raise ApiError(400, message, param, "context_length_exceeded")

    # -- events from the stepping thread ----------------------------------------------------------

    def _thread_safe(self, fn: Callable[[Any], None]) -> Callable[[Any], None]:
        """``fn`` run on the event loop when called from another thread (dropped once it closed)."""
        loop = self._loop
        assert loop is not None

        def call(arg: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody listens
                loop.call_soon_threadsafe(fn, arg)

        return call

    def _deliver(self, event: Event) -> None:
        generation = self._active.get(event.request)
        if generation is None:
            return
        if event.token is not None:
            self._observe(generation, event)
        if event.finish is not None:
            del self._active[event.request]
        generation.events.put_nowait(event)

    def _observe(self, generation: Generation, event: Event) -> None:
        self.metrics.generated_tokens.inc()
        if generation.last_time is None:
            self.metrics.ttft.observe(event.time - generation.request.submitted)
        else:
            self.metrics.tbt.observe(event.time - generation.last_time)
        generation.last_time = event.time

    # -- gauges ------------------------------------------------------------------------------------

    def running(self) -> int:
        """Requests holding a slot."""
        return sum(r is not None for r in self.engine.running)

    def waiting(self) -> int:
        """Requests admitted and not holding a slot yet."""
        return max(len(self._active) - self.running(), 0)
