"""`seedcache verify`: re-issue recorded requests live and audit each answer against its recording.

Reads recordings and never writes them; the audit events go to the `AuditLog`. The CLI opens the
store and the client and draws the progress bar.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import openai
import orjson

from proxy.audit import AuditLog, audit_event, baseline
from proxy.config import (
    DEFAULT_VERIFY_CONCURRENCY,
    PASSTHROUGH_HEADERS,
    REPLAYED_STATUSES,
    not_live,
)
from proxy.divergence import Verdict, is_divergence
from proxy.errors import FormatError
from proxy.keys import RECORDED
from proxy.recording import REDACTED, Recording, Sample, utc_now
from proxy.stores.base import Store


@dataclass(frozen=True, slots=True)
class Selection:
    """The recordings to verify, and how many were passed over and why."""

    recordings: list[Recording]
    skipped: dict[str, int] = field(default_factory=dict)
    # Recordings left out because they are of another model than the one asked for.
    other_models: int = 0


@dataclass(frozen=True, slots=True)
class Failure:
    """A recording whose request could not be re-issued (upstream error, unusable answer)."""

    key: str
    path: str
    message: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a verify run found: one audit event per compared recording, and the failures."""

    events: list[dict[str, Any]]
    failures: list[Failure]

    @property
    def divergences(self) -> int:
        """Comparisons whose outputs differ (`usage_only` is none: the output is the same)."""
        return sum(is_divergence(str(event["verdict"])) for event in self.events)

    def counts(self) -> dict[str, int]:
        """Comparisons, identical, same output (identical or usage only) and divergences."""
        divergences = self.divergences
        return {
            "comparisons": len(self.events),
            "identical": sum(event["verdict"] == Verdict.IDENTICAL for event in self.events),
            "same_output": len(self.events) - divergences,
            "divergences": divergences,
        }

    @property
    def divergence_rate(self) -> float:
        """Diverged comparisons over all comparisons; 0.0 when nothing was compared."""
        return self.divergences / len(self.events) if self.events else 0.0


async def select_recordings(
    store: Store,
    *,
    model: str | None = None,
    sample: int | None = None,
    rng: random.Random | None = None,
) -> Selection:
    """The recordings of `store` that can be re-issued (of `model`), `sample` of them at random."""
    chosen: list[Recording] = []
    skipped: dict[str, int] = {}
    other_models = 0
    async for _, key, raw in store.scan():
        try:
            recording = Recording.loads(raw).stored_under(key)
        except FormatError:
            skipped["unreadable"] = skipped.get("unreadable", 0) + 1
            continue
        if (
            recording.method,
            recording.path.split("?", 1)[0],
        ) not in RECORDED:
            skipped["not a re-issuable endpoint"] = skipped.get("not a re-issuable endpoint", 0) + 1
            continue
        if not recording.samples:
            skipped["no samples"] = skipped.get("no samples", 0) + 1
            continue
        if REDACTED in recording.path or REDACTED.encode() in orjson.dumps(recording.body):
            # A secret was redacted from the request as stored: sent again, it would be another
            # request, and its answer no measure of drift.
            reason = "a secret redacted from the request"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        if model and model != recording.model and all(s.model != model for s in recording.samples):
            other_models += 1
            continue
        chosen.append(recording)
    chosen.sort(key=lambda r: r.key)  # scan order is the store's; sampling from a fixed order
    if sample is not None and sample < len(chosen):
        chosen = (rng or random.Random()).sample(chosen, sample)
    return Selection(chosen, skipped, other_models)


def make_client(upstream: str, api_key: str) -> openai.AsyncOpenAI:
    """The SDK client verify talks to upstream with (two retries, as the SDK's default)."""
    return openai.AsyncOpenAI(
        base_url=upstream, api_key=api_key, max_retries=2, default_headers=PASSTHROUGH_HEADERS
    )


async def verify(
    recordings: Sequence[Recording],
    *,
    client: openai.AsyncOpenAI,
    audit: AuditLog,
    concurrency: int = DEFAULT_VERIFY_CONCURRENCY,
    on_done: Callable[[], None] = lambda: None,
) -> Outcome:
    """Re-issue each recording's request, compare the answer with its baseline sample, write
    the audit event; at most `concurrency` requests in flight."""
    gate = asyncio.Semaphore(concurrency)
    events: list[dict[str, Any]] = []
    failures: list[Failure] = []
    upstream = str(client.base_url).rstrip("/")

    async def one(recording: Recording) -> None:
        try:
            async with gate:
                live = await _reissue(client, recording, upstream)
            if isinstance(live, Failure):
                failures.append(live)
                return
            recorded = baseline(recording.samples, live.system_fingerprint)
            assert recorded is not None  # select_recordings passes over recordings without one
            event, _ = audit_event(recording, recorded, live)
            await audit.write(event)
            events.append(event)
        finally:
            on_done()

    tasks = [asyncio.create_task(one(recording)) for recording in recordings]
    # Let every task finish before a store failure propagates: none is left running unowned.
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result
    events.sort(key=lambda event: str(event["key"]))
    failures.sort(key=lambda failure: failure.key)
    return Outcome(events, failures)


async def _reissue(
    client: openai.AsyncOpenAI, recording: Recording, upstream: str
) -> Sample | Failure:
    # The SDK's base URL ends in /v1 and the stored path starts with it (DESIGN §3 normalises it).
    path = recording.path.removeprefix("/v1")
    started = time.monotonic()
    # The raw response, for its headers: a seedcache proxy says where the answer came from.
    raw_response = openai.AsyncAPIResponse[object]
    try:
        if recording.method == "GET":
            raw = await client.get(path, cast_to=raw_response)
        else:
            # The stored body is the canonical one: `stream` is not in it, so the answer is one
            # JSON body, compared with the sample whatever shape that was recorded in.
            raw = await client.post(path, cast_to=raw_response, body=recording.body)
        status = raw.headers.get("X-Seedcache-Status")
        if status in REPLAYED_STATUSES:
            return Failure(recording.key, recording.path, not_live(status, upstream))
        answer = await raw.parse()
    except openai.APIStatusError as exc:
        return Failure(recording.key, recording.path, f"upstream answered {exc.status_code}: {exc}")
    except openai.APIError as exc:
        return Failure(recording.key, recording.path, f"{type(exc).__name__}: {exc}")
    except ValueError as exc:  # a 2xx body that is not JSON
        return Failure(recording.key, recording.path, f"the answer is not JSON: {exc}")
    if not isinstance(answer, dict):
        return Failure(recording.key, recording.path, "the answer is not a JSON object")
    model, fingerprint = answer.get("model"), answer.get("system_fingerprint")
    return Sample(
        recorded_at=utc_now(),
        upstream=upstream,
        model=model if isinstance(model, str) else None,
        system_fingerprint=fingerprint if isinstance(fingerprint, str) and fingerprint else None,
        status=200,
        headers={},
        elapsed_ms=int((time.monotonic() - started) * 1000),
        body=answer,
    )
