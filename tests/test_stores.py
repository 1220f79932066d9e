"""The store contract, run against every store (disk, files, Redis), plus what each store adds.

Redis tests use a real redis-server (tests/redis_server.py); parallel writers are real processes.
"""

from __future__ import annotations

import asyncio
import codecs
import fcntl
import gc
import hashlib
import logging
import multiprocessing
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import pytest
import redis

import proxy.stores.files
import proxy.stores.redis_store
from proxy.errors import ConfigError, StoreError
from proxy.stores.base import DELETE, Delete, Holder, Store, Updater, open_store
from proxy.stores.disk import DiskStore
from proxy.stores.files import FilesStore
from proxy.stores.redis_store import RedisStore
from tests.servers import free_port

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

# redis_server, redis_url, own_redis_server (tests/conftest.py may load it for every module).


# Generous: parallel writers queue on one key's lock, and CI disks can be slow to fsync.
LOCK_TIMEOUT = 30.0
KINDS = ["disk", "files", "redis"]


def key(n: int | str) -> str:
    """A key as the proxy makes them: 64 hex digits."""
    return hashlib.sha256(str(n).encode()).hexdigest()


def append_line(line: str) -> Updater:
    """An updater that adds `line` to a JSON list (the value starts as an empty list)."""

    def add(old: bytes | None) -> bytes:
        lines = [] if old is None else orjson.loads(old)
        return orjson.dumps([*lines, line], option=orjson.OPT_INDENT_2)

    return add


def drop_line(line: str) -> Callable[[bytes | None], bytes | Delete]:
    """An updater that removes `line` from a JSON list, and deletes the list left empty."""

    def drop(old: bytes | None) -> bytes | Delete:
        left = [kept for kept in orjson.loads(old or b"[]") if kept != line]
        return orjson.dumps(left) if left else DELETE

    return drop


def _add_line_when_told(
    spec: str, name: str, line: str, ready: threading.Event, go: threading.Event
) -> None:
    """Another writer, in a thread of its own: opens the store at `spec` (`ready`), and once
    told (`go`) adds `line` to the value of `name`."""

    async def run() -> None:
        store = open_store(spec, timeout=LOCK_TIMEOUT)
        try:
            ready.set()
            if go.wait(LOCK_TIMEOUT):
                await store.update("", name, append_line(line))
        finally:
            await store.close()

    asyncio.run(run())


async def collect(store: Store) -> dict[tuple[str, str], bytes]:
    return {(namespace, k): value async for namespace, k, value in store.scan()}


async def all_events(store: Store) -> list[bytes]:
    return [event async for event in store.events()]


def value_files(directory: Path) -> int:
    """How many values the disk store at `directory` keeps in files of their own."""
    return sum(1 for _ in directory.rglob("*.val"))


