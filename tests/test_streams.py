"""Streams through the app: byte-for-byte replay, assembling and synthesising across the stream
flag, include_usage, pacing, broken and abandoned streams, coalesced streaming misses
(DESIGN §5, §9)."""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import math
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from proxy import handlers, sse
from proxy.app import AccessLog, create_app
from proxy.config import Config
from proxy.recording import Sample
from tests.conftest import API_KEY, HTTPResult, RunningProxy, StartProxy, raw_stream, status
from tests.fake_upstream import (
    DEFAULT_FINGERPRINT,
    FakeUpstream,
    chat_request,
    legacy_request,
    responses_request,
    tool,
)
from tests.servers import BackgroundLoop

CHAT = "/v1/chat/completions"
USAGE = {"include_usage": True}


def only_sample(proxy: RunningProxy) -> Sample:
    [recording] = proxy.recordings()
    [sample] = recording.samples
    return sample


def data_lines(body: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [
        line.removeprefix("data: ")
        for line in body.decode().split("\n")
        if line.startswith("data:")
    ]


def stream(proxy: RunningProxy, body: dict[str, Any], path: str = CHAT) -> HTTPResult:
    """A streaming request over raw HTTP, read to the end of the body."""
    return proxy.request("POST", path, {**body, "stream": True})


def text_of(chunks: list[Any], index: int = 0) -> str:
    """The content of choice `index` joined from SDK chunks."""
    return "".join(
        choice.delta.content or ""
        for chunk in chunks
        for choice in chunk.choices
        if choice.index == index
    )


def message_text(expected: dict[str, Any], index: int = 0) -> str:
    return str(expected["choices"][index]["message"]["content"])


# -- byte-for-byte replay -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"stream_options": {"include_usage": True}}, {"n": 2, "logprobs": True}],
    ids=["plain", "include_usage", "n2-logprobs"],
)
def test_a_streaming_replay_sends_the_recorded_payloads_exactly(
    overrides: dict[str, Any], proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat_request(**overrides)

    live = stream(proxy, body)
    replay = stream(proxy, body)

    assert (live.headers["x-seedcache-status"], replay.headers["x-seedcache-status"]) == (
        "recorded",
        "hit",
    )
    assert upstream.count() == 1
    assert data_lines(replay.body) == data_lines(live.body)
    assert data_lines(replay.body) == [e.data for e in only_sample(proxy).events or ()]
    assert replay.body.endswith(b"\n\ndata: [DONE]\n\n")
    assert replay.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in replay.headers
    assert replay.headers["transfer-encoding"] == "chunked"
    # Every recorded payload, including the random obfuscation padding, is the live one.
    assert [json.loads(d)["id"] for d in data_lines(replay.body)[:-1]] == [
        upstream.chat_completion(body)["id"]
    ] * (len(data_lines(replay.body)) - 1)


def test_keep_alive_comments_are_not_recorded(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    assert upstream.keepalive_comments  # the fake sends ": keep-alive" frames
    body = chat_request()

    stream(proxy, body)
    replay = stream(proxy, body)

    events = only_sample(proxy).events
    assert events is not None
    assert len(events) == len(upstream.chat_chunks(body)) + 1  # the chunks and [DONE]
    assert all(e.data and not e.data.startswith(":") and e.event is None for e in events)
    assert events[-1].data == "[DONE]"
    assert b"keep-alive" not in replay.body


def test_a_responses_stream_replays_its_named_events_without_done(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = responses_request()

    live = stream(proxy, body, "/v1/responses")
    replay = stream(proxy, body, "/v1/responses")

    assert replay.headers["x-seedcache-status"] == "hit"
    assert replay.body.replace(b": keep-alive\n\n", b"") == live.body.replace(
        b": keep-alive\n\n", b""
    )
    names = [line for line in replay.body.decode().split("\n") if line.startswith("event:")]
    assert names[0] == "event: response.created"
    assert names[-1] == "event: response.completed"
    assert b"[DONE]" not in replay.body
    events = only_sample(proxy).events or ()
    assert [e.event for e in events] == [e["type"] for e in upstream.response_events(body)]


# -- a non-streaming request from a streamed sample -----------------------------------------------


def test_a_plain_request_gets_the_completion_assembled_from_a_recorded_stream(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat_request(n=2, logprobs=True)
    stream(proxy, {**body, "stream_options": {"include_usage": True}})

    result = proxy.request("POST", CHAT, body)

    assert result.headers["x-seedcache-status"] == "hit"
    assert result.headers["content-type"].startswith("application/json")
    assert upstream.count() == 1
    assembled, expected = result.json(), upstream.chat_completion(body)
    assert assembled["object"] == "chat.completion"
    for name in ("id", "created", "model", "system_fingerprint", "usage", "service_tier"):
        assert assembled[name] == expected[name], name
    assert len(assembled["choices"]) == 2
    for got, want in zip(assembled["choices"], expected["choices"], strict=True):
        assert got["index"] == want["index"]
        assert got["message"]["role"] == "assistant"
        assert got["message"]["content"] == want["message"]["content"]
        assert got["finish_reason"] == want["finish_reason"] == "stop"
        assert got["logprobs"] == want["logprobs"]
    assert (
        assembled["choices"][0]["message"]["content"]
        != assembled["choices"][1]["message"]["content"]
    )


def test_assembled_tool_calls_have_their_arguments_joined(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat_request(tools=[tool()], seed=12)
    with proxy.client() as client:
        list(client.chat.completions.create(**body, stream=True))
        completion = client.chat.completions.create(**body)

    expected = upstream.chat_completion(body)["choices"][0]
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert [c.model_dump() for c in choice.message.tool_calls or []] == expected["message"][
        "tool_calls"
    ]
    assert json.loads(choice.message.tool_calls[0].function.arguments)["city"]  # type: ignore[index, union-attr]
    assert upstream.count() == 1


def test_an_assembled_completion_says_usage_null_when_the_stream_carried_none(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat_request(seed=14)
    stream(proxy, body)

    assembled = proxy.request("POST", CHAT, body).json()
    with proxy.client() as client:
        parsed = client.chat.completions.create(**body)

    # A completion always has `usage`: a client reading it as JSON finds the member.
    assert "usage" in assembled and assembled["usage"] is None
    assert list(assembled).index("usage") == list(assembled).index("choices") + 1
    assert parsed.usage is None and parsed.id == assembled["id"]
    live = upstream.chat_completion(body)["choices"][0]["message"]
    assert assembled["choices"][0]["message"]["content"] == live["content"]
    assert assembled["choices"][0]["message"]["annotations"] == live["annotations"] == []
    assert assembled["system_fingerprint"] == DEFAULT_FINGERPRINT


def test_a_legacy_completion_is_assembled_from_its_stream(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = legacy_request()
    with proxy.client() as client:
        list(client.completions.create(**body, stream=True))
        completion = client.completions.create(**body)

    expected = upstream.text_completion(body)
    assert completion.object == "text_completion"
    assert completion.id == expected["id"]
    assert completion.choices[0].text == expected["choices"][0]["text"]
    assert completion.choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    assert completion.usage is None  # the stream did not ask for it
    assert upstream.count() == 1


# -- a streaming request from a non-streamed sample -----------------------------------------------


def test_a_stream_is_synthesised_from_a_plain_sample_with_a_usage_chunk_when_asked(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat_request(seed=13)
    expected = upstream.chat_completion(body)
    with proxy.client() as client:
        client.chat.completions.create(**body)
        raw = client.chat.completions.with_raw_response.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(raw.parse())

    assert raw.headers["x-seedcache-status"] == "hit"
    assert upstream.count() == 1
    assert text_of(chunks) == message_text(expected)
    assert {c.id for c in chunks} == {expected["id"]}
    assert {c.system_fingerprint for c in chunks} == {DEFAULT_FINGERPRINT}
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == expected["usage"]["total_tokens"]
    assert all(c.usage is None for c in chunks[:-1])
    finish = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finish == ["stop"]


def test_a_stream_synthesised_without_include_usage_has_no_usage_chunk(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat_request(seed=13)
    proxy.request("POST", CHAT, body)

    replay = stream(proxy, body)

    assert replay.headers["x-seedcache-status"] == "hit"
    assert replay.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in replay.headers
    payloads = data_lines(replay.body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["choices"] for c in chunks)
    assert all(c.get("usage") is None for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == (
        message_text(upstream.chat_completion(body))
    )


def test_a_responses_stream_is_synthesised_from_a_plain_response(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = responses_request(input="Synthesise me.")
    with proxy.client() as client:
        plain = client.responses.create(**body)
        events = list(client.responses.create(**body, stream=True))

    assert upstream.count() == 1
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    assert events[-1].response.id == plain.id
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text


def test_a_synthesised_responses_stream_streams_reasoning_summaries_and_annotations(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = responses_request(input="Think, then cite.")
    answer = upstream.response(body)
    summary = [{"type": "summary_text", "text": "Weighed two sources."}]
    reasoning = {"id": "rs_" + "1" * 24, "type": "reasoning", "summary": summary}
    citation = {
        "type": "url_citation",
        "url": "https://example.com/a",
        "title": "A",
        "start_index": 0,
        "end_index": 3,
    }
    message = answer["output"][0]
    message["content"][0]["annotations"] = [citation]
    answer["output"] = [reasoning, message]
    upstream.fail_next(200, answer, path="/responses")
    with proxy.client() as client:
        plain = client.responses.create(**body)
        events = list(client.responses.create(**body, stream=True))
        with client.responses.stream(**body) as stream:
            final = stream.get_final_response()

    assert upstream.count() == 1
    types = [e.type for e in events]
    assert types[types.index("response.output_item.added") :][:6] == [
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
    ]
    assert events[types.index("response.output_item.added")].item.summary == []
    deltas = [e.delta for e in events if e.type == "response.reasoning_summary_text.delta"]
    assert deltas == ["Weighed two sources."]
    [added] = [e for e in events if e.type == "response.output_text.annotation.added"]
    annotation = added.annotation  # a model in recent SDKs, a dict in older ones
    dumped = annotation if isinstance(annotation, dict) else annotation.model_dump()
    assert (added.annotation_index, dumped) == (0, citation)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # The helper's own accumulation (a ParsedResponse) comes to the plain answer.
    assert (final.id, final.output_text) == (plain.id, plain.output_text)
    assert final.output[0].model_dump() == plain.output[0].model_dump()


def test_a_stream_asking_usage_the_recorded_stream_never_had_is_recorded_again(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # The recording cannot know the usage: auto mode asks the upstream, and keeps the answer.
    body = chat_request(seed=15)
    usage = {"include_usage": True}
    with proxy.client() as client:
        recorded = list(client.chat.completions.create(**body, stream=True))
        live = client.chat.completions.with_raw_response.create(
            **body, stream=True, stream_options=usage
        )
        asked = list(live.parse())
        again = list(client.chat.completions.create(**body, stream=True, stream_options=usage))

    assert all(c.choices for c in recorded)
    assert status(live) == "recorded"
    assert upstream.count() == 2
    for chunks in (asked, again):
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert (
            chunks[-1].usage.model_dump(exclude_none=True)
            == upstream.chat_completion(body)["usage"]
        )
        assert all(c.choices for c in chunks[:-1])
    assert text_of(again) == text_of(recorded) == message_text(upstream.chat_completion(body))


def test_in_replay_a_stream_asking_usage_the_recording_never_had_is_an_explained_miss(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    body = chat_request(seed=15)
    stream(start_proxy(), body)
    replay = start_proxy(mode="replay")

    with replay.client() as client, pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})

    assert "include_usage" in str(caught.value)
    assert upstream.count() == 1
    assert stream(replay, body).headers["x-seedcache-status"] == "hit"  # without it: a hit


def test_a_stream_recorded_with_usage_has_no_usage_chunk_when_a_replay_does_not_ask(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat_request(seed=16)
    with proxy.client() as client:
        recorded = list(
            client.chat.completions.create(
                **body, stream=True, stream_options={"include_usage": True}
            )
        )
        replayed = list(client.chat.completions.create(**body, stream=True))

    assert upstream.count() == 1
    assert recorded[-1].choices == [] and recorded[-1].usage is not None
    assert all(c.choices for c in replayed)
    assert all(c.usage is None for c in replayed)
    assert text_of(replayed) == text_of(recorded)


def test_a_plain_stream_replayed_from_a_stream_recorded_with_usage_is_the_plain_stream(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # An eval that streams a prompt with include_usage and later without it gets, the second
    # time, what the upstream sends a plain stream: the same chunks, logprobs and all, without
    # the usage chunk and without the `"usage": null` of each chunk (not chunks rebuilt from
    # the assembled answer).
    body = chat_request(seed=25, logprobs=True, top_logprobs=2)
    unpadded = {"include_obfuscation": False}  # random padding, live
    with proxy.client() as client:
        recorded = list(
            client.chat.completions.create(
                **body, stream=True, stream_options={**USAGE, **unpadded}
            )
        )
    replayed = stream(proxy, {**body, "stream_options": unpadded})

    assert upstream.count() == 1
    assert status(replayed) == "hit"
    live = upstream.chat_chunks({**body, "stream": True, "stream_options": unpadded})
    plain = [orjson.dumps(chunk).decode() for chunk in live]
    assert data_lines(replayed.body) == [*plain, "[DONE]"]
    assert len(plain) == len(recorded) - 1 and len(plain) > 3
    assert all('"usage"' not in line for line in plain)


@pytest.mark.parametrize("replay_timing", [False, True])
def test_a_stream_asking_for_no_padding_replays_as_the_upstream_sends_it_unpadded(
    replay_timing: bool, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # Recorded with the random `obfuscation` padding of each chunk (the default), replayed to a
    # stream that turns it off: the chunks the upstream sends then, byte for byte.
    proxy = start_proxy(replay_timing=replay_timing)
    body = chat_request(seed=26)
    unpadded = {"include_obfuscation": False}
    recorded = stream(proxy, body)
    replayed = stream(proxy, {**body, "stream_options": unpadded})

    assert (status(recorded), status(replayed)) == ("recorded", "hit")
    assert all('"obfuscation"' in line for line in data_lines(recorded.body)[:-1])
    live = upstream.chat_chunks({**body, "stream": True, "stream_options": unpadded})
    assert data_lines(replayed.body) == [*(orjson.dumps(c).decode() for c in live), "[DONE]"]
    assert upstream.count() == 1


# -- pacing ---------------------------------------------------------------------------------------


def test_replay_timing_reproduces_the_recorded_pacing(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(replay_timing=True)
    upstream.chunk_delay = 0.05
    body = chat_request(seed=17)
    stream(proxy, body)  # read to the end of the body: the recording is stored by then
    chunks = only_sample(proxy).events or ()
    offsets = [e.t_ms for e in chunks if e.data != "[DONE]"]
    recorded_span = (offsets[-1] - offsets[0]) / 1000
    with proxy.client() as client:
        arrivals = [time.monotonic() for _ in client.chat.completions.create(**body, stream=True)]

    assert len(offsets) >= 5
    assert recorded_span >= 0.05 * (len(offsets) - 1) * 0.8
    assert upstream.count() == 1
    assert arrivals[-1] - arrivals[0] >= 0.8 * recorded_span


def test_a_paced_replay_fills_long_silences_with_keep_alive_comments(
    start_proxy: StartProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A model that thinks for 90 s before its first token, kept alive upstream by comments that
    # are not recorded, would otherwise replay as 90 s of silence: past a client's read timeout.
    monkeypatch.setattr(handlers, "PACED_KEEP_ALIVE", 0.03)
    proxy = start_proxy(replay_timing=True)
    upstream.chunk_delay = 0.08
    body = chat_request(seed=18)
    recorded = stream(proxy, body)

    replayed = stream(proxy, body)

    assert status(replayed) == "hit"
    comments = recorded.body.count(b": keep-alive\n\n")  # the upstream's own, not recorded
    assert replayed.body.count(b": keep-alive\n\n") >= comments + len(data_lines(recorded.body)) - 2
    assert data_lines(replayed.body) == data_lines(recorded.body)
    with proxy.client() as client:
        chunks = list(client.chat.completions.create(**body, stream=True))
    assert text_of(chunks) == upstream.chat_completion(body)["choices"][0]["message"]["content"]


# -- the SDK's stream helpers, which accumulate events themselves --------------------------------


@pytest.mark.parametrize("recorded_as", ["plain", "stream"])
@pytest.mark.parametrize(
    "extra",
    [{"n": 2}, {"logprobs": True, "top_logprobs": 2}, {"tools": [tool()]}],
    ids=["n2", "logprobs", "tools"],
)
def test_the_sdks_chat_stream_helper_accepts_replays(
    recorded_as: str, extra: dict[str, Any], proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat_request(seed=31, **extra)
    with proxy.client() as client:
        if recorded_as == "stream":
            with client.chat.completions.stream(**body) as live_stream:
                live = live_stream.get_final_completion()
        else:
            live = client.chat.completions.create(**body)
        with client.chat.completions.stream(**body) as replayed:
            final = replayed.get_final_completion()

    assert upstream.count() == 1
    assert final.id == live.id
    assert len(final.choices) == len(live.choices)
    for got, want in zip(final.choices, live.choices, strict=True):
        assert got.message.content == want.message.content
        assert got.finish_reason == want.finish_reason
        got_calls, want_calls = got.message.tool_calls or [], want.message.tool_calls or []
        assert [c.function.arguments for c in got_calls] == [
            c.function.arguments for c in want_calls
        ]
        if want.logprobs is not None:
            assert got.logprobs is not None and got.logprobs.content == want.logprobs.content


@pytest.mark.parametrize("recorded_as", ["plain", "stream"])
def test_the_sdks_responses_stream_helper_accepts_replays(
    recorded_as: str, proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = responses_request(input="Helper me.")
    with proxy.client() as client:
        if recorded_as == "stream":
            with client.responses.stream(**body) as live_stream:
                live = live_stream.get_final_response()
        else:
            live = client.responses.create(**body)
        with client.responses.stream(**body) as replayed:
            final = replayed.get_final_response()

    assert upstream.count() == 1
    assert (final.id, final.output_text, final.usage) == (live.id, live.output_text, live.usage)


# -- broken and abandoned streams -----------------------------------------------------------------


def test_an_upstream_stream_that_breaks_off_is_an_error_and_stores_nothing(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.drop_stream_after(3)
    received: list[Any] = []
    with proxy.client() as client:
        with pytest.raises(openai.APIConnectionError):
            for chunk in client.chat.completions.create(**chat_request(), stream=True):
                received.append(chunk)
        assert proxy.recordings() == []
        again = client.chat.completions.with_raw_response.create(**chat_request(), stream=True)
        chunks = list(again.parse())

    assert 0 < len(received) <= 3
    assert again.headers["x-seedcache-status"] == "recorded"
    assert upstream.count() == 2
    assert text_of(chunks) == message_text(upstream.chat_completion(chat_request()))
    stats = proxy.stats()
    assert stats["upstream_errors"] == 1
    assert stats["misses"] == 1  # the broken one: its headers had said recorded


def test_the_sdk_sees_a_live_stream_end_only_once_it_is_recorded(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # The SDK takes `data: [DONE]` for the end of the answer (and does not wait for the end of
    # the body): were it sent before the recording is stored, a proxy killed then would lose an
    # answer its client has whole. Another writer holds the store's write lock for a while.
    upstream.chunk_delay = 0.01  # the chunks come one by one
    held = sqlite3.connect(
        Path(proxy.config.store) / "cache.db", isolation_level=None, check_same_thread=False
    )
    held.execute("BEGIN IMMEDIATE")
    released: list[float] = []

    def release() -> None:
        released.append(time.monotonic())
        held.execute("ROLLBACK")

    timer = threading.Timer(1.0, release)
    timer.start()
    try:
        with proxy.client() as client:
            raw = client.chat.completions.with_raw_response.create(**chat_request(), stream=True)
            arrived = [time.monotonic() for _ in raw.parse()]
            ended = time.monotonic()
    finally:
        timer.join()
        held.close()

    assert status(raw) == "recorded"
    assert len(arrived) > 3
    assert arrived[0] < released[0] <= ended  # live as it came, ended once stored
    assert len(proxy.recordings()) == 1


def test_an_upstream_that_breaks_off_after_done_still_gives_the_client_its_whole_answer(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # The end of a stream being recorded is held back until it is stored; an upstream that
    # aborts after its `data: [DONE]` (before the body's end) leaves nothing recorded, but the
    # answer was whole, and the SDK gets it as it would have through a bare hop.
    body = chat_request(seed=27)
    upstream.drop_stream_after(len(upstream.chat_chunks({**body, "stream": True})) + 1)
    with proxy.client() as client:
        chunks = list(client.chat.completions.create(**body, stream=True))

    assert text_of(chunks) == message_text(upstream.chat_completion(body))
    assert proxy.recordings() == []


def test_an_in_band_error_frame_reaches_the_sdk_and_stores_nothing(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.error_frame_next("upstream died", after=2, code="boom")
    with proxy.client() as client:
        with pytest.raises(openai.APIError) as caught:
            list(client.chat.completions.create(**chat_request(), stream=True))
        assert proxy.recordings() == []
        again = client.chat.completions.with_raw_response.create(**chat_request())

    assert "upstream died" in str(caught.value)
    assert caught.value.code == "boom"
    assert again.headers["x-seedcache-status"] == "recorded"
    assert upstream.count() == 2
    # The failed stream's header went out before it failed; the stats count what happened.
    stats = proxy.stats()
    assert (stats["recorded"], stats["misses"]) == (1, 1)


def test_an_audited_stream_that_fails_says_miss_and_stores_nothing(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # Audit mode receives the stream whole before answering: its header can tell the truth.
    proxy = start_proxy(mode="audit")
    upstream.error_frame_next("upstream died", after=2)

    result = proxy.request("POST", CHAT, {**chat_request(), "stream": True})

    assert result.headers["x-seedcache-status"] == "miss"
    assert b"upstream died" in result.body
    assert proxy.recordings() == []
    assert proxy.stats()["recorded"] == 0


def test_an_audited_stream_that_breaks_off_is_a_502_counted_once(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="audit")
    upstream.drop_stream_after(3)

    result = proxy.request("POST", CHAT, {**chat_request(), "stream": True})

    assert result.status == 502
    assert result.json()["error"]["code"] == "upstream_broken"
    assert proxy.stats()["upstream_errors"] == 1
    assert proxy.recordings() == []


def test_an_upstream_stream_that_stalls_past_the_timeout_is_an_error_and_stores_nothing(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(upstream_timeout=0.3)
    upstream.chunk_delay = 2.0

    with proxy.client() as client, pytest.raises(openai.APIConnectionError):
        list(client.chat.completions.create(**chat_request(), stream=True))

    assert proxy.recordings() == []
    assert proxy.stats()["upstream_errors"] == 1


def test_a_responses_stream_that_fails_is_not_recorded(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.drop_stream_after(4)

    with proxy.client() as client, pytest.raises(openai.APIConnectionError):
        list(client.responses.create(**responses_request(), stream=True))

    assert proxy.recordings() == []


def leave_mid_stream(proxy: RunningProxy, body: dict[str, Any]) -> bytes:
    """Start a streaming request on a raw socket, read until the first event, then hang up."""
    return raw_stream(proxy.running.port, body, until=b"data: ")


def test_a_client_that_leaves_mid_stream_leaves_no_recording(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.chunk_delay = 0.05
    body = chat_request(seed=18)

    received = leave_mid_stream(proxy, body)
    # Were the abandoned stream still being recorded, this identical request would wait for it
    # (coalescing) and replay it; instead it leads a new upstream call.
    again = stream(proxy, body)

    assert received.startswith(b"HTTP/1.1 200")
    assert b"[DONE]" not in received
    assert again.headers["x-seedcache-status"] == "recorded"
    assert upstream.count() == 2
    sample = only_sample(proxy)  # the second request's: one complete sample
    assert [e.data for e in sample.events or ()] == data_lines(again.body)
    assert data_lines(again.body)[-1] == "[DONE]"


def test_a_client_that_leaves_a_paced_replay_does_not_disturb_the_proxy(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(replay_timing=True)
    upstream.chunk_delay = 0.05
    body = chat_request(seed=21)
    recorded = stream(proxy, body)

    received = leave_mid_stream(proxy, body)
    again = stream(proxy, body)

    assert b"[DONE]" not in received
    assert again.headers["x-seedcache-status"] == "hit"
    assert data_lines(again.body) == data_lines(recorded.body)
    assert upstream.count() == 1
    assert len(only_sample(proxy).events or ()) == len(data_lines(recorded.body))


def test_recording_the_same_stream_again_without_usage_keeps_the_sample_with_usage(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    body = chat_request(seed=24)
    proxy = start_proxy()
    with proxy.client() as client:
        list(client.chat.completions.create(**body, stream=True, stream_options=USAGE))
    with proxy.client(default_headers={"X-Seedcache-Mode": "record"}) as client:
        list(client.chat.completions.create(**body, stream=True))  # the same output, no usage
    replayer = start_proxy(mode="replay")
    with replayer.client() as client:
        plain = client.chat.completions.create(**body)
        chunks = list(client.chat.completions.create(**body, stream=True, stream_options=USAGE))

    assert upstream.count() == 2
    assert plain.usage is not None and plain.usage.total_tokens > 0
    assert chunks[-1].usage is not None and chunks[-1].usage == plain.usage
    assert (
        len(only_sample(replayer).events or ())
        == len(upstream.chat_chunks({**body, "stream_options": USAGE})) + 1
    )


# -- coalescing -----------------------------------------------------------------------------------


async def test_identical_concurrent_streaming_misses_are_coalesced(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.delay = 0.3
    body = chat_request(seed=19)

    async with proxy.async_client() as client:

        async def consume() -> tuple[str, list[Any]]:
            raw = await client.chat.completions.with_raw_response.create(**body, stream=True)
            return raw.headers["x-seedcache-status"], [c async for c in raw.parse()]

        results = await asyncio.gather(*(consume() for _ in range(5)))

    assert upstream.count() == 1
    assert sorted(status for status, _ in results) == ["hit"] * 4 + ["recorded"]
    expected = upstream.chat_completion(body)
    for _, chunks in results:
        assert {c.id for c in chunks} == {expected["id"]}
        assert text_of(chunks) == message_text(expected)


async def test_requests_waiting_on_a_stream_that_breaks_off_get_a_retryable_502(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.chunk_delay = 0.05
    upstream.drop_stream_after(4)
    body = chat_request(seed=21)

    async with proxy.async_client() as client:

        async def leader() -> BaseException | None:
            try:
                async for _ in await client.chat.completions.create(**body, stream=True):
                    pass
            except openai.APIConnectionError as exc:
                return exc
            return None

        async def follower() -> Any:
            await asyncio.sleep(0.1)  # the leader's stream is under way
            return await client.chat.completions.with_raw_response.create(**body, stream=True)

        broken, *followers = await asyncio.gather(
            leader(), *(follower() for _ in range(3)), return_exceptions=True
        )

    assert isinstance(broken, openai.APIConnectionError)  # the leader saw the stream break
    assert all(isinstance(f, openai.InternalServerError) for f in followers)
    errors = [f for f in followers if isinstance(f, openai.InternalServerError)]
    assert {(e.status_code, e.code) for e in errors} == {(502, "upstream_broken")}
    assert {e.response.headers["x-should-retry"] for e in errors} == {"true"}
    assert len({e.response.headers["x-seedcache-key"] for e in errors}) == 1
    assert upstream.count() == 1  # they did not each go upstream in turn
    assert proxy.recordings() == []


async def test_a_leader_whose_client_stops_reading_does_not_hold_up_those_waiting_on_it(
    proxy: RunningProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handlers, "CLIENT_WRITE_TIMEOUT", 0.5)
    upstream.padding = 50_000  # ~11 MB of stream: more than the socket buffers hold
    body = chat_request(seed=22, n=20, stream=True)
    payload = json.dumps(body).encode()
    # The leader: a client that sends its request and never reads a byte of the answer.
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", proxy.running.port))
    stuck.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    try:
        await asyncio.sleep(0.3)  # it leads, and its relay stalls
        async with proxy.async_client() as client:
            raw = await asyncio.wait_for(
                client.chat.completions.with_raw_response.create(**body), timeout=30
            )
            chunks = [c async for c in raw.parse()]
        stuck.settimeout(10)
        received = b""
        while piece := stuck.recv(1 << 20):
            received += piece
    finally:
        stuck.close()

    # The stalled leader was cut off with its chunked body unterminated, and recorded nothing;
    # the waiting request then led its own call.
    assert received.startswith(b"HTTP/1.1 200")
    assert not received.endswith(b"0\r\n\r\n")
    assert raw.headers["x-seedcache-status"] == "recorded"
    assert text_of(chunks) == message_text(upstream.chat_completion(body))
    assert upstream.count() == 2
    assert len(only_sample(proxy).events or ()) == len(upstream.chat_chunks(body)) + 1


async def test_a_plain_request_waiting_on_a_streaming_leader_gets_the_assembled_completion(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.delay = 0.3
    body = chat_request(seed=20)

    async with proxy.async_client() as client:

        async def streamed() -> list[Any]:
            return [c async for c in await client.chat.completions.create(**body, stream=True)]

        async def plain() -> Any:
            await asyncio.sleep(0.1)  # let the streaming request lead
            return await client.chat.completions.create(**body)

        chunks, completion = await asyncio.gather(streamed(), plain())

    assert upstream.count() == 1
    assert completion.id == chunks[0].id
    assert completion.choices[0].message.content == text_of(chunks)


def test_a_stream_with_its_usage_on_the_finishing_chunk_replays_as_recorded(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # llama.cpp puts include_usage's usage on the chunk that finishes, not on a chunk of its own.
    upstream.usage_on_finish = True
    body = {**chat_request(seed=41), "stream_options": USAGE}
    live = stream(proxy, body)
    again = stream(proxy, body)
    with proxy.client() as client:
        chunks = list(client.chat.completions.create(**body, stream=True))
        plain = client.chat.completions.create(**chat_request(seed=41))

    assert (status(live), status(again)) == ("recorded", "hit")
    assert upstream.count() == 1
    assert data_lines(again.body) == data_lines(live.body)
    assert chunks[-1].choices and chunks[-1].usage is not None
    expected = upstream.chat_completion(chat_request(seed=41))["usage"]
    assert chunks[-1].usage.model_dump(exclude_none=True) == expected
    assert plain.usage is not None and plain.usage.model_dump(exclude_none=True) == expected


def test_a_stream_opening_with_a_content_filter_chunk_keeps_its_identity(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # Azure's first chunk reports content filtering with an empty id and model and created 0.
    upstream.filter_chunk = True
    body = chat_request(seed=42)
    stream(proxy, body)
    with proxy.client() as client:
        plain = client.chat.completions.with_raw_response.create(**body)

    expected = upstream.chat_completion(body)
    completion = plain.parse()
    assert status(plain) == "hit"
    assert (completion.id, completion.created, completion.model) == (
        expected["id"],
        expected["created"],
        expected["model"],
    )
    assert completion.system_fingerprint == DEFAULT_FINGERPRINT
    assert plain.headers["x-seedcache-fingerprint"] == DEFAULT_FINGERPRINT
    assert only_sample(proxy).model == expected["model"]
    assert completion.choices[0].message.content == message_text(expected)


def test_a_chat_stream_with_an_error_event_is_not_recorded(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    chunk = upstream.chat_chunks(chat_request(seed=43))[0]
    error = {"type": "error", "code": "server_error", "message": "overloaded"}
    sent = (
        f"data: {json.dumps(chunk)}\n\nevent: error\ndata: {json.dumps(error)}\n\ndata: [DONE]\n\n"
    )
    upstream.fail_next(200, sent, {"Content-Type": "text/event-stream"})
    live = stream(proxy, chat_request(seed=43))

    assert live.status == 200
    assert status(proxy.request("POST", CHAT, chat_request(seed=43))) == "recorded"
    assert upstream.count() == 2


@pytest.mark.parametrize("mode", ["auto", "passthrough"])
def test_a_live_stream_reaches_the_client_as_the_upstream_sent_it(
    start_proxy: StartProxy, upstream: FakeUpstream, mode: str
) -> None:
    # Keep-alive comments keep a client's read timeout from firing while the model thinks; they
    # are forwarded live and never recorded.
    upstream.chunk_delay = 0.01
    proxy = start_proxy(mode=mode)
    body = chat_request(seed=44)
    live = stream(proxy, body)

    assert live.body.startswith(b": keep-alive\n\n")
    assert live.body.count(b": keep-alive\n\n") > 1
    assert data_lines(live.body)[-1] == "[DONE]"
    if mode == "auto":
        replayed = stream(proxy, body)
        assert status(replayed) == "hit"
        assert b"keep-alive" not in replayed.body
        assert replayed.body == live.body.replace(b": keep-alive\n\n", b"")
    assert len(data_lines(live.body)) == len(upstream.chat_chunks({**body, "stream": True})) + 1


def test_a_stream_of_nothing_but_done_is_not_recorded(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.fail_next(200, "data: [DONE]\n\n", {"Content-Type": "text/event-stream"})
    empty = stream(proxy, chat_request(seed=45))

    assert data_lines(empty.body) == ["[DONE]"]
    assert status(proxy.request("POST", CHAT, chat_request(seed=45))) == "recorded"
    assert upstream.count() == 2


# An HTTP/1.0 client that asks to keep the connection: a stream's body still ends with it.
KEEP_ALIVE = "Connection: keep-alive\r\n"


def http_1_0_stream(
    proxy: RunningProxy, body: dict[str, Any], expected: str, headers: str = ""
) -> list[str]:
    """A stream asked for over HTTP/1.0: whole, unchunked, ended by the close; its payloads."""
    received = raw_stream(proxy.running.port, body, version="1.0", headers=headers)
    head, _, payload = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    assert f"x-seedcache-status: {expected}".encode() in head.lower()
    assert b"transfer-encoding" not in head.lower()
    assert payload.endswith(b"data: [DONE]\n\n")
    return data_lines(payload)


@pytest.mark.parametrize("replay_timing", [False, True])
def test_an_http_1_0_client_gets_live_and_replayed_streams(
    replay_timing: bool, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # nginx's proxy_pass speaks HTTP/1.0 by default: no chunked encoding there, so the body of a
    # stream ends when the connection closes.
    proxy = start_proxy(replay_timing=replay_timing)

    live = http_1_0_stream(proxy, chat_request(), "recorded", KEEP_ALIVE)
    replayed = http_1_0_stream(proxy, chat_request(), "hit", KEEP_ALIVE)

    assert live == replayed and len(live) > 2
    assert upstream.count() == 1
    assert len(only_sample(proxy).events or ()) == len(live)  # [DONE] included


def test_an_http_1_0_client_gets_an_audited_stream(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="audit")

    first = http_1_0_stream(proxy, chat_request(), "audited")
    second = http_1_0_stream(proxy, chat_request(), "audited")

    assert len(first) == len(second) > 2  # two live answers: their `obfuscation` differs


def sse_bytes(chunks: list[dict[str, Any]]) -> bytes:
    """Chunks as an upstream written in Python sends them (json.dumps), then [DONE]."""
    frames = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks)
    return frames.encode() + b"data: [DONE]\n\n"


def with_member(name: str, value: Any) -> Callable[[list[dict[str, Any]]], bytes]:
    """Frames whose first chunk has one more (vendor) member."""
    return lambda chunks: sse_bytes([{**chunks[0], name: value}, *chunks[1:]])


# Streams that end well but that a replay could not give as the client got them live: it is
# given them unchanged and nothing is recorded, with a warning that says why.
UNRECORDABLE_STREAMS = [
    pytest.param(
        with_member("vendor_id", 2**64),
        "holds an integer beyond 64 bits (18446744073709551616), "
        "which no recording can hold as it was sent",
        id="integer-beyond-64-bits",
    ),
    pytest.param(
        with_member("vendor_score", -math.inf),
        "holds -Infinity, which no recording can hold as it was sent",
        id="-Infinity",
    ),
    pytest.param(
        with_member("vendor_score", math.nan),
        "holds NaN, which no recording can hold as it was sent",
        id="NaN",
    ),
    pytest.param(
        lambda chunks: sse_bytes(chunks).replace(b'"id": ', b'"note": "caf\xe9", "id": ', 1),
        "is not valid UTF-8 (a client reading it strictly, as the SDK does, fails on it)",
        id="not-utf-8",
    ),
    pytest.param(
        lambda chunks: codecs.BOM_UTF8 + sse_bytes(chunks),
        "begins with a byte order mark (the SDK then drops its first event)",
        id="byte-order-mark",
    ),
]


@pytest.mark.parametrize(("frames", "why"), UNRECORDABLE_STREAMS)
def test_a_stream_a_replay_could_not_give_as_sent_reaches_the_client_but_is_not_recorded(
    proxy: RunningProxy,
    upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    frames: Callable[[list[dict[str, Any]]], bytes],
    why: str,
) -> None:
    body = chat_request(seed=46)
    sent = frames(upstream.chat_chunks({**body, "stream": True}))
    upstream.fail_next(200, sent, {"Content-Type": "text/event-stream"})

    with caplog.at_level(logging.WARNING, logger="seedcache"):
        live = stream(proxy, body)

    assert (live.status, live.body) == (200, sent)
    assert proxy.recordings() == []
    assert [r.getMessage() for r in caplog.records if "not recording" in r.getMessage()] == [
        f"not recording {CHAT}: the upstream stream {why}"
    ]
    assert proxy.stats()["misses"] == 1
    assert status(stream(proxy, body)) == "recorded"
    assert upstream.count() == 2


def test_the_access_log_says_what_became_of_a_live_stream(
    loop: BackgroundLoop,
    upstream: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its headers left saying `recorded`; the access log line is written when it has ended.
    config = Config.build(upstream=upstream.url + "/v1", store=str(tmp_path / "store"))
    running = loop.start_app(
        create_app(config),
        access_log=logging.getLogger("seedcache.access"),
        access_log_class=AccessLog,
    )
    proxy = RunningProxy(running, config, loop)
    caplog.set_level(logging.INFO, logger="seedcache.access")
    try:
        upstream.error_frame_next()
        failed = stream(proxy, chat_request(seed=1))
        whole = stream(proxy, chat_request(seed=2))
        deadline = time.monotonic() + 5
        while len(access_lines(caplog)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proxy.stop()

    assert status(failed) == status(whole) == "recorded"  # as the headers said
    lines = access_lines(caplog)
    assert [line.split()[-2] for line in lines] == ["miss", "recorded"]
    assert [line.split()[-1] for line in lines] == [
        failed.headers["x-seedcache-key"],
        whole.headers["x-seedcache-key"],
    ]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "seedcache.access"]


def test_a_plain_stream_from_a_usage_sample_keeps_an_event_it_cannot_read_as_recorded() -> None:
    # Recorded as received: an event that looks like an object and is not JSON cannot be
    # rewritten; it was a 500 with a traceback, and is now replayed as it came.
    unreadable = sse.Event('{"note": "usage" broken', None, 1)
    chunk = '{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{}}],"usage":null}'
    usage = '{"object":"chat.completion.chunk","choices":[],"usage":{"total_tokens":2}}'
    events = (sse.Event(chunk, None, 0), unreadable, sse.Event(usage, None, 2))

    assert handlers.without_usage(unreadable) is unreadable
    assert [handlers.without_usage(event) for event in events] == [
        sse.Event(chunk.replace(',"usage":null', ""), None, 0),
        unreadable,
        None,
    ]
