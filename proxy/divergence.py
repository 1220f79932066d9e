"""Comparing a recorded response with a live one (DESIGN §7): the verdict, the differing JSON paths
and the similarity measures. Pure: the caller assembles streams, fetches embeddings and writes the
audit event.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import difflib
import enum
import itertools
import json
import marshal
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from proxy.keys import BOOKKEEPING

# Left out of the verdict (DESIGN §7). `created_at`/`completed_at` are the Responses API's
# timestamps and `timings` is llama.cpp's per-request performance report: both differ on every
# call. `usage` is special: its differences are listed and decide the verdict only when nothing
# else differs.
VOLATILE = frozenset(
    {
        "id",
        "created",
        "created_at",
        "completed_at",
        "system_fingerprint",
        "usage",
        "service_tier",
        "obfuscation",
        "timings",
    }
)

# Stands for a member or item present on one side only, in `Difference.recorded`/`.live`.
ABSENT = "<absent>"

# Responses objects (and vLLM, for `kv_transfer_params`) echo request members; the bookkeeping ones
# are not in the key (DESIGN §3), so two requests differing only in `metadata` or `user` share a
# sample and must not look diverged. The response `model` names the snapshot that answered
# (gpt-4o-mini-2024-07-18): like the fingerprint it explains a divergence and is no output (the
# audit event carries both sides).
_IGNORED_TOP_LEVEL = (VOLATILE - {"usage"}) | BOOKKEEPING | {"model"}

# Random per call upstream: tool call ids (`call_…`), Responses item ids (`msg_…`, `fc_…`, `rs_…`)
# and call ids, audio ids and their expiry, and reasoning encrypted with a fresh nonce each time.
_NESTED_VOLATILE = re.compile(
    r"choices\[\d+\]\.message\.(?:tool_calls\[\d+\]\.id|audio\.(?:id|expires_at))"
    r"|output\[\d+\]\.(?:id|call_id|encrypted_content)"
)
_NESTED_VOLATILE_ENDINGS = (".id", ".expires_at", ".call_id", ".encrypted_content")

_CHAT_CONTENT = re.compile(
    r"choices\[\d+\]\.(?:text|message\.(?:content|refusal|audio"
    r"|reasoning_content|reasoning|reasoning_details))(?![^.\[])"
)
# Tool calls themselves, whole or by their type, function or custom input; not other members of a
# call such as a stream's leftover `index`, which are differences of form.
_CHAT_TOOL_CALLS = re.compile(
    r"choices\[\d+\]\.message\.(?:function_call(?:[.\[].*)?"
    r"|tool_calls(?:\[\d+\](?:\.(?:type|function|custom)(?:[.\[].*)?)?)?)",
    re.DOTALL,
)
_CHOICE_FINISH = re.compile(r"choices\[\d+\]\.(?:finish_reason|stop_reason)")
_INCOMPLETE = ("incomplete_details.", "incomplete_details[")
_LOGPROBS = re.compile(
    r"(?:choices\[\d+\]\.logprobs|prompt_logprobs|output\[\d+\]\.content\[\d+\]\.logprobs)"
    r"(?:[.\[].*)?",
    re.DOTALL,
)
# Logprob values are no output: their floats move a little on every call, and the alternatives in
# `top_logprobs` with them. Chat and Responses entries, legacy completions' parallel lists, and
# vLLM's `prompt_logprobs` (about the prompt, not the output).
_LOGPROB_VALUES = re.compile(
    r"(?:choices\[\d+\]\.logprobs\.(?:content|refusal)\[\d+\]"
    r"|output\[\d+\]\.content\[\d+\]\.logprobs\[\d+\])\.(?:logprob|top_logprobs)"
    r"|choices\[\d+\]\.logprobs\.(?:token_logprobs|top_logprobs)"
    r"|(?:choices\[\d+\]\.)?prompt_logprobs"
)
# The tokens themselves are the output, piece by piece: a token more, another token or its bytes,
# or (legacy completions) its offset in the text.
_LOGPROB_TOKENS = re.compile(
    r"(?:choices\[\d+\]\.logprobs\.(?:content|refusal)"
    r"|output\[\d+\]\.content\[\d+\]\.logprobs)\[\d+\](?:\.(?:token|bytes)(?:\[\d+\])?)?"
    r"|choices\[\d+\]\.logprobs\.(?:tokens|text_offset)(?:\[\d+\])?"
)
# The logprobs lists compared token by token (see _walk_tokens): chat and Responses entries, whose
# value members are left out, and legacy completions' tokens and their offsets.
_TOKEN_ENTRIES = re.compile(
    r"choices\[\d+\]\.logprobs\.(?:content|refusal)|output\[\d+\]\.content\[\d+\]\.logprobs"
)
_TOKEN_LEAVES = re.compile(r"choices\[\d+\]\.logprobs\.(?:tokens|text_offset)")
_ENTRY_VALUES = frozenset({"logprob", "top_logprobs"})  # the members _LOGPROB_VALUES leaves out
# The containers holding those lists, walked member by member rather than first compared whole:
# comparing them whole would compare (and marshal) every logprob value the verdict leaves out.
_ABOVE_TOKENS = re.compile(
    r"|choices(?:\[\d+\](?:\.logprobs)?)?|output(?:\[\d+\](?:\.content(?:\[\d+\])?)?)?"
)
_DICT: frozenset[type] = frozenset({dict})
_TEXT: frozenset[type] = frozenset({str, type(None)})  # a token, or none
# Token items compared a block at a time; see _walk_tokens.
_TOKEN_BLOCK = 256
_EMBEDDING = re.compile(r"data\[\d+\]\.embedding")
_OUTPUT_ITEM = re.compile(r"output\[(\d+)\](.*)", re.DOTALL)
_OUTPUT_TEXT = re.compile(r"\.(?:content|summary)(?:\[\d+\](?:\.(?:text|refusal|transcript))?)?")
_TOOL_ITEM_TYPES = frozenset({"function_call", "custom_tool_call"})
_TEXT_ITEM_TYPES = frozenset({"message", "reasoning"})
_TOOL_ITEM_MEMBERS = frozenset({".name", ".arguments", ".input"})

_PLAIN_NAME = re.compile(r"[^.\[\]\s\"']+")

# difflib's SequenceMatcher is quadratic: on unrelated English texts, ~15 ms at 1,000 chars each,
# ~60 ms at 2,000. Texts within the first budget (~1,600 chars each) get difflib's exact ratio;
# longer ones are approximated (see _text_ratio), in tens of ms even for 100,000 chars.
_CHAR_MATCH_BUDGET = 2_500_000
_WORD_MATCH_BUDGET = 25_000_000
# A word with the spaces before it and its trailing punctuation; a run of letters without spaces
# (Chinese, Japanese, a hex blob) is cut every 16 characters, or it would be one "word".
_WORD = re.compile(r"\s*(?:\w{1,16}[^\w\s]*|[^\w\s]+)|\s+")

_DIFFERENCE_LIMIT = 50


class Verdict(enum.StrEnum):
    """What a divergence is about, in order of precedence (DESIGN §7)."""

    IDENTICAL = "identical"
    CONTENT = "content"
    TOOL_CALLS = "tool_calls"
    FINISH_REASON = "finish_reason"
    USAGE_ONLY = "usage_only"
    SHAPE = "shape"


# How `differences` are ordered: what decided the verdict first, usage last.
_LISTING_ORDER = (
    Verdict.CONTENT,
    Verdict.TOOL_CALLS,
    Verdict.FINISH_REASON,
    Verdict.SHAPE,
    Verdict.USAGE_ONLY,
)


@dataclass(frozen=True, slots=True)
class Difference:
    """One JSON path whose value differs, with both values shortened for a log line."""

    path: str
    recorded: Any
    live: Any


@dataclass(frozen=True, slots=True)
class Similarity:
    """How far apart the two output texts (or embedding vectors) are."""

    text_ratio: float | None
    ngram_cosine_distance: float | None
    first_difference_at: int | None
    embedding_distance: float | None = None


@dataclass(frozen=True, slots=True)
class Comparison:
    """The outcome of comparing a recorded response with a live one."""

    verdict: Verdict
    differences: tuple[Difference, ...]
    similarity: Similarity
    recorded_fingerprint: str | None
    live_fingerprint: str | None

    @property
    def fingerprint_changed(self) -> bool:
        """True only when both fingerprints are known and differ (null means unknown, §4)."""
        return (
            self.recorded_fingerprint is not None
            and self.live_fingerprint is not None
            and self.recorded_fingerprint != self.live_fingerprint
        )

    @property
    def diverged(self) -> bool:
        """True when the live output differs from the recorded one (see `is_divergence`)."""
        return is_divergence(self.verdict)

    def to_json(self) -> dict[str, Any]:
        """The comparison part of an audit event, JSON-serialisable, floats to 4 places."""
        sim = self.similarity
        return {
            "verdict": self.verdict.value,
            "fingerprint_changed": self.fingerprint_changed,
            "recorded_fingerprint": self.recorded_fingerprint,
            "live_fingerprint": self.live_fingerprint,
            "differences": [
                {"path": d.path, "recorded": d.recorded, "live": d.live} for d in self.differences
            ],
            "similarity": {
                "text_ratio": _round(sim.text_ratio),
                "ngram_cosine_distance": _round(sim.ngram_cosine_distance),
                "first_difference_at": sim.first_difference_at,
                "embedding_distance": _round(sim.embedding_distance),
            },
        }


def is_divergence(verdict: str) -> bool:
    """True for a verdict whose outputs differ (DESIGN §1): neither `identical` nor `usage_only`,
    whose outputs are the same and only the token counts moved (usage is left out, §7)."""
    return verdict not in (Verdict.IDENTICAL, Verdict.USAGE_ONLY)


def compare(recorded: Mapping[str, Any], live: Mapping[str, Any]) -> Comparison:
    """Compare two responses of the same shape (streams already assembled)."""
    collector = _Collector(_item_types(recorded), _item_types(live))
    _walk(recorded, live, "", collector)

    verdict = Verdict.IDENTICAL
    if collector.tokens:
        verdict = Verdict.CONTENT
    else:
        # USAGE_ONLY is last: usage decides only when nothing else differs.
        for candidate in _LISTING_ORDER:
            if collector.found[candidate]:
                verdict = candidate
                break

    listed = collector.listed()
    similarity = _text_similarity(output_text(recorded), output_text(live))
    if _has_embeddings(recorded) and _has_embeddings(live):
        similarity = Similarity(
            similarity.text_ratio,
            similarity.ngram_cosine_distance,
            similarity.first_difference_at,
            _embedding_distance(collector.embedding_pairs),
        )
    return Comparison(
        verdict=verdict,
        differences=tuple(listed[:_DIFFERENCE_LIMIT]),
        similarity=similarity,
        recorded_fingerprint=_fingerprint(recorded),
        live_fingerprint=_fingerprint(live),
    )


def output_text(body: Mapping[str, Any]) -> str:
    """The text a human reads in a response, parts joined with newlines; "" when there is none.

    The parts the verdict counts as content or tool calls, so that the similarity measures what
    the verdict found. Chat: per choice in index order, the reasoning (`reasoning_content`,
    `reasoning`, `reasoning_details`), the message content, audio transcript, refusal and tool
    calls as `name(arguments)`. Legacy completions: each choice's text. Responses: reasoning
    summaries and text, output text, refusals and function calls. Embeddings and anything else:
    "". Arguments that are JSON are written canonically (sorted members, no spaces), as the
    verdict compares them parsed.
    """
    if not isinstance(body, Mapping):
        return ""
    parts: list[str] = []
    choices = body.get("choices")
    if isinstance(choices, list):
        for choice in _in_index_order(choices):
            message = choice.get("message")
            if isinstance(message, Mapping):
                parts.extend(_message_texts(message))
            elif isinstance(choice.get("text"), str):
                parts.append(choice["text"])
    output = body.get("output")
    if isinstance(output, list):
        for item in output:
            if isinstance(item, Mapping):
                parts.extend(_output_item_texts(item))
    elif isinstance(body.get("output_text"), str):
        parts.append(body["output_text"])
    return "\n".join(part for part in parts if part)


def json_paths_diff(
    a: Any,
    b: Any,
    *,
    ignore: Callable[[str], bool] | None = None,
    limit: int = _DIFFERENCE_LIMIT,
) -> list[Difference]:
    """The JSON paths where `a` and `b` differ (members by name, items by index), at most `limit`.

    Objects are compared member by member (sorted names), arrays index by index, numbers by value
    (1 == 1.0, but true != 1), strings exactly. A member or item on one side only is `ABSENT` on the
    other. `ignore(path)` drops a path and everything under it; the root path is "".
    """
    if limit <= 0:
        return []
    sink = _ListSink(ignore, limit)
    with contextlib.suppress(_Full):
        _walk(a, b, "", sink)
    return sink.differences


def short(value: Any, limit: int = 60) -> Any:
    """A value cut down for a log line: long strings and JSON texts of containers end in "…"."""
    limit = max(limit, 1)
    if isinstance(value, str):
        text = value
    elif isinstance(value, Mapping | list | tuple):
        text = _json_prefix(value, limit + 1)
    else:
        return value
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cosine_distance(
    a: Sequence[float] | npt.ArrayLike, b: Sequence[float] | npt.ArrayLike
) -> float:
    """1 - cosine similarity: 0.0 for equal directions (and for two zero vectors), up to 2.0."""
    va = np.asarray(a, dtype=np.float64).ravel()
    vb = np.asarray(b, dtype=np.float64).ravel()
    if va.shape != vb.shape:
        raise ValueError(f"vectors of different lengths: {va.size} and {vb.size}")
    norm_a = float(np.linalg.norm(va))
    norm_b = float(np.linalg.norm(vb))
    if norm_a == 0.0 and norm_b == 0.0:
        return 0.0
    if norm_a == 0.0 or norm_b == 0.0:
        # No direction to compare with: as far apart as orthogonal vectors.
        return 1.0
    if np.array_equal(va, vb):
        return 0.0  # exactly, not 1e-16 from rounding
    cosine = float(np.dot(va, vb)) / (norm_a * norm_b)
    return min(2.0, max(0.0, 1.0 - cosine))


def ngram_cosine_distance(a: str, b: str, n: int = 3) -> float:
    """Cosine distance between the character n-gram count vectors of two texts.

    Texts shorter than `n` are compared with n-grams as long as the shorter text. Identical texts
    (also two empty ones) are 0.0; an empty text against a non-empty one is 1.0.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    if a == b:
        return 0.0
    n = min(n, len(a), len(b))
    if n == 0:
        return 1.0
    ranks_a, ranks_b, alphabet = _char_ranks(a, b)
    grams_a, grams_b = _gram_ids(ranks_a, ranks_b, alphabet, n)
    _, inverse = np.unique(np.concatenate((grams_a, grams_b)), return_inverse=True)
    inverse = inverse.reshape(-1)
    size = int(np.max(inverse)) + 1
    counts_a = np.bincount(inverse[: grams_a.size], minlength=size)
    counts_b = np.bincount(inverse[grams_a.size :], minlength=size)
    return cosine_distance(counts_a, counts_b)


