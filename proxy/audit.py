"""Audit events (DESIGN §7): build one from a comparison, append it to the JSONL log and the store,
and summarise a series of them per model and fingerprint for `seedcache audit`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from proxy.divergence import Comparison, compare, is_divergence, output_text
from proxy.recording import Recording, Sample, parse_time, printable, redact_path, utc_now
from proxy.stores.base import Store

log = logging.getLogger("seedcache")

# How much of each output text a diverged event carries, for `seedcache audit --html` to show
# side by side: enough to read the divergence, small enough to keep the log line short.
TEXT_LIMIT = 2_000


def baseline(
    samples: Iterable[Sample], live_fingerprint: str | None, *, pinned: str | None = None
) -> Sample | None:
    """The sample a live response is compared with: the newest with the `pinned` fingerprint
    (X-Seedcache-Fingerprint) if one has it, else the newest of the live response's fingerprint,
    else the newest of all."""
    ordered = list(samples)
    wanted = [s for s in ordered if pinned and s.system_fingerprint == pinned]
    if wanted:
        return wanted[-1]
    same = [s for s in ordered if live_fingerprint and s.system_fingerprint == live_fingerprint]
    candidates = same or ordered
    return candidates[-1] if candidates else None


def audit_event(
    recording: Recording, recorded: Sample, live: Sample, *, embedding_distance: float | None = None
) -> tuple[dict[str, Any], Comparison]:
    """Compare a live sample with a recorded one and describe the comparison as an audit event."""
    comparison = compare(recorded.response(), live.response())
    result = comparison.to_json()
    if embedding_distance is not None:
        result["similarity"]["embedding_distance"] = round(embedding_distance, 4)
    body = recording.body if isinstance(recording.body, dict) else {}
    seed = body.get("seed")
    event = {
        "ts": utc_now(),
        "key": recording.key,
        "path": redact_path(recording.path),
        "model": recording.model,
        "response_model": live.model,
        "recorded_response_model": recorded.model,
        "seed": seed if isinstance(seed, int) else None,
        "namespace": recording.namespace,
        "upstream": live.upstream,
        "recorded_at": recorded.recorded_at,
        "recorded_fingerprint": comparison.recorded_fingerprint,
        "live_fingerprint": comparison.live_fingerprint,
        "fingerprint_changed": comparison.fingerprint_changed,
        "verdict": result["verdict"],
        "differences": result["differences"],
        "similarity": result["similarity"],
    }
    if comparison.diverged:
        texts = output_text(recorded.response()), output_text(live.response())
        if any(texts):
            event["texts"] = {"recorded": texts[0][:TEXT_LIMIT], "live": texts[1][:TEXT_LIMIT]}
    return event, comparison


class AuditLog:
    """Where audit events go: a JSONL file (if configured) and the store, so that
    `seedcache audit` works against a shared Redis too."""

    def __init__(self, path: str | None, store: Store) -> None:
        self.path = path
        self.store = store

    async def write(self, event: Mapping[str, Any]) -> None:
        """Append one event; a divergence is also one WARNING line."""
        line = orjson.dumps(event)
        # The models are the client's and the upstream's words, the fingerprints the upstream's:
        # printable, so that none can forge a line of the log.
        if is_divergence(str(event.get("verdict"))):
            recorded, live = event.get("recorded_fingerprint"), event.get("live_fingerprint")
            log.warning(
                "divergence on key %s: model %s, verdict %s, fingerprint %s",
                str(event.get("key", ""))[:12],
                printable(event.get("model")),
                event.get("verdict"),
                printable(f"{recorded} -> {live}" if recorded != live else f"{live} (unchanged)"),
            )
        elif model_changed(event):
            # The same output from another snapshot: no divergence, but the backend changed.
            log.warning(
                "model snapshot changed on key %s: %s -> %s, same output",
                str(event.get("key", ""))[:12],
                printable(event.get("recorded_response_model")),
                printable(event.get("response_model")),
            )
        if self.path:
            await asyncio.get_running_loop().run_in_executor(None, _append_line, self.path, line)
        await self.store.append_event(line)


def model_changed(event: Mapping[str, Any]) -> bool:
    """Whether the live answer came from another model snapshot than the recording (both known),
    e.g. gpt-4o-mini-2024-07-18 then gpt-4o-mini-2025-01-01: the response model is left out of
    the verdict, like the fingerprint, and counted on its own."""
    recorded, live = event.get("recorded_response_model"), event.get("response_model")
    return isinstance(recorded, str) and isinstance(live, str) and recorded != live


def _append_line(path: str, line: bytes) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # One write of a whole line with O_APPEND: concurrent writers never interleave lines.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line + b"\n")
    finally:
        os.close(fd)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Events from a JSONL audit log; a torn or foreign line is skipped, not fatal."""
    with open(path, "rb") as handle:
        return [event for event in map(_event, handle) if event is not None]


async def read_events(
    store: Store, *, since: datetime | None = None, model: str | None = None
) -> list[dict[str, Any]]:
    """The events held by a store, oldest first, after `since` and for `model` (see `select`),
    kept as they are read; a torn or foreign one is skipped. A long-running shared store holds
    hundreds of thousands: the loop serves other requests between every READ_BATCH of them."""
    chosen: list[dict[str, Any]] = []
    read = 0
    async for line in store.events():
        read += 1
        if read % READ_BATCH == 0:
            await asyncio.sleep(0)
        if (event := _event(line)) is not None and _chosen(event, since, model):
            chosen.append(event)
    return chosen


