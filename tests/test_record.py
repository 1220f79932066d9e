"""Forwarding and recording through the app: modes, Cache-Control, what is (not) stored, header
hygiene, and coalescing of identical concurrent misses (DESIGN §2, §5, §9, §10)."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import gzip
import json
import logging
import socket
import sys
import zlib
from pathlib import Path
from typing import Any

import brotli
import openai
import pytest

from proxy import handlers
from proxy.handlers import Throttled
from proxy.recording import STORED_RESPONSE_HEADERS
from tests.conftest import API_KEY, RunningProxy, StartProxy, status
from tests.fake_upstream import FakeUpstream, chat_request, completion, error_envelope
from tests.servers import free_port

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

CHAT = "/v1/chat/completions"


def store_bytes(proxy: RunningProxy) -> bytes:
    """Every byte of every file in the proxy's store directory."""
    return b"".join(
        p.read_bytes() for p in sorted(Path(proxy.config.store).rglob("*")) if p.is_file()
    )


def content(completion: Any) -> str:
    return str(completion.choices[0].message.content)


# -- modes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["record", "all"])
def test_record_mode_always_forwards_and_adds_a_sample_when_the_output_differs(
    mode: str, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode=mode)
    upstream.nondeterministic = True
    with proxy.client() as client:
        raws = [
            client.chat.completions.with_raw_response.create(**chat_request()) for _ in range(2)
        ]

    assert [status(r) for r in raws] == ["recorded", "recorded"]
    assert upstream.count() == 2
    [recording] = proxy.recordings()
    assert [s.body["id"] for s in recording.samples] == [r.parse().id for r in raws]
    assert raws[0].parse().id != raws[1].parse().id


def test_record_mode_keeps_one_sample_for_an_identical_output(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="record")
    with proxy.client() as client:
        for _ in range(3):
            client.chat.completions.create(**chat_request())

    assert upstream.count() == 3
    [recording] = proxy.recordings()
    assert len(recording.samples) == 1


def test_record_mode_keeps_one_sample_for_an_identical_stream(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="record")
    for _ in range(3):
        proxy.request("POST", CHAT, chat_request(stream=True))

    assert upstream.count() == 3
    [recording] = proxy.recordings()
    assert len(recording.samples) == 1


