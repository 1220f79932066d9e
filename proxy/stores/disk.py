"""The default store: a diskcache directory with eviction off (recordings are an archive).

Reads run on the event loop: SQLite in WAL mode never makes a reader wait for a writer, so a read
costs one indexed lookup.

Updates that arrive within a couple of loop turns share one transaction (a commit costs more than
the updates in it). The transaction runs on the loop, through a connection that never waits for
the write lock: a few recordings cost tens of microseconds there, less than handing them to a
thread and taking the GIL back. What can take milliseconds runs in one writer thread instead,
while the loop goes on:
- a batch that finds the lock taken (by another process, or by the writer thread), which waits
  there, with a short SQLite timeout that turns a stuck lock into an error instead of a stall;
- a batch with a large value (a long stream's recording), which diskcache writes to a file of its
  own: the loop's transaction is rolled back and the batch is applied again in the thread;
- checkpoints (copying the write-ahead log into the database, with fsyncs): the loop's connection
  never checkpoints, and every so many transactions one batch goes to the writer thread, which
  checkpoints after it.

The directory can be removed while the store is open (`rm -rf .seedcache`, `git clean -fdx`): the
open connections would go on writing into the removed file, and every recording would be lost.
Before each batch of writes the database file is looked up again (one stat); when it is gone or
replaced, the connections are closed and the store is opened again at its path, created afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import diskcache

from proxy.errors import StoreError
from proxy.stores.base import DELETE, Updater

T = TypeVar("T")
log = logging.getLogger("seedcache")

_RECORDING = "rec:"
_META = "meta:"
_EVENTS = "audit"
_SCAN_BATCH = 256
# The most updates one transaction on the event loop applies, so that the loop never stalls.
_LOOP_BATCH = 64
# Loop turns a write waits before its transaction, so that the responses which arrive meanwhile
# share it (group commit): a commit costs more than the updates in it. An idle loop goes round in
# microseconds; a busy one gathers several updates per transaction.
_GATHER_TURNS = 2
# Transactions on the loop between two checkpoints in the writer thread.
_CHECKPOINT_EVERY = 50
# Free bytes below which a failure is said to be the disk's: SQLite needs a page or two to commit,
# and room for its shared-memory file even to open a database for reading.
_FULL = 1 << 20


class _Disk(diskcache.Disk):  # type: ignore[misc]  # diskcache has no type hints
    """diskcache's Disk (what stores values too large for a row in files of their own), made
    safe for transactions of several updates (`transaction`).

    diskcache removes the file of a value an update replaces as soon as that update returns,
    even inside an enclosing transaction: when the batch then rolled back (an update after it
    failing, a full disk, the process killed before COMMIT), the row came back pointing at a
    removed file, and a large recording recorded long before was gone. Inside `transaction`,
    the files that updates free are removed once it has committed, and the files written for it
    once it has rolled back (no row points at them then)."""

    def __init__(self, directory: str, **settings: Any) -> None:
        super().__init__(directory, **settings)
        self._open = threading.local()  # the files of this thread's transaction

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        stored = super().store(value, read, key=key)
        written: list[str] | None = getattr(self._open, "written", None)
        if written is not None and stored[2] is not None:
            written.append(stored[2])
        return stored

    def remove(self, file_path: str) -> None:
        freed: list[str] | None = getattr(self._open, "freed", None)
        if freed is None:
            super().remove(file_path)
        else:
            freed.append(file_path)

    @contextlib.contextmanager
    def transaction(self, cache: diskcache.Cache) -> Iterator[None]:
        """`cache.transact()`, with the files of the values it replaces or writes kept or
        removed as it ends."""
        written: list[str] = []
        freed: list[str] = []
        self._open.written, self._open.freed = written, freed
        try:
            with cache.transact():
                yield
        except BaseException:
            self._open.written = self._open.freed = None
            for name in written:
                super().remove(name)
            raise
        self._open.written = self._open.freed = None
        for name in freed:
            super().remove(name)


class _NotHere(Exception):
    """This batch is not for the loop: the write lock is taken by another writer, or a value is
    large enough to be written to a file of its own."""


def holds_database(directory: str) -> bool:
    """True when `directory` holds a disk store's database (diskcache's cache.db); StoreError
    when that cannot be told (no permission to look)."""
    try:
        os.stat(os.path.join(directory, diskcache.core.DBNAME))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise StoreError(f"cannot read the disk store at {directory!r}: {exc.strerror}") from None
    return True


def _failure(exc: BaseException, directory: str) -> str:
    """What went wrong, saying so when the disk holding `directory` is full: opening a store
    there fails with SQLite's bare "disk I/O error" (it cannot create its shared-memory file)."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return str(exc)
    if free >= _FULL or "full" in str(exc):
        return str(exc)
    return f"{exc}: the disk holding it is full ({free:,} bytes free)"


