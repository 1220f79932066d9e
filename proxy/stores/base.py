"""The `Store` protocol every store implements, and `open_store` to pick one from `--store`.

Stores speak bytes under (namespace, key); what the bytes mean (recordings, HTTP) stays above.
"""

from __future__ import annotations

import enum
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from proxy.config import StoreSpec
from proxy.errors import ConfigError


class Delete(enum.Enum):
    """The type of `DELETE`."""

    DELETE = "delete"


# What an `Updater` returns to have the value deleted: decided on the value as stored, in the
# same atomic step, so that a value another writer changed meanwhile is not deleted unseen.
DELETE: Final = Delete.DELETE

# An atomic read-modify-write step: given the stored bytes (None if absent), the bytes to store,
# DELETE to remove the value, or None to leave it as it is. A store may run it more than once
# (Redis when another writer won the race, disk when a batch moves off the loop): it computes,
# and has no other effect than what a later run overwrites.
Updater = Callable[[bytes | None], bytes | Delete | None]


class Store(Protocol):
    """Where recordings, the current fingerprints and audit events live."""

    description: str
    # True when values should be `Recording.dumps(pretty=True)`: stores meant to be read and
    # diffed by people (the files store, committed to git).
    pretty: bool

    async def get(self, namespace: str, key: str) -> bytes | None:
        """The value under `key`, or None."""

    async def update(self, namespace: str, key: str, fn: Updater) -> bytes | None:
        """Apply `fn` to the value atomically (against other writers); return what is stored
        (None once `fn` deleted it)."""

    async def put(self, namespace: str, key: str, value: bytes) -> None:
        """Store `value` under `key`, replacing what was there."""

    async def delete(self, namespace: str, key: str) -> bool:
        """Remove `key`; True if it was there."""

    def scan(self) -> AsyncIterator[tuple[str, str, bytes]]:
        """Every (namespace, key, value) stored, in no particular order."""

    def names(self) -> AsyncIterator[tuple[str, str]]:
        """Every (namespace, key) stored, as `scan` but without reading the values."""

    async def get_meta(self, name: str) -> str | None:
        """A small shared state value (the current fingerprint of a model, …)."""

    async def set_meta(self, name: str, value: str) -> None:
        """Set a shared state value."""

    async def add_meta(self, name: str, value: str) -> str:
        """Set a shared state value unless one is set, atomically across processes; return the
        value that holds (the one-time isolation salt: every proxy on a store must agree)."""

    async def check(self) -> None:
        """Raise StoreError when the store cannot be used (the health check)."""

    async def append_event(self, event: bytes) -> None:
        """Append one audit event (JSON bytes)."""

    def events(self) -> AsyncIterator[bytes]:
        """Every audit event, oldest first."""

    async def close(self) -> None:
        """Release connections and files."""


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lock once `Locking.acquire` has tried it: the holder's token, and whether
    that holder is the caller."""

    token: str
    ours: bool


@runtime_checkable
class Locking(Protocol):
    """A store shared by several proxies that can hold short-lived locks (Redis), so that
    identical concurrent misses on different proxies cause one upstream call."""

    async def acquire(self, name: str, ttl_ms: int) -> Holder:
        """Take the lock `name` for at most `ttl_ms` if it is free; who holds it now (the token
        tells one holder from the next, so that a waiter knows which call it waits on)."""

    async def release(self, name: str, token: str) -> None:
        """Give the lock back if `token` still holds it."""

    async def extend(self, name: str, token: str, ttl_ms: int) -> bool:
        """Keep the lock for another `ttl_ms` if `token` still holds it; whether it did."""

    async def post(self, name: str, value: bytes, ttl_ms: int) -> None:
        """Leave `value` under `name` for the other proxies, for `ttl_ms`."""

    async def read_post(self, name: str) -> bytes | None:
        """What was left under `name` and has not expired yet."""


class Deferred:
    """A local store opened when first needed, for a server in passthrough mode, which never
    touches its store (DESIGN §2): no directory is created unless a request asks for another mode
    (`X-Seedcache-Mode`) and writes. Reads of a store that does not exist yet find nothing."""

    def __init__(self, spec: str, *, timeout: float = 2.0) -> None:
        self._spec = spec
        self._timeout = timeout
        self._store: Store | None = None
        parsed = StoreSpec.parse(spec)
        self.description = parsed.shown
        self.pretty = parsed.kind == "files"  # as FilesStore.pretty

    def _open(self) -> Store:
        if self._store is None:
            self._store = open_store(self._spec, timeout=self._timeout)
        return self._store

    def _existing(self) -> Store | None:
        if self._store is None and store_exists(self._spec):
            self._open()
        return self._store

    async def get(self, namespace: str, key: str) -> bytes | None:
        store = self._existing()
        return None if store is None else await store.get(namespace, key)

    async def update(self, namespace: str, key: str, fn: Updater) -> bytes | None:
        return await self._open().update(namespace, key, fn)

    async def put(self, namespace: str, key: str, value: bytes) -> None:
        await self._open().put(namespace, key, value)

    async def delete(self, namespace: str, key: str) -> bool:
        store = self._existing()
        return store is not None and await store.delete(namespace, key)

    async def scan(self) -> AsyncIterator[tuple[str, str, bytes]]:
        store = self._existing()
        if store is not None:
            async for item in store.scan():
                yield item

    async def names(self) -> AsyncIterator[tuple[str, str]]:
        store = self._existing()
        if store is not None:
            async for name in store.names():
                yield name

    async def get_meta(self, name: str) -> str | None:
        store = self._existing()
        return None if store is None else await store.get_meta(name)

    async def set_meta(self, name: str, value: str) -> None:
        await self._open().set_meta(name, value)

    async def add_meta(self, name: str, value: str) -> str:
        return await self._open().add_meta(name, value)

    async def check(self) -> None:
        store = self._existing()
        if store is not None:
            await store.check()

    async def append_event(self, event: bytes) -> None:
        await self._open().append_event(event)

    async def events(self) -> AsyncIterator[bytes]:
        store = self._existing()
        if store is not None:
            async for event in store.events():
                yield event

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()


def check_store(spec: str) -> StoreSpec:
    """`spec` taken apart; ConfigError when it names no store, or a directory that holds the
    other kind of local store (every request would miss, and opening it would write into it)."""
    if not spec:
        raise ConfigError("--store must not be empty")
    parsed = StoreSpec.parse(spec)
    if parsed.kind == "files" and not parsed.location:
        raise ConfigError("--store files: needs a directory, e.g. files:tests/recordings")
    if parsed.directory and os.path.isdir(parsed.directory):
        _check_kind(parsed)
    return parsed


def _check_kind(spec: StoreSpec) -> None:
    from proxy.stores.disk import holds_database
    from proxy.stores.files import holds_recordings

    directory = spec.location
    database = holds_database(directory)
    # A disk store keeps no .json files of its own. A database beside recording files was made
    # by opening a files store's directory as a disk store.
    if spec.kind == "disk" and holds_recordings(directory, beside_database=database):
        moved = (
            ", and move its cache.db files into a directory of their own to read them as a "
            "disk store"
            if database
            else ""
        )
        raise ConfigError(
            f"{directory} holds recording files (<key>.json): use --store files:{directory}" + moved
        )
    if spec.kind == "files" and database and not holds_recordings(directory):
        raise ConfigError(
            f"{directory} holds a disk store (cache.db), not recording files: use --store "
            f"{directory}"
        )


def store_exists(spec: str) -> bool:
    """False when opening the store would create it: a disk store's directory without its
    database, or a files store's directory missing. ConfigError as `check_store`."""
    parsed = check_store(spec)
    if parsed.directory is None:
        return True  # Redis: reached when opened
    if os.path.exists(parsed.directory) and not os.path.isdir(parsed.directory):
        raise ConfigError(f"--store {spec}: {parsed.directory} is a file, not a directory")
    if parsed.kind == "files":
        return os.path.isdir(parsed.directory)
    from proxy.stores.disk import holds_database

    return holds_database(parsed.directory)


def open_store(spec: str, *, timeout: float = 2.0) -> Store:
    """The store named by a `--store` value: a directory, `files:DIR`, or `redis://…`."""
    parsed = check_store(spec)
    if parsed.kind == "redis":
        from proxy.stores.redis_store import RedisStore

        return RedisStore(spec)
    if parsed.kind == "files":
        from proxy.stores.files import FilesStore

        return FilesStore(parsed.location, timeout=timeout)
    from proxy.stores.disk import DiskStore

    return DiskStore(spec, timeout=timeout)
