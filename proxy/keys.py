"""The canonical request and its key (DESIGN §3).

Pure: turns a method, path and parsed JSON body into key material and a sha256 key. Changing any
rule here changes `KEY_SCHEME`, so that old recordings miss instead of answering the wrong request.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import orjson

from proxy.errors import bad_request

if TYPE_CHECKING:
    from proxy.divergence import Difference

KEY_SCHEME = "seedcache-key/1"

# Namespace names: they become Redis key parts and folder names, so no separators, no leading dot.
NAMESPACE = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,127})?")
NAMESPACE_RULE = "up to 128 letters, digits, '.', '_' or '-', not starting with '.'"
# Folder names Windows refuses, with any extension. (A trailing '.' it drops, so that the folder is
# another one.)
_WINDOWS_DEVICE = re.compile(r"(?:con|prn|aux|nul|com[0-9]|lpt[0-9])(?:\..*)?", re.IGNORECASE)


def namespace_problem(namespace: str) -> str | None:
    """Why `namespace` cannot be one (every command and the proxy say it alike); None if it can."""
    if NAMESPACE.fullmatch(namespace):
        return None
    return f"namespace {namespace[:140]!r} is not valid: use {NAMESPACE_RULE}"


def unportable(namespace: str) -> bool:
    """Whether a folder named `namespace` cannot be checked out on Windows (a device name such
    as `con` or `aux.txt`, or a trailing '.'): a files store committed with one can be used
    everywhere else, so it is only warned of."""
    return namespace.endswith(".") or _WINDOWS_DEVICE.fullmatch(namespace) is not None


def has_dot_segments(path: str) -> bool:
    """Whether a path, percent-encoded or not, has `.` or `..` segments: resolved, they would
    step out of the upstream's /v1. No client of the API sends them."""
    return ("." in path or "%2" in path) and any(
        unquote(segment) in (".", "..") for segment in path.split("/")
    )


# Endpoints whose responses are recorded and replayed (DESIGN §5); every other path is forwarded.
RECORDED = frozenset(
    {
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/models"),
    }
)

# The recorded endpoints that stream when asked to.
STREAMED = frozenset(
    {
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/responses"),
    }
)

# Members that change framing, billing or tracking but never the generated output. An explicit
# denylist: an allowlist would silently merge requests differing in an extension it did not know.
BOOKKEEPING = frozenset(
    {
        "stream",
        "stream_options",
        "user",
        "safety_identifier",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        # vLLM and llama.cpp server bookkeeping.
        "request_id",
        "priority",
        "cache_salt",
        "kv_transfer_params",
        "id_slot",
        "timings_per_token",
        "return_progress",
    }
)

# Members whose type the key (and the miss explanation) relies on: name -> accepted types.
_TYPED_MEMBERS: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "messages": (list,),
    "seed": (int,),
    "n": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
}


@dataclass(frozen=True, slots=True)
class CanonicalRequest:
    """A request reduced to what decides its output, with its key material and key."""

    namespace: str
    method: str
    path: str
    body: Any
    material: str
    key: str

    @property
    def model(self) -> str | None:
        """The requested model, if the body names one."""
        model = self.body.get("model") if isinstance(self.body, dict) else None
        return model if isinstance(model, str) else None

    @property
    def seed(self) -> int | None:
        """The requested seed, if any."""
        seed = self.body.get("seed") if isinstance(self.body, dict) else None
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def normalise_path(path: str, query: str = "") -> str:
    """The request path with the `/v1` prefix made explicit, plus its query string if any."""
    path = "/" + path.lstrip("/")
    if path != "/v1" and not path.startswith("/v1/"):
        path = "/v1" + path
    return f"{path}?{query}" if query else path


