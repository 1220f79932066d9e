"""The divergence audit (DESIGN §7) through the app: a labelled set of recorded/live pairs whose
verdicts must all be right, where audit events go, and which modes write them; plus the verdicts
the fake upstream cannot produce, built from samples directly."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy import handlers
from proxy.audit import TEXT_LIMIT, audit_event, baseline, summarise
from proxy.divergence import is_divergence
from proxy.recording import Recording, Sample
from proxy.sse import Event
from tests.conftest import RunningProxy, StartProxy
from tests.fake_upstream import (
    DEFAULT_FINGERPRINT,
    FakeUpstream,
    chat_request,
    completion,
    embedding_request,
    legacy_request,
    responses_request,
)
from tests.servers import BackgroundLoop

FP_A = DEFAULT_FINGERPRINT
FP_B = "fp_fake0002"


# -- helpers -------------------------------------------------------------------------------------


def log_events(path: str | Path) -> list[dict[str, Any]]:
    """The events of a JSONL audit log; none when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def default_log(proxy: RunningProxy) -> Path:
    return Path(proxy.config.store) / "audit.jsonl"


@dataclass
class Answer:
    """What the client got: the headers and the output it read (text, or the first vector)."""

    headers: dict[str, str]
    output: Any


def send(proxy: RunningProxy, endpoint: str, *, stream: bool = False, **body: Any) -> Answer:
    """One request to `endpoint` through the SDK, read to the end."""
    with proxy.client() as client:
        if endpoint == "chat":
            raw: Any = client.chat.completions.with_raw_response.create(
                **chat_request(**body), stream=stream
            )
            if stream:
                output = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
            else:
                output = raw.parse().choices[0].message.content
        elif endpoint == "completions":
            raw = client.completions.with_raw_response.create(
                **legacy_request(**body), stream=stream
            )
            if stream:
                output = "".join(c.choices[0].text for c in raw.parse() if c.choices)
            else:
                output = raw.parse().choices[0].text
        elif endpoint == "embeddings":
            assert not stream
            raw = client.embeddings.with_raw_response.create(**embedding_request(**body))
            output = raw.parse().data[0].embedding
        else:
            assert endpoint == "responses"
            raw = client.responses.with_raw_response.create(
                **responses_request(**body), stream=stream
            )
            if stream:
                output = "".join(
                    e.delta for e in raw.parse() if e.type == "response.output_text.delta"
                )
            else:
                output = raw.parse().output_text
    return Answer({k.lower(): v for k, v in raw.headers.items()}, output)


def switch(upstream: FakeUpstream, **settings: Any) -> None:
    """Put the fake's output switches to their defaults, then apply `settings`."""
    upstream.fingerprint = FP_A
    upstream.nondeterministic = False
    for name, value in settings.items():
        setattr(upstream, name, value)


# -- the labelled set ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """A recorded/live pair produced through the fake upstream, and the verdict it must get."""

    name: str
    verdict: str
    fingerprint_changed: bool
    endpoint: str = "chat"
    recorded: dict[str, Any] = field(default_factory=dict)  # upstream switches when recording
    live: dict[str, Any] = field(default_factory=dict)  # upstream switches when auditing
    record_stream: bool = False
    live_stream: bool = False
    request: dict[str, Any] = field(default_factory=dict)  # request members for both sends

    def fingerprints(self) -> tuple[str | None, str | None]:
        # Only chat and legacy completions carry a system_fingerprint.
        if self.endpoint not in ("chat", "completions"):
            return None, None
        return self.recorded.get("fingerprint", FP_A), self.live.get("fingerprint", FP_A)


SAME_BACKEND_NEW_OUTPUT = {"nondeterministic": True}
NEW_BACKEND = {"fingerprint": FP_B}
NEW_BACKEND_NEW_OUTPUT = {"fingerprint": FP_B, "nondeterministic": True}
UNKNOWN_BACKEND = {"fingerprint": None}

