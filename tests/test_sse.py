"""Tests for proxy.sse: the decoder split at every byte, completeness, assemble and synthesise."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from proxy.sse import DONE, Decoder, Event, assemble, encode, is_complete, synthesise

# -- factories ------------------------------------------------------------------------------------


def chunk(*choices: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """A chat.completion.chunk in the shape OpenAI streams it."""
    base: dict[str, Any] = {
        "id": "chatcmpl-X1",
        "object": "chat.completion.chunk",
        "created": 1761564674,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": list(choices),
    }
    return {**base, **kw}


def delta(index: int = 0, finish_reason: str | None = None, logprobs: Any = None, **d: Any) -> Any:
    """One streamed choice: `delta` holds the keyword arguments."""
    return {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish_reason}


def message(**kw: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": "Paris.", "refusal": None, "annotations": [], **kw}


def choice(index: int = 0, **kw: Any) -> dict[str, Any]:
    return {"index": index, "message": message(), "logprobs": None, "finish_reason": "stop", **kw}


def usage(**kw: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": 10,
        "completion_tokens": 1,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        **kw,
    }


def completion(*choices: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """A chat.completion body in the shape OpenAI returns it."""
    base: dict[str, Any] = {
        "id": "chatcmpl-X1",
        "object": "chat.completion",
        "created": 1761564674,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": list(choices) or [choice()],
        "usage": usage(),
        "service_tier": "default",
        "system_fingerprint": "fp_44709d6fcb",
    }
    return {**base, **kw}


def text_completion(*choices: dict[str, Any], **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1761564674,
        "model": "gpt-3.5-turbo-instruct",
        "system_fingerprint": None,
        "choices": list(choices) or [text_choice()],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    return {**base, **kw}


def text_choice(index: int = 0, **kw: Any) -> dict[str, Any]:
    return {"text": " Paris", "index": index, "logprobs": None, "finish_reason": "stop", **kw}


def token(tok: str, logprob: float = -0.1) -> dict[str, Any]:
    return {"token": tok, "logprob": logprob, "bytes": list(tok.encode()), "top_logprobs": []}


def tool_call(i: int, name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{i}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def response(**kw: Any) -> dict[str, Any]:
    """A Responses API `response` object."""
    base: dict[str, Any] = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1761564674,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "model": "gpt-4o-mini-2024-07-18",
        "output": [
            {
                "id": "msg_1",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": "Hi there", "annotations": [], "logprobs": []}
                ],
            }
        ],
        "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7},
    }
    return {**base, **kw}


def stream(*chunks: dict[str, Any], done: bool = True) -> list[Event]:
    events = [Event(json.dumps(c)) for c in chunks]
    return [*events, Event(DONE)] if done else events


def named(name: str, **payload: Any) -> Event:
    return Event(json.dumps({"type": name, **payload}), name)


def decode_all(pieces: list[bytes]) -> list[Event]:
    decoder = Decoder()
    events = [e for piece in pieces for e in decoder.decode(piece)]
    return events + decoder.flush()


# -- decoder --------------------------------------------------------------------------------------

MIXED = (
    b": keep-alive\r\n"
    b"\r\n"
    b'data: {"a":"caf\xc3\xa9"}\r\n'
    b"\r\n"
    b":\n\n"
    b"event: response.created\r"
    b"data: line1\r"
    b"data: line2 \xf0\x9f\x98\x80\r"
    b"\r"
    b"data:no-space\n"
    b"data\n"
    b"id: 7\nretry: 100\nunknown: x\n"
    b"\n"
    b"data: [DONE]\r\n\r\n"
)
MIXED_EVENTS = [
    Event('{"a":"café"}'),
    Event("line1\nline2 😀", "response.created"),
    Event("no-space\n"),
    Event(DONE),
]


def test_decoder_whole_stream() -> None:
    assert decode_all([MIXED]) == MIXED_EVENTS


@pytest.mark.parametrize("offset", range(len(MIXED) + 1))
def test_decoder_split_at_every_offset(offset: int) -> None:
    assert decode_all([MIXED[:offset], MIXED[offset:]]) == MIXED_EVENTS


def test_decoder_byte_by_byte() -> None:
    assert decode_all([MIXED[i : i + 1] for i in range(len(MIXED))]) == MIXED_EVENTS


def test_decoder_split_into_three_at_every_pair_of_offsets() -> None:
    small = b"data: \xc3\xa9\r\n\r\n:\r\nevent: e\rdata: x\r\rdata: y\n\n"
    expected = [Event("é"), Event("x", "e"), Event("y")]
    for i in range(len(small) + 1):
        for j in range(i, len(small) + 1):
            assert decode_all([small[:i], small[i:j], small[j:]]) == expected, (i, j)


def test_decoder_cr_then_lf_across_chunks_is_one_line_end() -> None:
    decoder = Decoder()
    assert decoder.decode(b"data: a\r") == []
    # Were the LF a second line end, this would dispatch "a" before "b" arrives.
    assert decoder.decode(b"\ndata: b\r") == []
    assert decoder.decode(b"\n\r\n") == [Event("a\nb")]


def test_decoder_stamps_the_time_of_the_completing_chunk() -> None:
    decoder = Decoder()
    assert decoder.decode(b"data: a\n", t_ms=5) == []
    assert decoder.decode(b"\ndata: b\n\ndata: c", t_ms=9) == [
        Event("a", t_ms=9),
        Event("b", t_ms=9),
    ]
    assert decoder.decode(b"\n\n", t_ms=12) == [Event("c", t_ms=12)]


def test_decoder_comments_and_empty_events_dispatch_nothing() -> None:
    assert decode_all([b": keep-alive\n\n:\n\n\n\nevent: ping\n\nid: 3\n\n"]) == []


def test_decoder_event_name_does_not_leak_into_the_next_event() -> None:
    assert decode_all([b"event: a\n\ndata: x\n\n"]) == [Event("x")]


@pytest.mark.parametrize(
    "truncated",
    [b"data: x", b"data: x\n", b"data: x\r", b"data: x\r\n", b"event: e\ndata: x\n", b"data: \xc3"],
)
def test_decoder_does_not_dispatch_a_truncated_event(truncated: bytes) -> None:
    decoder = Decoder()
    assert decoder.decode(b"data: first\n\n" + truncated) == [Event("first")]
    assert decoder.flush() == []


def test_decoder_is_reusable_after_flush() -> None:
    decoder = Decoder()
    decoder.decode(b"data: half")
    decoder.flush()
    assert decoder.decode(b"data: whole\n\n") == [Event("whole")]


def test_decoder_replaces_invalid_utf8_instead_of_raising() -> None:
    assert decode_all([b"data: \xff\n\n"]) == [Event("\ufffd")]


# (bytes, events, all UTF-8, opened with a BOM): what a caller needs to know to keep a stream.
ENCODINGS = [
    (b"\xef\xbb\xbfdata: caf\xc3\xa9\n\ndata: x\n\n", [Event("café"), Event("x")], True, True),
    (b"data: caf\xc3\xa9 \xef\xbb\xbf\n\n", [Event("café \ufeff")], True, False),
    (b"data: caf\xe9\n\ndata: x\n\n", [Event("caf\ufffd"), Event("x")], False, False),
    (b"data: x\n\ndata: \xc3\xa9\n\n\xc3", [Event("x"), Event("é")], False, False),
]


@pytest.mark.parametrize(("raw", "events", "utf8", "bom"), ENCODINGS)
def test_decoder_says_whether_the_bytes_were_utf8_and_opened_with_a_bom(
    raw: bytes, events: list[Event], utf8: bool, bom: bool
) -> None:
    for offset in range(len(raw) + 1):
        decoder = Decoder()
        decoded = decoder.decode(raw[:offset]) + decoder.decode(raw[offset:]) + decoder.flush()
        assert (decoded, decoder.utf8, decoder.bom) == (events, utf8, bom), offset


# -- encode ---------------------------------------------------------------------------------------


def test_encode_bytes() -> None:
    assert encode(Event('{"a":1}')) == b'data: {"a":1}\n\n'
    assert encode(Event("x", "response.created")) == b"event: response.created\ndata: x\n\n"
    assert encode(Event("a\nb")) == b"data: a\ndata: b\n\n"
    assert encode(Event(DONE)) == b"data: [DONE]\n\n"


def test_encode_decode_round_trip() -> None:
    events = [
        Event('{"content":"é 😀"}'),
        Event("two\nlines", "response.output_text.delta"),
        Event(""),
        Event("\n"),
        Event(" leading space"),
        Event(": not a comment"),
        Event("u\u2028v"),
        Event(DONE),
    ]
    assert decode_all([b"".join(encode(e) for e in events)]) == events


# -- is_complete ----------------------------------------------------------------------------------

ERROR_FRAME = Event(json.dumps({"error": {"message": "upstream died", "type": "server_error"}}))


@pytest.mark.parametrize(
    ("events", "path", "expected"),
    [
        (stream(chunk(delta(content="hi"))), "/v1/chat/completions", True),
        (stream(chunk(delta(content="hi")), done=False), "/v1/chat/completions", False),
        ([], "/v1/chat/completions", False),
        ([Event(DONE), Event("{}")], "/v1/chat/completions", False),
        ([Event("[DONE] ")], "/v1/chat/completions", False),
        (
            [*stream(chunk(delta(content="hi")), done=False), ERROR_FRAME],
            "/v1/chat/completions",
            False,
        ),
        # vLLM: error frame, then [DONE]
        ([ERROR_FRAME, Event(DONE)], "/v1/chat/completions", False),
        ([Event(json.dumps({"error": None})), Event(DONE)], "/v1/chat/completions", True),
        (stream(text_completion()), "/v1/completions", True),
        (stream(text_completion(), done=False), "/v1/completions", False),
        (stream(chunk()), "/v1/chat/completions?api-version=1", True),
        ([named("response.created"), named("response.completed")], "/v1/responses", True),
        ([named("response.created"), named("response.incomplete")], "/v1/responses", True),
        ([named("response.created")], "/v1/responses", False),
        ([named("response.created"), named("response.failed")], "/v1/responses", False),
        ([named("response.completed"), named("error", code="x")], "/v1/responses", False),
        ([named("response.completed"), Event(DONE)], "/v1/responses/", True),
        # Unnamed events: the JSON "type" decides.
        ([Event(json.dumps({"type": "response.completed"}))], "/v1/responses", True),
        ([Event(json.dumps({"type": "response.failed"}))], "/v1/responses", False),
        ([Event(DONE)], "/v1/responses", False),
        # An event that is no JSON object would not load from a recording: not complete.
        ([Event(""), *stream(chunk(delta(content="hi")))], "/v1/chat/completions", False),
        (
            [*stream(chunk(delta(content="hi")), done=False), Event("[1]"), Event(DONE)],
            "/v1/chat/completions",
            False,
        ),
        ([Event("ping"), named("response.completed")], "/v1/responses", False),
    ],
)
def test_is_complete(events: list[Event], path: str, expected: bool) -> None:
    assert is_complete(events, path) is expected


# -- assemble -------------------------------------------------------------------------------------

OPENAI_TRANSCRIPT = b"""\
data: {"id":"chatcmpl-X1","object":"chat.completion.chunk","created":1761564674,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"r4N7"}