@pytest.fixture(params=KINDS)
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A `--store` value for an empty store of each kind."""
    if request.param == "disk":
        return str(tmp_path / "disk")
    if request.param == "files":
        return f"files:{tmp_path / 'files'}"
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
async def store(store_spec: str) -> AsyncIterator[Store]:
    opened = open_store(store_spec, timeout=LOCK_TIMEOUT)
    yield opened
    await opened.close()


def namespaced(store: Store) -> bool:
    # The disk store keys by key alone: the key already hashes the namespace in (keys.make_key),
    # so namespaces can never collide there, and scan reports them as "".
    return not isinstance(store, DiskStore)


class TestStoreContract:
    """What handlers, the CLI and export/import rely on, whichever store is configured."""

    async def test_get_absent_is_none(self, store: Store) -> None:
        assert await store.get("", key(1)) is None

    async def test_put_get_replace(self, store: Store) -> None:
        await store.put("", key(1), b"one")
        assert await store.get("", key(1)) == b"one"
        await store.put("", key(1), b"two")
        assert await store.get("", key(1)) == b"two"

    async def test_delete(self, store: Store) -> None:
        await store.put("", key(1), b"one")
        assert await store.delete("", key(1)) is True
        assert await store.get("", key(1)) is None
        assert await store.delete("", key(1)) is False
        assert await collect(store) == {}

    async def test_update_absent_gets_none(self, store: Store) -> None:
        seen: list[bytes | None] = []

        def fn(old: bytes | None) -> bytes:
            seen.append(old)
            return b"new"

        assert await store.update("", key(1), fn) == b"new"
        assert seen == [None]
        assert await store.get("", key(1)) == b"new"

    async def test_update_sees_stored_value(self, store: Store) -> None:
        await store.put("", key(1), b"old")
        assert await store.update("", key(1), lambda old: (old or b"") + b"+more") == b"old+more"
        assert await store.get("", key(1)) == b"old+more"

    async def test_update_returning_none_keeps_value(self, store: Store) -> None:
        await store.put("", key(1), b"kept")
        assert await store.update("", key(1), lambda old: None) == b"kept"
        assert await store.get("", key(1)) == b"kept"
        # Absent and left absent.
        assert await store.update("", key(2), lambda old: None) is None
        assert await store.get("", key(2)) is None

    async def test_update_returning_delete_deletes(self, store: Store) -> None:
        await store.put("", key(1), b"gone")
        await store.put("", key(2), b"kept")
        assert await store.update("", key(1), lambda old: DELETE) is None
        assert await store.get("", key(1)) is None
        assert await collect(store) == {("", key(2)): b"kept"}
        # Absent and left absent.
        assert await store.update("", key(1), lambda old: DELETE) is None
        assert await store.get("", key(1)) is None

    async def test_a_delete_by_update_keeps_what_a_concurrent_update_adds(
        self, store: Store
    ) -> None:
        # prune drops the last sample of a recording while a proxy adds one: the delete is
        # decided on the value as stored, so the sample added is never deleted unseen. Here
        # the two share a batch (disk) or queue on the key's lock (files): a delete made as a
        # step of its own after the update would come after the other writer's line.
        await store.put("", key(1), orjson.dumps(["old"]))
        await asyncio.gather(
            store.update("", key(1), drop_line("old")), store.update("", key(1), append_line("new"))
        )
        stored = await store.get("", key(1))
        assert stored is not None and orjson.loads(stored) == ["new"]

    async def test_a_delete_by_update_keeps_what_another_writer_added_meanwhile(
        self, store_spec: str, store: Store
    ) -> None:
        # As above, the other writer through a connection of its own, adding its line while the
        # update decides to delete (on Redis, a delete made as a step of its own would follow).
        await store.put("", key(1), orjson.dumps(["old"]))
        ready, go = threading.Event(), threading.Event()
        other = threading.Thread(
            target=_add_line_when_told, args=(store_spec, key(1), "new", ready, go), daemon=True
        )
        other.start()
        await asyncio.get_running_loop().run_in_executor(None, ready.wait, LOCK_TIMEOUT)

        def drop_old(old: bytes | None) -> bytes | Delete:
            if not go.is_set():
                # The other writer adds its line now: it waits for this update (disk, files),
                # or it is first and this update runs again on what it left (Redis).
                go.set()
                other.join(0.5)
            return drop_line("old")(old)

        try:
            await store.update("", key(1), drop_old)
        finally:
            go.set()
            await asyncio.get_running_loop().run_in_executor(None, other.join, LOCK_TIMEOUT)
        stored = await store.get("", key(1))
        assert stored is not None and orjson.loads(stored) == ["new"]

    async def test_update_error_propagates_and_changes_nothing(self, store: Store) -> None:
        await store.put("", key(1), b"kept")

        def fail(old: bytes | None) -> bytes:
            raise ZeroDivisionError

        with pytest.raises(ZeroDivisionError):
            await store.update("", key(1), fail)
        assert await store.get("", key(1)) == b"kept"
        # Nothing stays locked.
        assert await store.update("", key(1), lambda old: b"next") == b"next"

    async def test_concurrent_updates_lose_nothing(self, store: Store) -> None:
        await asyncio.gather(*(store.update("", key(1), append_line(f"l{i}")) for i in range(50)))
        raw = await store.get("", key(1))
        assert raw is not None
        assert sorted(orjson.loads(raw)) == sorted(f"l{i}" for i in range(50))

    async def test_concurrent_add_if_absent_adds_once(self, store: Store) -> None:
        winners: list[int] = []

        def claim(i: int) -> Updater:
            def fn(old: bytes | None) -> bytes | None:
                if old is not None:
                    return None
                winners.append(i)
                return str(i).encode()

            return fn

        results = await asyncio.gather(*(store.update("", key(1), claim(i)) for i in range(20)))
        stored = await store.get("", key(1))
        # fn may run more than once (Redis retries it), but only one write ever lands.
        assert stored is not None and int(stored) in winners
        assert set(results) == {stored}

    async def test_large_value(self, store: Store) -> None:
        value = os.urandom(5 * 1024 * 1024)
        await store.put("", key(1), value)
        assert await store.get("", key(1)) == value
        assert await store.update("", key(1), lambda old: (old or b"") + b"!") == value + b"!"
        assert await collect(store) == {("", key(1)): value + b"!"}

    async def test_unicode_and_binary_bytes(self, store: Store) -> None:
        text = '{"content": "héllo wörld — 世界 🎲 \\u0000"}'.encode()
        binary = bytes(range(256))
        await store.put("", key(1), text)
        await store.put("", key(2), binary)
        assert await store.get("", key(1)) == text
        assert await store.get("", key(2)) == binary

    async def test_scan(self, store: Store) -> None:
        assert await collect(store) == {}
        ns = "team-a" if namespaced(store) else ""
        for i in range(120):
            await store.put("", key(i), b"v%d" % i)
        await store.put("team-a", key("other"), b"other")
        found = await collect(store)
        assert found == {
            **{("", key(i)): b"v%d" % i for i in range(120)},
            (ns, key("other")): b"other",
        }

    async def test_names_are_what_scan_finds_without_the_values(self, store: Store) -> None:
        assert [name async for name in store.names()] == []
        for i in range(120):
            await store.put("", key(i), b"v%d" % i)
        await store.put("team-a", key("other"), b"other")
        await store.delete("", key(7))

        names = [name async for name in store.names()]

        assert len(names) == len(set(names)) == 120
        assert set(names) == set(await collect(store))

    async def test_namespaces_keep_keys_apart(self, store: Store) -> None:
        if not namespaced(store):
            pytest.skip("the disk store keys by key alone; the key already includes the namespace")
        await store.put("", key(1), b"default")
        await store.put("team-a", key(1), b"a")
        await store.put("team.b_2", key(1), b"b")
        assert await store.get("", key(1)) == b"default"
        assert await store.get("team-a", key(1)) == b"a"
        assert await store.get("team.b_2", key(1)) == b"b"
        assert await store.delete("team-a", key(1)) is True
        assert await store.get("", key(1)) == b"default"
        assert await collect(store) == {("", key(1)): b"default", ("team.b_2", key(1)): b"b"}

    async def test_meta(self, store: Store) -> None:
        assert await store.get_meta("fingerprint:gpt-4o-mini") is None
        await store.set_meta("fingerprint:gpt-4o-mini", "fp_1")
        await store.set_meta("fingerprint:gpt-4o", "fp_ß")
        assert await store.get_meta("fingerprint:gpt-4o-mini") == "fp_1"
        await store.set_meta("fingerprint:gpt-4o-mini", "fp_2")
        assert await store.get_meta("fingerprint:gpt-4o-mini") == "fp_2"
        assert await store.get_meta("fingerprint:gpt-4o") == "fp_ß"

    async def test_add_meta_keeps_the_first_value(self, store: Store) -> None:
        assert await store.add_meta("isolation-salt", "first") == "first"
        assert await store.add_meta("isolation-salt", "second") == "first"
        assert await store.get_meta("isolation-salt") == "first"
        won = await asyncio.gather(*(store.add_meta("race", f"v{n}") for n in range(20)))
        assert len(set(won)) == 1 and await store.get_meta("race") == won[0]

    async def test_check(self, store: Store) -> None:
        await store.check()  # the health check: no error when the store can be used

    async def test_events_in_order(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        # Small pages, so reading crosses page boundaries.
        monkeypatch.setattr(proxy.stores.files, "_EVENTS_PAGE", 3)
        monkeypatch.setattr(proxy.stores.redis_store, "_EVENTS_PAGE", 3)
        assert await all_events(store) == []
        events = [orjson.dumps({"n": i, "verdict": "identical", "text": "é"}) for i in range(10)]
        for event in events:
            await store.append_event(event)
        assert await all_events(store) == events

    async def test_concurrent_events_all_kept(self, store: Store) -> None:
        events = {orjson.dumps({"n": i}) for i in range(30)}
        await asyncio.gather(*(store.append_event(event) for event in events))
        got = await all_events(store)
        assert len(got) == 30 and set(got) == events


def _writer(spec: str, shared: str, own: str, worker: int, count: int) -> None:
    """One process's share of the parallel-writers test (module level, so spawn can import it)."""

    async def run() -> None:
        store = open_store(spec, timeout=LOCK_TIMEOUT)
        try:
            for i in range(count):
                await store.update("", shared, append_line(f"w{worker}-{i}"))
                await store.update("ns", own, append_line(f"w{worker}-{i}"))
                await store.append_event(orjson.dumps({"worker": worker, "i": i}))
        finally:
            await store.close()

    asyncio.run(run())


