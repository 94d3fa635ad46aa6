"""The body of ``POST /v1/completions``, read and checked, and the errors the server answers with.

Known fields (each may be ``null``, meaning its default): ``prompt`` (a string, a list of token ids,
or a list holding one of those), ``max_tokens`` (default 16), ``temperature`` (default 1; 0 is
greedy), ``top_p``, ``top_k``, ``seed`` (0 to 2**32 - 1; default: a random seed per request),
``stop`` (a string or up to 4 strings), ``stream`` (default false), ``n`` (only 1), ``model``.
Unknown fields are ignored, as OpenAI clients send extras. OpenAI's fields that would change the
answer and are not implemented (``UNSUPPORTED``: ``echo``, ``logprobs``, ``logit_bias``, the two
penalties, ``best_of``, ``suffix``) are a 400 unless null or at the value that changes nothing. A
known field of the wrong type, or a value out of range, is a 400 naming the field, the value and
what is allowed; so is a prompt or stop string holding a lone surrogate (JSON's ``"\\ud800"``),
which is not text; so is a body nested too deeply for Python's JSON parser.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Any

from jaxllm.engine import MAX_SEED, SamplingParams

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_STOPS = 4  # stop strings per request, as OpenAI allows
# OpenAI completion fields not implemented here, with the only value (besides null) that changes
# nothing: any other would be answered as if the field were absent, so it is refused.
UNSUPPORTED: dict[str, Any] = {
    "echo": False,
    "logprobs": None,
    "logit_bias": {},
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "best_of": 1,
    "suffix": None,
}


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}`` with
    an HTTP status (and headers, e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def kind(self) -> str:
        """OpenAI's error type for the status."""
        if self.status == 429:
            return "rate_limit_error"
        if self.status >= 500:
            return "server_error"
        return "not_found_error" if self.status == 404 else "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclasses.dataclass(frozen=True)
class Completion:
    """What a completion request asks for."""

    prompt: str | tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    model: str | None


def parse_completion(body: bytes) -> Completion:
    """The request in ``body`` (JSON); ApiError 400 naming the first bad field."""
    try:
        fields = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not JSON ({err})") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply to read") from None
    if not isinstance(fields, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(fields)}")
    _refuse_unsupported(fields)
    n = _get(fields, "n", int, 1)
    if n != 1:
        raise ApiError(400, f"n must be 1 (one completion per request), got {n}", "n")
    max_tokens = _get(fields, "max_tokens", int, DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    return Completion(
        prompt=_prompt(fields.get("prompt")),
        max_tokens=max_tokens,
        sampling=_sampling(fields),
        stop=_stop(fields.get("stop")),
        stream=_get(fields, "stream", bool, False),
        model=_get(fields, "model", str, None),
    )


def _refuse_unsupported(fields: dict[str, Any]) -> None:
    """ApiError 400 for the first ``UNSUPPORTED`` field set to anything but null or its no-op."""
    for name, noop in UNSUPPORTED.items():
        value = fields.get(name)
        same_type = type(value) is type(noop) or (_is(value, float) and _is(noop, float))
        if value is not None and not (same_type and value == noop):
            got = json.dumps(value)[:60]
            allowed = "" if noop is None else f" or set it to {json.dumps(noop)}"
            raise ApiError(400, f"{name} is not supported: leave it out{allowed} (got {got})", name)


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}[type(value)]


def _is(value: Any, kind: type) -> bool:
    """JSON typing: booleans are not numbers; an integer is a number."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _get(fields: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """``fields[name]`` checked to be of ``kind``; ``default`` when absent or null."""
    value = fields.get(name)
    if value is None:
        return default
    if not _is(value, kind):
        shown = json.dumps(value)[:60]
        raise ApiError(
            400, f"{name} must be {_TYPE_NAMES[kind]}, got {_json_type(value)} {shown}", name
        )
    return value


def _prompt(value: Any) -> str | tuple[int, ...]:
    """A string, a list of token ids, or a list of one prompt (what OpenAI clients send)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise ApiError(400, "prompt is empty", "prompt")
        return _text("prompt", value)
    if isinstance(value, list) and value and all(_is(v, int) for v in value):
        return tuple(value)
    if isinstance(value, list) and value and all(isinstance(v, str | list) for v in value):
        raise ApiError(400, f"one prompt per request, got {len(value)}", "prompt")
    if value == []:
        raise ApiError(400, "prompt is empty", "prompt")
    got = "nothing" if value is None else _json_type(value)
    raise ApiError(400, f"prompt must be a string or a list of token ids, got {got}", "prompt")


def _sampling(fields: dict[str, Any]) -> SamplingParams:
    temperature = _get(fields, "temperature", float, 1.0)
    top_p = _get(fields, "top_p", float, None)
    top_k = _get(fields, "top_k", int, None)
    seed = _get(fields, "seed", int, None)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ApiError(400, f"seed must be in [0, {MAX_SEED}], got {seed}", "seed")
    seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
    try:
        return SamplingParams(
            float(temperature), top_k, None if top_p is None else float(top_p), seed
        )
    except ValueError as err:
        raise ApiError(400, str(err), _named(str(err), ("temperature", "top_k", "top_p"))) from None


def _named(message: str, names: tuple[str, ...]) -> str | None:
    """The first field name a message mentions."""
    return next((n for n in names if n in message), None)


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        got = _json_type(value)
        raise ApiError(400, f"stop must be a string or a list of strings, got {got}", "stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop holds {len(stops)} strings, at most {MAX_STOPS}", "stop")
    if any(not s for s in stops):
        raise ApiError(400, "a stop string must not be empty", "stop")
    return tuple(_text("stop", s) for s in stops)


def _text(name: str, value: str) -> str:
    """``value`` if it is text; a JSON string may hold a lone surrogate (``"\\ud800"``), which is not
    text and has no UTF-8 bytes to tokenize (or to match the decoded output)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        char = f"U+{ord(value[err.start]):04X} at character {err.start}"
        raise ApiError(400, f"{name} is not text: it holds a lone surrogate {char}", name) from None
    return value
