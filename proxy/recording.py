"""Recordings and samples: the `seedcache.recording/1` format, header allowlists and redaction.

Pure: converts between `Recording` objects and the JSON every store holds (DESIGN §8). Picking
which sample to serve is here too, since it only reads a recording.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

import orjson

from proxy import sse
from proxy.errors import FormatError, bad_request
from proxy.sse import Event

FORMAT = "seedcache.recording/1"

# Response headers worth replaying; the rest (cookies, rate limits, organisation) is live-only.
STORED_RESPONSE_HEADERS = frozenset(
    {"content-type", "openai-processing-ms", "openai-version", "x-request-id"}
)

# API-key shaped secrets: OpenAI/Anthropic style keys and bearer tokens (HTTP auth schemes are
# case-insensitive) that look like tokens: 16 characters or more, a digit among them, so that
# "Bearer authentication" is prose. Neither match holds a quote or a backslash, so replacing one
# inside JSON text leaves valid JSON.
_SECRET = re.compile(
    r"(?<![A-Za-z0-9])(?:sk|rk|pk)-[A-Za-z0-9_\-]{16,}"
    r"|\b(?i:bearer)\s+(?=[A-Za-z0-9._~+/\-]*[0-9])[A-Za-z0-9._~+/\-]{16,}=*"
)
# A cheap first look over raw JSON text: anything `_SECRET` finds in a decoded string shows here.
_MAYBE = r"(?:sk|rk|pk)-[A-Za-z0-9_\-]{16}|(?i:bearer)"
_MAYBE_SECRET = re.compile(_MAYBE.encode())
REDACTED = "<redacted>"
# Query parameters that hold a credential whatever its shape (Gemini's ?key=AIza…, Azure's
# ?api-key=, ?access_token=, a signed URL's sig=): their names end in one of these words once
# lowercased without separators (api_key, X-Api-Key, subscription-key, accessToken,
# X-Amz-Signature, client_secret).
_CREDENTIAL_NAMES = (
    "key",
    "token",
    "secret",
    "password",
    "passwd",
    "pwd",
    "auth",
    "authorization",
    "sig",
    "signature",
    "credential",
    "credentials",
)


@dataclass(frozen=True, slots=True)
class Sample:
    """One recorded response with the identity of the backend that produced it."""

    recorded_at: str
    upstream: str
    model: str | None
    system_fingerprint: str | None
    status: int
    headers: dict[str, str]
    elapsed_ms: int
    body: Any = None
    events: tuple[Event, ...] | None = None

    def response(self) -> Any:
        """The response in its non-streaming shape: a stream is assembled."""
        if self.events is None:
            return self.body
        try:
            return sse.assemble(self.events)
        except ValueError as exc:
            raise FormatError(f"the recorded stream cannot be assembled: {exc}") from None

    @property
    def streamed(self) -> bool:
        """True when the sample was recorded from a stream."""
        return self.events is not None

    def to_json(self) -> dict[str, Any]:
        """The sample as stored."""
        # Members in sorted order, the body's in the upstream's: a replay serialises the body
        # again, and a client may see the order (a JSON schema's properties, a snapshot test).
        return {
            "body": self.body,
            "elapsed_ms": self.elapsed_ms,
            "events": None
            if self.events is None
            else [{"data": e.data, "event": e.event, "t_ms": e.t_ms} for e in self.events],
            "headers": dict(sorted(self.headers.items())),
            "model": self.model,
            "recorded_at": self.recorded_at,
            "status": self.status,
            "system_fingerprint": self.system_fingerprint,
            "upstream": self.upstream,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sample:
        """A sample from its stored JSON. What a replay sends as a header must be a one-line
        string, and every stream event a JSON object but `[DONE]`; headers outside the allowlist
        (a hand edit) are not replayed."""
        body, events = data.get("body"), data.get("events")
        if events is None and not isinstance(body, (dict, list)):
            raise FormatError("a sample needs a JSON object or array `body`, or `events`")
        if events is not None and (body is not None or not events):
            raise FormatError("a streamed sample has a non-empty `events` list and no `body`")
        headers = data.get("headers") or {}
        return cls(
            recorded_at=_header_value(data["recorded_at"], "recorded_at"),
            upstream=str(data.get("upstream", "")),
            model=None if data.get("model") is None else str(data["model"]),
            system_fingerprint=None
            if data.get("system_fingerprint") is None
            else _header_value(data["system_fingerprint"], "system_fingerprint"),
            status=int(data.get("status", 200)),
            headers={
                name.lower(): _header_value(value, f"header {name}")
                for name, value in headers.items()
                if name.lower() in STORED_RESPONSE_HEADERS
            },
            elapsed_ms=int(data.get("elapsed_ms", 0)),
            body=body,
            events=None
            if events is None
            else tuple(_stored_event(e, index) for index, e in enumerate(events)),
        )


def _stored_event(item: Mapping[str, Any], index: int) -> Event:
    """One stored stream event. Its `data` is what a replay sends: a client parses every one as
    JSON, but the `[DONE]` closing chat and completions streams (stored with them), so a hand
    edit that broke one is refused here rather than replayed (the SDK fails on it) or left out
    of an assembled answer without a word."""
    text = item["data"]
    if not isinstance(text, str):
        raise FormatError(f"`events[{index}].data` is {type(text).__name__}, not a string")
    if text != sse.DONE and not sse.is_object_text(text):
        raise FormatError(f"`events[{index}].data` is not a JSON object: {text!r:.60}")
    return Event(text, _optional_text(item.get("event"), "event"), int(item.get("t_ms", 0)))


def _optional_text(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise FormatError(f"`{name}` is {type(value).__name__}, not a string or null")
    return value


def _header_value(value: Any, name: str) -> str:
    """A stored value a replay sends as a header: a string on one line."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a hand-written fixture's `"openai-processing-ms": 312`
    if not isinstance(value, str) or not header_safe(value):
        raise FormatError(
            f"`{name}` must be a string on one line, without control characters, got {value!r:.60}"
        )
    return value


