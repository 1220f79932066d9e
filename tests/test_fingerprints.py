"""Fingerprints through the app with the real SDK (DESIGN §4): samples per (fingerprint, output),
the remembered current fingerprint, pinning, `--on-fingerprint-change`, and null as "unknown"."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy import handlers
from proxy.app import HANDLERS
from proxy.recording import Recording
from proxy.stores.disk import DiskStore
from tests.conftest import RunningProxy, StartProxy, status
from tests.fake_upstream import DEFAULT_FINGERPRINT, FakeUpstream, chat_request
from tests.servers import BackgroundLoop

FP_A = DEFAULT_FINGERPRINT
FP_B = "fp_fake0002"
CHAT = "/v1/chat/completions"
# A second request, used only to make the proxy see the upstream's fingerprint live.
OTHER = chat_request(messages=[{"role": "user", "content": "Anything else."}])


def recording(loop: BackgroundLoop, proxy: RunningProxy, key: str) -> Recording:
    """The recording under `key` in the proxy's disk store, read through a second handle."""

    async def read() -> bytes | None:
        store = DiskStore(proxy.config.store)
        try:
            return await store.get("", key)
        finally:
            await store.close()

    raw = loop.run(read())
    assert raw is not None, f"no recording under {key}"
    return Recording.loads(raw)


def ask(proxy: RunningProxy, body: dict[str, Any], **headers: str) -> Any:
    """One non-streaming chat request through the SDK; the raw response (headers, .parse())."""
    with proxy.client() as client:
        return client.chat.completions.with_raw_response.create(**body, extra_headers=headers)


def key_of(raw: Any) -> str:
    return str(raw.headers["x-seedcache-key"])


def fingerprint_moved(proxy: RunningProxy, upstream: FakeUpstream) -> str:
    """Record chat_request() at FP_A, then let the proxy see FP_B live on another request.

    Returns the key of the first request: its only sample has a fingerprint that is no longer
    the current one.
    """
    key = key_of(ask(proxy, chat_request()))
    upstream.fingerprint = FP_B
    assert status(ask(proxy, OTHER)) == "recorded"
    return key


# -- samples -------------------------------------------------------------------------------------


def test_a_recording_holds_one_sample_per_distinct_fingerprint_and_output(
    start_proxy: StartProxy, upstream: FakeUpstream, loop: BackgroundLoop
) -> None:
    proxy = start_proxy(mode="record")
    upstream.nondeterministic = True
    raws = [ask(proxy, chat_request()) for _ in range(3)]
    upstream.nondeterministic = False
    raws += [ask(proxy, chat_request()) for _ in range(2)]  # the same output twice: one sample
    upstream.fingerprint = FP_B
    raws.append(ask(proxy, chat_request()))  # that output again, from another backend

    key = key_of(raws[0])
    samples = recording(loop, proxy, key).samples
    answers = [raw.parse() for raw in raws]
    assert [s.body["choices"][0]["message"]["content"] for s in samples] == [
        a.choices[0].message.content for a in (answers[0], answers[1], answers[2], answers[4])
    ] + [answers[5].choices[0].message.content]
    assert [s.system_fingerprint for s in samples] == [FP_A, FP_A, FP_A, FP_A, FP_B]
    assert len({s.body["choices"][0]["message"]["content"] for s in samples[:4]}) == 4
    times = [datetime.fromisoformat(s.recorded_at.replace("Z", "+00:00")) for s in samples]
    assert times == sorted(times)  # newest last
    # The twice-recorded output kept the later time of the two.
    assert samples[3].body["id"] == answers[4].id
    for sample in samples:
        assert sample.upstream == upstream.base_url
        assert sample.model == "gpt-4o-mini-2024-07-18"
        assert sample.status == 200


def test_streams_of_the_same_output_are_one_sample(
    start_proxy: StartProxy, upstream: FakeUpstream, loop: BackgroundLoop
) -> None:
    proxy = start_proxy(mode="record")
    # Raw HTTP reads the body to its terminating chunk, which the proxy sends after storing the
    # sample (the SDK stops reading at [DONE], before that).
    results = [proxy.request("POST", CHAT, {**chat_request(), "stream": True}) for _ in range(2)]
    assert all(result.body.endswith(b"data: [DONE]\n\n") for result in results)
    samples = recording(loop, proxy, results[0].headers["x-seedcache-key"]).samples
    assert len(samples) == 1


