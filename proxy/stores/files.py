"""The files store (`files:DIR`): one pretty-printed JSON file per recording, for committing to git.

Layout: `DIR/<key>.json`, or `DIR/<namespace>/<key>.json`, and the current fingerprints in
`DIR/.seedcache-meta.json`, all committed; audit events in `DIR/.audit/events.jsonl` and advisory
locks in `DIR/.locks/`, each folder ignoring itself in git (a `.gitignore` of `*`). A file is
written as a temp file beside it, `.<name>.<random>.tmp`, then renamed.

Writers exclude each other with advisory file locks (fcntl.flock), which Windows lacks: there the
store replays what was recorded elsewhere (CI on a Windows runner) and refuses every write,
saying why, before it takes any lock or touches any file.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from proxy.errors import StoreError
from proxy.keys import NAMESPACE, unportable
from proxy.stores.base import DELETE, Updater

try:
    import fcntl

    WRITABLE = True
except ImportError:  # Windows
    WRITABLE = False

T = TypeVar("T")
log = logging.getLogger("seedcache")

# No leading dot: "." and ".." would leave DIR, and hidden names (.locks, .audit) are ours.
_KEY = re.compile(r"[0-9a-f]{64}")
_KEY_FILE = re.compile(r"([0-9a-f]{64})\.json")

_META_FILE = ".seedcache-meta.json"
# Audit events are runtime state, like locks: every record or audit run appends to them, and a
# committed log would conflict between branches, so they live in a folder that keeps itself out
# of git. Earlier versions wrote them to DIR/.audit.jsonl: that file is still read, before the
# folder, and never written. It is not moved either: git may track it, and a checkout bringing
# the committed copy back would then count its events twice.
_AUDIT = ".audit"
_AUDIT_FILE = "events.jsonl"
_OLD_AUDIT_FILE = ".audit.jsonl"
_LOCKS = ".locks"
_META_FIX = (
    'Fix it (its members are "fingerprint:<upstream>|<model>": "<fingerprint>", with <upstream> '
    '"*" for the fingerprint seen through any upstream), or delete it to forget the current '
    "fingerprints."
)
# What `_write` names its temp files: .<key>.json.<random>.tmp, ..seedcache-meta.json.<random>.tmp.
_TEMP_FILE = re.compile(rf"\.(?:[0-9a-f]{{64}}\.json|{re.escape(_META_FILE)})\.\w+\.tmp")
# A temp file untouched for this long has no writer left (one renames it within seconds): it was
# left by a process killed before the rename, and is removed when the store is opened.
_STALE_TEMP = 600.0
# Audit lines read per worker-thread call while iterating `events()`.
_EVENTS_PAGE = 1000
# Longest pause between two attempts to take a lock another process holds.
_MAX_POLL = 0.02


def _current_umask() -> int:
    # Linux reports the umask in /proc; os.umask can only read it by setting it, which would
    # briefly change it for threads already running when this module is first imported.
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; recordings should get the mode any other new file would get.
_FILE_MODE = 0o666 & ~_current_umask()


def recording_file(directory: str, namespace: str, key: str) -> str:
    """The file that holds recording `key` of `namespace` in the files store at `directory`."""
    return os.path.join(directory, namespace, f"{key}.json")


# diskcache's folders of values too large for its database.
_VALUE_FOLDER = re.compile(r"[0-9a-f]{2}")


def holds_recordings(directory: str, *, beside_database: bool = False) -> bool:
    """True when `directory` holds recording files, `<key>.json`, also in namespace folders: the
    directory of a files store. `beside_database`: it holds a disk store's cache.db too, whose
    folders of large values (two hex digits each, thousands of files) are not looked into."""
    folders: list[str] = []
    try:
        for entry in _entries(Path(directory)):
            if _KEY_FILE.fullmatch(entry.name) and entry.is_file():
                return True
            if beside_database and _VALUE_FOLDER.fullmatch(entry.name):
                continue
            if NAMESPACE.fullmatch(entry.name) and entry.is_dir():
                folders.append(entry.path)
        return any(
            _KEY_FILE.fullmatch(inner.name) and inner.is_file()
            for folder in folders
            for inner in _entries(Path(folder))
        )
    except OSError:
        return False  # unreadable: opening the store will say why


class FilesStore:
    """Recordings as JSON files in a directory, written atomically and locked against other
    processes, so parallel test workers and `serve --workers N` can record at once.

    Reads and writes run in worker threads: the directory is often a git checkout on a slow or
    network filesystem, where even a small open() has no upper bound; a thread hop costs ~50 µs.
    Reads take no lock: a value is only ever replaced by a rename, so a reader sees the old file
    or the new one, never half of one.

    A store belongs to the event loop that uses it (like an aiohttp ClientSession).
    """

    pretty = True

    def __init__(self, directory: str, *, timeout: float = 2.0) -> None:
        self.description = f"files:{directory}"
        self._root = Path(directory)
        self._timeout = timeout
        # Same-process writers to one lock queue here instead of each holding a worker thread
        # while it polls the file lock; the file lock is what excludes other processes.
        self._queues: dict[str, asyncio.Lock] = {}
        # The meta file was found damaged and that was logged: once, until it reads again.
        self._meta_damaged = False
        self._warned: set[str] = set()  # namespaces warned of as folder names Windows refuses
        # Namespaces written to, each with the folders there whose names differ only in case.
        self._cased: dict[str, list[str]] = {}
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot open the files store at {directory!r}: {exc}") from None
        _remove_stale_temps(self._root)

    async def get(self, namespace: str, key: str) -> bytes | None:
        return await self._off_loop(_read, self._path(namespace, key))

    async def update(self, namespace: str, key: str, fn: Updater) -> bytes | None:
        path = self._path(namespace, key)
        self._warn_if_unportable(namespace)
        work = functools.partial(self._update, path, fn)
        return await self._locked(_record_lock(key), functools.partial(self._in, namespace, work))

    async def put(self, namespace: str, key: str, value: bytes) -> None:
        # Locked too, so a put cannot fall between the read and the write of another's update.
        path = self._path(namespace, key)
        self._warn_if_unportable(namespace)
        work = functools.partial(_write, path, value)
        await self._locked(_record_lock(key), functools.partial(self._in, namespace, work))

    def _in(self, namespace: str, work: Callable[[], T]) -> T:
        """`work`, a write into `namespace`, off the loop. Before the first one, once per
        namespace: the folders whose names differ from it only in case, which are the same
        folder on macOS and Windows (a directory listing, so not on the loop)."""
        if namespace and namespace not in self._cased:
            folded = namespace.casefold()
            self._cased[namespace] = clashes = sorted(
                entry.name
                for entry in _entries(self._root)
                # On a case-insensitive file system the folder found may be the namespace's
                # own, created under another case: that is the clash this looks for.
                if entry.name != namespace and entry.name.casefold() == folded and entry.is_dir()
            )
            if clashes:
                log.warning(
                    "namespace %r of the files store at %r differs only in letter case from "
                    "%s there: on macOS and Windows they are one folder, so the recordings of "
                    "one are written into the other's, and a checkout elsewhere misses them; "
                    "prefer names that differ otherwise",
                    namespace,
                    self.description,
                    ", ".join(map(repr, clashes)),
                )
        return work()

    def _warn_if_unportable(self, namespace: str) -> None:
        """Once per namespace: a folder of this name cannot be checked out on Windows."""
        if namespace and namespace not in self._warned and unportable(namespace):
            self._warned.add(namespace)
            log.warning(
                "namespace %r of the files store at %r is a folder name Windows refuses (a "
                "device name such as con or aux, or a trailing '.'): a checkout there cannot "
                "create it; prefer another name if the recordings are committed",
                namespace,
                self.description,
            )

    async def delete(self, namespace: str, key: str) -> bool:
        path = self._path(namespace, key)
        return await self._locked(_record_lock(key), functools.partial(_unlink, path))

    async def scan(self) -> AsyncIterator[tuple[str, str, bytes]]:
        for namespace, key, path in await self._off_loop(self._list):
            value = await self._off_loop(_read, path)
            if value is not None:  # deleted since it was listed
                yield namespace, key, value

    async def names(self) -> AsyncIterator[tuple[str, str]]:
        for namespace, key, _ in await self._off_loop(self._list):
            yield namespace, key

    async def get_meta(self, name: str) -> str | None:
        value = (await self._off_loop(self._read_meta) or {}).get(name)
        return value if isinstance(value, str) else None

    async def check(self) -> None:
        await self.get_meta("health")

    async def damaged_meta(self) -> str | None:
        """The meta file's path when it is damaged (a merge conflict): the current fingerprints
        are unknown until it is resolved. None when it reads, or there is none."""
        damaged = await self._off_loop(self._read_meta) is None
        return str(self._root / _META_FILE) if damaged else None

    def unportable_namespaces(self) -> list[str]:
        """The namespaces written to that are folder names Windows refuses (warned of once)."""
        return sorted(self._warned)

    def case_clashes(self) -> list[list[str]]:
        """[namespace, folder] for each namespace written to and each folder of the store whose
        name differs from it only in case (warned of once)."""
        return sorted([ns, other] for ns, others in self._cased.items() for other in others)

    async def set_meta(self, name: str, value: str) -> None:
        await self._locked("meta", functools.partial(self._set_meta, name, value))

    async def add_meta(self, name: str, value: str) -> str:
        return await self._locked("meta", functools.partial(self._add_meta, name, value))

    def _add_meta(self, name: str, value: str) -> str:
        data = self._read_meta()
        if data is None:
            # The value may be in the damaged file (the isolation salt): one made up here would
            # orphan every recording made with it.
            raise StoreError(f"{self._root / _META_FILE} is not a JSON object: {_META_FIX}")
        held = data.get(name)
        if isinstance(held, str):
            return held
        self._set_meta(name, value)
        return value

    async def append_event(self, event: bytes) -> None:
        line = event.strip()
        # Checked here because `events` skips lines that are not JSON (torn by a crash).
        try:
            parsed = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise StoreError(f"an audit event must be JSON: {exc}") from None
        if b"\n" in line:
            # One event per line: JSON strings cannot hold a raw newline, so these are only
            # whitespace and compacting the document keeps its meaning.
            line = orjson.dumps(parsed)
        await self._locked("audit", functools.partial(self._append_event, line + b"\n"))

    async def events(self) -> AsyncIterator[bytes]:
        # Those an earlier version wrote into DIR itself are older than any in .audit/.
        for path in (self._root / _OLD_AUDIT_FILE, self._root / _AUDIT / _AUDIT_FILE):
            offset, done = 0, False
            while not done:
                lines, offset, done = await self._off_loop(_read_events, path, offset)
                for line in lines:
                    yield line

    async def close(self) -> None:
        """Nothing to release: every call opens and closes its own files."""

    # -- layout -----------------------------------------------------------------------------

    def _path(self, namespace: str, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise StoreError(f"{key!r} is not a seedcache key (64 lowercase hex digits)")
        if namespace and not NAMESPACE.fullmatch(namespace):
            raise StoreError(
                f"namespace {namespace!r} cannot be a directory of the files store: use letters, "
                "digits, '.', '_' and '-', not starting with '.'"
            )
        return Path(recording_file(str(self._root), namespace, key))

    def _list(self) -> list[tuple[str, str, Path]]:
        found: list[tuple[str, str, Path]] = []
        for entry in _entries(self._root):
            match = _KEY_FILE.fullmatch(entry.name)
            if match and entry.is_file():
                found.append(("", match[1], Path(entry.path)))
            elif entry.name and NAMESPACE.fullmatch(entry.name) and entry.is_dir():
                for inner in _entries(Path(entry.path)):
                    match = _KEY_FILE.fullmatch(inner.name)
                    if match and inner.is_file():
                        found.append((entry.name, match[1], Path(inner.path)))
        # Temp files (.<key>.json.*.tmp), lock files and anything else a user keeps here
        # do not match and are skipped.
        return sorted(found)

    # -- work done in a worker thread -------------------------------------------------------

    def _update(self, path: Path, fn: Updater) -> bytes | None:
        old = _read(path)
        new = fn(old)
        if new is DELETE:
            _unlink(path)  # under the key's lock, as the read: no write falls in between
            return None
        if new is None or new == old:
            # An unchanged value is not rewritten, so the file (and git) stay untouched.
            return old
        _write(path, new)
        return new

    def _read_meta(self) -> dict[str, Any] | None:
        """The meta file's members ({} when there is none), or None when it is damaged (a
        merge conflict): the current fingerprints are then unknown, which matches any sample,
        so every recording still replays."""
        path = self._root / _META_FILE
        raw = _read(path)
        if raw is None:
            return {}
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            if not self._meta_damaged:
                self._meta_damaged = True
                log.warning(
                    "%s is not a JSON object (a merge conflict?): the current fingerprints are "
                    "unknown, so recordings of any fingerprint replay, and new ones are not "
                    "saved to it until it is fixed. %s",
                    path,
                    _META_FIX,
                )
            return None
        self._meta_damaged = False
        return data

    def _set_meta(self, name: str, value: str) -> None:
        data = self._read_meta()
        if data is None:
            return  # damaged: left for the user to resolve, not overwritten (logged)
        if data.get(name) == value:
            return
        data[name] = value
        text = orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        _write(self._root / _META_FILE, text)

    def _append_event(self, line: bytes) -> None:
        path = self._root / _AUDIT / _AUDIT_FILE
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT
        try:
            fd = os.open(path, flags, 0o666)
        except FileNotFoundError:
            _make_ignored_dir(path.parent)
            fd = os.open(path, flags, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A crash mid-append left a line without its newline: start a fresh line
                # rather than glue this event onto it.
                line = b"\n" + line
            # O_APPEND: every write lands at the end even if another writer ignored the lock.
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _with_file_lock(self, name: str, work: Callable[[], T]) -> T:
        if not WRITABLE:
            raise StoreError(
                f"the files store at {str(self._root)!r} can only replay on this system: it has "
                "no file locks (fcntl) to keep writers from overwriting each other's "
                "recordings. Record on Linux or macOS, or into a disk or redis:// store"
            )
        path = self._root / _LOCKS / f"{name}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:
            _make_ignored_dir(path.parent)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            self._flock(fd, path)
            return work()
        finally:
            os.close(fd)  # releases the lock

    def _flock(self, fd: int, path: Path) -> None:
        # flock has no timeout; poll so a lock held by a stuck process becomes an error, not a
        # stall. A process that dies releases its flock, so a crash never leaves one behind.
        deadline = time.monotonic() + self._timeout
        pause = 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"the files store at {str(self._root)!r} stayed locked for "
                        f"{self._timeout:g} s ({path}): another seedcache process is holding it"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, _MAX_POLL)

    # -- running it -------------------------------------------------------------------------

    async def _locked(self, name: str, work: Callable[[], T]) -> T:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = asyncio.Lock()
        async with queue:
            return await self._off_loop(self._with_file_lock, name, work)

    def _call(self, method: Callable[..., T], *args: Any) -> T:
        try:
            return method(*args)
        except OSError as exc:
            raise StoreError(f"the files store at {str(self._root)!r} failed: {exc}") from None

    async def _off_loop(self, method: Callable[..., T], *args: Any) -> T:
        call = functools.partial(self._call, method, *args)
        return await asyncio.get_running_loop().run_in_executor(None, call)


def _record_lock(key: str) -> str:
    # 256 lock files, striped by the key's first byte: a lock file can never be deleted safely
    # (a process waiting on the old inode would not exclude one locking a new file), so one per
    # key would grow without bound. Two keys sharing a stripe only wait for each other briefly.
    return f"rec-{key[:2]}"


def _make_ignored_dir(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if not ignore.exists():
        # Lock files and audit events are runtime state: keep them out of the recordings' git
        # history, whatever the project's own .gitignore says.
        ignore.write_text("*\n")


def _remove_stale_temps(root: Path) -> None:
    """Remove the temp files that writes killed before their rename left in `root` and its
    namespace folders: the folder is committed, and `git add` would take them in. Best effort:
    another process may remove one first, or the folder be read-only."""
    now = time.time()
    removed = 0
    try:
        entries = _entries(root)
        for folder in [e for e in entries if NAMESPACE.fullmatch(e.name) and e.is_dir()]:
            entries += _entries(Path(folder.path))
    except OSError:
        return
    for entry in entries:
        if _TEMP_FILE.fullmatch(entry.name):
            with contextlib.suppress(OSError):
                if now - entry.stat(follow_symlinks=False).st_mtime > _STALE_TEMP:
                    os.unlink(entry.path)
                    removed += 1
    if removed:
        log.info("removed %d temp files left in %s by writes that never finished", removed, root)


def _read_events(path: Path, offset: int) -> tuple[list[bytes], int, bool]:
    """Up to a page of the events in the log at `path` from `offset`: the events, the offset
    after them, and whether the end was reached."""
    lines: list[bytes] = []
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            while len(lines) < _EVENTS_PAGE:
                line = file.readline()
                if not line.endswith(b"\n"):
                    # End of file, or a line still being appended: stop before it.
                    return lines, offset, True
                offset += len(line)
                line = line.strip()
                if line and _is_json(line):  # not a line torn by a crash
                    lines.append(line)
    except FileNotFoundError:
        return lines, offset, True
    return lines, offset, False


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


def _read(path: Path) -> bytes | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    # A file saved by a Windows editor (PowerShell 5.1's UTF8, Visual Studio) may start with a
    # byte order mark, which JSON parsers may ignore (RFC 8259 §8.1) and orjson refuses.
    return raw.removeprefix(codecs.BOM_UTF8)


def _write(path: Path, value: bytes) -> None:
    """Replace `path` with `value` atomically: readers see the old bytes or the new, never half."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    # The temp file is in the same directory so the rename cannot cross filesystems, and its
    # name (.<key>.json.*.tmp) is one `scan` skips, so a crash before the rename leaves no value
    # (and a temp file that the next opening of the store removes, `_remove_stale_temps`).
    fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(value)
            file.flush()
            os.fchmod(file.fileno(), _FILE_MODE)
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable: without it a power cut can bring back the old file.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _is_json(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True