data: {"id":"chatcmpl-X1","object":"chat.completion.chunk","created":1761564674,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{"content":"Paris"},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"p9K3xT"}

data: {"id":"chatcmpl-X1","object":"chat.completion.chunk","created":1761564674,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null,"obfuscation":"a"}

data: {"id":"chatcmpl-X1","object":"chat.completion.chunk","created":1761564674,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_44709d6fcb","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":1,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"obfuscation":"8618FsxJ"}

data: [DONE]

"""  # noqa: E501  (the §3.2 transcript of openai_wire.md, byte for byte)


def test_assemble_openai_transcript() -> None:
    events = decode_all([OPENAI_TRANSCRIPT])
    assert is_complete(events, "/v1/chat/completions")
    assert assemble(events) == {
        "id": "chatcmpl-X1",
        "object": "chat.completion",
        "created": 1761564674,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Paris",
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage(
            completion_tokens_details={
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            }
        ),
        "service_tier": "default",
        "system_fingerprint": "fp_44709d6fcb",
    }


def test_assemble_concatenates_content() -> None:
    events = stream(
        chunk(delta(role="assistant", content="")),
        chunk(delta(content="The capital")),
        chunk(delta(content=" is Paris.")),
        chunk(delta(finish_reason="length")),
    )
    result = assemble(events)
    assert result["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "The capital is Paris.",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert "usage" in result and result["usage"] is None  # no include_usage: usage unknown


def test_assemble_groups_interleaved_choices_by_index() -> None:
    events = stream(
        chunk(delta(1, role="assistant", content="")),
        chunk(delta(0, role="assistant", content="")),
        chunk(delta(0, content="A")),
        chunk(delta(1, content="B")),
        chunk(delta(1, content="b")),
        chunk(delta(0, content="a")),
        chunk(delta(1, finish_reason="length")),
        chunk(delta(0, finish_reason="stop")),
    )
    choices = assemble(events)["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "Aa", "stop"),
        (1, "Bb", "length"),
    ]


def test_assemble_tool_calls_with_argument_fragments() -> None:
    def fragment(i: int, arguments: str, name: str | None = None) -> dict[str, Any]:
        # id, type and name come only in the first fragment of each call.
        if name is None:
            return {"index": i, "function": {"arguments": arguments}}
        function = {"name": name, "arguments": arguments}
        return {"index": i, "id": f"call_{i}", "type": "function", "function": function}

    events = stream(
        chunk(delta(role="assistant", content=None, tool_calls=[fragment(0, "", "get_weather")])),
        chunk(delta(tool_calls=[fragment(0, '{"city":')])),
        chunk(delta(tool_calls=[fragment(0, '"Paris"}')])),
        chunk(delta(tool_calls=[fragment(1, '{"tz"', "get_time")])),
        chunk(delta(tool_calls=[fragment(1, ':"CET"')])),
        chunk(delta(tool_calls=[fragment(1, "}")])),
        chunk(delta(finish_reason="tool_calls")),
    )
    msg = assemble(events)["choices"][0]["message"]
    assert msg == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "annotations": [],
        "tool_calls": [
            tool_call(0, "get_weather", '{"city":"Paris"}'),
            tool_call(1, "get_time", '{"tz":"CET"}'),
        ],
    }


def test_assemble_tool_calls_sorted_by_index_and_type_defaults_to_function() -> None:
    events = stream(
        chunk(
            delta(tool_calls=[{"index": 1, "id": "b", "function": {"name": "g", "arguments": ""}}])
        ),
        chunk(
            delta(
                tool_calls=[{"index": 0, "id": "a", "function": {"name": "f", "arguments": "{}"}}]
            )
        ),
    )
    calls = assemble(events)["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["type"], c["function"]) for c in calls] == [
        ("a", "function", {"name": "f", "arguments": "{}"}),
        ("b", "function", {"name": "g", "arguments": ""}),
    ]


def test_assemble_tool_calls_without_index() -> None:
    # Some OpenAI-compatible servers omit `index` and send each call whole.
    events = stream(
        chunk(delta(tool_calls=[tool_call(0, "f", "{}")])),
        chunk(delta(tool_calls=[tool_call(1, "g", '{"x":')])),
        chunk(delta(tool_calls=[{"function": {"arguments": "1}"}}])),
    )
    calls = assemble(events)["choices"][0]["message"]["tool_calls"]
    assert calls == [tool_call(0, "f", "{}"), tool_call(1, "g", '{"x":1}')]


def test_assemble_deprecated_function_call() -> None:
    events = stream(
        chunk(delta(role="assistant", function_call={"name": "f", "arguments": ""})),
        chunk(delta(function_call={"arguments": '{"a":'})),
        chunk(delta(function_call={"arguments": "1}"}, finish_reason="function_call")),
    )
    msg = assemble(events)["choices"][0]["message"]
    assert msg["function_call"] == {"name": "f", "arguments": '{"a":1}'}
    assert "tool_calls" not in msg


def test_assemble_logprobs() -> None:
    events = stream(
        chunk(delta(role="assistant", content="")),
        chunk(delta(content="Pa", logprobs={"content": [token("Pa")], "refusal": None})),
        chunk(delta(content="ris", logprobs={"content": [token("ris")], "refusal": None})),
        chunk(delta(finish_reason="stop")),
    )
    assert assemble(events)["choices"][0]["logprobs"] == {
        "content": [token("Pa"), token("ris")],
        "refusal": None,
    }


def test_assemble_refusal() -> None:
    events = stream(
        chunk(delta(role="assistant", content=None, refusal="")),
        chunk(delta(refusal="I can't")),
        chunk(delta(refusal=" help with that.")),
        chunk(delta(finish_reason="stop")),
    )
    msg = assemble(events)["choices"][0]["message"]
    assert msg == {
        "role": "assistant",
        "content": None,
        "refusal": "I can't help with that.",
        "annotations": [],
    }


def test_assemble_usage_and_null_fingerprint() -> None:
    events = stream(
        chunk(delta(role="assistant", content="hi"), usage=None, system_fingerprint=None),
        chunk(delta(finish_reason="stop"), usage=None, system_fingerprint=None),
        chunk(usage=usage(), system_fingerprint=None),
    )
    result = assemble(events)
    assert result["usage"] == usage()
    assert "system_fingerprint" in result
    assert result["system_fingerprint"] is None
    assert result["object"] == "chat.completion"
    assert "obfuscation" not in result


def test_assemble_takes_the_last_usage_of_continuous_usage_stats() -> None:
    # vLLM `continuous_usage_stats`: every chunk carries a running usage.
    events = stream(
        chunk(delta(content="a"), usage=usage(completion_tokens=1)),
        chunk(delta(content="b"), usage=usage(completion_tokens=2)),
        chunk(delta(finish_reason="stop"), usage=usage(completion_tokens=2, total_tokens=12)),
    )
    assert assemble(events)["usage"] == usage(completion_tokens=2, total_tokens=12)


def test_assemble_keeps_vendor_fields() -> None:
    events = stream(
        chunk(delta(role="assistant", content="", reasoning_content=""), kv_transfer_params=None),
        chunk(delta(reasoning_content="think ")),
        chunk(delta(reasoning_content="more")),
        chunk(delta(content="42")),
        chunk({**delta(finish_reason="stop"), "stop_reason": "###"}, timings={"predicted_n": 3}),
    )
    result = assemble(events)
    assert result["timings"] == {"predicted_n": 3}
    assert result["kv_transfer_params"] is None
    [only] = result["choices"]
    assert only["message"]["reasoning_content"] == "think more"
    assert only["message"]["content"] == "42"
    assert only["stop_reason"] == "###"


def test_assemble_first_non_null_top_level_value_wins() -> None:
    events = stream(
        chunk(delta(content="a"), system_fingerprint=None),
        chunk(delta(content="b"), system_fingerprint="fp_2"),
        chunk(delta(content="c"), system_fingerprint="fp_3"),
    )
    assert assemble(events)["system_fingerprint"] == "fp_2"


def test_assemble_audio_and_annotations() -> None:
    citation = {"type": "url_citation", "url_citation": {"url": "https://x", "title": "X"}}
    events = stream(
        chunk(delta(role="assistant", audio={"id": "audio_1", "transcript": "Hel"})),
        chunk(delta(audio={"data": "AAA", "transcript": "lo"})),
        chunk(delta(audio={"data": "BBB", "expires_at": 9}, annotations=[citation])),
    )
    msg = assemble(events)["choices"][0]["message"]
    assert msg["audio"] == {
        "id": "audio_1",
        "transcript": "Hello",
        "data": "AAABBB",
        "expires_at": 9,
    }
    assert msg["annotations"] == [citation]


def test_assemble_legacy_text_completion() -> None:
    def piece(text: str, **kw: Any) -> dict[str, Any]:
        return text_completion(text_choice(text=text, **{"finish_reason": None, **kw}), usage=None)

    events = stream(
        piece(" Pa", logprobs=text_logprobs(["Pa"], offset=0)),
        piece("ris", logprobs=text_logprobs(["ris"], offset=3)),
        {**piece("", finish_reason="length"), "usage": {"total_tokens": 5}},
    )
    assert assemble(events) == text_completion(
        text_choice(text=" Paris", finish_reason="length", logprobs=text_logprobs(["Pa", "ris"])),
        usage={"total_tokens": 5},
    )


def text_logprobs(tokens: list[str], offset: int = 0) -> dict[str, Any]:
    offsets = [offset + 3 * i for i in range(len(tokens))]
    return {
        "tokens": tokens,
        "token_logprobs": [-0.5] * len(tokens),
        "top_logprobs": [{t: -0.5} for t in tokens],
        "text_offset": offsets,
    }


def test_assemble_responses_stream() -> None:
    final = response()
    events = [
        named("response.created", sequence_number=0, response={**final, "status": "in_progress"}),
        named("response.output_text.delta", sequence_number=1, delta="Hi there"),
        named("response.completed", sequence_number=2, response=final),
    ]
    assert assemble(events) == final


def test_assemble_responses_incomplete() -> None:
    final = response(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    assert (
        assemble([named("response.created"), named("response.incomplete", response=final)]) == final
    )


def test_assemble_responses_without_terminal_event_raises() -> None:
    with pytest.raises(ValueError, match=r"response\.completed"):
        assemble([named("response.created", response=response()), named("response.failed")])


@pytest.mark.parametrize(
    "events", [[], [Event(DONE)], [Event("not json"), Event("[1,2]"), Event(DONE)]]
)
def test_assemble_without_json_raises(events: list[Event]) -> None:
    with pytest.raises(ValueError, match="JSON chunk"):
        assemble(events)


def test_assemble_ignores_non_json_payloads() -> None:
    events = [Event("ping"), *stream(chunk(delta(content="ok")))]
    assert assemble(events)["choices"][0]["message"]["content"] == "ok"


# -- synthesise -----------------------------------------------------------------------------------


def chunks_of(events: list[Event]) -> list[dict[str, Any]]:
    assert events[-1] == Event(DONE)
    return [json.loads(e.data) for e in events[:-1]]


def test_synthesise_with_usage() -> None:
    body = completion()
    chunks = chunks_of(synthesise(body, include_usage=True))
    *choice_chunks, last = chunks
    assert last["choices"] == []
    assert last["usage"] == body["usage"]
    assert all("usage" in c and c["usage"] is None for c in choice_chunks)
    assert [c["choices"][0]["delta"] for c in choice_chunks] == [
        # As OpenAI streams it: no empty `annotations` (the SDK's accumulated message has None).
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "Paris."},
        {},
    ]
    assert choice_chunks[-1]["choices"][0]["finish_reason"] == "stop"
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert {
            k: c[k] for k in ("id", "created", "model", "system_fingerprint", "service_tier")
        } == {k: body[k] for k in ("id", "created", "model", "system_fingerprint", "service_tier")}


def test_synthesise_without_usage() -> None:
    chunks = chunks_of(synthesise(completion(), include_usage=False))
    assert all("usage" not in c for c in chunks)
    assert all(len(c["choices"]) == 1 for c in chunks)


def test_synthesise_frames_are_compact_utf8() -> None:
    body = completion(choice(message=message(content="café 😀")))
    data = synthesise(body, include_usage=False)[1].data
    assert "café 😀" in data
    assert ", " not in data and ": " not in data


def test_synthesise_tool_calls_one_chunk_each() -> None:
    calls = [tool_call(0, "f", '{"a":1}'), tool_call(1, "g", "{}")]
    body = completion(
        choice(message=message(content=None, tool_calls=calls), finish_reason="tool_calls")
    )
    deltas = [c["choices"][0]["delta"] for c in chunks_of(synthesise(body, include_usage=False))]
    assert deltas[0]["content"] is None
    assert deltas[1:3] == [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(calls)]
    assert deltas[3] == {}


def test_synthesise_attaches_logprobs_to_the_content_chunk() -> None:
    logprobs = {"content": [token("Paris"), token(".")], "refusal": None}
    body = completion(choice(logprobs=logprobs))
    choices = [c["choices"][0] for c in chunks_of(synthesise(body, include_usage=False))]
    assert [c["logprobs"] for c in choices] == [None, logprobs, None]


def test_synthesise_choices_in_index_order() -> None:
    body = completion(
        choice(1, message=message(content="B")), choice(0, message=message(content="A"))
    )
    chunks = chunks_of(synthesise(body, include_usage=False))
    assert [c["choices"][0]["index"] for c in chunks] == [0, 0, 0, 1, 1, 1]


def test_synthesise_text_completion() -> None:
    body = text_completion()
    chunks = chunks_of(synthesise(body, include_usage=True))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"] for c in chunks] == [
        [{"text": " Paris", "index": 0, "logprobs": None, "finish_reason": None}],
        [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        [],
    ]
    assert [c["usage"] for c in chunks] == [None, None, body["usage"]]


def test_synthesise_response_events() -> None:
    body = response()
    events = synthesise(body, include_usage=True)
    names = [e.event for e in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    payloads = [json.loads(e.data) for e in events]
    assert [p["type"] for p in payloads] == names
    assert [p["sequence_number"] for p in payloads] == list(range(len(events)))
    created = payloads[0]["response"]
    assert (created["status"], created["output"], created["id"]) == ("in_progress", [], "resp_1")
    text_delta = payloads[4]
    assert (text_delta["item_id"], text_delta["output_index"], text_delta["content_index"]) == (
        "msg_1",
        0,
        0,
    )
    assert text_delta["delta"] == "Hi there"
    assert payloads[-1]["response"] == body
    assert DONE not in [e.data for e in events]
    assert is_complete(events, "/v1/responses")


def test_synthesise_response_function_call_and_incomplete() -> None:
    call = {
        "id": "fc_1",
        "type": "function_call",
        "status": "completed",
        "call_id": "call_1",
        "name": "f",
        "arguments": '{"a":1}',
    }
    body = response(status="incomplete", output=[call])
    events = synthesise(body, include_usage=False)
    assert [e.event for e in events][2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert json.loads(events[3].data)["delta"] == '{"a":1}'
    assert assemble(events) == body


def test_synthesise_rejects_an_unknown_body() -> None:
    with pytest.raises(ValueError, match="object 'list'"):
        synthesise({"object": "list", "data": [{"object": "embedding"}]}, include_usage=False)


# -- round trips ----------------------------------------------------------------------------------

ROUND_TRIP_BODIES = {
    "content": completion(),
    "empty content": completion(choice(message=message(content=""))),
    "null fingerprint": completion(system_fingerprint=None),
    "refusal": completion(choice(message=message(content=None, refusal="I can't help with that."))),
    "tool calls": completion(
        choice(
            message=message(
                content=None,
                tool_calls=[tool_call(0, "get_weather", '{"city":"Paris"}'), tool_call(1, "f", "")],
            ),
            finish_reason="tool_calls",
        )
    ),
    "content and tool call": completion(
        choice(message=message(content="Checking.", tool_calls=[tool_call(0, "f", "{}")]))
    ),
    "logprobs": completion(
        choice(logprobs={"content": [token("Paris", -0.01), token(".", -0.2)], "refusal": None})
    ),
    "n=2": completion(
        choice(0, message=message(content="A")),
        choice(1, message=message(content="B"), finish_reason="length"),
    ),
    "no service tier": {k: v for k, v in completion().items() if k != "service_tier"},
    "vllm": completion(
        choice(
            message={
                "role": "assistant",
                "content": "42",
                "refusal": None,
                "reasoning_content": "Let me think.",
                "tool_calls": [],
                "annotations": None,
            },
            stop_reason=None,
        ),
        system_fingerprint=None,
        prompt_logprobs=None,
        kv_transfer_params=None,
    ),
    "llama.cpp": completion(
        choice(message={"role": "assistant", "content": "hi"}),
        system_fingerprint="b4567-abcdef",
        timings={"prompt_n": 3, "predicted_n": 1},
    ),
    "deprecated function_call": completion(
        choice(
            message=message(content=None, function_call={"name": "f", "arguments": '{"a":1}'}),
            finish_reason="function_call",
        )
    ),
    "audio": completion(
        choice(
            message=message(
                content=None,
                audio={"id": "audio_1", "data": "UklGR", "expires_at": 1, "transcript": "Hi"},
            )
        )
    ),
    "text_completion": text_completion(),
    "text_completion n=2 logprobs": text_completion(
        text_choice(0, logprobs=text_logprobs(["a", "b"])),
        text_choice(1, text="", finish_reason="length"),
    ),
    "response": response(),
}


def without_absent_nones(assembled: Any, body: Any) -> Any:
    """Drop keys the body omitted whose assembled value is None or empty."""
    if isinstance(assembled, dict) and isinstance(body, Mapping):
        return {
            k: without_absent_nones(v, body[k]) if k in body else v
            for k, v in assembled.items()
            if k in body or v not in (None, [])
        }
    if isinstance(assembled, list) and isinstance(body, list) and len(assembled) == len(body):
        return [without_absent_nones(a, b) for a, b in zip(assembled, body, strict=True)]
    return assembled


@pytest.mark.parametrize("name", ROUND_TRIP_BODIES)
def test_round_trip_body_through_stream(name: str) -> None:
    body = ROUND_TRIP_BODIES[name]
    assembled = assemble(synthesise(body, include_usage=True))
    assert without_absent_nones(assembled, body) == body


# Exact without normalising: llama.cpp's message omits `refusal` and `annotations`, which
# assembling always adds.
OPENAI_SHAPED = [name for name in ROUND_TRIP_BODIES if name != "llama.cpp"]


@pytest.mark.parametrize("name", OPENAI_SHAPED)
def test_round_trip_is_exact_for_openai_shaped_bodies(name: str) -> None:
    body = ROUND_TRIP_BODIES[name]
    assert assemble(synthesise(body, include_usage=True)) == body


@pytest.mark.parametrize("name", ROUND_TRIP_BODIES)
def test_round_trip_through_the_wire(name: str) -> None:
    body = ROUND_TRIP_BODIES[name]
    events = synthesise(body, include_usage=True)
    wire = b"".join(encode(e) for e in events)
    decoded = decode_all([wire[i : i + 7] for i in range(0, len(wire), 7)])
    assert decoded == events
    path = "/v1/responses" if body["object"] == "response" else "/v1/chat/completions"
    assert is_complete(decoded, path)


def test_round_trip_without_usage_loses_only_usage() -> None:
    body = completion()
    assembled = assemble(synthesise(body, include_usage=False))
    assert assembled == {**body, "usage": None}


def test_round_trip_stream_through_body() -> None:
    events = decode_all([OPENAI_TRANSCRIPT])
    body = assemble(events)
    assert assemble(synthesise(body, include_usage=True)) == body
