"""No secrets in recordings (DESIGN §10): API-key shaped strings are redacted before any write,
and the key is computed before redaction so the request still matches."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import RunningProxy, StartProxy
from tests.fake_upstream import FakeUpstream, chat_request

# Built at run time so that no key-shaped string is committed.
SECRET = "sk-" + "proj-" + "A1b2C3d4" * 6
BEARER = "Bearer " + "eyJ" + "x9Y8z7W6" * 5


def stored_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_a_key_in_a_message_is_redacted_and_the_request_still_matches(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy: RunningProxy = start_proxy(store=f"files:{tmp_path / 'rec'}")
    body = chat_request(messages=[{"role": "user", "content": f"My key is {SECRET}, keep it"}])
    first = proxy.client().chat.completions.with_raw_response.create(**body)
    assert first.headers["x-seedcache-status"] == "recorded"
    assert upstream.last.body["messages"][0]["content"].endswith(f"{SECRET}, keep it")

    data = stored_bytes(tmp_path / "rec")
    assert SECRET.encode() not in data
    assert b"My key is <redacted>, keep it" in data

    again = proxy.client().chat.completions.with_raw_response.create(**body)
    assert again.headers["x-seedcache-status"] == "hit"
    assert again.headers["x-seedcache-key"] == first.headers["x-seedcache-key"]


def test_keys_in_headers_never_reach_the_store(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.extra_headers = {"x-request-id": f"req_{SECRET}"}
    proxy = start_proxy(store=f"files:{tmp_path / 'rec'}")
    client = proxy.client(default_headers={"X-Team-Token": BEARER, "api-key": SECRET})
    list(client.chat.completions.create(**chat_request(), stream=True))
    client.chat.completions.create(**chat_request(seed=5))

    sent = upstream.calls[-1].headers
    assert sent["x-team-token"] == BEARER and sent["authorization"].startswith("Bearer ")
    data = stored_bytes(tmp_path / "rec")
    assert SECRET.encode() not in data
    assert BEARER.encode() not in data
    assert b"test-key-not-a-secret" not in data, "the client's Authorization is never stored"
    assert b'"x-request-id": "req_<redacted>"' in data
