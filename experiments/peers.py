"""jaxllm beside PyTorch and llama.cpp on this machine: gpt2 train, prefill and decode, interleaved
in one run.

Each round times jaxllm's cells, then the PyTorch peer (``../shared/peers``: ``peer_train.py`` and
``peer_generate.py`` run as subprocesses with the same shapes), then llama.cpp where it is built
(``../shared/peers/llamacpp/setup.sh``: ``llama-bench`` for the prefill, ``llama-batched-bench`` for
decode steps, 2 threads, a random-weight gpt2 in GGUF f32 or bf16; its KV cache is f16, its own
default), then jaxllm's cells again, a group of cells at a time (``Group``), so that load from other
processes hits them alike. The script re-executes itself under the allocator the ``jaxllm`` command
preloads (``jaxllm.launch``), and the peers, its children, inherit it. A cell's figure is the
median over rounds of each round's median (jaxllm's: the mean of its two timings); the ratio is
jaxllm's speed over the peer's (> 1: jaxllm faster), the median of each round's ratio. Writes
``peers-cpu.csv`` and ``peers-cpu.md`` to --out.

Shapes (the issue's table): train B=4 T=256 (f32, and bf16 compute with f32 master weights: torch
bf16 autocast; jaxllm's layers compiled as ``jaxllm train`` compiles them here,
``jaxllm.train.training_config``); prefill B=1 T=1024 f32; decode B = 1, 8, 32 at a mean context of 96 (64-token prompt,
64 new) and B = 1, 32 at 1008 (1000-token prompt, 16 new), f32 and bf16 (bf16 weights on both sides;
PyTorch keeps its KV cache in bf16, jaxllm on a CPU in float32: ``jaxllm.cache.cache_dtype``). A
jaxllm decode step runs at the mean context in the cache ``jaxllm.generate`` would hold then (its
phase's size, ``jaxllm.generate.windows`` of a 1024-slot generation); the peer attends its filled
slots of a 1024-slot cache. ``generate`` (the on-device
loop) is timed at context 96 as well, per decode step, against the standalone step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm import analytic, hardware, launch, products, serve, train
from jaxllm.cache import KVCache
from jaxllm.config import PRESETS, ModelConfig
from jaxllm.experiment import write_csv
from jaxllm.generate import generate, windows
from jaxllm.model import init_params
from jaxllm.timing import time_compiled

PEERS = Path(os.environ.get("PEERS_DIR", Path(__file__).resolve().parents[2] / "shared" / "peers"))
PEER_PYTHON = os.environ.get("PEER_PYTHON", "/tmp/peerenv/bin/python")
LLAMA_BIN = Path(os.environ.get("LLAMACPP_BIN", "/tmp/llamacpp/src/build/bin"))
GGUF_DIR = Path(os.environ.get("GGUF_DIR", "/tmp/llamacpp/gguf"))
GPT2 = ["--n-layer", "12", "--n-head", "12", "--d-model", "768", "--vocab", "50257"]
DTYPES = ("float32", "bfloat16")
# Mean context -> (prompt, new tokens) the peer runs, and the batch sizes timed there.
CONTEXTS = {96: ((64, 64), (1, 8, 32)), 1008: ((1000, 16), (1, 32))}
CAPACITY = 1024


# Seconds of untimed calls before a jaxllm cell is timed. The peers time a continuous run of steps
# (PyTorch's 64-token generation, llama-batched-bench's), so a step's first calls after another
# process ran weigh little in their medians; jaxllm's cells time a few calls. On the 2-core Zen 5
# VM, gpt2's bf16 decode step at B=1 took 6.5-15.6 ms (most near 10) in its first five calls after
# 8 s idle, and 6.3-7.3 ms (medians) after 0.3 s of calls (round 17); round 17's first run, with one
# warm-up call, timed that step at 6.1-8.6 ms before the peers and 8.8-10.4 ms right after them.
WARM_S = 0.5
# Idle seconds after a peer's process exits, before the next timed section (llama.cpp's run, or
# jaxllm's cells again). A peer starts timing seconds after jaxllm's cells stop (importing torch,
# building its model); jaxllm's cells started the instant a peer exited. gpt2's bf16 train step
# (2-core Zen 5 VM, round 18, twice each): its first six steps right after the PyTorch peer's bf16
# train exited had medians of 1.39 and 1.30 s; after 3 s idle 1.29 and 1.29 s, after 10 s 1.29 and
# 1.28 s; with no peer run 1.28 s.
SETTLE_S = 3.0


def _times(fn: Callable[..., Any], repeats: int, args: Callable[[], tuple] = tuple) -> float:
    """Median seconds of ``repeats`` calls ``fn(*args())`` (``jaxllm.timing.time_compiled``:
    ``args()`` made before the clock starts), after such calls for ``WARM_S`` seconds (one at
    least) untimed."""
    begin = time.perf_counter()
    jax.block_until_ready(fn(*args()))
    while time.perf_counter() - begin < WARM_S:
        jax.block_until_ready(fn(*args()))
    return time_compiled(fn, args, repeats=repeats, warmup=0).seconds_median


def _gpt2(dtype: str) -> ModelConfig:
    return PRESETS["gpt2"].replace(dtype=dtype)


def jax_train(dtype: str, steps: int) -> Callable[[], float]:
    config = train.training_config(_gpt2(dtype))
    optimizer = train.make_optimizer()
    step = train.make_train_step(config, optimizer)
    state = train.init_state(config, optimizer, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (4, 257), 0, config.vocab_size, jnp.int32)
    box = [step.lower(state, batch).compile(), state]

    def once() -> Any:
        box[1], metrics = box[0](box[1], batch)
        return metrics["loss"]

    return lambda: _times(once, steps)


@functools.cache
def _served(dtype: str) -> tuple[ModelConfig, Any]:
    """gpt2 as ``jaxllm.generate`` serves it (unrolled layers, weights in the compute dtype)."""
    return serve.for_serving(_gpt2(dtype), init_params(_gpt2(dtype), jax.random.key(0)))


def jax_prefill(steps: int) -> Callable[[], float]:
    config, params = _served("float32")
    tokens, pad = jnp.ones((1, 1024), jnp.int32), jnp.zeros((1,), jnp.int32)
    cache = jax.eval_shape(lambda: KVCache.init(config, 1, 1024))
    compiled = serve.make_prefill(config).lower(params, cache, tokens, pad).compile()
    return lambda: _times(
        lambda: compiled(params, KVCache.init(config, 1, 1024), tokens, pad)[0], steps
    )


def jax_decode(dtype: str, batch: int, context: int, steps: int) -> Callable[[], float]:
    """A decode step completing ``context`` tokens, in the cache generate would hold then."""
    config, params = _served(dtype)
    slots = next(w for w in windows(64, CAPACITY) if w >= context)
    cache = jax.eval_shape(lambda: KVCache.init(config, batch, slots))
    tokens = jnp.ones((batch,), jnp.int32)
    compiled = serve.make_decode_step(config).jitted.lower(params, cache, tokens).compile()

    def timed() -> float:
        box = [KVCache.init(config, batch, slots)]

        def once(index: jax.Array) -> Any:
            logits, box[0] = compiled(params, box[0].replace(index=index), tokens)
            return logits

        # The slot each call writes, made before the clock starts: the call consumes (donates) it.
        return _times(once, steps, lambda: (jnp.int32(context - 1),))

    return timed


def jax_generate(dtype: str, batch: int) -> Callable[[], float]:
    """Seconds per decode step of ``jaxllm.generate``'s on-device loop: 64-token prompts, 64 new."""
    config, params = _served(dtype)
    prompts = [list(range(1, 65))] * batch

    def once() -> float:
        gen = generate(config, params, prompts, 64)
        return gen.decode_s / gen.decode_steps

    once()  # compiles
    return once


