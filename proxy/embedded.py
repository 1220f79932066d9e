"""A proxy running in a background thread of the current process, for the pytest plugin and
for programs that want seedcache without a separate server.

It owns a private event loop, so synchronous code (the sync `openai` client) can call it freely.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from proxy.app import HANDLERS, create_app
from proxy.config import Config
from proxy.handlers import Handlers


class EmbeddedProxy:
    """Start with `start()`, stop with `stop()`; `base_url` is what OPENAI_BASE_URL should be."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="seedcache", daemon=True
        )
        self._runner: web.AppRunner | None = None
        self._app: web.Application | None = None
        # Responses the proxy has started to send, errors included: whether anything reached it.
        self.requests = 0

    @property
    def url(self) -> str:
        """The server's root URL."""
        return f"http://{self.config.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The URL to give the openai SDK (with /v1)."""
        return self.url + "/v1"

    @property
    def handlers(self) -> Handlers:
        """The running proxy's state: metrics, the store, the keys it used."""
        assert self._app is not None, "the proxy is not running"
        return self._app[HANDLERS]

    def start(self) -> EmbeddedProxy:
        """Open the store, bind a port (the configured one; 0 picks a free one) and serve."""
        self._thread.start()
        try:
            self._run(self._start())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop serving, close the store, and end the thread."""
        if self._runner is not None:
            self._run(self._runner.cleanup())
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the proxy's loop (to read its store, say) and return its result."""
        return self._run(coro, timeout)

    async def _start(self) -> None:
        self._app = create_app(self.config)
        self._app.on_response_prepare.append(self._count)
        self._runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        self._app[HANDLERS].used = set()  # for SeedcacheSession.unused()
        self._app[HANDLERS].unreadable = set()  # for the plugin's --seedcache-fail-on-miss
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _count(self, request: web.Request, response: web.StreamResponse) -> None:
        self.requests += 1

    def _run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> EmbeddedProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