# --- the walk ---------------------------------------------------------------------------------


class _Missing:
    """A member or item absent on one side (distinct from any JSON value, "<absent>" included)."""

    def __repr__(self) -> str:
        return ABSENT


_MISSING: Any = _Missing()


class _Full(Exception):
    """Raised by a sink that has collected as many differences as it was asked for."""


class _Sink(Protocol):
    def ignore(self, path: str) -> bool: ...
    def atomic(self, path: str) -> bool: ...
    def whole(self, path: str) -> bool: ...
    def token_list(self, path: str) -> frozenset[str] | None: ...
    def settled(self, path: str) -> bool: ...
    def add(self, path: str, recorded: Any, live: Any) -> None: ...


def _walk(a: Any, b: Any, path: str, sink: _Sink) -> None:
    if a is _MISSING or b is _MISSING:
        sink.add(path, a, b)
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        if (sink.whole(path) and _same(a, b)) or sink.settled(path):
            return
        names = a.keys() | b.keys()
        try:
            ordered = sorted(names)
        except TypeError:  # mixed key types, only possible outside JSON
            ordered = sorted(names, key=str)
        for name in ordered:
            child = _member_path(path, name)
            if sink.ignore(child):
                continue
            x, y = a.get(name, _MISSING), b.get(name, _MISSING)
            if sink.atomic(child):
                if not _atomic_equal(x, y):
                    sink.add(child, x, y)
            else:
                _walk(x, y, child, sink)
    elif _is_array(a) and _is_array(b):
        values = sink.token_list(path)
        if values is not None:
            _walk_tokens(a, b, path, sink, values)
            return
        if (sink.whole(path) and _same(a, b)) or sink.settled(path):
            return
        for i in range(max(len(a), len(b))):
            _walk_item(a, b, i, path, sink)
    elif not _leaf_equal(a, b) and not _same_arguments(path, a, b):
        sink.add(path, a, b)