def _peer(script: str, *args: str) -> list[dict[str, Any]]:
    cmd = [PEER_PYTHON, str(PEERS / script), *GPT2, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=PEERS)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def peer_train(dtype: str, steps: int) -> float:
    """PyTorch's seconds per train step. Its bf16 autocast step runs for minutes on a CPU without
    bf16 arithmetic (365 s, nearly all of it backward, on the 2-core AVX2 VM), so there it is
    timed once, without a warm-up step."""
    precision = "fp32" if dtype == "float32" else "bf16-autocast"
    warmup = 0 if dtype == "bfloat16" and products.widens_products(jnp.bfloat16) else 1
    steps = 1 if warmup == 0 else steps
    args = ["--seq", "256", "--batch", "4", "--steps", str(steps), "--warmup", str(warmup)]
    (rec,) = [
        r for r in _peer("peer_train.py", *args, "--precision", precision) if r["kind"] == "train"
    ]
    return rec["step_seconds"]["median"]


def peer_prefill(steps: int) -> float:
    args = ["--n-positions", "1024", "--prefill-len", "1024", "--prefill-batches", "1"]
    args += ["--prefill-repeats", str(steps), "--prefill-variants", "own", "--batch-sizes", ""]
    (rec,) = [r for r in _peer("peer_generate.py", *args) if r["kind"] == "prefill"]
    return rec["seconds"]["median"]


