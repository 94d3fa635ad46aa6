"""HTTP load test of ``jaxllm serve``: what the server adds to the engine's own figures.

    python experiments/http_load.py [--clients 1 4 16 64] [--duration 8] [--quick]

The server (chunked policy, 8 slots, a queue of 64; random weights of the preset: speed does not
depend on them; no stop token, so every request generates exactly --output-len tokens) runs in this
process on a free loopback port. For each N, experiments/http_clients.py (another process) runs N
closed-loop streaming clients for --duration seconds: each sends its next request when the last
completes. Client-side figures: generated tokens per second of the level, time to first token (TTFT,
send to first streamed token) and time between tokens (TBT), errors and 429s. First, a burst of
slots + max-queue + 8 requests at once shows where the queue starts refusing.

Right after each level (the machine's load drifts), the engine alone (no HTTP; the server stopped)
runs twice in this process: the same closed loop of N
clients (each submits its next request when the last ends; prompts and lengths alike), which isolates
what HTTP, JSON, the event loop and the client process cost on this machine; and
``jaxllm.servebench.replay`` of a trace of as many requests arriving as a Poisson process at the
request rate the HTTP level measured (open loop: the queue, so TTFT, is shorter than a closed loop of
N keeps it). ``engine busy`` is the share of the wall time spent in engine steps; ``ms/step`` their
mean (steps run beside the event loop over HTTP, and share the 2 cores with it and the clients).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxllm import data, experiment, servebench, server, traces
from jaxllm.engine import Engine, Request
from jaxllm.model import init_params
from jaxllm.server_service import Limits, ServedModel, Service

CLIENTS = Path(__file__).with_name("http_clients.py")
SLOTS, MAX_QUEUE, CHUNK = 8, 64, 64


def _extra(parser: Any) -> None:
    parser.add_argument("--clients", type=int, nargs="+", help="N per level (default: 1 4 16 64)")
    parser.add_argument("--duration", type=float, help="seconds each level sends (default: 8)")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens (default: 32)")
    parser.add_argument("--output-len", type=int, help="tokens per request (default: 64)")


@contextlib.contextmanager
def serving(engine: Engine, name: str) -> Iterator[tuple[str, Service]]:
    """The server in this process, ready (its programs compiled)."""
    service = Service(engine, ServedModel(name, data, ()), Limits(max_queue=MAX_QUEUE))
    with server.background(service) as (url, _):
        while service.state == "starting":
            time.sleep(0.05)
        if service.state != "ready":
            raise RuntimeError(f"the server did not start: {service.state} {service.error}")
        yield url, service


def clients(url: str, *argv: str, timeout: float) -> dict[str, Any]:
    """Run experiments/http_clients.py and parse its JSON."""
    cmd = [sys.executable, str(CLIENTS), url, *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(out.stdout)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def http_level(url: str, engine: Engine, n: int, args: Any) -> dict[str, Any]:
    """N closed-loop clients for ``args.duration`` seconds: client-side figures."""
    first = len(engine.records)
    lengths = ["--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len)]
    argv = ["closed", "--clients", str(n), "--duration", str(args.duration), *lengths]
    out = clients(url, *argv, timeout=args.duration + 600)
    done = [r for r in out["requests"] if r["status"] == 200]
    start = min(r["start"] for r in out["requests"])
    end = max(r["tokens"][-1] for r in done)
    wall = end - start
    tokens = sum(len(r["tokens"]) for r in done)
    statuses = [r["status"] for r in out["requests"]]
    steps = list(engine.records)[first:]
    return {
        "clients": n,
        "requests": len(done),
        "generated_tokens": tokens,
        "seconds": wall,
        "request_rate": len(done) / wall,
        "tokens_per_s": tokens / wall,
        "ttft_s": percentiles([r["tokens"][0] - r["start"] for r in done]),
        "tbt_s": percentiles([float(d) for r in done for d in np.diff(r["tokens"])]),
        "e2e_s": percentiles([r["tokens"][-1] - r["start"] for r in done]),
        "refused_429": statuses.count(429),
        "errors": len(statuses) - statuses.count(200) - statuses.count(429),
        "short": sum(len(r["tokens"]) != args.output_len for r in done),
        **_step_figures(steps, wall),
    }


def _step_figures(steps: list[Any], wall: float) -> dict[str, float]:
    seconds = sum(s.seconds for s in steps)
    return {"engine_busy": seconds / wall, "ms_per_step": 1e3 * seconds / max(len(steps), 1)}


def engine_closed_level(engine: Engine, n: int, args: Any) -> dict[str, Any]:
    """The HTTP level's closed loop on the engine directly: N requests in flight, each replaced by
    the next when it ends, until ``args.duration`` seconds have passed."""
    rng = np.random.default_rng(2)

    def submit() -> Request:
        return engine.submit(rng.integers(0, 256, args.prompt_len), args.output_len)

    first, start = len(engine.records), engine.clock()
    flight: list[Request | None] = [submit() for _ in range(n)]
    done: list[Request] = []
    while not engine.idle:
        engine.step()
        for i, r in enumerate(flight):
            if r is not None and r.finish is not None:
                done.append(r)
                flight[i] = submit() if engine.clock() - start < args.duration else None
    wall = max(r.times[-1] for r in done) - start
    tokens = sum(len(r.tokens) for r in done)
    return {
        "requests": len(done),
        "tokens_per_s": tokens / wall,
        "ttft_s": percentiles([r.times[0] - r.submitted for r in done]),
        "tbt_s": percentiles([float(d) for r in done for d in np.diff(r.times)]),
        "e2e_s": percentiles([r.times[-1] - r.submitted for r in done]),
        **_step_figures(list(engine.records)[first:], wall),
    }


def offline_level(engine: Engine, level: dict[str, Any], args: Any) -> dict[str, Any]:
    """The engine alone on a Poisson trace of the level's request count and rate."""
    trace = traces.make_trace(
        level["requests"], level["request_rate"], [args.prompt_len], [args.output_len], seed=1
    )
    first = len(engine.records)
    run = servebench.replay(engine, trace)
    summary = servebench.summarize(engine, run)
    return {
        "requests": summary["requests"],
        "rate": level["request_rate"],
        "tokens_per_s": summary["tokens_per_s"],
        "ttft_s": {k: summary["ttft_s"][k] for k in ("p50", "p99")},
        "tbt_s": {k: summary["tbt_s"][k] for k in ("p50", "p99")},
        "e2e_s": {k: summary["e2e_s"][k] for k in ("p50", "p99")},
        **_step_figures(list(engine.records)[first:], summary["makespan_s"]),
    }


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{1e3 * value:.0f}"