def _adder(spec: str, worker: int) -> str:
    """One process adding its own value under one meta name; returns the value that held."""

    async def run() -> str:
        store = open_store(spec, timeout=LOCK_TIMEOUT)
        try:
            return await store.add_meta("isolation-salt", f"w{worker}")
        finally:
            await store.close()

    return asyncio.run(run())


class TestParallelProcesses:
    """`serve --workers N` and parallel test workers: real processes writing one store."""

    async def test_processes_adding_one_meta_value_agree(
        self, store_spec: str, store: Store
    ) -> None:
        # Proxies starting at once on a fresh store must pick one isolation salt.
        def run_all() -> list[str]:
            with multiprocessing.get_context("spawn").Pool(4) as pool:
                return pool.starmap(_adder, [(store_spec, w) for w in range(4)])

        held = await asyncio.get_running_loop().run_in_executor(None, run_all)

        assert len(set(held)) == 1
        assert await store.get_meta("isolation-salt") == held[0]

    async def test_nothing_lost(self, store_spec: str, store: Store) -> None:
        workers, count = 4, 25
        own = [key(f"own-{w}") for w in range(workers)]
        jobs = [(store_spec, key("shared"), own[w], w, count) for w in range(workers)]

        def run_all() -> None:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                pool.starmap(_writer, jobs)

        await asyncio.get_running_loop().run_in_executor(None, run_all)

        every = {f"w{w}-{i}" for w in range(workers) for i in range(count)}
        shared = await store.get("", key("shared"))
        assert shared is not None
        assert sorted(orjson.loads(shared)) == sorted(every)
        for w in range(workers):
            value = await store.get("ns", own[w])
            assert value is not None
            assert orjson.loads(value) == [f"w{w}-{i}" for i in range(count)]
        # Every stored value is complete, valid JSON.
        found = await collect(store)
        assert len(found) == 1 + workers
        for value in found.values():
            orjson.loads(value)
        events = [orjson.loads(event) for event in await all_events(store)]
        assert len(events) == workers * count


