"""Counters of what the proxy did: the `/_seedcache/stats` JSON and the Prometheus `/metrics`.

Pure bookkeeping; the handlers count, the app serves.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client.exposition import generate_latest

OUTCOMES = ("hit", "miss", "recorded", "stale", "bypass", "audited")
# The model comes from the client: past this many (model, fingerprint) pairs, or past this length,
# a model is counted as OTHER, so that a client sending ever new names cannot grow memory or
# the /metrics exposition without bound.
MODEL_LIMIT = 256
MODEL_NAME_LIMIT = 200
OTHER = "(other)"
# The stats document names totals in the plural (hits, misses, …); outcomes are X-Seedcache-Status.
STAT_NAMES = {"hit": "hits", "miss": "misses", "bypass": "bypassed"}


class Metrics:
    """Totals and per (model, fingerprint) counts of outcomes, divergences and upstream errors."""

    def __init__(self) -> None:
        names = [STAT_NAMES.get(outcome, outcome) for outcome in OUTCOMES]
        self.totals: Counter[str] = Counter(
            dict.fromkeys([*names, "divergences", "upstream_errors", "errors"], 0)
        )
        self.by_model: dict[tuple[str, str], Counter[str]] = {}
        self._children: dict[tuple[str, str], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = PromCounter(
            "seedcache_requests",
            "Proxied requests by outcome (X-Seedcache-Status).",
            ["status", "model"],
            registry=self.registry,
        )
        self._divergences = PromCounter(
            "seedcache_divergences",
            "Live responses that diverged from their recording, by verdict.",
            ["model", "verdict", "fingerprint_changed"],
            registry=self.registry,
        )
        self._upstream_errors = PromCounter(
            "seedcache_upstream_errors",
            "Upstream failures and non-2xx answers, by status.",
            ["status"],
            registry=self.registry,
        )
        self._errors = PromCounter(
            "seedcache_errors",
            "Error answers of the proxy's own (store unavailable, unreadable recording, bad "
            "request, ...), by code; misses and upstream errors are counted apart.",
            ["code"],
            registry=self.registry,
        )

    def count(self, outcome: str, model: str | None, fingerprint: str | None = None) -> None:
        """Count one request's outcome."""
        name = STAT_NAMES.get(outcome, outcome)
        self.totals[name] += 1
        model, bucket = self._bucket(model, fingerprint)
        bucket[name] += 1
        labels = (outcome, model)
        child = self._children.get(labels)
        if child is None:
            # labels() takes a lock and checks its arguments: look each child up once.
            child = self._children[labels] = self._requests.labels(*labels)
        child.inc()

    def divergence(
        self, model: str | None, fingerprint: str | None, verdict: str, fingerprint_changed: bool
    ) -> None:
        """Count one divergence found by the audit."""
        self.totals["divergences"] += 1
        model, bucket = self._bucket(model, fingerprint)
        bucket["divergences"] += 1
        self._divergences.labels(model, verdict, str(fingerprint_changed).lower()).inc()

    def upstream_error(self, status: int) -> None:
        """Count an upstream failure (status 0: no response at all)."""
        self.totals["upstream_errors"] += 1
        self._upstream_errors.labels(str(status)).inc()

    def error(self, code: str) -> None:
        """Count an error answer of the proxy's own, by its code (a code of ours, never the
        client's text)."""
        self.totals["errors"] += 1
        self._errors.labels(code).inc()

    def to_json(self) -> dict[str, Any]:
        """The stats document."""
        return {
            **dict(self.totals),
            "by_model": [
                {"model": model, "system_fingerprint": fingerprint or None, **dict(counts)}
                for (model, fingerprint), counts in sorted(self.by_model.items())
            ],
        }

    def prometheus(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

    def _bucket(self, model: str | None, fingerprint: str | None) -> tuple[str, Counter[str]]:
        """The model as counted, and the counts of its (model, fingerprint) pair."""
        pair = (model or "", fingerprint or "")
        bucket = self.by_model.get(pair)
        if bucket is not None:
            return pair[0], bucket
        if len(self.by_model) >= MODEL_LIMIT or len(pair[0]) > MODEL_NAME_LIMIT:
            pair = (OTHER, "")
        return pair[0], self.by_model.setdefault(pair, Counter())