def canonical_body(body: Any) -> Any:
    """The body as keyed: top-level nulls and bookkeeping dropped, numbers by value."""
    if not isinstance(body, dict):
        return _canonical_value(body)
    return {
        name: _canonical_value(value)
        for name, value in body.items()
        if value is not None and name not in BOOKKEEPING
    }


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted members and raw UTF-8: the text that is hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def check_body(body: Any) -> None:
    """Raise a 400 for a body the key cannot be built from (not an object, mistyped members)."""
    if not isinstance(body, dict):
        raise bad_request(
            f"The request body must be a JSON object, got {type(body).__name__}.",
            code="invalid_body",
        )
    for name, types in _TYPED_MEMBERS.items():
        value = body.get(name)
        if value is None:
            continue
        if types == (int,) and isinstance(value, float) and value.is_integer():
            continue  # 123.0 is the number 123, as in the key
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join(_JSON_TYPE_NAMES[t] for t in types)
            raise bad_request(
                f"'{name}' must be {wanted}, got {_json_type(value)}.",
                param=name,
                code="invalid_type",
            )


def make_key(method: str, path: str, body: Any, namespace: str = "") -> CanonicalRequest:
    """Canonicalise a request and hash it into its key."""
    canonical = canonical_body(body)
    method = method.upper()
    material = "\n".join((KEY_SCHEME, namespace, method, path, canonical_json(canonical)))
    key = hashlib.sha256(material.encode("utf-8")).hexdigest()
    return CanonicalRequest(namespace, method, path, canonical, material, key)


# A request body with more JSON leaves than this is not compared with the recordings when it
# misses: the comparison walks every leaf on the event loop, a few microseconds each (a million
# token ids took seconds, and stalled every other request meanwhile).
COMPARE_LEAVES = 10_000
# Nor one whose canonical JSON is longer than this (characters): redacting and walking it first
# copies it, tens of milliseconds per MB.
COMPARE_SIZE = 4_000_000


def too_large_to_compare(canon: CanonicalRequest) -> str | None:
    """Why the miss of `canon` is not compared with the recordings (its body is too large to walk
    on the event loop), to append to the miss message; None when it is compared."""
    size = len(canon.material)
    if size > COMPARE_SIZE:
        measure = f"{size / 1e6:.1f} MB of JSON"
    elif _more_leaves(canon.body, COMPARE_LEAVES):
        measure = f"more than {COMPARE_LEAVES:,} JSON values"
    else:
        return None
    return (
        f". Its body ({measure}) is too large to compare with the recordings, so none is named as "
        "the nearest"
    )


def _more_leaves(value: Any, most: int) -> bool:
    """Whether `value` has more than `most` leaves; counts at most that many."""
    pending = [value]
    count = 0
    while pending:
        item = pending.pop()
        if isinstance(item, dict) and item:
            pending.extend(item.values())
        elif isinstance(item, list) and item:
            pending.extend(item)
        else:
            count += 1
            if count > most:
                return True
    return False