class DiskStore:
    """Recordings in a local diskcache directory."""

    pretty = False

    def __init__(self, directory: str, *, timeout: float = 2.0) -> None:
        self.description = directory
        self._timeout = timeout
        # One writer thread: SQLite serialises writers anyway, and threads taking turns at the
        # write lock (and the GIL) cost more than the writes themselves.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seedcache-disk")
        self._pending: list[tuple[str, Updater, asyncio.Future[bytes | None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._loop_thread: int | None = None
        self._since_checkpoint = 0
        self._checkpointer: sqlite3.Connection | None = None
        # Counts the times the writer thread opened the store again (its database was removed);
        # the loop's connections follow when they see it change.
        self._generation = 0
        self._followed = 0
        try:
            # Recordings are an archive: eviction off, and cull_limit=0 so that writes never look
            # for entries to cull.
            self._cache = diskcache.Cache(
                directory, eviction_policy="none", cull_limit=0, timeout=timeout, disk=_Disk
            )
            # The same directory through connections that fail at once when the write lock is
            # taken (timeout 0): only the event loop writes through it.
            self._nowait = diskcache.Cache(
                directory, eviction_policy="none", cull_limit=0, timeout=0, disk=_Disk
            )
            self._path = os.path.join(self._cache.directory, diskcache.core.DBNAME)
            self._opened = self._identity()
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            raise StoreError(
                f"cannot open the disk store at {directory!r}: {_failure(exc, directory)}"
            ) from None

    async def get(self, namespace: str, key: str) -> bytes | None:
        self._follow()
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

    async def names(self) -> AsyncIterator[tuple[str, str]]:
        for name in await self._off_loop(self._names, _RECORDING):
            yield "", name[len(_RECORDING) :]

    async def get_meta(self, name: str) -> str | None:
        self._follow()
        return self._call(self._cache.get, _META + name)  # type: ignore[no-any-return]

    async def set_meta(self, name: str, value: str) -> None:
        await self._off_loop(self._cache.set, _META + name, value)

    async def add_meta(self, name: str, value: str) -> str:
        return await self._off_loop(self._add_meta, _META + name, value)

    def _add_meta(self, name: str, value: str) -> str:
        self._cache.add(name, value)  # one transaction: add only if absent
        held: str = self._cache.get(name)
        return held

    async def check(self) -> None:
        # Off the loop: it opens the store again if its database was removed.
        await self._off_loop(self._cache.get, _META + "health")

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
        # diskcache keeps a connection per thread and closes only the calling thread's: the
        # writer thread's is closed there (left open, it is closed when collected, with a
        # ResourceWarning on Python 3.13).
        await asyncio.get_running_loop().run_in_executor(self._writer, self._close_in_thread)
        self._writer.shutdown(wait=True)
        self._nowait.close()
        self._cache.close()

    async def _flush(self) -> None:
        """Apply the updates waiting, each batch in one transaction, until none are left."""
        while self._pending:
            for _ in range(_GATHER_TURNS):
                await asyncio.sleep(0)
            batch, self._pending = self._pending[:_LOOP_BATCH], self._pending[_LOOP_BATCH:]
            try:
                self._follow()
                if self._removed():
                    # The writer thread opens the store again before it applies the batch.
                    results = await self._off_loop(self._apply, batch, self._cache)
                elif self._since_checkpoint >= _CHECKPOINT_EVERY:
                    # No other write of ours starts until this returns: the checkpoint copies
                    # the whole log, and the next transaction starts the log from the top.
                    self._since_checkpoint = 0
                    results = await self._off_loop(self._apply_and_checkpoint, batch)
                else:
                    results = await self._apply_here_or_off_loop(batch)
            except Exception as exc:  # every caller gets the failure; none waits forever
                results = [exc] * len(batch)
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue  # the caller was cancelled
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def _apply_here_or_off_loop(
        self, batch: list[tuple[str, Updater, Any]]
    ) -> list[bytes | BaseException | None]:
        thread = threading.get_ident()
        if self._loop_thread != thread:
            # Automatic checkpoints off for this thread's connection only (a pragma is per
            # connection): the writer thread's still checkpoints its own commits.
            self._call(self._nowait.reset, "sqlite_wal_autocheckpoint", 0, update=False)
            self._loop_thread = thread
        try:
            results = self._call(self._apply, batch, self._nowait)
        except _NotHere:
            # Nothing of it was written (rolled back): the writer thread applies it again, and
            # waits there for the lock if another writer holds it.
            return await self._off_loop(self._apply, batch, self._cache)
        self._since_checkpoint += 1
        return results

    def _close_in_thread(self) -> None:
        self._cache.close()
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None

    def _apply_and_checkpoint(
        self, batch: list[tuple[str, Updater, Any]]
    ) -> list[bytes | BaseException | None]:
        """In the writer thread: apply a batch, then copy the write-ahead log into the database."""
        results = self._apply(batch, self._cache)
        try:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(
                    self._path, timeout=self._timeout, check_same_thread=False
                )
            # PASSIVE never waits; with no other writer of ours running it copies the whole log.
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("checkpoint of the disk store at %r failed: %s", self.description, exc)
        return results

    def _apply(
        self, batch: list[tuple[str, Updater, Any]], cache: diskcache.Cache
    ) -> list[bytes | BaseException | None]:
        on_loop = cache is self._nowait
        try:
            with cache.disk.transaction(cache):
                return [self._apply_one(cache, name, fn, on_loop) for name, fn, _ in batch]
        except diskcache.Timeout:
            # Only BEGIN raises it, when the write lock is taken: before any update ran.
            if on_loop:
                raise _NotHere from None
            raise

    @staticmethod
    def _apply_one(
        cache: diskcache.Cache, name: str, fn: Updater, on_loop: bool
    ) -> bytes | BaseException | None:
        old: bytes | None = cache.get(name)
        try:
            new = fn(old)
        except Exception as exc:  # one caller's failure is that caller's alone
            return exc
        if new is None:
            return old
        if new is DELETE:
            # In the batch's transaction: a large value's file goes once it commits.
            cache.delete(name)
            return None
        if on_loop and len(new) >= cache.disk_min_file_size:
            raise _NotHere  # rolls the transaction back
        cache.set(name, new)
        return new

    def _identity(self) -> tuple[int, int]:
        found = os.stat(self._path)
        return found.st_dev, found.st_ino

    def _removed(self) -> bool:
        """True when the database file at the path is not the one the connections opened."""
        try:
            return self._identity() != self._opened
        except OSError:
            return True

    def _reopen_if_removed(self) -> None:
        """In the writer thread: open the store again at its path if its database was removed
        or replaced, creating it afresh; the loop's connections follow (`_follow`)."""
        if not self._removed():
            return
        # This thread's connections still write into the removed file: closed, the next use
        # connects to the database at the path.
        self._cache.close()
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        try:
            diskcache.Cache(
                self._cache.directory, eviction_policy="none", cull_limit=0, timeout=self._timeout
            ).close()
            self._opened = self._identity()
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            raise StoreError(
                f"the disk store at {self.description!r} was removed while in use, and cannot "
                f"be created again: {_failure(exc, self.description)}"
            ) from None
        self._generation += 1
        log.warning(
            "the disk store at %r was removed or replaced while in use: recording into the "
            "database now at %s (created afresh if it was missing); what was recorded into the "
            "removed one is gone",
            self.description,
            self._path,
        )

    def _follow(self) -> None:
        """On the loop: after the writer thread opened the store again, close the loop's
        connections to the removed database, so that the next use connects to the new one."""
        if self._followed != self._generation:
            self._followed = self._generation
            self._cache.close()
            self._nowait.close()
            self._loop_thread = None  # the new connection needs its pragma set again

    def _names(self, prefix: str) -> list[str]:
        # iterkeys() walks the index in key order: events ("audit-<n>") come out oldest first.
        return [n for n in self._cache.iterkeys() if isinstance(n, str) and n.startswith(prefix)]

    def _call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except diskcache.Timeout:
            raise StoreError(f"the disk store at {self.description!r} is locked") from None
        except (OSError, sqlite3.Error) as exc:
            # sqlite3.Error: a corrupt or unwritable database file.
            raise StoreError(
                f"the disk store at {self.description!r} failed: {_failure(exc, self.description)}"
            ) from None

    async def _off_loop(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(self._call, self._in_thread, method, *args, **kwargs)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._writer, call)
        finally:
            self._follow()

    def _in_thread(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self._reopen_if_removed()  # a stat: writes here are few, or large and slow anyway
        return method(*args, **kwargs)
