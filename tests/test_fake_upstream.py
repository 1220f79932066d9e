"""The fake upstream speaks OpenAI's wire format: the real openai SDK pointed straight at it works.

Also covers `tests.servers` (the background loop the fake and the proxy run on).
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import socket
import struct
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import openai
import pytest
from aiohttp import web
from openai import AsyncOpenAI, OpenAI

from tests.fake_upstream import (
    CITIES,
    VOCABULARY,
    FakeUpstream,
    chat_request,
    completion,
    embedding_request,
    legacy_request,
    request_digest,
    responses_request,
    text_pieces,
    tool,
)
from tests.servers import BackgroundLoop, free_port

# ---- fixtures (`loop` and `upstream` come from conftest.py)


@pytest.fixture
def client(upstream: FakeUpstream) -> Iterator[OpenAI]:
    with OpenAI(base_url=upstream.base_url, api_key="test-key", max_retries=0) as sdk:
        yield sdk


# ---- helpers


def raw_request(
    url: str, method: str = "POST", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request over a plain socket: status, headers and the body bytes as received."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def data_frames(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, comments dropped."""
    frames = raw.decode().split("\n\n")
    assert frames[-1] == "", "the body must end with a blank line"
    out = []
    for frame in frames[:-1]:
        lines = [line for line in frame.split("\n") if not line.startswith(":")]
        out += [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return out


# ---- chat completions


def test_chat_non_stream_has_openai_shape(upstream: FakeUpstream, client: OpenAI) -> None:
    result = client.chat.completions.create(**chat_request())

    assert result.id.startswith("chatcmpl-")
    assert result.object == "chat.completion"
    assert isinstance(result.created, int)
    assert result.model == "gpt-4o-mini-2024-07-18"
    assert result.system_fingerprint == "fp_fake0001"
    assert result.service_tier == "default"
    assert result._request_id is not None and result._request_id.startswith("req_")
    (choice,) = result.choices
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.logprobs is None
    assert choice.message.role == "assistant"
    assert choice.message.refusal is None
    assert choice.message.annotations == []
    assert choice.message.tool_calls is None
    assert choice.message.content is not None and len(choice.message.content.split()) >= 6
    assert result.usage is not None
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.usage.prompt_tokens_details is not None
    assert result.usage.prompt_tokens_details.cached_tokens == 0
    assert result.usage.completion_tokens_details is not None
    assert result.usage.completion_tokens_details.reasoning_tokens == 0
    # The SDK kept nothing it didn't know: the body is exactly the documented shape.
    assert result.model_extra == {}
    assert result.model_dump(exclude_unset=True) == upstream.chat_completion(chat_request())


def test_calls_are_recorded_as_received(upstream: FakeUpstream, client: OpenAI) -> None:
    client.chat.completions.create(**chat_request(), extra_query={"api-version": "1"})

    assert upstream.count() == 1
    assert upstream.count("/chat/completions") == 1
    assert upstream.count("/embeddings") == 0
    call = upstream.last
    assert call.method == "POST"
    assert call.path == "/v1/chat/completions?api-version=1"
    assert call.headers["authorization"] == "Bearer test-key"
    assert call.headers["content-type"] == "application/json"
    assert call.body == chat_request()
    assert json.loads(call.raw) == chat_request()
    upstream.reset()
    assert upstream.calls == []


def test_response_headers_include_what_a_proxy_must_not_store(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(**chat_request())

    assert raw.headers["content-type"] == "application/json"
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["openai-version"] == "2020-10-01"
    assert raw.headers["openai-organization"] == "org-fake"
    assert raw.headers["x-ratelimit-remaining-requests"] == "99"
    assert raw.headers["set-cookie"] == "__cf_bm=fake; Path=/"
    assert int(raw.headers["openai-processing-ms"]) >= 0
    assert raw.parse().choices[0].message.content


def test_extra_headers_and_null_fingerprint(upstream: FakeUpstream, client: OpenAI) -> None:
    upstream.extra_headers = {"x-extra": "yes"}
    upstream.fingerprint = None

    raw = client.chat.completions.with_raw_response.create(**chat_request())

    assert raw.headers["x-extra"] == "yes"
    assert raw.parse().system_fingerprint is None
    assert b'"system_fingerprint": null' in raw.content


def test_chat_stream_with_usage(upstream: FakeUpstream, client: OpenAI) -> None:
    body = chat_request(stream_options={"include_usage": True})
    chunks = list(client.chat.completions.create(**body, stream=True))

    first, *middle, finish, last = chunks
    assert {c.id for c in chunks} == {first.id}
    assert {c.created for c in chunks} == {first.created}
    assert {c.model for c in chunks} == {"gpt-4o-mini-2024-07-18"}
    assert {c.system_fingerprint for c in chunks} == {"fp_fake0001"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert all(c.usage is None for c in chunks[:-1])
    assert all(isinstance(c.obfuscation, str) and c.obfuscation for c in chunks)
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert all(len(c.choices[0].delta.content.split()) == 1 for c in middle)  # type: ignore[union-attr]
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.content is None
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == len(middle)
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert content == client.chat.completions.create(**body).choices[0].message.content


def test_chat_stream_wire_framing(upstream: FakeUpstream) -> None:
    body = chat_request(stream=True, stream_options={"include_usage": True})
    status, headers, raw = raw_request(upstream.base_url + "/chat/completions", body=body)

    assert status == 200
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    assert raw.startswith(b": keep-alive\n\ndata: {")
    assert raw.endswith(b"data: [DONE]\n\n")
    payloads = data_frames(raw)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    # Compact JSON on one line, members in OpenAI's order.
    assert all(
        p == json.dumps(c, separators=(",", ":"), ensure_ascii=False)
        for p, c in zip(payloads, chunks, strict=False)
    )
    assert list(chunks[0]) == [
        "id", "object", "created", "model", "service_tier", "system_fingerprint",
        "choices", "usage", "obfuscation",
    ]  # fmt: skip
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_keepalive_comments_can_be_switched_off(upstream: FakeUpstream) -> None:
    upstream.keepalive_comments = False
    _, _, raw = raw_request(upstream.base_url + "/chat/completions", body=chat_request(stream=True))

    assert b": keep-alive" not in raw
    assert raw.startswith(b"data: {")


def test_obfuscation_can_be_switched_off(upstream: FakeUpstream, client: OpenAI) -> None:
    body = chat_request(stream_options={"include_obfuscation": False})
    chunks = list(client.chat.completions.create(**body, stream=True))

    assert all(c.obfuscation is None for c in chunks)


def test_stream_helper_assembles_the_same_completion(client: OpenAI) -> None:
    with client.chat.completions.stream(**chat_request()) as stream:
        final = stream.get_final_completion()

    expected = client.chat.completions.create(**chat_request())
    assert final.choices[0].message.content == expected.choices[0].message.content
    assert final.id == expected.id
    assert final.system_fingerprint == "fp_fake0001"


def test_tool_call_non_stream(client: OpenAI) -> None:
    result = client.chat.completions.create(**chat_request(tools=[tool()]))

    (choice,) = result.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_")
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in CITIES


def test_tool_choice_none_and_named_function(client: OpenAI) -> None:
    tools = [tool("get_weather"), tool("get_time")]
    plain = client.chat.completions.create(**chat_request(tools=tools, tool_choice="none"))
    named = client.chat.completions.create(
        **chat_request(
            tools=tools, tool_choice={"type": "function", "function": {"name": "get_time"}}
        )
    )

    assert plain.choices[0].finish_reason == "stop"
    assert plain.choices[0].message.content
    assert named.choices[0].message.tool_calls[0].function.name == "get_time"  # type: ignore[index]


def test_tool_call_stream_joins_to_the_non_stream_call(client: OpenAI) -> None:
    body = chat_request(tools=[tool()])
    chunks = list(client.chat.completions.create(**body, stream=True))

    fragments = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert len(fragments) >= 3  # the header fragment, then arguments in at least two pieces
    head, *rest = fragments
    assert head.id is not None and head.type == "function"
    assert head.function is not None and head.function.name == "get_weather"
    assert all(f.id is None and f.type is None for f in rest)
    assert all(f.function is not None and f.function.name is None for f in rest)
    arguments = "".join(f.function.arguments or "" for f in fragments if f.function)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    expected = client.chat.completions.create(**body).choices[0].message.tool_calls
    assert expected is not None
    assert arguments == expected[0].function.arguments  # type: ignore[union-attr]
    assert head.id == expected[0].id


def test_n_choices_differ_and_stream_interleaves(client: OpenAI) -> None:
    body = chat_request(n=2)
    result = client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(**body, stream=True))

    assert [c.index for c in result.choices] == [0, 1]
    texts = [c.message.content for c in result.choices]
    assert texts[0] != texts[1]
    indices = [c.choices[0].index for c in chunks]
    assert indices[:4] == [0, 1, 0, 1]
    streamed = [
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
        for i in (0, 1)
    ]
    assert streamed == texts


def test_logprobs(client: OpenAI) -> None:
    result = client.chat.completions.create(**chat_request(logprobs=True))

    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert "".join(t.token for t in logprobs.content) == result.choices[0].message.content
    for entry in logprobs.content:
        assert entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs == []
    chunks = list(client.chat.completions.create(**chat_request(logprobs=True), stream=True))
    assert any(c.choices[0].logprobs and c.choices[0].logprobs.content for c in chunks)


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_small_token_limit_truncates(client: OpenAI, limit: str) -> None:
    result = client.chat.completions.create(**chat_request(**{limit: 3}))

    assert result.choices[0].finish_reason == "length"
    assert len((result.choices[0].message.content or "").split()) == 3
    assert result.usage is not None and result.usage.completion_tokens == 3


@pytest.mark.parametrize("missing", ["model", "messages"])
def test_missing_required_member_is_a_400(upstream: FakeUpstream, missing: str) -> None:
    body = chat_request()
    del body[missing]
    with (
        OpenAI(base_url=upstream.base_url, api_key="test-key", max_retries=0) as sdk,
        pytest.raises(openai.BadRequestError) as caught,
    ):
        sdk.post("/chat/completions", body=body, cast_to=object)

    assert caught.value.status_code == 400
    assert caught.value.param == missing
    assert caught.value.type == "invalid_request_error"


def test_malformed_json_is_a_400(upstream: FakeUpstream) -> None:
    status, _, raw = raw_request(
        upstream.base_url + "/chat/completions",
        body=None,
        headers={"content-type": "application/json"},
    )

    assert status == 400
    assert json.loads(raw)["error"]["type"] == "invalid_request_error"


# ---- determinism


def test_same_request_same_output_other_seed_other_output(client: OpenAI) -> None:
    def content(**overrides: Any) -> str | None:
        return (
            client.chat.completions.create(**chat_request(**overrides)).choices[0].message.content
        )

    first = content()
    assert content() == first
    assert content(temperature=0.0) == first  # numbers compare by value
    assert content(user="someone", metadata={"a": "b"}, seed=123) == first  # bookkeeping
    assert content(seed=124) != first
    assert content(temperature=0.7) != first
    assert content(seed=None) != first


def test_vocabulary_has_non_ascii_words() -> None:
    texts = ["".join(text_pieces(request_digest("chat", chat_request(seed=s)))) for s in range(20)]

    assert any("café" in t.lower() or "naïve" in t for t in texts)
    assert all(6 <= len(t.split()) <= 12 for t in texts)
    assert {w.strip(".").lower() for t in texts for w in t.split()} <= set(VOCABULARY)


def test_nondeterministic_switch(upstream: FakeUpstream, client: OpenAI) -> None:
    upstream.nondeterministic = True
    outputs = {
        client.chat.completions.create(**chat_request()).choices[0].message.content
        for _ in range(3)
    }
    assert len(outputs) == 3

    upstream.nondeterministic = False
    outputs = {
        client.chat.completions.create(**chat_request()).choices[0].message.content
        for _ in range(2)
    }
    assert len(outputs) == 1


def test_completion_factory_matches_the_sdk_types() -> None:
    parsed = openai.types.chat.ChatCompletion.model_validate(completion(content="hi"))

    assert parsed.choices[0].message.content == "hi"
    assert parsed.model_extra == {}


# ---- other endpoints


def test_embeddings_sdk_default_base64_equals_float(upstream: FakeUpstream, client: OpenAI) -> None:
    implicit = client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    explicit = client.embeddings.create(**embedding_request(input=["one", "two"]))

    assert upstream.calls[0].body["encoding_format"] == "base64"
    assert upstream.calls[1].body["encoding_format"] == "float"
    assert [e.embedding for e in implicit.data] == [e.embedding for e in explicit.data]
    assert len(implicit.data) == 2 and len(implicit.data[0].embedding) == 8
    assert implicit.data[0].embedding != implicit.data[1].embedding
    assert abs(sum(v * v for v in explicit.data[0].embedding) - 1) < 1e-5
    assert explicit.model == "text-embedding-3-small"
    assert explicit.usage.total_tokens == 2
    assert "system_fingerprint" not in (explicit.model_extra or {})


def test_embeddings_base64_wire_format(upstream: FakeUpstream) -> None:
    url = upstream.base_url + "/embeddings"
    _, _, as_base64 = raw_request(
        url, body=embedding_request(encoding_format="base64", dimensions=4)
    )
    _, _, as_floats = raw_request(url, body=embedding_request(dimensions=4))

    encoded = json.loads(as_base64)["data"][0]["embedding"]
    decoded = list(struct.unpack("<4f", base64.b64decode(encoded)))
    assert decoded == json.loads(as_floats)["data"][0]["embedding"]


def test_responses_create(upstream: FakeUpstream, client: OpenAI) -> None:
    result = client.responses.create(**responses_request())

    assert result.id.startswith("resp_")
    assert result.object == "response"
    assert result.status == "completed"
    assert result.model == "gpt-4o-mini-2024-07-18"
    assert len(result.output_text.split()) >= 6
    assert result.output[0].type == "message"
    assert result.usage is not None
    assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens
    assert "system_fingerprint" not in (result.model_extra or {})
    assert client.responses.create(**responses_request()).output_text == result.output_text


def test_responses_stream(client: OpenAI) -> None:
    events = list(client.responses.create(**responses_request(), stream=True))

    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == client.responses.create(**responses_request()).output_text
    with client.responses.stream(**responses_request()) as stream:
        assert stream.get_final_response().output_text == deltas


def test_responses_stream_wire_has_event_names_and_no_done(upstream: FakeUpstream) -> None:
    _, _, raw = raw_request(upstream.base_url + "/responses", body=responses_request(stream=True))

    assert b"event: response.created\ndata: {" in raw
    assert raw.endswith(b"\n\n")
    assert b"[DONE]" not in raw
    for frame in raw.decode().split("\n\n")[:-1]:
        if frame.startswith("event: "):
            name, data = frame.split("\n")
            assert json.loads(data.removeprefix("data: "))["type"] == name.removeprefix("event: ")


def test_legacy_completions(client: OpenAI) -> None:
    result = client.completions.create(**legacy_request())
    chunks = list(
        client.completions.create(
            **legacy_request(), stream=True, stream_options={"include_usage": True}
        )
    )

    assert result.object == "text_completion"
    assert result.id.startswith("cmpl-")
    assert result.model == "gpt-3.5-turbo-instruct-2024-07-18"
    assert result.system_fingerprint == "fp_fake0001"
    assert result.choices[0].finish_reason == "stop"
    assert {c.object for c in chunks} == {"text_completion"}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert "".join(c.choices[0].text for c in chunks[:-1]) == result.choices[0].text
    assert (
        client.completions.create(**legacy_request(max_tokens=2)).choices[0].finish_reason
        == "length"
    )


def test_models(upstream: FakeUpstream, client: OpenAI) -> None:
    models = client.models.list()

    assert [m.id for m in models] == list(upstream.models)
    assert client.models.retrieve("gpt-4o-mini").owned_by == "system"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_other_paths_echo(upstream: FakeUpstream) -> None:
    status, _, raw = raw_request(upstream.url + "/v1/files?purpose=x", body={"a": 1})
    assert status == 200
    assert json.loads(raw) == {
        "echo": {"method": "POST", "path": "/v1/files?purpose=x", "body": {"a": 1}}
    }

    status, _, raw = raw_request(upstream.base_url + "/chat/completions/abc", method="GET")
    assert json.loads(raw)["echo"]["method"] == "GET"


# ---- failure injection


def test_fail_next_429_is_a_rate_limit_error(upstream: FakeUpstream, client: OpenAI) -> None:
    upstream.fail_next(429)

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**chat_request())

    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "0"
    assert caught.value.request_id is not None
    assert client.chat.completions.create(**chat_request()).choices[0].message.content
    assert upstream.count() == 2


def test_fail_next_times_path_and_custom_body(upstream: FakeUpstream, client: OpenAI) -> None:
    upstream.fail_next(500, times=2, path="/chat/completions")
    upstream.fail_next(503, body="plain text", headers={"x-should-retry": "false"}, path="/models")

    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(**chat_request())
        assert caught.value.type == "server_error"
    with pytest.raises(openai.InternalServerError) as caught:
        client.models.list()
    assert caught.value.response.text == "plain text"
    assert client.chat.completions.create(**chat_request()).choices
    assert client.models.list().data


def test_retries_see_the_same_failure_queue(upstream: FakeUpstream) -> None:
    upstream.fail_next(429, headers={"retry-after-ms": "10"})
    with OpenAI(base_url=upstream.base_url, api_key="test-key", max_retries=1) as sdk:
        assert sdk.chat.completions.create(**chat_request()).choices

    assert upstream.count() == 2
    assert [c.headers["x-stainless-retry-count"] for c in upstream.calls] == ["0", "1"]


def test_dropped_stream_raises_api_connection_error(upstream: FakeUpstream, client: OpenAI) -> None:
    upstream.drop_stream_after(3)
    stream = client.chat.completions.create(**chat_request(), stream=True)
    received = []

    with pytest.raises(openai.APIConnectionError) as caught:
        for chunk in stream:
            received.append(chunk)

    assert len(received) == 3
    assert isinstance(caught.value.__cause__, httpx2.RemoteProtocolError)
    # The next stream is whole again.
    assert list(client.chat.completions.create(**chat_request(), stream=True))


def test_dropped_stream_leaves_the_chunked_body_unterminated(upstream: FakeUpstream) -> None:
    upstream.drop_stream_after(2)

    with pytest.raises(http.client.IncompleteRead) as caught:
        raw_request(upstream.base_url + "/chat/completions", body=chat_request(stream=True))

    assert b"[DONE]" not in caught.value.partial
    assert caught.value.partial.count(b"data: ") == 2


def test_drop_before_done(upstream: FakeUpstream, client: OpenAI) -> None:
    events = len(upstream.chat_chunks(chat_request()))
    upstream.drop_stream_after(events)  # every chunk, but no [DONE] and no terminating chunk

    with pytest.raises(openai.APIConnectionError):
        list(client.chat.completions.create(**chat_request(), stream=True))


def test_error_frame_raises_api_error(upstream: FakeUpstream, client: OpenAI) -> None:
    upstream.error_frame_next("upstream died", code="boom")
    received = []

    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(**chat_request(), stream=True):
            received.append(chunk)

    assert not isinstance(caught.value, openai.APIStatusError)
    assert caught.value.message == "upstream died"
    assert caught.value.code == "boom"
    assert len(received) == 2


def test_error_frame_on_the_wire(upstream: FakeUpstream) -> None:
    upstream.error_frame_next(after=1)
    _, _, raw = raw_request(upstream.base_url + "/chat/completions", body=chat_request(stream=True))

    payloads = data_frames(raw)
    assert len(payloads) == 2
    assert json.loads(payloads[-1])["error"]["type"] == "server_error"


def test_hang_next_times_the_client_out(upstream: FakeUpstream, client: OpenAI) -> None:
    upstream.hang_next(30)
    started = time.monotonic()

    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).chat.completions.create(**chat_request())

    assert time.monotonic() - started < 5
    assert client.chat.completions.create(**chat_request()).choices  # only the next one hung


