"""An OpenAI-compatible HTTP server over the serving engine (``jaxllm serve``): Starlette on uvicorn.

Routes:
- ``POST /v1/completions``: the body of ``jaxllm.server_request``; the answer is a ``text_completion``
  with ``choices[0].text``, ``choices[0].token_ids`` (the generated ids, a stop token excluded),
  ``finish_reason`` (``stop``: a stop token or string; ``length``: max_tokens; ``cancelled``: the
  shutdown deadline passed) and ``usage``. With ``"stream": true`` it is server-sent events, one
  ``data: {chunk}`` per generated token (its text, possibly "" while a UTF-8 character is
  incomplete or a stop string may be starting, and ``token_ids: [id]``), the last chunk carrying the
  finish reason and ``usage``, then ``data: [DONE]``.
- ``GET /v1/models``: the one model served. ``GET /health``: 200 ``{"status": "ready"}``, else 503
  with ``starting``, ``draining`` or ``failed``. ``GET /metrics``: Prometheus text
  (``jaxllm.server_metrics``).

Errors are JSON, ``{"error": {"message", "type", "param", "code"}}``: 400 bad input, 404 unknown
route or model, 405 wrong method, 413 body over ``max_body``, 429 queue full (with Retry-After), 500
engine failure, 503 starting (with Retry-After) or shutting down. Engine steps run in their own
thread (``jaxllm.server_worker``), so every route answers during a step.

Shutdown (SIGTERM or Ctrl-C): the listening socket closes, nothing new is admitted, running requests
may finish for ``shutdown_s`` seconds and are then cancelled (their streams end with finish reason
``cancelled`` and ``[DONE]``); the process exits with 128 + the signal number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxllm.engine import Engine
from jaxllm.server_metrics import CONTENT_TYPE
from jaxllm.server_request import ApiError, parse_completion
from jaxllm.server_service import Generation, Limits, ServedModel, Service

BACKSTOP_S = 5.0  # after the shutdown deadline, how long cancelled requests get to end, seconds


def create_app(service: Service) -> Starlette:
    """The ASGI app over ``service`` (its lifespan starts and stops the stepping thread)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        del app
        await service.start()
        yield
        await service.stop()

    routes = [
        Route("/v1/completions", _completions, methods=["POST"]),
        Route("/v1/models", _models, methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
    ]
    handlers: Any = {HTTPException: _http_error, ApiError: _api_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.service = service
    return app


def _service(request: Request) -> Service:
    return request.app.state.service


# -- routes --------------------------------------------------------------------------------------


async def _completions(request: Request) -> Response:
    service = _service(request)
    try:
        completion = parse_completion(await _body(request, service.limits.max_body))
        generation = service.submit(completion)
    except ApiError as err:
        service.metrics.refused.labels(str(err.status)).inc()
        raise
    head = {
        "id": f"cmpl-{generation.request.id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": service.model.name,
    }
    if completion.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            _events(generation, head), media_type="text/event-stream", headers=headers
        )
    return await _whole(request, generation, head)


async def _body(request: Request, limit: int) -> bytes:
    """The request body; 413 once it passes ``limit`` bytes (by Content-Length or as read)."""
    too_big = ApiError(
        413, f"the request body is over the limit of {limit} bytes", code="body_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def _usage(generation: Generation) -> dict[str, int]:
    completion = len(generation.tokens)
    prompt = generation.prompt_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _choice(text: str, tokens: list[int], finish: str | None) -> dict[str, Any]:
    return {
        "index": 0,
        "text": text,
        "token_ids": tokens,
        "logprobs": None,
        "finish_reason": finish,
    }


async def _events(generation: Generation, head: dict[str, Any]) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece, ``usage`` on the last, then ``[DONE]``."""
    async for piece in generation.pieces():
        if piece.finish == "error":  # the last piece
            yield _sse(_engine_failure(generation).body())
            continue
        tokens = [] if piece.token is None else [piece.token]
        chunk = {**head, "choices": [_choice(piece.text, tokens, piece.finish)]}
        if piece.finish is not None:
            chunk["usage"] = _usage(generation)
        yield _sse(chunk)
    yield "data: [DONE]\n\n"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _whole(request: Request, generation: Generation, head: dict[str, Any]) -> Response:
    """The whole completion as one JSON body; a client that disconnects first cancels it."""

    async def collect() -> str:
        return "".join([piece.text async for piece in generation.pieces()])

    collecting = asyncio.ensure_future(collect())
    leaving = asyncio.ensure_future(_disconnect(request))
    await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
    leaving.cancel()
    if not collecting.done():  # the client left: cancelling the collector cancels the request
        collecting.cancel()
        return Response(status_code=499)
    text = collecting.result()
    if generation.finish == "error":
        raise _engine_failure(generation)
    choice = _choice(text, generation.tokens, generation.finish)
    return JSONResponse({**head, "choices": [choice], "usage": _usage(generation)})


async def _disconnect(request: Request) -> None:
    """Return when the client disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _engine_failure(generation: Generation) -> ApiError:
    return ApiError(500, f"the engine failed: {generation.service.error}", code="engine_failed")


async def _models(request: Request) -> Response:
    service = _service(request)
    model = {
        "id": service.model.name,
        "object": "model",
        "created": 0,
        "owned_by": "jaxllm",
        "max_model_len": service.engine.capacity,
    }
    return JSONResponse({"object": "list", "data": [model]})


async def _health(request: Request) -> Response:
    service = _service(request)
    body: dict[str, Any] = {"status": service.state}
    if service.error is not None:
        body["error"] = service.error
    return JSONResponse(body, status_code=200 if service.state == "ready" else 503)


async def _metrics(request: Request) -> Response:
    return Response(_service(request).metrics.render(), media_type=CONTENT_TYPE)


# -- errors ----------------------------------------------------------------------------------------


async def _api_error(request: Request, exc: Exception) -> Response:
    del request
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404 unknown route, 405 wrong method) in the same JSON shape."""
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return await _api_error(
        request, ApiError(exc.status_code, message, headers=dict(exc.headers or {}))
    )


# -- running ---------------------------------------------------------------------------------------


class Server(uvicorn.Server):
    """uvicorn's server, telling the service to drain when shutdown begins."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.service.drain()
        await super().shutdown(sockets)


def make_server(service: Service) -> Server:
    """A uvicorn server of ``create_app(service)``; run it with ``run(sockets=[a bound socket])``."""
    config = uvicorn.Config(
        create_app(service),
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=math.ceil(service.limits.shutdown_s + BACKSTOP_S),
    )
    return Server(config, service)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); OSError if it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def background(
    service: Service, host: str = "127.0.0.1", port: int = 0
) -> Iterator[tuple[str, Server]]:
    """Run the server in a thread (for tests and benchmarks): yields (its URL, the server) once it
    listens, not necessarily ready (``service.state``); on exit, shuts it down as SIGTERM would."""
    sock = bind(host, port)
    uv = make_server(service)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not uv.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread ended before it listened")
            time.sleep(0.01)
        yield url_of(sock), uv
    finally:
        uv.should_exit = True
        thread.join()
        sock.close()


def serve(engine: Engine, model: ServedModel, limits: Limits, sock: socket.socket) -> int:
    """Serve on the listening ``sock`` (``bind``) until SIGTERM or Ctrl-C; the exit status (128 +
    the signal number)."""
    url = url_of(sock)

    def announce(compile_s: float) -> None:
        print(
            f"jaxllm serve: ready at {url} (compiled in {compile_s:.1f} s)",
            file=sys.stderr,
            flush=True,
        )

    service = Service(engine, model, limits, on_ready=announce)
    server = make_server(service)
    received: list[int] = []

    def terminated(signum: int, frame: Any) -> None:
        del frame
        received.append(signum)
        server.should_exit = True  # one before uvicorn's own handler is in place stops it too

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        print(f"jaxllm serve: {model.name} at {url}, compiling...", file=sys.stderr, flush=True)
        server.run(sockets=[sock])  # re-raises a caught signal on its way out
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    return 128 + received[0] if received else 0