# -- the current fingerprint ---------------------------------------------------------------------


def test_replay_serves_the_newest_sample_of_the_current_fingerprint_after_a_restart(
    start_proxy: StartProxy, upstream: FakeUpstream, loop: BackgroundLoop
) -> None:
    recorder = start_proxy(mode="record")
    upstream.nondeterministic = True
    first_a, second_a = (ask(recorder, chat_request()).parse() for _ in range(2))
    upstream.fingerprint = FP_B
    newest = ask(recorder, chat_request())
    # The backend moves back to A: the proxy sees it live on another request.
    upstream.fingerprint = FP_A
    ask(recorder, OTHER)
    key = key_of(newest)
    assert [s.system_fingerprint for s in recording(loop, recorder, key).samples] == [
        FP_A,
        FP_A,
        FP_B,
    ]
    recorder.stop()

    # A new proxy on the same store knows the current fingerprint is A: without that memory it
    # would serve the newest sample (B).
    replayer = start_proxy(mode="replay", on_fingerprint_change="fail")
    calls = upstream.count()
    raw = ask(replayer, chat_request())

    assert status(raw) == "hit"
    assert raw.headers["x-seedcache-fingerprint"] == FP_A
    answer = raw.parse()
    assert answer.id == second_a.id != first_a.id
    assert answer.system_fingerprint == FP_A
    assert upstream.count() == calls


@pytest.mark.parametrize(
    ("on_change", "expected"), [("keep", (200, "stale")), ("fail", (409, "stale"))]
)
def test_a_replay_through_another_upstream_knows_the_fingerprint_recorded_through_any(
    start_proxy: StartProxy, upstream: FakeUpstream, on_change: str, expected: tuple[int, str]
) -> None:
    # Recorded with --upstream http://vllm…, replayed by a CI run that gives no --upstream.
    fingerprint_moved(start_proxy(), upstream)

    replayer = start_proxy(
        mode="replay", on_fingerprint_change=on_change, upstream="https://api.openai.com/v1"
    )
    replayed = replayer.request("POST", CHAT, chat_request())

    assert (replayed.status, replayed.headers["x-seedcache-status"]) == expected
    if on_change == "fail":
        assert FP_B in replayed.json()["error"]["message"]


def test_the_fingerprint_seen_through_this_upstream_comes_before_one_seen_through_another(
    start_proxy: StartProxy, upstream: FakeUpstream, loop: BackgroundLoop
) -> None:
    recorder = start_proxy()
    fingerprint_moved(recorder, upstream)  # B is the newest fingerprint seen, through the fake
    recorder.stop()
    other = "http://127.0.0.1:9/v1"

    async def seen_through_other() -> None:
        # What a recording run through `other` that saw A left in the store.
        store = DiskStore(recorder.config.store)
        try:
            await store.set_meta(f"fingerprint:{other}|gpt-4o-mini", FP_A)
        finally:
            await store.close()

    loop.run(seen_through_other())
    raw = ask(
        start_proxy(mode="replay", on_fingerprint_change="fail", upstream=other), chat_request()
    )

    assert status(raw) == "hit"
    assert raw.headers["x-seedcache-fingerprint"] == FP_A


