"""`seedcache probe`: OpenAI's seed-guide experiment as one command — the same request N times with
a seed (and N times without) — and how consistent the outputs were. The CLI draws the progress bar.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import openai
from openai.types.chat import ChatCompletion

from proxy.config import (
    DEFAULT_PROBE_MAX_TOKENS,
    DEFAULT_PROBE_RUNS,
    DEFAULT_PROBE_SEED,
    DEFAULT_PROBE_TEMPERATURE,
    PASSTHROUGH_HEADERS,
    REPLAYED_STATUSES,
    not_live,
)
from proxy.divergence import ngram_cosine_distance
from proxy.errors import ConfigError, SeedcacheError
from proxy.recording import printable

OPENING = 60
SEEDED, UNSEEDED = "seeded", "unseeded"


@dataclass(frozen=True, slots=True)
class Settings:
    """One probe: the request and how many times to send it."""

    model: str
    messages: list[dict[str, Any]]
    runs: int = DEFAULT_PROBE_RUNS
    seed: int = DEFAULT_PROBE_SEED
    # None leaves temperature out: reasoning models (o-series) refuse any but the default.
    temperature: float | None = DEFAULT_PROBE_TEMPERATURE
    # The token limit, sent as max_tokens or, for reasoning models that refuse max_tokens, as
    # max_completion_tokens (which counts reasoning tokens too): exactly one of the two is set.
    max_tokens: int | None = DEFAULT_PROBE_MAX_TOKENS
    max_completion_tokens: int | None = None
    compare_unseeded: bool = False

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ConfigError(f"--runs must be at least 1, got {self.runs}")
        if (self.max_tokens is None) == (self.max_completion_tokens is None):
            raise ConfigError("give either --max-tokens or --max-completion-tokens")
        for name, limit in (
            ("--max-tokens", self.max_tokens),
            ("--max-completion-tokens", self.max_completion_tokens),
        ):
            if limit is not None and limit < 1:
                raise ConfigError(f"{name} must be at least 1, got {limit}")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ConfigError(f"--temperature must be between 0 and 2, got {self.temperature}")
        if not self.messages:
            raise ConfigError("the probe needs a --prompt or a non-empty --messages list")

    def plan(self) -> list[tuple[str, dict[str, Any]]]:
        """(group, request) for every run, seeded first."""
        base: dict[str, Any] = {"model": self.model, "messages": self.messages}
        if self.temperature is not None:
            base["temperature"] = self.temperature
        # Never both: a model that takes one may refuse the other.
        if self.max_tokens is not None:
            base["max_tokens"] = self.max_tokens
        else:
            base["max_completion_tokens"] = self.max_completion_tokens
        steps = [(SEEDED, {**base, "seed": self.seed})] * self.runs
        if self.compare_unseeded:
            steps += [(UNSEEDED, base)] * self.runs
        return steps


@dataclass(frozen=True, slots=True)
class Run:
    """One answer: which group it was in, the backend that produced it, and the text."""

    group: str
    index: int
    system_fingerprint: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    text: str

    @property
    def opening(self) -> str:
        """The start of the text on one line, for the table."""
        flat = " ".join(self.text.split())
        return flat if len(flat) <= OPENING else flat[: OPENING - 1] + "…"


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """How consistent the runs of one group were."""

    group: str
    runs: int
    distinct_outputs: int
    fingerprints: tuple[str | None, ...]
    mean_ngram_distance: float | None
    mean_text_ratio: float | None


def messages_for(prompt: str | None, messages: Any) -> list[dict[str, Any]]:
    """The messages of the probe: a user prompt, or a JSON list of chat messages."""
    if (prompt is None) == (messages is None):
        raise ConfigError("give either --prompt or --messages FILE")
    if prompt is not None:
        return [{"role": "user", "content": prompt}]
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
    ):
        raise ConfigError(
            '--messages must hold a JSON list of messages like [{"role": "user", "content": …}]'
        )
    return messages


def make_client(upstream: str, api_key: str) -> openai.OpenAI:
    """The SDK client the probe talks to upstream with."""
    return openai.OpenAI(base_url=upstream, api_key=api_key, max_retries=2)


def run(
    client: openai.OpenAI,
    plan: Sequence[tuple[str, dict[str, Any]]],
    *,
    on_done: Callable[[], None] = lambda: None,
) -> list[Run]:
    """Send every planned request, one after the other (concurrent runs could share a batch,
    which is itself a source of nondeterminism on some servers)."""
    runs = []
    counters: dict[str, int] = {}
    for group, request in plan:
        counters[group] = index = counters.get(group, 0) + 1
        try:
            # The raw response, for its headers: a seedcache proxy says where the answer came from.
            raw = client.chat.completions.with_raw_response.create(
                **request, extra_headers=PASSTHROUGH_HEADERS
            )
            status = raw.headers.get("X-Seedcache-Status")
            if status in REPLAYED_STATUSES:
                raise SeedcacheError(
                    f"{group} run {index} was {not_live(status, str(client.base_url).rstrip('/'))}"
                    " Point --upstream at the API, or at a proxy in another mode"
                )
            answer: ChatCompletion = raw.parse()
        except openai.APIStatusError as exc:
            raise SeedcacheError(
                f"{group} run {index} failed: upstream answered {exc.status_code}: {exc.message}"
            ) from None
        except openai.APIError as exc:
            # A connection error says only "Connection error.": name where it went.
            raise SeedcacheError(f"{group} run {index} failed: {exc} ({client.base_url})") from None
        choice = answer.choices[0] if answer.choices else None
        usage = answer.usage
        runs.append(
            Run(
                group=group,
                index=index,
                system_fingerprint=answer.system_fingerprint or None,
                model=answer.model,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
                finish_reason=choice.finish_reason if choice else None,
                text=(choice.message.content or "") if choice else "",
            )
        )
        on_done()
    return runs


def summarise(runs: Sequence[Run]) -> list[GroupSummary]:
    """Per group: distinct outputs and fingerprints, mean pairwise n-gram cosine distance and
    text ratio (None with a single run: there is no pair)."""
    summaries = []
    for group in (SEEDED, UNSEEDED):
        texts = [r.text for r in runs if r.group == group]
        if not texts:
            continue
        pairs = list(itertools.combinations(texts, 2))
        fingerprints = {r.system_fingerprint for r in runs if r.group == group}
        summaries.append(
            GroupSummary(
                group=group,
                runs=len(texts),
                distinct_outputs=len(set(texts)),
                fingerprints=tuple(sorted(fingerprints, key=lambda fp: (fp is None, fp or ""))),
                mean_ngram_distance=_mean([ngram_cosine_distance(a, b) for a, b in pairs]),
                mean_text_ratio=_mean([_ratio(a, b) for a, b in pairs]),
            )
        )
    return summaries


def to_json(
    settings: Settings, upstream: str, runs: Sequence[Run], groups: Sequence[GroupSummary]
) -> dict[str, Any]:
    """The probe as one JSON document."""
    return {
        "upstream": upstream,
        "model": settings.model,
        "seed": settings.seed,
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
        "max_completion_tokens": settings.max_completion_tokens,
        "runs": [{**asdict(r), "opening": r.opening} for r in runs],
        "groups": [{**asdict(g), "fingerprints": list(g.fingerprints)} for g in groups],
    }


def render(runs: Sequence[Run], groups: Sequence[GroupSummary]) -> str:
    """The runs and the group summaries as two plain-text tables."""
    run_rows = [["run", "group", "fingerprint", "prompt", "completion", "opening"]]
    for r in runs:
        run_rows.append(
            [
                str(r.index),
                r.group,
                r.system_fingerprint or "null",
                _number(r.prompt_tokens),
                _number(r.completion_tokens),
                r.opening,
            ]
        )
    group_rows = [["group", "runs", "distinct outputs", "fingerprints", "mean distance", "ratio"]]
    for g in groups:
        group_rows.append(
            [
                g.group,
                str(g.runs),
                str(g.distinct_outputs),
                ", ".join(fp or "null" for fp in g.fingerprints),
                _number(g.mean_ngram_distance),
                _number(g.mean_text_ratio),
            ]
        )
    note = (
        "mean distance: mean pairwise n-gram cosine distance (0 = all identical); "
        "ratio: mean pairwise text similarity (1 = all identical)."
    )
    runs_table = _table(run_rows, numeric={0, 3, 4})
    return f"{runs_table}\n\n{_table(group_rows, numeric={1, 2, 4, 5})}\n{note}"


def _table(cells: list[list[str]], *, numeric: set[int]) -> str:
    # Fingerprints and outputs are the upstream's: printable, so they cannot drive the terminal.
    rows = [[printable(cell) for cell in row] for row in cells]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def _ratio(a: str, b: str) -> float:
    # Outputs of up to a few hundred tokens: difflib's exact ratio is cheap enough.
    return 1.0 if a == b else difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _mean(values: list[float]) -> float | None:
    return round(math.fsum(values) / len(values), 4) if values else None


def _number(value: float | int | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
