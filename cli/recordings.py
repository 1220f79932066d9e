"""`seedcache ls`, `show`, `rm`, `prune`, `export` and `import`: look after the recordings in a
store (DESIGN §8). What a recording is stays in `proxy.recording`; how it is kept, in
`proxy.stores`."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
import redis.connection

from cli.options import counted, progress, require_store, shown, store_option, store_spec
from proxy.audit import parse_since
from proxy.config import StoreSpec
from proxy.errors import ConfigError, FormatError, SeedcacheError
from proxy.keys import normalise_path
from proxy.recording import (
    EARLIEST,
    Recording,
    Sample,
    printable,
    printable_json,
    recorded_at,
    redact_path,
)
from proxy.stores.base import DELETE, Delete, Store, open_store
from proxy.stores.files import recording_file

F = TypeVar("F", bound=Callable[..., Any])

KEY_SHOWN = 12  # hex digits of a key printed by `ls`, enough to be a unique prefix in practice
_HEX = re.compile(r"[0-9a-f]+")
_CANDIDATES_SHOWN = 10


@dataclass(frozen=True, slots=True)
class Found:
    """A stored recording as `Store.scan` yields it: where it is held, and its bytes."""

    namespace: str
    key: str
    raw: bytes


# --- pure helpers -------------------------------------------------------------------------------


def matches_model(recording: Recording, sample: Sample | None, model: str) -> bool:
    """True when `model` is the requested model or the model a sample was answered by."""
    if recording.model == model:
        return True
    samples = recording.samples if sample is None else (sample,)
    return any(s.model == model for s in samples)


def drop_samples(
    recording: Recording,
    *,
    before: datetime | None = None,
    model: str | None = None,
    fingerprint: str | None = None,
) -> Recording:
    """`recording` without the samples that match every filter given."""

    def goes(sample: Sample) -> bool:
        if before is not None:
            moment = recorded_at(sample)
            # A sample whose time cannot be read is kept: pruning is about age, and its age is
            # unknown.
            if moment is None or moment >= before:
                return False
        if model is not None and not matches_model(recording, sample, model):
            return False
        return fingerprint is None or sample.system_fingerprint == fingerprint

    return replace(recording, samples=tuple(s for s in recording.samples if not goes(s)))


def merge(existing: Recording, incoming: Recording) -> Recording:
    """`existing` with every sample of `incoming` it lacks added, oldest first.

    A sample `existing` already holds, exactly, is left where it is: under `--repeat sequence`
    a sample's place is the request it answers, and a run that got the same answer twice holds
    it twice, which `with_sample` would fold into one. `with_sample` adds the others; sorting by
    time afterwards keeps the newest sample last, which is the one replay prefers (DESIGN §4).
    """
    lacking = [sample for sample in incoming.samples if sample not in existing.samples]
    if not lacking:
        return existing
    merged = existing
    for sample in lacking:
        merged = merged.with_sample(sample)
    ordered = sorted(merged.samples, key=lambda s: recorded_at(s) or EARLIEST)
    return replace(merged, samples=tuple(ordered))


def resolve(prefix: str, found: Iterable[Found], where: str) -> Found:
    """The one recording whose key starts with `prefix`; an error when none or several do."""
    wanted = prefix.strip().lower()
    if not _HEX.fullmatch(wanted):
        raise SeedcacheError(f"{prefix!r} is not a key or a key prefix (hex digits)")
    candidates = [f for f in found if f.key.startswith(wanted)]
    if not candidates:
        raise SeedcacheError(
            f"no recording in {where} has a key starting with {wanted!r}; `seedcache ls` lists them"
        )
    if len(candidates) > 1:
        ordered = sorted(candidates, key=lambda f: f.key)
        listed = [
            f"  {f.key}" + (f" (namespace {f.namespace})" if f.namespace else "")
            for f in ordered[:_CANDIDATES_SHOWN]
        ]
        more = len(candidates) - len(listed)
        if more:
            listed.append(f"  … and {more} more")
        raise SeedcacheError(
            f"key prefix {wanted!r} matches {len(candidates)} recordings in {where}; "
            "give more digits:\n" + "\n".join(listed)
        )
    return candidates[0]


def _fingerprints_text(fingerprints: list[str | None]) -> str:
    known = [f for f in fingerprints if f is not None]
    return ",".join(known) if known else "-"


def _describe(recording: Recording) -> str:
    model = recording.model or "-"
    path = redact_path(recording.path)
    # Whatever a client sent (or a file in a pull request says) must not drive the terminal.
    return printable(f"{recording.key[:KEY_SHOWN]} {recording.method} {path} {model}")


# --- store access -------------------------------------------------------------------------------


@asynccontextmanager
async def _opened(spec: str) -> AsyncIterator[Store]:
    store = open_store(spec)
    try:
        yield store
    finally:
        await store.close()


async def _scan(store: Store) -> list[Found]:
    return [Found(namespace, key, raw) async for namespace, key, raw in store.scan()]


def _load(found: Found) -> Recording | None:
    """The recording, under the key it is stored under, or None (with a warning) when its bytes
    cannot be read."""
    try:
        recording = Recording.loads(found.raw)
    except FormatError as exc:
        click.echo(f"seedcache: skipping {found.key[:KEY_SHOWN]}: {exc}", err=True)
        return None
    if _misnamed(found, recording):
        recording = recording.stored_under(found.key)
    return recording


def _misnamed(found: Found, recording: Recording) -> bool:
    """Whether the recording's `key` member is not the key it is stored under (a files store's
    file copied or renamed by hand), which is said on stderr. Requests find a recording by the
    key it is stored under, so that is the key the commands show and act on."""
    if recording.key == found.key:
        return False
    click.echo(
        f"seedcache: {found.key[:KEY_SHOWN]} holds a recording whose `key` member is "
        f"{printable(recording.key[:KEY_SHOWN])} (a copy under another name?): requests find it as "
        f"{found.key[:KEY_SHOWN]}, the key it is stored under, and so do these commands",
        err=True,
    )
    return True


def _namespace(found: Found, recording: Recording) -> str:
    # The disk store keeps no namespace of its own (the key already depends on it), so it scans
    # everything as ""; the recording itself says which namespace it was made in.
    return recording.namespace or found.namespace


# --- ls -----------------------------------------------------------------------------------------


@click.command()
@store_option
@click.option("--model", help="Only recordings of this model (requested or answered).")
@click.option("--path", help="Only recordings of this endpoint, e.g. /v1/chat/completions.")
@click.option("--namespace", help="Only recordings of this namespace ('' for the default one).")
@click.option("--fingerprint", help="Only recordings with a sample of this system_fingerprint.")
@click.option("--since", help="Only recordings with a sample since an ISO date or 30m, 24h, 7d.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, with full keys.")
def ls(
    store: str | None,
    model: str | None,
    path: str | None,
    namespace: str | None,
    fingerprint: str | None,
    since: str | None,
    as_json: bool,
) -> None:
    """List the recordings, newest first.

    One line each: key prefix, endpoint, model, seed, samples, distinct fingerprints, when the
    newest sample was recorded, namespace.
    """
    try:
        moment = parse_since(since) if since else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    spec = store_spec(store)
    # Opening a store that does not exist would create it, and list a mistyped --store as empty.
    require_store(spec)
    found = asyncio.run(_scan_spec(spec))
    # Compared as listed: with a credential in the query string redacted.
    endpoint = redact_path(normalise_path(*path.partition("?")[::2])) if path else None
    rows = []
    for item in found:
        recording = _load(item)
        if recording is None:
            continue
        row = recording.summary(_namespace(item, recording))
        when = _newest_time(recording)
        if (
            (model is not None and not matches_model(recording, None, model))
            or (endpoint is not None and row["path"] != endpoint)
            or (namespace is not None and row["namespace"] != namespace)
            or (fingerprint is not None and fingerprint not in row["fingerprints"])
            or (moment is not None and (when is None or when < moment))
        ):
            continue
        rows.append((when or EARLIEST, row))
    rows.sort(key=lambda pair: pair[0], reverse=True)
    if as_json:
        click.echo(
            printable_json(json.dumps([row for _, row in rows], indent=2, ensure_ascii=False))
        )
        return
    if not rows:
        if found:
            click.echo(f"No recordings in {shown(spec)} match the filters ({len(found)} in all).")
        else:
            click.echo(
                f"No recordings in {shown(spec)} yet. Record some with `seedcache serve` "
                "(mode auto or record) and point OPENAI_BASE_URL at it."
            )
        return
    click.echo(_table([_columns(row) for _, row in rows]))


def _newest_time(recording: Recording) -> datetime | None:
    times = [t for t in map(recorded_at, recording.samples) if t is not None]
    return max(times, default=None)


async def _scan_spec(spec: str) -> list[Found]:
    async with _opened(spec) as store:
        return await _scan(store)


_HEADER = ("KEY", "PATH", "MODEL", "SEED", "SAMPLES", "FINGERPRINTS", "NEWEST", "NAMESPACE")


def _columns(row: dict[str, Any]) -> tuple[str, ...]:
    seed = row["seed"]
    return (
        row["key"][:KEY_SHOWN],
        row["path"] if row["method"] == "POST" else f"{row['method']} {row['path']}",
        row["model"] or "-",
        "-" if seed is None else str(seed),
        str(row["samples"]),
        _fingerprints_text(row["fingerprints"]),
        row["newest_recorded_at"] or "-",
        row["namespace"] or "-",
    )


def _table(rows: list[tuple[str, ...]]) -> str:
    # Models, paths, fingerprints and namespaces are what clients and upstreams sent: printable,
    # so that none can clear the screen or retitle the terminal of whoever lists them.
    lines = [tuple(map(printable, cells)) for cells in rows]
    widths = [max(len(cells[i]) for cells in (_HEADER, *lines)) for i in range(len(_HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
        for cells in (_HEADER, *lines)
    )


# --- show ---------------------------------------------------------------------------------------


@click.command()
@store_option
@click.argument("key")
def show(store: str | None, key: str) -> None:
    """Print the recording KEY (a unique prefix is enough) as pretty JSON."""
    spec = store_spec(store)
    require_store(spec)
    found = resolve(key, asyncio.run(_scan_spec(spec)), shown(spec))
    try:
        recording = Recording.loads(found.raw)
    except FormatError as exc:
        parsed = StoreSpec.parse(spec)
        where = (
            recording_file(parsed.location, found.namespace, found.key)
            if parsed.kind == "files"
            else f"in {parsed.shown}"
        )
        raise FormatError(
            f"recording {found.key} ({where}) cannot be read: {exc}. Fix it, or delete it "
            f"(seedcache rm --store {parsed.shown} {found.key[:KEY_SHOWN]}) to record it again"
        ) from None
    _misnamed(found, recording)  # shown as stored, `key` member included
    click.echo(printable_json(recording.dumps(pretty=True).decode()), nl=False)


# --- rm -----------------------------------------------------------------------------------------


@click.command()
@store_option
@click.argument("keys", nargs=-1, required=True)
def rm(store: str | None, keys: tuple[str, ...]) -> None:
    """Delete the recordings KEY... (unique prefixes are enough).

    Every prefix is resolved before anything is deleted, so a typo deletes nothing.
    """
    spec = store_spec(store)
    require_store(spec)
    asyncio.run(_rm(spec, keys))


async def _rm(spec: str, keys: tuple[str, ...]) -> None:
    async with _opened(spec) as store:
        found = await _scan(store)
        chosen = {item.key: item for item in (resolve(key, found, shown(spec)) for key in keys)}
        for item in chosen.values():
            if await store.delete(item.namespace, item.key):
                # An unreadable recording is often why it is removed: no warning about it.
                try:
                    recording = Recording.loads(item.raw).stored_under(item.key)
                    described = _describe(recording)
                except FormatError:
                    described = f"{item.key[:KEY_SHOWN]} (unreadable)"
                click.echo(f"removed {described}")
            else:
                click.echo(f"{item.key[:KEY_SHOWN]} was already gone")


# --- prune --------------------------------------------------------------------------------------


@click.command()
@store_option
@click.option(
    "--older-than",
    help="Drop samples recorded before an ISO date, or longer ago than a duration: 12h, 30d.",
)
@click.option("--model", help="Drop samples of this model (requested or answered).")
@click.option("--fingerprint", help="Drop samples with this system_fingerprint.")
@click.option("--dry-run", is_flag=True, help="Print what would be dropped; change nothing.")
def prune(
    store: str | None,
    older_than: str | None,
    model: str | None,
    fingerprint: str | None,
    dry_run: bool,
) -> None:
    """Drop old or unwanted samples from the recordings.

    A sample goes when it matches every filter given; a recording left without samples is
    deleted. At least one of --older-than, --model and --fingerprint is required.
    """
    if older_than is None and model is None and fingerprint is None:
        raise click.UsageError(
            "prune needs a filter: --older-than, --model or --fingerprint (see --help)"
        )
    try:
        before = parse_since(older_than) if older_than else None
    except ValueError:
        raise click.BadParameter(
            f"takes an ISO date (2026-11-01) or a duration (12h, 30d), got {older_than!r}",
            param_hint="--older-than",
        ) from None
    spec = store_spec(store)
    # A cleanup with a mistyped --store must not look like one with nothing to drop.
    require_store(spec)
    filters = _Filters(before, model, fingerprint)
    samples, recordings, deleted = asyncio.run(_prune(spec, filters, dry_run))
    if dry_run:
        click.echo(
            f"would drop {counted(samples, 'sample')} from {counted(recordings, 'recording')} "
            f"and delete {deleted} "
            "left without samples (dry run: nothing changed)"
        )
    else:
        click.echo(
            f"dropped {counted(samples, 'sample')} from {counted(recordings, 'recording')}; "
            f"deleted {deleted} "
            "left without samples"
        )


@dataclass(frozen=True, slots=True)
class _Filters:
    before: datetime | None
    model: str | None
    fingerprint: str | None

    def apply(self, recording: Recording) -> Recording:
        return drop_samples(
            recording, before=self.before, model=self.model, fingerprint=self.fingerprint
        )


async def _prune(spec: str, filters: _Filters, dry_run: bool) -> tuple[int, int, int]:
    samples = recordings = deleted = 0
    async with _opened(spec) as store:
        for item in await _scan(store):
            recording = _load(item)
            if recording is None:
                continue
            dropped = len(recording.samples) - len(filters.apply(recording).samples)
            if not dropped:
                continue
            if dry_run:
                left = len(recording.samples) - dropped
            else:
                left = await _prune_one(store, item, filters)
            verb = "would drop" if dry_run else "dropped"
            if left:
                gone = ""
            else:
                gone = f" (no samples left: recording {'would be ' if dry_run else ''}deleted)"
            click.echo(
                f"{verb} {dropped} of {len(recording.samples)} samples from "
                f"{_describe(recording)}{gone}"
            )
            samples += dropped
            recordings += 1
            deleted += not left
    return samples, recordings, deleted


async def _prune_one(store: Store, item: Found, filters: _Filters) -> int:
    """Prune one recording as it is stored now (a proxy may have added a sample since the
    scan); the samples left."""
    left: list[int] = []

    def rewrite(raw: bytes | None) -> bytes | Delete | None:
        # A store may run this more than once; only the last run's count is kept.
        left[:] = [0]
        if raw is None:
            return None
        pruned = filters.apply(Recording.loads(raw))
        left[:] = [len(pruned.samples)]
        # Deleted in the same atomic step as the read: a sample a proxy records meanwhile is
        # either seen here (and kept) or added after the delete, to a recording of its own.
        return pruned.dumps(pretty=store.pretty) if pruned.samples else DELETE

    await store.update(item.namespace, item.key, rewrite)
    return left[0]


# --- export / import ----------------------------------------------------------------------------

_COPY_NOTE = (
    "Recordings already in the destination are merged sample by sample, never overwritten. "
    "Only recordings are copied: audit events stay where they are, and so do the current "
    "fingerprints (a store cannot list them); the destination learns them as it serves."
)


@click.command(
    short_help="Copy every recording of --store into another store.",
    help="Copy every recording of --store into the store DEST (a directory, files:DIR or "
    f"redis://…).\n\n{_COPY_NOTE}",
)
@store_option
@click.argument("dest")
def export(store: str | None, dest: str) -> None:
    asyncio.run(_copy(store_spec(store), _argument_spec(dest, "DEST"), "exported", "exporting"))


@click.command(
    name="import",
    short_help="Copy every recording of another store into --store.",
    help="Copy every recording of the store SRC (a directory, files:DIR or redis://…) into "
    f"--store.\n\n{_COPY_NOTE}",
)
@store_option
@click.argument("src")
def import_(store: str | None, src: str) -> None:
    asyncio.run(_copy(_argument_spec(src, "SRC"), store_spec(store), "imported", "importing"))


def _argument_spec(value: str, name: str) -> str:
    """`store_spec` of a store given as the argument `name`: its errors name it, not --store."""
    try:
        return store_spec(value)
    except ConfigError as exc:
        message = str(exc).replace("use --store ", "use ").replace("--store", name)
        raise ConfigError(message) from None


@dataclass(slots=True)
class _Tally:
    new: int = 0
    merged: int = 0
    skipped: int = 0


def same_store(first: str, second: str) -> bool:
    """Whether two store specs name one store: the same directory (however it is written), or
    the same Redis server and database."""
    a, b = StoreSpec.parse(first), StoreSpec.parse(second)
    if a.kind != b.kind:
        return False
    if a.directory is not None and b.directory is not None:
        return os.path.realpath(a.directory) == os.path.realpath(b.directory)
    address = _redis_address(a.location)
    return address is not None and address == _redis_address(b.location)


def _redis_address(url: str) -> tuple[str, str, int, int] | None:
    """Where a Redis URL leads, as redis-py reads it (the database in the path or in ?db=, a
    unix socket's path)."""
    try:
        given: dict[str, Any] = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError:
        return None  # opening it says why
    if "path" in given:  # unix://
        return "unix", os.path.realpath(given["path"]), 0, int(given.get("db") or 0)
    host = str(given.get("host") or "localhost").lower()
    host = "localhost" if host in ("127.0.0.1", "::1") else host
    # redis-py's defaults: port 6379, database 0.
    return urlsplit(url).scheme, host, int(given.get("port") or 6379), int(given.get("db") or 0)


async def _copy(source_spec: str, dest_spec: str, verb: str, label: str) -> None:
    require_store(source_spec)
    if same_store(source_spec, dest_spec):
        # Merging each recording with itself changes nothing, and would report them as merged.
        raise SeedcacheError(
            f"{shown(source_spec)} and {shown(dest_spec)} are the same store: nothing to copy; "
            "give another destination"
        )
    tally = _Tally()
    async with _opened(source_spec) as source:
        found = await _scan(source)
    async with _opened(dest_spec) as dest:
        with progress(len(found), label) as bar:
            for item in found:
                await _copy_one(item, dest, tally)
                bar.update(1)
    copied = tally.new + tally.merged
    skipped = f"; skipped {tally.skipped} unreadable" if tally.skipped else ""
    click.echo(
        f"{verb} {counted(copied, 'recording')} ({tally.new} new, {tally.merged} merged) "
        f"from {shown(source_spec)} to {shown(dest_spec)}{skipped}"
    )


async def _copy_one(item: Found, dest: Store, tally: _Tally) -> None:
    recording = _load(item)
    if recording is None:
        tally.skipped += 1
        return
    namespace = _namespace(item, recording)
    incoming = replace(recording, key=item.key, namespace=namespace)
    outcome: list[str] = []

    def write(raw: bytes | None) -> bytes:
        # Redis may run this more than once; only the last run's outcome counts.
        outcome[:] = ["new" if raw is None else "merged"]
        if raw is None:
            return incoming.dumps(pretty=dest.pretty)
        return merge(Recording.loads(raw), incoming).dumps(pretty=dest.pretty)

    try:
        await dest.update(namespace, item.key, write)
    except FormatError as exc:
        raise FormatError(f"{dest.description}, recording {item.key}: {exc}") from None
    if outcome == ["new"]:
        tally.new += 1
    else:
        tally.merged += 1