def test_a_store_that_remembers_the_fingerprint_only_by_upstream_still_replays_by_it(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # Earlier versions kept the current fingerprint under the upstream's URL alone.
    store = tmp_path / "recordings"
    fingerprint_moved(start_proxy(store=f"files:{store}"), upstream)
    meta = store / ".seedcache-meta.json"
    meta.write_text(json.dumps({f"fingerprint:{upstream.base_url}|gpt-4o-mini": FP_B}))

    replayer = start_proxy(mode="replay", store=f"files:{store}", on_fingerprint_change="fail")
    refused = replayer.request("POST", CHAT, chat_request())

    assert (refused.status, refused.headers["x-seedcache-status"]) == (409, "stale")


def test_replays_carry_the_fingerprint_and_recording_time_of_their_sample(
    proxy: RunningProxy, upstream: FakeUpstream, loop: BackgroundLoop
) -> None:
    key = key_of(ask(proxy, chat_request()))
    [sample] = recording(loop, proxy, key).samples
    with proxy.client() as client:
        plain = client.chat.completions.with_raw_response.create(**chat_request())
        streamed = client.chat.completions.with_raw_response.create(**chat_request(), stream=True)
        chunks = list(streamed.parse())

    for raw in (plain, streamed):
        assert status(raw) == "hit"
        assert raw.headers["x-seedcache-fingerprint"] == FP_A == sample.system_fingerprint
        assert raw.headers["x-seedcache-recorded-at"] == sample.recorded_at
    assert {chunk.system_fingerprint for chunk in chunks} == {FP_A}


# -- pinning -------------------------------------------------------------------------------------


def test_a_pinned_fingerprint_selects_its_sample_and_misses_when_none_has_it(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    recorder = start_proxy(mode="record")
    upstream.nondeterministic = True
    at_a = ask(recorder, chat_request()).parse()
    upstream.fingerprint = FP_B
    at_b = ask(recorder, chat_request()).parse()
    recorder.stop()
    replayer = start_proxy(mode="replay")
    calls = upstream.count()

    for fingerprint, expected in ((FP_A, at_a), (FP_B, at_b)):
        raw = ask(replayer, chat_request(), **{"X-Seedcache-Fingerprint": fingerprint})
        assert status(raw) == "hit"
        assert raw.headers["x-seedcache-fingerprint"] == fingerprint
        assert raw.parse().id == expected.id

    result = replayer.request(
        "POST", CHAT, chat_request(), headers={"X-Seedcache-Fingerprint": "fp_nowhere"}
    )
    assert result.status == 404
    assert result.headers["x-should-retry"] == "false"
    error = result.json()["error"]
    assert error["type"] == "seedcache_miss"
    assert error["code"] == "recording_not_found"
    assert "fp_nowhere" in error["message"]
    assert upstream.count() == calls
    # In auto too: a live answer would come from whatever backend the upstream runs now.
    auto = start_proxy()
    pinned = auto.request(
        "POST", CHAT, chat_request(), headers={"X-Seedcache-Fingerprint": "fp_nowhere"}
    )
    assert (pinned.status, pinned.json()["error"]["code"]) == (404, "recording_not_found")
    assert upstream.count() == calls
    # So recording cannot help; the pin can.
    for message in (error["message"], pinned.json()["error"]["message"]):
        assert f"Pin a fingerprint the recording has ({FP_A}, {FP_B}) or drop the pin" in message
        assert "Record it with" not in message


def test_an_audit_compares_with_the_pinned_sample(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # "How does today's answer differ from the fp_A baseline?": the pin names the baseline.
    recorder = start_proxy(mode="record")
    upstream.nondeterministic = True
    ask(recorder, chat_request())
    upstream.fingerprint = FP_B
    ask(recorder, chat_request())
    recorder.stop()
    auditor = start_proxy(mode="audit")

    ask(auditor, chat_request(), **{"X-Seedcache-Fingerprint": FP_A})
    ask(auditor, chat_request())

    pinned, unpinned = auditor.events()[-2:]  # after the recorder's own
    assert (pinned["recorded_fingerprint"], pinned["live_fingerprint"]) == (FP_A, FP_B)
    assert pinned["fingerprint_changed"] is True
    assert (unpinned["recorded_fingerprint"], unpinned["live_fingerprint"]) == (FP_B, FP_B)
    assert unpinned["fingerprint_changed"] is False


def test_an_empty_fingerprint_header_pins_nothing(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # A template whose variable is unset sends the header empty: no pin, a plain hit.
    proxy.request("POST", CHAT, chat_request())
    again = proxy.request("POST", CHAT, chat_request(), headers={"X-Seedcache-Fingerprint": ""})

    assert (again.status, again.headers["x-seedcache-status"]) == (200, "hit")
    assert upstream.count() == 1


def test_the_current_fingerprints_kept_in_memory_are_bounded(
    proxy: RunningProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The model is the client's to choose: ever new names must not grow memory for ever.
    monkeypatch.setattr(handlers, "FINGERPRINT_CACHE_SIZE", 5)
    models = [f"model-{i}" for i in range(12)]
    for model in models:
        proxy.request("POST", CHAT, chat_request(model=model))
    replayed = [proxy.request("POST", CHAT, chat_request(model=model)) for model in models]

    kept = proxy.running.app[HANDLERS]._fingerprints
    assert 0 < len(kept) <= 5
    assert [r.headers["x-seedcache-status"] for r in replayed] == ["hit"] * len(models)
    assert upstream.count() == len(models)


# -- --on-fingerprint-change ---------------------------------------------------------------------


def test_keep_serves_the_newest_sample_marked_stale(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy()  # keep is the default
    fingerprint_moved(proxy, upstream)
    calls = upstream.count()

    raw = ask(proxy, chat_request())

    assert status(raw) == "stale"
    assert raw.headers["x-seedcache-fingerprint"] == FP_A
    assert raw.parse().system_fingerprint == FP_A
    assert upstream.count() == calls


def test_refresh_records_a_new_sample_and_writes_an_audit_event(
    start_proxy: StartProxy, upstream: FakeUpstream, loop: BackgroundLoop
) -> None:
    proxy = start_proxy(on_fingerprint_change="refresh")
    key = fingerprint_moved(proxy, upstream)
    calls = upstream.count()

    refreshed = ask(proxy, chat_request())
    again = ask(proxy, chat_request())

    assert status(refreshed) == "recorded"
    assert refreshed.parse().system_fingerprint == FP_B
    assert upstream.count() == calls + 1
    assert [s.system_fingerprint for s in recording(loop, proxy, key).samples] == [FP_A, FP_B]
    assert status(again) == "hit"
    assert again.headers["x-seedcache-fingerprint"] == FP_B
    [event] = proxy.events()
    assert event["key"] == key
    assert event["verdict"] == "identical"  # the fake's output does not depend on its backend
    assert (event["recorded_fingerprint"], event["live_fingerprint"]) == (FP_A, FP_B)
    assert event["fingerprint_changed"] is True


def test_fail_answers_an_error_the_sdk_does_not_retry(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(on_fingerprint_change="fail")
    fingerprint_moved(proxy, upstream)
    calls = upstream.count()
    sent: list[Any] = []

    # The SDK's own HTTP client, counting what it sends.
    http_client = openai.DefaultHttpxClient(event_hooks={"request": [sent.append]})
    with (
        proxy.client(max_retries=2, http_client=http_client) as client,
        pytest.raises(openai.ConflictError) as caught,
    ):
        client.chat.completions.create(**chat_request())

    # 409 is a status the SDK retries by default; x-should-retry: false stops it.
    assert len(sent) == 1
    assert caught.value.status_code == 409
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["type"] == "seedcache_stale"
    assert error["code"] == "fingerprint_changed"
    assert FP_B in error["message"]
    assert (
        "Re-record it with: X-Seedcache-Mode: record (or seedcache serve --mode record)"
        in (error["message"])
    )
    assert caught.value.response.headers["x-seedcache-status"] == "stale"
    assert proxy.stats()["stale"] == 1
    assert upstream.count() == calls


def test_fail_on_a_replay_server_names_only_the_way_that_records_again(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # A replay server ignores X-Seedcache-Mode: the 409 does not suggest it.
    fingerprint_moved(start_proxy(), upstream)
    replayer = start_proxy(mode="replay", on_fingerprint_change="fail")

    refused = replayer.request("POST", CHAT, chat_request())

    assert refused.status == 409
    message = refused.json()["error"]["message"]
    assert "Re-record it with: seedcache serve --mode record;" in message
    assert "X-Seedcache-Mode" not in message


def test_refresh_in_replay_mode_serves_the_stale_sample_without_contacting_upstream(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    fingerprint_moved(start_proxy(), upstream)
    replayer = start_proxy(mode="replay", on_fingerprint_change="refresh")
    calls = upstream.count()

    raw = ask(replayer, chat_request())

    assert status(raw) == "stale"
    assert raw.headers["x-seedcache-fingerprint"] == FP_A
    assert upstream.count() == calls


# -- null is "unknown" ---------------------------------------------------------------------------


def test_a_null_live_fingerprint_is_never_a_change(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # With `fail`, a fingerprint counted as changed would be an error, not a hit.
    proxy = start_proxy(on_fingerprint_change="fail")
    ask(proxy, chat_request())
    upstream.fingerprint = None
    assert status(ask(proxy, OTHER)) == "recorded"

    raw = ask(proxy, chat_request())

    assert status(raw) == "hit"
    assert raw.headers["x-seedcache-fingerprint"] == FP_A


def test_a_sample_with_a_null_fingerprint_matches_any_current_fingerprint(
    start_proxy: StartProxy, upstream: FakeUpstream, loop: BackgroundLoop
) -> None:
    proxy = start_proxy(on_fingerprint_change="fail")
    upstream.fingerprint = None
    key = key_of(ask(proxy, chat_request()))
    upstream.fingerprint = FP_B
    ask(proxy, OTHER)  # the current fingerprint is now B

    raw = ask(proxy, chat_request())

    assert status(raw) == "hit"
    [sample] = recording(loop, proxy, key).samples
    assert sample.system_fingerprint is None
    # Nothing to name: the header is absent rather than a made-up value.
    assert "x-seedcache-fingerprint" not in raw.headers
    assert raw.headers["x-seedcache-recorded-at"] == sample.recorded_at
    assert raw.parse().system_fingerprint is None


@pytest.mark.parametrize("repeat", ["reuse", "sequence"])
def test_a_pin_is_served_a_sample_with_a_null_fingerprint(
    start_proxy: StartProxy, upstream: FakeUpstream, repeat: str
) -> None:
    upstream.fingerprint = None
    recorder = start_proxy(repeat=repeat)
    recorded = ask(recorder, chat_request()).parse()
    recorder.stop()

    raw = ask(
        start_proxy(mode="replay", repeat=repeat),
        chat_request(),
        **{"X-Seedcache-Fingerprint": FP_A},
    )

    assert status(raw) == "hit"
    assert raw.parse().id == recorded.id


def test_a_null_fingerprint_does_not_replace_the_remembered_one_across_a_restart(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    recorder = start_proxy(mode="record")
    upstream.nondeterministic = True
    ask(recorder, chat_request())  # sample at A, and A is the current fingerprint
    upstream.fingerprint = FP_B
    ask(recorder, chat_request())  # sample at B; B is current
    upstream.fingerprint = None
    ask(recorder, OTHER)  # unknown: B stays current
    recorder.stop()

    raw = ask(start_proxy(mode="replay", on_fingerprint_change="fail"), chat_request())

    assert status(raw) == "hit"
    assert raw.headers["x-seedcache-fingerprint"] == FP_B


# -- a fingerprint no header can carry ------------------------------------------------------------


@pytest.mark.parametrize("fingerprint", ["fp_a\r\nX-Injected: 1", "fp_\x1b[31m", "fp_\x00"])
@pytest.mark.parametrize("streamed", [False, True])
def test_a_fingerprint_with_control_characters_is_recorded_as_unknown_and_replays(
    proxy: RunningProxy,
    upstream: FakeUpstream,
    fingerprint: str,
    streamed: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A replay sends the fingerprint as X-Seedcache-Fingerprint, which cannot carry it: the
    # recording was unreadable (CR, LF) or its replays lost their connection (other controls).
    upstream.fingerprint = fingerprint
    body = chat_request(seed=77)
    with proxy.client() as client:
        if streamed:
            live = list(client.chat.completions.create(**body, stream=True))
            replays = [list(client.chat.completions.create(**body, stream=True)) for _ in "ab"]
            assert all(chunk.system_fingerprint == fingerprint for chunk in replays[0])
            assert [c.model_dump() for c in replays[1]] == [c.model_dump() for c in live]
        else:
            first = client.chat.completions.with_raw_response.create(**body)
            again = client.chat.completions.with_raw_response.create(**body)
            assert status(first) == "recorded" and status(again) == "hit"
            assert again.parse().system_fingerprint == fingerprint  # the body, as sent
            assert again.parse() == first.parse()
            assert "x-seedcache-fingerprint" not in again.headers

    assert upstream.count() == 1
    [stored] = proxy.recordings()
    assert stored.samples[0].system_fingerprint is None
    assert any("control characters" in r.getMessage() for r in caplog.records)