PAIRS = [
    Pair("identical", "identical", False),
    Pair("content differs, same fingerprint", "content", False, live=SAME_BACKEND_NEW_OUTPUT),
    Pair("fingerprint changed, same content", "identical", True, live=NEW_BACKEND),
    Pair("fingerprint changed and content", "content", True, live=NEW_BACKEND_NEW_OUTPUT),
    Pair("live fingerprint null", "identical", False, live=UNKNOWN_BACKEND),
    Pair("recorded fingerprint null", "identical", False, recorded=UNKNOWN_BACKEND),
    Pair(
        "live fingerprint null and content",
        "content",
        False,
        live={"fingerprint": None, "nondeterministic": True},
    ),
    Pair(
        "recorded fingerprint null, live known, content",
        "content",
        False,
        recorded=UNKNOWN_BACKEND,
        live=NEW_BACKEND_NEW_OUTPUT,
    ),
    Pair("recorded stream, live body", "identical", False, record_stream=True),
    Pair("recorded body, live stream", "identical", False, live_stream=True),
    # Streams differ in their random `obfuscation` padding on every call: not an output.
    Pair("stream and stream", "identical", False, record_stream=True, live_stream=True),
    Pair(
        "stream and stream, content",
        "content",
        False,
        live=SAME_BACKEND_NEW_OUTPUT,
        record_stream=True,
        live_stream=True,
    ),
    Pair(
        "stream and body, fingerprint changed",
        "identical",
        True,
        live=NEW_BACKEND,
        record_stream=True,
    ),
    # Same output, other token counts: no divergence, but the verdict says what moved.
    Pair("usage differs only", "usage_only", False, live={"usage_delta": 3}),
    Pair(
        "stream and stream, usage differs only",
        "usage_only",
        False,
        live={"usage_delta": 3},
        record_stream=True,
        live_stream=True,
        request={"stream_options": {"include_usage": True}},
    ),
    Pair("new model snapshot, same output", "identical", False, live={"model_suffix": "-2025"}),
    Pair(
        "stream and stream, new model snapshot",
        "identical",
        False,
        live={"model_suffix": "-2025"},
        record_stream=True,
        live_stream=True,
    ),
    Pair(
        "responses new model snapshot",
        "identical",
        False,
        endpoint="responses",
        live={"model_suffix": "-2025"},
    ),
    # Logprob values move a little on every call upstream; the tokens are the output.
    Pair(
        "logprobs jitter",
        "identical",
        False,
        live={"logprob_shift": 1e-6},
        request={"logprobs": True, "top_logprobs": 2},
    ),
    Pair(
        "stream and body, logprobs jitter",
        "identical",
        False,
        live={"logprob_shift": 1e-6},
        record_stream=True,
        request={"logprobs": True},
    ),
    Pair(
        "logprobs jitter and content",
        "content",
        False,
        live={"logprob_shift": 1e-6, "nondeterministic": True},
        request={"logprobs": True},
    ),
    Pair(
        "completions logprobs jitter",
        "identical",
        False,
        endpoint="completions",
        live={"logprob_shift": 0.01},
        request={"logprobs": 2},
    ),
    Pair("completions identical", "identical", False, endpoint="completions"),
    Pair(
        "completions content",
        "content",
        False,
        endpoint="completions",
        live=SAME_BACKEND_NEW_OUTPUT,
    ),
    Pair(
        "completions stream and body",
        "identical",
        False,
        endpoint="completions",
        record_stream=True,
    ),
    Pair("embeddings identical", "identical", False, endpoint="embeddings"),
    Pair(
        "embeddings differ", "content", False, endpoint="embeddings", live=SAME_BACKEND_NEW_OUTPUT
    ),
    Pair("responses identical", "identical", False, endpoint="responses"),
    Pair("responses content", "content", False, endpoint="responses", live=SAME_BACKEND_NEW_OUTPUT),
    Pair(
        "responses stream and body",
        "identical",
        False,
        endpoint="responses",
        record_stream=True,
    ),
]