def test_hold_next_answers_only_once_released(upstream: FakeUpstream, client: OpenAI) -> None:
    held, passed = upstream.hold_next(), upstream.hold_next()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.chat.completions.create, **chat_request())
        assert held.arrived.wait(10)
        passed.release()  # before its request comes: it is not held at all
        second = client.chat.completions.create(**chat_request(seed=7))

        assert passed.answered.is_set() and not first.done()
        assert not held.answered.is_set()
        held.release()
        assert first.result(timeout=10).choices
    assert second.choices and held.answered.is_set()


def test_delay_and_chunk_delay(upstream: FakeUpstream, client: OpenAI) -> None:
    upstream.delay = 0.2
    upstream.chunk_delay = 0.02
    started = time.monotonic()
    chunks = list(client.chat.completions.create(**chat_request(), stream=True))

    assert time.monotonic() - started >= 0.2 + 0.02 * (len(chunks) - 1)


def test_gzip_body_decodes_through_the_sdk(upstream: FakeUpstream, client: OpenAI) -> None:
    upstream.gzip = True
    result = client.chat.completions.with_raw_response.create(**chat_request())

    assert result.headers["content-encoding"] == "gzip"
    assert result.parse().choices[0].message.content
    _, headers, raw = raw_request(
        upstream.base_url + "/chat/completions",
        body=chat_request(),
        headers={"accept-encoding": "gzip"},
    )
    assert int(headers["content-length"]) == len(raw)
    assert json.loads(gzip.decompress(raw))["object"] == "chat.completion"
    # Streams are never compressed.
    assert list(client.chat.completions.create(**chat_request(), stream=True))


