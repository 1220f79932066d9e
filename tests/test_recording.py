"""The recording format (DESIGN §8), sample dedup and choice (§4), redaction and stored headers."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import pytest

from proxy.errors import FormatError
from proxy.recording import (
    FORMAT,
    REDACTED,
    STORED_RESPONSE_HEADERS,
    Recording,
    Sample,
    inexact_number,
    pick_sample,
    printable,
    printable_json,
    redact,
    redact_path,
    stored_headers,
)
from proxy.sse import Event
from tests.fake_upstream import chat_request, completion

# -- factories ------------------------------------------------------------------------------------


def sample(**overrides: Any) -> Sample:
    """A non-streamed sample; `overrides` replace fields."""
    fields: dict[str, Any] = {
        "recorded_at": "2026-11-23T20:01:02.345Z",
        "upstream": "https://api.openai.com/v1",
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_a",
        "status": 200,
        "headers": {"content-type": "application/json", "x-request-id": "req_1"},
        "elapsed_ms": 812,
        "body": completion(),
        "events": None,
    }
    fields.update(overrides)
    return Sample(**fields)


def streamed(*payloads: str, fingerprint: str | None = "fp_a", t0: int = 10) -> Sample:
    """A streamed sample whose events carry `payloads` (then [DONE]) at 10 ms steps from `t0`."""
    events = tuple(Event(data, None, t0 + 10 * i) for i, data in enumerate((*payloads, "[DONE]")))
    return sample(
        body=None,
        events=events,
        system_fingerprint=fingerprint,
        headers={"content-type": "text/event-stream; charset=utf-8"},
    )


def recording(*samples: Sample, **overrides: Any) -> Recording:
    fields: dict[str, Any] = {
        "key": "3fa2c1d09e7b" + "0" * 52,
        "method": "POST",
        "path": "/v1/chat/completions",
        "body": chat_request(),
        "namespace": "",
        "samples": samples,
    }
    fields.update(overrides)
    return Recording(**fields)


# -- the format -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pretty", [False, True], ids=["compact", "pretty"])
def test_round_trip_keeps_every_field(pretty: bool) -> None:
    original = recording(
        sample(),
        streamed('{"id":"chatcmpl-1","choices":[]}', fingerprint=None),
        namespace="team-a",
    )

    raw = original.dumps(pretty=pretty)
    loaded = Recording.loads(raw)

    assert loaded == original
    assert loaded.samples[1].streamed and not loaded.samples[0].streamed
    assert loaded.samples[1].events == original.samples[1].events
    assert loaded.model == "gpt-4o-mini"
    if pretty:
        assert raw.endswith(b"\n") and b'\n  "format"' in raw
    else:
        assert b"\n" not in raw


def test_stored_json_has_the_documented_shape() -> None:
    data = orjson.loads(recording(sample(), streamed("{}")).dumps())

    assert data["format"] == FORMAT == "seedcache.recording/1"
    assert data["request"] == {
        "method": "POST",
        "path": "/v1/chat/completions",
        "body": chat_request(),
    }
    body_sample, stream_sample = data["samples"]
    assert set(body_sample) >= {
        "recorded_at",
        "upstream",
        "model",
        "system_fingerprint",
        "status",
        "headers",
        "elapsed_ms",
        "body",
        "events",
    }
    assert body_sample["events"] is None and body_sample["body"] == completion()
    assert stream_sample["body"] is None
    assert stream_sample["events"] == [
        {"data": "{}", "event": None, "t_ms": 10},
        {"data": "[DONE]", "event": None, "t_ms": 20},
    ]


def test_named_events_round_trip() -> None:
    events = (Event('{"type":"response.completed"}', "response.completed", 7),)
    original = recording(sample(body=None, events=events), path="/v1/responses")

    assert Recording.loads(original.dumps()).samples[0].events == events


@pytest.mark.parametrize("fmt", ["seedcache.recording/2", "vcr/1", None])
def test_unknown_format_is_an_error_that_says_what_to_do(fmt: str | None) -> None:
    data = recording(sample()).to_json()
    if fmt is None:
        del data["format"]
    else:
        data["format"] = fmt

    with pytest.raises(FormatError) as caught:
        Recording.loads(orjson.dumps(data))

    message = str(caught.value)
    assert repr(fmt) in message and FORMAT in message
    assert "re-record" in message and "upgrade" in message
    assert not message.startswith("stored recording is malformed")  # said once, not wrapped


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'{"format": "seedcache.recording/1", "key": "k"}',
        # Hand-edited: a member of the wrong JSON type.
        b'{"format": "seedcache.recording/1", "key": "k", "request": {"method": "POST", '
        b'"path": "/v1/x"}, "samples": [{"recorded_at": "", "headers": ["content-type"]}]}',
    ],
    ids=["not-json", "not-an-object", "no-request", "headers-not-an-object"],
)
def test_unreadable_recordings_raise_format_error(raw: bytes) -> None:
    with pytest.raises(FormatError):
        Recording.loads(raw)


@pytest.mark.parametrize("value", ["fp_a\r\nX: 1", "fp_\x1b[31m", "fp_\x00", "fp_\x7f"])
def test_a_stored_value_a_replay_sends_as_a_header_has_no_control_characters(value: str) -> None:
    # aiohttp refuses to send them: the replay's connection would be cut, without an answer.
    stored = sample().to_json()
    stored["system_fingerprint"] = value

    with pytest.raises(FormatError, match="without control characters"):
        Sample.from_json(stored)
    stored["system_fingerprint"] = "fp_a\tb"
    assert Sample.from_json(stored).system_fingerprint == "fp_a\tb"


STORED_EVENTS = [
    ('{"choices": []}', None),
    ("[DONE]", None),  # stored with chat and completions streams, and never parsed
    ('{"logprob": -Infinity}', None),  # Python's json, which the SDK parses with, reads it
    ('{"id": broken', "`events[0].data` is not a JSON object: '{\"id\": broken'"),
    ("[1, 2]", "`events[0].data` is not a JSON object"),
    ("", "`events[0].data` is not a JSON object"),
    ({"id": 1}, "`events[0].data` is dict, not a string"),
]


@pytest.mark.parametrize(("data", "problem"), STORED_EVENTS, ids=[str(d) for d, _ in STORED_EVENTS])
def test_a_stored_stream_event_is_a_json_object_or_done(data: Any, problem: str | None) -> None:
    stored = sample(body=None, events=(Event("{}"),)).to_json()
    stored["events"][0]["data"] = data

    if problem is None:
        assert Sample.from_json(stored).events == (Event(data),)
    else:
        with pytest.raises(FormatError, match=re.escape(problem)):
            Sample.from_json(stored)


# -- with_sample ----------------------------------------------------------------------------------


def test_with_sample_appends_a_different_output_newest_last() -> None:
    first = sample(body=completion("Paris."))
    second = sample(body=completion("Lyon."), recorded_at="2026-11-24T00:00:00.000Z")
    original = recording(first)

    updated = original.with_sample(second)

    assert updated.samples == (first, second)
    assert original.samples == (first,)  # recordings are immutable


def test_with_sample_replaces_an_identical_output_and_moves_it_last() -> None:
    same_old = sample(body=completion("Paris."), elapsed_ms=100)
    other = sample(body=completion("Lyon."))
    same_new = sample(
        body=completion("Paris."),
        elapsed_ms=999,
        recorded_at="2026-11-25T00:00:00.000Z",
        headers={"x-request-id": "req_other"},
    )

    updated = recording(same_old, other).with_sample(same_new)

    assert updated.samples == (other, same_new)


def test_with_sample_keeps_the_same_output_under_another_fingerprint() -> None:
    old = sample(system_fingerprint="fp_a")
    new = sample(system_fingerprint="fp_b")

    assert recording(old).with_sample(new).samples == (old, new)


def test_with_sample_keeps_the_same_output_of_another_model_snapshot() -> None:
    old = sample(model="gpt-4o-mini-2024-07-18", body=completion())
    new = sample(model="gpt-4o-mini-2025-01-01", body=completion(model="gpt-4o-mini-2025-01-01"))

    assert recording(old).with_sample(new).samples == (old, new)


def test_with_sample_compares_streams_by_their_payloads_not_their_timing() -> None:
    old = streamed('{"a":1}', '{"b":2}', t0=10)
    same_payloads = streamed('{"a":1}', '{"b":2}', t0=500)
    other_payloads = streamed('{"a":1}', '{"b":3}')

    assert recording(old).with_sample(same_payloads).samples == (same_payloads,)
    assert recording(old).with_sample(other_payloads).samples == (old, other_payloads)


def test_a_streamed_and_a_plain_sample_are_never_the_same_output() -> None:
    plain = sample()
    stream = streamed('{"a":1}')

    assert recording(plain).with_sample(stream).samples == (plain, stream)


# -- with_sample_at (--repeat sequence) -----------------------------------------------------------

FIRST, SECOND, THIRD = (sample(body=completion(text)) for text in ("Red.", "Blue.", "Green."))
NEW = sample(body=completion("Amber."), recorded_at="2026-11-24T00:00:00.000Z")

PLACES = [
    # (name, samples, new sample, index, expected samples)
    ("replaces the sample at its index", (FIRST, SECOND, THIRD), NEW, 1, (FIRST, NEW, THIRD)),
    ("replaces the first, keeps the rest", (FIRST, SECOND, THIRD), NEW, 0, (NEW, SECOND, THIRD)),
    ("appends after the last", (FIRST, SECOND), NEW, 2, (FIRST, SECOND, NEW)),
    ("appends where the recording ends", (FIRST,), NEW, 3, (FIRST, NEW)),
    ("the first of an empty recording", (), NEW, 0, (NEW,)),
    ("an equal output is a sample of its own", (FIRST,), FIRST, 1, (FIRST, FIRST)),
]


@pytest.mark.parametrize(
    ("samples", "new", "index", "expected"),
    [case[1:] for case in PLACES],
    ids=[case[0] for case in PLACES],
)
def test_with_sample_at(
    samples: tuple[Sample, ...],
    new: Sample,
    index: int,
    expected: tuple[Sample, ...],
) -> None:
    assert recording(*samples).with_sample_at(new, index).samples == expected


CHUNK = (
    '{"object":"chat.completion.chunk","model":"gpt-4o-mini-2024-07-18","choices":'
    '[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}'
)
USAGE_CHUNK = (
    '{"object":"chat.completion.chunk","model":"gpt-4o-mini-2024-07-18","choices":[],'
    '"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


def test_with_sample_at_keeps_the_same_output_with_its_usage() -> None:
    with_usage, without = streamed(CHUNK, USAGE_CHUNK), streamed(CHUNK, t0=50)

    assert recording(with_usage).with_sample_at(without, 0).samples == (with_usage,)
    assert recording(without).with_sample_at(with_usage, 0).samples == (with_usage,)
    assert recording(with_usage).with_sample_at(without, 1).samples == (with_usage, without)


# -- pick_sample (DESIGN §4) ----------------------------------------------------------------------

A_OLD = sample(system_fingerprint="fp_a", recorded_at="1")
B = sample(system_fingerprint="fp_b", recorded_at="2")
A_NEW = sample(system_fingerprint="fp_a", recorded_at="3")
UNKNOWN = sample(system_fingerprint=None, recorded_at="4")
C = sample(system_fingerprint="fp_c", recorded_at="5")

PICKS = [
    # (name, samples, current, pinned, expected sample, stale)
    ("no samples", (), "fp_a", None, None, False),
    ("current unknown: newest", (A_OLD, B), None, None, B, False),
    ("newest of the current fingerprint", (A_OLD, B, A_NEW, C), "fp_a", None, A_NEW, False),
    ("older sample of the current fingerprint", (A_OLD, B), "fp_a", None, A_OLD, False),
    ("null fingerprint matches anything", (A_OLD, UNKNOWN, C), "fp_z", None, UNKNOWN, False),
    ("exact match preferred over null", (A_OLD, UNKNOWN), "fp_a", None, A_OLD, False),
    ("no match: newest, stale", (A_OLD, B), "fp_z", None, B, True),
    ("pinned: that fingerprint", (A_OLD, B, A_NEW, C), None, "fp_b", B, False),
    ("pinned overrides current", (A_OLD, B), "fp_a", "fp_b", B, False),
    ("pinned and absent: nothing", (A_OLD, B), None, "fp_z", None, False),
    ("pinned takes a null sample when none has it", (A_OLD, UNKNOWN), None, "fp_z", UNKNOWN, False),
    ("pinned: exact match preferred over null", (A_OLD, UNKNOWN, C), None, "fp_a", A_OLD, False),
]


@pytest.mark.parametrize(
    ("samples", "current", "pinned", "expected", "stale"),
    [case[1:] for case in PICKS],
    ids=[case[0] for case in PICKS],
)
def test_pick_sample(
    samples: tuple[Sample, ...],
    current: str | None,
    pinned: str | None,
    expected: Sample | None,
    stale: bool,
) -> None:
    assert pick_sample(samples, current=current, pinned=pinned) == (expected, stale)


# -- redaction and stored headers (DESIGN §5, §10) ------------------------------------------------

SECRET = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0"

REDACTIONS = [
    ("openai key", f"my key is {SECRET}", f"my key is {REDACTED}"),
    ("restricted key", "rk-" + "x" * 20, REDACTED),
    ("bearer token", "Authorization: Bearer abcdefgh12345678==", f"Authorization: {REDACTED}"),
    ("two secrets", f"{SECRET} and {SECRET}", f"{REDACTED} and {REDACTED}"),
    ("short sk- prefix is not a key", "sk-abc", "sk-abc"),
    ("word that merely contains sk-", "task-" + "x" * 20, "task-" + "x" * 20),
    ("plain text", "Tell me about Mars", "Tell me about Mars"),
    ("non-strings untouched", 123, 123),
    ("null untouched", None, None),
    (
        "recursive through objects and arrays",
        {"messages": [{"role": "user", "content": SECRET}], "n": 1, "flag": True},
        {"messages": [{"role": "user", "content": REDACTED}], "n": 1, "flag": True},
    ),
]


@pytest.mark.parametrize(
    ("value", "expected"), [c[1:] for c in REDACTIONS], ids=[c[0] for c in REDACTIONS]
)
def test_redact(value: Any, expected: Any) -> None:
    assert redact(value) == expected


GOOGLE_KEY = "AIza" + "SyD-9tSrke72PouQMnMX-a7eZSW0jk"  # no sk- shape: named by its parameter
KEPT = "/v1/x?api-version=2024-10-21&limit=3&max_tokens=5&order=asc"


def named(name: str, parameter: str) -> tuple[str, str, str]:
    """A case of a query parameter redacted by its name alone: (id, path, redacted path)."""
    return (name, f"/v1/x?{parameter}=a1", f"/v1/x?{parameter}={REDACTED}")


PATHS = [
    ("gemini key", f"/v1/x?key={GOOGLE_KEY}&alt=sse", f"/v1/x?key={REDACTED}&alt=sse"),
    ("azure key", "/v1/x?api-version=1&api-key=0a1b", f"/v1/x?api-version=1&api-key={REDACTED}"),
    named("api_key", "api_key"),
    named("apikey", "apikey"),
    named("header-like name", "X-Api-Key"),
    named("camel case", "accessToken"),
    named("percent-encoded name", "api%5Fkey"),
    named("access_token", "access_token"),
    named("token", "token"),
    named("auth", "auth"),
    named("client secret", "client_secret"),
    named("password", "PASSWORD"),
    ("signature", "/v1/x?sv=1&sig=a1", f"/v1/x?sv=1&sig={REDACTED}"),
    ("amazon signature", "/v1/x?X-Amz-Signature=b2", f"/v1/x?X-Amz-Signature={REDACTED}"),
    ("sk- key anywhere", f"/v1/files/{SECRET}?q={SECRET}", f"/v1/files/{REDACTED}?q={REDACTED}"),
    ("other parameters kept", KEPT, KEPT),
    ("empty value kept", "/v1/x?key=&token", "/v1/x?key=&token"),
    ("no query", "/v1/chat/completions", "/v1/chat/completions"),
]


@pytest.mark.parametrize(("path", "expected"), [c[1:] for c in PATHS], ids=[c[0] for c in PATHS])
def test_redact_path_redacts_credentials_in_the_query_string_whatever_their_shape(
    path: str, expected: str
) -> None:
    assert redact_path(path) == expected
    assert redact_path(expected) == expected  # once redacted, stays as it is


def test_redact_does_not_modify_its_argument() -> None:
    body = chat_request(messages=[{"role": "user", "content": SECRET}])

    redact(body)

    assert body["messages"][0]["content"] == SECRET


def test_stored_headers_keep_only_the_allowlist_lower_cased() -> None:
    upstream_headers = [
        ("Content-Type", "application/json"),
        ("OpenAI-Processing-Ms", "412"),
        ("openai-version", "2020-10-01"),
        ("X-Request-Id", "req_5f0c8e"),
        ("Set-Cookie", "__cf_bm=abc; Path=/"),
        ("openai-organization", "org-secret"),
        ("openai-project", "proj_secret"),
        ("x-ratelimit-remaining-requests", "99"),
        ("x-ratelimit-reset-tokens", "6ms"),
        ("Authorization", "Bearer abcdefgh12345678"),
        ("Cookie", "a=b"),
        ("Content-Encoding", "gzip"),
        ("Content-Length", "123"),
        ("Connection", "keep-alive"),
    ]

    stored = stored_headers(upstream_headers)

    assert stored == {
        "content-type": "application/json",
        "openai-processing-ms": "412",
        "openai-version": "2020-10-01",
        "x-request-id": "req_5f0c8e",
    }
    assert set(stored) <= STORED_RESPONSE_HEADERS


def test_stored_headers_redact_secrets_in_allowed_values() -> None:
    stored = stored_headers(
        [("x-request-id", SECRET), ("openai-version", "Bearer abcdefgh12345678")]
    )

    assert stored == {"x-request-id": REDACTED, "openai-version": REDACTED}


INEXACT = [
    (b'{"created": 1741570283, "id": "fp_fake0001", "p": -0.0001234}', None),
    (b'{"text": "To Infinity, or NaN"}', None),
    (b'{"a": 18446744073709551615, "b": -9223372036854775808, "c": 1e308}', None),
    (b'{"a": 18446744073709551616}', "an integer beyond 64 bits (18446744073709551616)"),
    (b'{"a": -9223372036854775809}', "an integer beyond 64 bits (-9223372036854775809)"),
    (b'{"a": [NaN]}', "NaN"),
    (b'{"a": -Infinity}', "-Infinity"),
    (b'{"a": 1E+400}', "a number beyond the range of a double (1E+400)"),
    (b"not JSON, NaN", None),
]


@pytest.mark.parametrize(("text", "why"), INEXACT)
def test_inexact_number_says_which_number_no_recording_can_hold(
    text: bytes, why: str | None
) -> None:
    assert inexact_number(text) == inexact_number(text.decode()) == why


PRINTABLE = [
    ("gpt-4o-mini", "gpt-4o-mini"),
    ("café 日本語 — “ok”", "café 日本語 — “ok”"),
    ("a\nb\rc\td", "a\\nb\\rc\\td"),
    ("\x1b[2J\x1b]0;owned\x07", "\\x1b[2J\\x1b]0;owned\\x07"),
    ("\x7f\x85\x9b", "\\x7f\\x85\\x9b"),
    ("a\u2028b\u2029c\u202ed\u2066e", "a\\u2028b\\u2029c\\u202ed\\u2066e"),
    ("fp_caf\udce9", "fp_caf\\udce9"),
    (None, "None"),
]


@pytest.mark.parametrize(("text", "shown"), PRINTABLE)
def test_printable_escapes_what_could_break_a_line_or_drive_a_terminal(
    text: str | None, shown: str
) -> None:
    assert printable(text) == shown


def test_printable_json_is_the_same_json_with_nothing_a_terminal_acts_on() -> None:
    value = {"model": "a\x1b[2J\x9b31m\x85\u2028\u202e café\n", "n": [1, 2]}
    for text in (json.dumps(value, indent=2, ensure_ascii=False), orjson.dumps(value).decode()):
        shown = printable_json(text)

        assert json.loads(shown) == value
        assert not any(c in shown for c in "\x1b\x9b\x85\u2028\u202e")
        assert "café" in shown