class RequestIndex:
    """The canonical requests of many recordings, grouped by (namespace, method, path, model), to
    find the nearest one to a request that missed (DESIGN §6) quickly among thousands."""

    def __init__(self) -> None:
        self._groups: dict[tuple[str, str, str, str | None], dict[str, _Indexed]] = {}
        # Recordings read but not indexed: too large to compare, as a request that large is
        # (`too_large_to_compare`). Their leaves would cost memory for as long as the index
        # lives (hundreds of megabytes for a few dozen batched embeddings of token ids).
        self._too_large: dict[str, tuple[str, str, str, str | None]] = {}

    def __len__(self) -> int:
        return sum(len(group) for group in self._groups.values())

    def keys(self) -> set[str]:
        """The keys of the recordings read into the index, indexed or too large to be."""
        return {key for group in self._groups.values() for key in group} | self._too_large.keys()

    def without(self, gone: Container[str]) -> RequestIndex:
        """A copy without the recordings under the keys `gone`."""
        kept = RequestIndex()
        for where, group in self._groups.items():
            if left := {key: item for key, item in group.items() if key not in gone}:
                kept._groups[where] = left
        kept._too_large = {key: at for key, at in self._too_large.items() if key not in gone}
        return kept

    def add(self, key: str, namespace: str, method: str, path: str, body: Any) -> None:
        """Index (or re-index) one recording's canonical request."""
        model = body.get("model") if isinstance(body, dict) else None
        where = (namespace, method, path, model)
        group = self._groups.setdefault(where, {})
        if _more_leaves(body, COMPARE_LEAVES):
            group.pop(key, None)
            self._too_large[key] = where
            return
        group[key] = _Indexed(body, frozenset(_leaves(body, "")))

    def nearest(
        self, canon: CanonicalRequest, body: Any, *, shortlist: int = 8
    ) -> tuple[str, list[Difference]] | None:
        """The other recording of the same namespace, method, path and model whose body differs
        from `body` in the fewest JSON paths, with those paths; None when there is none."""
        from proxy.divergence import json_paths_diff

        group = self._groups.get((canon.namespace, canon.method, canon.path, canon.model))
        # Not the request's own key: a recording there that could not serve it (deleted since
        # the index was built) differs nowhere, and naming it would explain nothing.
        candidates = [item for item in (group or {}).items() if item[0] != canon.key]
        if not candidates:
            return None
        # Rank every candidate by the size of the symmetric difference of (path, value) leaves,
        # a set operation, then walk only the shortlist for the exact differing paths. Among
        # those that differ in as few leaves (a templated prompt: every recording of a
        # parametrised test differs from it at the same path), the one whose differing values
        # are closest comes first: "river" is nearest "rivers", not "volcanoes".
        leaves = frozenset(_leaves(body, ""))
        sizes = [len(leaves ^ indexed.leaves) for _, indexed in candidates]
        fewest = min(sizes)
        tied = [item for item, size in zip(candidates, sizes, strict=True) if size == fewest]
        if len(tied) > 1:
            mine = {path: value.encode() for path, value in leaves}
            tied.sort(key=lambda item: -_closeness(mine, item[1].leaves - leaves))
        others = [pair for pair in zip(sizes, candidates, strict=True) if pair[0] != fewest]
        others.sort(key=lambda pair: pair[0])
        ranked = tied + [item for _, item in others]
        best: tuple[str, list[Difference]] | None = None
        for key, indexed in ranked[:shortlist]:
            bound = len(best[1]) if best is not None else 200
            differences = json_paths_diff(body, indexed.body, limit=bound)
            if best is None or len(differences) < len(best[1]):
                best = (key, differences)
        return best

    def too_large(self, canon: CanonicalRequest) -> bool:
        """Whether recordings of the same namespace, method, path and model were left out of the
        index as too large to compare."""
        where = (canon.namespace, canon.method, canon.path, canon.model)
        return where in self._too_large.values()

    def elsewhere(self, canon: CanonicalRequest, body: Any) -> list[str]:
        """The other namespaces that hold a recording of this very request (same method, path
        and canonical body): a renamed or forgotten namespace explains the miss."""
        leaves = frozenset(_leaves(body, ""))
        found = {
            namespace
            for (namespace, method, path, model), group in self._groups.items()
            if namespace != canon.namespace
            and (method, path, model) == (canon.method, canon.path, canon.model)
            and any(indexed.leaves == leaves for indexed in group.values())
        }
        return sorted(found)


@dataclass(frozen=True, slots=True)
class _Indexed:
    body: Any
    leaves: frozenset[tuple[str, str]]


