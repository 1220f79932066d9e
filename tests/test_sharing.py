"""Sharing a store (DESIGN §8–§10): Redis across proxies, namespaces, tenants isolated by key,
access tokens and the proxy's own upstream key, Redis going away, and --workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import redis

from cli.main import read_tokens
from proxy import handlers
from proxy.app import HANDLERS
from proxy.errors import ConfigError
from proxy.recording import Recording
from proxy.stores.redis_store import LOCK_PREFIX, RedisStore
from tests.conftest import RunningProxy, StartProxy, status
from tests.fake_upstream import FakeUpstream, chat_request, error_envelope
from tests.redis_server import RedisServer
from tests.servers import free_port

CHAT = "/v1/chat/completions"
# Gives a lock held by ARGV[1] to ARGV[2] for ARGV[3] ms, in one step.
HAND_OVER = """
if redis.call("get", KEYS[1]) == ARGV[1] then
    return redis.call("set", KEYS[1], ARGV[2], "px", ARGV[3])
end
"""


async def asked(proxy: RunningProxy, after: float, api_key: str | None = None) -> int:
    """The status a chat request gets from `proxy`, sent `after` seconds from now."""
    await asyncio.sleep(after)
    async with proxy.async_client(**({"api_key": api_key} if api_key else {})) as client:
        try:
            await client.chat.completions.create(**chat_request())
        except openai.APIStatusError as exc:
            return exc.status_code
    return 200


def test_a_recording_made_by_one_proxy_replays_on_another(
    start_proxy: StartProxy, upstream: FakeUpstream, redis_url: str
) -> None:
    first, second = start_proxy(store=redis_url), start_proxy(store=redis_url)
    body = chat_request()
    recorded = first.client().chat.completions.with_raw_response.create(**body)
    replayed = second.client().chat.completions.with_raw_response.create(**body)
    assert (status(recorded), status(replayed)) == ("recorded", "hit")
    assert replayed.parse().id == recorded.parse().id
    assert upstream.count() == 1


def test_identical_concurrent_misses_on_several_proxies_make_one_upstream_call(
    start_proxy: StartProxy, upstream: FakeUpstream, redis_url: str
) -> None:
    upstream.delay = 0.4
    proxies = [start_proxy(store=redis_url) for _ in range(3)]

    async def ask(proxy: RunningProxy) -> str:
        async with proxy.async_client() as client:
            completion = await client.chat.completions.create(**chat_request())
            return completion.id

    async def everyone() -> list[str]:
        return await asyncio.gather(*(ask(p) for p in proxies for _ in range(3)))

    ids = asyncio.run(everyone())
    assert len(set(ids)) == 1
    assert upstream.count("/chat/completions") == 1


def test_proxies_waiting_on_another_proxys_call_get_its_upstream_timeout(
    start_proxy: StartProxy, upstream: FakeUpstream, redis_url: str
) -> None:
    upstream.hang_next(5)
    leader, waiter = (start_proxy(store=redis_url, upstream_timeout=0.5) for _ in range(2))

    async def ask(proxy: RunningProxy, after: float) -> BaseException | None:
        await asyncio.sleep(after)
        async with proxy.async_client() as client:
            try:
                await client.chat.completions.create(**chat_request())
            except openai.InternalServerError as exc:
                return exc
        return None

    async def both() -> list[BaseException | None]:
        return await asyncio.gather(ask(leader, 0), ask(waiter, 0.2))

    errors = asyncio.run(both())

    # The waiting proxy did not go upstream in its turn once the first call timed out.
    assert upstream.count("/chat/completions") == 1
    assert [getattr(e, "status_code", None) for e in errors] == [504, 504]
    assert [getattr(e, "code", None) for e in errors] == ["upstream_timeout"] * 2
    # Moments later it is a miss like any other: recorded by whichever proxy gets it.
    time.sleep(1.2)
    assert status(waiter.client().chat.completions.with_raw_response.create(**chat_request())) == (
        "recorded"
    )


@pytest.mark.parametrize("code", [429, 500])
def test_proxies_waiting_on_another_proxys_call_get_its_upstream_error(
    code: int, start_proxy: StartProxy, upstream: FakeUpstream, redis_url: str
) -> None:
    # Each waiting proxy used to make the same call in turn once the one before had its error.
    upstream.delay = 0.8
    upstream.fail_next(code, error_envelope(code), headers={"x-request-id": "req_err"}, times=10)
    proxies = [start_proxy(store=redis_url) for _ in range(3)]

    async def ask(client: openai.AsyncOpenAI, after: float) -> tuple[int, str, bytes]:
        await asyncio.sleep(after)
        try:
            await client.chat.completions.create(**chat_request())
        except openai.APIStatusError as exc:
            return exc.status_code, exc.response.headers["x-request-id"], exc.response.content
        raise AssertionError("answered 200")

    async def everyone() -> list[tuple[int, str, bytes]]:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(p.async_client()) for p in proxies]
            return await asyncio.gather(*(ask(c, 0.02 * n) for n, c in enumerate(clients * 2)))

    answers = asyncio.run(everyone())

    assert upstream.count("/chat/completions") == 1
    assert set(answers) == {answers[0]}  # the same answer, verbatim, for every request
    assert answers[0][:2] == (code, "req_err")
    assert proxies[0].recordings() == []


def test_proxies_waiting_on_a_call_whose_answer_cannot_be_recorded_make_theirs_together(
    start_proxy: StartProxy, upstream: FakeUpstream, redis_url: str
) -> None:
    # A load balancer's HTML page with a 200: no recording comes of it, and each waiting proxy
    # took the lock and made the call after the one before.
    upstream.delay = 0.5
    upstream.fail_next(200, "<html>upstream busy</html>", {"content-type": "text/html"}, times=6)
    proxies = [start_proxy(store=redis_url) for _ in range(3)]

    def ask(proxy: RunningProxy, after: float) -> int:
        time.sleep(after)
        return proxy.request("POST", CHAT, chat_request()).status

    async def everyone() -> list[int]:
        return await asyncio.gather(
            *(asyncio.to_thread(ask, p, 0.05 * n) for n, p in enumerate(proxies))
        )

    assert asyncio.run(everyone()) == [200] * 3
    assert upstream.count("/chat/completions") == 3
    assert upstream.peak_concurrency == 2  # the first call, then the two waiters' together
    assert proxies[0].recordings() == []


def test_an_upstream_error_is_posted_with_no_header_a_recording_would_not_keep(
    start_proxy: StartProxy, upstream: FakeUpstream, redis_url: str
) -> None:
    upstream.delay = 0.5
    account = {"openai-organization": "org-private", "x-ratelimit-remaining-requests": "0"}
    upstream.fail_next(429, headers={"x-request-id": "req_err", **account}, times=2)
    leader, waiter = (start_proxy(store=redis_url) for _ in range(2))

    async def ask(proxy: RunningProxy, after: float) -> dict[str, str]:
        await asyncio.sleep(after)
        async with proxy.async_client() as client:
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(**chat_request())
        return dict(caught.value.response.headers)

    async def both() -> list[dict[str, str]]:
        return await asyncio.gather(ask(leader, 0), ask(waiter, 0.1))

    live, posted = asyncio.run(both())

    assert upstream.count("/chat/completions") == 1
    assert live["openai-organization"] == "org-private"
    assert (posted["x-request-id"], posted["retry-after"]) == ("req_err", "0")
    assert not set(account) & set(posted)


def test_a_waiter_gets_what_the_call_it_waited_on_left_though_the_lock_changed_hands(
    start_proxy: StartProxy, upstream: FakeUpstream, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # When the call ends, a third waiting proxy may take the lock only to be served what the
    # call left. A waiter that looked for that just before it was left, and then saw the lock
    # in the third's hands, used to wait on the third and make a call of its own after it.
    upstream.delay = 0.3
    upstream.fail_next(500, error_envelope(500), times=2)
    leader, waiter = (start_proxy(store=redis_url) for _ in range(2))
    leading, waiting = (p.running.app[HANDLERS].store for p in (leader, waiter))
    assert isinstance(leading, RedisStore) and isinstance(waiting, RedisStore)

    async def hand_over(name: str, token: str) -> None:
        # The lock goes straight from the leader to the third proxy, which holds it a while.
        await leading._redis.eval(HAND_OVER, 1, LOCK_PREFIX + name, token, "third", 1000)

    looked = waiting.read_post
    late: list[str] = []

    async def look_too_early(name: str) -> bytes | None:
        posted = await looked(name)
        if posted is None and not late:
            late.append(name)
            await asyncio.sleep(0.5)  # meanwhile the call ends and the lock changes hands
        return posted

    monkeypatch.setattr(leading, "release", hand_over)
    monkeypatch.setattr(waiting, "read_post", look_too_early)

    async def both() -> list[int]:
        return await asyncio.gather(asked(leader, 0), asked(waiter, 0.1))

    assert asyncio.run(both()) == [500, 500]
    assert late  # the waiter did look too early
    assert upstream.count("/chat/completions") == 1


async def test_proxies_waiting_on_a_stream_that_breaks_off_get_its_502(
    start_proxy: StartProxy, upstream: FakeUpstream, redis_url: str
) -> None:
    upstream.chunk_delay = 0.1
    upstream.drop_stream_after(6)
    body = chat_request(seed=21)
    leader, waiter = (start_proxy(store=redis_url) for _ in range(2))

    async def lead(client: openai.AsyncOpenAI) -> None:
        with pytest.raises(openai.APIConnectionError):  # it saw the stream break
            async for _ in await client.chat.completions.create(**body, stream=True):
                pass

    async def wait(client: openai.AsyncOpenAI) -> tuple[int, str | None]:
        await asyncio.sleep(0.15)  # the leader's stream is under way
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(**body, stream=True)
        return failed.value.status_code, failed.value.code

    async with leader.async_client() as first, waiter.async_client() as other:
        _, *waited = await asyncio.gather(lead(first), wait(other), wait(other))

    assert waited == [(502, "upstream_broken")] * 2
    assert upstream.count("/chat/completions") == 1  # they did not each go upstream in turn


def test_an_upstream_error_is_not_shared_with_a_waiter_that_sends_another_api_key(
    start_proxy: StartProxy, upstream: FakeUpstream, redis_url: str
) -> None:
    # Same key, but a 401 comes from what the key leaves out: the waiter makes its own call.
    upstream.delay = 0.3
    upstream.fail_next(401, error_envelope(401, "Incorrect API key provided"))
    leader, waiter = (start_proxy(store=redis_url) for _ in range(2))

    async def both() -> list[int]:
        return await asyncio.gather(asked(leader, 0, "tenant-a"), asked(waiter, 0.1, "tenant-b"))

    assert asyncio.run(both()) == [401, 200]
    assert upstream.count("/chat/completions") == 2


def test_an_upstream_error_that_repeats_the_api_key_is_not_posted_in_the_store(
    start_proxy: StartProxy, upstream: FakeUpstream, redis_url: str
) -> None:
    secret = "sk-" + "proj-0123456789abcdefghij"  # built here: no key-shaped string in git
    upstream.delay = 0.3
    upstream.fail_next(401, error_envelope(401, f"Incorrect API key provided: {secret}"), times=2)
    proxies = [start_proxy(store=redis_url) for _ in range(2)]

    async def both() -> list[int]:
        return await asyncio.gather(asked(proxies[0], 0, secret), asked(proxies[1], 0.1, secret))

    assert asyncio.run(both()) == [401, 401]
    # The waiter made a call of its own rather than read the answer from Redis.
    assert upstream.count("/chat/completions") == 2


def test_a_failure_is_left_only_for_the_requests_that_waited_on_its_call(
    start_proxy: StartProxy, upstream: FakeUpstream, redis_url: str
) -> None:
    # A call that timed out leaves its 504 for a second; a new call for the same key made
    # meanwhile, the upstream healthy again, used to have its waiters answered the old 504.
    proxies = [start_proxy(store=redis_url, upstream_timeout=0.5) for _ in range(3)]
    upstream.hang_next(5)
    assert proxies[0].request("POST", CHAT, chat_request()).status == 504
    upstream.delay = 0.3

    async def ask(client: openai.AsyncOpenAI, after: float) -> str:
        await asyncio.sleep(after)
        return status(await client.chat.completions.with_raw_response.create(**chat_request()))

    async def everyone() -> list[str]:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(p.async_client()) for p in proxies]
            return await asyncio.gather(*(ask(c, 0.05 * (n > 0)) for n, c in enumerate(clients)))

    assert sorted(asyncio.run(everyone())) == ["hit", "hit", "recorded"]
    assert upstream.count("/chat/completions") == 2


def test_a_call_longer_than_the_lock_and_the_read_timeout_is_still_made_once(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stream of about 1.5 s: longer than the fill lock's life (0.3 s here) and than the
    # upstream timeout, which bounds each read, not a whole stream.
    monkeypatch.setattr(handlers, "SHARED_LOCK_TTL_MS", 300)
    upstream.chunk_delay = 0.12
    proxies = [start_proxy(store=redis_url, upstream_timeout=0.5) for _ in range(2)]
    body = chat_request(seed=41)

    async def ask(proxy: RunningProxy, after: float) -> str:
        await asyncio.sleep(after)
        async with proxy.async_client() as client:
            raw = await client.chat.completions.with_raw_response.create(**body, stream=True)
            chunks = [c async for c in raw.parse()]
            return f"{status(raw)} {chunks[0].id}"

    async def everyone() -> list[str]:
        return await asyncio.gather(*(ask(p, 0.1 * n) for n, p in enumerate(proxies * 2)))

    answers = asyncio.run(everyone())

    assert upstream.count("/chat/completions") == 1
    assert sorted(a.split()[0] for a in answers) == ["hit", "hit", "hit", "recorded"]
    assert len({a.split()[1] for a in answers}) == 1


@pytest.mark.parametrize("store", ["disk", "redis"])
def test_no_cache_skips_the_read_on_every_store(
    store: str, start_proxy: StartProxy, upstream: FakeUpstream, request: pytest.FixtureRequest
) -> None:
    # The Redis store used to replay it: its lock holder looked for the recording first.
    options = {"store": request.getfixturevalue("redis_url")} if store == "redis" else {}
    upstream.nondeterministic = True
    client = start_proxy(**options).client()
    first = client.chat.completions.create(**chat_request())
    live = client.chat.completions.with_raw_response.create(
        **chat_request(), extra_headers={"Cache-Control": "no-cache"}
    )

    assert status(live) == "recorded"
    assert live.parse().id != first.id
    assert upstream.count() == 2


@pytest.mark.parametrize("where", ["same proxy", "other proxy"])
async def test_a_no_cache_request_makes_its_own_call_beside_the_one_in_flight(
    where: str, start_proxy: StartProxy, upstream: FakeUpstream, redis_url: str
) -> None:
    upstream.delay = 0.3
    upstream.nondeterministic = True
    first = start_proxy(store=redis_url)
    second = first if where == "same proxy" else start_proxy(store=redis_url)
    async with first.async_client() as one, second.async_client() as other:
        leading = asyncio.create_task(one.chat.completions.create(**chat_request()))
        await asyncio.sleep(0.1)
        own = await other.chat.completions.with_raw_response.create(
            **chat_request(), extra_headers={"Cache-Control": "no-cache"}
        )
        leader = await leading
        replayed = await one.chat.completions.create(**chat_request())

    assert status(own) == "recorded"
    assert own.parse().id != leader.id
    assert upstream.count("/chat/completions") == 2
    assert replayed.id == own.parse().id  # the newest sample


def test_more_concurrent_requests_than_redis_connections_wait_for_one(
    start_proxy: StartProxy, upstream: FakeUpstream, redis_url: str
) -> None:
    # Past the pool's connections a request waits for one to come back, instead of a 503.
    proxy = start_proxy(store=redis_url)
    upstream.delay = 0.2

    async def everyone() -> list[str]:
        async with proxy.async_client() as client:
            calls = [
                client.chat.completions.with_raw_response.create(**chat_request(seed=seed))
                for seed in range(1000, 1250)
            ]
            return [raw.headers["x-seedcache-status"] for raw in await asyncio.gather(*calls)]

    assert asyncio.run(everyone()) == ["recorded"] * 250
    assert upstream.count("/chat/completions") == 250


def test_namespaces_keep_recordings_apart(start_proxy: StartProxy, upstream: FakeUpstream) -> None:
    proxy = start_proxy()
    body = chat_request()
    for namespace in ("team-a", "team-b", "team-a"):
        proxy.client(default_headers={"X-Seedcache-Namespace": namespace}).chat.completions.create(
            **body
        )
    assert upstream.count() == 2
    bad = proxy.request(
        "POST", "/v1/chat/completions", body, headers={"X-Seedcache-Namespace": "../etc"}
    )
    assert bad.status == 400
    assert bad.json()["error"]["code"] == "invalid_namespace"


def test_a_namespaced_base_url_selects_the_namespace(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # For clients that cannot send headers: /_seedcache/ns/<name>/v1 as the base URL.
    proxy = start_proxy()
    body = chat_request()
    statuses = []
    for namespace in ("team-a", "team-b", "team-a"):
        client = proxy.client(base_url=f"{proxy.running.url}/_seedcache/ns/{namespace}/v1")
        raw = client.chat.completions.with_raw_response.create(**body)
        statuses.append(raw.headers["x-seedcache-status"])

    assert statuses == ["recorded", "recorded", "hit"]
    assert upstream.count() == 2
    assert sorted(r.namespace for r in proxy.recordings()) == ["team-a", "team-b"]


def test_tenants_isolated_by_key_never_see_each_others_recordings(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    store = str(tmp_path / "shared")
    proxy = start_proxy(store=store, isolate_by_key=True)
    body = chat_request()
    a = proxy.client(api_key="tenant-a-key")
    b = proxy.client(api_key="tenant-b-key")
    assert status(a.chat.completions.with_raw_response.create(**body)) == "recorded"
    assert status(b.chat.completions.with_raw_response.create(**body)) == "recorded"
    assert status(a.chat.completions.with_raw_response.create(**body)) == "hit"
    assert upstream.count() == 2
    proxy.stop()

    # Offline, tenant C has nothing recorded and is never served A's or B's recording.
    replay = start_proxy(store=store, isolate_by_key=True, mode="replay")
    c = replay.client(api_key="tenant-c-key")
    with pytest.raises(openai.NotFoundError) as missed:
        c.chat.completions.create(**body)
    # Nor told where another tenant keeps the very same request.
    assert "recorded in namespace" not in str(missed.value)
    assert "No recording has the same method, path and model" in str(missed.value)
    a = replay.client(api_key="tenant-a-key")
    assert status(a.chat.completions.with_raw_response.create(**body)) == "hit"


@pytest.mark.parametrize("first", ["old proxy", "new proxy"])
def test_proxies_agree_on_the_isolation_salt_again_after_redis_lost_it(
    first: str,
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    own_redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each proxy read the salt once: after Redis restarted empty, one started since added
    # another, and the same tenant's request was keyed into two namespaces until a restart.
    monkeypatch.setattr(handlers, "SALT_TTL", 0.2)
    old = start_proxy(store=own_redis_server.url(), isolate_by_key=True)
    old.client(api_key="tenant-a-key").chat.completions.create(**chat_request(seed=1))
    own_redis_server.stop()
    own_redis_server.start()  # empty: no persistence
    new = start_proxy(store=own_redis_server.url(), isolate_by_key=True)
    time.sleep(0.3)  # the old proxy's salt is due to be read again

    asked = [old, new] if first == "old proxy" else [new, old]
    raws = [
        p.client(api_key="tenant-a-key").chat.completions.with_raw_response.create(**chat_request())
        for p in asked
    ]

    assert [status(raw) for raw in raws] == ["recorded", "hit"]
    assert raws[0].headers["x-seedcache-key"] == raws[1].headers["x-seedcache-key"]
    assert upstream.count("/chat/completions") == 2  # seed 1 before the restart, and this once


def test_a_local_stores_isolation_salt_is_read_once(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a store shared by several proxies is asked again (above): a local one keeps its data.
    monkeypatch.setattr(handlers, "SALT_TTL", 0.0)
    store = tmp_path / "rec"
    client = start_proxy(store=f"files:{store}", isolate_by_key=True).client(api_key="tenant-a")
    client.chat.completions.create(**chat_request())
    (store / ".seedcache-meta.json").write_text('{"isolation-salt": "another"}')

    assert status(client.chat.completions.with_raw_response.create(**chat_request())) == "hit"
    assert upstream.count() == 1


def test_access_tokens_and_the_proxys_own_upstream_key(
    start_proxy: StartProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEEDCACHE_TEST_UPSTREAM_KEY", "upstream-only-key")
    proxy = start_proxy(
        access_tokens=("team-token-1", "team-token-2"),
        upstream_api_key_env="SEEDCACHE_TEST_UPSTREAM_KEY",
    )
    with pytest.raises(openai.AuthenticationError) as refused:
        proxy.client().chat.completions.create(**chat_request())
    assert "access token" in str(refused.value)
    assert upstream.count() == 0

    member = proxy.client(api_key="team-token-2")
    assert member.chat.completions.create(**chat_request()).choices[0].message.content
    assert upstream.last.headers["authorization"] == "Bearer upstream-only-key"
    assert proxy.request("GET", "/_seedcache/health").status == 200
    assert proxy.request("GET", "/_seedcache/stats").status == 401
    token = {"Authorization": "Bearer team-token-1"}
    assert proxy.request("GET", "/_seedcache/stats", headers=token).json()["recorded"] == 1


def test_redis_going_away_gives_a_clear_503_and_the_proxy_recovers(
    start_proxy: StartProxy, upstream: FakeUpstream, own_redis_server: RedisServer
) -> None:
    proxy = start_proxy(store=own_redis_server.url())
    client = proxy.client()
    client.chat.completions.create(**chat_request())
    own_redis_server.stop()
    with pytest.raises(openai.APIStatusError) as down:
        client.chat.completions.create(**chat_request())
    assert down.value.status_code == 503
    assert "cannot reach Redis" in str(down.value)
    health = proxy.request("GET", "/_seedcache/health")  # what compose's health check asks
    assert (health.status, health.json()["status"]) == (503, "store_unavailable")
    own_redis_server.start()
    raw = client.chat.completions.with_raw_response.create(**chat_request(seed=9))
    assert status(raw) == "recorded"
    assert proxy.request("GET", "/_seedcache/health").json()["status"] == "ok"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_store_that_fails_while_the_upstream_answers_still_gives_the_answer(
    stream: bool, start_proxy: StartProxy, upstream: FakeUpstream, own_redis_server: RedisServer
) -> None:
    # A 503 would lose an answer already paid for, and make the SDK pay again when it retries.
    proxy = start_proxy(store=own_redis_server.url())
    upstream.delay = 0.5
    body = chat_request(seed=43)

    def stop_redis_once_upstream() -> None:
        deadline = time.monotonic() + 10
        while upstream.count() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        own_redis_server.stop()

    stopper = threading.Thread(target=stop_redis_once_upstream)
    stopper.start()
    try:
        result = proxy.request("POST", CHAT, {**body, "stream": stream})
    finally:
        stopper.join()
        own_redis_server.start()

    assert result.status == 200
    assert result.headers["x-seedcache-status"] == ("recorded" if stream else "miss")
    expected = upstream.chat_completion(body)
    if stream:
        assert result.body.endswith(b"data: [DONE]\n\n")  # whole, and the body was ended
    else:
        assert result.json()["id"] == expected["id"]
    assert proxy.stats()["misses"] == 1  # not recorded, and counted so
    assert upstream.count() == 1


def test_proxies_recording_into_one_files_directory_at_once_lose_nothing(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    store = f"files:{tmp_path / 'recordings'}"
    proxies = [start_proxy(store=store, mode="record") for _ in range(3)]
    upstream.nondeterministic = True

    async def record(proxy: RunningProxy, seed: int) -> None:
        async with proxy.async_client() as client:
            await client.chat.completions.create(**chat_request(seed=seed))

    async def everyone() -> None:
        # Every proxy records seeds 0-9: each key gets 3 samples written concurrently.
        await asyncio.gather(*(record(p, seed) for p in proxies for seed in range(10)))

    asyncio.run(everyone())
    files = sorted((tmp_path / "recordings").glob("[0-9a-f]*.json"))
    assert len(files) == 10
    for path in files:
        recording = Recording.loads(path.read_bytes())
        assert len(recording.samples) == 3


def test_workers_serve_one_port_from_several_processes(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    port = free_port()
    # Made before the server starts: nothing that can fail stands between its start and the try.
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
    env = {**os.environ, "SEEDCACHE_ACCESS_LOG": "false"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from cli.main import main; main()",
            "serve",
            "--workers",
            "2",
            "--port",
            str(port),
            "--upstream",
            upstream.base_url,
            "--store",
            f"files:{tmp_path / 'rec'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert process.stdout is not None
        assert "2 workers" in process.stdout.readline()
        deadline = time.monotonic() + 20
        while True:
            try:
                first = client.chat.completions.with_raw_response.create(**chat_request())
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        statuses = [status(first)] + [
            status(client.chat.completions.with_raw_response.create(**chat_request()))
            for _ in range(10)
        ]
        assert statuses == ["recorded"] + ["hit"] * 10
        children = subprocess.run(
            ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) >= 2
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_seedcache/health") as answer:
            assert json.load(answer)["status"] == "ok"
    finally:
        client.close()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_access_tokens_from_a_file_and_the_environment(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha\n\n  beta  \n")
    assert read_tokens(("@" + str(tokens), "gamma")) == ("alpha", "beta", "gamma")
    with pytest.raises(ConfigError, match="cannot read access tokens"):
        read_tokens(("@" + str(tmp_path / "missing"),))


def test_isolation_by_key_needs_a_key(start_proxy: StartProxy, upstream: FakeUpstream) -> None:
    proxy = start_proxy(isolate_by_key=True)
    answer = proxy.request(
        "POST", "/v1/chat/completions", chat_request(), headers={"Authorization": ""}
    )
    assert answer.status == 401
    assert answer.json()["error"]["code"] == "missing_api_key"
    assert upstream.count() == 0


@pytest.mark.parametrize("listing", ["/_seedcache/recordings", "/_seedcache/audit"])
def test_isolated_tenants_cannot_list_each_others_recordings(
    listing: str, start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(isolate_by_key=True)
    proxy.request("POST", "/v1/chat/completions", chat_request())  # tenant A's recording

    answer = proxy.request("GET", listing, headers={"Authorization": "Bearer tenant-b"})

    assert answer.status == 403
    assert answer.json()["error"]["code"] == "isolated_by_key"
    assert b"gpt-4o-mini" not in answer.body
    assert proxy.request("GET", "/_seedcache/health").status == 200


async def test_a_tenants_first_requests_arriving_together_share_one_salt(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # Each used to read, set and read the salt on its own: some hashed the tenant with a salt
    # that lost, and their recordings were never found again.
    proxy = start_proxy(isolate_by_key=True, store=f"files:{tmp_path / 'rec'}")
    bodies = [chat_request(seed=n) for n in range(16)]
    async with proxy.async_client() as client:

        async def ask_all() -> list[str]:
            raws = await asyncio.gather(
                *(client.chat.completions.with_raw_response.create(**b) for b in bodies)
            )
            return [status(raw) for raw in raws]

        first, again = await ask_all(), await ask_all()

    assert first == ["recorded"] * 16
    assert again == ["hit"] * 16
    assert upstream.count() == 16


def test_a_full_redis_answers_a_miss_live_and_unrecorded_rather_than_with_a_503(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    own_redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # At its maxmemory under noeviction, Redis refuses the fill lock as it refuses any write,
    # and every miss was a 503 while replays went on: answered as on a disk that cannot grow.
    proxy = start_proxy(store=own_redis_server.url())
    admin = redis.Redis.from_url(own_redis_server.url())
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")
    try:
        with proxy.client() as client:
            first = client.chat.completions.with_raw_response.create(**chat_request(seed=5))
            again = client.chat.completions.with_raw_response.create(**chat_request(seed=5))
    finally:
        admin.config_set("maxmemory", "0")
        admin.close()

    assert (first.status_code, status(first)) == (200, "miss")
    assert first.parse().id == upstream.chat_completion(chat_request(seed=5))["id"]
    assert status(again) == "miss"  # nothing was recorded to replay
    assert upstream.count() == 2
    assert proxy.recordings() == []
    # Each kind of failure once in a while, not once per request.
    said = [r.getMessage() for r in caplog.records]
    assert sum("not coalescing across proxies" in line for line in said) == 1
    assert sum(line.startswith("not recording") and "is full" in line for line in said) == 1
    # Redis takes writes again: recorded (how many answers went unrecorded is said once the
    # failures have stopped for a while, or when the proxy stops: tests/test_record.py).
    with proxy.client() as client:
        recorded = client.chat.completions.with_raw_response.create(**chat_request(seed=5))
    assert status(recorded) == "recorded"
