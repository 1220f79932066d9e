"""Real servers for tests: an event loop in a background thread that runs aiohttp apps on loopback.

Test code stays synchronous (the sync `openai` client blocks) while the servers it talks to keep
running on their own loop. What the apps do is left to `fake_upstream` and the proxy.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (prefer binding port 0 where possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RunningApp:
    """An aiohttp app served by a `BackgroundLoop` on a real port."""

    def __init__(
        self,
        owner: BackgroundLoop,
        app: web.Application,
        runner: web.AppRunner,
        host: str,
        port: int,
    ) -> None:
        self.app = app
        self.runner = runner
        self.host = host
        self.port = port
        self._owner = owner
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and clean the runner up (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._owner._forget(self)
        self._owner.run(self.runner.cleanup())

    def __repr__(self) -> str:
        return f"<RunningApp {self.url}{' stopped' if self._stopped else ''}>"


class BackgroundLoop:
    """An asyncio event loop running forever in a daemon thread, driven from the test thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._apps: list[RunningApp] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(
            target=self._serve, name="test-background-loop", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30) -> T:
        """Run `coro` on the loop from another thread and return its result."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("BackgroundLoop.run() called from its own thread would deadlock")
        if self._closed:
            coro.close()
            raise RuntimeError("BackgroundLoop is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def start_app(
        self,
        app: web.Application,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        shutdown_timeout: float = 1.0,
        **runner_kwargs: Any,
    ) -> RunningApp:
        """Serve `app` on `host:port` (port 0: any free port, read back from the socket)."""

        async def start() -> RunningApp:
            # A short shutdown_timeout: a test that leaves a request hanging must not make
            # stop() wait aiohttp's default 60 s for it.
            runner = web.AppRunner(
                app, shutdown_timeout=shutdown_timeout, **{"access_log": None, **runner_kwargs}
            )
            await runner.setup()
            try:
                site = web.TCPSite(runner, host, port)
                await site.start()
            except BaseException:
                await runner.cleanup()
                raise
            bound_port = int(runner.addresses[0][1])
            return RunningApp(self, app, runner, host, bound_port)

        running = self.run(start())
        with self._lock:
            self._apps.append(running)
        return running

    def _forget(self, running: RunningApp) -> None:
        with self._lock:
            if running in self._apps:
                self._apps.remove(running)

    def close(self) -> None:
        """Stop every app still running, then the loop; join the thread (idempotent)."""
        if self._closed:
            return
        with self._lock:
            apps = list(self._apps)
        for running in reversed(apps):
            running.stop()
        self.run(self._drain())
        self._closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    async def _drain(self) -> None:
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.loop.shutdown_asyncgens()
        await self.loop.shutdown_default_executor()

    def __enter__(self) -> BackgroundLoop:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