def test_auto_replays_the_newest_sample_after_record_mode_added_one(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.nondeterministic = True
    recorder = start_proxy(mode="record")
    with recorder.client() as client:
        ids = [client.chat.completions.create(**chat_request()).id for _ in range(2)]
    recorder.stop()

    with start_proxy(mode="replay").client() as client:
        replayed = client.chat.completions.create(**chat_request())

    assert replayed.id == ids[-1]
    assert upstream.count() == 2


@pytest.mark.parametrize("how", ["server", "header"])
def test_passthrough_forwards_everything_and_leaves_the_store_untouched(
    how: str, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="passthrough") if how == "server" else start_proxy()
    headers = {"X-Seedcache-Mode": "passthrough"} if how == "header" else {}
    with proxy.client(default_headers=headers) as client:
        raws = [
            client.chat.completions.with_raw_response.create(**chat_request()) for _ in range(2)
        ]
        client.embeddings.create(model="text-embedding-3-small", input="x")
    # Raw HTTP reads the stream to the end of its body, so the proxy is done with it after.
    streamed = proxy.request("POST", CHAT, chat_request(stream=True), headers=headers)

    assert [status(r) for r in raws] == ["bypass", "bypass"]
    assert raws[1].parse().id == upstream.chat_completion(chat_request())["id"]
    assert streamed.headers["x-seedcache-status"] == "bypass"
    assert b"data: [DONE]" in streamed.body
    assert upstream.count() == 4
    assert proxy.recordings() == []
    assert proxy.stats()["bypassed"] == 4


@pytest.mark.parametrize("kind", ["disk", "files"])
def test_a_passthrough_server_creates_no_store_until_a_request_asks_to_record(
    kind: str, start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    directory = tmp_path / "never-made"
    proxy = start_proxy(
        mode="passthrough", store=str(directory) if kind == "disk" else f"files:{directory}"
    )
    with proxy.client() as client:
        client.chat.completions.create(**chat_request())
    health = proxy.request("GET", "/_seedcache/health")
    listed = proxy.request("GET", "/_seedcache/recordings")

    assert health.status == 200 and health.json()["status"] == "ok"
    assert listed.status == 200 and listed.json()["total"] == 0
    assert not directory.exists()

    # A request may still ask for another mode (DESIGN §2): then the store is made, and used.
    with proxy.client(default_headers={"X-Seedcache-Mode": "auto"}) as client:
        raws = [
            client.chat.completions.with_raw_response.create(**chat_request()) for _ in range(2)
        ]

    assert [status(r) for r in raws] == ["recorded", "hit"]
    assert directory.is_dir()
    assert len(proxy.recordings()) == 1
    assert upstream.count() == 2


def test_a_passthrough_server_isolating_by_key_reads_no_salt_from_its_store(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    directory = tmp_path / "never-made"
    proxy = start_proxy(mode="passthrough", store=str(directory), isolate_by_key=True)
    with proxy.client() as client:
        raw = client.chat.completions.with_raw_response.create(**chat_request())

    assert status(raw) == "bypass"
    assert not directory.exists()
    refused = proxy.request("POST", "/v1/chat/completions", chat_request(), {"Authorization": ""})
    assert refused.status == 401 and refused.json()["error"]["code"] == "missing_api_key"


@pytest.mark.parametrize(
    ("alias", "mode"), [("once", "auto"), ("new_episodes", "auto"), ("all", "record")]
)
def test_vcr_aliases_name_modes(
    alias: str, mode: str, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode=alias)
    with proxy.client() as client:
        raws = [
            client.chat.completions.with_raw_response.create(**chat_request()) for _ in range(2)
        ]

    assert proxy.request("GET", "/_seedcache/health").json()["mode"] == mode
    expected = {"auto": ["recorded", "hit"], "record": ["recorded", "recorded"]}[mode]
    assert [status(r) for r in raws] == expected
    assert upstream.count() == (1 if mode == "auto" else 2)


@pytest.mark.parametrize(
    "headers",
    [{"X-Seedcache-Mode": "all"}, {"Cache-Control": "no-cache"}],
    ids=["record mode header", "cache-control no-cache"],
)
def test_a_request_can_skip_the_read_forward_and_record(
    headers: dict[str, str], proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.nondeterministic = True
    with proxy.client() as client:
        first = client.chat.completions.create(**chat_request())
        live = client.chat.completions.with_raw_response.create(
            **chat_request(), extra_headers=headers
        )
        replayed = client.chat.completions.create(**chat_request())

    assert status(live) == "recorded"
    assert upstream.count() == 2
    assert live.parse().id != first.id
    assert replayed.id == live.parse().id  # the newest sample
    assert len(proxy.recordings()[0].samples) == 2


@pytest.mark.parametrize("header", ["sometimes", "", "auto "])
def test_mode_header_values(header: str, proxy: RunningProxy, upstream: FakeUpstream) -> None:
    result = proxy.request("POST", CHAT, chat_request(), headers={"X-Seedcache-Mode": header})

    if header == "sometimes":
        assert result.status == 400
        assert result.json()["error"]["code"] == "invalid_seedcache_mode"
        assert upstream.count() == 0
    else:  # empty: the server's mode; surrounding blanks are ignored
        assert result.status == 200
        assert result.headers["x-seedcache-status"] == "recorded"


def test_cache_control_no_store_skips_the_write(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy()
    body = chat_request()
    with proxy.client() as client:
        live = client.chat.completions.create(**body, extra_headers={"Cache-Control": "no-store"})
        again = client.chat.completions.create(**body, extra_headers={"Cache-Control": "no-store"})

    assert live.id == again.id == upstream.chat_completion(body)["id"]
    assert upstream.count() == 2
    assert proxy.recordings() == []
    proxy.stop()
    with start_proxy(mode="replay").client() as client, pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**body)


def test_cache_control_no_store_still_reads(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    with proxy.client() as client:
        client.chat.completions.create(**chat_request())
        hit = client.chat.completions.with_raw_response.create(
            **chat_request(), extra_headers={"Cache-Control": "no-store"}
        )

    assert status(hit) == "hit"
    assert upstream.count() == 1


# -- only complete 2xx responses are stored -------------------------------------------------------


@pytest.mark.parametrize("code", [400, 401, 404, 429, 500, 503])
def test_upstream_errors_pass_through_verbatim_and_are_not_stored(
    code: int, proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = '{"error": {"message": "injected",  "type": "x", "param": null, "code": "c"}}\n'
    upstream.fail_next(code, body, headers={"retry-after": "7", "x-request-id": "req_err"})

    failed = proxy.request("POST", CHAT, chat_request())
    retried = proxy.request("POST", CHAT, chat_request())

    assert failed.status == code
    assert failed.body == body.encode()
    assert failed.headers["retry-after"] == "7"
    assert failed.headers["x-request-id"] == "req_err"
    assert retried.status == 200
    assert retried.headers["x-seedcache-status"] == "recorded"
    assert upstream.count() == 2
    [recording] = proxy.recordings()
    assert [s.status for s in recording.samples] == [200]
    assert proxy.stats()["upstream_errors"] == 1


def test_an_upstream_error_reaches_the_sdk_as_its_exception(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.fail_next(429, error_envelope(429))

    with proxy.client() as client, pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**chat_request())

    assert caught.value.code == "rate_limit_exceeded"
    assert proxy.recordings() == []


def test_a_2xx_body_that_is_not_json_is_relayed_but_not_stored(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.fail_next(200, "<html>maintenance</html>")

    result = proxy.request("POST", CHAT, chat_request())

    assert result.status == 200
    assert result.body == b"<html>maintenance</html>"
    assert proxy.recordings() == []
    assert proxy.request("POST", CHAT, chat_request()).headers["x-seedcache-status"] == "recorded"
    assert upstream.count() == 2


# Python's json writes NaN and ±Infinity, and integers of any size: the SDK reads them, but orjson,
# which writes recordings, cannot hold them as they were sent.
INEXACT_BODIES = [
    pytest.param(
        b'{"object":"chat.completion","created":1180591620717411303424,"choices":[]}',
        "an integer beyond 64 bits (1180591620717411303424)",
        id="integer-beyond-64-bits",
    ),
    pytest.param(b'{"object":"chat.completion","choices":[],"score":NaN}', "NaN", id="NaN"),
    pytest.param(
        b'{"object":"chat.completion","choices":[],"score":-Infinity}', "-Infinity", id="-Infinity"
    ),
]


@pytest.mark.parametrize(("sent", "why"), INEXACT_BODIES)
def test_a_json_body_no_recording_can_hold_as_sent_is_relayed_but_not_stored(
    proxy: RunningProxy,
    upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    sent: bytes,
    why: str,
) -> None:
    upstream.fail_next(200, sent, {"Content-Type": "application/json"})

    with caplog.at_level(logging.WARNING, logger="seedcache"):
        result = proxy.request("POST", CHAT, chat_request())

    assert (result.status, result.body, status(result)) == (200, sent, "miss")
    assert proxy.recordings() == []
    assert [r.getMessage() for r in caplog.records if "not recording" in r.getMessage()] == [
        f"not recording {CHAT}: the upstream body holds {why}, "
        "which no recording can hold as it was sent"
    ]
    assert status(proxy.request("POST", CHAT, chat_request())) == "recorded"
    assert upstream.count() == 2


def test_a_json_body_opening_with_a_byte_order_mark_is_recorded(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # The SDK reads past the BOM, as the standard library's json does; a replay sends the JSON.
    sent = codecs.BOM_UTF8 + json.dumps(completion("Bonjour")).encode()
    upstream.fail_next(200, sent, {"Content-Type": "application/json"})

    with proxy.client() as client:
        live = client.chat.completions.with_raw_response.create(**chat_request())
        again = client.chat.completions.with_raw_response.create(**chat_request())

    assert (status(live), status(again)) == ("recorded", "hit")
    assert again.parse() == live.parse()
    assert again.parse().choices[0].message.content == "Bonjour"
    assert upstream.count() == 1


def test_an_unreachable_upstream_is_a_502_envelope(start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream=f"http://127.0.0.1:{free_port()}/v1")

    result = proxy.request("POST", CHAT, chat_request())

    assert result.status == 502
    error = result.json()["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == "upstream_unreachable"
    assert "127.0.0.1" in error["message"]
    assert proxy.recordings() == []
    assert proxy.stats()["upstream_errors"] == 1
    with proxy.client() as client, pytest.raises(openai.InternalServerError):
        client.chat.completions.create(**chat_request())


def test_an_upstream_that_does_not_answer_in_time_is_a_504(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(upstream_timeout=0.5)
    upstream.hang_next(3)

    result = proxy.request("POST", CHAT, chat_request())

    assert result.status == 504
    error = result.json()["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_timeout")
    assert proxy.recordings() == []
    after = proxy.request("POST", CHAT, chat_request())
    assert after.headers["x-seedcache-status"] == "recorded"


# -- header hygiene -------------------------------------------------------------------------------


def test_gzip_from_upstream_reaches_the_sdk_decoded(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.gzip = True
    body = chat_request()
    with proxy.client() as client:
        live = client.chat.completions.create(**body)
        hit = client.chat.completions.create(**body)
    raw = proxy.request("POST", CHAT, chat_request(seed=77))

    assert (
        content(live)
        == content(hit)
        == upstream.chat_completion(body)["choices"][0]["message"]["content"]
    )
    assert upstream.count() == 2  # the first request and the raw one; the second was a hit
    assert "content-encoding" not in raw.headers
    assert int(raw.headers["content-length"]) == len(raw.body)
    assert raw.json()["id"] == upstream.chat_completion(chat_request(seed=77))["id"]


COMPRESS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstd.compress,
}


@pytest.mark.parametrize("encoding", COMPRESS)
def test_a_compressed_request_is_forwarded_decoded_and_keyed_as_the_plain_one(
    encoding: str, proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # aiohttp decodes the body as the proxy reads it: the upstream must not be told it is still
    # compressed, and the key is the plain request's. Without a decoder for br or zstd, aiohttp
    # refused such a request itself, with a plain-text 400 ("Please install `Brotli`").
    body = chat_request(seed=31)
    plain = json.dumps(body).encode()
    packed = COMPRESS[encoding](plain)
    headers = {"Content-Encoding": encoding, "Content-Type": "application/json"}

    recorded = proxy.request("POST", CHAT, packed, headers=headers)
    again = proxy.request("POST", CHAT, plain, headers={"Content-Type": "application/json"})

    assert recorded.status == 200, recorded.body
    assert recorded.headers["x-seedcache-status"] == "recorded"
    assert recorded.json()["id"] == upstream.chat_completion(body)["id"]
    sent = upstream.last
    assert "content-encoding" not in sent.headers
    assert sent.body == body
    assert again.headers["x-seedcache-status"] == "hit"
    assert again.headers["x-seedcache-key"] == recorded.headers["x-seedcache-key"]
    assert upstream.count() == 1


def test_a_2xx_answer_that_is_not_json_is_relayed_as_a_miss_and_not_recorded(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.fail_next(200, "<html>a captive portal</html>", {"Content-Type": "text/html"})

    result = proxy.request("POST", CHAT, chat_request())

    assert (result.status, result.body) == (200, b"<html>a captive portal</html>")
    assert result.headers["x-seedcache-status"] == "miss"
    assert proxy.recordings() == []
    stats = proxy.stats()
    assert (stats["recorded"], stats["misses"]) == (0, 1)


def test_an_upstream_answer_that_cannot_be_read_is_a_502_the_sdk_does_not_retry(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # A header line over aiohttp's 8 KB limit: the upstream answered (and charged) all the same.
    upstream.fail_next(200, {"id": "x"}, {"X-Big": "b" * 9000}, times=3)

    with proxy.client() as client, pytest.raises(openai.InternalServerError) as caught:
        client.with_options(max_retries=2).chat.completions.create(**chat_request())

    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_bad_response"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert upstream.count() == 1
    assert proxy.recordings() == []


def test_expect_100_continue_is_answered_by_the_proxy_not_forwarded(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # curl sends it with large bodies; forwarded, the body would wait for the upstream's 100.
    result = proxy.request("POST", CHAT, chat_request(), headers={"Expect": "100-continue"})

    assert result.status == 200
    assert result.headers["x-seedcache-status"] == "recorded"
    assert "expect" not in upstream.last.headers


def test_paths_reach_the_upstream_as_the_client_encoded_them(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # The SDK percent-encodes ids; decoded, a `/`, `?` or `#` inside one would change the path.
    sent = {
        "meta-llama/Llama-3-8B": "/v1/models/meta-llama%2FLlama-3-8B",
        "ft:a?b": "/v1/models/ft:a%3Fb",
        "tag#1": "/v1/models/tag%231",
    }
    with proxy.client() as client:
        for model_id, path in sent.items():
            with contextlib.suppress(openai.NotFoundError):  # the fake knows none of them
                client.models.retrieve(model_id)
            assert upstream.last.path == path
    query = proxy.request("GET", "/v1/models/x?after=a%26b&limit=2")
    assert upstream.last.path == "/v1/models/x?after=a%26b&limit=2"
    assert query.headers["x-seedcache-status"] == "bypass"


def test_authorization_is_forwarded_but_never_stored(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    body = chat_request()
    with proxy.client() as client:
        answer = client.chat.completions.create(**body)
    proxy.request("POST", CHAT, chat_request(seed=4, stream=True))

    assert upstream.calls[-1].headers["authorization"] == f"Bearer {API_KEY}"
    stored = store_bytes(proxy)
    assert content(answer).encode() in stored  # the check can see what the store holds
    assert API_KEY.encode() not in stored
    assert b"authorization" not in stored.lower()


def test_api_key_shaped_secrets_in_the_request_are_redacted_before_storing(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    secret = "sk-proj-" + "Q" * 24
    body = chat_request(messages=[{"role": "user", "content": f"My key is {secret}, keep it."}])
    with proxy.client() as client:
        client.chat.completions.create(**body)
        hit = client.chat.completions.with_raw_response.create(**body)

    assert status(hit) == "hit"  # the key is computed before redaction
    assert upstream.calls[0].body["messages"][0]["content"].endswith(f"{secret}, keep it.")
    [recording] = proxy.recordings()
    assert recording.body["messages"][0]["content"] == "My key is <redacted>, keep it."
    assert secret.encode() not in store_bytes(proxy)


def test_hop_by_hop_headers_are_not_forwarded(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    result = proxy.request(
        "POST",
        CHAT,
        chat_request(),
        headers={
            "Connection": "keep-alive",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic dXNlcjpwYXNz",
            "Proxy-Connection": "keep-alive",
            "X-Custom": "kept",
        },
    )

    assert result.status == 200
    sent = upstream.calls[-1].headers
    for name in ("keep-alive", "te", "proxy-authorization", "proxy-connection"):
        assert name not in sent
    assert sent["x-custom"] == "kept"
    assert sent["authorization"] == f"Bearer {API_KEY}"


def test_headers_nominated_by_connection_are_not_forwarded(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    result = proxy.request(
        "POST",
        CHAT,
        chat_request(),
        headers={"Connection": "keep-alive, X-Foo", "X-Foo": "hop", "X-Bar": "end-to-end"},
    )

    assert result.status == 200
    sent = upstream.calls[-1].headers
    assert sent["x-bar"] == "end-to-end"
    assert "x-foo" not in sent


def test_host_is_the_upstreams_and_seedcache_headers_stay_local(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    proxy.request(
        "POST",
        CHAT,
        chat_request(),
        headers={
            "Host": "localhost:4444",
            "X-Seedcache-Mode": "record",
            "X-Seedcache-Namespace": "ns1",
        },
    )

    sent = upstream.calls[-1].headers
    assert sent["host"] == upstream.url.removeprefix("http://")
    assert not [name for name in sent if name.startswith("x-seedcache-")]


def raw_request_target(proxy: RunningProxy, target: str, body: dict[str, Any]) -> bytes:
    """Send a request line with an arbitrary target (absolute-form, `//host`) on a raw socket."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    )
    received = b""
    with socket.create_connection(("127.0.0.1", proxy.running.port), timeout=10) as sock:
        sock.sendall(head.encode() + payload)
        while data := sock.recv(65536):
            received += data
    return received


@pytest.mark.parametrize(
    "target",
    ["http://evil.example/v1/chat/completions", "//evil.example/v1/chat/completions"],
    ids=["absolute-form", "double-slash"],
)
def test_a_request_never_chooses_where_the_proxy_connects(
    target: str, proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    received = raw_request_target(proxy, target, chat_request())

    assert received.startswith(b"HTTP/1.1 200")
    assert upstream.count() == 1
    assert upstream.calls[0].headers["host"] == upstream.url.removeprefix("http://")


def test_only_allowlisted_response_headers_are_stored(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.extra_headers = {"openai-project": "proj_secret", "x-custom-upstream": "1"}
    with proxy.client() as client:
        live = client.chat.completions.with_raw_response.create(**chat_request())
    # Raw HTTP reads the stream to the end of its body: it is stored by then.
    proxy.request("POST", CHAT, chat_request(seed=2, stream=True))

    samples = [s for r in proxy.recordings() for s in r.samples]
    assert len(samples) == 2
    for sample in samples:
        assert set(sample.headers) <= STORED_RESPONSE_HEADERS
        assert {"content-type", "x-request-id"} <= set(sample.headers)
    assert "set-cookie" not in live.headers  # never even relayed live
    stored = store_bytes(proxy)
    for never in (b"set-cookie", b"__cf_bm", b"org-fake", b"proj_secret", b"x-ratelimit"):
        assert never not in stored


# -- coalescing -----------------------------------------------------------------------------------


async def test_identical_concurrent_misses_are_coalesced(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.delay = 0.3
    async with proxy.async_client() as client:
        raws = await asyncio.gather(
            *(client.chat.completions.with_raw_response.create(**chat_request()) for _ in range(8))
        )

    assert upstream.count() == 1
    assert {r.parse().id for r in raws} == {upstream.chat_completion(chat_request())["id"]}
    assert sorted(status(r) for r in raws) == ["hit"] * 7 + ["recorded"]


async def test_different_concurrent_requests_are_not_coalesced(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.delay = 0.2
    async with proxy.async_client() as client:
        answers = await asyncio.gather(
            *(client.chat.completions.create(**chat_request(seed=s)) for s in range(4))
        )

    assert upstream.count() == 4
    assert len({a.id for a in answers}) == 4


@pytest.mark.parametrize("stream", [False, True])
async def test_followers_of_a_leader_whose_answer_cannot_be_recorded_go_upstream_together(
    stream: bool, proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # A 2xx that is no answer to record (a load balancer's HTML page; a stream ending in an
    # error frame, as vLLM and llama.cpp send): each waiting caller needs a call of its own, and
    # they make them at once, not each after the one before (4 callers waited 1, 2, 3, 4 delays).
    upstream.delay = 0.3
    for _ in range(4):
        if stream:
            upstream.error_frame_next()
        else:
            upstream.fail_next(200, "<html>upstream busy</html>", {"content-type": "text/html"})
    body = chat_request(stream=True) if stream else chat_request()
    results = await asyncio.gather(
        *(asyncio.to_thread(proxy.request, "POST", CHAT, body) for _ in range(4))
    )

    assert [r.status for r in results] == [200] * 4
    if not stream:  # a live stream's headers leave before it is known whether it records
        assert {status(r) for r in results} == {"miss"}
    assert upstream.count() == 4
    assert upstream.peak_concurrency == 3  # the leader's call, then its three followers' at once
    assert proxy.recordings() == []


@pytest.mark.parametrize("mode", ["auto", "record", "audit"])
def test_an_upstream_redirect_elsewhere_is_a_502_that_names_it(
    mode: str, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # The SDK follows redirects: relayed, it would go around the proxy, unrecorded, every run.
    proxy = start_proxy(mode=mode)
    target = f"{upstream.url}/v1/chat/completions?token=abc"
    upstream.fail_next(307, b"", {"location": target})

    with pytest.raises(openai.APIStatusError) as raised:
        proxy.client().chat.completions.create(**chat_request())

    assert raised.value.status_code == 502
    assert raised.value.code == "upstream_redirect"
    assert f"redirecting to {upstream.url}/v1/chat/completions:" in raised.value.message
    assert "token=abc" not in raised.value.message
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert upstream.count() == 1  # the SDK did not follow anything
    assert proxy.recordings() == []
    assert proxy.stats()["upstream_errors"] == 1


@pytest.mark.parametrize(
    ("mode", "path"), [("passthrough", CHAT), ("auto", "/v1/files/file-abc/content")]
)
def test_an_upstream_redirect_off_the_recorded_endpoints_is_relayed(
    mode: str, path: str, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # Nothing is recorded there: a file download may redirect to its blob store.
    proxy = start_proxy(mode=mode)
    target = "https://blobs.example.com/file-abc?sig=xyz"
    upstream.fail_next(302, b"", {"location": target})

    result = proxy.request("GET" if "files" in path else "POST", path, chat_request())

    assert (result.status, result.headers["location"]) == (302, target)
    assert proxy.stats()["upstream_errors"] == 1


def test_an_upstream_redirect_to_a_relative_location_is_relayed(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # It stays with the proxy: a client that follows it asks the proxy again.
    upstream.fail_next(308, b"", {"location": "/v1/chat/completions/"})

    result = proxy.request("POST", CHAT, chat_request())

    assert (result.status, result.headers["location"]) == (308, "/v1/chat/completions/")


def test_an_upstream_error_whose_body_cannot_be_read_is_a_502_counted_once(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.fail_next(500, b"not gzip at all", {"content-encoding": "gzip"})

    result = proxy.request("POST", CHAT, chat_request())

    assert result.status == 502
    assert proxy.stats()["upstream_errors"] == 1


async def test_followers_of_a_failed_leader_get_the_same_client_error(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.delay = 0.5
    upstream.fail_next(400, error_envelope(400, "bad tool schema", param="tools"))
    async with proxy.async_client() as client:
        results = await asyncio.gather(
            *(client.chat.completions.create(**chat_request()) for _ in range(4)),
            return_exceptions=True,
        )

    assert upstream.count() == 1
    assert all(isinstance(r, openai.BadRequestError) for r in results)
    assert {r.param for r in results if isinstance(r, openai.BadRequestError)} == {"tools"}


@pytest.mark.parametrize("code", [429, 500, 503])
async def test_followers_of_a_leader_get_its_rate_limit_or_server_error(
    code: int, proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    upstream.delay = 0.5
    upstream.fail_next(code, error_envelope(code))
    async with proxy.async_client() as client:
        results = await asyncio.gather(
            *(client.chat.completions.create(**chat_request()) for _ in range(4)),
            return_exceptions=True,
        )

    assert upstream.count() == 1  # not one paid (or rate-limited) call per waiting request
    assert {getattr(r, "status_code", None) for r in results} == {code}
    assert proxy.recordings() == []


async def test_followers_of_a_leader_that_timed_out_time_out_with_it(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(upstream_timeout=0.5)
    upstream.hang_next(5)
    async with proxy.async_client() as client:
        results = await asyncio.gather(
            *(client.chat.completions.with_raw_response.create(**chat_request()) for _ in range(4)),
            return_exceptions=True,
        )

    # Before, each waiting request went upstream in turn once the one before it timed out.
    assert upstream.count() == 1
    assert all(isinstance(r, openai.InternalServerError) for r in results)
    errors = [r for r in results if isinstance(r, openai.InternalServerError)]
    assert {e.status_code for e in errors} == {504}
    assert {e.code for e in errors} == {"upstream_timeout"}
    assert {e.response.headers["x-should-retry"] for e in errors} == {"true"}
    assert len({e.response.headers["x-seedcache-key"] for e in errors}) == 1
    assert proxy.recordings() == []
    after = proxy.request("POST", CHAT, chat_request())
    assert after.headers["x-seedcache-status"] == "recorded"


async def test_a_leaders_client_error_is_not_served_to_a_follower_whose_request_differs(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # Same key, but the error came from what the key leaves out: the API key, here.
    upstream.delay = 0.3
    upstream.fail_next(401, error_envelope(401, "Incorrect API key provided"))
    async with proxy.async_client() as client:
        other = client.with_options(api_key="another-tenant")
        leader = asyncio.create_task(client.chat.completions.create(**chat_request()))
        await asyncio.sleep(0.1)
        follower = await other.chat.completions.create(**chat_request())
        with pytest.raises(openai.AuthenticationError):
            await leader

    assert follower.id == upstream.chat_completion(chat_request())["id"]
    assert upstream.count() == 2  # the follower led its own call once the leader failed
    assert len(proxy.recordings()) == 1


async def test_a_no_cache_request_arriving_during_an_identical_call_makes_its_own(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # It waited for that call and was served its recording: a hit, though it skips the read.
    upstream.delay = 0.3
    upstream.nondeterministic = True
    async with proxy.async_client() as client:
        first = asyncio.create_task(client.chat.completions.create(**chat_request()))
        await asyncio.sleep(0.1)
        own = await client.chat.completions.with_raw_response.create(
            **chat_request(), extra_headers={"Cache-Control": "no-cache"}
        )
        leader = await first
        replayed = await client.chat.completions.create(**chat_request())

    assert status(own) == "recorded"
    assert own.parse().id != leader.id
    assert upstream.count() == 2
    assert replayed.id == own.parse().id  # the newest sample


async def test_record_mode_does_not_coalesce(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="record")
    upstream.delay = 0.2
    async with proxy.async_client() as client:
        await asyncio.gather(*(client.chat.completions.create(**chat_request()) for _ in range(3)))

    assert upstream.count() == 3


def test_store_failures_left_out_of_the_log_are_counted_when_the_proxy_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    throttled = Throttled(logging.getLogger("seedcache"), interval=60)
    for n in range(3):
        throttled.error("record", "not recording %s: the store is full", f"/v1/chat/{n}")
    throttled.close()
    throttled.close()  # said once

    assert [r.getMessage() for r in caplog.records] == [
        "not recording /v1/chat/0: the store is full",
        "stopping (record); 2 more like the last failure logged were not logged, in the 0 s "
        "after it",
    ]


def test_store_failures_left_out_of_the_log_are_counted_once_the_store_works_for_a_while(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store that fails now and then (a flapping Redis) between recordings that work: still a
    # line once in a while, not one per failure; the count comes once it has worked for as long.
    now = [1000.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: now[0])
    throttled = Throttled(logging.getLogger("seedcache"), interval=60)
    for _ in range(5):
        throttled.error("record", "not recording: Redis went away")
        now[0] += 1
        throttled.ended("record", "recording again")
    now[0] += 60
    throttled.ended("record", "recording again")
    throttled.ended("record", "recording again")

    assert [r.getMessage() for r in caplog.records] == [
        "not recording: Redis went away",
        "recording again; 4 more like the last failure logged were not logged, in the 4 s after it",
    ]
