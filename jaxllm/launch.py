"""The ``jaxllm`` command's entry point: on Linux, it runs the CLI with a memory allocator that keeps
freed pages (tcmalloc, else jemalloc told to keep them) preloaded, when one is installed.

Why: XLA's CPU runtime allocates each step's temporaries and outputs afresh, and glibc's malloc hands
large blocks back to the kernel when they are freed, so every step faults its pages in again. On the
2-core development VM, writing a fresh 113 MB array cost 28k page faults and 60 ms (4 ms donated in
place); a gpt2 f32 train step (B=4, T=256) took 11.3 s with glibc, 7.8 s with tcmalloc and 8.2 s with
jemalloc; a bf16 decode step (B=1) 257 ms against 63 ms. The process re-executes itself once with
``LD_PRELOAD`` set (the loader reads it only at start); PyTorch's CPU tuning guides give the same
advice for the same reason.

``JAXLLM_MALLOC``: unset (find one), ``system`` (never preload), or a library path or soname; a
path that is no file is refused (exit status 2: the loader would only warn and run without it).
Importing this module imports nothing heavy: it runs before JAX is loaded.

Ctrl-C while the command starts (re-executing itself, importing JAX): JAX's and NumPy's extension
modules do not survive a KeyboardInterrupt raised while they initialise (a segmentation fault, an
``ImportError``, or a traceback), so ``main`` holds SIGINT until the CLI's modules are loaded, then
ends with ``jaxllm: interrupted`` and status 130 if one came. A KeyboardInterrupt that a callback
swallows later (printed as "Exception ignored in ...", the command going on) is raised again in the
command's own code.

A thread that may be inside XLA when the command returns (the HTTP server's engine worker, still
compiling after a shutdown) is registered with ``end_hard_while_alive``: the interpreter must not
finalise while it runs, as a daemon thread taking the GIL during finalisation is ended with
``pthread_exit``, whose forced unwind through XLA's C++ frames aborts the process (status 134,
"FATAL: exception not rethrown"). ``main`` then ends the process with ``os._exit`` and its status.
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes.util
import os
import runpy
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from jaxllm.errors import InputError

PRELOADED = "JAXLLM_MALLOC_PRELOADED"  # set in the re-executed process: the library preloaded
# Libraries tried in order, and what each needs in the environment to keep freed pages.
ALLOCATORS: dict[str, dict[str, str]] = {
    "tcmalloc_minimal": {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)},
    "jemalloc": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
}
INTERRUPTED = 128 + signal.SIGINT  # the exit status after Ctrl-C
REDELIVER_S = 0.01  # how long after a swallowed KeyboardInterrupt it is raised again, seconds
_native_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()  # end_hard_while_alive


def preload_env(
    environ: Mapping[str, str],
    find: Callable[[str], str | None] = ctypes.util.find_library,
    platform: str = sys.platform,
) -> dict[str, str] | None:
    """The environment to re-execute with, or None to run as is: on Linux only, once (the new
    environment carries ``JAXLLM_MALLOC_PRELOADED``), unless ``JAXLLM_MALLOC`` is ``system``."""
    choice = environ.get("JAXLLM_MALLOC", "")
    if platform != "linux" or choice == "system" or PRELOADED in environ:
        return None
    if choice:
        if os.sep in choice and not os.path.isfile(choice):
            raise InputError(
                f"JAXLLM_MALLOC={choice}: no such file (give a library's path or soname, or "
                "'system' for no preload)"
            )
        lib, extra = choice, next((v for k, v in ALLOCATORS.items() if k in choice), {})
    else:
        found = [(find(name), extra) for name, extra in ALLOCATORS.items()]
        lib, extra = next(((f, e) for f, e in found if f), (None, {}))
    if lib is None:
        return None
    preload = f"{lib} {environ.get('LD_PRELOAD', '')}".strip()
    return {**environ, **extra, "LD_PRELOAD": preload, PRELOADED: lib}


def preloaded(command: Sequence[str]) -> None:
    """Replace this process by ``python *command`` under the allocator ``preload_env`` picks, if it
    picks one; return otherwise; exit with status 2 and one line when ``JAXLLM_MALLOC`` names no
    file. Scripts call it first (``preloaded([__file__, *sys.argv[1:]])``)."""
    try:
        env = preload_env(os.environ)
    except InputError as err:
        print(f"jaxllm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if env is not None:
        os.execve(sys.executable, [sys.executable, *command], env)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``jaxllm`` command: re-executed under the allocator (``preloaded``), then the CLI; Ctrl-C
    before the CLI runs ends it with status 130 (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    with held_interrupts() as received:
        _reexecute(["-m", "jaxllm", *args], received)
        from jaxllm.cli import main as cli_main
    if received:
        return interrupted()
    try:
        with _unswallowed_interrupts():
            status = cli_main(args)
    except KeyboardInterrupt:  # one raised again after the CLI's own handler could catch it
        status = interrupted()
    _end_if_native_threads_run(status)
    return status


def interrupted() -> int:
    """Say so on stderr; the exit status after Ctrl-C. Also clears CPython's flag of an unhandled
    KeyboardInterrupt: one that passed through ``exec`` of a string (dataclasses build their
    methods so) sets it, though caught later, and the interpreter would then end itself with SIGINT
    (a status of -2 to its parent) instead of exiting 130. Any ``exec`` of a string that raises
    nothing clears it."""
    print("jaxllm: interrupted", file=sys.stderr)
    exec("")
    return INTERRUPTED


@contextlib.contextmanager
def held_interrupts() -> Iterator[list[int]]:
    """While open, SIGINT appends its number to the yielded list instead of raising
    KeyboardInterrupt (in the main thread, unless SIGINT is ignored: then it stays ignored)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:  # e.g. a background job of a shell without job control
        yield received
        return
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def _reexecute(command: Sequence[str], received: list[int]) -> None:
    """``preloaded(command)`` with SIGINT blocked: the mask survives ``execve``, so a Ctrl-C during
    the re-execution waits, pending, for the new process's ``held_interrupts`` instead of killing it
    or raising in its start-up. Unblocked on return (this process's own pending SIGINT, if any, is
    then delivered)."""
    if threading.current_thread() is not threading.main_thread():
        preloaded(command)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        if not received:  # a Ctrl-C already held here would be lost in the new process
            preloaded(command)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def _unswallowed_interrupts() -> Iterator[None]:
    """While open, a KeyboardInterrupt raised where Python can only report it (a garbage-collector
    callback such as JAX's, a ``__del__``) is not printed but raised again in the main thread a
    moment later, as if Ctrl-C came then; one not raised again by the close is raised there."""
    previous = sys.unraisablehook
    lock = threading.Lock()
    pending: list[threading.Timer] = []  # re-deliveries not yet made
    closed = False

    def redeliver(timer: threading.Timer) -> None:
        with lock:
            if not closed and timer in pending:
                pending.remove(timer)
                _thread.interrupt_main()  # the handler runs at the main thread's next bytecode

    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is None or not issubclass(unraisable.exc_type, KeyboardInterrupt):
            previous(unraisable)
            return
        # From another thread: a handler run now would run inside this hook and be swallowed too.
        timer = threading.Timer(REDELIVER_S, lambda: redeliver(timer))
        timer.daemon = True
        with lock:
            pending.append(timer)
        timer.start()

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        with lock:
            closed = True
            missed = bool(pending)
            for timer in pending:
                timer.cancel()
        if missed and sys.exc_info()[0] is None:
            raise KeyboardInterrupt


def end_hard_while_alive(thread: threading.Thread) -> None:
    """Have ``main`` end the process with ``os._exit`` if ``thread`` is still running when the
    command returns (a thread that may be inside XLA: see the module docstring)."""
    _native_threads.add(thread)


def _end_if_native_threads_run(status: int) -> None:
    """``os._exit(status)`` after flushing stdout and stderr if a registered thread still runs."""
    if not any(thread.is_alive() for thread in list(_native_threads)):
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def run_script(argv: Sequence[str]) -> None:
    """``python -m jaxllm.launch SCRIPT [ARGS]``: the script under the allocator (re-executed as
    ``python SCRIPT ARGS``), or here as ``__main__`` when there is none to preload. The Makefile runs
    the experiments so."""
    preloaded(argv)
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    run_script(sys.argv[1:])
