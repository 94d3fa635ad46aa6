"""The command's allocator preload (jaxllm.launch): when it re-executes, with what, and that a
re-executed command still runs; Ctrl-C while the command starts, or swallowed by a callback, ends it
with status 130 and one line."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jaxllm import launch
from jaxllm.errors import InputError
from jaxllm.launch import PRELOADED, preload_env


def _find(found: dict[str, str]):
    return lambda name: found.get(name)


def test_the_first_installed_allocator_is_preloaded_with_its_settings():
    env = preload_env({"LD_PRELOAD": "libx.so"}, _find({"jemalloc": "libjemalloc.so.2"}), "linux")
    assert env is not None
    assert env["LD_PRELOAD"] == "libjemalloc.so.2 libx.so"
    assert env["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert env[PRELOADED] == "libjemalloc.so.2"
    both = {"jemalloc": "libjemalloc.so.2", "tcmalloc_minimal": "libtcmalloc_minimal.so.4"}
    env = preload_env({}, _find(both), "linux")
    assert env is not None and env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"


def test_no_preload_off_linux_when_asked_once_done_or_when_none_is_installed():
    found = _find({"tcmalloc_minimal": "libtcmalloc_minimal.so.4"})
    assert preload_env({}, found, "darwin") is None
    assert preload_env({"JAXLLM_MALLOC": "system"}, found, "linux") is None
    assert preload_env({PRELOADED: "libtcmalloc_minimal.so.4"}, found, "linux") is None
    assert preload_env({}, _find({}), "linux") is None


def test_a_named_library_is_preloaded_as_given(tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so"
    lib.write_bytes(b"")
    env = preload_env({"JAXLLM_MALLOC": str(lib)}, _find({}), "linux")
    assert env is not None and env["LD_PRELOAD"] == str(lib)
    assert "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" in env
    soname = preload_env({"JAXLLM_MALLOC": "libjemalloc.so.2"}, _find({}), "linux")
    assert soname is not None and soname["LD_PRELOAD"] == "libjemalloc.so.2"


def test_a_library_path_that_is_no_file_is_refused_in_one_line(tmp_path):
    """The loader would print a warning and run without the allocator: refused, exit status 2."""
    missing = str(tmp_path / "libmissing.so")
    with pytest.raises(InputError, match=f"JAXLLM_MALLOC={missing}: no such file"):
        preload_env({"JAXLLM_MALLOC": missing}, _find({}), "linux")
    env = {**os.environ, "JAXLLM_MALLOC": missing}
    env.pop(PRELOADED, None)
    done = subprocess.run(
        [sys.executable, "-m", "jaxllm", "info", "--preset", "tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr == f"jaxllm: error: JAXLLM_MALLOC={missing}: no such file " + (
        "(give a library's path or soname, or 'system' for no preload)\n"
    )


def test_the_command_runs_after_re_executing_itself(tmp_path):
    """libc itself stands in for an allocator: the command re-executes once and exits 0."""
    env = {**os.environ, "JAXLLM_MALLOC": "libc.so.6"}
    env.pop(PRELOADED, None)
    done = subprocess.run(
        [sys.executable, "-m", "jaxllm", "info", "--preset", "tiny", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert '"total"' in done.stdout


def test_a_script_runs_as_main_with_its_arguments(tmp_path):
    """``python -m jaxllm.launch SCRIPT ARGS`` (the Makefile's experiments), with and without an
    allocator to preload (libc stands in for one)."""
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint(__name__, sys.argv[1:])\n")
    for choice in ("system", "libc.so.6"):
        env = {**os.environ, "JAXLLM_MALLOC": choice}
        env.pop(PRELOADED, None)
        done = subprocess.run(
            [sys.executable, "-m", "jaxllm.launch", str(script), "a", "--b"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "__main__ ['a', '--b']"


def _run_with_sigint(prelude: str, malloc: str) -> subprocess.CompletedProcess[str]:
    """``jaxllm info`` through ``launch.main`` in a child that runs ``prelude`` first (it arranges
    for the child to send itself SIGINT at a chosen moment)."""
    code = (
        prelude + "\nfrom jaxllm.launch import main\nsys.exit(main(['info', '--preset', 'tiny']))\n"
    )
    env = {**os.environ, "JAXLLM_MALLOC": malloc}
    env.pop(PRELOADED, None)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_ctrl_c_while_jax_loads_is_one_line_and_status_130():
    """SIGINT as the CLI starts importing JAX (whose extension modules crash or raise ImportError
    when interrupted while they initialise): held until the imports end, then one line."""
    prelude = textwrap.dedent("""
        import builtins, os, signal, sys
        real_import = builtins.__import__
        def spy(name, *args, **kwargs):
            if name.startswith("jax") and not name.startswith("jaxllm"):
                builtins.__import__ = real_import
                os.kill(os.getpid(), signal.SIGINT)
            return real_import(name, *args, **kwargs)
        builtins.__import__ = spy
    """)
    done = _run_with_sigint(prelude, "system")
    assert done.returncode == 130, done.stderr
    assert done.stderr == "jaxllm: interrupted\n"
    assert done.stdout == ""  # the command itself never ran


def test_ctrl_c_just_before_the_re_execution_reaches_the_new_process():
    """SIGINT between the decision to re-execute and the exec: blocked across it, it reaches the
    re-executed command's handler (not lost with this process's handler, nor a traceback there)."""
    prelude = textwrap.dedent("""
        import os, signal, sys
        real_execve = os.execve
        def execve(*args):
            os.kill(os.getpid(), signal.SIGINT)
            real_execve(*args)
        os.execve = execve
    """)
    done = _run_with_sigint(prelude, "libc.so.6")
    assert done.returncode == 130, done.stderr
    assert done.stderr == "jaxllm: interrupted\n"


def test_held_interrupts_record_sigint_and_restore_the_handler():
    before = signal.getsignal(signal.SIGINT)
    with launch.held_interrupts() as received:
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.01)
    assert received == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_ctrl_c_that_a_gc_callback_swallows_is_raised_again():
    """A KeyboardInterrupt raised inside a garbage-collector callback (JAX registers one) is only
    printed by Python, and the command goes on; here it is raised again in the main thread."""
    raised = []

    def callback(phase, info):
        del info
        if phase == "start" and not raised:
            raised.append(True)
            raise KeyboardInterrupt

    gc.callbacks.append(callback)
    try:
        with pytest.raises(KeyboardInterrupt), launch._unswallowed_interrupts():
            gc.collect()
            assert raised
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.001)
    finally:
        gc.callbacks.remove(callback)


def test_a_swallowed_ctrl_c_not_raised_again_yet_is_raised_at_the_close():
    """A KeyboardInterrupt in a ``__del__`` just before the command returns."""

    class Interrupted:
        def __del__(self):
            raise KeyboardInterrupt

    hook = sys.unraisablehook
    with pytest.raises(KeyboardInterrupt), launch._unswallowed_interrupts():
        Interrupted()  # collected at once: its KeyboardInterrupt goes to sys.unraisablehook
    assert sys.unraisablehook is hook
    time.sleep(2 * launch.REDELIVER_S)  # the cancelled re-delivery raises nothing later


def test_a_command_ends_at_once_while_a_registered_thread_runs(tmp_path):
    """A thread registered with end_hard_while_alive (the server's engine worker, maybe inside
    XLA) still running when the command returns: os._exit with the status, stdout flushed."""
    code = textwrap.dedent("""
        import sys, threading, time
        from jaxllm import launch, cli
        def command(argv):
            thread = threading.Thread(target=time.sleep, args=(60,), daemon=True)
            launch.end_hard_while_alive(thread)
            thread.start()
            print("done", end="")  # unflushed: a pipe is block-buffered
            return 143
        cli.main = command
        sys.exit(launch.main(["info"]))
    """)
    env = {**os.environ, "JAXLLM_MALLOC": "system"}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 143, done.stderr
    assert done.stdout == "done"
    assert time.monotonic() - start < 50


def test_a_ctrl_c_caught_after_it_passed_through_exec_still_exits_130(tmp_path):
    """CPython flags a KeyboardInterrupt leaving ``exec`` of a string (as one in a dataclass's
    generated ``__init__`` source does) as unhandled, and a ``python -m`` or console-script process
    then ends itself with SIGINT (-2), though the CLI caught it; the CLI clears the flag."""
    (tmp_path / "interrupted_command.py").write_text(
        textwrap.dedent("""
            import sys
            from jaxllm import cli, launch
            def command(args):
                exec("raise KeyboardInterrupt")
            cli.cmd_info = command
            sys.exit(launch.main(["info"]))
        """)
    )
    path = os.pathsep.join([str(tmp_path), *sys.path])
    env = {**os.environ, "JAXLLM_MALLOC": "system", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-m", "interrupted_command"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr == "jaxllm: interrupted\n"