def header_safe(value: str) -> bool:
    """Whether a header can carry `value`: aiohttp refuses to send control characters (CR and LF
    would start another header), which would cut the replay's connection."""
    return _CONTROL.search(value) is None


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Recording:
    """Everything stored under one key: the canonical request and its samples, oldest first."""

    key: str
    method: str
    path: str
    body: Any
    namespace: str = ""
    samples: tuple[Sample, ...] = field(default_factory=tuple)

    @property
    def model(self) -> str | None:
        """The requested model, if the request named one."""
        model = self.body.get("model") if isinstance(self.body, dict) else None
        return model if isinstance(model, str) else None

    def to_json(self) -> dict[str, Any]:
        """The recording as stored (DESIGN §8)."""
        return {
            "format": FORMAT,
            "key": self.key,
            "namespace": self.namespace,
            # The request with its members sorted, as its key material has them.
            "request": {
                "body": sorted_members(self.body),
                "method": self.method,
                "path": self.path,
            },
            "samples": [s.to_json() for s in self.samples],
        }

    def dumps(self, *, pretty: bool = False) -> bytes:
        """The stored bytes; `pretty` gives the stable, indented form for files in git."""
        text = orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2 if pretty else 0)
        return text + b"\n" if pretty else text

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Recording:
        """A recording from its stored JSON; an unknown format is an error that says what to do."""
        fmt = data.get("format")
        if fmt != FORMAT:
            raise FormatError(
                f"recording format {fmt!r} is not {FORMAT!r}: this seedcache cannot read it; "
                "re-record it, or upgrade seedcache if it was written by a newer version"
            )
        request = data["request"]
        return cls(
            key=str(data["key"]),
            method=str(request["method"]),
            path=str(request["path"]),
            body=request.get("body"),
            namespace=str(data.get("namespace", "")),
            samples=tuple(Sample.from_json(s) for s in data.get("samples", ())),
        )

    @classmethod
    def loads(cls, raw: bytes | str) -> Recording:
        """A recording from stored bytes."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise FormatError(f"stored recording is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise FormatError("stored recording is not a JSON object")
        try:
            return cls.from_json(data)
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # A hand-edited file: a member missing, or of the wrong JSON type.
            raise FormatError(f"stored recording is malformed: {exc!r}") from None

    def summary(self, namespace: str | None = None) -> dict[str, Any]:
        """One line's worth of facts: what `seedcache ls --json` and /_seedcache/recordings show."""
        body = self.body if isinstance(self.body, dict) else {}
        return {
            "key": self.key,
            "namespace": self.namespace if namespace is None else namespace,
            "method": self.method,
            "path": redact_path(self.path),  # as stored now; one recorded before may hold a key
            "model": self.model,
            "seed": body.get("seed"),
            "samples": len(self.samples),
            "fingerprints": _distinct(s.system_fingerprint for s in self.samples),
            "response_models": _distinct(s.model for s in self.samples),
            "streamed": any(s.streamed for s in self.samples),
            "newest_recorded_at": self.newest_recorded_at,
        }

    @property
    def newest_recorded_at(self) -> str | None:
        """The newest `recorded_at` of the samples, as stored."""
        times = [(recorded_at(s) or EARLIEST, s.recorded_at) for s in self.samples]
        return max(times)[1] if times else None

    def with_sample(self, sample: Sample) -> Recording:
        """This recording with `sample` added, newest last.

        One sample per distinct (fingerprint, output): a sample equal in both to an existing one
        replaces it (moving it to the end), so re-recording the same output does not grow it.
        """
        kept: list[Sample] = []
        same: list[Sample] = []
        for old in self.samples:
            (same if _same_output(old, sample) else kept).append(old)
        if same and stream_lacks_usage(sample) and not all(map(stream_lacks_usage, same)):
            # The same output recorded with its usage says more: streams asking include_usage,
            # and plain requests, replay it.
            return self
        return replace(self, samples=(*kept, sample))

    def stored_under(self, key: str) -> Recording:
        """This recording under `key`, the key it is stored under: what requests find it by (a
        files store's file name), whatever its `key` member says (a file copied by hand)."""
        return self if self.key == key else replace(self, key=key)

    def with_sample_at(self, sample: Sample, index: int) -> Recording:
        """This recording with `sample` as its sample number `index` (from 0), for
        `--repeat sequence`, where a sample's place is the identical request it answers.

        The sample there is replaced, or `sample` appended when the recording ends before
        `index`. An output equal to another sample's is a sample of its own: a run that got the
        same answer twice replays it twice.
        """
        samples = self.samples
        index = min(index, len(samples))
        if index < len(samples):
            old = samples[index]
            if (
                stream_lacks_usage(sample)
                and not stream_lacks_usage(old)
                and _same_output(old, sample)
            ):
                sample = old  # as in `with_sample`: the same output with its usage says more
        return replace(self, samples=(*samples[:index], sample, *samples[index + 1 :]))