# ---- the async client


async def test_async_client_chat_and_stream(upstream: FakeUpstream) -> None:
    async with AsyncOpenAI(base_url=upstream.base_url, api_key="test-key", max_retries=0) as sdk:
        result = await sdk.chat.completions.create(**chat_request())
        stream = await sdk.chat.completions.create(
            **chat_request(), stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]

    assert upstream.last.headers["x-stainless-async"].startswith("async:")
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == result.choices[0].message.content
    assert chunks[-1].usage is not None


async def test_async_client_dropped_stream(upstream: FakeUpstream) -> None:
    upstream.drop_stream_after(2)
    async with AsyncOpenAI(base_url=upstream.base_url, api_key="test-key", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(**chat_request(), stream=True)
        with pytest.raises(openai.APIConnectionError):
            async for _ in stream:
                pass


async def test_async_embeddings_and_responses(upstream: FakeUpstream) -> None:
    async with AsyncOpenAI(base_url=upstream.base_url, api_key="test-key", max_retries=0) as sdk:
        vectors = await sdk.embeddings.create(model="text-embedding-3-small", input="hi")
        response = await sdk.responses.create(**responses_request())

    assert len(vectors.data[0].embedding) == 8
    assert response.output_text


# ---- the background loop


def test_background_loop_runs_coroutines_and_apps() -> None:
    async def answer() -> int:
        return 42

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    with BackgroundLoop() as background:
        assert background.run(answer()) == 42
        app = web.Application()
        app.router.add_get("/", hello)
        running = background.start_app(app)
        assert running.url == f"http://127.0.0.1:{running.port}"
        assert raw_request(running.url + "/", method="GET")[2] == b"hello"
        other = background.start_app(FakeUpstream().app)
        assert other.port != running.port
        running.stop()
        running.stop()  # idempotent
        with pytest.raises(ConnectionRefusedError):
            raw_request(running.url + "/", method="GET")
        # `other` is still running: close() stops it.
    background.close()  # idempotent
    assert background.loop.is_closed()


def test_start_app_on_a_busy_port_raises(loop: BackgroundLoop) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError):
            loop.start_app(web.Application(), port=busy.getsockname()[1])


def test_free_port_can_be_bound(loop: BackgroundLoop) -> None:
    port = free_port()
    running = loop.start_app(FakeUpstream().app, port=port)
    try:
        assert running.port == port
    finally:
        running.stop()


def test_stop_does_not_wait_for_a_hanging_request(loop: BackgroundLoop) -> None:
    fake = FakeUpstream()
    running = loop.start_app(fake.app)
    fake.hang_next(60)
    with (
        OpenAI(base_url=running.url + "/v1", api_key="k", max_retries=0, timeout=0.2) as sdk,
        pytest.raises(openai.APITimeoutError),
    ):
        sdk.models.list()
    started = time.monotonic()
    running.stop()
    assert time.monotonic() - started < 2