def _pair(figures: dict[str, float | None]) -> str:
    return f"{_ms(figures['p50'])} / {_ms(figures['p99'])}"


def closed_table(rows: list[dict[str, Any]]) -> list[str]:
    """HTTP against the engine alone, the same closed loop of N clients."""
    lines = [
        "| N | requests HTTP / engine | tokens/s HTTP / engine | TTFT p50 / p99 ms HTTP | "
        "TTFT p50 / p99 ms engine | TBT p50 / p99 ms HTTP | TBT p50 / p99 ms engine | "
        "ms/step HTTP / engine | engine busy HTTP / engine | errors | 429s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        h, e = r["http"], r["engine_closed"]
        lines.append(
            f"| {h['clients']} | {h['requests']} / {e['requests']} | "
            f"{h['tokens_per_s']:.0f} / {e['tokens_per_s']:.0f} | {_pair(h['ttft_s'])} | "
            f"{_pair(e['ttft_s'])} | {_pair(h['tbt_s'])} | {_pair(e['tbt_s'])} | "
            f"{h['ms_per_step']:.1f} / {e['ms_per_step']:.1f} | "
            f"{h['engine_busy']:.0%} / {e['engine_busy']:.0%} | {h['errors']} | {h['refused_429']} |"
        )
    return lines


def overhead(rows: list[dict[str, Any]]) -> list[str]:
    """What HTTP costs, in words: tokens/s shares, and the latency it adds without a queue."""
    shares = ", ".join(
        f"N={r['http']['clients']}: {r['http']['tokens_per_s'] / r['engine_closed']['tokens_per_s']:.0%}"
        for r in rows
    )
    h, e = rows[0]["http"], rows[0]["engine_closed"]
    medians = {k: (1e3 * h[k]["p50"], 1e3 * e[k]["p50"]) for k in ("ttft_s", "tbt_s", "e2e_s")}
    over, alone = zip(*medians.values(), strict=True)
    return [
        f"- Tokens/s over HTTP as a share of the engine's alone on the same closed loop: {shares}.",
        f"- At N={h['clients']} (no queue), medians over HTTP against alone: TTFT {over[0]:.1f} / "
        f"{alone[0]:.1f} ms, TBT {over[1]:.1f} / {alone[1]:.1f} ms, request {over[2]:.0f} / "
        f"{alone[2]:.0f} ms. With N above the {SLOTS} slots, TTFT is mostly the wait for a slot, "
        "over HTTP and alone. The ms/step columns show how far the machine's load moved between "
        "the two runs: differences of that size are load, not HTTP.",
    ]


def replay_table(rows: list[dict[str, Any]]) -> list[str]:
    """The engine's offline replay at each HTTP level's request rate."""
    lines = [
        "| N (HTTP level) | requests | rate req/s | tokens/s HTTP / replay | TTFT p50 / p99 ms replay | "
        "TBT p50 / p99 ms replay | ms/step replay |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        h, o = r["http"], r["replay"]
        lines.append(
            f"| {h['clients']} | {o['requests']} | {o['rate']:.1f} | "
            f"{h['tokens_per_s']:.0f} / {o['tokens_per_s']:.0f} | {_pair(o['ttft_s'])} | "
            f"{_pair(o['tbt_s'])} | {o['ms_per_step']:.1f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = experiment.parse_args("http_load", __doc__, argv, extra=_extra)
    args.clients = args.clients or ([1, 4] if args.quick else [1, 4, 16, 64])
    args.duration = args.duration or (2.0 if args.quick else 8.0)
    args.prompt_len = args.prompt_len or (8 if args.quick else 32)
    args.output_len = args.output_len or (16 if args.quick else 64)
    load_before = os.getloadavg()
    config = experiment.model_config(args.preset, args.dtype)
    engine = Engine(
        config, init_params(config, jax.random.key(0)), slots=SLOTS, policy="chunked", chunk=CHUNK
    )
    started = time.perf_counter()
    with serving(engine, args.preset) as (url, service):  # the first start compiles
        compile_s = service.compile_s
        print(f"server ready in {time.perf_counter() - started:.1f} s at {url}", flush=True)
        limit = SLOTS + MAX_QUEUE
        lengths = ["--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len)]
        burst = clients(url, "burst", "--requests", str(limit + 8), *lengths, timeout=600)
        print(f"burst: {json.dumps(burst)}", flush=True)
    rows = []
    for n in args.clients:  # each N over HTTP, then alone, back to back: the machine's load drifts
        with serving(engine, args.preset) as (url, _):
            level = http_level(url, engine, n, args)
        closed = engine_closed_level(engine, n, args)
        rows.append(
            {"http": level, "engine_closed": closed, "replay": offline_level(engine, level, args)}
        )
        print(f"N={n}: {json.dumps(rows[-1])}", flush=True)
    load_after = os.getloadavg()
    setup = {
        "preset": args.preset,
        "policy": "chunked",
        "chunk": CHUNK,
        "slots": SLOTS,
        "max_queue": MAX_QUEUE,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "duration_s": args.duration,
        "compile_s": compile_s,
        "cpus": os.cpu_count(),
        "load_average_1min_before_after": [load_before[0], load_after[0]],
    }
    experiment.write_json(args.out / "data.json", {"setup": setup, "levels": rows, "burst": burst})
    experiment.write_summary(
        args.out / "summary.md",
        f"HTTP load test — {args.preset}, {SLOTS} slots, chunked policy",
        [
            f"- Closed-loop streaming clients, {args.duration:.0f} s per level; prompts of "
            f"{args.prompt_len} random token ids, {args.output_len} greedy tokens each (no stop "
            f"token). Server and clients on the same {os.cpu_count()}-CPU machine, load average "
            f"{load_before[0]:.1f} before and {load_after[0]:.1f} after. Server start "
            f"(`Engine.compile_programs`): {compile_s:.1f} s.",
            "- HTTP: measured by the clients (send to first streamed token; between streamed "
            "tokens). Engine: the same closed loop on the engine in-process (from submit).",
            "",
            *closed_table(rows),
            "",
            *overhead(rows),
            "",
            "- The engine's offline replay (`servebench.replay`, times from arrival) of a Poisson "
            "trace of as many requests at the request rate each HTTP level measured:",
            "",
            *replay_table(rows),
            "",
            f"- Burst of {burst['sent']} requests at once: {burst['admitted']} admitted, "
            f"{burst['refused']} refused with 429, {burst['other']} other; the limit is slots + "
            f"max-queue = {limit} requests in the server, so refusals start at request {limit + 1}.",
        ],
    )
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
