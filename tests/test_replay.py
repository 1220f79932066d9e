"""Replay through the app with the real openai SDK: hits, `replay` mode and its explained misses,
the recorded endpoints, and the admin endpoints (DESIGN §2, §5, §6, §11)."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from click.testing import CliRunner

from cli.main import main
from proxy import handlers as handlers_module
from proxy import keys, metrics
from proxy.keys import make_key
from proxy.stores.files import FilesStore
from tests.conftest import API_KEY, RunningProxy, StartProxy, raw_stream, status
from tests.fake_upstream import (
    DEFAULT_FINGERPRINT,
    FakeUpstream,
    chat_request,
    embedding_request,
    legacy_request,
    responses_request,
)

CHAT = "/v1/chat/completions"


def key_of(body: dict[str, Any]) -> str:
    """The key of a chat request body (DESIGN §3), as the proxy computes it."""
    return make_key("POST", CHAT, body).key


# -- hits -----------------------------------------------------------------------------------------


def test_sync_identical_request_is_recorded_then_replayed_without_upstream(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat_request()
    with proxy.client() as client:
        first_raw = client.chat.completions.with_raw_response.create(**body)
        calls = upstream.count()
        second_raw = client.chat.completions.with_raw_response.create(**body)

    first, second = first_raw.parse(), second_raw.parse()
    assert (status(first_raw), status(second_raw)) == ("recorded", "hit")
    assert calls == upstream.count() == 1
    expected = upstream.chat_completion(body)
    assert first.id == second.id == expected["id"]
    assert first.created == second.created == expected["created"]
    assert second.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert second.system_fingerprint == first.system_fingerprint == DEFAULT_FINGERPRINT
    assert second.usage == first.usage and second.usage is not None
    assert second.usage.total_tokens == expected["usage"]["total_tokens"]
    assert second.model_dump() == first.model_dump()
    assert first_raw.headers["x-seedcache-key"] == second_raw.headers["x-seedcache-key"]


def test_a_hit_carries_the_recording_headers_and_no_live_only_ones(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    with proxy.client() as client:
        first = client.chat.completions.with_raw_response.create(**chat_request())
        hit = client.chat.completions.with_raw_response.create(**chat_request())

    assert hit.headers["x-seedcache-fingerprint"] == DEFAULT_FINGERPRINT
    assert hit.headers["x-seedcache-recorded-at"].endswith("Z")
    # The recorded x-request-id is replayed, so `completion._request_id` is stable too.
    assert hit.headers["x-request-id"] == first.headers["x-request-id"]
    assert hit.parse()._request_id == first.parse()._request_id
    for live_only in ("set-cookie", "openai-organization", "x-ratelimit-remaining-requests"):
        assert live_only not in hit.headers
    assert upstream.count() == 1


def member_order(value: Any) -> Any:
    """The names of the members of every object in `value`, in order, at every depth."""
    if isinstance(value, dict):
        return [(name, member_order(item)) for name, item in value.items()]
    if isinstance(value, list):
        return [member_order(item) for item in value]
    return None


@pytest.mark.parametrize("store", ["disk", "files"])
def test_a_replayed_body_keeps_the_member_order_of_the_live_one(
    store: str, start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # A client can see the order: a JSON schema's properties, a snapshot of model_dump_json().
    body = chat_request(seed=4, response_format={"type": "json_object"})
    where = str(tmp_path / "recorded") if store == "disk" else f"files:{tmp_path / 'recorded'}"
    recorder = start_proxy(store=where)
    live = recorder.request("POST", CHAT, body)
    recorder.stop()
    replayer = start_proxy(store=where, mode="replay")
    hit = replayer.request("POST", CHAT, body)

    assert (live.headers["x-seedcache-status"], hit.headers["x-seedcache-status"]) == (
        "recorded",
        "hit",
    )
    order = member_order(json.loads(live.body))
    assert order[0][0] == "id"  # the upstream's order, not sorted
    assert member_order(json.loads(hit.body)) == order


async def test_async_identical_request_is_replayed(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat_request(seed=7)
    async with proxy.async_client() as client:
        first_raw = await client.chat.completions.with_raw_response.create(**body)
        second_raw = await client.chat.completions.with_raw_response.create(**body)

    first, second = first_raw.parse(), second_raw.parse()
    assert (status(first_raw), status(second_raw)) == ("recorded", "hit")
    assert upstream.count() == 1
    assert second.model_dump() == first.model_dump()
    assert second.id == upstream.chat_completion(body)["id"]


def test_streaming_identical_request_is_replayed(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat_request(seed=8, stream_options={"include_usage": True})
    with proxy.client() as client:
        first_raw = client.chat.completions.with_raw_response.create(**body, stream=True)
        first = list(first_raw.parse())
        second_raw = client.chat.completions.with_raw_response.create(**body, stream=True)
        second = list(second_raw.parse())

    assert (status(first_raw), status(second_raw)) == ("recorded", "hit")
    assert upstream.count() == 1
    assert [c.model_dump() for c in second] == [c.model_dump() for c in first]
    expected = upstream.chat_completion(body)
    text = "".join(c.choices[0].delta.content or "" for c in second if c.choices)
    assert text == expected["choices"][0]["message"]["content"]
    assert {c.id for c in second} == {expected["id"]}
    assert {c.system_fingerprint for c in second} == {DEFAULT_FINGERPRINT}
    assert second[-1].usage is not None
    assert second[-1].usage.total_tokens == expected["usage"]["total_tokens"]


async def test_async_streaming_identical_request_is_replayed(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat_request(seed=9)
    async with proxy.async_client() as client:
        first = [c async for c in await client.chat.completions.create(**body, stream=True)]
        second = [c async for c in await client.chat.completions.create(**body, stream=True)]

    assert upstream.count() == 1
    assert [c.model_dump() for c in second] == [c.model_dump() for c in first]


def test_clients_with_and_without_v1_in_the_base_url_share_recordings(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    bare = openai.OpenAI(base_url=proxy.running.url, api_key=API_KEY, max_retries=0)
    with proxy.client() as with_v1, bare as without_v1:
        first = with_v1.chat.completions.with_raw_response.create(**chat_request())
        second = without_v1.chat.completions.with_raw_response.create(**chat_request())

    assert status(second) == "hit"
    assert second.headers["x-seedcache-key"] == first.headers["x-seedcache-key"]
    assert upstream.count() == 1
    assert upstream.calls[0].path == "/v1/chat/completions"


def test_a_namespace_header_separates_recordings(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    with proxy.client() as client:
        client.chat.completions.create(**chat_request())
        other = client.chat.completions.with_raw_response.create(
            **chat_request(), extra_headers={"X-Seedcache-Namespace": "team-b"}
        )
        again = client.chat.completions.with_raw_response.create(
            **chat_request(), extra_headers={"X-Seedcache-Namespace": "team-b"}
        )

    assert (status(other), status(again)) == ("recorded", "hit")
    assert upstream.count() == 2


# -- replay mode over an earlier recording --------------------------------------------------------


def record_then_replay(start_proxy: StartProxy, *bodies: dict[str, Any]) -> RunningProxy:
    """Record `bodies` with an auto proxy, stop it, and start a replay proxy on the same store."""
    recorder = start_proxy()
    with recorder.client() as client:
        for body in bodies:
            client.chat.completions.create(**body)
    recorder.stop()
    return start_proxy(mode="replay")


def test_replay_mode_answers_recorded_requests_without_upstream(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    body = chat_request(seed=1)
    replayer = record_then_replay(start_proxy, body)
    calls = upstream.count()

    with replayer.client() as client:
        raw = client.chat.completions.with_raw_response.create(**body)
        streamed = list(client.chat.completions.create(**body, stream=True))

    assert status(raw) == "hit"
    assert raw.parse().id == upstream.chat_completion(body)["id"]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
        raw.parse().choices[0].message.content
    )
    assert upstream.count() == calls == 1


def test_a_miss_in_replay_mode_is_an_explained_404_the_sdk_does_not_retry(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    replayer = record_then_replay(start_proxy, chat_request(seed=123))
    calls = upstream.count()
    missing = chat_request(seed=123, temperature=0.7)

    with replayer.client(max_retries=2) as client, pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(**missing)

    error = caught.value
    assert error.status_code == 404
    assert error.response.headers["x-should-retry"] == "false"
    assert error.type == "seedcache_miss"
    assert error.code == "recording_not_found"
    message = error.body["message"]  # type: ignore[index]
    assert "POST /v1/chat/completions" in message
    assert "model=gpt-4o-mini" in message and "seed=123" in message
    assert f"key {key_of(missing)[:12]}" in message
    assert "seedcache serve --mode auto" in message
    assert replayer.stats()["misses"] == 1  # one attempt: the SDK obeyed x-should-retry: false
    assert upstream.count() == calls


def test_a_miss_message_names_the_nearest_recording_and_what_differs(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    recorded = chat_request(seed=123)
    replayer = record_then_replay(start_proxy, recorded)

    result = replayer.request("POST", CHAT, chat_request(seed=123, temperature=0.7))
    other_model = replayer.request("POST", CHAT, chat_request(seed=123, model="gpt-4o"))

    assert result.status == 404
    error = result.json()["error"]
    assert error == {
        "message": error["message"],
        "type": "seedcache_miss",
        "code": "recording_not_found",
        "param": None,
    }
    assert f"nearest recording, {key_of(recorded)[:12]}" in error["message"]
    assert "temperature" in error["message"] and "0.7" in error["message"]
    # The nearest recording must have the same model: none here.
    assert key_of(recorded)[:12] not in other_model.json()["error"]["message"]


def test_the_readme_shows_the_miss_message_as_a_replay_server_writes_it(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # The README's SDK example, recorded; then asked in other words at another temperature.
    recorded = {
        "model": "gpt-4o-mini",
        "seed": 123,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me about Mars"}],
    }
    replayer = record_then_replay(start_proxy, recorded)
    asked = {**recorded, "temperature": 0.7}
    asked["messages"] = [{"role": "user", "content": "Tell us about Mars"}]

    with replayer.client() as client, pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(**asked)

    message = caught.value.body["message"]  # type: ignore[index]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    shown = readme.split("the SDK's exception says what changed:\n\n```\n")[1].split("```")[0]
    assert " ".join(shown.split()) == message


def test_a_miss_in_a_long_prompt_shows_where_the_texts_part(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    prompt = "You are a careful travel agent. " * 60 + "Answer in {}. " + "Be brief. " * 10
    recorded = chat_request(seed=9)
    recorded["messages"] = [{"role": "system", "content": prompt.format("French")}]
    asked = {**recorded, "messages": [{"role": "system", "content": prompt.format("German")}]}
    replayer = record_then_replay(start_proxy, recorded)

    message = replayer.request("POST", CHAT, asked).json()["error"]["message"]

    # Not two copies of the same first 60 characters: the point where one word changed.
    assert "messages[0].content: '…" in message
    assert "Answer in French." in message and "Answer in German." in message


def test_a_miss_says_which_other_namespace_holds_the_same_request(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    recorder = start_proxy()
    body = chat_request(seed=5)
    recorder.request("POST", CHAT, body, headers={"X-Seedcache-Namespace": "winter"})
    recorder.stop()
    replayer = start_proxy(mode="replay")

    renamed = replayer.request("POST", CHAT, body, headers={"X-Seedcache-Namespace": "spring"})
    dropped = replayer.request("POST", CHAT, body)
    different = replayer.request("POST", CHAT, chat_request(seed=6))

    assert (renamed.status, dropped.status, different.status) == (404, 404, 404)
    renamed_message = renamed.json()["error"]["message"]
    assert "namespace=spring" in renamed_message
    assert "The same request is recorded in namespace 'winter'" in renamed_message
    dropped_message = dropped.json()["error"]["message"]
    assert "namespace=" not in dropped_message
    assert "The same request is recorded in namespace 'winter'" in dropped_message
    assert "recorded in namespace" not in different.json()["error"]["message"]


def test_a_miss_names_every_other_namespace_that_holds_the_same_request(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    recorder = start_proxy()
    everywhere, teams = chat_request(seed=5), chat_request(seed=6)
    for namespace in ("", "team-a", "team-b"):
        recorder.request("POST", CHAT, everywhere, headers={"X-Seedcache-Namespace": namespace})
    for namespace in ("team-a", "team-b"):
        recorder.request("POST", CHAT, teams, headers={"X-Seedcache-Namespace": namespace})
    recorder.stop()
    replayer = start_proxy(mode="replay")

    def message(body: dict[str, Any], namespace: str) -> str:
        missed = replayer.request("POST", CHAT, body, headers={"X-Seedcache-Namespace": namespace})
        assert missed.status == 404
        return str(missed.json()["error"]["message"])

    assert "in the default namespace and in 'team-a' and 'team-b'." in message(everywhere, "x")
    assert "recorded in namespaces 'team-a' and 'team-b'." in message(teams, "")


def test_a_miss_carries_the_miss_status_and_its_key(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="replay")
    body = chat_request()

    result = proxy.request("POST", CHAT, body)

    assert result.status == 404
    assert result.headers["x-seedcache-status"] == "miss"
    assert result.headers["x-seedcache-key"] == key_of(body)


def test_a_replay_server_never_contacts_upstream_whatever_the_request_asks(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    recorded = chat_request(seed=1)
    replayer = record_then_replay(start_proxy, recorded)
    calls = upstream.count()

    with replayer.client() as client:
        hit = client.chat.completions.with_raw_response.create(
            **recorded, extra_headers={"X-Seedcache-Mode": "record"}
        )
        for mode in ("record", "auto", "passthrough", "all"):
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(
                    **chat_request(seed=2), extra_headers={"X-Seedcache-Mode": mode}
                )

    assert status(hit) == "hit"
    assert upstream.count() == calls


def test_no_cache_on_a_replay_server_does_not_reach_upstream(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    recorded = chat_request(seed=1)
    replayer = record_then_replay(start_proxy, recorded)
    calls = upstream.count()

    result = replayer.request("POST", CHAT, recorded, headers={"Cache-Control": "no-cache"})
    other = replayer.request(
        "POST", CHAT, chat_request(seed=2), headers={"Cache-Control": "no-cache"}
    )

    assert upstream.count() == calls
    assert result.headers.get("x-seedcache-status") != "recorded"
    assert other.status == 404
    assert len(replayer.recordings()) == 1
    # The recorded request is not said to be unrecorded: the miss names what made it one.
    message = result.json()["error"]["message"]
    assert "Cache-Control: no-cache" in message
    assert "Record it with" not in message


@pytest.mark.parametrize("alias", ["replay", "none", "NONE"])
def test_replay_aliases_start_a_replay_server(
    alias: str, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode=alias)

    health = proxy.request("GET", "/_seedcache/health").json()
    miss = proxy.request("POST", CHAT, chat_request())

    assert health["mode"] == "replay"
    assert miss.status == 404
    assert upstream.count() == 0


def test_a_per_request_replay_mode_misses_on_an_auto_server(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    with proxy.client() as client:
        client.chat.completions.create(**chat_request())
        hit = client.chat.completions.with_raw_response.create(
            **chat_request(), extra_headers={"X-Seedcache-Mode": "none"}
        )
        with pytest.raises(openai.NotFoundError) as missed:
            client.chat.completions.create(
                **chat_request(seed=5), extra_headers={"X-Seedcache-Mode": "replay"}
            )

    assert status(hit) == "hit"
    assert upstream.count() == 1
    # The server would record it: the header is what stands in the way.
    assert "Send it without X-Seedcache-Mode to record it (this server runs in auto mode)" in str(
        missed.value
    )
    assert "seedcache serve" not in str(missed.value)


def test_a_per_request_replay_mode_on_a_passthrough_server_says_how_to_record(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="passthrough")
    missed = proxy.request("POST", CHAT, chat_request(), headers={"X-Seedcache-Mode": "replay"})

    assert missed.status == 404
    assert "Record it with: X-Seedcache-Mode: auto" in missed.json()["error"]["message"]
    assert upstream.count() == 0


# -- other paths ----------------------------------------------------------------------------------


def test_other_paths_are_forwarded_unchanged(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    first = proxy.request("GET", "/v1/files?purpose=batch")
    second = proxy.request("GET", "/v1/files?purpose=batch")
    posted = proxy.request("POST", "/v1/chat/completions/chatcmpl-1", {"metadata": {"a": "b"}})
    listed = proxy.request("GET", "/v1/chat/completions")

    assert first.status == 200
    assert first.json() == {
        "echo": {"method": "GET", "path": "/v1/files?purpose=batch", "body": None}
    }
    assert first.headers["x-seedcache-status"] == second.headers["x-seedcache-status"] == "bypass"
    assert posted.json()["echo"]["body"] == {"metadata": {"a": "b"}}
    assert posted.headers["x-seedcache-status"] == "bypass"
    assert listed.json()["echo"]["method"] == "GET"
    assert listed.headers["x-seedcache-status"] == "bypass"
    assert upstream.count() == 4
    assert proxy.recordings() == []


def test_other_paths_are_a_miss_in_replay_mode(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="replay")

    result = proxy.request("GET", "/v1/files")

    assert result.status == 404
    assert result.json()["error"]["type"] == "seedcache_miss"
    assert result.headers["x-should-retry"] == "false"
    assert result.json()["error"]["message"] == (
        "No recording for GET /v1/files: this endpoint is not recorded. seedcache only "
        "forwards it, and only outside replay mode"
    )
    assert upstream.count() == 0


# -- the recorded endpoints -----------------------------------------------------------------------


def test_legacy_completions_are_recorded_and_replayed(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = legacy_request()
    with proxy.client() as client:
        first = client.completions.with_raw_response.create(**body)
        second = client.completions.with_raw_response.create(**body)
        streamed = list(client.completions.create(**body, stream=True))

    assert (status(first), status(second)) == ("recorded", "hit")
    assert upstream.count() == 1
    expected = upstream.text_completion(body)
    assert second.parse().model_dump() == first.parse().model_dump()
    assert second.parse().choices[0].text == expected["choices"][0]["text"]
    assert (
        "".join(c.choices[0].text for c in streamed if c.choices)
        == (expected["choices"][0]["text"])
    )


def test_embeddings_default_base64_and_explicit_float_are_two_keys_that_decode_alike(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = embedding_request()
    del body["encoding_format"]  # the SDK then asks for base64
    with proxy.client() as client:
        implicit = [client.embeddings.with_raw_response.create(**body) for _ in range(2)]
        explicit = [
            client.embeddings.with_raw_response.create(**body, encoding_format="float")
            for _ in range(2)
        ]

    assert [status(r) for r in implicit + explicit] == ["recorded", "hit", "recorded", "hit"]
    assert implicit[0].headers["x-seedcache-key"] != explicit[0].headers["x-seedcache-key"]
    assert upstream.count() == 2
    assert [c.body["encoding_format"] for c in upstream.calls] == ["base64", "float"]
    expected = upstream.embeddings(embedding_request())["data"][0]["embedding"]
    for raw in implicit + explicit:
        assert raw.parse().data[0].embedding == expected


def test_embeddings_replay_the_stored_base64_bytes(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = embedding_request(encoding_format="base64")

    proxy.request("POST", "/v1/embeddings", body)
    hit = proxy.request("POST", "/v1/embeddings", body)

    assert hit.headers["x-seedcache-status"] == "hit"
    encoded = hit.json()["data"][0]["embedding"]
    assert encoded == upstream.embeddings(body)["data"][0]["embedding"]
    floats = list(
        struct.unpack(f"<{len(base64.b64decode(encoded)) // 4}f", base64.b64decode(encoded))
    )
    assert floats == upstream.embeddings(embedding_request())["data"][0]["embedding"]


def test_responses_are_recorded_and_replayed(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    body = responses_request()
    with proxy.client() as client:
        first = client.responses.with_raw_response.create(**body)
        second = client.responses.with_raw_response.create(**body)

    assert (status(first), status(second)) == ("recorded", "hit")
    assert upstream.count() == 1
    expected = upstream.response(body)
    assert second.parse().id == first.parse().id == expected["id"]
    assert second.parse().output_text == expected["output"][0]["content"][0]["text"]


def test_responses_streams_are_recorded_and_replayed(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = responses_request(input="Stream it.")
    with proxy.client() as client:
        first = list(client.responses.create(**body, stream=True))
        second = list(client.responses.create(**body, stream=True))
        plain = client.responses.create(**body)

    assert upstream.count() == 1
    assert [e.model_dump() for e in second] == [e.model_dump() for e in first]
    assert second[-1].type == "response.completed"
    expected = upstream.response(body)
    assert second[-1].response.id == plain.id == expected["id"]
    assert plain.output_text == expected["output"][0]["content"][0]["text"]


@pytest.mark.parametrize(
    "stateful",
    [{"previous_response_id": "resp_abc"}, {"conversation": "conv_abc"}, {"background": True}],
    ids=["previous_response_id", "conversation", "background"],
)
def test_stateful_responses_requests_are_passed_through_never_recorded(
    stateful: dict[str, Any], proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = responses_request(**stateful)

    results = [proxy.request("POST", "/v1/responses", body) for _ in range(2)]

    assert [r.status for r in results] == [200, 200]
    assert [r.headers["x-seedcache-status"] for r in results] == ["bypass", "bypass"]
    assert upstream.count() == 2
    assert proxy.recordings() == []


def test_stateful_responses_requests_miss_in_replay_mode(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="replay")

    with proxy.client() as client, pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(**responses_request(previous_response_id="resp_abc"))

    assert upstream.count() == 0
    assert "depends on state held upstream" in str(caught.value)
    assert "never recorded" in str(caught.value)
    assert "only outside replay mode" in str(caught.value)
    assert "Record it with" not in str(caught.value)  # recording it could not work


def test_the_model_list_is_recorded_and_replayed(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    recorder = start_proxy()
    with recorder.client() as client:
        first = client.models.with_raw_response.list()
        second = client.models.with_raw_response.list()
    recorder.stop()
    with start_proxy(mode="replay").client() as client:
        offline = [m.id for m in client.models.list()]

    assert (status(first), status(second)) == ("recorded", "hit")
    assert upstream.count() == 1
    assert offline == [m.id for m in first.parse()] == upstream.models


def test_a_single_model_is_forwarded_not_recorded(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    with proxy.client() as client:
        first = client.models.with_raw_response.retrieve("gpt-4o")
        client.models.retrieve("gpt-4o")

    assert status(first) == "bypass"
    assert first.parse().id == "gpt-4o"
    assert upstream.count() == 2


# -- admin endpoints ------------------------------------------------------------------------------


def test_health_reports_mode_store_and_upstream(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    result = proxy.request("GET", "/_seedcache/health")

    assert result.status == 200
    health = result.json()
    assert health["status"] == "ok"
    assert health["mode"] == "auto"
    assert health["store"] == proxy.config.store
    assert health["upstream"] == upstream.base_url
    assert upstream.count() == 0


def test_stats_and_metrics_count_a_known_sequence(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    assert proxy.stats()["hits"] == 0
    with proxy.client() as client:
        client.chat.completions.create(**chat_request())  # recorded
        client.chat.completions.create(**chat_request())  # hit
        list(client.chat.completions.create(**chat_request(), stream=True))  # hit
        with pytest.raises(openai.NotFoundError):  # miss
            client.chat.completions.create(
                **chat_request(seed=2), extra_headers={"X-Seedcache-Mode": "replay"}
            )
    after_miss = proxy.stats()
    upstream.fail_next(400)
    proxy.request("POST", CHAT, chat_request(seed=3))  # upstream error
    proxy.request("GET", "/v1/files")  # bypass

    stats = proxy.stats()
    assert (after_miss["recorded"], after_miss["hits"], after_miss["misses"]) == (1, 2, 1)
    assert after_miss["upstream_errors"] == 0
    assert stats["upstream_errors"] == 1
    assert (stats["recorded"], stats["hits"], stats["misses"]) == (1, 2, 1)
    assert stats["bypassed"] == 1
    bucket = next(
        b
        for b in stats["by_model"]
        if b["model"] == "gpt-4o-mini" and b["system_fingerprint"] == DEFAULT_FINGERPRINT
    )
    assert (bucket["recorded"], bucket["hits"]) == (1, 2)

    metrics = proxy.request("GET", "/metrics")
    assert metrics.status == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    lines = metrics.body.decode().splitlines()
    hits = [
        line
        for line in lines
        if line.startswith("seedcache_requests_total{")
        and 'status="hit"' in line
        and 'model="gpt-4o-mini"' in line
    ]
    assert len(hits) == 1 and float(hits[0].rsplit(" ", 1)[1]) == 2.0
    assert API_KEY not in metrics.body.decode()


def test_stats_and_metrics_count_models_past_the_limit_as_other(
    start_proxy: StartProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The model is the client's to choose: ever new names must not grow the counters for ever.
    monkeypatch.setattr(metrics, "MODEL_LIMIT", 5)
    proxy = start_proxy(mode="replay")
    models = [f"model-{i}" for i in range(8)] + ["m" * 5000]
    for model in models:
        assert proxy.request("POST", CHAT, chat_request(model=model)).status == 404

    stats = proxy.stats()
    assert stats["misses"] == len(models)
    counted = {b["model"]: b["misses"] for b in stats["by_model"]}
    assert counted == {**{f"model-{i}": 1 for i in range(5)}, "(other)": 4}
    exposed = proxy.request("GET", "/metrics").body.decode()
    assert 'seedcache_requests_total{model="(other)",status="miss"} 4.0' in exposed
    assert "model-7" not in exposed and "m" * 300 not in exposed
    assert upstream.count() == 0


def test_a_replay_echoes_the_requests_metadata(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # OpenAI echoes `metadata` (bookkeeping, not in the key): a replay must echo the new request's.
    proxy = start_proxy()
    body = chat_request(metadata={"run": "first"})
    recorded = proxy.request("POST", CHAT, body)
    assert recorded.json()["metadata"] == {"run": "first"}
    again = proxy.request("POST", CHAT, chat_request(metadata={"run": "second"}))
    assert again.headers["x-seedcache-status"] == "hit"
    assert again.json()["metadata"] == {"run": "second"}
    assert again.json()["id"] == recorded.json()["id"]
    streamed = proxy.request("POST", CHAT, chat_request(metadata={"run": "third"}, stream=True))
    assert streamed.headers["x-seedcache-status"] == "hit"
    assert b'"metadata":{"run":"third"}' in streamed.body
    assert b'"run":"first"' not in streamed.body


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("replay_timing", [False, True], ids=["fast", "paced"])
def test_a_replay_echoes_the_requests_metadata_or_none_as_live_would(
    stream: bool, replay_timing: bool, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(replay_timing=replay_timing)
    proxy.request("POST", CHAT, chat_request(metadata={"run": "a"}, stream=stream))

    for asked in ({"run": "b"}, None):
        body = chat_request(metadata=asked, stream=stream)
        again = proxy.request("POST", CHAT, body)
        live = upstream.chat_completion(chat_request(metadata=asked))
        assert again.headers["x-seedcache-status"] == "hit"
        if stream:
            echoed = {c.get("metadata") is None or c["metadata"] == asked for c in chunks(again)}
            assert echoed == {True}
            assert b'"run":"a"' not in again.body
            assert (b'"metadata"' in again.body) == (asked is not None)
        else:
            assert again.json().get("metadata") == live.get("metadata") == asked
    assert upstream.count() == 1


def chunks(result: Any) -> list[dict[str, Any]]:
    """The JSON chunks of a raw SSE body."""
    return [
        json.loads(line[6:])
        for line in result.body.decode().splitlines()
        if line.startswith("data: {")
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_responses_replay_echoes_the_requests_store_and_metadata(
    stream: bool, proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # Replayed with the recorded store: true, a store: false client would be told its response
    # was kept upstream, and chain a later request on an id that does not exist there.
    with proxy.client() as client:
        recorded = client.responses.create(**responses_request(store=True, metadata={"r": "1"}))
        if stream:
            events = list(client.responses.create(**responses_request(store=False), stream=True))
            replayed = events[-1].response
        else:
            replayed = client.responses.create(**responses_request(store=False))

    assert upstream.count() == 1
    assert replayed.id == recorded.id
    assert (recorded.store, recorded.metadata) == (True, {"r": "1"})
    live = upstream.response(responses_request(store=False))
    assert (replayed.store, replayed.metadata) == (live["store"], live["metadata"]) == (False, {})


def test_a_hand_edited_recording_that_cannot_be_read_says_how_to_get_past_it(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    store = tmp_path / "rec"
    start_proxy(store=f"files:{store}").request("POST", CHAT, chat_request())
    [key] = [r.key for r in start_proxy(store=f"files:{store}").recordings()]
    [path] = [p for p in store.rglob("*.json") if p.stem == key]
    data = json.loads(path.read_text())
    data["samples"][0]["headers"] = ["content-type"]  # an object turned into a list
    path.write_text(json.dumps(data))
    replay = start_proxy(store=f"files:{store}", mode="replay")

    broken = replay.request("POST", CHAT, chat_request())
    other = replay.request("POST", CHAT, chat_request(seed=2))

    assert broken.status == 500
    error = broken.json()["error"]
    assert error["code"] == "recording_unreadable"
    assert other.status == 404  # the others are still explained (the index skips it)
    assert other.json()["error"]["code"] == "recording_not_found"
    # The command the message gives works as it is, from any folder.
    [command] = re.findall(r"\((seedcache rm [^)]+)\)", error["message"])
    removed = CliRunner().invoke(main, shlex.split(command)[1:])
    assert removed.exit_code == 0, removed.output
    assert not path.exists()
    assert replay.request("POST", CHAT, chat_request()).status == 404


def test_an_embeddings_request_asking_to_stream_replays_its_json(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # Embeddings do not stream: a stray `stream: true` is answered with JSON, and so is a replay.
    body = {**embedding_request(), "stream": True}
    live = proxy.request("POST", "/v1/embeddings", body)
    again = proxy.request("POST", "/v1/embeddings", body)

    assert (status(live), status(again)) == ("recorded", "hit")
    assert again.headers["content-type"].startswith("application/json")
    assert again.json()["data"] == live.json()["data"]
    assert upstream.count() == 1


def recorded_file(start_proxy: StartProxy, store: Path, body: dict[str, Any], **opts: Any) -> Path:
    """Record `body` into a files store and return the recording's file."""
    recorder = start_proxy(store=f"files:{store}")
    if opts.get("stream"):
        recorder.request("POST", CHAT, {**body, "stream": True})
    else:
        recorder.request("POST", CHAT, body)
    key = make_key("POST", CHAT, body).key
    [path] = [p for p in store.rglob("*.json") if p.stem == key]
    return path