def _walk_item(a: Sequence[Any], b: Sequence[Any], i: int, path: str, sink: _Sink) -> None:
    child = f"{path}[{i}]"
    if not sink.ignore(child):
        _walk(a[i] if i < len(a) else _MISSING, b[i] if i < len(b) else _MISSING, child, sink)


def _walk_tokens(
    a: Sequence[Any], b: Sequence[Any], path: str, sink: _Sink, values: frozenset[str]
) -> None:
    """A logprobs list, with what the walk item by item would find, at C speed where items agree.

    Thousands of tokens whose logprob values jitter on every call: a block of items at a time,
    what the walk compares of them is taken out in columns (`_token_columns`) and compared whole,
    and only the items of a block that differ are walked, in order, so that what is found, and
    when the sink is settled, is unchanged. Block by block, the items are still in the processor's
    cache from one column to the next; columns rather than a tuple per item, as thousands of new
    tuples would have the garbage collector go through them (and everything they hold).
    """
    if sink.settled(path):
        return
    common = min(len(a), len(b))
    for start in range(0, common, _TOKEN_BLOCK):
        stop = min(start + _TOKEN_BLOCK, common)
        columns = _token_columns(a[start:stop], b[start:stop], values)
        if columns is not None and all(map(_same_column, *columns)):
            continue
        for i in range(start, stop):
            if columns is not None and _same(
                [column[i - start] for column in columns[0]],
                [column[i - start] for column in columns[1]],
            ):
                continue
            # Settled: every later item could only add a token difference to a full list.
            if sink.settled(path):
                return
            _walk_item(a, b, i, path, sink)
    for i in range(common, max(len(a), len(b))):  # items on one side only
        if sink.settled(path):
            return
        _walk_item(a, b, i, path, sink)


