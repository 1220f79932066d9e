"""A fake api.openai.com: an aiohttp app speaking the OpenAI wire format, with failure switches.

Outputs are a pure function of the request body (model, messages, seed, …), so tests can predict
them; the switches on `FakeUpstream` inject the failures a proxy must survive. Serving it on a port
is left to `tests.servers`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import gzip as gzip_module
import hashlib
import secrets
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.keys import BOOKKEEPING

JSON = dict[str, Any]

DEFAULT_FINGERPRINT = "fp_fake0001"
DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small")

# 32 words, so one hash byte picks one; two of them are non-ASCII on purpose.
VOCABULARY = (
    "seed", "cache", "replays", "every", "answer", "exactly", "café", "model",
    "drifts", "slowly", "bright", "river", "stone", "quiet", "signal", "north",
    "garden", "paper", "orbit", "lantern", "echo", "maple", "vector", "harbor",
    "crisp", "amber", "naïve", "delta", "window", "copper", "meadow", "tide",
)  # fmt: skip
CITIES = ("Paris", "Zürich", "Tokyo", "Lima", "Oslo", "São Paulo", "Nairobi", "Reykjavík")

_ERROR_DEFAULTS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request (injected by the fake upstream)."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided: sk-fake***. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Not supported."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    408: ("server_error", "timeout", "Request timed out."),
    409: ("invalid_request_error", "conflict", "Conflict."),
    422: ("invalid_request_error", None, "Unprocessable entity."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for gpt-4o-mini in organization org-fake on requests per min (RPM): "
        "Limit 3, Used 3, Requested 1. Please try again in 20s.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


# --------------------------------------------------------------------------------------------
# Request factories


def chat_request(**overrides: Any) -> JSON:
    """A small valid chat completions body; `overrides` replace members (None values included)."""
    body: JSON = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say something reproducible."}],
        "seed": 123,
        "temperature": 0,
    }
    body.update(overrides)
    return body


def legacy_request(**overrides: Any) -> JSON:
    """A small valid legacy `/v1/completions` body."""
    body: JSON = {
        "model": "gpt-3.5-turbo-instruct",
        "prompt": "Say something reproducible.",
        "seed": 123,
        "temperature": 0,
        "max_tokens": 16,
    }
    body.update(overrides)
    return body


def embedding_request(**overrides: Any) -> JSON:
    """A small valid `/v1/embeddings` body (float encoding, as sent explicitly)."""
    body: JSON = {
        "model": "text-embedding-3-small",
        "input": "Say something reproducible.",
        "encoding_format": "float",
    }
    body.update(overrides)
    return body


def responses_request(**overrides: Any) -> JSON:
    """A small valid `/v1/responses` body."""
    body: JSON = {"model": "gpt-4o-mini", "input": "Say something reproducible.", "temperature": 0}
    body.update(overrides)
    return body


def tool(name: str = "get_weather") -> JSON:
    """A function tool definition with one required `city` argument."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }


def completion(content: str = "The capital of France is Paris.", **overrides: Any) -> JSON:
    """A `chat.completion` response body in OpenAI's exact shape, for tests of the pure modules."""
    body: JSON = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(14, 8),
        "service_tier": "default",
        "system_fingerprint": DEFAULT_FINGERPRINT,
    }
    body.update(overrides)
    return body


# --------------------------------------------------------------------------------------------
# Deterministic content


def _normalise(value: Any) -> Any:
    # Numbers compare by value (1 == 1.0), as on a real server (within 64 bits).
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def request_digest(endpoint: str, body: JSON, salt: str = "") -> bytes:
    """sha256 of what determines the output: endpoint and body minus nulls and bookkeeping."""
    material = {k: _normalise(v) for k, v in body.items() if v is not None and k not in BOOKKEEPING}
    data = f"{endpoint}\0{salt}\0".encode() + orjson.dumps(material, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).digest()


def _sub_digest(digest: bytes, label: str) -> bytes:
    return hashlib.sha256(digest + label.encode()).digest()


def text_pieces(digest: bytes) -> list[str]:
    """6 to 12 words picked by hash bytes, as pieces that join into a sentence (one per token)."""
    count = 6 + digest[0] % 7
    words = [VOCABULARY[digest[1 + i] % len(VOCABULARY)] for i in range(count)]
    words[0] = words[0].capitalize()
    words[-1] += "."
    return [words[0]] + [" " + word for word in words[1:]]


