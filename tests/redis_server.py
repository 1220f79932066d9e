"""A real redis-server for tests, on a free loopback port in a temp dir, and fixtures that use it.

Without the binary the fixtures skip, unless SEEDCACHE_REQUIRE_REDIS=1 (CI) makes that a failure.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.servers import free_port

REDIS_SERVER = shutil.which("redis-server")
# Databases a server is started with; tests take them in turn and flush the one they get.
DATABASES = 16


def require_redis_server() -> str:
    """The redis-server binary, or skip (fail when SEEDCACHE_REQUIRE_REDIS=1)."""
    if REDIS_SERVER is not None:
        return REDIS_SERVER
    if os.environ.get("SEEDCACHE_REQUIRE_REDIS") == "1":
        pytest.fail("SEEDCACHE_REQUIRE_REDIS=1 but redis-server is not on PATH")
    pytest.skip(
        "redis-server is not installed (apt-get install redis-server); "
        "set SEEDCACHE_REQUIRE_REDIS=1 to make this a failure"
    )


class RedisServer:
    """One redis-server process; `stop()` and `start()` again keep its port."""

    def __init__(self, directory: Path, *, persist: bool = False) -> None:
        self.directory = directory
        self.persist = persist
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    @property
    def socket(self) -> str:
        """Its unix socket, at a short path (the tests' directories can pass the length limit)."""
        return f"/tmp/seedcache-test-redis-{self.port}.sock"

    def start(self) -> None:
        """Start on the port used before, or on a free one (retrying if it is taken meanwhile)."""
        if self.port:
            self._launch()
            return
        for _ in range(5):
            self.port = free_port()
            try:
                self._launch()
                return
            except RuntimeError:
                continue
        raise RuntimeError(f"redis-server did not start; see {self._log}")

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def ping(self) -> bool:
        """True when the server answers PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def _log(self) -> Path:
        return self.directory / "redis.log"

    def _launch(self) -> None:
        binary = require_redis_server()
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persist
            else ["--save", "", "--appendonly", "no"]
        )
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--databases", str(DATABASES),
            "--daemonize", "no",
            "--unixsocket", self.socket,
            "--unixsocketperm", "700",
            "--loglevel", "warning",
            *persistence,
        ]  # fmt: skip
        with self._log.open("ab") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {process.returncode}; see {self._log}"
                )
            if self.ping():
                self._process = process
                return
            time.sleep(0.02)
        process.kill()
        process.wait()
        raise RuntimeError(f"redis-server did not answer PING within 10 s; see {self._log}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session."""
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


_databases = itertools.cycle(range(1, DATABASES))


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of an empty database on the session's server (db 0 is left for manual use)."""
    url = redis_server.url(next(_databases))
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server only this test uses, so it may stop and restart it."""
    require_redis_server()
    server = RedisServer(tmp_path / "redis")
    server.directory.mkdir()
    server.start()
    yield server
    server.stop()
