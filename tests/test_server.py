"""The HTTP server (jaxllm serve) on the tiny preset: a module's engine is compiled once and each test
runs its own server over it on a free loopback port. Greedy outputs are checked against
``jaxllm.generate.generate`` (the reference of ``jaxllm generate``); the engine's steps can be held (``gate``)
or slowed (``delay``) to put the server in a known state."""

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("httpx")  # test dependencies and the `serve` extra; absent from GPU images
pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")
import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from jaxllm import checkpoint, data, server
from jaxllm.cli import main
from jaxllm.config import PRESETS
from jaxllm.engine import Engine
from jaxllm.generate import generate
from jaxllm.model import init_params
from jaxllm.sampling import GREEDY
from jaxllm.server_request import ApiError, parse_completion
from jaxllm.server_service import Limits, ServedModel, Service
from jaxllm.server_text import ByteText, StopStrings, TokenizerText
from jaxllm.tokenizer import load_hf_tokenizer

CFG = PRESETS["tiny"]  # byte vocabulary, context 64
N = 12  # max_tokens of the requests checked against the reference (one compiled bucket)
PROMPTS = ["Hello", "Hi, you", "def f(x):", "abc", "émigré", "zzz"]  # at most 16 bytes each
HF_GPT2 = Path(__file__).parent / "fixtures" / "hf" / "gpt2"


class GatedEngine(Engine):
    """An engine whose steps wait for ``gate`` (set: run; ``inside`` is set while a step waits),
    sleep ``delay`` seconds first, and raise while ``fail`` is set."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate, self.inside = threading.Event(), threading.Event()
        self.gate.set()
        self.delay, self.fail = 0.0, False

    def step(self):
        self.inside.set()
        self.gate.wait()
        self.inside.clear()
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("step failed")
        return super().step()


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def engine(params):
    engine = GatedEngine(CFG, params, slots=4, policy="chunked", chunk=16)
    engine.compile_programs(CFG.max_len - 1)
    return engine


@pytest.fixture(scope="module")
def reference(params):
    @functools.cache
    def greedy(prompt: str) -> list[int]:
        ids = data.encode(prompt).tolist()
        out = generate(CFG, params, [ids], N, GREEDY, jax.random.key(0), (data.EOT,))
        return out.tokens[0]

    return greedy


@dataclasses.dataclass
class Served:
    url: str
    service: Service
    server: server.Server


@contextlib.contextmanager
def running(engine: GatedEngine, ready: bool = True, **limits) -> Iterator[Served]:
    """A server over ``engine`` in a thread, listening (and ``ready``: the programs compiled);
    stopped, and the engine emptied, on exit."""
    service = Service(engine, ServedModel("tiny", data, (data.EOT,)), Limits(**limits))
    with server.background(service) as (url, uv):
        try:
            deadline = time.monotonic() + 60
            while ready and service.state != "ready":
                assert time.monotonic() < deadline, service.state
                time.sleep(0.01)
            yield Served(url, service, uv)
        finally:
            engine.gate.set()  # a held step would hold the shutdown
            engine.delay, engine.fail = 0.0, False
    engine.run_until_idle()  # what the stopped server left in the engine


@pytest.fixture
def served(engine) -> Iterator[Served]:
    with running(engine, max_queue=28) as s:
        yield s


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def stream(url: str, **body) -> list[dict | str]:
    """The events of a streamed completion: chunks as dicts, and the final "[DONE]"."""
    events: list[dict | str] = []
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of GET /metrics by (name, sorted labels)."""
    text = httpx.get(f"{url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def assert_healthy(url: str) -> None:
    assert httpx.get(f"{url}/health").json() == {"status": "ready"}
    r = complete(url, prompt="abc", max_tokens=2, temperature=0)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# --- outputs -------------------------------------------------------------------------------------


def test_openai_client_gets_the_greedy_tokens_of_generate(served, reference):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    for prompt in PROMPTS[:3]:
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=N, temperature=0)
        choice = out.choices[0]
        assert (choice.model_extra or {})["token_ids"] == reference(prompt)
        assert choice.text == data.decode(reference(prompt))
        assert choice.finish_reason == "length"
        assert out.usage is not None and out.usage.prompt_tokens == len(prompt.encode())
        assert out.usage.completion_tokens == N
        chunks = list(
            client.completions.create(
                model="tiny", prompt=prompt, max_tokens=N, temperature=0, stream=True
            )
        )
        tokens = [t for c in chunks for t in (c.choices[0].model_extra or {})["token_ids"]]
        assert tokens == reference(prompt)
        assert "".join(c.choices[0].text for c in chunks) == choice.text


