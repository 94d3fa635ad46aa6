"""Streaming clients of ``jaxllm serve`` for the HTTP load test (run by experiments/http_load.py).

    python experiments/http_clients.py URL closed --clients N --duration S --prompt-len P --output-len O
    python experiments/http_clients.py URL burst --requests K --prompt-len P --output-len O

``closed``: N clients, each sending a streamed completion (a seeded random prompt of P token ids,
O tokens, greedy) and its next one as soon as the last completes, until S seconds have passed; the
requests still in flight then finish. A 429 waits its Retry-After and counts as refused. Prints one
JSON object: ``requests``, each ``{"status", "start", "tokens": [seconds of each token]}`` on one
clock (``time.perf_counter``), and the seconds the level took.

``burst``: K streamed requests sent at once and held open (each for O tokens), then closed; prints
how many were admitted (200) and refused (429): where the queue starts refusing.

Traffic goes to the loopback address only (127.0.0.0/8, localhost, ::1); every loop is bounded by
the duration, the request count and a per-request timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

REQUEST_TIMEOUT_S = 300.0  # the longest one request may take before it counts as an error
VOCAB = 256  # prompt ids are drawn from the byte range, valid in every jaxllm model


def check_loopback(url: str) -> None:
    """ValueError unless ``url`` names a loopback host."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the load test targets loopback addresses only, got host {host!r}")


def body(rng: np.random.Generator, prompt_len: int, output_len: int) -> dict[str, Any]:
    prompt = rng.integers(0, VOCAB, prompt_len).tolist()
    return {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True}


async def one_request(client: httpx.AsyncClient, payload: dict[str, Any]) -> dict[str, Any]:
    """Send one streamed completion; its status, start and token times (perf_counter seconds)."""
    start, tokens = time.perf_counter(), []
    try:
        async with client.stream("POST", "/v1/completions", json=payload) as r:
            if r.status_code != 200:
                await r.aread()
                retry = float(r.headers.get("retry-after", 1))
                return {"status": r.status_code, "start": start, "tokens": [], "retry": retry}
            async for line in r.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["token_ids"]:
                    tokens.append(time.perf_counter())
    except httpx.HTTPError as err:
        return {"status": f"error: {type(err).__name__}", "start": start, "tokens": tokens}
    return {"status": 200, "start": start, "tokens": tokens}


async def closed_loop(url: str, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.clients + 8)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    begin = time.perf_counter()
    deadline = begin + args.duration
    records: list[dict[str, Any]] = []

    async def client_loop(i: int, client: httpx.AsyncClient) -> None:
        rng = np.random.default_rng([args.seed, i])
        while time.perf_counter() < deadline:
            record = await one_request(client, body(rng, args.prompt_len, args.output_len))
            records.append(record)
            if record["status"] == 429:
                await asyncio.sleep(min(record["retry"], max(deadline - time.perf_counter(), 0)))

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(args.clients)))
    return {"requests": records, "seconds": time.perf_counter() - begin}


async def burst(url: str, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.requests + 8)
    rng = np.random.default_rng(args.seed)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        streams = [
            client.stream(
                "POST", "/v1/completions", json=body(rng, args.prompt_len, args.output_len)
            )
            for _ in range(args.requests)
        ]
        responses = await asyncio.gather(*(s.__aenter__() for s in streams))
        statuses = [r.status_code for r in responses]
        for s in streams:  # closing a stream mid-way disconnects: the server cancels it
            await s.__aexit__(None, None, None)
    return {
        "sent": args.requests,
        "admitted": statuses.count(200),
        "refused": statuses.count(429),
        "other": len(statuses) - statuses.count(200) - statuses.count(429),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="experiments/http_clients.py", description=__doc__)
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("mode", choices=["closed", "burst"])
    parser.add_argument("--clients", type=int, default=1, help="closed: concurrent clients")
    parser.add_argument("--duration", type=float, default=10.0, help="closed: seconds of sending")
    parser.add_argument("--requests", type=int, default=1, help="burst: requests sent at once")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt token ids")
    parser.add_argument("--output-len", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    args = parser.parse_args(argv)
    check_loopback(args.url)
    run = closed_loop if args.mode == "closed" else burst
    print(json.dumps(asyncio.run(run(args.url, args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