def _token_columns(
    a: Sequence[Any], b: Sequence[Any], values: frozenset[str]
) -> tuple[list[Sequence[Any]], list[Sequence[Any]]] | None:
    """What the walk compares of each item, in columns: leaves as they are; for entries (dicts),
    a column per member but `values`, None where a member is absent (the collector finds nothing
    between an absent member and a null one). None when some entry is no dict."""
    if not values:
        return [a], [b]
    if not _only(a, _DICT) or not _only(b, _DICT):
        return None
    names: set[str] = set()
    names.update(*a, *b)  # a dict at a time, faster than a set of their chained keys
    names -= values
    columns_a: list[Sequence[Any]] = []
    columns_b: list[Sequence[Any]] = []
    for name in names:
        columns_a.append(list(map(dict.get, a, itertools.repeat(name))))
        columns_b.append(list(map(dict.get, b, itertools.repeat(name))))
    return columns_a, columns_b


def _same_column(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """`_same` for a column of token items; texts (the tokens) by == alone, which is exact between
    strings, as marshal (which encodes each string anew) is needed only to tell numbers apart."""
    if _only(a, _TEXT) and _only(b, _TEXT):
        return a == b
    return _same(a, b)


def _only(items: Sequence[Any], types: frozenset[type]) -> bool:
    return set(map(type, items)) <= types


def _same_arguments(path: str, a: Any, b: Any) -> bool:
    """Tool-call arguments are JSON text: the same object with its members in another order,
    other spacing or a number written otherwise (1, 1.0) is the same call."""
    if not (path.endswith(".arguments") and isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        return _json_equal(json.loads(a), json.loads(b))
    except (ValueError, RecursionError):  # not JSON, or nested past what Python walks
        return False


def _json_equal(a: Any, b: Any) -> bool:
    """Equal by the walk's rules (members in any order, numbers by value, true is not 1)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return _leaf_equal(a, b)


def _same(a: Any, b: Any) -> bool:
    """Equal by the walk's rules, decided at C speed; False means "walk it to find out".

    Python's == says true == 1, so equal marshal bytes back it up (bools and ints have different
    codes; 5x faster than JSON text). 1 vs 1.0 or another member order make the bytes differ, and
    the walk then settles those by value. Version 2 writes no back-references, whose presence
    would depend on reference counts.
    """
    if a is b:
        return True
    try:
        return bool(a == b) and marshal.dumps(a, 2) == marshal.dumps(b, 2)
    except (TypeError, ValueError):  # not marshallable: a Mapping that is not a dict, …
        return False


def _leaf_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or (a != a and b != b)  # NaN (Python's JSON allows it) equals itself here
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return type(a) is type(b) and bool(a == b)


def _atomic_equal(a: Any, b: Any) -> bool:
    # Embedding vectors: thousands of floats, compared as one value by C-level ==.
    if _is_array(a) and _is_array(b):
        return len(a) == len(b) and bool(a == b)
    return _leaf_equal(a, b)


def _is_array(value: Any) -> bool:
    return isinstance(value, list | tuple)


def _member_path(parent: str, name: Any) -> str:
    name = str(name)
    if not _PLAIN_NAME.fullmatch(name):
        # A name that would make the path ambiguous (a dot, a bracket, a space) is quoted.
        return f"{parent}[{json.dumps(name, ensure_ascii=False)}]"
    return f"{parent}.{name}" if parent else name


class _ListSink:
    __slots__ = ("_ignore", "_limit", "differences")

    def __init__(self, ignore: Callable[[str], bool] | None, limit: int) -> None:
        self._ignore = ignore
        self._limit = limit
        self.differences: list[Difference] = []

    def ignore(self, path: str) -> bool:
        return self._ignore is not None and self._ignore(path)

    def atomic(self, path: str) -> bool:
        return False

    def whole(self, path: str) -> bool:
        return True

    def token_list(self, path: str) -> frozenset[str] | None:
        return None

    def settled(self, path: str) -> bool:
        return False

    def add(self, path: str, recorded: Any, live: Any) -> None:
        self.differences.append(_difference(path, recorded, live))
        if len(self.differences) >= self._limit:
            raise _Full


class _Collector:
    """Sorts each difference of a comparison into the verdict category it supports."""

    __slots__ = ("_live_items", "_recorded_items", "embedding_pairs", "found", "tokens")

    def __init__(self, recorded_items: dict[int, str], live_items: dict[int, str]) -> None:
        self._recorded_items = recorded_items
        self._live_items = live_items
        self.found: dict[Verdict, list[Difference]] = {v: [] for v in _LISTING_ORDER}
        # Differing logprobs tokens: CONTENT, but listed after the text they repeat piece by piece.
        self.tokens: list[Difference] = []
        self.embedding_pairs: list[tuple[Any, Any]] = []

    def listed(self) -> list[Difference]:
        """The differences in listing order: what decided the verdict first, usage last."""
        return [
            d
            for category in _LISTING_ORDER
            for d in (
                [*self.found[category], *self.tokens]
                if category is Verdict.CONTENT
                else self.found[category]
            )
        ]

    def ignore(self, path: str) -> bool:
        if path in _IGNORED_TOP_LEVEL:
            return True
        if path.endswith(("logprob", "logprobs")) and _LOGPROB_VALUES.fullmatch(path):
            return True
        return (
            path.endswith(_NESTED_VOLATILE_ENDINGS) and _NESTED_VOLATILE.fullmatch(path) is not None
        )

    def atomic(self, path: str) -> bool:
        return path.endswith(".embedding") and _EMBEDDING.fullmatch(path) is not None

    def whole(self, path: str) -> bool:
        # Whether a container is first compared whole: not those holding logprobs lists.
        return _ABOVE_TOKENS.fullmatch(path) is None

    def token_list(self, path: str) -> frozenset[str] | None:
        # For a logprobs list, the members of its items left out (none for leaves); None for
        # any other array.
        if not path.endswith(("content", "refusal", "logprobs", "tokens", "text_offset")):
            return None
        if _TOKEN_ENTRIES.fullmatch(path):
            return _ENTRY_VALUES
        return frozenset() if _TOKEN_LEAVES.fullmatch(path) else None

    def settled(self, path: str) -> bool:
        # Two logprobs lists that part ways differ at thousands of tokens: once as many as can be
        # listed are found, walking the rest would change nothing (the verdict is CONTENT).
        return len(self.tokens) >= _DIFFERENCE_LIMIT and _LOGPROBS.fullmatch(path) is not None

    def add(self, path: str, recorded: Any, live: Any) -> None:
        # A member that is null/empty on one side and absent or empty on the other (`refusal:
        # null` from OpenAI, nothing from vLLM; `annotations: []` in a response, nothing in its
        # stream) says the same thing, and a usage reported on one side only (a stream without
        # include_usage) is no divergence of the output: neither is a difference.
        if _empty(recorded) and _empty(live):
            return
        if path == "usage" and (_absent(recorded) or _absent(live)):
            return
        if "logprobs" in path and _LOGPROB_TOKENS.fullmatch(path):
            bucket = self.tokens
        else:
            category = self._category(path, recorded, live)
            if category is Verdict.CONTENT and _EMBEDDING.fullmatch(path):
                self.embedding_pairs.append((recorded, live))
            bucket = self.found[category]
        # Only the first ones of each category can make the final list; the rest just count.
        if len(bucket) < _DIFFERENCE_LIMIT:
            bucket.append(_difference(path, recorded, live))

    def _category(self, path: str, recorded: Any, live: Any) -> Verdict:
        if path == "usage" or path.startswith(("usage.", "usage[")):
            return Verdict.USAGE_ONLY
        return self._output_category(path)

    def _output_category(self, path: str) -> Verdict:
        if path.startswith("choices["):
            if _CHAT_CONTENT.match(path):
                return Verdict.CONTENT
            if _CHAT_TOOL_CALLS.fullmatch(path):
                return Verdict.TOOL_CALLS
            if _CHOICE_FINISH.fullmatch(path):
                return Verdict.FINISH_REASON
            return Verdict.SHAPE
        if path.startswith("output["):
            return self._responses_item_category(path)
        if path == "output_text" or _EMBEDDING.fullmatch(path):
            return Verdict.CONTENT
        if path == "status" or path == "incomplete_details" or path.startswith(_INCOMPLETE):
            return Verdict.FINISH_REASON
        return Verdict.SHAPE

    def _responses_item_category(self, path: str) -> Verdict:
        match = _OUTPUT_ITEM.fullmatch(path)
        if match is None:
            return Verdict.SHAPE
        index, rest = int(match.group(1)), match.group(2)
        types = {self._recorded_items.get(index), self._live_items.get(index)}
        if rest == "":
            # An output item on one side only: the model said more, or called another tool.
            if types & _TEXT_ITEM_TYPES:
                return Verdict.CONTENT
            if types & _TOOL_ITEM_TYPES:
                return Verdict.TOOL_CALLS
            return Verdict.SHAPE
        if _OUTPUT_TEXT.fullmatch(rest) or rest.endswith(".text"):
            return Verdict.CONTENT
        if rest in _TOOL_ITEM_MEMBERS and types & _TOOL_ITEM_TYPES:
            return Verdict.TOOL_CALLS
        if rest == ".status":
            return Verdict.FINISH_REASON
        return Verdict.SHAPE


def _difference(path: str, recorded: Any, live: Any) -> Difference:
    if isinstance(recorded, str) and isinstance(live, str):
        return Difference(path, *_short_texts(recorded, live))
    return Difference(
        path,
        ABSENT if recorded is _MISSING else short(recorded),
        ABSENT if live is _MISSING else short(live),
    )


def _short_texts(a: str, b: str, limit: int = 60) -> tuple[str, str]:
    """Two differing texts cut down for a log line. When they part past what `short` shows (a
    long system prompt with one word changed), both are shown from a little before that point:
    two identical beginnings would say nothing."""
    parted = _common_prefix_length(a, b)
    if parted < limit - 1:
        return short(a, limit), short(b, limit)
    start = parted - _LEAD_IN
    return _window(a, start, limit), _window(b, start, limit)


# Characters shown before the point where two long texts part.
_LEAD_IN = 20


def _window(text: str, start: int, limit: int) -> str:
    """`limit` characters of `text` from `start`, marked "…" where cut."""
    shown = text[start : start + limit - 2]
    return "…" + shown + ("…" if start + limit - 2 < len(text) else "")


def _absent(value: Any) -> bool:
    return value is _MISSING or value is None


def _empty(value: Any) -> bool:
    return (
        value is _MISSING or value is None or (isinstance(value, str | list | dict) and not value)
    )


def _item_types(body: Any) -> dict[int, str]:
    output = body.get("output") if isinstance(body, Mapping) else None
    if not isinstance(output, list):
        return {}
    return {
        i: item["type"]
        for i, item in enumerate(output)
        if isinstance(item, Mapping) and isinstance(item.get("type"), str)
    }


def _has_embeddings(body: Any) -> bool:
    data = body.get("data") if isinstance(body, Mapping) else None
    return (
        isinstance(data, list)
        and bool(data)
        and all(isinstance(item, Mapping) and "embedding" in item for item in data)
    )


def _fingerprint(body: Any) -> str | None:
    value = body.get("system_fingerprint") if isinstance(body, Mapping) else None
    # Null, absent or empty all mean "unknown" (DESIGN §4).
    return value if isinstance(value, str) and value else None


# --- output text ------------------------------------------------------------------------------


def _in_index_order(choices: list[Any]) -> list[Mapping[str, Any]]:
    mappings = [c for c in choices if isinstance(c, Mapping)]

    def index(pair: tuple[int, Mapping[str, Any]]) -> tuple[int, int]:
        position, choice = pair
        value = choice.get("index")
        if isinstance(value, int) and not isinstance(value, bool):
            return (value, position)
        return (position, position)

    return [choice for _, choice in sorted(enumerate(mappings), key=index)]


def _message_texts(message: Mapping[str, Any]) -> Iterator[str]:
    # Vendor reasoning (DeepSeek and vLLM `reasoning_content`, OpenRouter and Ollama `reasoning`
    # and `reasoning_details`): the model's output before the answer.
    for name in ("reasoning_content", "reasoning"):
        if isinstance(message.get(name), str):
            yield message[name]
    details = message.get("reasoning_details")
    if isinstance(details, list):
        for detail in details:
            if isinstance(detail, Mapping):
                yield from (
                    detail[k] for k in ("summary", "text") if isinstance(detail.get(k), str)
                )
    content = message.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        # Some servers answer with content parts, as in requests.
        for part in content:
            if isinstance(part, str):
                yield part
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                yield part["text"]
    audio = message.get("audio")
    if isinstance(audio, Mapping) and isinstance(audio.get("transcript"), str):
        yield audio["transcript"]
    if isinstance(message.get("refusal"), str):
        yield message["refusal"]
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            if isinstance(call, Mapping):
                spec = call.get("function", call.get("custom"))
                if isinstance(spec, Mapping):
                    yield _call_text(spec.get("name"), spec.get("arguments", spec.get("input")))
    function_call = message.get("function_call")
    if isinstance(function_call, Mapping):
        yield _call_text(function_call.get("name"), function_call.get("arguments"))


def _output_item_texts(item: Mapping[str, Any]) -> Iterator[str]:
    kind = item.get("type")
    if not isinstance(kind, str):
        return
    if kind == "reasoning":
        for name in ("summary", "content"):
            parts = item.get(name)
            if isinstance(parts, list):
                for part in parts:
                    if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                        yield part["text"]
    elif kind == "message" and isinstance(item.get("content"), list):
        for part in item["content"]:
            if not isinstance(part, Mapping):
                continue
            if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                yield part["text"]
            elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                yield part["refusal"]
    elif kind in _TOOL_ITEM_TYPES:
        yield _call_text(item.get("name"), item.get("arguments", item.get("input")))


def _call_text(name: Any, arguments: Any) -> str:
    args = _canonical_arguments(arguments) if isinstance(arguments, str) else ""
    return f"{name if isinstance(name, str) else ''}({args})"


def _canonical_arguments(arguments: str) -> str:
    """JSON arguments as compact JSON with sorted members, 1.0 written 1 (as `_same_arguments`
    compares them); anything else (a custom tool's free text) as it is."""
    try:
        parsed = json.loads(arguments, parse_float=_json_number)
        return json.dumps(parsed, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError):  # not JSON, or nested past what Python walks
        return arguments


def _json_number(text: str) -> float | int:
    value = float(text)
    # Within float's exact integers only: 1e300 stays a float rather than a 301-digit int.
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


# --- similarity -------------------------------------------------------------------------------


def _text_similarity(a: str, b: str) -> Similarity:
    if not a and not b:
        return Similarity(None, None, None)
    if a == b:
        return Similarity(1.0, 0.0, None)
    prefix = _common_prefix_length(a, b)
    suffix = _common_prefix_length(a[prefix:][::-1], b[prefix:][::-1])
    return Similarity(
        text_ratio=_text_ratio(a, b, prefix, suffix),
        ngram_cosine_distance=ngram_cosine_distance(a, b),
        first_difference_at=prefix,
    )


def _common_prefix_length(a: str, b: str) -> int:
    # Binary search over slice comparisons: linear work done in C, not a Python loop per char.
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _text_ratio(a: str, b: str, prefix: int, suffix: int) -> float:
    """difflib's SequenceMatcher ratio (autojunk off), approximated for long texts.

    Within _CHAR_MATCH_BUDGET it is exactly difflib's. Beyond, the common prefix and suffix count
    as matched (as diff tools do) and only the differing middles are matched: by character if they
    fit the budget, else word by word with the matched words counted in characters, and when too
    long even for that, by the word triples they share in any order (linear, order-blind beyond
    three words, so it can overrate a reshuffled text).
    """
    if len(a) * len(b) <= _CHAR_MATCH_BUDGET:
        return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
    middle_a, middle_b = a[prefix : len(a) - suffix], b[prefix : len(b) - suffix]
    matched = prefix + suffix
    if middle_a and middle_b:
        if len(middle_a) * len(middle_b) <= _CHAR_MATCH_BUDGET:
            matcher = difflib.SequenceMatcher(None, middle_a, middle_b, autojunk=False)
            matched += sum(block.size for block in matcher.get_matching_blocks())
        else:
            matched += _word_matched_chars(middle_a, middle_b)
    return 2.0 * matched / (len(a) + len(b))


def _word_matched_chars(a: str, b: str) -> int:
    words_a, words_b = _WORD.findall(a), _WORD.findall(b)
    if len(words_a) * len(words_b) > _WORD_MATCH_BUDGET:
        return _shingle_matched_chars(words_a, words_b)
    # Matched without the spaces before them, so that a rewrapped text (spaces to newlines) still
    # matches word for word; the spaces count as matched only where they are the same.
    stripped_a, stripped_b = [w.lstrip() for w in words_a], [w.lstrip() for w in words_b]
    matcher = difflib.SequenceMatcher(None, stripped_a, stripped_b, autojunk=False)
    matched = 0
    for i, j, size in matcher.get_matching_blocks():
        for k in range(size):
            same = words_a[i + k] == words_b[j + k]
            matched += len(words_a[i + k]) if same else len(stripped_a[i + k])
    return matched


def _shingle_matched_chars(words_a: list[str], words_b: list[str]) -> int:
    # Linear: a word counts as matched when the three words starting at it occur in the other text
    # too, as often. Unlike a bag of words, unrelated texts of one vocabulary score low.
    def shingles(words: list[str]) -> collections.Counter[tuple[str, ...]]:
        return collections.Counter(zip(words, words[1:], words[2:], strict=False))

    common = shingles(words_a) & shingles(words_b)
    return sum(len(shingle[0]) * count for shingle, count in common.items())


def _char_ranks(a: str, b: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
    # surrogatepass: JSON may carry a lone surrogate ("\ud800"), which json.loads keeps as is.
    codes = np.frombuffer((a + b).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    alphabet, ranks = np.unique(codes, return_inverse=True)
    ranks = ranks.reshape(-1).astype(np.int64)
    return ranks[: len(a)], ranks[len(a) :], int(alphabet.size)


def _gram_ids(
    ranks_a: npt.NDArray[np.int64], ranks_b: npt.NDArray[np.int64], alphabet: int, n: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    if alphabet**n < 2**63:
        # Each n-gram packed into one int64, in base `alphabet`: a vectorised rolling number.
        def pack(ranks: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
            count = ranks.size - n + 1
            ids = np.zeros(count, dtype=np.int64)
            for j in range(n):
                ids = ids * alphabet + ranks[j : j + count]
            return ids

        return pack(ranks_a), pack(ranks_b)
    # Too many distinct characters for packing: number the distinct n-gram rows instead.
    windows = np.lib.stride_tricks.sliding_window_view
    rows = np.concatenate((windows(ranks_a, n), windows(ranks_b, n)))
    _, inverse = np.unique(rows, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    split = ranks_a.size - n + 1
    return inverse[:split], inverse[split:]


def _embedding_distance(pairs: list[tuple[Any, Any]]) -> float:
    """The largest cosine distance between differing embedding vectors; 0.0 if none differ."""
    distances = [0.0]
    for recorded, live in pairs:
        va, vb = _vector(recorded), _vector(live)
        if va is not None and vb is not None and va.shape == vb.shape:
            distances.append(cosine_distance(va, vb))
    return max(distances)


def _vector(value: Any) -> npt.NDArray[np.float64] | None:
    if isinstance(value, str):
        # `encoding_format: base64` (the Python SDK's default): little-endian float32 (§6.3).
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(raw) % 4:
            return None
        return np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if _is_array(value):
        try:
            return np.asarray(value, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            return None
    return None


# --- small helpers ----------------------------------------------------------------------------


def _json_prefix(value: Any, length: int) -> str:
    """The start of `value`'s compact JSON text, at least `length` chars if it is that long.

    Encodes incrementally, so shortening a 3,000-float embedding does not serialise all of it.
    """
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_json_default)
    pieces: list[str] = []
    size = 0
    for piece in encoder.iterencode(value):
        pieces.append(piece)
        size += len(piece)
        if size >= length:
            break
    return "".join(pieces)


def _json_default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, _Missing):
        return ABSENT
    return str(value)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
