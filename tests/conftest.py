"""Shared fixtures: a background loop, the fake upstream, and proxies on real ports."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.app import create_app
from proxy.config import Config
from proxy.recording import Recording
from proxy.stores.base import open_store
from tests.fake_upstream import FakeUpstream
from tests.servers import BackgroundLoop, RunningApp

pytest_plugins = ["tests.redis_server"]

API_KEY = "test-key-not-a-secret"


@dataclass
class HTTPResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RunningProxy:
    """A seedcache app served on a real loopback port."""

    running: RunningApp
    config: Config
    loop: BackgroundLoop
    # The sync clients handed out, closed with the proxy: an unclosed one's socket warns when
    # the garbage collector finds it, in whichever test runs then.
    clients: list[openai.OpenAI] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        """What a user puts in OPENAI_BASE_URL."""
        return self.running.url + "/v1"

    def client(self, **options: Any) -> openai.OpenAI:
        options.setdefault("max_retries", 0)
        options.setdefault("api_key", API_KEY)
        options.setdefault("base_url", self.base_url)
        client = openai.OpenAI(**options)
        self.clients.append(client)
        return client

    def async_client(self, **options: Any) -> openai.AsyncOpenAI:
        options.setdefault("max_retries", 0)
        options.setdefault("api_key", API_KEY)
        return openai.AsyncOpenAI(base_url=self.base_url, **options)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> HTTPResult:
        """A raw HTTP request, for what the SDK would never send."""
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.running.port, timeout=30)
        try:
            conn.request(
                method,
                path,
                body=body,
                headers={"Authorization": f"Bearer {API_KEY}", **(headers or {})},
            )
            response = conn.getresponse()
            return HTTPResult(
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            conn.close()

    def recordings(self) -> list[Recording]:
        """Every recording in the proxy's store, read through a store of the same kind."""

        async def scan() -> list[Recording]:
            store = open_store(self.config.store)
            try:
                return [Recording.loads(value) async for _, _, value in store.scan()]
            finally:
                await store.close()

        return self.loop.run(scan())

    def events(self) -> list[dict[str, Any]]:
        """The audit events in the proxy's store, oldest first."""

        async def read() -> list[dict[str, Any]]:
            store = open_store(self.config.store)
            try:
                return [json.loads(line) async for line in store.events()]
            finally:
                await store.close()

        return self.loop.run(read())

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/_seedcache/stats").json()
        return result

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.running.stop()


@pytest.fixture(scope="session")
def loop() -> Iterator[BackgroundLoop]:
    background = BackgroundLoop()
    yield background
    background.close()


@pytest.fixture
def upstream(loop: BackgroundLoop) -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    running = loop.start_app(fake.app)
    fake.url = running.url
    yield fake
    running.stop()


StartProxy = Callable[..., RunningProxy]


def raw_stream(
    port: int,
    body: dict[str, Any],
    *,
    until: bytes | None = None,
    version: str = "1.1",
    headers: str = "",
) -> bytes:
    """A streaming chat request on a raw socket: what arrives until `until` is seen (then the
    client hangs up) or, without it, until the server closes the connection."""
    payload = json.dumps({**body, "stream": True}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/{version}\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n{headers}\r\n"
    )
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + payload)
        while until is None or until not in received:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    return received


def status(raw: Any) -> str:
    """The X-Seedcache-Status of an SDK raw response."""
    return str(raw.headers["x-seedcache-status"])


@pytest.fixture
def start_proxy(
    loop: BackgroundLoop, upstream: FakeUpstream, tmp_path: Path
) -> Iterator[StartProxy]:
    """Start a proxy in front of the fake upstream; options override the Config defaults."""
    started: list[RunningProxy] = []

    def start(**options: Any) -> RunningProxy:
        options.setdefault("upstream", upstream.url + "/v1")
        options.setdefault("store", str(tmp_path / "store"))
        config = Config.build(**options)
        running = loop.start_app(create_app(config))
        proxy = RunningProxy(running, config, loop)
        started.append(proxy)
        return proxy

    yield start
    for proxy in reversed(started):
        proxy.stop()


@pytest.fixture
def proxy(start_proxy: StartProxy) -> RunningProxy:
    """A proxy in the default mode (auto) on a fresh disk store."""
    return start_proxy()