def _hex(digest: bytes, length: int) -> str:
    return digest.hex()[:length]


def _created(digest: bytes) -> int:
    return 1_730_000_000 + int.from_bytes(digest[:4], "big") % 10_000_000


def _usage(prompt_tokens: int, completion_tokens: int) -> JSON:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _count_tokens(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_count_tokens(v) for v in value)
    if isinstance(value, dict):
        return sum(_count_tokens(v) for k, v in value.items() if k in {"content", "text", "input"})
    return 0


def _prompt_tokens(body: JSON) -> int:
    messages = body.get("messages") or []
    return 3 + sum(4 + _count_tokens(m) for m in messages if isinstance(m, dict))


def _token_logprob(piece: str, digest: bytes, position: int, shift: float = 0.0) -> JSON:
    return {
        "token": piece,
        "logprob": -round(digest[position % 32] / 97 + shift, 6),
        "bytes": list(piece.encode()),
        "top_logprobs": [],
    }


def _obfuscation() -> str:
    # Random padding, like OpenAI's: it differs on every call, outputs must not depend on it.
    return secrets.token_urlsafe(1 + secrets.randbelow(12))[: 1 + secrets.randbelow(12)]


@dataclass(slots=True)
class _Choice:
    index: int
    pieces: list[str]
    finish_reason: str
    digest: bytes
    tool_call: JSON | None = None

    @property
    def content(self) -> str | None:
        return None if self.tool_call else "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        if self.tool_call:
            return 4 + len(self.tool_call["function"]["arguments"]) // 4
        return len(self.pieces)


def _tool_name(body: JSON) -> str | None:
    """The function to call, or None when the request doesn't ask for a tool call."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return str(choice["function"].get("name"))
    for entry in tools:
        if isinstance(entry, dict) and isinstance(entry.get("function"), dict):
            return str(entry["function"].get("name"))
    return None


def _limit(body: JSON, *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _choices(body: JSON, digest: bytes, count: int, *limit_names: str) -> list[_Choice]:
    limit = _limit(body, *limit_names)
    tool_name = _tool_name(body)
    choices = []
    for index in range(count):
        sub = _sub_digest(digest, f"choice-{index}")
        if tool_name is not None:
            arguments = orjson.dumps({"city": CITIES[sub[0] % len(CITIES)]}).decode()
            call = {
                "id": "call_" + _hex(_sub_digest(sub, "call"), 24),
                "type": "function",
                "function": {"name": tool_name, "arguments": arguments},
            }
            choices.append(_Choice(index, [], "tool_calls", sub, call))
            continue
        pieces = text_pieces(sub)
        finish = "stop"
        if limit is not None and limit < len(pieces):
            pieces, finish = pieces[:limit], "length"
        choices.append(_Choice(index, pieces, finish, sub))
    return choices


def _n(body: JSON) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def _split_arguments(arguments: str) -> list[str]:
    """Tool arguments as streamed: at least two fragments that concatenate to the whole."""
    third = max(1, len(arguments) // 3)
    return [arguments[:third], arguments[third : 2 * third], arguments[2 * third :]]


# --------------------------------------------------------------------------------------------
# The fake


@dataclass(frozen=True, slots=True)
class Call:
    """One request the fake received, as seen on the wire."""

    method: str
    path: str  # as sent, percent-encoded, with the query string
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or None
    raw: bytes


_CALL = web.RequestKey("fake_call", Call)
_STARTED = web.RequestKey("fake_started", float)
_REQUEST_ID = web.RequestKey("fake_request_id", str)


@dataclass(slots=True)
class _Failure:
    status: int
    body: Any
    headers: dict[str, str]
    times: int
    path: str | None


@dataclass(slots=True)
class Hold:
    """A request the fake keeps unanswered until the test releases it (`hold_next`). Its events
    tell the test's thread when the request arrived and when the fake answered it, so that a test
    can set the order in which requests reach the upstream and leave it."""

    arrived: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)
    released: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)

    def release(self) -> None:
        """Let the request be answered (from any thread; releasing again does nothing)."""
        # Released already, or cancelled with its request.
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self.released.set_result(None)


@dataclass(slots=True)
class _Event:
    """One SSE event to send: `data` is the payload text, `name` the `event:` line if any."""

    data: str
    name: str | None = None


@dataclass(slots=True)
class _Stream:
    events: list[_Event]
    done: bool  # end with `data: [DONE]` (chat, completions) or not (Responses)


def error_envelope(status: int, message: str | None = None, **fields: Any) -> JSON:
    """OpenAI's error body for `status` (type, code and message typical of that status)."""
    kind, code, default = _ERROR_DEFAULTS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, "Error.")
    )
    error = {"message": message or default, "type": kind, "param": None, "code": code}
    error.update(fields)
    return {"error": error}


