"""Input the SDK would never send, over raw HTTP: a clear OpenAI error, nothing stored or forwarded,
and a server that keeps serving (DESIGN §10)."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
from typing import Any

import orjson
import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, LineTooLong

from proxy import handlers
from proxy.app import BadHttpLine
from proxy.errors import ProxyError
from tests.conftest import HTTPResult, RunningProxy, StartProxy, status
from tests.fake_upstream import FakeUpstream, chat_request
from tests.servers import BackgroundLoop, free_port

CHAT = "/v1/chat/completions"


def assert_error(result: HTTPResult, status: int, *, code: str | None = None) -> dict[str, Any]:
    """`result` is an OpenAI error envelope with `status` that tells the SDK not to retry."""
    assert result.status == status, result.body
    assert result.headers["content-type"].startswith("application/json")
    assert result.headers["x-should-retry"] == "false"
    error = result.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


def assert_still_serving(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    """A valid request after the bad one is forwarded and answered normally."""
    body = chat_request(seed=99)
    result = proxy.request("POST", CHAT, body)
    assert result.status == 200
    assert result.json()["id"] == upstream.chat_completion(body)["id"]


MALFORMED = [
    ("truncated", b'{"model": "gpt-4o-mini", "messages": ['),
    ("trailing comma", b'{"model": "gpt-4o-mini",}'),
    ("single quotes", b"{'model': 'gpt-4o-mini'}"),
    ("NaN", b'{"model": "gpt-4o-mini", "temperature": NaN}'),
    ("not utf-8", b'{"model": "\xff\xfe"}'),
    ("empty", b""),
    ("plain text", b"hello"),
]


@pytest.mark.parametrize("raw", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_json_is_a_400_envelope(
    raw: bytes, proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    result = proxy.request("POST", CHAT, raw, headers={"Content-Type": "application/json"})

    assert_error(result, 400, code="invalid_json")
    assert upstream.count() == 0
    assert_still_serving(proxy, upstream)
    assert len(proxy.recordings()) == 1  # only the valid request's


def test_deeply_nested_json_is_a_400_not_an_internal_error(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    depth = 100_000
    raw = b'{"model": "gpt-4o-mini", "messages": ' + b"[" * depth + b"]" * depth + b"}"

    result = proxy.request("POST", CHAT, raw)

    assert_error(result, 400)
    assert upstream.count() == 0
    assert_still_serving(proxy, upstream)


UNSTORABLE = [
    # orjson reads integers up to a double's range as doubles; beyond it they stay integers.
    ("integer beyond a double", '"top_k": 1' + "0" * 400, "64 bits"),
    ("integer beyond a double inside", '"logit_bias": {"1": 1' + "0" * 400 + "}", "64 bits"),
    # Within a double's range orjson reads them as doubles: 2**64 + 1 and 2**64 + 2 would share
    # a key, and a seed was "a number, not an integer".
    ("integer past 2**64", f'"top_k": {2**64 + 1}', "64 bits"),
    ("seed past 2**64", f'"seed": {2**64 + 2}', "64 bits"),
    ("integer below -2**63", f'"logit_bias": {{"1": {-(2**63) - 1}}}', "64 bits"),
    ("lone surrogate", '"user": "\\ud800"', "surrogate"),
    # Keyed as infinity, stored as null: 1e400 and -1e400 would share a stored request.
    ("number beyond a double", '"temperature": 1e400', "range of a double"),
    ("negative number beyond a double", '"top_p": -1e400', "range of a double"),
    ("nested 600 deep", '"tools": ' + "[" * 600 + "]" * 600, "250 levels"),
]


@pytest.mark.parametrize(
    ("member", "says"), [u[1:] for u in UNSTORABLE], ids=[u[0] for u in UNSTORABLE]
)
def test_a_body_no_recording_can_hold_is_a_400_before_it_is_sent(
    member: str, says: str, proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # Valid JSON, but the recording could not be written: refused before the upstream is paid.
    raw = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], ' + member
    result = proxy.request("POST", CHAT, (raw + "}").encode())

    error = assert_error(result, 400, code="invalid_body")
    assert says in error["message"]
    assert upstream.count() == 0
    assert_still_serving(proxy, upstream)


def test_integers_of_many_digits_within_64_bits_are_keyed_exactly(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # The largest seeds there are, and a long run of digits in a string, read as they were sent.
    for seed in (2**64 - 1, -(2**63)):
        body = chat_request(seed=seed, user="order 12345678901234567890123")
        assert proxy.request("POST", CHAT, body).headers["x-seedcache-status"] == "recorded"
        assert proxy.request("POST", CHAT, body).headers["x-seedcache-status"] == "hit"
    assert upstream.count() == 2
    assert {r.body["seed"] for r in proxy.recordings()} == {2**64 - 1, -(2**63)}


def test_an_integral_float_beyond_64_bits_is_keyed_as_a_float_and_recorded(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # 1.0 keys as 1, but 1e20 has no 64-bit integer to key as.
    result = proxy.request("POST", CHAT, chat_request(max_tokens=1e20))

    assert result.status == 200
    assert result.headers["x-seedcache-status"] == "recorded"
    assert (
        proxy.request("POST", CHAT, chat_request(max_tokens=1e20)).headers["x-seedcache-status"]
        == "hit"
    )


@pytest.mark.parametrize(
    "raw", [b"[1, 2]", b'"chat"', b"42", b"true", b"null"], ids=lambda r: r.decode()
)
def test_a_body_that_is_not_an_object_is_a_400(
    raw: bytes, proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    result = proxy.request("POST", CHAT, raw)

    error = assert_error(result, 400)
    assert "JSON object" in error["message"]
    assert upstream.count() == 0
    assert_still_serving(proxy, upstream)
    assert len(proxy.recordings()) == 1


WRONG_TYPES = [
    ("model", 5),
    ("model", ["gpt-4o-mini"]),
    ("messages", "x"),
    ("messages", {"role": "user"}),
    ("seed", "1"),
    ("seed", 1.5),
    ("seed", True),
    ("temperature", "0"),
    ("n", "2"),
]


@pytest.mark.parametrize(
    ("member", "value"), WRONG_TYPES, ids=[f"{m}={v!r}" for m, v in WRONG_TYPES]
)
def test_wrong_member_types_are_a_400_naming_the_param(
    member: str,
    value: Any,
    proxy: RunningProxy,
    upstream: FakeUpstream,
) -> None:
    result = proxy.request("POST", CHAT, chat_request(**{member: value}))

    error = assert_error(result, 400)
    assert error["param"] == member
    assert member in error["message"]
    assert upstream.count() == 0
    assert_still_serving(proxy, upstream)
    assert len(proxy.recordings()) == 1


def test_bad_input_in_replay_mode_is_a_400_not_a_miss(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="replay")

    malformed = proxy.request("POST", CHAT, b"{oops")
    mistyped = proxy.request("POST", CHAT, chat_request(seed="1"))

    assert_error(malformed, 400, code="invalid_json")
    assert assert_error(mistyped, 400)["param"] == "seed"
    assert proxy.stats()["misses"] == 0
    assert upstream.count() == 0


def test_other_recorded_endpoints_check_their_bodies_too(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    for path in ("/v1/completions", "/v1/embeddings", "/v1/responses"):
        assert_error(proxy.request("POST", path, b"[]"), 400)
        assert_error(proxy.request("POST", path, b"{nope"), 400, code="invalid_json")
    assert upstream.count() == 0


def test_a_body_over_max_body_is_a_413_envelope(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(max_body=1000)
    big = chat_request(messages=[{"role": "user", "content": "x" * 2000}])

    result = proxy.request("POST", CHAT, big)

    error = assert_error(result, 413, code="body_too_large")
    assert "1000" in error["message"] and "--max-body" in error["message"]
    assert upstream.count() == 0
    assert_still_serving(proxy, upstream)  # a body under the limit still works
    assert len(proxy.recordings()) == 1


def test_max_body_applies_to_forwarded_paths_too(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(max_body=1000)

    result = proxy.request("POST", "/v1/files", b"x" * 5000)

    assert_error(result, 413, code="body_too_large")
    assert upstream.count() == 0


def test_a_body_that_does_not_decode_as_its_content_encoding_is_a_400(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    result = proxy.request("POST", CHAT, b"this is not gzip", headers={"Content-Encoding": "gzip"})

    error = assert_error(result, 400, code="invalid_body")
    assert "Content-Encoding: gzip" in error["message"]
    assert upstream.count() == 0
    assert_still_serving(proxy, upstream)
    assert len(proxy.recordings()) == 1


def test_a_body_that_stops_arriving_is_a_408_and_is_not_forwarded(
    proxy: RunningProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handlers, "BODY_TIMEOUT", 0.5)
    payload = json.dumps(chat_request()).encode()
    with socket.create_connection(("127.0.0.1", proxy.running.port), timeout=10) as sock:
        sock.sendall(
            f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload[:20]  # and then nothing more
        )
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        body = answer.read()

    assert answer.status == 408
    assert answer.headers["x-should-retry"] == "true"
    assert answer.headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "body_timeout"
    assert "0.5 seconds" in error["message"]
    assert upstream.count() == 0
    assert proxy.recordings() == []
    assert_still_serving(proxy, upstream)


@pytest.mark.parametrize("path", ["/v1/../admin", "/v1/%2e%2e/%2E%2E/secret", "/v1/./models"])
def test_dot_segments_in_the_path_are_a_400(
    path: str, proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # Resolved, they would step out of the upstream base (/v1) with whatever key is sent.
    error = assert_error(proxy.request("GET", path), 400, code="invalid_path")

    assert path in error["message"]
    assert upstream.count() == 0
    assert_still_serving(proxy, upstream)


def test_an_unknown_mode_header_is_a_400(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    result = proxy.request("POST", CHAT, chat_request(), headers={"X-Seedcache-Mode": "sometimes"})

    error = assert_error(result, 400)
    assert "sometimes" in error["message"] and "replay" in error["message"]
    assert upstream.count() == 0
    assert_still_serving(proxy, upstream)


@pytest.mark.parametrize("namespace", ["../etc", "a b", "x" * 129])
def test_an_invalid_namespace_header_is_a_400(
    namespace: str, proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    result = proxy.request(
        "POST", CHAT, chat_request(), headers={"X-Seedcache-Namespace": namespace}
    )

    assert_error(result, 400, code="invalid_namespace")
    assert upstream.count() == 0
    assert proxy.recordings() == []


def test_a_path_cannot_forge_lines_of_the_log(
    start_proxy: StartProxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    # A Redis that cannot be reached: the tenant's salt cannot be read, whatever the path, and the
    # failure is logged with the path, which aiohttp has percent-decoded. (A path with a line feed
    # matches no route; a carriage return overwrites the line on a terminal.)
    proxy = start_proxy(isolate_by_key=True, store=f"redis://127.0.0.1:{free_port()}/0")
    path = "/v1/files%0D2026-11-26%2013:00:00,000%20ERROR%20seedcache:%20FORGED%1B[2J"

    with caplog.at_level(logging.ERROR, logger="seedcache"):
        result = proxy.request("GET", path)

    assert result.status == 503
    [line] = [r.getMessage() for r in caplog.records if r.name == "seedcache"]
    assert line.startswith(
        "store failure on GET /v1/files\\r2026-11-26 13:00:00,000 ERROR seedcache: FORGED\\x1b[2J: "
    )
    assert "\r" not in line and "\x1b" not in line
    assert upstream.count() == 0


# A latin-1 client sends é as the byte 0xe9, which is no UTF-8.
NOT_UTF8 = [
    ("X-Seedcache-Fingerprint", b"fp_caf\xe9"),
    ("X-Seedcache-Mode", b"r\xe9play"),
    ("X-Seedcache-Namespace", b"caf\xe9"),
    ("Authorization", b"Bearer caf\xe9-0123456789"),
    ("api-key", b"caf\xe9-0123456789"),
]


@pytest.mark.parametrize(("name", "value"), NOT_UTF8, ids=[n for n, _ in NOT_UTF8])
@pytest.mark.parametrize("tokens", [(), ("team-token",)], ids=["open", "access-token"])
def test_a_header_seedcache_reads_that_is_not_utf8_is_a_400_naming_it(
    name: str,
    value: bytes,
    tokens: tuple[str, ...],
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The pin went into the miss message raw, which orjson could not write: aiohttp's plain-text
    # 500 and a traceback; the API key, into digests that could not take it: a 500.
    proxy = start_proxy(access_tokens=tokens)
    token = {"Authorization": "Bearer team-token"} if tokens else {}
    proxy.request("POST", CHAT, chat_request(), headers=token)  # recorded: the pin is read
    headers: dict[str, Any] = {**token, name: value}
    if name == "api-key":
        headers["Authorization"] = ""

    result = proxy.request("POST", CHAT, chat_request(), headers=headers)

    error = assert_error(result, 400, code="invalid_header")
    assert error["message"] == f"The {name} header is not UTF-8 text; send it encoded as UTF-8."
    assert upstream.count() == 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    again = proxy.request("POST", CHAT, chat_request(seed=99), headers=token)
    assert again.status == 200


def test_an_error_quoting_text_that_is_not_utf8_can_still_be_sent() -> None:
    # Whatever message quotes what a client sent, the error envelope can be written as JSON.
    error = ProxyError(404, "no sample has fingerprint fp_caf\udce9 (X-Seedcache-Fingerprint)")

    sent = json.loads(orjson.dumps(error.envelope()))

    assert sent["error"]["message"] == (
        "no sample has fingerprint fp_caf\\udce9 (X-Seedcache-Fingerprint)"
    )
    assert json.loads(orjson.dumps(error.fields()))["message"] == sent["error"]["message"]


@pytest.mark.parametrize("namespace", ["aux", "com1", "con.eu", "build."])
def test_a_namespace_named_like_a_windows_device_is_one(
    namespace: str, proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # Only a folder of the files store is refused such a name on Windows, and only there.
    headers = {"X-Seedcache-Namespace": namespace}
    recorded = proxy.request("POST", CHAT, chat_request(), headers=headers)
    replayed = proxy.request("POST", CHAT, chat_request(), headers=headers)

    assert [r.headers["x-seedcache-status"] for r in (recorded, replayed)] == ["recorded", "hit"]
    assert [r.namespace for r in proxy.recordings()] == [namespace]


def test_an_integral_float_seed_is_that_integer(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    # The key compares numbers by value, so the check of its type does too.
    first = proxy.request("POST", CHAT, chat_request(seed=123))
    again = proxy.request("POST", CHAT, chat_request(seed=123.0))

    assert (first.headers["x-seedcache-status"], again.headers["x-seedcache-status"]) == (
        "recorded",
        "hit",
    )
    assert again.headers["x-seedcache-key"] == first.headers["x-seedcache-key"]
    assert upstream.count() == 1


NOT_HTTP = [
    ("content-length", b"Content-Length: abc\r\n"),
    ("header name", b"Bad Header: y\r\n"),
    # aiohttp quotes the start of a header line over 8190 bytes: here, a bearer token.
    ("header too long", b"Authorization: Bearer " + b"x1" * 4500 + b"\r\n"),
]


@pytest.mark.parametrize("header", [h[1] for h in NOT_HTTP], ids=[h[0] for h in NOT_HTTP])
def test_a_request_that_is_not_valid_http_is_a_400_and_one_log_line_without_traceback(
    header: bytes,
    proxy: RunningProxy,
    upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.running.port), timeout=10) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + header + b"\r\n")
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        answer.read()

    assert answer.status == 400
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(records) == 1
    assert records[0].levelname == "WARNING"
    assert records[0].exc_info is None
    line = records[0].getMessage()
    assert line.startswith("bad HTTP request from 127.0.0.1: ") and "\n" not in line
    assert "x1x1" not in line
    assert upstream.count() == 0
    assert_still_serving(proxy, upstream)


@pytest.mark.parametrize(
    ("error", "logged"),
    [
        # As aiohttp's pure-Python parser words them (no C extension: PyPy, AIOHTTP_NO_EXTENSIONS).
        (BadStatusLine("GET /v1/models?api_key=SECRET-1234 HTTP/1.x"), "Bad status line"),
        (BadHttpMessage("zzSECRET-1234"), "BadHttpMessage"),
        (LineTooLong(b"Authorization: Bearer SECRET-1234", 8190), "Got more than 8190 bytes"),
    ],
)
def test_a_parse_error_is_logged_without_what_the_client_sent(
    error: Exception, logged: str
) -> None:
    record = logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
        ("127.0.0.1",), (type(error), error, None),
    )  # fmt: skip

    assert BadHttpLine().filter(record)

    line = record.getMessage()
    assert line.startswith(f"bad HTTP request from 127.0.0.1: {logged}")
    assert "SECRET" not in line and record.exc_info is None


def test_a_large_request_is_parsed_and_keyed_off_the_event_loop(
    proxy: RunningProxy,
    upstream: FakeUpstream,
    loop: BackgroundLoop,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Tens of megabytes of small JSON values take seconds to parse and key: on the loop, every
    # other client (and the health check) would wait for them.
    async def current() -> threading.Thread:
        return threading.current_thread()

    loop_thread = loop.run(current())
    threads: list[bool] = []
    parse = handlers.parse_request

    def watched(*args: Any) -> Any:
        threads.append(threading.current_thread() is loop_thread)
        return parse(*args)

    monkeypatch.setattr(handlers, "parse_request", watched)
    small = chat_request(seed=1)
    large = chat_request(seed=1, metadata={"notes": "x" * 512}, tools=[LARGE_TOOL] * 200)
    assert len(json.dumps(large)) > handlers.PARSE_INLINE_LIMIT

    with proxy.client() as client:
        client.chat.completions.create(**small)
        answer = client.chat.completions.create(**large)

    assert threads == [True, False]
    assert answer.choices[0].finish_reason is not None
    assert upstream.count() == 2


LARGE_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up. " * 20,
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
    },
}


# -- requests from web pages (DNS rebinding, cross-site requests) ---------------------------------

# What a browser sends for a page whose name was rebound to 127.0.0.1, or for a cross-site form
# POST: a body a page may send without a CORS preflight.
FOREIGN_HOST = "rebind.evil.example"
PAGE_POST = {"Content-Type": "text/plain;charset=UTF-8"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", CHAT),
        ("GET", "/v1/models"),
        ("GET", "/_seedcache/recordings"),
        ("GET", "/_seedcache/audit"),
        ("GET", "/_seedcache/health"),
        ("GET", "/metrics"),
    ],
)
def test_a_request_addressed_to_another_name_is_a_403_and_goes_nowhere(
    method: str,
    path: str,
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEEDCACHE_TEST_UPSTREAM_KEY", "sk-proxy-own-key")
    proxy = start_proxy(upstream_api_key_env="SEEDCACHE_TEST_UPSTREAM_KEY")
    port = proxy.running.port

    result = proxy.request(
        method,
        path,
        json.dumps(chat_request()) if method == "POST" else None,
        headers={"Host": f"{FOREIGN_HOST}:{port}", "Authorization": "", **PAGE_POST},
    )

    error = assert_error(result, 403, code="forbidden_host")
    assert FOREIGN_HOST in error["message"] and "--allow-host" in error["message"]
    assert upstream.count() == 0
    assert proxy.recordings() == []
    assert proxy.request("GET", "/_seedcache/health").status == 200  # Host: 127.0.0.1:port


def test_the_sdk_and_a_page_on_localhost_are_answered_and_a_page_elsewhere_is_a_403(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    port = proxy.running.port
    with proxy.client() as client:
        first = client.chat.completions.with_raw_response.create(**chat_request())
    assert status(first) == "recorded"
    with proxy.client(base_url=f"http://localhost:{port}/v1") as client:
        hit = client.chat.completions.with_raw_response.create(**chat_request())
    assert status(hit) == "hit"
    answered = {
        # An app in development, on another port of this machine.
        "page on localhost": {"Origin": "http://localhost:3000"},
        "page on 127.0.0.1": {"Origin": "http://127.0.0.1:5173", "Host": f"localhost:{port}"},
        "page on [::1]": {"Origin": "https://[::1]:8443", "Host": f"[::1]:{port}"},
        "other loopback": {"Host": f"127.0.0.2:{port}", "Origin": "http://LOCALHOST:3000"},
    }
    for case, headers in answered.items():
        result = proxy.request("POST", CHAT, chat_request(seed=2), headers=headers)
        assert result.status == 200, case
    assert upstream.count() == 2

    for origin in ("https://evil.example", "http://localhost.evil.example:3000", "null"):
        refused = proxy.request(
            "POST", CHAT, chat_request(seed=3), headers={"Origin": origin, **PAGE_POST}
        )
        error = assert_error(refused, 403, code="forbidden_origin")
        assert repr(origin) in error["message"]
    assert upstream.count() == 2


def test_allow_host_admits_a_name_and_a_proxy_on_every_interface_checks_none(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    named = start_proxy(allowed_hosts=("Seedcache.Test",))
    behind = {"Host": "seedcache.test:8080", "Origin": "https://SEEDCACHE.test"}
    assert named.request("POST", CHAT, chat_request(), headers=behind).status == 200
    assert named.request("GET", "/_seedcache/stats").status == 200  # loopback names still
    refused = named.request("GET", "/_seedcache/stats", headers={"Host": FOREIGN_HOST})
    assert_error(refused, 403, code="forbidden_host")

    # Bound on every interface (Docker), the user exposed it on purpose: any name, any page.
    exposed = start_proxy(host="0.0.0.0")
    page = {"Host": FOREIGN_HOST, "Origin": f"http://{FOREIGN_HOST}"}
    assert exposed.request("POST", CHAT, chat_request(seed=2), headers=page).status == 200
    assert upstream.count() == 2