READ_BATCH = 500


def _event(line: bytes) -> dict[str, Any] | None:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def parse_since(value: str, *, now: datetime | None = None) -> datetime:
    """An ISO date/time, or a duration back from now like 30m, 24h, 7d (`--since`, `?since=`);
    the ValueError names no option, each caller says which."""
    now = now or datetime.now(UTC)
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    text = value.strip()
    if text[:-1].replace(".", "", 1).isdigit() and text[-1:] in units:
        try:
            return now - timedelta(**{units[text[-1]]: float(text[:-1])})
        except OverflowError:
            raise ValueError(f"{value!r} reaches back before the year 1") from None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"takes an ISO date (2026-11-01) or a duration (30m, 24h, 7d), got {value!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def event_time(event: Mapping[str, Any]) -> datetime | None:
    """When an event was written, or None if it carries no readable time."""
    return parse_time(str(event.get("ts", "")))


def select(
    events: Iterable[Mapping[str, Any]], *, since: datetime | None = None, model: str | None = None
) -> list[Mapping[str, Any]]:
    """The events after `since` and for `model` (request or response model)."""
    return [event for event in events if _chosen(event, since, model)]


def _chosen(event: Mapping[str, Any], since: datetime | None, model: str | None) -> bool:
    if model and model not in (event.get("model"), event.get("response_model")):
        return False
    if since is not None:
        moment = event_time(event)
        if moment is None or moment < since:
            return False
    return True


@dataclass
class Group:
    """The summary of the comparisons of one model at one live fingerprint."""

    model: str
    fingerprint: str | None
    comparisons: int = 0
    identical: int = 0
    divergences: int = 0
    fingerprint_changes: int = 0  # comparisons whose fingerprint changed
    fingerprint_changed_divergences: int = 0
    model_changes: int = 0  # comparisons answered by another model snapshot than recorded
    verdicts: dict[str, int] = field(default_factory=dict)
    _ratios: list[float] = field(default_factory=list)
    _distances: list[float] = field(default_factory=list)
    _embeddings: list[float] = field(default_factory=list)

    def add(self, event: Mapping[str, Any]) -> None:
        self.comparisons += 1
        verdict = str(event.get("verdict"))
        self.verdicts[verdict] = self.verdicts.get(verdict, 0) + 1
        diverged = is_divergence(verdict)
        changed = event.get("fingerprint_changed") is True
        self.identical += verdict == "identical"
        self.divergences += diverged
        self.fingerprint_changes += changed
        self.fingerprint_changed_divergences += diverged and changed
        self.model_changes += model_changed(event)
        similarity = event.get("similarity")
        if not isinstance(similarity, dict):
            similarity = {}  # a foreign line: counted, without numbers
        for name, values in (
            ("text_ratio", self._ratios),
            ("ngram_cosine_distance", self._distances),
            ("embedding_distance", self._embeddings),
        ):
            value = similarity.get(name)
            if isinstance(value, (int, float)):
                values.append(float(value))

    def to_json(self) -> dict[str, Any]:
        divergences = self.divergences
        return {
            "model": self.model,
            "fingerprint": self.fingerprint,
            "comparisons": self.comparisons,
            "identical": self.identical,
            # `identical` and `usage_only` verdicts: the comparisons that are no divergence.
            "same_output": self.comparisons - divergences,
            "divergences": divergences,
            "divergence_rate": round(divergences / self.comparisons, 4) if self.comparisons else 0,
            "mean_text_ratio": _mean(self._ratios),
            "mean_ngram_distance": _mean(self._distances),
            "mean_embedding_distance": _mean(self._embeddings),
            "fingerprint_changes": self.fingerprint_changes,
            "model_changes": self.model_changes,
            **fingerprint_split(
                self.comparisons,
                self.divergences,
                self.fingerprint_changes,
                self.fingerprint_changed_divergences,
            ),
            "verdicts": dict(sorted(self.verdicts.items())),
        }


def fingerprint_split(
    comparisons: int, divergences: int, changed: int, changed_divergences: int
) -> dict[str, Any]:
    """The divergences of the comparisons whose fingerprint changed ("the backend changed") and
    their rate, beside the rate of the others ("same backend, different output"; an unknown
    fingerprint is no change, DESIGN §4). A rate is null when its side has no comparisons."""
    return {
        "fingerprint_changed_divergences": changed_divergences,
        "divergence_rate_fingerprint_changed": _rate(changed_divergences, changed),
        "divergence_rate_same_fingerprint": _rate(
            divergences - changed_divergences, comparisons - changed
        ),
    }


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def summarise(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per model and live fingerprint: comparisons, identical, same output, divergences and their
    rate, mean distances, fingerprint changes, and the divergence rates with and without one."""
    groups: dict[tuple[str, str], Group] = {}
    for event in events:
        model = str(event.get("model") or event.get("response_model") or "")
        fingerprint = event.get("live_fingerprint")
        group = groups.get((model, str(fingerprint)))
        if group is None:
            group = groups[(model, str(fingerprint))] = Group(model, fingerprint)
        group.add(event)
    return [groups[name].to_json() for name in sorted(groups)]


def _mean(values: list[float]) -> float | None:
    return round(math.fsum(values) / len(values), 4) if values else None