@dataclass
class FakeUpstream:
    """An aiohttp app (`.app`) imitating api.openai.com, with state tests read and set.

    Every attribute below can be changed from the test thread at any time; one-shot failures are
    armed with `fail_next`, `drop_stream_after`, `hang_next`, `hold_next` and `error_frame_next`.
    """

    fingerprint: str | None = DEFAULT_FINGERPRINT
    model_suffix: str = "-2024-07-18"
    nondeterministic: bool = False
    delay: float = 0.0
    chunk_delay: float = 0.0
    gzip: bool = False
    keepalive_comments: bool = True
    padding: int = 0  # characters added to every stream chunk's `obfuscation`: streams of many MB
    usage_on_finish: bool = False  # include_usage: usage on the last finishing chunk (llama.cpp)
    usage_delta: int = 0  # added to chat completions' completion_tokens: same output, other usage
    logprob_shift: float = 0.0  # subtracted from every logprob: the jitter of a real upstream
    filter_chunk: bool = False  # chat streams open with Azure's content-filter chunk
    extra_headers: dict[str, str] = field(default_factory=dict)
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    calls: list[Call] = field(default_factory=list, repr=False)
    # The most requests it was answering at once: whether callers came together or in turn.
    peak_concurrency: int = 0
    url: str = ""  # set by whoever serves `.app`, e.g. "http://127.0.0.1:PORT"

    def __post_init__(self) -> None:
        self._failures: list[_Failure] = []
        self._drops: list[int] = []
        self._hangs: list[float] = []
        self._holds: list[Hold] = []  # for the next requests, in turn
        self._held: list[Hold] = []  # every one handed out: released when the fake stops
        self._error_frames: list[JSON] = []
        self._generation = 0
        self._active = 0
        self._stopping: asyncio.Event | None = None
        self.app = self._build_app()

    # ---- state for tests

    def count(self, path_suffix: str | None = None) -> int:
        """How many requests arrived (whose path, without query, ends with `path_suffix`)."""
        if path_suffix is None:
            return len(self.calls)
        return sum(1 for c in self.calls if c.path.split("?", 1)[0].endswith(path_suffix))

    def reset(self) -> None:
        """Forget the calls and any armed one-shot failure; the switches keep their values."""
        self.calls.clear()
        self.peak_concurrency = 0
        self._failures.clear()
        self._drops.clear()
        self._hangs.clear()
        self._holds.clear()
        self._error_frames.clear()

    @property
    def last(self) -> Call:
        return self.calls[-1]

    @property
    def base_url(self) -> str:
        """What to give an OpenAI client: the served URL with `/v1`."""
        return self.url + "/v1"

    def fail_next(
        self,
        status: int,
        body: Any = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
        *,
        path: str | None = None,
    ) -> None:
        """Answer the next `times` requests (to paths ending with `path`, if given) with `status`.

        `body` defaults to OpenAI's error envelope for the status; a dict is sent as JSON, bytes or
        str as they are. A 429 gets `retry-after: 0` unless `headers` say otherwise.
        """
        if body is None:
            body = error_envelope(status)
        default_headers = {"retry-after": "0"} if status == 429 else {}
        self._failures.append(
            _Failure(status, body, {**default_headers, **(headers or {})}, times, path)
        )

    def drop_stream_after(self, n_events: int) -> None:
        """The next stream sends `n_events` events (`[DONE]` counts as one) then aborts the TCP
        connection, leaving the chunked body unterminated (also when `n_events` covers them all)."""
        self._drops.append(n_events)

    def hang_next(self, seconds: float) -> None:
        """The next request sleeps `seconds` before being answered (cut short when stopping)."""
        self._hangs.append(seconds)

    def hold_next(self) -> Hold:
        """The next request waits, unanswered, until the returned hold is released (or the fake
        stops); each call holds one more request, in the order they arrive."""
        hold = Hold()
        self._holds.append(hold)
        self._held.append(hold)
        return hold

    def error_frame_next(
        self,
        message: str = "The server had an error while processing your request. Sorry about that!",
        *,
        after: int = 2,
        code: Any = None,
        kind: str = "server_error",
    ) -> None:
        """The next stream sends `after` events, then an in-band `data: {"error": …}` frame, and
        ends the body without `[DONE]` (llama.cpp's behaviour)."""
        self._error_frames.append(
            {
                "after": after,
                "error": {"message": message, "type": kind, "param": None, "code": code},
            }
        )

    # ---- what the fake would answer (pure, for tests that predict outputs)

    def chat_completion(self, body: JSON, salt: str = "") -> JSON:
        """The non-streaming chat completion this fake returns for `body`."""
        digest = request_digest("chat", body, salt)
        choices = _choices(body, digest, _n(body), "max_completion_tokens", "max_tokens")
        return {
            "id": "chatcmpl-" + _hex(digest, 29),
            "object": "chat.completion",
            "created": _created(digest),
            "model": self._model(body),
            "choices": [self._chat_choice(body, c) for c in choices],
            "usage": self._chat_usage(body, choices),
            "service_tier": "default",
            "system_fingerprint": self.fingerprint,
            # OpenAI echoes the request's metadata since 2026-08.
            **({"metadata": body["metadata"]} if body.get("metadata") else {}),
        }

    def _model(self, body: JSON) -> str:
        return f"{body.get('model')}{self.model_suffix}"

    def _chat_usage(self, body: JSON, choices: list[_Choice]) -> JSON:
        completion_tokens = sum(c.completion_tokens for c in choices) + self.usage_delta
        return _usage(_prompt_tokens(body), completion_tokens)

    def _chat_choice(self, body: JSON, choice: _Choice) -> JSON:
        message: JSON = {
            "role": "assistant",
            "content": choice.content,
            "refusal": None,
            "annotations": [],
        }
        if choice.tool_call:
            message["tool_calls"] = [choice.tool_call]
        logprobs = None
        if body.get("logprobs") is True:
            logprobs = {
                "content": [
                    _token_logprob(p, choice.digest, i, self.logprob_shift)
                    for i, p in enumerate(choice.pieces)
                ],
                "refusal": None,
            }
        return {
            "index": choice.index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
        }

    def chat_chunks(self, body: JSON, salt: str = "") -> list[JSON]:
        """The `chat.completion.chunk` objects this fake streams for `body` (before `[DONE]`)."""
        digest = request_digest("chat", body, salt)
        choices = _choices(body, digest, _n(body), "max_completion_tokens", "max_tokens")
        options = body.get("stream_options") or {}
        include_usage = options.get("include_usage") is True
        obfuscate = options.get("include_obfuscation") is not False
        want_logprobs = body.get("logprobs") is True
        base = {
            "id": "chatcmpl-" + _hex(digest, 29),
            "object": "chat.completion.chunk",
            "created": _created(digest),
            "model": self._model(body),
            "service_tier": "default",
            "system_fingerprint": self.fingerprint,
            **({"metadata": body["metadata"]} if body.get("metadata") else {}),
        }

        def chunk(index: int, delta: JSON, finish: str | None = None, logprobs: Any = None) -> JSON:
            out = {
                **base,
                "choices": [
                    {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                ],
            }
            if include_usage:
                out["usage"] = None
            if obfuscate:
                out["obfuscation"] = _obfuscation() + "0" * self.padding
            return out

        chunks = []
        for c in choices:
            if c.tool_call:
                call, function = c.tool_call, c.tool_call["function"]
                first = {
                    "index": 0,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": function["name"], "arguments": ""},
                }
                delta = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [first],
                    "refusal": None,
                }
                chunks.append(chunk(c.index, delta))
            else:
                chunks.append(chunk(c.index, {"role": "assistant", "content": "", "refusal": None}))
        # Pieces of the n choices interleave, as OpenAI's do.
        for position in range(max(self._stream_length(c) for c in choices)):
            for c in choices:
                if position >= self._stream_length(c):
                    continue
                if c.tool_call:
                    fragment = _split_arguments(c.tool_call["function"]["arguments"])[position]
                    tool_delta = {"index": 0, "function": {"arguments": fragment}}
                    chunks.append(chunk(c.index, {"tool_calls": [tool_delta]}))
                else:
                    piece = c.pieces[position]
                    logprobs = None
                    if want_logprobs:
                        entry = _token_logprob(piece, c.digest, position, self.logprob_shift)
                        logprobs = {"content": [entry], "refusal": None}
                    chunks.append(chunk(c.index, {"content": piece}, logprobs=logprobs))
        for c in choices:
            chunks.append(chunk(c.index, {}, c.finish_reason))
        if include_usage:
            usage = self._chat_usage(body, choices)
            if self.usage_on_finish:
                chunks[-1]["usage"] = usage
            else:
                last = {**base, "choices": [], "usage": usage}
                if obfuscate:
                    last["obfuscation"] = _obfuscation()
                chunks.append(last)
        if self.filter_chunk:
            # Azure: a content-filter report first, its id, model and created left empty.
            report = [{"prompt_index": 0, "content_filter_results": {}}]
            empty = {"choices": [], "created": 0, "id": "", "model": "", "object": ""}
            chunks.insert(0, {**empty, "prompt_filter_results": report})
        return chunks

    @staticmethod
    def _stream_length(choice: _Choice) -> int:
        if choice.tool_call:
            return len(_split_arguments(choice.tool_call["function"]["arguments"]))
        return len(choice.pieces)

    def text_completion(self, body: JSON, salt: str = "") -> JSON:
        """The non-streaming legacy completion this fake returns for `body`."""
        digest = request_digest("completions", body, salt)
        prompts = self._prompts(body)
        n = _n(body)
        limit_body = {"max_tokens": body.get("max_tokens", 16)}
        choices = []
        completion_tokens = 0
        for p, prompt in enumerate(prompts):
            for c in _choices(limit_body, _sub_digest(digest, f"prompt-{p}"), n, "max_tokens"):
                text = "".join(c.pieces)
                if body.get("echo") is True and isinstance(prompt, str):
                    text = prompt + text
                logprobs = None
                if isinstance(body.get("logprobs"), int) and body.get("logprobs") is not False:
                    entries = [
                        _token_logprob(x, c.digest, i, self.logprob_shift)
                        for i, x in enumerate(c.pieces)
                    ]
                    offsets, offset = [], 0
                    for piece in c.pieces:
                        offsets.append(offset)
                        offset += len(piece)
                    logprobs = {
                        "tokens": c.pieces,
                        "token_logprobs": [e["logprob"] for e in entries],
                        "top_logprobs": [{e["token"]: e["logprob"]} for e in entries],
                        "text_offset": offsets,
                    }
                choices.append(
                    {
                        "text": text,
                        "index": p * n + c.index,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                    }
                )
                completion_tokens += c.completion_tokens
        prompt_tokens = _count_tokens(body.get("prompt")) + 1
        return {
            "id": "cmpl-" + _hex(digest, 29),
            "object": "text_completion",
            "created": _created(digest),
            "model": self._model(body),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": self.fingerprint,
        }

    @staticmethod
    def _prompts(body: JSON) -> list[Any]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            return prompt
        return [prompt]

    def text_completion_chunks(self, body: JSON, salt: str = "") -> list[JSON]:
        """The legacy completion chunks (object `text_completion`) this fake streams for `body`."""
        whole = self.text_completion(body, salt)
        options = body.get("stream_options") or {}
        include_usage = options.get("include_usage") is True
        base = {k: whole[k] for k in ("id", "object", "created", "model")}
        chunks: list[JSON] = []

        def chunk(index: int, text: str, finish: str | None) -> JSON:
            out: JSON = {
                **base,
                "choices": [
                    {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
                ],
                "system_fingerprint": self.fingerprint,
            }
            if include_usage:
                out["usage"] = None
            return out

        for choice in whole["choices"]:
            words = choice["text"].split(" ")
            pieces = [words[0]] + [" " + w for w in words[1:]]
            chunks.extend(chunk(choice["index"], piece, None) for piece in pieces)
            chunks.append(chunk(choice["index"], "", choice["finish_reason"]))
        if include_usage:
            chunks.append(
                {
                    **base,
                    "choices": [],
                    "usage": whole["usage"],
                    "system_fingerprint": self.fingerprint,
                }
            )
        return chunks

    def embeddings(self, body: JSON, salt: str = "") -> JSON:
        """The embeddings list this fake returns for `body` (unit vectors, float32-exact)."""
        raw_input = body.get("input")
        items = raw_input if isinstance(raw_input, list) else [raw_input]
        if items and all(isinstance(i, int) for i in items):
            items = [items]  # one token array
        dims = body.get("dimensions")
        dims = dims if isinstance(dims, int) and not isinstance(dims, bool) and dims > 0 else 8
        data = []
        for index, item in enumerate(items):
            seed = request_digest(
                "embeddings", {"model": body.get("model"), "input": item, "dimensions": dims}, salt
            )
            vector = _unit_vector(seed, dims)
            embedding: Any = vector
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = _count_tokens(items) or len(items)
        return {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def response(self, body: JSON, salt: str = "") -> JSON:
        """The Responses API object this fake returns for `body` (status completed/incomplete)."""
        digest = request_digest("responses", body, salt)
        pieces = text_pieces(_sub_digest(digest, "output"))
        limit = _limit(body, "max_output_tokens")
        incomplete = limit is not None and limit < len(pieces)
        if incomplete:
            pieces = pieces[:limit]
        text = "".join(pieces)
        input_tokens = _count_tokens(body.get("input")) + _count_tokens(body.get("instructions"))
        return {
            "id": "resp_" + _hex(digest, 48),
            "object": "response",
            "created_at": _created(digest),
            "status": "incomplete" if incomplete else "completed",
            "background": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": self._model(body),
            "output": [
                {
                    "id": "msg_" + _hex(_sub_digest(digest, "msg"), 48),
                    "type": "message",
                    "status": "incomplete" if incomplete else "completed",
                    "content": [
                        {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
                    ],
                    "role": "assistant",
                }
            ],
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto",
            "tools": [],
            "top_logprobs": 0,
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": len(pieces),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + len(pieces),
            },
            "user": None,
            "metadata": body.get("metadata") or {},
        }

    def response_events(self, body: JSON, salt: str = "") -> list[JSON]:
        """The Responses stream events (dicts with `type`) this fake sends for `body`, in order."""
        final = self.response(body, salt)
        item = final["output"][0]
        part = item["content"][0]
        text = part["text"]
        words = text.split(" ")
        pieces = [words[0]] + [" " + w for w in words[1:]]
        in_progress = {**final, "status": "in_progress", "output": [], "usage": None}
        in_progress["incomplete_details"] = None
        item_id = item["id"]
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        events: list[JSON] = [
            {"type": "response.created", "response": in_progress},
            {"type": "response.in_progress", "response": in_progress},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "status": "in_progress", "content": []},
            },
            {
                "type": "response.content_part.added",
                **where,
                "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""},
            },
        ]
        for piece in pieces:
            events.append(
                {
                    "type": "response.output_text.delta",
                    **where,
                    "delta": piece,
                    "logprobs": [],
                    "obfuscation": _obfuscation(),
                }
            )
        events += [
            {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {
                "type": "response.completed"
                if final["status"] == "completed"
                else "response.incomplete",
                "response": final,
            },
        ]
        # `type` then `sequence_number` first, as OpenAI orders them.
        return [
            {"type": e["type"], "sequence_number": n, **{k: v for k, v in e.items() if k != "type"}}
            for n, e in enumerate(events)
        ]

    # ---- the aiohttp app

    def _build_app(self) -> web.Application:
        @web.middleware
        async def record_and_inject(request: web.Request, handler: Handler) -> web.StreamResponse:
            raw = await request.read()
            body = None
            if raw:
                with contextlib.suppress(orjson.JSONDecodeError):
                    body = orjson.loads(raw)
            call = Call(
                method=request.method,
                path=request.raw_path,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                raw=raw,
            )
            self.calls.append(call)
            request[_CALL] = call
            request[_STARTED] = time.monotonic()
            request[_REQUEST_ID] = (
                "req_"
                + hashlib.sha256(
                    f"{len(self.calls)}:{call.method}:{call.path}".encode() + raw
                ).hexdigest()[:32]
            )
            self._active += 1
            self.peak_concurrency = max(self.peak_concurrency, self._active)
            hold = self._holds.pop(0) if self._holds else None
            try:
                if hold is not None:
                    hold.arrived.set()
                    await asyncio.wrap_future(hold.released)
                if self._hangs:
                    await self._sleep(self._hangs.pop(0))
                if self.delay:
                    await self._sleep(self.delay)
                failure = self._take_failure(request.path)
                if failure is not None:
                    return self._raw_response(failure.status, failure.body, failure.headers)
                return await handler(request)
            finally:
                self._active -= 1
                if hold is not None:
                    hold.answered.set()

        # Large bodies must reach the fake so that a proxy's own size limit is what gets tested.
        app = web.Application(middlewares=[record_and_inject], client_max_size=256 * 2**20)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_response_prepare.append(self._add_headers)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model_detail)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._stopping = asyncio.Event()

    async def _on_shutdown(self, app: web.Application) -> None:
        # Wake hanging handlers so that stopping the server never waits for a test's hang.
        if self._stopping is not None:
            self._stopping.set()
        for hold in self._held:
            hold.release()

    async def _sleep(self, seconds: float) -> None:
        if self._stopping is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        started = request.get(_STARTED, time.monotonic())
        headers = {
            "x-request-id": request.get(_REQUEST_ID, "req_unknown"),
            "openai-processing-ms": str(int((time.monotonic() - started) * 1000)),
            "openai-version": "2020-10-01",
            "openai-organization": "org-fake",
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-remaining-requests": "99",
            "x-ratelimit-reset-requests": "600ms",
            "set-cookie": "__cf_bm=fake; Path=/",
            **self.extra_headers,
        }
        for name, value in headers.items():
            response.headers.setdefault(name, value)

    def _take_failure(self, path: str) -> _Failure | None:
        for failure in self._failures:
            if failure.path is None or path.endswith(failure.path):
                failure.times -= 1
                if failure.times <= 0:
                    self._failures.remove(failure)
                return failure
        return None

    def _salt(self) -> str:
        if not self.nondeterministic:
            return ""
        self._generation += 1
        return str(self._generation)

    def _json_response(self, payload: Any, status: int = 200) -> web.Response:
        # OpenAI pretty-prints non-streaming bodies.
        data = orjson.dumps(payload, option=orjson.OPT_INDENT_2)
        headers = {"Content-Type": "application/json"}
        if self.gzip:
            data = gzip_module.compress(data)
            headers["Content-Encoding"] = "gzip"
        return web.Response(status=status, body=data, headers=headers)

    def _raw_response(self, status: int, body: Any, headers: dict[str, str]) -> web.Response:
        if isinstance(body, dict | list):
            response = self._json_response(body, status)
        else:
            data = body.encode() if isinstance(body, str) else bytes(body)
            response = web.Response(status=status, body=data)
        response.headers.update(headers)
        return response

    def _invalid(
        self, message: str, param: str | None = None, code: str | None = None
    ) -> web.Response:
        return self._json_response(error_envelope(400, message, param=param, code=code), 400)

    def _body(self, request: web.Request, *required: str) -> JSON | web.Response:
        body = request[_CALL].body
        if not isinstance(body, dict):
            return self._invalid(
                "We could not parse the JSON body of your request. (HINT: This likely means you "
                "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
            )
        for name in required:
            if body.get(name) in (None, "", []):
                return self._invalid(
                    f"Missing required parameter: '{name}'.", name, "missing_required_parameter"
                )
        return body

    async def _stream(self, request: web.Request, stream: _Stream) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            },
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        drop_after = self._drops.pop(0) if self._drops else None
        error = self._error_frames.pop(0) if self._error_frames else None
        frames = list(self._frames(stream, error))
        events = sum(1 for is_event, _ in frames if is_event)
        sent = 0
        try:
            for is_event, frame in frames:
                if is_event and drop_after is not None and sent >= drop_after:
                    break
                await response.write(frame)
                if is_event:
                    sent += 1
                    if self.chunk_delay and sent < events:
                        await self._sleep(self.chunk_delay)
            if drop_after is not None:
                # Abort: no terminating chunk (and no [DONE] unless it was within the count).
                # close() still flushes what was written before it.
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away (after [DONE], or on a timeout): nothing to finish
        return response

    def _frames(self, stream: _Stream, error: JSON | None) -> Iterator[tuple[bool, bytes]]:
        """(is_event, bytes) to write; keep-alive comments are not events."""
        events = list(stream.events)
        done = stream.done
        if error is not None:
            frame = orjson.dumps({"error": error["error"]}).decode()
            events = [*events[: error["after"]], _Event(frame)]
            done = False
        if self.keepalive_comments:
            yield False, b": keep-alive\n\n"
        for position, event in enumerate(events):
            prefix = f"event: {event.name}\n" if event.name else ""
            yield True, f"{prefix}data: {event.data}\n\n".encode()
            if self.keepalive_comments and position % 4 == 3:
                yield False, b": keep-alive\n\n"
        if done:
            yield True, b"data: [DONE]\n\n"

    # ---- routes

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = self._body(request, "model", "messages")
        if isinstance(body, web.Response):
            return body
        if not isinstance(body["messages"], list):
            return self._invalid("'messages' must be an array.", "messages", "invalid_type")
        salt = self._salt()
        if body.get("stream") is True:
            chunks = self.chat_chunks(body, salt)
            return await self._stream(request, _Stream([_Event(_dump(c)) for c in chunks], True))
        return self._json_response(self.chat_completion(body, salt))

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = self._body(request, "model", "prompt")
        if isinstance(body, web.Response):
            return body
        salt = self._salt()
        if body.get("stream") is True:
            chunks = self.text_completion_chunks(body, salt)
            return await self._stream(request, _Stream([_Event(_dump(c)) for c in chunks], True))
        return self._json_response(self.text_completion(body, salt))

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = self._body(request, "model", "input")
        if isinstance(body, web.Response):
            return body
        if body.get("encoding_format") not in (None, "float", "base64"):
            return self._invalid(
                "Invalid value for 'encoding_format'.", "encoding_format", "invalid_value"
            )
        return self._json_response(self.embeddings(body, self._salt()))

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = self._body(request, "model")
        if isinstance(body, web.Response):
            return body
        salt = self._salt()
        if body.get("stream") is True:
            events = [_Event(_dump(e), e["type"]) for e in self.response_events(body, salt)]
            return await self._stream(request, _Stream(events, False))
        return self._json_response(self.response(body, salt))

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return self._json_response({"object": "list", "data": [_model(m) for m in self.models]})

    async def _model_detail(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        if name not in self.models:
            message = f"The model '{name}' does not exist"
            return self._json_response(error_envelope(404, message, param="model"), 404)
        return self._json_response(_model(name))

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        call = request[_CALL]
        return self._json_response(
            {"echo": {"method": call.method, "path": call.path, "body": call.body}}
        )


def _dump(payload: Any) -> str:
    return orjson.dumps(payload).decode()


def _model(name: str) -> JSON:
    created = int.from_bytes(hashlib.sha256(name.encode()).digest()[:3], "big") + 1_680_000_000
    return {"id": name, "object": "model", "created": created, "owned_by": "system"}


def _unit_vector(digest: bytes, dims: int) -> list[float]:
    """`dims` floats of unit length, each exactly representable as float32."""
    raw = bytearray()
    block = digest
    while len(raw) < 2 * dims:
        raw += block
        block = hashlib.sha256(block).digest()
    values = [struct.unpack_from("<h", raw, 2 * i)[0] / 32768 for i in range(dims)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in values]


def main() -> None:
    """Serve the fake upstream on a port: `python -m tests.fake_upstream --port 9999`.

    Used to make the example's recordings without a real API key or network.
    """
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999)
    args = parser.parse_args()
    web.run_app(FakeUpstream().app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