@pytest.mark.parametrize("pair", PAIRS, ids=[p.name for p in PAIRS])
def test_every_labelled_pair_gets_its_verdict(
    pair: Pair, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="audit")
    switch(upstream, **pair.recorded)
    first = send(proxy, pair.endpoint, stream=pair.record_stream, **pair.request)
    switch(upstream, **pair.live)
    second = send(proxy, pair.endpoint, stream=pair.live_stream, **pair.request)

    assert first.headers["x-seedcache-status"] == "audited"
    assert first.headers["x-seedcache-verdict"] == "new"
    assert second.headers["x-seedcache-status"] == "audited"
    assert second.headers["x-seedcache-verdict"] == pair.verdict
    [event] = log_events(default_log(proxy))
    assert proxy.events() == [event]
    assert event["verdict"] == pair.verdict
    assert event["fingerprint_changed"] is pair.fingerprint_changed
    assert (event["recorded_fingerprint"], event["live_fingerprint"]) == pair.fingerprints()
    assert event["key"] == second.headers["x-seedcache-key"]
    assert (second.output == first.output) is not is_divergence(pair.verdict)


# -- audit mode ----------------------------------------------------------------------------------


def test_audit_mode_answers_live_and_leaves_the_recording_as_it_was(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="audit")
    first = send(proxy, "chat")
    upstream.nondeterministic = True
    second = send(proxy, "chat")

    assert upstream.count() == 2
    [recording] = proxy.recordings()
    [sample] = recording.samples
    assert sample.body["choices"][0]["message"]["content"] == first.output
    # The client got the live answer, not the recorded one.
    assert second.output != first.output
    [event] = proxy.events()
    assert event["texts"] == {"recorded": first.output, "live": second.output}
    assert event["differences"][0]["path"] == "choices[0].message.content"
    similarity = event["similarity"]
    assert 0 <= similarity["text_ratio"] < 1
    assert 0 < similarity["ngram_cosine_distance"] <= 1
    assert isinstance(similarity["first_difference_at"], int)
    assert similarity["embedding_distance"] is None


def test_a_new_key_is_recorded_without_an_event(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="audit")
    answer = send(proxy, "chat")

    assert answer.headers["x-seedcache-verdict"] == "new"
    [recording] = proxy.recordings()
    assert recording.key == answer.headers["x-seedcache-key"]
    assert proxy.events() == []
    assert log_events(default_log(proxy)) == []


def test_an_event_describes_the_request_and_both_samples(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="audit")
    send(proxy, "chat", seed=7)
    [recording] = proxy.recordings()
    upstream.fingerprint = FP_B
    send(proxy, "chat", seed=7)

    [event] = proxy.events()
    assert event["path"] == "/v1/chat/completions"
    assert event["model"] == "gpt-4o-mini"
    assert event["response_model"] == event["recorded_response_model"] == "gpt-4o-mini-2024-07-18"
    assert event["seed"] == 7
    assert event["namespace"] == ""
    assert event["upstream"] == upstream.base_url
    assert event["recorded_at"] == recording.samples[0].recorded_at
    assert event["ts"].endswith("Z")
    assert "texts" not in event  # identical: nothing to show side by side


