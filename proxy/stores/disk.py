"""The default store: a diskcache directory with eviction off (recordings are an archive).

Reads run on the event loop: SQLite in WAL mode never makes a reader wait for a writer, so a read
costs one indexed lookup. Writes take a transaction and may wait on other writers, so they run in
one writer thread, updates that arrive together share one transaction, and a short SQLite timeout
turns a stuck lock into an error instead of a stall.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import diskcache

from proxy.errors import StoreError
from proxy.stores.base import Updater

T = TypeVar("T")

_RECORDING = "rec:"
_META = "meta:"
_EVENTS = "audit"
_SCAN_BATCH = 256


class DiskStore:
    """Recordings in a local diskcache directory."""

    pretty = False

    def __init__(self, directory: str, *, timeout: float = 2.0) -> None:
        self.description = directory
        # One writer thread: SQLite serialises writers anyway, and threads taking turns at the
        # write lock (and the GIL) cost more than the writes themselves.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seedcache-disk")
        self._pending: list[tuple[str, Updater, asyncio.Future[bytes | None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        try:
            # Recordings are an archive: eviction off, and cull_limit=0 so that writes never look
            # for entries to cull.
            self._cache = diskcache.Cache(
                directory, eviction_policy="none", cull_limit=0, timeout=timeout
            )
        except (OSError, diskcache.Timeout) as exc:
            raise StoreError(f"cannot open the disk store at {directory!r}: {exc}") from None

    async def get(self, namespace: str, key: str) -> bytes | None:
        return self._call(self._cache.get, _RECORDING + key)  # type: ignore[no-any-return]

    async def update(self, namespace: str, key: str, fn: Updater) -> bytes | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes | None] = loop.create_future()
        self._pending.append((_RECORDING + key, fn, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return await future

    async def put(self, namespace: str, key: str, value: bytes) -> None:
        await self._off_loop(self._cache.set, _RECORDING + key, value)

    async def delete(self, namespace: str, key: str) -> bool:
        return bool(await self._off_loop(self._cache.delete, _RECORDING + key))

    async def scan(self) -> AsyncIterator[tuple[str, str, bytes]]:
        names = await self._off_loop(self._names, _RECORDING)
        # Values are read in batches, one worker-thread hop per batch rather than per value.
        for start in range(0, len(names), _SCAN_BATCH):
            batch = names[start : start + _SCAN_BATCH]
            values = await self._off_loop(lambda b=batch: [self._cache.get(n) for n in b])
            for name, value in zip(batch, values, strict=True):
                if value is not None:
                    yield "", name[len(_RECORDING) :], value

    async def get_meta(self, name: str) -> str | None:
        return self._call(self._cache.get, _META + name)  # type: ignore[no-any-return]

    async def set_meta(self, name: str, value: str) -> None:
        await self._off_loop(self._cache.set, _META + name, value)

    async def append_event(self, event: bytes) -> None:
        await self._off_loop(self._cache.push, event, prefix=_EVENTS)

    async def events(self) -> AsyncIterator[bytes]:
        names = await self._off_loop(self._names, _EVENTS + "-")
        for start in range(0, len(names), _SCAN_BATCH):
            batch = names[start : start + _SCAN_BATCH]
            for value in await self._off_loop(lambda b=batch: [self._cache.get(n) for n in b]):
                if value is not None:
                    yield value

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        self._writer.shutdown(wait=True)
        self._cache.close()

    async def _flush(self) -> None:
        """Apply the updates waiting, each batch in one transaction, until none are left."""
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await self._off_loop(self._apply, batch)
            except StoreError as exc:
                results = [exc] * len(batch)
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue  # the caller was cancelled
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _apply(self, batch: list[tuple[str, Updater, Any]]) -> list[bytes | BaseException | None]:
        results: list[bytes | BaseException | None] = []
        with self._cache.transact():
            for name, fn, _ in batch:
                try:
                    old = self._cache.get(name)
                    new = fn(old)
                    if new is not None:
                        self._cache.set(name, new)
                    results.append(new if new is not None else old)
                except Exception as exc:  # one caller's failure is that caller's alone
                    results.append(exc)
        return results

    def _names(self, prefix: str) -> list[str]:
        # iterkeys() walks the index in key order: events ("audit-<n>") come out oldest first.
        return [n for n in self._cache.iterkeys() if isinstance(n, str) and n.startswith(prefix)]

    def _call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except diskcache.Timeout:
            raise StoreError(f"the disk store at {self.description!r} is locked") from None
        except OSError as exc:
            raise StoreError(f"the disk store at {self.description!r} failed: {exc}") from None

    async def _off_loop(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(self._call, method, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._writer, call)