def stream_lacks_usage(sample: Sample) -> bool:
    """A chat or completions stream recorded without include_usage: it never learnt its usage."""
    if sample.events is None or is_responses(sample.events):
        return False
    return next(_usage_chunks(sample.events), None) is None


def has_usage_chunk(events: tuple[Event, ...]) -> bool:
    """Whether a chat or completions stream ends with a usage chunk (include_usage): one with
    usage and no choices, which code reading `chunk.choices[0]` must have asked for."""
    return any(chunk.get("choices") == [] for chunk in _usage_chunks(events))


def _usage_chunks(events: tuple[Event, ...]) -> Iterator[dict[str, Any]]:
    """Each chunk of a stream that carries its usage, last first: OpenAI sends it in a chunk of
    its own, llama.cpp and others on the chunk that finishes."""
    for event in reversed(events):
        if event.data.startswith("{") and '"usage"' in event.data:
            try:
                data = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(data, dict) and isinstance(data.get("usage"), dict) and data["usage"]:
                yield data


def is_responses(events: tuple[Event, ...]) -> bool:
    """Whether a stream is the Responses API's (named events, usage in its terminal event)."""
    return any(event.event is not None for event in events[:1])


def _same_output(a: Sample, b: Sample) -> bool:
    """Same fingerprint, model and output: a stream's random `obfuscation` padding, ids and
    usage do not make a new sample."""
    if a.system_fingerprint != b.system_fingerprint or a.model != b.model:
        return False
    if a.events is None and b.events is None and a.body == b.body:
        return True
    from proxy.divergence import Verdict, compare

    try:
        first, second = a.response(), b.response()
    except ValueError:  # a stream with no JSON chunk: compare what was sent
        return [e.data for e in a.events or ()] == [e.data for e in b.events or ()]
    # The audit leaves logprob values out of its verdict (they jitter on every call), but a
    # sample replays them: answers that differ in them are different samples (--repeat sequence
    # serves each).
    if _logprobs(first) != _logprobs(second):
        return False
    return compare(first, second).verdict in (Verdict.IDENTICAL, Verdict.USAGE_ONLY)


def _logprobs(response: Any) -> list[Any]:
    """The logprobs of a response's choices, or of the texts of a Responses object's output."""
    if not isinstance(response, dict):
        return []
    found = [c.get("logprobs") for c in response.get("choices") or () if isinstance(c, dict)]
    for item in response.get("output") or ():
        if isinstance(item, dict):
            parts = item.get("content")
            found += [p.get("logprobs") for p in parts or () if isinstance(p, dict)]
    return found