def edit_sample(path: Path, **members: Any) -> None:
    data = json.loads(path.read_text())
    data["samples"][0].update(members)
    path.write_text(json.dumps(data))


DAMAGED_SAMPLES = [
    ({"system_fingerprint": {"fp": 1}}, False),
    ({"recorded_at": "2026-01-01T00:00:00Z\r\nX-Evil: 1"}, False),
    ({"headers": {"x-request-id": "req_1\r\nX-Evil: 1"}}, False),
    ({"body": "hello"}, False),
    ({"body": None}, False),
    ({"events": []}, True),
]


@pytest.mark.parametrize(
    ("members", "streamed"), DAMAGED_SAMPLES, ids=[str(m)[:40] for m, _ in DAMAGED_SAMPLES]
)
@pytest.mark.parametrize("asked_stream", [False, True], ids=["plain", "stream"])
def test_a_damaged_sample_is_an_explained_unreadable_recording(
    members: dict[str, Any],
    streamed: bool,
    asked_stream: bool,
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    store = tmp_path / "rec"
    path = recorded_file(start_proxy, store, chat_request(), stream=streamed)
    edit_sample(path, **members)
    replay = start_proxy(store=f"files:{store}", mode="replay")

    broken = replay.request("POST", CHAT, {**chat_request(), "stream": asked_stream})

    assert broken.status == 500
    error = broken.json()["error"]
    assert error["code"] == "recording_unreadable"
    assert "Fix it, or delete it (seedcache rm" in error["message"]
    assert "x-evil" not in broken.headers
    assert replay.request("GET", "/_seedcache/health").status == 200


@pytest.mark.parametrize("asked_stream", [False, True], ids=["plain", "stream"])
def test_a_stream_event_that_is_not_json_makes_the_recording_unreadable(
    asked_stream: bool, start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # Replayed, the SDK fails to parse it; assembled, it would be left out without a word.
    store = tmp_path / "rec"
    usage = {"stream_options": {"include_usage": True}}
    path = recorded_file(start_proxy, store, {**chat_request(), **usage}, stream=True)
    data = json.loads(path.read_text())
    data["samples"][0]["events"][1]["data"] = '{"id": broken'
    path.write_text(json.dumps(data))
    replay = start_proxy(store=f"files:{store}", mode="replay")

    with replay.client() as client, pytest.raises(openai.InternalServerError) as caught:
        if asked_stream:
            list(client.chat.completions.create(**chat_request(), stream=True, **usage))
        else:
            client.chat.completions.create(**chat_request())

    assert caught.value.code == "recording_unreadable"
    assert "`events[1].data` is not a JSON object: '{\"id\": broken'" in caught.value.message
    assert "Fix it, or delete it (seedcache rm" in caught.value.message


def test_headers_outside_the_allowlist_in_a_hand_edited_sample_are_not_replayed(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    store = tmp_path / "rec"
    path = recorded_file(start_proxy, store, chat_request())
    edit_sample(path, headers={"set-cookie": "a=b", "content-length": "3", "x-request-id": "r1"})
    replay = start_proxy(store=f"files:{store}", mode="replay")

    for asked_stream in (False, True):
        answer = replay.request("POST", CHAT, {**chat_request(), "stream": asked_stream})
        assert answer.status == 200
        assert answer.headers["x-request-id"] == "r1"
        assert "set-cookie" not in answer.headers


def test_a_recording_with_no_samples_is_recorded_again_in_auto(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    store = tmp_path / "rec"
    path = recorded_file(start_proxy, store, chat_request())
    data = json.loads(path.read_text())
    data["samples"] = []
    path.write_text(json.dumps(data))
    proxy = start_proxy(store=f"files:{store}")

    first = proxy.request("POST", CHAT, chat_request())
    again = proxy.request("POST", CHAT, chat_request())

    assert (status(first), status(again)) == ("recorded", "hit")
    assert upstream.count() == 2
    assert len(proxy.recordings()[0].samples) == 1


def test_a_recording_with_no_samples_is_a_miss_in_replay_that_says_so(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    store = tmp_path / "rec"
    path = recorded_file(start_proxy, store, chat_request())
    recorded_file(start_proxy, store, chat_request(seed=2))
    data = json.loads(path.read_text())
    data["samples"] = []
    path.write_text(json.dumps(data))
    replay = start_proxy(store=f"files:{store}", mode="replay")

    with replay.client() as client, pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(**chat_request())

    message = str(caught.value)
    assert f"key {path.stem[:12]}: the recording under this key holds no samples." in message
    assert "nearest" not in message


def test_a_miss_never_names_its_own_key_as_the_nearest_recording(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # Deleted while the proxy's index of the recordings, which explains misses, still holds it.
    store = tmp_path / "rec"
    path = recorded_file(start_proxy, store, chat_request())
    recorded_file(start_proxy, store, chat_request(seed=2))
    replay = start_proxy(store=f"files:{store}", mode="replay")
    with replay.client() as client:
        with pytest.raises(openai.NotFoundError, match="The nearest recording"):
            client.chat.completions.create(**chat_request(seed=3))  # builds the index
        path.unlink()
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(**chat_request())

    message = str(caught.value)
    assert f"key {path.stem[:12]}. The nearest recording, " in message
    assert f"recording, {path.stem[:12]}" not in message
    assert "differs at (this request != recorded): seed: 123 != 2" in message


@pytest.mark.parametrize("asked_stream", [False, True], ids=["plain", "stream"])
def test_recording_over_an_unreadable_recording_still_delivers_the_answer(
    asked_stream: bool, start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # The upstream call is made and paid for: its answer reaches the client, whole and alone.
    store = tmp_path / "rec"
    path = recorded_file(start_proxy, store, chat_request())
    path.write_text("{ not json")
    proxy = start_proxy(store=f"files:{store}", mode="record")

    live = proxy.request("POST", CHAT, {**chat_request(), "stream": asked_stream})

    assert live.status == 200
    assert b"HTTP/1.1" not in live.body
    if asked_stream:
        assert live.body.endswith(b"data: [DONE]\n\n")
    else:
        assert status(live) == "miss"
        assert live.json()["choices"][0]["message"]["content"]
    assert path.read_text() == "{ not json"  # left for the user to fix or delete
    assert proxy.stats()["misses"] == 1


def test_a_failure_after_a_stream_started_cuts_the_stream_off(
    proxy: RunningProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Headers gone: no error response can follow them, and a clean end would pass a cut answer
    # off as whole. The connection is closed with the chunked body unterminated, and without
    # the `data: [DONE]` that would tell the SDK the answer is whole: it was not recorded.
    async def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(handlers_module.Handlers, "_record", fail)
    upstream.chunk_delay = 0.01  # the chunks come one by one
    received = raw_stream(proxy.running.port, chat_request())

    assert received.startswith(b"HTTP/1.1 200")
    assert received.count(b"HTTP/1.1") == 1
    assert b'"delta"' in received  # the stream had started
    assert b"data: [DONE]" not in received
    assert not received.endswith(b"0\r\n\r\n")  # no terminating chunk
    assert proxy.request("GET", "/_seedcache/health").status == 200


def test_recordings_replay_when_the_meta_file_has_merge_conflict_markers(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # A files store committed to git; two branches recorded different fingerprints.
    store = tmp_path / "rec"
    start_proxy(store=f"files:{store}").request("POST", CHAT, chat_request())
    meta = store / ".seedcache-meta.json"
    text = meta.read_text()
    damaged = f"<<<<<<< HEAD\n{text}=======\n{text.replace('fp_fake', 'fp_other')}>>>>>>> b\n"
    meta.write_text(damaged)

    replayed = start_proxy(store=f"files:{store}", mode="replay").request(
        "POST", CHAT, chat_request()
    )
    recorded = start_proxy(store=f"files:{store}").request("POST", CHAT, chat_request(seed=2))

    assert (replayed.status, status(replayed)) == (200, "hit")
    assert (recorded.status, status(recorded)) == (200, "recorded")
    assert meta.read_text() == damaged  # the conflict is the user's to resolve


@pytest.mark.parametrize("change", ["edited by hand", "another secret"])
def test_a_miss_on_a_recording_holding_the_same_request_says_why_it_misses(
    change: str, start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    store = tmp_path / "rec"
    secret = "sk-" + "a1B2" * 8  # API-key shaped: recordings hold it redacted
    recorded = chat_request(
        messages=[{"role": "user", "content": f"Tell me about rivers {secret}"}]
    )
    path = recorded_file(start_proxy, store, recorded)
    if change == "edited by hand":
        # What a VCR cassette allows: the prompt fixed in the recording instead of re-recorded.
        data = json.loads(path.read_text())
        data["request"]["body"]["messages"][0]["content"] = "Tell me about lakes"
        path.write_text(json.dumps(data, indent=2))
        asked = chat_request(messages=[{"role": "user", "content": "Tell me about lakes"}])
    else:
        asked = json.loads(json.dumps(recorded).replace(secret, "sk-" + "c3D4" * 8))
    replay = start_proxy(store=f"files:{store}", mode="replay")

    with replay.client() as client, pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(**asked)

    assert (
        f". The recording {path.stem[:12]} holds this same request under another key: its "
        "request was edited after it was recorded (record it again instead), or the two differ "
        "only in an API-key shaped value, which recordings hold redacted." in str(caught.value)
    )
    assert "differs at" not in str(caught.value)


def test_a_miss_on_a_huge_body_is_not_walked_to_find_the_nearest_recording(
    start_proxy: StartProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 700k token ids (~5 MB of JSON): comparing them with the recordings walked every one on the
    # event loop for seconds, and every other request waited.
    recorder = start_proxy()
    recorder.request("POST", "/v1/embeddings", embedding_request(input=[1, 2, 3]))
    recorder.stop()
    replayer = start_proxy(mode="replay")
    walked = 0
    leaves = keys._leaves

    def counted(value: Any, path: str) -> Any:
        nonlocal walked
        walked += 1
        return leaves(value, path)

    monkeypatch.setattr(keys, "_leaves", counted)

    huge = replayer.request("POST", "/v1/embeddings", embedding_request(input=list(range(700_000))))
    walked_for_huge = walked
    near = replayer.request("POST", "/v1/embeddings", embedding_request(input=[1, 2, 4]))

    assert huge.status == 404
    message = huge.json()["error"]["message"]
    assert "MB of JSON) is too large to compare with the recordings" in message
    assert "nearest recording" not in message
    assert walked_for_huge < 100  # the recordings' bodies only, for the index
    assert "The nearest recording" in near.json()["error"]["message"]
    assert walked > walked_for_huge  # a body of normal size is still compared
    assert replayer.request("GET", "/_seedcache/health").status == 200


def test_lenient_shapes_of_a_hand_written_or_older_sample_still_replay(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # Numbers where a header wants text; a stream of nothing but [DONE] (older versions recorded
    # one) replays as it was, and only a plain request, which needs a chunk, cannot have it.
    store = tmp_path / "rec"
    plain = recorded_file(start_proxy, store, chat_request())
    edit_sample(plain, headers={"openai-processing-ms": 312}, system_fingerprint=7)
    done_only = recorded_file(start_proxy, store, chat_request(seed=2), stream=True)
    edit_sample(done_only, events=[{"data": "[DONE]", "event": None, "t_ms": 0}])
    replay = start_proxy(store=f"files:{store}", mode="replay")

    answer = replay.request("POST", CHAT, chat_request())
    streamed = replay.request("POST", CHAT, {**chat_request(seed=2), "stream": True})
    assembled = replay.request("POST", CHAT, chat_request(seed=2))

    assert answer.status == 200
    assert answer.headers["openai-processing-ms"] == "312"
    assert answer.headers["x-seedcache-fingerprint"] == "7"
    assert (streamed.status, streamed.body) == (200, b"data: [DONE]\n\n")
    assert assembled.status == 500
    assert assembled.json()["error"]["code"] == "recording_unreadable"


def test_a_stream_recorded_with_numbers_orjson_cannot_hold_replays_them_as_sent(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # Older versions recorded streams holding an integer beyond 64 bits or -Infinity (they are
    # no longer recorded): every way of replaying one gives them as they were sent.
    store = tmp_path / "rec"
    body = chat_request(seed=3)
    path = recorded_file(start_proxy, store, body, stream=True)
    data = json.loads(path.read_text())
    first = data["samples"][0]["events"][0]
    # Named `metadata`, the event is parsed to echo a request's own, even when it sends none.
    first["data"] = json.dumps(
        {**json.loads(first["data"]), "vendor_id": 2**64, "p": -math.inf, "metadata": {}}
    )
    path.write_text(json.dumps(data))
    replay = start_proxy(store=f"files:{store}", mode="replay")
    paced = start_proxy(store=f"files:{store}", mode="replay", replay_timing=True)
    metadata = {"run": "7"}

    plain = replay.request("POST", CHAT, body)
    plain_echo = replay.request("POST", CHAT, {**body, "metadata": metadata})
    streamed = replay.request("POST", CHAT, {**body, "stream": True})
    streamed_echo = replay.request("POST", CHAT, {**body, "stream": True, "metadata": metadata})

    for answer in (plain, plain_echo, streamed, streamed_echo):
        assert (answer.status, status(answer)) == (200, "hit")
    for answer in (plain, plain_echo):
        assert (answer.json()["vendor_id"], answer.json()["p"]) == (2**64, -math.inf)
        assert b'"vendor_id":18446744073709551616' in answer.body
    assert plain_echo.json()["metadata"] == metadata
    paced_plain = paced.request("POST", CHAT, {**body, "stream": True})
    assert (paced_plain.status, status(paced_plain)) == (200, "hit")
    for answer, echoed in ((streamed, {}), (streamed_echo, metadata), (paced_plain, {})):
        event = json.loads(answer.body.split(b"\n\n")[0].removeprefix(b"data: "))
        assert (event["vendor_id"], event["p"]) == (2**64, -math.inf)
        assert (event.get("metadata") or {}) == echoed


def test_concurrent_misses_share_one_scan_of_the_store(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Explaining a miss reads every recording: on a large store that takes seconds, so the
    # misses arriving together wait for one scan, not one each.
    store = f"files:{tmp_path / 'rec'}"
    recorder = start_proxy(store=store)
    for seed in range(20):
        recorder.request("POST", CHAT, chat_request(seed=seed))
    scans: list[int] = []
    scan = FilesStore.scan

    def counted(self: FilesStore, *args: Any, **kwargs: Any) -> Any:
        scans.append(1)
        return scan(self, *args, **kwargs)

    monkeypatch.setattr(FilesStore, "scan", counted)
    replay = start_proxy(store=store, mode="replay")

    async def miss(client: openai.AsyncOpenAI, seed: int) -> str:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(**chat_request(seed=seed))
        return str(caught.value)

    async def everyone() -> list[str]:
        async with replay.async_client() as client:
            return await asyncio.gather(*(miss(client, seed) for seed in range(100, 120)))

    messages = asyncio.run(everyone())

    assert all("The nearest recording" in message for message in messages)
    assert len(scans) == 1


def test_a_miss_after_a_quiet_spell_sees_what_other_proxies_recorded_meanwhile(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An index older than INDEX_STALE_LIMIT is not used while a new one is built: the miss waits.
    store = f"files:{tmp_path / 'rec'}"
    replay = start_proxy(store=store, mode="replay")
    first = replay.request("POST", CHAT, chat_request(seed=100))
    start_proxy(store=store).request("POST", CHAT, chat_request(seed=5))
    monkeypatch.setattr(handlers_module, "INDEX_TTL", 0.0)
    monkeypatch.setattr(handlers_module, "INDEX_STALE_LIMIT", 0.0)
    again = replay.request("POST", CHAT, chat_request(seed=100))

    assert "No recording has the same method, path and model" in first.json()["error"]["message"]
    assert "The nearest recording" in again.json()["error"]["message"]


def test_a_rebuilt_miss_index_reads_only_the_recordings_that_came_since(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A shared store of gigabytes must not be read whole every few seconds while misses come:
    # what a recording asks never changes, so only new keys are read, and gone ones dropped.
    directory = tmp_path / "rec"
    store = f"files:{directory}"
    recorder = start_proxy(store=store)
    for seed in range(10):
        recorder.request("POST", CHAT, chat_request(seed=seed))
    replay = start_proxy(store=store, mode="replay")
    replay.request("POST", CHAT, chat_request(seed=100))  # the first index: the whole store
    added = chat_request(seed=50, temperature=0.3)
    recorder.request("POST", CHAT, added)
    (directory / f"{key_of(chat_request(seed=3))}.json").unlink()
    read: list[str] = []
    get, scan = FilesStore.get, FilesStore.scan

    async def counted_get(self: FilesStore, namespace: str, key: str) -> bytes | None:
        read.append(key)
        return await get(self, namespace, key)

    def counted_scan(self: FilesStore) -> Any:
        read.append("scan")
        return scan(self)

    monkeypatch.setattr(FilesStore, "get", counted_get)
    monkeypatch.setattr(FilesStore, "scan", counted_scan)
    monkeypatch.setattr(handlers_module, "INDEX_TTL", 0.0)
    monkeypatch.setattr(handlers_module, "INDEX_STALE_LIMIT", 0.0)

    near_added = replay.request("POST", CHAT, chat_request(seed=50, temperature=0.4))
    near_deleted = replay.request("POST", CHAT, chat_request(seed=3, temperature=0.9))

    assert (
        f"nearest recording, {key_of(added)[:12]}, differs at (this request != recorded): "
        "temperature" in (near_added.json()["error"]["message"])
    )
    assert key_of(chat_request(seed=3))[:12] not in near_deleted.json()["error"]["message"]
    # Each miss looks its own key up; the rebuilds read the one new recording, and no scan.
    looked_up = {
        key_of(chat_request(seed=50, temperature=0.4)),
        key_of(chat_request(seed=3, temperature=0.9)),
    }
    assert [key for key in read if key not in looked_up] == [key_of(added)]


# Windows' standard library, as far as the files store is concerned: no fcntl, no os.pread, and
# (before Python 3.13) no os.fchmod.
WINDOWS_LIKE = """
import os, sys
sys.modules["fcntl"] = None
for name in ("pread", "fchmod"):
    if hasattr(os, name):
        delattr(os, name)
"""

REPLAY_ON_WINDOWS = """
import asyncio, sys
import openai
from proxy.config import Config
from proxy.embedded import EmbeddedProxy
from proxy.errors import StoreError
from proxy.stores.files import FilesStore

store = sys.argv[1]
proxy = EmbeddedProxy(
    Config.build(mode="replay", store="files:" + store, upstream="http://127.0.0.1:9/v1")
).start()
try:
    client = openai.OpenAI(base_url=proxy.base_url, api_key="replay", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(**__import__("json").loads(sys.argv[2]))
    print(raw.headers["x-seedcache-status"], raw.parse().choices[0].message.content)
finally:
    proxy.stop()

async def write():
    files = FilesStore(store)
    try:
        await files.put("", "0" * 64, b"{}")
    except StoreError as exc:
        print(exc)
    finally:
        await files.close()
asyncio.run(write())
"""


def test_a_files_store_recorded_elsewhere_replays_on_windows_and_refuses_writes(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    # A team records on Linux or macOS, commits the files store, and its CI runs on Windows.
    store = tmp_path / "recordings"
    recorder = start_proxy(store=f"files:{store}")
    recorded = recorder.client().chat.completions.create(**chat_request())
    recorder.stop()
    repo = Path(__file__).resolve().parent.parent
    site = tmp_path / "windows-like"
    site.mkdir()
    (site / "sitecustomize.py").write_text(WINDOWS_LIKE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(repo)])}
    files_before = sorted(p.relative_to(store) for p in store.rglob("*"))

    replay = subprocess.run(
        [sys.executable, "-c", REPLAY_ON_WINDOWS, str(store), json.dumps(chat_request())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    listing = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cli.main import main; main()",
            "ls",
            "--store",
            f"files:{store}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert replay.returncode == 0, replay.stderr
    hit, refusal = replay.stdout.splitlines()
    assert hit == f"hit {recorded.choices[0].message.content}"
    assert refusal.endswith(
        "can only replay on this system: it has no file locks (fcntl) to keep writers from "
        "overwriting each other's recordings. Record on Linux or macOS, or into a disk or "
        "redis:// store"
    )
    assert listing.returncode == 0, listing.stderr
    assert "gpt-4o-mini" in listing.stdout
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == files_before