def _closeness(mine: dict[str, bytes], theirs: Iterable[tuple[str, str]]) -> int:
    """How alike the values of a request (`mine`, path to its value's UTF-8) and those of a
    recording where they differ (`theirs`, its (path, value) leaves the request does not have)
    are: the bytes they share at their start and, after that, at their end, summed over the
    paths both have. Each is found from the XOR of the two read as integers (its highest set bit
    is the first byte that differs, its lowest the last): linear in their length, in C, unlike
    an edit distance, so that a long prompt costs no more than reading it."""
    alike = 0
    number = int.from_bytes
    for path, value in theirs:
        a = mine.get(path)
        if a is None:
            continue
        b = value.encode()
        most = min(len(a), len(b))
        start = most - ((number(a[:most]) ^ number(b[:most])).bit_length() + 7) // 8
        rest = most - start
        differ = number(a[len(a) - rest :]) ^ number(b[len(b) - rest :])
        alike += start + (rest if not differ else ((differ & -differ).bit_length() - 1) // 8)
    return alike


def _leaves(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict) and value:
        for name, item in value.items():
            yield from _leaves(item, f"{path}.{name}" if path else name)
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            yield from _leaves(item, f"{path}[{index}]")
    else:
        yield path, canonical_json(value)


def describe_differences(differences: Iterable[Difference], most: int = 5) -> str:
    """`path: 'asked' != 'recorded'; …` for at most `most` paths (a Difference from comparing
    a request with a recording holds the request's value in `recorded`, the recording's in
    `live`)."""
    from proxy.divergence import short

    listed = list(differences)
    parts = [
        f"{d.path or '(body)'}: {_pair(short(d.recorded), short(d.live))}" for d in listed[:most]
    ]
    if len(listed) > most:
        parts.append(f"and {len(listed) - most} more")
    return "; ".join(parts)


def _pair(asked: Any, recorded: Any) -> str:
    """`'asked' != 'recorded'`, escaped to ASCII where the two would print alike: the same text
    in another Unicode normal form (an accent composed, or combining after its letter as in
    macOS file names)."""
    if (
        isinstance(asked, str)
        and isinstance(recorded, str)
        and unicodedata.normalize("NFC", asked) == unicodedata.normalize("NFC", recorded)
    ):
        return f"{asked!a} != {recorded!a} (the same text in another Unicode form)"
    return f"{asked!r} != {recorded!r}"


def _canonical_value(value: Any) -> Any:
    # Exact type checks: parsed JSON holds only dict, list, str, int, float, bool and None, and
    # this runs on every request.
    kind = type(value)
    if kind is dict:
        return {name: _canonical_value(item) for name, item in value.items()}
    if kind is list:
        return [_canonical_value(item) for item in value]
    # 1 and 1.0 are one number: integral floats become ints, so every SDK keys alike (within the
    # integers a recording can hold).
    if kind is float and value.is_integer() and _INT_MIN <= value < _INT_END:
        return int(value)
    return value


# The integers orjson, which writes recordings, can hold: int64 and uint64.
_INT_MIN, _INT_END = -(2**63), 2**64

_JSON_TYPE_NAMES = {str: "a string", list: "an array", int: "an integer", float: "a number"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def parse_json(raw: bytes) -> Any:
    """The request body as JSON, or a 400 that says what is wrong with it."""
    if not raw:
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            # orjson reads integers beyond 64 bits as doubles, as JavaScript does, but refuses
            # those beyond a double's range, which JSON allows; NaN stays refused.
            return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite)
        except RecursionError:
            raise bad_request(
                "The request body is nested too deeply to be a chat request.",
                code="invalid_json",
            ) from None
        except (ValueError, UnicodeDecodeError):
            raise bad_request(
                f"The request body is not valid JSON: {exc}.", code="invalid_json"
            ) from None
    if _LONG_DIGITS.search(raw):
        # Perhaps an integer beyond 64 bits, which orjson reads as the nearest double: two that
        # round alike would share a key. Read exactly, check_storable refuses it with a 400.
        return json.loads(raw)
    return value


# 19 digits in a row: the shortest integer literal orjson may read as a double (below -2**63).
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def _finite(text: str) -> float:
    """A JSON number as a double; one beyond a double's range (1e400) would be keyed as infinity
    and stored as null, so it is refused."""
    number = float(text)
    if math.isinf(number):
        raise bad_request(
            f"The number {text[:40]} in the request body is beyond the range of a double.",
            code="invalid_body",
        )
    return number


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