def test_prompt_as_token_ids_equals_the_prompt_as_text(served, reference):
    ids = data.encode("Hello").tolist()
    for prompt in (ids, [ids], ["Hello"]):
        r = complete(served.url, prompt=prompt, max_tokens=N, temperature=0)
        assert r.json()["choices"][0]["token_ids"] == reference("Hello")


def test_stream_yields_each_token_in_order_then_the_finish_and_done(served, reference):
    events = stream(served.url, prompt="def f(x):", max_tokens=N, temperature=0)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    assert len(chunks) == N  # one event per token, the last carrying the finish
    assert [c["choices"][0]["token_ids"] for c in chunks] == [[t] for t in reference("def f(x):")]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (N - 1) + ["length"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == data.decode(reference("def f(x):"))
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 9,
        "completion_tokens": N,
        "total_tokens": 9 + N,
    }
    assert all("usage" not in c for c in chunks[:-1])


def test_stop_strings_end_the_text_before_them(served, reference):
    text = data.decode(reference("def f(x):"))  # ':::::::99999'
    for stop in (":9", [":9", "zz"], "9"):
        first = min(
            i for s in ([stop] if isinstance(stop, str) else stop) if (i := text.find(s)) >= 0
        )
        body = {"prompt": "def f(x):", "max_tokens": N, "temperature": 0, "stop": stop}
        choice = complete(served.url, **body).json()["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (text[:first], "stop")
        chunks = [e for e in stream(served.url, **body) if isinstance(e, dict)]
        assert "".join(c["choices"][0]["text"] for c in chunks) == text[:first]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert_healthy(served.url)


def test_sampling_is_seeded(served):
    body = {"prompt": "abc", "max_tokens": 8, "temperature": 1.0, "top_k": 50, "top_p": 0.9}
    first = complete(served.url, **body, seed=7).json()["choices"][0]["token_ids"]
    assert complete(served.url, **body, seed=7).json()["choices"][0]["token_ids"] == first
    assert len(first) >= 1


def test_top_k_1_at_a_huge_temperature_is_greedy(served, reference):
    for temperature in (1e38, 3.4028234663852886e38):  # every logit / temperature rounds to 0
        r = complete(served.url, prompt="Hello", max_tokens=N, temperature=temperature, top_k=1)
        assert r.json()["choices"][0]["token_ids"] == reference("Hello")


def test_32_concurrent_clients_all_complete_with_correct_outputs(served, reference):
    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, list[int]]:
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"prompt": prompt, "max_tokens": N, "temperature": 0, "stream": i % 2 == 0}
        if not body["stream"]:
            r = await client.post("/v1/completions", json=body)
            return prompt, r.json()["choices"][0]["token_ids"]
        tokens = []
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    tokens += json.loads(line[6:])["choices"][0]["token_ids"]
        return prompt, tokens

    async def all_clients() -> list[tuple[str, list[int]]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=served.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(all_clients())
    assert len(results) == 32
    for prompt, tokens in results:
        assert tokens == reference(prompt), prompt
    assert metrics(served.url)[("jaxllm_requests_total", (("finish_reason", "length"),))] == 32


# --- limits and bad input --------------------------------------------------------------------------

BAD_BODIES = [
    (b"{not json", 400, None, "not JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object, got an array"),
    (b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens", 'max_tokens must be an integer, got a string "5"'),
    (b'{"prompt": "x", "max_tokens": true}', 400, "max_tokens", "got a boolean"),
    (b'{"prompt": "x", "temperature": "hot"}', 400, "temperature", "temperature must be a number"),
    (b'{"prompt": "x", "stream": 1}', 400, "stream", "stream must be a boolean"),
    (b'{"prompt": "x", "stop": 5}', 400, "stop", "stop must be a string or a list of strings"),
    (b'{"prompt": "x", "top_p": 1.5}', 400, "top_p", "top_p must be in (0, 1]"),
    (b'{"prompt": "x", "temperature": 1e300}', 400, "temperature", "temperature must be a number in [0, 3.4028234663852886e+38] (float32), got 1e+300"),
    (b'{"prompt": "x", "seed": -1}', 400, "seed", "seed must be in [0, 4294967295]"),
    (b'{"prompt": 5}', 400, "prompt", "prompt must be a string or a list of token ids"),
    (b'{"prompt": ""}', 400, "prompt", "prompt is empty"),
    (b'{"prompt": [1, 300]}', 400, "prompt", "prompt token id 300 is outside [0, 257)"),
    (b'{"prompt": ["a", "b"]}', 400, "prompt", "one prompt per request, got 2"),
    (b'{"prompt": "a\\ud800"}', 400, "prompt", "prompt is not text: it holds a lone surrogate U+D800 at character 1"),
    (b'{"prompt": ["ab\\udcff"]}', 400, "prompt", "prompt is not text: it holds a lone surrogate U+DCFF at character 2"),
    (b'{"prompt": "x", "stop": ["y", "\\udc00"]}', 400, "stop", "stop is not text: it holds a lone surrogate U+DC00 at character 0"),
    (b'{"prompt": "x", "n": 2}', 400, "n", "n must be 1"),
    (b'{"prompt": "x", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None, "nested too deeply"),
    (b'{"prompt": "x", "echo": true}', 400, "echo", "echo is not supported: leave it out or set it to false (got true)"),
    (b'{"prompt": "x", "echo": "yes"}', 400, "echo", 'echo is not supported: leave it out or set it to false (got "yes")'),
    (b'{"prompt": "x", "logprobs": 2}', 400, "logprobs", "logprobs is not supported: leave it out (got 2)"),
    (b'{"prompt": "x", "logit_bias": {"32": -100}}', 400, "logit_bias", "logit_bias is not supported"),
    (b'{"prompt": "x", "presence_penalty": false}', 400, "presence_penalty", "presence_penalty is not supported"),
    (b'{"prompt": "x", "frequency_penalty": 2}', 400, "frequency_penalty", "frequency_penalty is not supported"),
    (b'{"prompt": "x", "best_of": 3}', 400, "best_of", "best_of is not supported"),
    (b'{"prompt": "x", "suffix": "y"}', 400, "suffix", "suffix is not supported"),
    (b'{"prompt": "' + b"x" * 70 + b'"}', 400, "prompt", "prompt of 70 tokens + max_tokens 16 = 86 is beyond the context of 64 tokens"),
    (b'{"prompt": "x", "max_tokens": 64}', 400, "max_tokens", "prompt of 1 tokens + max_tokens 64 = 65 is beyond the context of 64"),
    (b'{"prompt": "x", "model": "gpt-4"}', 404, "model", "model 'gpt-4' is not served here; this server serves 'tiny'"),
    (b'{"prompt": "' + b"x" * 2**20 + b'"}', 413, None, "over the limit of 1048576 bytes"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "param", "message"), BAD_BODIES)
def test_bad_input_is_a_json_error_and_the_server_keeps_serving(
    served, body, status, param, message
):
    r = httpx.post(f"{served.url}/v1/completions", content=body, timeout=60)
    assert r.status_code == status
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == param
    assert metrics(served.url)[("jaxllm_requests_refused_total", (("status", str(status)),))] == 1
    assert_healthy(served.url)


def test_a_body_over_the_limit_is_refused_while_it_streams_in(engine):
    with running(engine, max_body=100) as s:
        r = httpx.post(
            f"{s.url}/v1/completions", content=iter([b'{"prompt": "', b"x" * 200, b'"}'])
        )
        assert (
            r.status_code == 413 and "over the limit of 100 bytes" in r.json()["error"]["message"]
        )
        assert_healthy(s.url)


def test_unknown_fields_and_unsupported_ones_at_their_no_op_are_ignored(served, reference):
    noops = dict(echo=False, logit_bias={}, presence_penalty=0.0, best_of=1, logprobs=None)
    r = complete(served.url, prompt="Hello", max_tokens=N, temperature=0, user="u", **noops)
    assert r.json()["choices"][0]["token_ids"] == reference("Hello")


def test_unknown_routes_and_methods_are_json_errors(served):
    r = httpx.get(f"{served.url}/v1/chat")
    assert r.status_code == 404 and "GET /v1/chat: Not Found" in r.json()["error"]["message"]
    assert httpx.get(f"{served.url}/v1/completions").status_code == 405
    assert_healthy(served.url)


def test_a_full_queue_is_429_with_retry_after(engine):
    """4 slots + max_queue 2: the 7th request in the server is refused until one ends."""

    async def scenario(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {"prompt": "abc", "max_tokens": 3, "temperature": 0, "stream": True}
            streams = [client.stream("POST", "/v1/completions", json=body) for _ in range(6)]
            responses = [await s.__aenter__() for s in streams]  # headers: each one is admitted
            assert all(r.status_code == 200 for r in responses)
            refused = await client.post("/v1/completions", json={**body, "stream": False})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert "the queue is full: 6 requests in the server, at most 6" in refused.text
            engine.gate.set()
            for s, r in zip(streams, responses, strict=True):
                assert (await r.aread()).endswith(b"data: [DONE]\n\n")
                await s.__aexit__(None, None, None)

    with running(engine, max_queue=2) as s:
        engine.gate.clear()
        asyncio.run(scenario(s.url))
        assert metrics(s.url)[("jaxllm_requests_refused_total", (("status", "429"),))] == 1
        assert_healthy(s.url)


def test_a_client_that_disconnects_mid_stream_frees_its_slot_at_once(served):
    served.service.engine.delay = 0.05  # 40 tokens would take 2 s
    body = {"prompt": "abc", "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    left = time.monotonic()
    while served.service.running() or served.service.waiting():
        assert time.monotonic() - left < 1.0, "the slot was not freed"
        time.sleep(0.01)
    engine = served.service.engine
    assert engine.idle and not any(engine.running)
    served.service.engine.delay = 0.0
    samples = metrics(served.url)
    assert samples[("jaxllm_requests_total", (("finish_reason", "disconnected"),))] == 1
    assert samples[("jaxllm_generation_tokens_total", ())] < 40
    assert_healthy(served.url)


def test_a_client_that_leaves_before_a_whole_response_frees_its_slot(served):
    served.service.engine.delay = 0.05  # 40 tokens would take 2 s
    with pytest.raises(httpx.ReadTimeout):
        complete_within = httpx.Timeout(60, read=0.3)
        # Greedy: a sampled end-of-text (each request's seed is random) could finish the request
        # before the client leaves (seen once in a full run: "DID NOT RAISE ReadTimeout").
        body = {"prompt": "abc", "max_tokens": 40, "temperature": 0}
        httpx.post(f"{served.url}/v1/completions", json=body, timeout=complete_within)
    left = time.monotonic()
    while served.service.running() or served.service.waiting():
        assert time.monotonic() - left < 1.0, "the slot was not freed"
        time.sleep(0.01)
    served.service.engine.delay = 0.0
    samples = metrics(served.url)
    assert samples[("jaxllm_requests_total", (("finish_reason", "disconnected"),))] == 1
    assert_healthy(served.url)


def test_health_and_metrics_answer_while_a_step_runs(served):
    engine = served.service.engine
    engine.gate.clear()
    done: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: done.append(complete(served.url, prompt="abc", max_tokens=2))
    )
    thread.start()
    assert engine.inside.wait(10)  # the stepping thread is inside a step, held there
    start = time.monotonic()
    assert httpx.get(f"{served.url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{served.url}/metrics", timeout=5).status_code == 200
    assert time.monotonic() - start < 1.0 and not done
    engine.gate.set()
    thread.join(30)
    assert done[0].status_code == 200


def test_metrics_count_requests_tokens_queue_and_latencies(served):
    for prompt in ("abc", "Hello"):
        assert complete(served.url, prompt=prompt, max_tokens=5, temperature=0).status_code == 200
    samples = metrics(served.url)
    assert samples[("jaxllm_requests_total", (("finish_reason", "length"),))] == 2
    assert samples[("jaxllm_prompt_tokens_total", ())] == 3 + 5
    assert samples[("jaxllm_generation_tokens_total", ())] == 10
    assert samples[("jaxllm_time_to_first_token_seconds_count", ())] == 2
    assert samples[("jaxllm_time_between_tokens_seconds_count", ())] == 8
    assert samples[("jaxllm_time_to_first_token_seconds_sum", ())] > 0

    engine = served.service.engine
    engine.delay = 0.1  # slow steps: six requests fill the 4 slots and 2 wait

    async def six() -> None:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            body = {"prompt": "abc", "max_tokens": 30, "temperature": 0}
            tasks = [
                asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(6)
            ]
            deadline = time.monotonic() + 10
            while served.service.running() < 4:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            samples = await asyncio.to_thread(metrics, served.url)
            assert samples[("jaxllm_running_requests", ())] == 4
            assert samples[("jaxllm_queue_length", ())] == 2
            assert samples[("jaxllm_slot_occupancy", ())] == 1.0
            engine.delay = 0.0
            assert all(r.status_code == 200 for r in await asyncio.gather(*tasks))

    asyncio.run(six())
    assert metrics(served.url)[("jaxllm_queue_length", ())] == 0


def test_an_engine_failure_ends_streams_with_an_error_and_health_says_failed(served):
    served.service.engine.fail = True
    events = stream(served.url, prompt="abc", max_tokens=3)
    assert events[-1] == "[DONE]" and isinstance(events[-2], dict)
    assert events[-2]["error"]["message"] == "the engine failed: RuntimeError: step failed"
    r = complete(served.url, prompt="abc", max_tokens=3)
    assert r.status_code == 500 and "RuntimeError: step failed" in r.json()["error"]["message"]
    health = httpx.get(f"{served.url}/health")
    assert health.status_code == 503 and health.json()["status"] == "failed"


def test_health_is_503_and_completions_wait_while_starting(engine):
    """A server whose engine is still compiling: /health says starting, completions get 503."""
    release = threading.Event()
    compile_programs = engine.compile_programs
    engine.compile_programs = lambda longest, *rest: (
        release.wait() and compile_programs(longest, *rest)
    )  # type: ignore[method-assign]
    try:
        with running(engine, ready=False) as s:
            health = httpx.get(f"{s.url}/health")
            assert (health.status_code, health.json()) == (503, {"status": "starting"})
            r = complete(s.url, prompt="abc")
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "the server is starting" in r.json()["error"]["message"]
            release.set()
            deadline = time.monotonic() + 30
            while s.service.state != "ready":
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert_healthy(s.url)
    finally:
        release.set()
        del engine.compile_programs


def test_shutdown_finishes_short_requests_and_cancels_the_rest_at_the_deadline(engine):
    """What SIGTERM starts (uvicorn's handle_exit), in-process: a short stream finishes, a long one
    is cancelled at the deadline and still ends with its usage and [DONE]; new connections fail."""
    with running(engine, shutdown_s=0.5) as s:
        engine.delay = 0.02  # the long request would take 1.2 s

        async def scenario() -> tuple[list[str], list[str]]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:

                async def read(max_tokens: int) -> list[str]:
                    # Greedy: each request's default seed is random, and a sampled end-of-text
                    # finishes it early ("stop"; a full run once saw the short request stop).
                    body = {"prompt": "abc", "max_tokens": max_tokens, "stream": True}
                    body["temperature"] = 0
                    async with client.stream("POST", "/v1/completions", json=body) as r:
                        lines = [
                            line async for line in r.aiter_lines() if line.startswith("data: ")
                        ]
                        return lines

                long = asyncio.ensure_future(read(60))
                short = asyncio.ensure_future(read(5))
                # Both in flight, or the short one already done while the long one runs. The
                # deadline turns a missed state into a failure, not a hang (seen once in a full run).
                deadline = time.monotonic() + 30
                while s.service.running() < (1 if short.done() else 2):
                    assert time.monotonic() < deadline, "the two requests never ran together"
                    await asyncio.sleep(0.01)
                s.server.handle_exit(signal.SIGTERM, None)
                return await long, await short

        long, short = asyncio.run(scenario())
        for lines, finish in ((long, "cancelled"), (short, "length")):
            assert lines[-1] == "data: [DONE]"
            last = json.loads(lines[-2][6:])
            assert last["choices"][0]["finish_reason"] == finish
            chunks = len(lines) - 1  # one per token, and a last one without a token when cancelled
            assert last["usage"]["completion_tokens"] == chunks - (finish == "cancelled")
        assert len(long) - 2 < 60
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.url}/health")


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A tiny checkpoint with a 512-token context, so one stream can outlast a shutdown deadline."""
    path = tmp_path_factory.mktemp("run")
    cfg = CFG.replace(max_len=512)
    checkpoint.save(checkpoint.manager(path), 1, init_params(cfg, jax.random.key(0)), None, cfg)
    return str(path)


@pytest.mark.slow  # a second Python process importing JAX and compiling: ~20-40 s on 2 shared cores
def test_sigterm_during_streaming_ends_cleanly(long_run, tmp_path):
    argv = ["--checkpoint", long_run, "--port", "0", "--slots", "1", "--chunk", "16"]
    cmd = [sys.executable, "-m", "jaxllm", "serve", *argv, "--shutdown-timeout", "1"]
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        line = ""
        while "ready at " not in line:
            line = proc.stderr.readline()
            assert line, "the server ended before it was ready"
        url = line.split("ready at ")[1].split()[0]
        body = {"prompt": "abc", "max_tokens": 500, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            rest = [line for line in lines if line.startswith("data: ")]
        ended = time.monotonic() - signalled
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert rest[-1] == "data: [DONE]"
    finish = json.loads(rest[-2][6:])["choices"][0]["finish_reason"]
    assert finish in ("cancelled", "length")
    assert ended < 1 + 3, ended  # the deadline, and a step or two
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-run")
    checkpoint.save(checkpoint.manager(path), 1, init_params(CFG, jax.random.key(0)), None, CFG)
    return str(path)


@pytest.mark.slow  # a second Python process importing JAX and compiling: ~10-30 s on 2 shared cores
@pytest.mark.parametrize(
    "signum, join_s",
    [(signal.SIGTERM, None), (signal.SIGTERM, 0.0), (signal.SIGINT, 0.0)],
    ids=["sigterm", "sigterm-compiling-at-exit", "sigint-compiling-at-exit"],
)
def test_a_signal_while_compiling_exits_128_plus_it(tiny_run, signum, join_s):
    """SIGTERM or Ctrl-C while the engine's worker compiles: 128 + the signal, no abort. The
    interpreter once finalised while the worker was inside XLA, and the worker, ended by
    pthread_exit as it took the GIL, aborted the process (134, "FATAL: exception not rethrown").
    join_s=0: shutdown does not wait for the worker, so it is surely still compiling at exit."""
    patch = "" if join_s is None else f"server_service.STOP_JOIN_S = {join_s}"
    code = (
        f"import sys\nfrom jaxllm import launch, server_service\n{patch}\n"
        f"sys.exit(launch.main(['serve', '--checkpoint', {tiny_run!r}, '--port', '0']))\n"
    )
    env = {**os.environ, "JAXLLM_MALLOC": "system"}
    with subprocess.Popen(
        [sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert first.endswith(", compiling...\n"), first
        url = first.rsplit(" at ", 1)[1].split(",")[0]
        health = None
        while health is None:  # answered once the server runs: the worker is compiling by then
            with contextlib.suppress(httpx.TransportError):
                health = httpx.get(f"{url}/health", timeout=5)
        assert health.json()["status"] == "starting"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, first + err
    assert "FATAL" not in err and "Traceback" not in err, err
    assert err == ("jaxllm: interrupted\n" if signum == signal.SIGINT else "")


def test_serve_refuses_bad_options_in_one_line(capsys):
    for extra, word in [
        (["--policy", "fifo"], "unknown policy 'fifo'"),
        (["--port", "70000"], "--port must be in [0, 65535]"),
        (["--max-queue", "-1"], "max_queue must be an integer >= 0"),
        (["--shutdown-timeout", "-1"], "shutdown_s must be a finite number"),
    ]:
        assert main(["serve", "--checkpoint", "unused", *extra]) == 2
        err = capsys.readouterr().err
        assert word in err and err.count("\n") == 1, err


def test_serve_refuses_an_address_it_cannot_listen_on_before_loading(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "load_params", lambda *_, **__: pytest.fail("loaded"))
    with server.bind("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", tiny_run, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on --host 127.0.0.1 --port {port}: " in err and err.count("\n") == 1


# --- text, stop strings and request parsing (no server) ---------------------------------------------


def test_byte_text_holds_a_character_until_it_is_whole():
    text = ByteText()
    pieces = [text.push(b) for b in "aé€😀b".encode()] + [text.finish()]
    assert pieces == ["a", "", "é", "", "", "€", "", "", "", "😀", "b", ""]
    assert text.push(data.EOT) == ""


def test_byte_text_joined_equals_decode_of_every_byte_string():
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.integers(0, 256, rng.integers(1, 12)).tolist()
        if rng.random() < 0.5:  # mostly valid UTF-8 with multi-byte characters
            ids = list("é€😀x".encode())[: len(ids)] + ids[: rng.integers(0, 3)]
        text = ByteText()
        assert "".join(text.push(t) for t in ids) + text.finish() == data.decode(ids)


def test_tokenizer_text_holds_a_cut_character_of_a_bpe_tokenizer():
    tok = load_hf_tokenizer(HF_GPT2, vocab_size=288)
    assert tok is not None
    ids = tok.encode("naïve café €5").tolist()
    text = TokenizerText(tok)
    pieces = [text.push(t) for t in ids] + [text.finish()]
    assert "".join(pieces) == tok.decode(ids) == "naïve café €5"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_strings_hold_back_what_may_start_one():
    stops = StopStrings(["END", "xy"])
    assert stops.feed("abcE") == ("abc", False)  # "E" may start END
    assert stops.feed("N") == ("", False)
    assert stops.feed("Dzzz") == ("", True)  # the text before END was sent already
    stops = StopStrings(["xy"])
    assert stops.feed("ax") == ("a", False)
    assert stops.feed("z") == ("xz", False)
    assert stops.feed("x") == ("", False)
    assert stops.flush() == "x"
    assert StopStrings(["b", "abc"]).feed("zabc") == ("z", True)  # the earliest stop wins


def test_parse_completion_defaults_and_nulls():
    c = parse_completion(b'{"prompt": "hi", "max_tokens": null, "temperature": 0, "seed": 3}')
    assert (c.prompt, c.max_tokens, c.stream, c.stop, c.model) == ("hi", 16, False, (), None)
    assert (c.sampling.temperature, c.sampling.seed) == (0.0, 3)
    seeds = {parse_completion(b'{"prompt": "hi"}').sampling.seed for _ in range(5)}
    assert len(seeds) > 1  # no seed: a random one per request
    with pytest.raises(ApiError, match="max_tokens must be >= 1, got 0"):
        parse_completion(b'{"prompt": "hi", "max_tokens": 0}')