def peer_decode(dtype: str, context: int) -> dict[int, float]:
    """Median seconds per decode step by batch size (the peer's own model, filled slots attended)."""
    (prompt, gen), batches = CONTEXTS[context]
    args = ["--n-positions", "1024", "--decode-prompt", str(prompt), "--gen", str(gen)]
    args += ["--batch-sizes", ",".join(map(str, batches)), "--methods", "own_loop"]
    args += ["--repeats", "1", "--prefill-batches", "", "--cache-capacity", str(CAPACITY)]
    args += ["--precision", "fp32" if dtype == "float32" else "bf16"]
    recs = [r for r in _peer("peer_generate.py", *args) if r["kind"] == "decode"]
    return {r["config"]["batch"]: r["step_seconds"]["median"] for r in recs}


def _llama(tool: str, dtype: str, *args: str) -> list[dict[str, Any]]:
    """JSON records of a llama.cpp benchmark of gpt2 in ``dtype`` (2 threads)."""
    model = GGUF_DIR / f"gpt2-{'f32' if dtype == 'float32' else 'bf16'}.gguf"
    cmd = [str(LLAMA_BIN / tool), "-m", str(model), "-t", "2", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    text = done.stdout.strip()
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


def llama_prefill(steps: int) -> float:
    """Seconds of one 1024-token prompt (llama-bench's mean over ``steps`` repeats)."""
    (rec,) = _llama(
        "llama-bench", "float32", "-p", "1024", "-n", "0", "-r", str(steps), "-o", "json"
    )
    return 1024 / rec["avg_ts"]


def llama_decode(dtype: str, context: int) -> dict[int, float]:
    """Seconds per decode step by batch size: B sequences, each a (prompt, new) pair of CONTEXTS,
    the step time being llama-batched-bench's generation time over its new tokens."""
    (prompt, gen), batches = CONTEXTS[context]
    size = max(batches) * (prompt + gen)
    args = ["-c", str(size), "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(gen)]
    args += ["-npl", ",".join(map(str, batches)), "--output-format", "jsonl"]
    recs = [r for r in _llama("llama-batched-bench", dtype, *args) if "t_tg" in r]
    return {r["pl"]: r["t_tg"] / r["tg"] for r in recs}


HAVE_LLAMA = (LLAMA_BIN / "llama-batched-bench").exists() and (GGUF_DIR / "gpt2-f32.gguf").exists()


@dataclasses.dataclass
class Group:
    """Cells timed around one run of each peer: jaxllm's cells, then the PyTorch peer, then
    llama.cpp, then jaxllm's cells again (cells decoding one dtype at one context share a peer
    process, and a llama.cpp one)."""

    cells: list[tuple[str, Callable[[], Callable[[], float]]]]  # (name, builder of jaxllm's timer)
    peer: Callable[[], dict[str, float]]  # PyTorch's seconds by cell
    # llama.cpp's by cell (a cell it does not run: absent); None where it runs none of the group's cells
    llama: Callable[[], dict[str, float]] | None


def groups(args: argparse.Namespace) -> list[Group]:
    """The groups in the order a round runs them. Builders compile. llama.cpp has no training;
    without its build, no column."""
    out = [
        Group(
            [(f"train {d} B=4 T=256", lambda d=d: jax_train(d, args.steps))],
            lambda d=d: {f"train {d} B=4 T=256": peer_train(d, args.steps)},
            None,
        )
        for d in DTYPES
    ]
    name = "prefill float32 B=1 T=1024"
    out.append(
        Group(
            [(name, lambda: jax_prefill(args.steps))],
            lambda: {name: peer_prefill(args.steps)},
            (lambda: {name: llama_prefill(args.steps)}) if HAVE_LLAMA else None,
        )
    )
    for dtype in DTYPES:
        for context, (_, batches) in CONTEXTS.items():
            out.append(_decode_group(args, dtype, context, batches))
    return out


def _decode_group(
    args: argparse.Namespace, dtype: str, context: int, batches: tuple[int, ...]
) -> Group:
    """Decode steps at each batch size, and ``generate``'s (at context 96, --generate-batches)
    beside the peers' step at the same batch size."""
    cells: list[tuple[str, Callable[[], Callable[[], float]]]] = []
    theirs: dict[str, int] = {}  # cell -> the peers' batch size
    for b in batches:
        name = f"decode {dtype} B={b} context {context}"
        cells.append((name, lambda b=b: jax_decode(dtype, b, context, args.decode_steps)))
        theirs[name] = b
        if context == 96 and b in args.generate_batches:
            name = f"generate {dtype} B={b} context 64-128"
            cells.append((name, lambda b=b: jax_generate(dtype, b)))
            theirs[name] = b

    def by_cell(run: Callable[[str, int], dict[int, float]]) -> Callable[[], dict[str, float]]:
        """One run of a peer (``run(dtype, context)``: seconds by batch size) -> seconds by cell."""

        def seconds() -> dict[str, float]:
            by_batch = run(dtype, context)
            return {name: by_batch[b] for name, b in theirs.items()}

        return seconds

    return Group(cells, by_cell(peer_decode), by_cell(llama_decode) if HAVE_LLAMA else None)


LINE = re.compile(r"round (\d+) (.+): jaxllm (\S+) s, PyTorch (\S+) s(?:, llama.cpp (\S+) s)?")
# cell -> (jaxllm seconds, PyTorch seconds, llama.cpp seconds or None) by round
Times = dict[str, tuple[list[float], list[float], list[float | None]]]


def _round(group: Group, timers: dict[str, Callable[[], float]]) -> tuple[dict[str, float], ...]:
    """One round of a group: jaxllm's seconds by cell before the peers ran, PyTorch's, llama.cpp's
    (a cell it does not run: absent), and jaxllm's after, each peer's process followed by
    ``SETTLE_S`` seconds idle. jaxllm's figure is the mean of its two,
    so that a change in the shared machine's speed while the peers ran (measured: the same
    compiled step at 65 ms, then 85 ms, a few seconds apart) weighs on both sides alike."""
    before = {name: timers[name]() for name, _ in group.cells}
    peer = _settled(group.peer)
    llama = {} if group.llama is None else _settled(group.llama)
    after = {name: timers[name]() for name, _ in group.cells}
    return before, peer, llama, after


def _settled(run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``run()`` (a peer's process), then ``SETTLE_S`` seconds idle."""
    out = run()
    time.sleep(SETTLE_S)
    return out


def main(argv: list[str] | None = None) -> None:
    # The allocator the jaxllm command runs under, inherited by the PyTorch peer and llama.cpp.
    launch.preloaded([__file__, *(sys.argv[1:] if argv is None else argv)])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--steps", type=int, default=3, help="timed train steps / prefills per round"
    )
    parser.add_argument("--decode-steps", type=int, default=7, help="timed decode steps per round")
    parser.add_argument("--generate-batches", type=int, nargs="*", default=[1])
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument(
        "--only", nargs="*", help="run only the cells whose name holds one of these"
    )
    parser.add_argument(
        "--from-log",
        type=Path,
        nargs="+",
        help="rebuild the tables from the stderr of earlier runs",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_log:
        times: Times = {}
        for log in args.from_log:
            for line in log.read_text().splitlines():
                if m := LINE.match(line):
                    mine, torch, llama = times.setdefault(m.group(2), ([], [], []))
                    mine.append(float(m.group(3)))
                    torch.append(float(m.group(4)))
                    llama.append(None if m.group(5) in (None, "-") else float(m.group(5)))
        names = ", ".join(log.name for log in args.from_log)
        _write(args, times, f"rebuilt from the logs of runs ({names})")
        return

    def chosen(name: str) -> bool:
        return not args.only or any(w in name for w in args.only)

    every = groups(args)
    names = [n for group in every for n, _ in group.cells]
    if not any(map(chosen, names)):
        parser.error(f"--only {' '.join(args.only)} names no cell; the cells: {', '.join(names)}")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    todo = []
    for group in every:
        cells = [(n, b) for n, b in group.cells if chosen(n)]
        if cells:
            todo.append((dataclasses.replace(group, cells=cells), {n: b() for n, b in cells}))
    times: Times = {}
    for r in range(args.rounds):
        for group, timers in todo:
            before, peer, llama, after = _round(group, timers)
            for name in timers:
                j0, j1, p, q = before[name], after[name], peer[name], llama.get(name)
                j = (j0 + j1) / 2
                mine_s, torch_s, llama_s = times.setdefault(name, ([], [], []))
                mine_s.append(j)
                torch_s.append(p)
                llama_s.append(q)
                print(
                    f"round {r} {name}: jaxllm {j:.6g} s, PyTorch {p:.6g} s, llama.cpp "
                    f"{'-' if q is None else f'{q:.6g}'} s (jaxllm before the peers {j0:.6g} s, "
                    f"after {j1:.6g} s)",
                    file=sys.stderr,
                    flush=True,
                )
            _write(args, times, f"run started {started}")  # a cut-off run leaves what it measured


def _spread(xs: list[float]) -> str:
    return f"{min(xs):.4g}-{max(xs):.4g}"


def matmul_floor(cell: str, calibration: dict[str, Any]) -> float | None:
    """Seconds a train-step or prefill cell would take if all of jaxllm's FLOPs for it
    (``jaxllm.analytic``) ran at the calibrated matmul peak of its dtype: the floor of a
    compute-bound phase. None for decode cells (memory-bound)."""
    kind, dtype = cell.split()[:2]
    config = _gpt2(dtype)
    if kind == "train":
        flops = analytic.train_flops(train.training_config(config), 4, 256)
    elif kind == "prefill":
        flops = analytic.prefill_flops(config, 1, 1024, head_positions=1)
    else:
        return None
    return flops / calibration[hardware.matmul_key(calibration, dtype)]


def _ratios(theirs: Sequence[float | None], mine: Sequence[float]) -> list[float]:
    """Each round's speed ratio, jaxllm's over the peer's (the peer's seconds over jaxllm's), where
    the peer ran."""
    return [t / j for t, j in zip(theirs, mine, strict=True) if t is not None]


def _write(args: argparse.Namespace, times: Times, when: str) -> None:
    rows = []
    calibration = hardware.calibrate()
    for name, (mine, torch, llama) in times.items():
        j, p = statistics.median(mine), statistics.median(torch)
        q = [x for x in llama if x is not None]
        ll = statistics.median(q) if q else None
        to_torch, to_llama = _ratios(torch, mine), _ratios(llama, mine)
        floor = matmul_floor(name, calibration)
        rows.append(
            {
                "cell": name,
                "jaxllm_s": j,
                "pytorch_s": p,
                "speed_ratio": statistics.median(to_torch),
                "llamacpp_s": ll,
                "llamacpp_speed_ratio": statistics.median(to_llama) if to_llama else None,
                "matmul_floor_s": floor,
                "jaxllm_of_matmul_peak": None if floor is None else floor / j,
                "pytorch_of_matmul_peak": None if floor is None else floor / p,
                "rounds": len(mine),
                "jaxllm_spread": _spread(mine),
                "pytorch_spread": _spread(torch),
                "llamacpp_spread": _spread(q) if q else "",
                "pytorch_ratio_spread": _spread(to_torch),
                "llamacpp_ratio_spread": _spread(to_llama) if to_llama else "",
            }
        )
    write_csv(args.out / "peers-cpu.csv", rows)
    (args.out / "peers-cpu.md").write_text(_markdown(rows, when, calibration))


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def cpu_name() -> str:
    """The CPU's model and family (Linux's cpuinfo) and whether it has bf16 arithmetic."""
    fields = products.cpu_info()
    name = fields.get("model name") or platform.processor() or platform.machine()
    family = f" (family {fields['cpu family']})" if "cpu family" in fields else ""
    bf16 = "with" if products.library_products(jnp.bfloat16) else "without"
    return f"{name}{family} {bf16} bf16 arithmetic"


def _markdown(rows: list[dict[str, Any]], when: str, calibration: dict[str, Any]) -> str:
    load = os.getloadavg()
    lines = [
        "# jaxllm beside PyTorch and llama.cpp on this CPU (generated by experiments/peers.py)",
        "",
        f"{when.capitalize()}; {cpu_name()}, {os.cpu_count()} "
        f"cores, jax {jax.__version__}; load average when written {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (the machine is shared: compare only ratios within this run). Seconds per "
        "train step, per prefill, per decode step; each the median over the rounds (column `rounds` "
        "of the CSV) of each round's median. In each round jaxllm's cells are timed, then the PyTorch "
        "peer, then llama.cpp, then jaxllm's cells again: jaxllm's figure for the round is the mean "
        "of the two. Ratios = jaxllm's speed / the peer's (> 1: jaxllm faster), the median over the "
        "rounds of each round's ratio, with their range. `generate` rows: the "
        "on-device loop's seconds per decode step (contexts 64 to 128) beside the peers' step at "
        "context 96. jaxllm trains as `jaxllm train` compiles here (`jaxllm.train.training_config`). "
        "llama.cpp: 2 threads, its KV cache in f16; no training. Allocator preloaded "
        f"for all three (`jaxllm.launch`): {os.environ.get(launch.PRELOADED, 'none (glibc)')}.",
        "",
        "Matmul floor (train and prefill, compute-bound): jaxllm's FLOPs for the cell "
        "(`jaxllm.analytic`) at the calibrated matmul peak of its dtype "
        f"({calibration['f32_flops_per_s'] / 1e9:.0f} GFLOP/s f32, "
        f"{calibration['bf16_flops_per_s'] / 1e9:.0f} bf16 inputs, calibrated "
        f"{calibration['date'][:16]}); 'of peak' is that floor over each side's time.",
        "",
        "| cell | jaxllm (s) | PyTorch (s) | jaxllm / PyTorch speed | llama.cpp (s) "
        "| jaxllm / llama.cpp speed | matmul floor (s) | jaxllm of peak | PyTorch of peak "
        "| jaxllm range | PyTorch range | llama.cpp range | ratio range, PyTorch "
        "| ratio range, llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ll, lr = r["llamacpp_s"], r["llamacpp_speed_ratio"]
        lines.append(
            f"| {r['cell']} | {r['jaxllm_s']:.4g} | {r['pytorch_s']:.4g} | {r['speed_ratio']:.2f}× | "
            f"{'—' if ll is None else f'{ll:.4g}'} | {'—' if lr is None else f'{lr:.2f}×'} | "
            f"{_num(r['matmul_floor_s'])} | "
            f"{_pct(r['jaxllm_of_matmul_peak'])} | {_pct(r['pytorch_of_matmul_peak'])} | "
            f"{r['jaxllm_spread']} | {r['pytorch_spread']} | {r['llamacpp_spread'] or '—'} | "
            f"{r['pytorch_ratio_spread']} | {r['llamacpp_ratio_spread'] or '—'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