def test_audit_log_goes_where_configured(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "logs" / "my-audit.jsonl"
    proxy = start_proxy(mode="audit", audit_log=str(path))
    send(proxy, "chat")
    upstream.nondeterministic = True
    send(proxy, "chat")

    [event] = log_events(path)
    assert event["verdict"] == "content"
    assert not default_log(proxy).exists()
    assert proxy.events() == [event]


def test_audit_embeddings_measure_the_distance_between_the_texts(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="audit", audit_embeddings="text-embedding-3-small")
    send(proxy, "chat")
    send(proxy, "chat")  # identical texts: no embeddings needed
    upstream.nondeterministic = True
    send(proxy, "chat")

    identical, diverged = proxy.events()
    assert identical["similarity"]["embedding_distance"] == 0.0
    distance = diverged["similarity"]["embedding_distance"]
    assert isinstance(distance, float)
    assert 0 < distance <= 2
    [call] = [c for c in upstream.calls if c.path == "/v1/embeddings"]
    assert call.body["model"] == "text-embedding-3-small"
    assert call.body["input"] == [diverged["texts"]["recorded"], diverged["texts"]["live"]]
    # The proxy's own embeddings request is not a recording.
    assert len(proxy.recordings()) == 1


def test_a_divergence_is_one_warning_line(
    start_proxy: StartProxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = start_proxy(mode="audit")
    send(proxy, "chat")
    with caplog.at_level(logging.WARNING, logger="seedcache"):
        send(proxy, "chat")
        upstream.usage_delta = 3  # the same output: no divergence
        assert send(proxy, "chat").headers["x-seedcache-verdict"] == "usage_only"
        upstream.nondeterministic = True
        answer = send(proxy, "chat")

    [line] = [r for r in caplog.records if r.name == "seedcache" and "divergence" in r.message]
    assert answer.headers["x-seedcache-key"][:12] in line.message
    assert "gpt-4o-mini" in line.message
    assert "content" in line.message
    assert line.message.endswith(f"fingerprint {DEFAULT_FINGERPRINT} (unchanged)")
    assert proxy.stats()["divergences"] == 1


def test_models_a_client_or_upstream_chose_cannot_forge_lines_of_the_log(
    start_proxy: StartProxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = start_proxy(mode="audit")
    model = "gpt-4o\n2026-11-26 13:00:00,000 ERROR seedcache: FORGED line\x1b[2J"
    send(proxy, "chat", model=model)
    with caplog.at_level(logging.WARNING, logger="seedcache"):
        upstream.model_suffix = "-2025-01-01\u2028\r"  # the same output from another snapshot
        send(proxy, "chat", model=model)
        upstream.nondeterministic = True
        send(proxy, "chat", model=model)

    changed, diverged = [r.getMessage() for r in caplog.records if r.name == "seedcache"]
    escaped = "gpt-4o\\n2026-11-26 13:00:00,000 ERROR seedcache: FORGED line\\x1b[2J"
    assert changed.startswith("model snapshot changed on key ")
    assert f": {escaped}-2024-07-18 -> {escaped}-2025-01-01\\u2028\\r, same output" in changed
    assert diverged.startswith("divergence on key ")
    assert f"model {escaped}, verdict content" in diverged
    for line in (changed, diverged):
        assert not any(c in line for c in "\n\r\x1b\u2028")


def test_an_event_names_both_model_snapshots(
    start_proxy: StartProxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = start_proxy(mode="audit")
    send(proxy, "chat")
    upstream.model_suffix = "-2025-01-01"
    with caplog.at_level(logging.WARNING, logger="seedcache"):
        answer = send(proxy, "chat")

    assert answer.headers["x-seedcache-verdict"] == "identical"
    [event] = proxy.events()
    assert event["recorded_response_model"] == "gpt-4o-mini-2024-07-18"
    assert event["response_model"] == "gpt-4o-mini-2025-01-01"
    assert (event["verdict"], event["differences"]) == ("identical", [])
    # No divergence, but the backend changed: said in the log and counted in the summary.
    [line] = [r.message for r in caplog.records if "model snapshot changed" in r.message]
    assert "gpt-4o-mini-2024-07-18 -> gpt-4o-mini-2025-01-01" in line
    [group] = summarise([event])
    assert (group["model_changes"], group["divergences"]) == (1, 0)


def test_record_mode_keeps_a_new_model_snapshot_as_its_own_sample(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="record")
    send(proxy, "chat")
    upstream.model_suffix = "-2025-01-01"
    send(proxy, "chat")

    [recording] = proxy.recordings()
    assert [s.model for s in recording.samples] == [
        "gpt-4o-mini-2024-07-18",
        "gpt-4o-mini-2025-01-01",
    ]
    assert [e["verdict"] for e in proxy.events()] == ["identical"]


# -- other modes that audit ----------------------------------------------------------------------


def test_record_mode_audits_a_key_that_had_a_sample_and_adds_the_new_one(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="record")
    send(proxy, "chat")
    assert proxy.events() == []
    upstream.nondeterministic = True
    answer = send(proxy, "chat")

    assert answer.headers["x-seedcache-status"] == "recorded"
    assert "x-seedcache-verdict" not in answer.headers  # only audit mode answers with it
    [event] = proxy.events()
    assert event["verdict"] == "content"
    assert log_events(default_log(proxy)) == [event]
    [recording] = proxy.recordings()
    assert len(recording.samples) == 2


def test_auto_mode_hits_write_no_event(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    send(proxy, "chat")
    upstream.nondeterministic = True
    answer = send(proxy, "chat")

    assert answer.headers["x-seedcache-status"] == "hit"
    assert proxy.events() == []


def test_auto_mode_with_refresh_audits_the_refreshed_key(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(on_fingerprint_change="refresh")
    send(proxy, "chat")
    switch(upstream, fingerprint=FP_B, nondeterministic=True)
    send(proxy, "chat", messages=[{"role": "user", "content": "Another question."}])
    answer = send(proxy, "chat")

    assert answer.headers["x-seedcache-status"] == "recorded"
    [event] = proxy.events()
    assert event["key"] == answer.headers["x-seedcache-key"]
    assert event["verdict"] == "content"
    assert event["fingerprint_changed"] is True


# -- verdicts the fake cannot produce, from samples ----------------------------------------------


def sample(response: dict[str, Any] | None = None, **overrides: Any) -> Sample:
    """A sample of a non-streaming `response` (`completion()` unless given)."""
    body = response if response is not None else completion()
    fields: dict[str, Any] = {
        "recorded_at": "2026-11-23T20:01:02.345Z",
        "upstream": "https://api.openai.com/v1",
        "model": body.get("model"),
        "system_fingerprint": body.get("system_fingerprint"),
        "status": 200,
        "headers": {"content-type": "application/json"},
        "elapsed_ms": 812,
        "body": body,
    }
    fields.update(overrides)
    return Sample(**fields)


def stream_sample(upstream_body: dict[str, Any], chunks: list[dict[str, Any]]) -> Sample:
    events = tuple(Event(json.dumps(chunk), None, 10 * i) for i, chunk in enumerate(chunks))
    return sample(upstream_body, body=None, events=(*events, Event("[DONE]", None, 999)))


RECORDING = Recording(
    key="3fa2c1d09e7b" + "0" * 52,
    method="POST",
    path="/v1/chat/completions",
    body=chat_request(),
)


def with_message(**message: Any) -> dict[str, Any]:
    body = completion()
    body["choices"][0]["message"].update(message)
    return body


def with_choice(**choice: Any) -> dict[str, Any]:
    body = completion()
    body["choices"][0].update(choice)
    return body


def weather_call(city: str, call_id: str) -> dict[str, Any]:
    arguments = json.dumps({"city": city})
    return {"id": call_id, "type": "function", "function": {"name": "w", "arguments": arguments}}


PURE_PAIRS = [
    ("identical", completion(), completion(), "identical"),
    ("volatiles only", completion(), completion(id="chatcmpl-other", created=1), "identical"),
    ("content", completion(), completion("The capital of France is Lyon."), "content"),
    (
        "tool call arguments",
        with_message(content=None, tool_calls=[weather_call("Paris", "call_a")]),
        with_message(content=None, tool_calls=[weather_call("Lima", "call_b")]),
        "tool_calls",
    ),
    (
        "tool call ids only",
        with_message(content=None, tool_calls=[weather_call("Paris", "call_a")]),
        with_message(content=None, tool_calls=[weather_call("Paris", "call_b")]),
        "identical",
    ),
    ("finish_reason", completion(), with_choice(finish_reason="length"), "finish_reason"),
    (
        "usage only",
        completion(),
        completion(usage={**completion()["usage"], "completion_tokens": 9, "total_tokens": 23}),
        "usage_only",
    ),
    ("shape", completion(), with_message(annotations=[{"type": "url_citation"}]), "shape"),
    (
        "content wins over finish_reason",
        completion(),
        {**with_choice(finish_reason="length"), "choices": [{
            **with_choice(finish_reason="length")["choices"][0],
            "message": {**completion()["choices"][0]["message"], "content": "Lyon."},
        }]},
        "content",
    ),
    (
        "tool calls win over finish_reason",
        with_message(content=None, tool_calls=[weather_call("Paris", "call_a")]),
        {
            **completion(),
            "choices": [{
                "index": 0,
                "message": {**with_message(content=None)["choices"][0]["message"],
                            "tool_calls": [weather_call("Oslo", "call_a")]},
                "logprobs": None,
                "finish_reason": "tool_calls",
            }],
        },
        "tool_calls",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("recorded", "live", "verdict"),
    [p[1:] for p in PURE_PAIRS],
    ids=[p[0] for p in PURE_PAIRS],
)
def test_audit_event_verdicts_from_samples(
    recorded: dict[str, Any], live: dict[str, Any], verdict: str
) -> None:
    event, comparison = audit_event(RECORDING, sample(recorded), sample(live))

    assert event["verdict"] == verdict == comparison.verdict.value
    assert ("texts" in event) is is_divergence(verdict)


@pytest.mark.parametrize(
    ("recorded_fp", "live_fp", "changed"),
    [
        ("fp_a", "fp_a", False),
        ("fp_a", "fp_b", True),
        ("fp_a", None, False),
        (None, "fp_b", False),
        (None, None, False),
        ("", "fp_b", False),  # empty is as unknown as null
    ],
)
def test_fingerprint_changed_only_when_both_are_known_and_differ(
    recorded_fp: str | None, live_fp: str | None, changed: bool
) -> None:
    recorded = sample(completion(system_fingerprint=recorded_fp))
    live = sample(completion(system_fingerprint=live_fp))

    event, _ = audit_event(RECORDING, recorded, live)

    assert event["fingerprint_changed"] is changed
    assert event["verdict"] == "identical"


def test_a_streamed_sample_is_assembled_before_comparing() -> None:
    fake = FakeUpstream()
    body = chat_request()
    streamed = stream_sample(fake.chat_completion(body), fake.chat_chunks(body))

    event, _ = audit_event(RECORDING, streamed, sample(fake.chat_completion(body)))
    assert event["verdict"] == "identical"

    fake.nondeterministic = True
    other = fake.chat_completion(body, salt="1")
    event, _ = audit_event(RECORDING, streamed, sample(other))
    assert event["verdict"] == "content"
    assert (
        event["texts"]["recorded"] == fake.chat_completion(body)["choices"][0]["message"]["content"]
    )


def test_a_reasoning_divergence_carries_both_reasonings() -> None:
    recorded = sample(with_message(reasoning_content="Paris is the capital."))
    live = sample(with_message(reasoning_content="The user wants a city."))

    event, _ = audit_event(RECORDING, recorded, live)

    assert event["verdict"] == "content"
    assert event["texts"]["recorded"].startswith("Paris is the capital.\n")
    assert event["texts"]["live"].startswith("The user wants a city.\n")
    assert event["similarity"]["text_ratio"] < 1
    assert event["similarity"]["first_difference_at"] == 0


def test_texts_of_a_divergence_are_capped() -> None:
    recorded = sample(completion("a" * 5_000))
    live = sample(completion("b" * 3_000))

    event, _ = audit_event(RECORDING, recorded, live)

    assert event["texts"] == {"recorded": "a" * TEXT_LIMIT, "live": "b" * TEXT_LIMIT}


def test_a_divergence_without_text_carries_no_texts() -> None:
    fake = FakeUpstream()
    embeddings = Recording("k" * 64, "POST", "/v1/embeddings", embedding_request())
    recorded = sample(fake.embeddings(embedding_request()))
    live = sample(fake.embeddings(embedding_request(), salt="1"))

    event, _ = audit_event(embeddings, recorded, live)

    assert event["verdict"] == "content"
    assert "texts" not in event


def test_baseline_is_the_newest_sample_of_the_live_fingerprint_else_the_newest() -> None:
    old_a = sample(completion("one", system_fingerprint="fp_a"))
    new_a = sample(completion("two", system_fingerprint="fp_a"))
    b = sample(completion("three", system_fingerprint="fp_b"))
    samples = (old_a, new_a, b)

    assert baseline(samples, "fp_a") is new_a
    assert baseline(samples, "fp_b") is b
    assert baseline(samples, "fp_c") is b
    assert baseline(samples, None) is b
    assert baseline((), "fp_a") is None


def test_the_sdk_sees_the_live_answer_of_an_audited_stream(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="audit")
    send(proxy, "chat")
    upstream.nondeterministic = True
    with proxy.client() as client:
        stream = client.chat.completions.create(**chat_request(), stream=True)
        chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in upstream.chat_chunks(chat_request(), salt="1")
    )


def test_audit_compares_with_the_newest_sample_of_the_live_fingerprint(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    recorder = start_proxy(mode="record")
    at_a = send(recorder, "chat")
    switch(upstream, fingerprint=FP_B, nondeterministic=True)
    at_b = send(recorder, "chat")
    recorder.stop()
    auditor = start_proxy(mode="audit")

    # Live at A gives A's output again: compared with the A sample, not the newer B one.
    switch(upstream)
    same = send(auditor, "chat")
    # A fingerprint no sample has: compared with the newest sample (B).
    switch(upstream, fingerprint="fp_fake0003")
    other = send(auditor, "chat")

    assert same.headers["x-seedcache-verdict"] == "identical"
    assert other.headers["x-seedcache-verdict"] == "content"
    first, second = auditor.events()[-2:]
    assert (first["recorded_fingerprint"], first["fingerprint_changed"]) == (FP_A, False)
    assert (second["recorded_fingerprint"], second["fingerprint_changed"]) == (FP_B, True)
    assert second["texts"] == {"recorded": at_b.output, "live": other.output}
    assert same.output == at_a.output


def test_audit_embeddings_leave_the_distance_null_when_there_is_no_text(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="audit", audit_embeddings="text-embedding-3-small")
    with proxy.client() as client:
        client.models.list()
        upstream.models.append("gpt-5-preview")
        client.models.list()

    [event] = proxy.events()
    assert event["verdict"] != "identical"
    assert event["similarity"]["text_ratio"] is None
    assert event["similarity"]["embedding_distance"] is None


# -- off the event loop --------------------------------------------------------------------------


@dataclass
class Watched:
    """Where the proxy compared live answers with their recordings: the thread of each call."""

    loop_thread: threading.Thread
    threads: list[threading.Thread] = field(default_factory=list)

    def on_loop(self) -> list[bool]:
        return [thread is self.loop_thread for thread in self.threads]


@pytest.fixture
def watched(loop: BackgroundLoop, monkeypatch: pytest.MonkeyPatch) -> Watched:
    async def current() -> threading.Thread:
        return threading.current_thread()

    seen = Watched(loop.run(current()))

    def watched_audit_event(*args: Any, **kwargs: Any) -> Any:
        seen.threads.append(threading.current_thread())
        return audit_event(*args, **kwargs)

    monkeypatch.setattr(handlers, "audit_event", watched_audit_event)
    return seen


# A question long enough that its recording is compared in a worker thread.
LONG_QUESTION = [{"role": "user", "content": "Summarise this. " + "Mars is red. " * 4_000}]


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
def test_a_large_recording_is_compared_off_the_event_loop(
    start_proxy: StartProxy, upstream: FakeUpstream, watched: Watched, stream: bool
) -> None:
    proxy = start_proxy(mode="audit", audit_embeddings="text-embedding-3-small")
    first = send(proxy, "chat", messages=LONG_QUESTION)
    same = send(proxy, "chat", stream=stream, messages=LONG_QUESTION)
    upstream.nondeterministic = True
    other = send(proxy, "chat", stream=stream, messages=LONG_QUESTION)

    assert watched.on_loop() == [False, False]
    assert same.headers["x-seedcache-verdict"] == "identical"
    assert other.headers["x-seedcache-verdict"] == "content"
    identical, diverged = proxy.events()
    assert identical["verdict"] == "identical"
    assert diverged["texts"] == {"recorded": first.output, "live": other.output}
    assert 0 < diverged["similarity"]["embedding_distance"] <= 2


def test_a_small_recording_is_compared_at_once_on_the_event_loop(
    start_proxy: StartProxy, upstream: FakeUpstream, watched: Watched
) -> None:
    proxy = start_proxy(mode="record")
    send(proxy, "completions")
    send(proxy, "completions")
    upstream.nondeterministic = True
    send(proxy, "completions")

    assert watched.on_loop() == [True, True]
    assert [e["verdict"] for e in proxy.events()] == ["identical", "content"]


@pytest.mark.parametrize("padding", [0, 8_000], ids=["small", "large"])
def test_an_unreadable_recording_is_not_audited_and_the_answer_still_delivered(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path, padding: int
) -> None:
    store = tmp_path / "rec"
    proxy = start_proxy(store=f"files:{store}", mode="audit")
    key = send(proxy, "chat").headers["x-seedcache-key"]
    [path] = [p for p in store.rglob("*.json") if p.stem == key]
    path.write_text("{ not json" + " " * padding)

    answer = send(proxy, "chat")

    assert answer.headers["x-seedcache-status"] == "miss"
    assert answer.output
    assert proxy.events() == []
