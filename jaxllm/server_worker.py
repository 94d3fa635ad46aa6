"""The one thread that steps the engine, so that the event loop never waits on a step.

It compiles every program first (``Engine.compile_programs``: each program and both samplers run
once, so that no request pays a compile), reports ready, then loops: step while the engine has
work, sleep on a ``threading.Event`` while it is idle (``submit`` and ``cancel`` set it). An exception in a step ends the thread and is reported once;
the engine is then unusable.

``stop`` during the compile ends the thread after the program being compiled (not reported ready).
The thread runs inside XLA for as long as a compile or step lasts and cannot be interrupted there;
one still running when the command returns makes ``jaxllm.launch.main`` end the process with
``os._exit`` (the interpreter's finalisation would abort it: see ``jaxllm.launch``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxllm import launch
from jaxllm.engine import Engine, Request


class EngineWorker:
    """Steps ``engine`` in its own thread; ``submit`` and ``cancel`` are safe from any thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._wake = threading.Event()
        self._running = True
        self._thread: threading.Thread | None = None

    def start(
        self, on_ready: Callable[[float], None], on_failure: Callable[[BaseException], None]
    ) -> None:
        """Start the thread: ``on_ready(compile seconds)`` once every program is compiled,
        ``on_failure(error)`` if compiling or a step raises. Both are called from the thread."""
        self._thread = threading.Thread(
            target=self._main, args=(on_ready, on_failure), name="jaxllm-engine", daemon=True
        )
        launch.end_hard_while_alive(self._thread)
        self._thread.start()

    def submit(
        self, prompt: Sequence[int] | np.ndarray, max_new_tokens: int, **options: Any
    ) -> Request:
        """``Engine.submit`` (ValueError for a request that cannot run), then wake the thread."""
        request = self.engine.submit(prompt, max_new_tokens, **options)
        self._wake.set()
        return request

    def cancel(self, request_id: int) -> None:
        """``Engine.cancel``: the request ends at the next step, its slot freed."""
        self.engine.cancel(request_id)
        self._wake.set()

    def stop(self, timeout: float) -> bool:
        """Ask the thread to end after its current step (while compiling, after the current
        program) and wait up to ``timeout`` seconds for it; whether it ended."""
        self._running = False
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _main(
        self, on_ready: Callable[[float], None], on_failure: Callable[[BaseException], None]
    ) -> None:
        engine = self.engine
        try:
            compile_s = engine.compile_programs(engine.capacity - 1, lambda: not self._running)
            if not self._running:
                return
            on_ready(compile_s)
            while self._running:
                if engine.idle:
                    self._wake.wait()
                    self._wake.clear()  # anything submitted before the clear is seen by idle
                    continue
                engine.step()
        except Exception as err:
            on_failure(err)