def pick_sample(
    samples: tuple[Sample, ...], *, current: str | None, pinned: str | None = None
) -> tuple[Sample | None, bool]:
    """The sample to replay and whether it is stale (DESIGN §4).

    The newest sample with the pinned fingerprint, else with the current one, wins; a null
    fingerprint on either side is "unknown" and matches anything, when nothing matches exactly.
    With no pin, if nothing matches, the newest sample is returned marked stale; with a pin,
    none is returned.
    """
    if not samples:
        return None, False
    wanted = pinned if pinned is not None else current
    if wanted is None:
        return samples[-1], False
    for sample in reversed(samples):
        if sample.system_fingerprint == wanted:
            return sample, False
    for sample in reversed(samples):
        if sample.system_fingerprint is None:
            return sample, False
    if pinned is not None:
        return None, False
    return samples[-1], True


def stored_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The allowlisted response headers, lower-cased, for storing with a sample."""
    return {
        name.lower(): redact(value)
        for name, value in headers
        if name.lower() in STORED_RESPONSE_HEADERS
    }


def check_storable(body: Any) -> None:
    """Raise a 400 for a request body no recording can hold, before it is sent upstream: an
    integer beyond 64 bits, a lone UTF-16 surrogate, or nesting deeper than 250 levels."""
    try:
        orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        text = str(exc)
        reason = next((why for what, why in _UNSTORABLE.items() if what in text), text)
        raise bad_request(f"The request body cannot be recorded: {reason}.") from None


# What orjson says, and what it means for a request body.
_UNSTORABLE = {
    "64-bit": "an integer in it does not fit in 64 bits",
    "surrogates": "a string in it holds a lone UTF-16 surrogate",
    "Recursion": "it is nested more than 250 levels deep",
}


# Cheap signs that JSON text may hold a number orjson, which writes recordings, cannot hold as it
# was sent: NaN and ±Infinity (Python's json writes them; orjson refuses them, or writes null), 19
# digits in a row (an integer beyond 64 bits, which orjson reads as a double) and an exponent of
# three digits after a digit (a number beyond a double's range, read as infinity; not the
# "fake0001" of a fingerprint). Digits are looked for in the text with every digit made a 0:
# bytes.translate and `in` cost about what a parse by orjson does, a regular expression ten times.
_NUMBER_SHAPE = bytes.maketrans(b"0123456789E-", b"0000000000e+")
_LONG_INTEGER = b"0" * 19
# The integers orjson can write: int64 and uint64.
_INT_MIN, _INT_END = -(2**63), 2**64


class _Inexact(ValueError):
    """A number no recording can hold as it was sent."""


def inexact_number(text: str | bytes) -> str | None:
    """Why JSON `text` holds a number no recording can hold as it was sent (an integer beyond 64
    bits, NaN, ±Infinity, a number beyond a double's range), or None. Parsed again only when a
    cheap look says it may: an answer on the record path rarely does."""
    if not _may_be_inexact(text if isinstance(text, bytes) else text.encode(errors="replace")):
        return None
    try:
        json.loads(text, parse_int=_int64, parse_float=_double, parse_constant=_constant)
    except _Inexact as exc:
        return str(exc)
    except (ValueError, RecursionError):
        return None  # not JSON: whoever parses it says so
    return None


def inexact_events(events: Sequence[Event]) -> str | None:
    """`inexact_number` of the first stream event that holds such a number, or None."""
    joined = "\n".join(event.data for event in events)
    if not _may_be_inexact(joined.encode(errors="replace")):
        return None
    return next(filter(None, (inexact_number(event.data) for event in events)), None)


def _may_be_inexact(raw: bytes) -> bool:
    if b"NaN" in raw or b"Infinity" in raw:
        return True
    shape = raw.translate(_NUMBER_SHAPE)
    return _LONG_INTEGER in shape or b"0e000" in shape or b"0e+000" in shape


def _int64(text: str) -> int:
    number = int(text)
    if not _INT_MIN <= number < _INT_END:
        raise _Inexact(f"an integer beyond 64 bits ({text[:40]})")
    return number


def _double(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise _Inexact(f"a number beyond the range of a double ({text[:40]})")
    return number


def _constant(name: str) -> float:
    raise _Inexact(name)


def printable(text: object) -> str:
    """Text a client or an upstream chose (a model, a path, a fingerprint) as a log line or a
    terminal may show it: control characters, line and paragraph separators, bidirectional
    controls and lone surrogates written as Python escapes them (`\\x1b`, `\\n`), so that it
    can neither start a line of its own nor drive the terminal (clear it, retitle it)."""
    return _UNPRINTABLE.sub(_escape, str(text))


def printable_json(text: str) -> str:
    """JSON text as json and orjson write it, with what they leave as it is but `printable`
    escapes written as `\\u` escapes: the same JSON, and safe on a terminal. (They escape the C0
    controls inside strings, and none of these characters can stand outside a string.)"""
    return _UNPRINTABLE_IN_JSON.sub(lambda found: f"\\u{ord(found[0]):04x}", text)


def _escape(found: re.Match[str]) -> str:
    return found[0].encode("unicode_escape").decode("ascii")


# Escaped besides the C0 controls: DEL and the C1 controls (U+009B starts a command on some
# terminals); U+2028/2029, which some viewers break lines at; the bidirectional embeddings,
# overrides and isolates, which reorder what is shown.
_BEYOND_C0 = r"\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNPRINTABLE = re.compile(rf"[\x00-\x1f{_BEYOND_C0}\ud800-\udfff]")  # and lone surrogates
_UNPRINTABLE_IN_JSON = re.compile(rf"[{_BEYOND_C0}]")


def sorted_members(value: Any) -> Any:
    """`value` with the members of its objects sorted, at every depth."""
    if not isinstance(value, (dict, list)):
        return value
    return orjson.loads(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))


def redact(value: Any) -> Any:
    """`value` with API-key shaped strings replaced, recursively through JSON containers (member
    names included)."""
    return _map_strings(value, lambda text: _SECRET.sub(REDACTED, text))


def redact_path(path: str) -> str:
    """A request path (with its query string) as it is stored, logged and shown: API-key shaped
    strings redacted, and the value of every query parameter named for a credential. The key is
    made from the path as sent, so requests differing only there are still told apart."""
    route, mark, query = path.partition("?")
    if mark:
        query = "&".join(map(_redact_parameter, query.split("&")))
    return _SECRET.sub(REDACTED, route + mark + query)


def _redact_parameter(parameter: str) -> str:
    name, _, value = parameter.partition("=")
    word = "".join(c for c in unquote_plus(name).lower() if c.isalnum())
    if value and word.endswith(_CREDENTIAL_NAMES):
        return f"{name}={REDACTED}"
    return parameter


def _map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """`value` with `change` applied to every string in it, member names included."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {_map_strings(k, change): _map_strings(v, change) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, change) for v in value]
    return value


def _strings(value: Any) -> Iterator[str]:
    """Every string in `value`, member names included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for name, item in value.items():
            yield name
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def looks_secret(key: str) -> bool:
    """Whether an API key is one no answer may repeat: 8 characters or more, and a digit among
    them, or 20 or more (Hugging Face tokens are letters only), or an `sk-…` key. A local
    server's placeholder (`lm-studio`, `anything`, `not-needed`, `sk-no-key-required`) is a word
    a model may well say, so it is not replaced in answers."""
    if _SECRET.fullmatch(key):
        return True
    return len(key) >= 20 or (len(key) >= 8 and any(c.isdigit() for c in key))


def secrets_in(value: Any, raw: bytes) -> set[str]:
    """The API-key shaped strings `redact` replaces in `value`, parsed from `raw` (looked for
    only if `raw` may hold one)."""
    if not _MAYBE_SECRET.search(raw):
        return set()
    return {found for text in _strings(value) for found in _SECRET.findall(text)}


def redact_json(value: Any, raw: bytes, known: tuple[str, ...]) -> Any:
    """An upstream's answer, parsed from `raw`, with the `known` secrets of its request (longest
    first) replaced where it echoes them (`instructions`, `metadata`). Nothing else is touched:
    what the model wrote ("Bearer authentication", an example key) is replayed as it was said."""
    if not any(secret.encode() in raw for secret in known):
        return value
    return _map_strings(value, lambda text: _replace_known(text, known))


def _replace_known(text: str, known: tuple[str, ...]) -> str:
    # Longest first: a key inside a bearer token of the same request goes with the whole token.
    for secret in known:
        text = text.replace(secret, REDACTED)
    return text


def redact_event(event: Event, known: tuple[str, ...]) -> Event:
    """A stream event with the `known` secrets of its request replaced, as `redact_json`."""
    if not any(secret in event.data for secret in known):
        return event
    return Event(_replace_known(event.data, known), event.event, event.t_ms)


EARLIEST = datetime.min.replace(tzinfo=UTC)


def parse_time(text: str) -> datetime | None:
    """An ISO 8601 time as stored (Z, an offset, or naive for UTC); None if it does not parse."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def recorded_at(sample: Sample) -> datetime | None:
    """When a sample was recorded, or None if its time does not parse."""
    return parse_time(sample.recorded_at)


def _distinct(values: Iterable[str | None]) -> list[str | None]:
    seen: list[str | None] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def utc_now() -> str:
    """The current time as stored: ISO 8601 UTC with a Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
