"""No secrets in recordings (DESIGN §10): API-key shaped strings are redacted before any write,
and the key is computed before redaction so the request still matches."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from proxy.app import AccessLog, create_app
from proxy.config import Config
from tests.conftest import RunningProxy, StartProxy, status
from tests.fake_upstream import FakeUpstream, chat_request, completion, responses_request
from tests.servers import BackgroundLoop

# Built at run time so that no key-shaped string is committed.
SECRET = "sk-" + "proj-" + "A1b2C3d4" * 6
BEARER = "Bearer " + "eyJ" + "x9Y8z7W6" * 5
# A Google-style key: not sk- shaped, so only the name of its query parameter says what it is.
QUERY_KEY = "AIza" + "SyD9tSrke72PouQMnMX" + "a7eZSW0jkFMBWY"
CHAT = "/v1/chat/completions"


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


def test_keys_the_upstream_echoes_back_never_reach_the_store(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # The Responses API repeats `instructions` and `metadata`; chat repeats `metadata`.
    proxy = start_proxy(store=f"files:{tmp_path / 'rec'}")
    lower_bearer = "bearer " + "x9Y8z7W6" * 3
    with proxy.client() as client:
        live = client.responses.create(
            **responses_request(instructions=f"Use {SECRET}", metadata={"token": lower_bearer})
        )
        list(client.responses.create(**responses_request(metadata={"k": SECRET}), stream=True))
        client.chat.completions.create(**chat_request(metadata={"k": SECRET}))
        list(
            client.chat.completions.create(
                **chat_request(seed=9, metadata={"k": SECRET}), stream=True
            )
        )
        client.chat.completions.create(**chat_request(seed=8, extra_body={"x": {SECRET: 1}}))
        replayed = client.responses.create(
            **responses_request(instructions=f"Use {SECRET}", metadata={"token": lower_bearer})
        )

    assert live.instructions == f"Use {SECRET}"  # the client gets the live answer as sent
    assert replayed.instructions == "Use <redacted>"  # a replay, what was stored
    data = stored_bytes(tmp_path / "rec")
    assert SECRET.encode() not in data
    assert lower_bearer.encode() not in data
    assert len(proxy.recordings()) == 5


def test_a_key_in_the_query_string_is_not_stored(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = start_proxy(store=f"files:{tmp_path / 'rec'}")

    first = proxy.request("POST", f"/v1/chat/completions?api_key={SECRET}", chat_request())
    again = proxy.request("POST", f"/v1/chat/completions?api_key={SECRET}", chat_request())

    assert first.headers["x-seedcache-status"] == "recorded"
    assert again.headers["x-seedcache-status"] == "hit"
    assert upstream.last.path.endswith(SECRET)
    assert SECRET.encode() not in stored_bytes(tmp_path / "rec")
    assert proxy.recordings()[0].path == "/v1/chat/completions?api_key=<redacted>"


def test_what_the_model_says_is_replayed_as_it_was_said(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # Prose about bearer tokens and an example key in an answer are not the request's secrets.
    example_token, example_key = "x9Y8z7W6" * 3, "sk-" + "example" * 3
    said = f"Use Bearer authentication, as in Bearer {example_token}; keys look like {example_key}."
    upstream.fail_next(200, completion(said))
    proxy = start_proxy(store=f"files:{tmp_path / 'rec'}")
    asked = chat_request(messages=[{"role": "user", "content": "Explain Bearer authentication"}])
    with proxy.client() as client:
        live = client.chat.completions.with_raw_response.create(**asked)
        replayed = client.chat.completions.with_raw_response.create(**asked)

    assert (live.headers["x-seedcache-status"], replayed.headers["x-seedcache-status"]) == (
        "recorded",
        "hit",
    )
    assert live.parse().choices[0].message.content == said
    assert replayed.parse().choices[0].message.content == said
    assert proxy.recordings()[0].body["messages"][0]["content"] == "Explain Bearer authentication"


def test_an_answer_repeating_the_client_key_keeps_a_placeholder_and_loses_a_real_key(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # Local servers take any key: `anything` is a word the model may say, SECRET is a key.
    proxy = start_proxy(store=f"files:{tmp_path / 'rec'}")
    hf_like = "hf_" + "AbCdEfGhIj" * 4  # letters only, long
    short = "k3y" + "x9" * 3  # 9 characters, a digit
    secrets = (SECRET, hf_like, short)
    cases = [("anything", 1), ("lm-studio", 2), ("sk-no-key-required", 4), (SECRET, 3)]
    for key, seed in [*cases, (hf_like, 5), (short, 6)]:
        said = f"You can ask me {key} about Mars."
        upstream.fail_next(200, completion(said))
        with proxy.client(api_key=key) as client:
            live = client.chat.completions.with_raw_response.create(**chat_request(seed=seed))
            replayed = client.chat.completions.with_raw_response.create(**chat_request(seed=seed))
        assert (live.headers["x-seedcache-status"], replayed.headers["x-seedcache-status"]) == (
            "recorded",
            "hit",
        )
        assert live.parse().choices[0].message.content == said
        expected = "You can ask me <redacted> about Mars." if key in secrets else said
        assert replayed.parse().choices[0].message.content == expected
    stored = stored_bytes(tmp_path / "rec")
    assert not any(secret.encode() in stored for secret in secrets)


def test_a_miss_never_repeats_a_key_in_the_query_string(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    store = f"files:{tmp_path / 'rec'}"
    start_proxy(store=store).request(
        "POST", f"/v1/chat/completions?api_key={SECRET}", chat_request()
    )
    replay = start_proxy(store=store, mode="replay")

    missed = replay.request("POST", f"/v1/chat/completions?api_key={SECRET}", chat_request(seed=7))

    message = missed.json()["error"]["message"]
    assert missed.status == 404
    assert SECRET not in message
    assert "?api_key=<redacted>" in message
    assert "differs at" in message and "seed" in message  # the nearest one is found


@pytest.mark.parametrize("name", ["key", "api_key", "api-key", "access_token", "sig"])
def test_a_credential_in_the_query_string_of_any_shape_is_not_stored_logged_or_shown(
    name: str,
    loop: BackgroundLoop,
    upstream: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    store = f"files:{tmp_path / 'rec'}"
    config = Config.build(upstream=upstream.url + "/v1", store=store)
    access_log = logging.getLogger("seedcache.access")
    running = loop.start_app(create_app(config), access_log=access_log, access_log_class=AccessLog)
    proxy = RunningProxy(running, config, loop)
    path = f"{CHAT}?{name}={QUERY_KEY}&api-version=1"
    try:
        first = proxy.request("POST", path, chat_request())
        again = proxy.request("POST", path, chat_request())
        other = proxy.request("POST", path.replace(QUERY_KEY, "another-key-0001"), chat_request())
        missed = proxy.request(
            "POST", path, chat_request(seed=7), headers={"X-Seedcache-Mode": "replay"}
        )
        listing = proxy.request("GET", "/_seedcache/recordings").json()
        deadline = time.monotonic() + 5
        while len(access_lines(caplog)) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proxy.stop()
    listed = CliRunner().invoke(main, ["ls", "--store", store])

    assert [status(r) for r in (first, again, other)] == ["recorded", "hit", "recorded"]
    # The key is made from the request as sent: another credential, another recording.
    assert other.headers["x-seedcache-key"] != first.headers["x-seedcache-key"]
    assert upstream.calls[0].path == path
    shown = f"{CHAT}?{name}=<redacted>&api-version=1"
    assert QUERY_KEY.encode() not in stored_bytes(tmp_path / "rec")
    assert [r.path for r in proxy.recordings()] == [shown, shown]
    message = missed.json()["error"]["message"]
    assert missed.status == 404 and shown in message and "differs at" in message
    assert len(access_lines(caplog)) == 5
    assert all(shown in line for line in access_lines(caplog)[:4])
    assert not [r for r in caplog.records if QUERY_KEY in r.getMessage()]
    assert QUERY_KEY not in json.dumps(listing) + message
    assert listed.exit_code == 0 and shown in listed.output
    assert QUERY_KEY not in listed.output


def test_a_recording_made_with_the_credential_in_its_path_is_shown_and_explained_without_it(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # What a seedcache before this one stored: the path as sent.
    store = f"files:{tmp_path / 'rec'}"
    path = f"{CHAT}?key={QUERY_KEY}"
    key = start_proxy(store=store).request("POST", path, chat_request()).headers["x-seedcache-key"]
    stored = tmp_path / "rec" / f"{key}.json"
    data = json.loads(stored.read_text())
    data["request"]["path"] = path
    stored.write_text(json.dumps(data))
    replay = start_proxy(store=store, mode="replay")

    hit = replay.request("POST", path, chat_request())
    missed = replay.request("POST", path, chat_request(seed=7))
    listing = replay.request("GET", "/_seedcache/recordings").json()
    runner = CliRunner()
    listed = runner.invoke(main, ["ls", "--store", store, "--path", path])
    as_json = runner.invoke(main, ["ls", "--store", store, "--json"])
    removed = runner.invoke(main, ["rm", "--store", store, key[:12]])

    assert status(hit) == "hit"
    message = missed.json()["error"]["message"]
    assert missed.status == 404 and "differs at" in message  # the nearest one is still found
    assert listing["recordings"][0]["path"] == f"{CHAT}?key=<redacted>"
    assert f"{CHAT}?key=<redacted>" in listed.output  # --path finds it, given as sent
    assert removed.exit_code == 0 and f"{CHAT}?key=<redacted>" in removed.output
    for shown in (message, json.dumps(listing), listed.output, as_json.output, removed.output):
        assert QUERY_KEY not in shown


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "seedcache.access"]