class TestDiskStore:
    """What the disk store adds: writes that never stall the loop on another writer's lock."""

    @staticmethod
    def hold_write_lock(directory: Path) -> sqlite3.Connection:
        """Take SQLite's write lock on the store the way another process's writer would."""
        held = sqlite3.connect(directory / "cache.db", isolation_level=None)
        held.execute("BEGIN IMMEDIATE")
        return held

    async def test_update_waits_for_another_writer_without_stalling_the_loop(
        self, tmp_path: Path
    ) -> None:
        store = DiskStore(str(tmp_path / "disk"), timeout=LOCK_TIMEOUT)
        try:
            await store.put("", key(1), b"v1")
            held = self.hold_write_lock(tmp_path / "disk")
            turns = 0

            async def ticker() -> None:
                nonlocal turns
                while True:
                    turns += 1
                    await asyncio.sleep(0.01)

            ticking = asyncio.create_task(ticker())
            update = asyncio.create_task(store.update("", key(1), lambda old: (old or b"") + b"+"))
            await asyncio.sleep(0.3)
            assert not update.done()  # waiting for the lock...
            assert turns >= 10  # ...while the loop goes on serving
            assert await store.get("", key(1)) == b"v1"  # and reads never wait
            held.execute("COMMIT")
            held.close()
            assert await asyncio.wait_for(update, 10) == b"v1+"
            ticking.cancel()
            assert await store.get("", key(1)) == b"v1+"
        finally:
            await store.close()

    async def test_lock_held_past_the_timeout_is_a_store_error(self, tmp_path: Path) -> None:
        store = DiskStore(str(tmp_path / "disk"), timeout=0.3)
        try:
            await store.put("", key(1), b"v1")
            held = self.hold_write_lock(tmp_path / "disk")
            with pytest.raises(StoreError, match="is locked"):
                await store.update("", key(1), lambda old: b"v2")
            held.execute("ROLLBACK")
            held.close()
            assert await store.get("", key(1)) == b"v1"
            assert await store.update("", key(1), lambda old: b"v2") == b"v2"
        finally:
            await store.close()

    async def test_more_updates_than_one_transaction_takes_all_land(self, tmp_path: Path) -> None:
        store = DiskStore(str(tmp_path / "disk"), timeout=LOCK_TIMEOUT)
        try:
            # 150 at once: more than one transaction on the loop applies (64).
            results = await asyncio.gather(
                *(store.update("", key(n), lambda old, n=n: f"v{n}".encode()) for n in range(150))
            )
            assert results == [f"v{n}".encode() for n in range(150)]
            assert len(await collect(store)) == 150
        finally:
            await store.close()

    async def test_a_large_value_is_written_off_the_loop(self, tmp_path: Path) -> None:
        # diskcache writes a value this large to a file of its own: not on the loop. The batch it
        # came in is rolled back there and applied again in the writer thread.
        store = DiskStore(str(tmp_path / "disk"), timeout=LOCK_TIMEOUT)
        loop_thread = threading.get_ident()
        ran_in: dict[str, list[int]] = {"small": [], "large": []}

        def write(name: str, value: bytes) -> Updater:
            def fn(old: bytes | None) -> bytes:
                ran_in[name].append(threading.get_ident())
                return value

            return fn

        large = os.urandom(1_000_000)
        try:
            small_result, large_result = await asyncio.gather(
                store.update("", key("small"), write("small", b"v")),
                store.update("", key("large"), write("large", large)),
            )
            assert (small_result, large_result) == (b"v", large)
            assert ran_in["large"][0] == loop_thread  # tried on the loop, then moved
            assert ran_in["large"][-1] != loop_thread
            assert ran_in["small"][-1] != loop_thread  # its batch moved with it
            assert await store.get("", key("large")) == large
            assert await store.update("", key("small"), write("small", b"w")) == b"w"
            assert ran_in["small"][-1] == loop_thread  # small values stay on the loop
        finally:
            await store.close()

    @pytest.mark.parametrize("replacement", [b"small", DELETE])
    async def test_a_batch_rolled_back_keeps_the_large_values_it_was_replacing(
        self, tmp_path: Path, replacement: bytes | Delete
    ) -> None:
        # A large value lives in a file of its own. The loop's batch replaces one with a small
        # value (or deletes it), then meets a large value and is rolled back, to be applied
        # again in the writer thread: the replaced value's file must still be there for it
        # (diskcache removes it as the update returns, inside the batch's transaction).
        store = DiskStore(str(tmp_path / "disk"), timeout=LOCK_TIMEOUT)
        recorded = os.urandom(100_000)
        seen: list[bytes | None] = []

        def shrink(old: bytes | None) -> bytes | Delete:
            seen.append(old)
            return replacement

        try:
            await store.put("", key("recorded"), recorded)
            await asyncio.gather(
                store.update("", key("recorded"), shrink),
                store.update("", key("new"), lambda old: os.urandom(100_000)),
            )
            assert len(seen) == 2  # on the loop, then again in the writer thread
            assert seen == [recorded, recorded]
            expected = None if replacement is DELETE else replacement
            assert await store.get("", key("recorded")) == expected
            assert value_files(tmp_path / "disk") == 1  # the new large value's
        finally:
            await store.close()

    async def test_a_batch_that_fails_keeps_the_values_it_was_replacing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A batch in the writer thread replaces a large recording, then a later update in it
        # fails (a full disk): rolled back, the recording is the one recorded before, and the
        # file written for its replacement is gone.
        store = DiskStore(str(tmp_path / "disk"), timeout=LOCK_TIMEOUT)
        recorded = os.urandom(100_000)
        set_value = store._cache.set

        def set_or_fail(name: str, value: bytes) -> object:
            if name.endswith(key("fails")):
                raise OSError(28, "No space left on device")
            return set_value(name, value)

        try:
            await store.put("", key("recorded"), recorded)
            monkeypatch.setattr(store._cache, "set", set_or_fail)
            outcomes = await asyncio.gather(
                store.update("", key("recorded"), lambda old: os.urandom(100_000)),
                store.update("", key("fails"), lambda old: os.urandom(100_000)),
                return_exceptions=True,
            )
            assert all(isinstance(outcome, StoreError) for outcome in outcomes)
            monkeypatch.undo()
            assert await store.get("", key("recorded")) == recorded
            assert value_files(tmp_path / "disk") == 1
        finally:
            await store.close()

    async def test_an_unexpected_failure_reaches_every_waiting_caller(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store = DiskStore(str(tmp_path / "disk"), timeout=LOCK_TIMEOUT)
        try:

            def broken(*args: object, **kwargs: object) -> None:
                raise RuntimeError("the store broke")

            monkeypatch.setattr(store._nowait, "get", broken)
            outcomes = await asyncio.wait_for(
                asyncio.gather(
                    *(store.update("", key(n), lambda old: b"v") for n in range(5)),
                    return_exceptions=True,
                ),
                10,
            )
            assert [str(outcome) for outcome in outcomes] == ["the store broke"] * 5
            monkeypatch.undo()
            assert await store.update("", key(1), lambda old: b"v") == b"v"
        finally:
            await store.close()

    async def test_the_write_ahead_log_is_checkpointed(self, tmp_path: Path) -> None:
        # The loop's connection never checkpoints; the writer thread does, every so many
        # transactions. Without that the log would grow by every transaction (~18 MB here).
        store = DiskStore(str(tmp_path / "disk"), timeout=LOCK_TIMEOUT)
        wal = tmp_path / "disk" / "cache.db-wal"
        value = os.urandom(2048)
        try:
            for n in range(600):  # one transaction each: every update is awaited alone
                await store.update("", key(n), lambda old: value)
            assert wal.stat().st_size < 2_000_000
            assert len(await collect(store)) == 600
        finally:
            await store.close()
        # Everything is in the database file itself once the store is closed.
        reopened = DiskStore(str(tmp_path / "disk"))
        try:
            assert await reopened.get("", key(599)) == value
        finally:
            await reopened.close()

    @pytest.mark.parametrize("removed", ["directory", "database"])
    async def test_a_removed_store_is_created_again_and_keeps_recording(
        self, tmp_path: Path, removed: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        # rm -rf .seedcache (or git clean -fdx) while serving: the open connections would write
        # into the removed file, and every later recording would be lost.
        directory = tmp_path / "disk"
        store = DiskStore(str(directory), timeout=LOCK_TIMEOUT)
        try:
            await store.update("", key(1), lambda old: b"before")
            await store.get_meta("x")  # the loop's read connection is open too
            if removed == "directory":
                shutil.rmtree(directory)
            else:
                (directory / "cache.db").unlink()
            with caplog.at_level(logging.WARNING, logger="seedcache"):
                assert await store.update("", key(2), lambda old: b"after") == b"after"
            assert "was removed or replaced while in use" in caplog.text
            assert (directory / "cache.db").is_file()
            assert await store.get("", key(2)) == b"after"
            assert await store.get("", key(1)) is None  # removed, as the user asked
            await store.put("", key(3), b"put")
            await store.set_meta("m", "v")
            await store.check()
        finally:
            await store.close()
        reopened = DiskStore(str(directory))
        try:
            assert await collect(reopened) == {("", key(2)): b"after", ("", key(3)): b"put"}
            assert await reopened.get_meta("m") == "v"
        finally:
            await reopened.close()

    async def test_a_removed_store_is_noticed_by_the_health_check(self, tmp_path: Path) -> None:
        directory = tmp_path / "disk"
        store = DiskStore(str(directory), timeout=LOCK_TIMEOUT)
        try:
            await store.put("", key(1), b"v")
            shutil.rmtree(directory)
            directory.write_text("a file where the store was")  # it cannot be created again
            with pytest.raises(StoreError, match="was removed while in use, and cannot be"):
                await store.check()
            with pytest.raises(StoreError, match="was removed while in use, and cannot be"):
                await store.update("", key(2), lambda old: b"lost")
            directory.unlink()
            await store.check()  # created again
            assert await store.update("", key(2), lambda old: b"kept") == b"kept"
        finally:
            await store.close()
        assert (directory / "cache.db").is_file()

    # diskcache leaves the connection of a Cache it failed to open to the collector, which warns
    # of it on Python 3.13: collected here, where the warning is expected.
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
    def test_a_file_that_is_not_a_database_is_a_store_error(self, tmp_path: Path) -> None:
        (tmp_path / "disk").mkdir()
        (tmp_path / "disk" / "cache.db").write_bytes(b"not a database " * 100)
        with pytest.raises(StoreError, match="cannot open the disk store") as caught:
            DiskStore(str(tmp_path / "disk"))
        assert "full" not in str(caught.value)
        gc.collect()

    @pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
    def test_a_store_that_cannot_be_opened_on_a_full_disk_says_the_disk_is_full(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # On a full disk SQLite cannot create a database's shared-memory file, and says only
        # "disk I/O error", even to a replay that would write nothing.
        (tmp_path / "disk").mkdir()
        (tmp_path / "disk" / "cache.db").write_bytes(b"not a database " * 100)
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(
            "proxy.stores.disk.shutil.disk_usage",
            lambda path: usage._replace(used=usage.total, free=4096),
        )
        with pytest.raises(StoreError) as caught:
            DiskStore(str(tmp_path / "disk"))
        assert str(caught.value).endswith("the disk holding it is full (4,096 bytes free)")
        gc.collect()


class TestFilesStore:
    """What the files store adds: a browsable layout, atomic files, cross-process locks."""

    @pytest.fixture
    async def files(self, tmp_path: Path) -> AsyncIterator[FilesStore]:
        store = FilesStore(str(tmp_path / "rec"), timeout=LOCK_TIMEOUT)
        yield store
        await store.close()

    async def test_open_store_spec(self, tmp_path: Path) -> None:
        store = open_store(f"files:{tmp_path / 'rec'}")
        assert isinstance(store, FilesStore)
        assert store.pretty is True
        assert store.description == f"files:{tmp_path / 'rec'}"
        with pytest.raises(ConfigError, match="needs a directory"):
            open_store("files:")

    @pytest.mark.parametrize("namespace", ["", "team-a"])
    async def test_its_directory_opened_as_a_disk_store_is_refused(
        self, files: FilesStore, tmp_path: Path, namespace: str
    ) -> None:
        await files.put(namespace, key(1), b"{}\n")
        before = sorted(p.name for p in (tmp_path / "rec").iterdir())

        with pytest.raises(ConfigError, match=f"use --store files:{tmp_path / 'rec'}$"):
            open_store(str(tmp_path / "rec"))
        assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == before  # no cache.db

    async def test_a_disk_store_opened_as_files_is_refused(self, tmp_path: Path) -> None:
        disk = DiskStore(str(tmp_path / "disk"))
        await disk.put("", key(1), b"{}")
        await disk.close()

        with pytest.raises(ConfigError, match=f"holds a disk store .*--store {tmp_path / 'disk'}"):
            open_store(f"files:{tmp_path / 'disk'}")
        opened = open_store(str(tmp_path / "disk"))  # as what it is, it opens
        try:
            assert await collect(opened) == {("", key(1)): b"{}"}
        finally:
            await opened.close()

    async def test_layout(self, files: FilesStore, tmp_path: Path) -> None:
        root = tmp_path / "rec"
        await files.put("", key(1), b'{\n  "a": 1\n}\n')
        await files.put("team-a", key(1), b"{}\n")
        assert (root / f"{key(1)}.json").read_bytes() == b'{\n  "a": 1\n}\n'
        assert (root / "team-a" / f"{key(1)}.json").read_bytes() == b"{}\n"
        mode = (root / f"{key(1)}.json").stat().st_mode & 0o777
        assert mode & 0o644 == 0o644  # readable like any other file, not mkstemp's 0600
        assert (root / ".locks" / ".gitignore").read_text() == "*\n"

    @pytest.mark.parametrize("namespace", ["..", ".", ".hidden", "a/b", "../x", "a b", "ns:1"])
    async def test_bad_namespace(self, files: FilesStore, namespace: str) -> None:
        with pytest.raises(StoreError, match="namespace"):
            await files.put(namespace, key(1), b"x")
        with pytest.raises(StoreError, match="namespace"):
            await files.get(namespace, key(1))

    async def test_a_namespace_windows_refuses_as_a_folder_is_used_and_warned_of_once(
        self, files: FilesStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Recordings under such names exist (on disk and in Redis too): never refused, but a
        # committed files store with one cannot be checked out on Windows.
        with caplog.at_level(logging.WARNING, logger="seedcache"):
            for namespace in ("aux", "aux", "Con.eu", "build.", "auxiliary", "com10"):
                await files.put(namespace, key(1), b"{}\n")
        warned = [r.getMessage() for r in caplog.records if "Windows refuses" in r.getMessage()]
        assert [message.split("'")[1] for message in warned] == ["aux", "Con.eu", "build."]
        assert await files.get("aux", key(1)) == b"{}\n"

    @pytest.mark.parametrize("bad", ["", "abc", "../" + key(1)[3:], key(1).upper(), key(1) + "0"])
    async def test_bad_key(self, files: FilesStore, bad: str) -> None:
        with pytest.raises(StoreError, match="not a seedcache key"):
            await files.put("", bad, b"x")

    async def test_half_written_value_is_never_visible(
        self, files: FilesStore, tmp_path: Path
    ) -> None:
        root = tmp_path / "rec"
        await files.put("", key(1), b'{"complete": true}')
        # What a crash before the rename leaves behind, plus files a user keeps next to them.
        (root / f".{key(1)}.json.k2j3h4.tmp").write_bytes(b'{"compl')
        (root / f".{key(2)}.json.a8s7d6.tmp").write_bytes(b'{"half')
        (root / "team-a").mkdir()
        (root / "team-a" / f".{key(3)}.json.zz.tmp").write_bytes(b"{")
        (root / "README.md").write_text("recordings\n")
        (root / "notakey.json").write_text("{}")
        (root / f"{key(4)}.json.orig").write_text("{}")
        assert await files.get("", key(1)) == b'{"complete": true}'
        assert await files.get("", key(2)) is None
        assert await files.get("team-a", key(3)) is None
        assert await collect(files) == {("", key(1)): b'{"complete": true}'}

    async def test_temp_files_a_killed_writer_left_are_removed_once_stale(
        self, tmp_path: Path
    ) -> None:
        # A process killed between writing a temp file and renaming it leaves the temp file in
        # a folder committed to git. Opening the store removes those no writer can still own.
        root = tmp_path / "rec"
        (root / "team-a").mkdir(parents=True)
        stale = [
            root / f".{key(1)}.json.k2j3h4.tmp",
            root / "team-a" / f".{key(2)}.json.a8s7d6.tmp",
            root / "..seedcache-meta.json.x1y2z3.tmp",
        ]
        fresh = root / f".{key(3)}.json.q9w8e7.tmp"  # a write in progress, maybe
        not_ours = [root / "notes.tmp", root / f".{key(4)}.json.tmp", root / "team-a" / "x.tmp"]
        for path in [*stale, fresh, *not_ours]:
            path.write_bytes(b'{"half')
        long_ago = time.time() - proxy.stores.files._STALE_TEMP - 60
        for path in [*stale, *not_ours]:
            os.utime(path, (long_ago, long_ago))

        store = FilesStore(str(root))
        await store.close()

        assert [path.exists() for path in stale] == [False] * len(stale)
        assert fresh.exists()
        assert all(path.exists() for path in not_ours)

    async def test_failed_write_keeps_old_value_and_no_temp_file(
        self, files: FilesStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        await files.put("", key(1), b"old")

        def no_space(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", no_space)
        with pytest.raises(StoreError, match="No space left"):
            await files.put("", key(1), b"new")
        monkeypatch.undo()
        assert await files.get("", key(1)) == b"old"
        assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == [".locks", f"{key(1)}.json"]

    async def test_unchanged_update_does_not_rewrite(
        self, files: FilesStore, tmp_path: Path
    ) -> None:
        await files.put("", key(1), b"same")
        path = tmp_path / "rec" / f"{key(1)}.json"
        inode = path.stat().st_ino
        assert await files.update("", key(1), lambda old: old) == b"same"
        assert path.stat().st_ino == inode

    async def test_lock_held_by_another_process_times_out(self, tmp_path: Path) -> None:
        store = FilesStore(str(tmp_path / "rec"), timeout=0.3)
        await store.put("", key(1), b"v")
        # A separate open file description conflicts like another process would.
        lock = tmp_path / "rec" / ".locks" / f"rec-{key(1)[:2]}.lock"
        with lock.open("rb") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            started = time.monotonic()
            with pytest.raises(StoreError, match="another seedcache process"):
                await store.update("", key(1), lambda old: b"w")
            assert time.monotonic() - started < 2
            # Reads never wait for the lock.
            assert await store.get("", key(1)) == b"v"
        assert await store.update("", key(1), lambda old: b"w") == b"w"

    async def test_meta_file(self, files: FilesStore, tmp_path: Path) -> None:
        await files.set_meta("fingerprint:b", "fp_2")
        await files.set_meta("fingerprint:a", "fp_1")
        text = (tmp_path / "rec" / ".seedcache-meta.json").read_text()
        assert text == '{\n  "fingerprint:a": "fp_1",\n  "fingerprint:b": "fp_2"\n}\n'

    async def test_files_saved_with_a_byte_order_mark_read_as_without(
        self, files: FilesStore, tmp_path: Path
    ) -> None:
        # A recording or the meta file fixed by hand in a Windows editor that writes one.
        value = b'{\r\n  "format": "seedcache.recording/1"\r\n}\r\n'
        await files.put("team", key(1), value)
        await files.set_meta("fingerprint:a", "fp_1")
        for path in (
            tmp_path / "rec" / "team" / f"{key(1)}.json",
            tmp_path / "rec" / ".seedcache-meta.json",
        ):
            path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())

        assert await files.get("team", key(1)) == value
        assert [stored async for _, _, stored in files.scan()] == [value]
        assert await files.get_meta("fingerprint:a") == "fp_1"
        assert await files.damaged_meta() is None

    async def test_a_damaged_meta_file_means_unknown_fingerprints(
        self, files: FilesStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Two branches recorded different fingerprints: git leaves conflict markers.
        await files.set_meta("fingerprint:a", "fp_1")
        await files.set_meta("isolation-salt", "salt")
        meta = tmp_path / "rec" / ".seedcache-meta.json"
        text = meta.read_text()
        damaged = f"<<<<<<< HEAD\n{text}=======\n{text.replace('fp_1', 'fp_2')}>>>>>>> b\n"
        assert await files.damaged_meta() is None
        meta.write_text(damaged)
        assert await files.damaged_meta() == str(meta)  # the pytest plugin's summary says so
        with caplog.at_level(logging.WARNING, logger="seedcache"):
            assert await files.get_meta("fingerprint:a") is None
            assert await files.get_meta("fingerprint:b") is None
            await files.set_meta("fingerprint:a", "fp_3")
            await files.check()
        assert meta.read_text() == damaged  # left for the user to resolve
        [warning] = [r.getMessage() for r in caplog.records]
        assert warning.startswith(f"{meta} is not a JSON object (a merge conflict?)")
        assert "delete it to forget the current fingerprints" in warning
        # The isolation salt may be in the damaged file: a new one would orphan recordings.
        with pytest.raises(StoreError, match="not a JSON object: Fix it"):
            await files.add_meta("isolation-salt", "other")
        meta.write_text(text)
        assert await files.get_meta("fingerprint:a") == "fp_1"
        assert await files.damaged_meta() is None
        meta.write_text("[1, 2")  # damaged again, after it was fixed: warned again
        assert await files.get_meta("fingerprint:a") is None
        assert len(caplog.records) == 2

    async def test_audit_file_one_line_per_event(self, files: FilesStore, tmp_path: Path) -> None:
        await files.append_event(b'{"a": 1}')
        await files.append_event(b'{\n  "b": 2\n}\n')  # pretty JSON becomes one line
        log = tmp_path / "rec" / ".audit" / "events.jsonl"
        assert log.read_bytes() == b'{"a": 1}\n{"b":2}\n'
        # Runtime state, kept out of the recordings' git history like the lock files.
        assert (log.parent / ".gitignore").read_text() == "*\n"
        with pytest.raises(StoreError, match="must be JSON"):
            await files.append_event(b"not\njson")
        with pytest.raises(StoreError, match="must be JSON"):
            await files.append_event(b"plain text")

    async def test_torn_audit_line_is_skipped(self, files: FilesStore, tmp_path: Path) -> None:
        await files.append_event(b'{"a": 1}')
        with (tmp_path / "rec" / ".audit" / "events.jsonl").open("ab") as log:
            log.write(b'{"torn": ')  # a crash mid-append
        assert await all_events(files) == [b'{"a": 1}']  # an unfinished last line is not read
        await files.append_event(b'{"b": 2}')
        assert await all_events(files) == [b'{"a": 1}', b'{"b": 2}']

    async def test_events_an_earlier_version_wrote_beside_the_recordings_are_read_first(
        self, files: FilesStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        old = tmp_path / "rec" / ".audit.jsonl"
        old.write_bytes(b'{"old": 1}\n{"old": 2}\n{"old": 3}\n')
        monkeypatch.setattr(proxy.stores.files, "_EVENTS_PAGE", 2)  # pages end inside each file
        await files.append_event(b'{"new": 1}')
        await files.append_event(b'{"new": 2}')
        assert await all_events(files) == [
            b'{"old": 1}',
            b'{"old": 2}',
            b'{"old": 3}',
            b'{"new": 1}',
            b'{"new": 2}',
        ]
        assert old.read_bytes() == b'{"old": 1}\n{"old": 2}\n{"old": 3}\n'  # never written


class TestRedisStore:
    """What the Redis store adds: its key layout, cross-proxy locks, surviving a restart."""

    @pytest.fixture
    async def rstore(self, redis_url: str) -> AsyncIterator[RedisStore]:
        store = RedisStore(redis_url)
        yield store
        await store.close()

    async def test_open_store_spec(self, redis_url: str) -> None:
        store = open_store(redis_url)
        assert isinstance(store, RedisStore)
        assert store.pretty is False
        await store.close()

    async def test_key_layout(self, rstore: RedisStore, redis_url: str) -> None:
        await rstore.put("team-a", key(1), b"a")
        await rstore.put("", key(2), b"b")
        await rstore.set_meta("fingerprint:m", "fp_1")
        await rstore.append_event(b'{"e": 1}')
        raw = redis.Redis.from_url(redis_url)
        try:
            assert raw.get(f"seedcache:team-a:rec:{key(1)}") == b"a"
            assert raw.get(f"seedcache::rec:{key(2)}") == b"b"
            assert raw.hgetall("seedcache:meta") == {b"fingerprint:m": b"fp_1"}
            assert raw.type("seedcache:audit") == b"stream"
            # Other keys under the prefix are not recordings.
            raw.set("seedcache:lock:" + key(3), b"token")
            raw.set("seedcache:x:rec:not-a-key", b"junk")
        finally:
            raw.close()
        assert await collect(rstore) == {("team-a", key(1)): b"a", ("", key(2)): b"b"}

    async def test_acquire_release(self, rstore: RedisStore) -> None:
        holder = await rstore.acquire(key(1), 10_000)
        assert holder.ours
        # The others are told who holds it: the same token until it is released.
        assert await rstore.acquire(key(1), 10_000) == Holder(holder.token, ours=False)
        await rstore.release(key(1), "not-the-token")  # someone else's release does nothing
        assert await rstore.acquire(key(1), 10_000) == Holder(holder.token, ours=False)
        await rstore.release(key(1), holder.token)
        again = await rstore.acquire(key(1), 10_000)
        assert again.ours and again.token != holder.token
        await rstore.release(key(1), again.token)

    async def test_lock_expires(self, rstore: RedisStore) -> None:
        stale = await rstore.acquire(key(1), 50)
        assert stale.ours
        await asyncio.sleep(0.15)
        fresh = await rstore.acquire(key(1), 10_000)
        assert fresh.ours
        # The expired holder cannot free the new holder's lock.
        await rstore.release(key(1), stale.token)
        assert await rstore.acquire(key(1), 10_000) == Holder(fresh.token, ours=False)
        await rstore.release(key(1), fresh.token)

    async def test_down_then_back(self, own_redis_server: RedisServer) -> None:
        store = RedisStore(own_redis_server.url())
        try:
            await store.put("", key(1), b"v")
            own_redis_server.stop()
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: store.get("", key(1)),
                lambda: store.update("", key(1), lambda old: b"w"),
                lambda: store.set_meta("m", "v"),
            ]
            for call in calls:
                started = time.monotonic()
                with pytest.raises(
                    StoreError, match=r"cannot reach Redis at redis://127\.0\.0\.1:"
                ):
                    await call()
                assert time.monotonic() - started < 1.5
            own_redis_server.start()  # same port, empty (no persistence)
            assert own_redis_server.url() == store.description
            assert await store.get("", key(1)) is None
            await store.put("", key(1), b"again")
            assert await store.get("", key(1)) == b"again"
            # A restart between two calls: the pooled connection is dead, the next call
            # reconnects without an error.
            own_redis_server.stop()
            own_redis_server.start()
            await store.put("", key(1), b"third")
            assert await store.get("", key(1)) == b"third"
        finally:
            await store.close()

    async def test_unreachable_error_hides_credentials(self) -> None:
        url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0?password=s3cret"
        store = RedisStore(url)
        assert "s3cret" not in store.description
        with pytest.raises(StoreError) as caught:
            await store.get("", key(1))
        assert "s3cret" not in str(caught.value)
        assert str(caught.value).startswith("cannot reach Redis at redis://127.0.0.1:")
        await store.close()

    async def test_bad_url_is_config_error(self) -> None:
        with pytest.raises(ConfigError):
            RedisStore("redis://127.0.0.1:notaport/0")
        with pytest.raises(ConfigError, match="decode_responses"):
            RedisStore("redis://127.0.0.1:6379/0?decode_responses=true")
