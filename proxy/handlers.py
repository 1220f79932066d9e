"""What each mode does with a request: the only module that uses both the store and the upstream.

A request flows one way: parse and key it, look in the store, replay or forward, record, answer.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import hashlib
import json
import logging
import math
import secrets
import shlex
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    MutableMapping,
    Sequence,
)
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, ParamSpec, TypeVar

import orjson
from aiohttp import ClientResponse, HttpVersion11, web
from multidict import CIMultiDict

from proxy import sse
from proxy.audit import AuditLog, audit_event, baseline
from proxy.config import Config, Mode, OnFingerprintChange, Repeat, StoreSpec
from proxy.divergence import cosine_distance, output_text
from proxy.errors import FormatError, ProxyError, StoreError, StoreFull, bad_request
from proxy.keys import (
    COMPARE_LEAVES,
    RECORDED,
    STREAMED,
    CanonicalRequest,
    RequestIndex,
    check_body,
    describe_differences,
    has_dot_segments,
    make_key,
    namespace_problem,
    normalise_path,
    parse_json,
    too_large_to_compare,
)
from proxy.metrics import Metrics
from proxy.recording import (
    STORED_RESPONSE_HEADERS,
    Recording,
    Sample,
    check_storable,
    has_usage_chunk,
    header_safe,
    inexact_events,
    inexact_number,
    is_responses,
    looks_secret,
    pick_sample,
    redact,
    redact_event,
    redact_json,
    redact_path,
    secrets_in,
    stored_headers,
    stream_lacks_usage,
    utc_now,
)
from proxy.stores.base import Locking, Store
from proxy.upstream import (
    Upstream,
    UpstreamBroken,
    iter_body,
    read_body,
    response_headers,
    upstream_failure,
)

log = logging.getLogger("seedcache")
K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")
P = ParamSpec("P")

# Responses API members that make the output depend on state held upstream: never replayed.
STATEFUL = ("previous_response_id", "conversation", "background")

STATUS = "X-Seedcache-Status"
KEY = "X-Seedcache-Key"
FINGERPRINT = "X-Seedcache-Fingerprint"
# The response of the request being handled whose headers have left, if any (`begin`). A
# context variable, not request storage: aiohttp before 3.14 has no typed request keys.
STARTED: ContextVar[web.StreamResponse | None] = ContextVar("started", default=None)
# What became of a live stream whose headers had left before it ended (they said `recorded`):
# the access log says it.
OUTCOME = web.RequestKey("seedcache_outcome", str)
RECORDED_AT = "X-Seedcache-Recorded-At"
VERDICT = "X-Seedcache-Verdict"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
# How long a remembered current fingerprint is trusted before the store is asked again, so that
# proxies sharing a store see each other's fingerprint changes without a store read per replay.
FINGERPRINT_TTL = 1.0
FINGERPRINT_CACHE_SIZE = 1024  # current fingerprints kept in memory (two names per model)
# The current fingerprint of a model is remembered under the upstream it was seen through and
# under this name for any upstream, which no base URL can be.
ANY_UPSTREAM = "*"
# How long the --isolate-by-key salt is used before a shared store is asked again: the proxies
# on a store that lost its data (Redis restarted empty) agree on one salt again within it.
SALT_TTL = 1.0
# How long the index of recordings used to explain misses is reused before a new store scan.
INDEX_TTL = 5.0
INDEX_STALE_LIMIT = 30.0  # older than this, a miss waits for the new index (after a quiet spell)
INDEX_BATCH = 200  # recordings read into the index between two turns of the event loop
# How long a decoded recording is replayed from memory before the store is read again (a hot key
# then costs no store read and no decoding), and how many are kept. Recordings written by this
# proxy replace theirs at once; those of other proxies on a shared store show within the TTL.
RECORDING_TTL = 1.0
RECORDING_CACHE_SIZE = 4096
# Only recordings this small are kept decoded: a decoded one takes several times its bytes, and a
# large one (a long embedding list) costs more to keep than to read again.
RECORDING_CACHE_LIMIT = 64 * 1024
# Request bodies remembered with their parse and key, so that identical requests skip both (the
# limit bounds the cache at a few tens of MB: a parsed body takes several times its bytes).
PARSED_CACHE_SIZE = 1024
PARSED_BODY_LIMIT = 8 * 1024
NAMESPACE_PREFIX = "/_seedcache/ns/"
NO_USAGE = (
    "this stream asks for a usage chunk (stream_options.include_usage) and the recording is a "
    "stream recorded without one; record it again asking include_usage"
)
NO_CACHE = (
    "the request says Cache-Control: no-cache (answer live, not from a recording), and replay "
    "never goes upstream"
)
NO_CACHE_HINT = "Send it without Cache-Control: no-cache to be served its recording, if it has one"
# Cross-proxy coalescing on a shared store: how long a fill lock lives if its holder dies, and
# how often the others look for the recording meanwhile.
SHARED_LOCK_TTL_MS = 30_000
SHARED_LOCK_POLL = 0.05
# How long what a lock holder's call came to, when it recorded nothing (an upstream failure or
# error answer), is left for the proxies that waited on it: enough for every one of them to look
# (they look every SHARED_LOCK_POLL), short enough not to be a cache.
SHARED_OUTCOME_TTL_MS = 1_000
# A live answer is compared with its recording in a worker thread when the two (the recording as
# stored, the answer as received) are larger than this together, so that no comparison holds up
# the other requests: two texts of a few hundred characters that differ already take milliseconds
# (difflib is quadratic), a long stream is assembled first, and a long logprobs list is walked.
# Smaller ones are compared at once, as the hop to a thread and back (~50 µs) would cost more.
AUDIT_INLINE_LIMIT = 2 * 1024
STORE_FAILURE_LOG_INTERVAL = 10.0  # seconds between two lines of "store failure"
# A request body larger than this is parsed and keyed in a worker thread: tens of megabytes of
# small JSON values take seconds, which would stall every other client.
PARSE_INLINE_LIMIT = 64 * 1024
# An upstream error answer larger than this is not posted: the waiters make their own call.
SHARED_ANSWER_LIMIT = 64 * 1024
# The headers of an upstream error answer posted for them (and X-Seedcache-*).
SHARED_HEADERS = STORED_RESPONSE_HEADERS | {"retry-after", "retry-after-ms", "x-should-retry"}
# How long a request body may take to arrive: a client that stops sending half way (or sends a
# byte a minute) would otherwise hold its connection and handler for ever.
BODY_TIMEOUT = 60.0
# How long a live stream's client may leave a write unread (its socket buffers full) before it
# counts as gone: the relay would wait on it for ever, and so would the requests waiting for
# the recording. A client reading at any pace never comes near it.
CLIENT_WRITE_TIMEOUT = 60.0
# --replay-timing: the longest a paced replay stays silent. Upstreams fill a model's long pauses
# with keep-alive comments, which are not recorded; a client whose read timeout they kept from
# firing gets one every so often instead.
PACED_KEEP_ALIVE = 1.0
KEEP_ALIVE_COMMENT = b": keep-alive\n\n"


@dataclass(slots=True)
class Turns:
    """--repeat sequence: the numbers that the identical requests of a run (of a test, under the
    pytest plugin) take, for one key. Number k is the sample the request replays or records."""

    part: int  # the part of the run counting them (`Handlers.restart_sequences`)
    # The most numbers an earlier part of the run took (an earlier test): a record run keeps as
    # many samples as the part that asked most (`reached`).
    earlier: int = 0
    # The numbers below it have been taken.
    taken: int = 0
    # The requests going upstream whose answer will be added after the last sample, by number,
    # until it is added or their call fails: a later number's answer waits for them before it
    # is added, else answers would be added in the order the upstream finishes them.
    adding: dict[int, asyncio.Event] = field(default_factory=dict)

    @property
    def reached(self) -> int:
        """How many identical requests the part of the run that asked most made (an attempt that
        failed upstream, given back, left out)."""
        return max(self.earlier, self.taken)

    def take(self) -> int:
        """The number of the next identical request."""
        self.taken += 1
        return self.taken - 1

    def settle(self, number: int, *, failed: bool) -> None:
        """The request holding `number` is done upstream (its answer added, or not): the later
        numbers stop waiting for it. When its upstream call failed (an error answer, no answer)
        and no identical request came since, it gives its number back, for the retry of the
        call (the SDK's, one after the other) to answer at its place. Once a later number is
        taken, the failed one stays used: the later request's answer may already be stored in
        its place (answers are added after the last sample), and its retry would replace it."""
        adding = self.adding.pop(number, None)
        if adding is not None:
            adding.set()
        if failed and number == self.taken - 1:
            self.taken -= 1

    async def wait_for_earlier(self, number: int) -> None:
        """Until no request with a lower number than `number` has an answer still to add."""
        while earlier := [event for held, event in self.adding.items() if held < number]:
            await earlier[0].wait()


@dataclass(frozen=True, slots=True)
class Incoming:
    """A request as the handlers see it: parsed, keyed, with its per-request options."""

    method: str
    path: str
    raw: bytes
    # The client's API key (`client_key`), read once, before anything is done with the request.
    api_key: str
    body: Any
    mode: Mode
    read: bool
    write: bool
    stream: bool
    include_usage: bool
    canon: CanonicalRequest | None
    # --repeat sequence: the number of the sample it replays or records (from 0): how many
    # identical requests of the run came before it, attempts that failed upstream left out; 0
    # under --repeat reuse.
    ordinal: int = 0
    # --repeat sequence: whether the recording had that sample when this request went upstream.
    # Its answer then replaces it; else it is added after the last, once the identical requests
    # before it that are still upstream have added theirs (`Turns.adding`).
    replaces: bool = False
    # False when a stream asks for its chunks without their random `obfuscation` padding
    # (stream_options.include_obfuscation: false).
    padded: bool = True
    # --repeat sequence: the numbers `ordinal` was taken from; None under --repeat reuse.
    turns: Turns | None = None

    @property
    def model(self) -> str | None:
        return self.canon.model if self.canon else None

    @property
    def shown_path(self) -> str:
        """The path as logs and messages give it: a credential in its query string redacted."""
        return redact_path(self.path)


@dataclass(frozen=True, slots=True)
class Relayed:
    """A non-2xx upstream answer, kept so that coalesced followers get the same answer."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    # A digest of the leader's body bytes and API key (`origin_of`): an error is the follower's
    # answer too only when its request is the very same, since a 4xx can come from what the key
    # leaves out (the API key, `stream_options` without `stream`).
    origin: str

    def fields(self) -> dict[str, Any]:
        """The answer in JSON types, for the proxies waiting on the same call to give it too:
        its headers those a recording keeps, and those that tell a client when to retry (not
        the account's `openai-organization`, `openai-project`, rate-limit state, …)."""
        return {
            "status": self.status,
            "headers": [
                [name, value]
                for name, value in self.headers
                if name.lower() in SHARED_HEADERS or name.lower().startswith("x-seedcache-")
            ],
            "body": base64.b64encode(self.body).decode(),
            "origin": self.origin,
        }

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Relayed:
        """The answer `fields()` describes."""
        return cls(
            int(fields["status"]),
            tuple((str(name), str(value)) for name, value in fields["headers"]),
            base64.b64decode(fields["body"]),
            str(fields["origin"]),
        )

    def response(self) -> web.Response:
        """The answer, for one more request that waited on the call."""
        return web.Response(status=self.status, headers=self.headers, body=self.body)


# What a leader's upstream call gives the identical requests that waited for it: True when it
# recorded, False when its answer could not be recorded (each waiter then needs a call of its
# own), the upstream's non-2xx answer, the upstream failure (unreachable, timed out, broken off),
# or None when its client left before the recording was made (the next waiter leads).
Outcome = bool | Relayed | ProxyError | None


@dataclass(slots=True)
class Decoded:
    """A recording read from the store moments ago, with the replies rendered from it so far."""

    recording: Recording
    at: float
    rendered: dict[tuple[int, bool, bool, bool], tuple[bytes, dict[str, str], bool]] = field(
        default_factory=dict
    )
    inexact: dict[int, bool] = field(default_factory=dict)  # id(sample) -> `exact(sample)`

    def render(
        self, sample: Sample, key: str, incoming: Incoming
    ) -> tuple[bytes, dict[str, str], bool]:
        """The body and headers replaying `sample` (one of ours) as `incoming` asks, rendered
        once, and whether the body repeats any bookkeeping (see `echo`)."""
        stream = incoming.stream
        # id() is stable: this object keeps its samples alive.
        name = (id(sample), stream, stream and incoming.include_usage, stream and incoming.padded)
        cached = self.rendered.get(name)
        if cached is None:
            if stream:
                events = replay_events(sample, incoming)
                body = b"".join(sse.encode(event) for event in events)
            elif self.exact(sample):
                # Recorded before answers holding such numbers were refused: assembled by the
                # standard library, which keeps big integers and NaN, and written by it (orjson
                # fails on the one and writes null for the other).
                body = exact_dumps(sample.response())
            else:
                body = orjson.dumps(sample.response())
            echoes = any(member in body for member in _ECHO_BYTES)
            headers = replay_headers(sample, key, stream=stream)
            cached = self.rendered[name] = (body, headers, echoes)
        return cached

    def exact(self, sample: Sample) -> bool:
        """Whether `sample` (one of ours) holds a number only the standard library's json reads
        and writes as it was sent (`inexact_number`), looked for once."""
        found = self.inexact.get(id(sample))
        if found is None:
            # A plain sample's body was read by orjson with the recording: it holds none.
            found = sample.events is not None and inexact_events(sample.events) is not None
            self.inexact[id(sample)] = found
        return found


class Handlers:
    """Per-app state (config, store, upstream, metrics, in-flight misses) and the request logic."""

    def __init__(self, config: Config, store: Store, upstream: Upstream) -> None:
        self.config = config
        self.store = store
        self.upstream = upstream
        self.metrics = Metrics()
        # A store that went away, or is full, fails every request the same way: one log line of
        # each kind in a while.
        self.store_failures = Throttled(log, STORE_FAILURE_LOG_INTERVAL)
        self._store_shown = StoreSpec.parse(config.store).shown  # for hints in messages
        # A store shared by several proxies coalesces misses across them (checked once: a
        # runtime Protocol check is slow).
        self._locking = store if isinstance(store, Locking) else None
        self.audit = AuditLog(config.audit_log_path, store)
        # key -> the leader's outcome, for identical requests that arrived meanwhile.
        self._inflight: dict[str, asyncio.Future[Outcome]] = {}
        self._fingerprints: dict[str, tuple[str | None, float]] = {}
        self._index: RequestIndex | None = None
        self._index_at = 0.0
        self._index_build: asyncio.Task[RequestIndex] | None = None
        # Keys replayed or recorded by this run, when asked for (an embedded proxy: the pytest
        # plugin lists recordings no test used); a long-running server would grow it for ever.
        self.used: set[str] | None = None
        # Keys of recordings a request could not be answered from, unreadable (a merge conflict
        # in a committed file), when asked for: the plugin fails a session on them as on misses.
        self.unreadable: set[str] | None = None
        self._salt: str | None = None
        self._salt_at = 0.0
        self._salt_lock = asyncio.Lock()
        # --repeat sequence: the numbers taken per key, and the part of the run (a test, under
        # the pytest plugin) counting now.
        self._turns: dict[str, Turns] = {}
        self._part = 0
        # The recordings a --repeat sequence record run rewrote (key -> namespace): trimmed to
        # the samples it reached when it ends, unless other processes record into the store too
        # (--workers, proxies sharing a Redis, pytest-xdist workers): their runs may have reached
        # further, and trimming to ours would drop samples they recorded.
        self._rerecorded: dict[str, str] = {}
        self.trim_sequences = config.workers == 1 and self._locking is None
        # The namespace of requests that name none (no header, no /_seedcache/ns/ path): the
        # configured one, or the current test's under the pytest plugin.
        self.namespace = config.namespace
        # Requests seen moments ago, parsed and keyed: (method, path, namespace, bytes) -> both.
        self._parsed: dict[tuple[str, str, str, bytes], tuple[Any, CanonicalRequest | None]] = {}
        # Recordings read moments ago, so that a hot key skips the store and the decoding.
        self._recordings: dict[str, Decoded] = {}

    def restart_sequences(self) -> None:
        """`--repeat sequence` counts identical requests from here on: the pytest plugin restarts
        it for every test, so that the samples a test gets do not depend on which tests ran
        before it."""
        # Only a new part is named here (from the test's thread): each key's numbers start
        # again at its next request, on the proxy's loop.
        self._part += 1

    # -- entry point ------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one proxied request according to its mode."""
        incoming = await self._incoming(request)
        if incoming.mode is Mode.PASSTHROUGH or incoming.canon is None:
            if incoming.mode is Mode.REPLAY:
                route = (incoming.method, incoming.path.split("?", 1)[0])
                reason = (
                    "this request depends on state held upstream "
                    f"({', '.join(STATEFUL)}), so it is never recorded"
                    if route in RECORDED
                    else "this endpoint is not recorded"
                )
                raise await self._miss(incoming, reason=reason)
            return await self._forward(request, incoming, status="bypass")
        canon = incoming.canon
        if incoming.mode in (Mode.AUTO, Mode.REPLAY) and incoming.read:
            replay = await self._lookup(request, incoming)
            if replay is not None:
                return replay
        if incoming.mode is Mode.REPLAY:
            # Replay never goes upstream, not even for Cache-Control: no-cache.
            if not incoming.read:
                raise await self._miss(incoming, reason=NO_CACHE, hint=NO_CACHE_HINT)
            raise await self._miss(incoming)
        # Identical concurrent misses share one upstream call, unless each is meant to get its
        # own sample (--repeat sequence), or the request asked for an answer of its own, not one
        # from the store nor another request's (Cache-Control: no-cache).
        coalesce = (
            incoming.mode is Mode.AUTO and self.config.repeat is Repeat.REUSE and incoming.read
        )
        while True:
            flight = self._inflight.get(canon.key) if coalesce else None
            if flight is None:
                if coalesce and self._locking is not None:
                    return await self._lead_shared(request, incoming, self._locking)
                return await self._lead(request, incoming, coalesce=coalesce)
            outcome = await asyncio.shield(flight)
            if isinstance(outcome, ProxyError):
                error = outcome.again()
                error.headers[KEY] = canon.key
                raise error
            if isinstance(outcome, Relayed):
                if outcome.origin == origin_of(incoming.raw, incoming.api_key):
                    return outcome.response()
            elif outcome is False:
                # Its 2xx was no answer to record (an HTML page, an error frame): each waiter
                # goes upstream now, together, rather than each after the one before.
                return await self._lead(request, incoming, coalesce=False)
            elif outcome:
                replay = await self._lookup(request, incoming)
                if replay is not None:
                    return replay
            # The leader's client left, or its error came from what the key leaves out: the next
            # one in line leads.

    # -- parsing ----------------------------------------------------------------------------

    async def _incoming(self, request: web.Request) -> Incoming:
        method = request.method.upper()
        api_key = client_key(request.headers)
        namespace = request_header(request.headers, "X-Seedcache-Namespace", self.namespace)
        # The path as sent, still percent-encoded: forwarded and keyed as it is, so that an
        # encoded `/` or `?` inside an id stays part of the id.
        path = request.rel_url.raw_path
        if has_dot_segments(path):
            # Resolved, they would step out of the upstream's /v1 (with the proxy's own key, if
            # it sends one).
            raise bad_request(
                f"The path {path[:200]!r} has '.' or '..' segments; send it without them.",
                code="invalid_path",
            )
        if path.startswith(NAMESPACE_PREFIX):
            # A base URL of /_seedcache/ns/<name>/v1 selects a namespace for clients that cannot
            # send headers (the pytest plugin's per-test namespaces).
            namespace, _, rest = path[len(NAMESPACE_PREFIX) :].partition("/")
            path = "/" + rest
        path = normalise_path(path, request.rel_url.raw_query_string)
        mode = self._mode(request)
        if self.config.isolate_by_key:
            namespace = await self._isolated(namespace, api_key, mode)
        if problem := namespace_problem(namespace):
            raise bad_request(f"{problem[0].upper()}{problem[1:]}.", code="invalid_namespace")
        try:
            if request.content.is_eof():
                raw = await request.read()  # arrived with the headers, as small bodies do
            else:
                async with asyncio.timeout(BODY_TIMEOUT):
                    raw = await request.read()
        except TimeoutError:
            raise ProxyError(
                408,
                f"The request body did not arrive within {BODY_TIMEOUT:g} seconds; send it whole.",
                code="body_timeout",
                retry=True,
            ) from None
        except web.RequestPayloadError:
            # aiohttp decodes a compressed body as it reads it: this one does not decode (or,
            # with no encoding, was cut short by a client that is gone).
            encoding = request.headers.get("Content-Encoding", "")
            problem = f"decoded as Content-Encoding: {encoding[:40]}" if encoding else "read whole"
            raise bad_request(
                f"The request body could not be {problem}; send it complete, encoded as its "
                "headers say.",
                code="invalid_body",
            ) from None
        cache_control = request.headers.get("Cache-Control", "").lower()
        read = "no-cache" not in cache_control
        write = "no-store" not in cache_control
        body: Any = None
        canon = None
        route = (method, path.split("?", 1)[0])
        if mode is not Mode.PASSTHROUGH and route in RECORDED:
            parsed = (method, path, namespace, raw)
            known = self._parsed.get(parsed)
            if known is not None:
                # The same bytes asked again (a test suite, a retry): parsed and keyed already.
                body, canon = known
            else:
                body, canon = await _off_loop_if(
                    len(raw) > PARSE_INLINE_LIMIT,
                    parse_request,
                    method,
                    path,
                    namespace,
                    raw,
                    route[1],
                )
                if len(raw) <= PARSED_BODY_LIMIT:
                    remember(self._parsed, parsed, (body, canon), PARSED_CACHE_SIZE)
        # Embeddings and models do not stream: a stray `stream` is answered, and replayed, as JSON.
        stream = isinstance(body, dict) and body.get("stream") is True and route in STREAMED
        options = body.get("stream_options") if isinstance(body, dict) else None
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        padded = not (isinstance(options, dict) and options.get("include_obfuscation") is False)
        ordinal = 0
        turns = None
        if canon is not None and self.config.repeat is Repeat.SEQUENCE:
            # Every identical request counts, in every mode that uses the store, so that the k-th
            # one records sample k where a replay run will look for it.
            turns = self._turns.get(canon.key)
            if turns is None or turns.part != self._part:
                earlier = 0 if turns is None else turns.reached
                turns = self._turns[canon.key] = Turns(self._part, earlier)
            ordinal = turns.take()
        return Incoming(
            method,
            path,
            raw,
            api_key,
            body,
            mode,
            read,
            write,
            stream,
            include_usage,
            canon,
            ordinal,
            turns=turns,
            padded=padded,
        )

    async def _isolated(self, namespace: str, secret: str, mode: Mode) -> str:
        """`--isolate-by-key`: the namespace plus a salted hash of the client's API key (`secret`),
        so that on a shared store one tenant is never served another tenant's recordings."""
        if not secret:
            raise ProxyError(
                401,
                "This seedcache isolates recordings by API key (--isolate-by-key): send one in "
                "the Authorization header.",
                code="missing_api_key",
            )
        if mode is Mode.PASSTHROUGH:
            return namespace  # nothing is recorded or replayed: no salt read from the store
        salt = self._salt
        if salt is None or self._salt_expired():
            salt = await self._isolation_salt()
        tenant = hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()[:16]
        return f"{namespace}.k{tenant}" if namespace else f"k{tenant}"

    def _salt_expired(self) -> bool:
        # Only a store shared by several proxies is read again: there another proxy may have
        # set the salt since, after the store lost it (Redis restarted empty).
        return self._locking is not None and time.monotonic() - self._salt_at >= SALT_TTL

    async def _isolation_salt(self) -> str:
        """The one random salt per store that every proxy on it hashes API keys with."""
        async with self._salt_lock:  # the first requests arrive together: one salt for all
            if self._salt is not None and not self._salt_expired():
                return self._salt
            try:
                salt = await self.store.get_meta("isolation-salt")
                if salt is None:
                    # None yet, or lost with the store's data: the first to add one wins, also
                    # when several start at once. The one we had, if any, so that the proxies
                    # that knew it keep their namespaces and those started since adopt it.
                    salt = await self.store.add_meta(
                        "isolation-salt", self._salt or secrets.token_hex(16)
                    )
            except StoreError:
                if self._salt is None:
                    raise
                # Asked again later. Meanwhile a request that uses the store meets its error
                # there, and one that does not (passthrough) is served as before.
                salt = self._salt
            self._salt, self._salt_at = salt, time.monotonic()
            return salt

    def _mode(self, request: web.Request) -> Mode:
        asked = request_header(request.headers, "X-Seedcache-Mode")
        if self.config.mode is Mode.REPLAY or not asked:
            # A replay server never contacts upstream, whatever a request says.
            return self.config.mode
        try:
            return Mode.parse(asked)
        except ValueError as exc:
            raise bad_request(str(exc), code="invalid_seedcache_mode") from None

    # -- replay -----------------------------------------------------------------------------

    async def _lookup(self, request: web.Request, incoming: Incoming) -> web.StreamResponse | None:
        """Replay the recording of this request if there is one fit to serve, else None."""
        canon = incoming.canon
        assert canon is not None
        decoded = await self._decoded(canon)
        if decoded is None:
            return None
        recording = decoded.recording
        if not recording.samples:
            # Emptied by hand or by a merge: recorded again outside replay. A replay says so; the
            # nearest recording to name would be this very one, differing nowhere.
            if incoming.mode is Mode.REPLAY:
                raise await self._miss(
                    incoming, reason="the recording under this key holds no samples"
                )
            return None
        if self.config.repeat is Repeat.SEQUENCE:
            return await self._lookup_sequence(request, incoming, decoded)
        pinned = pinned_fingerprint(request)
        current = None if pinned else await self._current_fingerprint(canon.model)
        sample, stale = pick_sample(recording.samples, current=current, pinned=pinned)
        if sample is None:
            # Only a pin finds no sample. It requires that one (DESIGN §4), also in auto: a live
            # answer would come from whatever backend the upstream runs now.
            raise await self._miss(
                incoming,
                reason=f"no sample has fingerprint {pinned} (X-Seedcache-Fingerprint)",
                hint=pin_hint(recording.samples),
            )
        if lacks_usage(sample, incoming):
            if incoming.mode is Mode.REPLAY:
                raise await self._miss(incoming, reason=NO_USAGE)
            return None  # forwarded: the new sample has its usage
        if stale:
            policy = self.config.on_fingerprint_change
            if policy is OnFingerprintChange.REFRESH and incoming.mode is not Mode.REPLAY:
                return None
            if policy is OnFingerprintChange.FAIL:
                # Counted as stale: a stale recording, refused rather than replayed.
                self.metrics.count("stale", canon.model, sample.system_fingerprint)
                rerecord = self.config.rerecord_hint
                if self.config.rerecord_header and self.config.mode is not Mode.REPLAY:
                    rerecord = f"{self.config.rerecord_header} (or {rerecord})"
                refused = ProxyError(
                    409,
                    f"The recording {canon.key[:12]} has no sample for the current fingerprint "
                    f"{current} of {canon.model} (newest: {sample.system_fingerprint}). Re-record "
                    f"it with: {rerecord}; or pin a fingerprint with X-Seedcache-Fingerprint.",
                    type="seedcache_stale",
                    code="fingerprint_changed",
                )
                refused.headers[STATUS] = "stale"
                refused.headers[KEY] = canon.key
                raise refused
        status = "stale" if stale else "hit"
        self.metrics.count(status, canon.model, sample.system_fingerprint)
        return await self._replay(request, incoming, decoded, sample, status)

    async def _decoded(self, canon: CanonicalRequest) -> Decoded | None:
        """The recording under a key, decoded, from memory if it was read moments ago."""
        now = time.monotonic()
        cached = self._recordings.get(canon.key)
        if cached is not None and now - cached.at < RECORDING_TTL:
            return cached
        raw = await self.store.get(canon.namespace, canon.key)
        if raw is None:
            self._recordings.pop(canon.key, None)
            return None  # misses are not remembered: another proxy may record it any moment
        try:
            decoded = Decoded(load(raw, canon.key, self._store_shown), now)
        except FormatError:
            self._note_unreadable(canon.key)
            raise
        if len(raw) > RECORDING_CACHE_LIMIT:
            return decoded
        return remember(self._recordings, canon.key, decoded, RECORDING_CACHE_SIZE)

    def _note_unreadable(self, key: str) -> None:
        """A request's recording could not be read or replayed: its key is kept in `unreadable`
        when asked for."""
        if self.unreadable is not None:
            self.unreadable.add(key)

    async def _lookup_sequence(
        self, request: web.Request, incoming: Incoming, decoded: Decoded
    ) -> web.StreamResponse | None:
        """`--repeat sequence`: the k-th identical request of this run gets the k-th sample; past
        the last sample, auto records a new one and replay misses."""
        recording = decoded.recording
        ordinal = incoming.ordinal
        if ordinal >= len(recording.samples):
            if incoming.mode is Mode.REPLAY:
                raise await self._miss(
                    incoming,
                    reason=f"this is identical request number {ordinal + 1} of the run and only "
                    f"{len(recording.samples)} sample(s) are recorded (--repeat sequence)",
                )
            return None
        sample = recording.samples[ordinal]
        pinned = pinned_fingerprint(request)
        # The k-th sample or none: a null fingerprint is "unknown" and matches the pin.
        if pinned and sample.system_fingerprint not in (pinned, None):
            raise await self._miss(
                incoming,
                reason=f"sample {ordinal + 1} has fingerprint {sample.system_fingerprint}, not "
                f"{pinned} (X-Seedcache-Fingerprint, --repeat sequence)",
                hint=pin_hint((sample,)),
            )
        if lacks_usage(sample, incoming):
            if incoming.mode is Mode.REPLAY:
                raise await self._miss(incoming, reason=NO_USAGE)
            return None  # forwarded: the new sample has its usage
        status = "hit"
        if not pinned and sample.system_fingerprint is not None:
            # Served all the same (--on-fingerprint-change does not apply: the k-th sample is the
            # answer), but said to be of another backend than the current one.
            current = await self._current_fingerprint(incoming.model)
            if current is not None and sample.system_fingerprint != current:
                status = "stale"
        self.metrics.count(status, recording.model, sample.system_fingerprint)
        return await self._replay(request, incoming, decoded, sample, status)

    async def _replay(
        self,
        request: web.Request,
        incoming: Incoming,
        decoded: Decoded,
        sample: Sample,
        status: str,
    ) -> web.StreamResponse:
        canon = incoming.canon
        assert canon is not None
        if self.used is not None:
            self.used.add(canon.key)
        try:
            if incoming.stream and self.config.replay_timing:
                events = replay_events(sample, incoming)
                exact = decoded.exact(sample)
                return await self._replay_paced(request, incoming, sample, events, status, exact)
            body, base, echoes = decoded.render(sample, canon.key, incoming)
        except FormatError as exc:
            self._note_unreadable(canon.key)
            raise unreadable(exc, canon.key, self._store_shown) from None
        asked = echoed(incoming.body)
        if asked or echoes:
            body = echo(body, asked, stream=incoming.stream, exact=decoded.exact(sample))
        headers = {**base, STATUS: status}
        if not incoming.stream:
            return web.Response(status=sample.status, body=body, headers=headers)
        response = web.StreamResponse(status=sample.status, headers=headers)
        await begin(request, response)
        await response.write(body)
        # aiohttp ends the body (write_eof) and handles a client that has already gone.
        return response

    async def _replay_paced(
        self,
        request: web.Request,
        incoming: Incoming,
        sample: Sample,
        events: list[sse.Event],
        status: str,
        exact: bool,
    ) -> web.StreamResponse:
        """--replay-timing: each event at its recorded offset from the start (`exact`: the
        sample holds numbers only the standard library's json reads, see `Decoded.exact`)."""
        assert incoming.canon is not None
        headers = {**replay_headers(sample, incoming.canon.key, stream=True), STATUS: status}
        response = web.StreamResponse(status=sample.status, headers=headers)
        await begin(request, response)
        start = time.monotonic()
        asked = echoed(incoming.body)
        for event in events:
            while (delay := event.t_ms / 1000 - (time.monotonic() - start)) > 0:
                if delay <= PACED_KEEP_ALIVE:
                    await asyncio.sleep(delay)
                    break
                await asyncio.sleep(PACED_KEEP_ALIVE)
                await response.write(KEEP_ALIVE_COMMENT)
            await response.write(sse.encode(echo_event(event, asked, exact=exact)))
        return response

    async def _miss(
        self, incoming: Incoming, reason: str | None = None, hint: str | None = None
    ) -> ProxyError:
        """The 404 of a miss in replay, naming the nearest recording and what differs (§6), and
        what to do about it (`hint`, else how to record it)."""
        model = incoming.model
        self.metrics.count("miss", model)
        what = f"{incoming.method} {incoming.shown_path}"
        details = []
        if model:
            details.append(f"model={model}")
        if incoming.canon is not None and incoming.canon.seed is not None:
            details.append(f"seed={incoming.canon.seed}")
        if incoming.canon is not None and incoming.canon.namespace:
            details.append(f"namespace={incoming.canon.namespace}")
        if details:
            what += f" ({', '.join(details)})"
        message = f"No recording for {what}"
        if incoming.canon is not None:
            message += f", key {incoming.canon.key[:12]}"
        if reason:
            message += f": {reason}"
        elif incoming.canon is not None:
            message += await self._nearest(incoming.canon)
        if hint is None:
            hint = self._record_hint(incoming)
        error = ProxyError(
            404,
            f"{message}. {hint}",
            type="seedcache_miss",
            code="recording_not_found",
        )
        error.headers[STATUS] = "miss"
        if incoming.canon is not None:
            error.headers[KEY] = incoming.canon.key
        return error

    def _record_hint(self, incoming: Incoming) -> str:
        """How to get a request that missed in replay answered."""
        # The request asked for replay itself (X-Seedcache-Mode): this server would forward it.
        asked = incoming.mode is Mode.REPLAY and self.config.mode is not Mode.REPLAY
        if incoming.canon is None:
            # Never recorded (an endpoint seedcache does not record, a stateful Responses call):
            # advice to record it could not work.
            hint = "seedcache only forwards it, and only outside replay mode"
            return f"{hint}: send it without X-Seedcache-Mode" if asked else hint
        if not asked:
            return f"Record it with: {self.config.record_hint}"
        if self.config.mode is Mode.PASSTHROUGH:
            return "Record it with: X-Seedcache-Mode: auto, in place of the replay it asks for"
        return (
            "Send it without X-Seedcache-Mode to record it "
            f"(this server runs in {self.config.mode.value} mode)"
        )

    async def _nearest(self, canon: CanonicalRequest) -> str:
        if skipped := too_large_to_compare(canon):
            return skipped
        index = await self._recording_index()
        body = redact(canon.body)
        canon = replace(canon, path=redact_path(canon.path))  # as the index holds it
        # Across namespaces only when they are not tenants that must not learn of each other.
        others = [] if self.config.isolate_by_key else index.elsewhere(canon, body)
        if others:
            return f". The same request is recorded {namespaces_phrase(others)}"
        found = index.nearest(canon, body)
        if found is None:
            if index.too_large(canon):
                return (
                    ". The recordings of the same method, path and model are too large to "
                    f"compare with it (over {COMPARE_LEAVES:,} JSON values)"
                )
            return ". No recording has the same method, path and model"
        key, differences = found
        if not differences:
            # Its key is not its request's: a recording is found by the key it was made under.
            return (
                f". The recording {key[:12]} holds this same request under another key: its "
                "request was edited after it was recorded (record it again instead), or the two "
                "differ only in an API-key shaped value, which recordings hold redacted"
            )
        return (
            f". The nearest recording, {key[:12]}, differs at (this request != recorded): "
            f"{describe_differences(differences)}"
        )

    async def _recording_index(self) -> RequestIndex:
        """Every recording's request, for explaining misses; rebuilt when older than a few
        seconds so that recordings made by other proxies on a shared store are seen.

        A large store takes seconds to scan: one scan runs at a time, shared by every miss
        that waits for it, and misses use an index up to INDEX_STALE_LIMIT old while the next
        one is built in the background."""
        age = time.monotonic() - self._index_at
        if self._index is not None and age <= INDEX_TTL:
            return self._index
        if self._index_build is None:
            self._index_build = asyncio.create_task(self._build_index())
            self._index_build.add_done_callback(_log_failure)
        if self._index is not None and age <= INDEX_STALE_LIMIT:
            return self._index  # a few seconds old; the next one is on its way
        return await asyncio.shield(self._index_build)

    async def _build_index(self) -> RequestIndex:
        try:
            previous = self._index
            if previous is None:
                index = RequestIndex()
                await _index_all(index, self.store.scan())
            else:
                # What a recording asks never changes (its key is made of it): only the keys
                # that came or went since are read, not the whole store again (a shared Redis
                # of gigabytes, every few seconds while misses come).
                present: dict[str, str] = {}
                async for namespace, key in self.store.names():
                    present[key] = namespace
                    if len(present) % INDEX_BATCH == 0:
                        await asyncio.sleep(0)
                known = previous.keys()
                index = previous.without(known - present.keys())
                await _index_all(index, self._values(present, present.keys() - known))
            self._index, self._index_at = index, time.monotonic()
            return index
        finally:
            self._index_build = None

    async def _values(
        self, namespaces: Mapping[str, str], keys: Iterable[str]
    ) -> AsyncIterator[tuple[str, str, bytes]]:
        """(namespace, key, value) of the recordings under `keys`, as `Store.scan` yields them."""
        for key in keys:
            raw = await self.store.get(namespaces[key], key)
            if raw is not None:  # deleted since it was listed
                yield namespaces[key], key, raw

    async def close(self) -> None:
        """Stop the work this object started in the background; end a sequence record run."""
        if self._index_build is not None:
            self._index_build.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._index_build
        await self._trim_sequences()
        self.store_failures.close()

    async def _trim_sequences(self) -> None:
        """--repeat sequence, record mode: a recording the run rewrote keeps as many samples as
        the most identical requests the run made (a test that now asks twice leaves two where
        there were three); the others are of an older run. Dropped when the run ends, not as it
        goes: until then, the k-th answer is compared with the sample k it replaces."""
        if not self.trim_sequences:
            return
        for key, namespace in self._rerecorded.items():
            keep = self._turns[key].reached

            def trim(stored: bytes | None, keep: int = keep, key: str = key) -> bytes | None:
                if stored is None:
                    return None
                recording = load(stored, key, self._store_shown)
                if len(recording.samples) <= keep:
                    return None
                trimmed = replace(recording, samples=recording.samples[:keep])
                return trimmed.dumps(pretty=self.store.pretty)

            try:
                await self.store.update(namespace, key, trim)
            except (StoreError, FormatError) as exc:
                log.warning("could not drop the older samples of %s: %s", key[:12], exc)
        self._rerecorded.clear()

    async def _current_fingerprint(self, model: str | None) -> str | None:
        """The fingerprint last seen live for `model` through this upstream or, when none was,
        through any: a replay started without the recording's --upstream (CI running plain
        pytest) still tells a current sample from a stale one."""
        own = await self._meta_fingerprint(self._fingerprint_name(model))
        if own is not None:
            return own
        return await self._meta_fingerprint(self._fingerprint_name(model, ANY_UPSTREAM))

    async def _meta_fingerprint(self, name: str) -> str | None:
        cached = self._fingerprints.get(name)
        now = time.monotonic()
        if cached is not None and now - cached[1] < FINGERPRINT_TTL:
            return cached[0]
        value = await self.store.get_meta(name)
        # Bounded: the model comes from the client, any number of names.
        remember(self._fingerprints, name, (value, now), FINGERPRINT_CACHE_SIZE)
        return value

    async def _remember_fingerprint(self, model: str | None, fingerprint: str | None) -> None:
        if fingerprint is None:
            return  # unknown is never a change
        for name in (
            self._fingerprint_name(model),
            self._fingerprint_name(model, ANY_UPSTREAM),
        ):
            if await self._meta_fingerprint(name) != fingerprint:
                await self.store.set_meta(name, fingerprint)
            remember(
                self._fingerprints, name, (fingerprint, time.monotonic()), FINGERPRINT_CACHE_SIZE
            )

    def _fingerprint_name(self, model: str | None, upstream: str | None = None) -> str:
        return f"fingerprint:{upstream or self.config.upstream_base}|{model or ''}"

    # -- live -------------------------------------------------------------------------------

    async def _lead(
        self,
        request: web.Request,
        incoming: Incoming,
        *,
        coalesce: bool,
        flight: asyncio.Future[Outcome] | None = None,
    ) -> web.StreamResponse:
        """Forward this request and record it; identical concurrent misses wait for us. What
        the call comes to is set on `flight` (a new one unless given)."""
        canon = incoming.canon
        assert canon is not None
        turns = incoming.turns  # --repeat sequence
        if turns is not None and incoming.write:
            incoming = replace(incoming, replaces=await self._has_sample(incoming))
            if not incoming.replaces:
                turns.adding[incoming.ordinal] = asyncio.Event()
        if flight is None:
            flight = asyncio.get_running_loop().create_future()
        if coalesce:
            self._inflight[canon.key] = flight
        try:
            status = "audited" if incoming.mode is Mode.AUDIT else "recorded"
            if not incoming.write and status == "recorded":
                status = "bypass"  # Cache-Control: no-store: forwarded, not recorded
            return await self._forward(request, incoming, status=status, flight=flight)
        except ProxyError as exc:
            if exc.type == "upstream_error" and not flight.done():
                # Unreachable, timed out, unreadable: so it is for whoever waits on the same
                # call, who would otherwise each wait out the same timeout in turn.
                flight.set_result(exc)
            raise
        finally:
            if coalesce and self._inflight.get(canon.key) is flight:
                del self._inflight[canon.key]
            if not flight.done():
                flight.set_result(None)
            if turns is not None:
                # Here whatever happened, cancelled too: the later numbers must not wait on this
                # one for ever. An error answer or none (unreachable, timed out, broken off)
                # gives the number back for the client's retry of the call. A 2xx keeps it,
                # recorded or not, as does a call whose client left: an answer was given.
                failed = isinstance(flight.result(), (Relayed, ProxyError))
                turns.settle(incoming.ordinal, failed=failed)

    async def _has_sample(self, incoming: Incoming) -> bool:
        """--repeat sequence: whether the recording has the sample this request would replay."""
        assert incoming.canon is not None
        try:
            decoded = await self._decoded(incoming.canon)
        except (StoreError, FormatError):
            return False  # the answer is still given; recording it will say what is wrong
        return decoded is not None and incoming.ordinal < len(decoded.recording.samples)

    async def _lead_shared(
        self, request: web.Request, incoming: Incoming, store: Locking
    ) -> web.StreamResponse:
        """Coalesce across proxies on a shared store: one proxy holds a short-lived lock per key
        and goes upstream; the others wait for its recording, or for what it leaves them when
        its call records nothing (`_leave`). A lock whose holder died expires."""
        canon = incoming.canon
        assert canon is not None
        # The key alone names it: the namespace is part of its material.
        name = f"fill:{canon.key}"
        waited_on: str | None = None  # the token of the holder whose call this one waits for
        while True:
            try:
                holder = await store.acquire(name, SHARED_LOCK_TTL_MS)
            except StoreFull as exc:
                # It still answers reads: the request is answered as on a disk that cannot
                # grow, live and unrecorded (`miss`), coalesced on this proxy only, rather than
                # refused with a 503 for want of a lock.
                self.store_failures.error("lock", "not coalescing across proxies: %s", exc)
                return await self._lead(request, incoming, coalesce=True)
            if holder.ours:
                return await self._fill(request, incoming, store, name, holder.token, waited_on)
            if waited_on is not None and waited_on != holder.token:
                # The call waited on has ended and the lock has changed hands, perhaps to a
                # request that took it only to be served what that call left: so are we.
                left = await self._left_for(request, incoming, store, waited_on)
                if left is not None:
                    return left
            # Another proxy holds it: wait for its recording, what it leaves us, or its lock
            # (taken again when it is released or its holder died).
            waited_on = holder.token
            await asyncio.sleep(SHARED_LOCK_POLL)
            replay = await self._lookup(request, incoming)
            if replay is None:
                replay = await self._left_for(request, incoming, store, waited_on)
            if replay is not None:
                return replay

    async def _fill(
        self,
        request: web.Request,
        incoming: Incoming,
        store: Locking,
        name: str,
        token: str,
        waited_on: str | None,
    ) -> web.StreamResponse:
        """Holding the fill lock `name`: go upstream, and leave what the call came to for the
        proxies that wait on it (`_leave`), before the lock is released."""
        # The lock lives while the call does (a stream can run for minutes), and ends
        # SHARED_LOCK_TTL_MS after a holder that died.
        keeping = asyncio.create_task(self._keep_lock(store, name, token))
        try:
            # The call we waited on may have recorded, or failed, between our last look and our
            # lock: then we are served as the requests waiting on a call are.
            replay = await self._lookup(request, incoming)
            if replay is None and waited_on is not None:
                replay = await self._left_for(request, incoming, store, waited_on)
            if replay is not None:
                return replay
            flight: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            try:
                return await self._lead(request, incoming, coalesce=True, flight=flight)
            finally:
                if flight.done():
                    await self._leave(request, incoming, store, token, flight.result())
        finally:
            keeping.cancel()
            # A release that fails is harmless (the lock expires), and must not turn the
            # answer just given into an error.
            with contextlib.suppress(StoreError):
                await store.release(name, token)

    async def _leave(
        self,
        request: web.Request,
        incoming: Incoming,
        store: Locking,
        token: str,
        outcome: Outcome,
    ) -> None:
        """Post what a lock holder's call came to, when it recorded nothing, for the proxies
        waiting on it: they would otherwise each make the same call in turn, waiting out the
        same timeout or paying for the same error. Posted under the holder's token, so that
        only the requests that waited on this very call find it, never those of a later call
        made while it lasts."""
        if outcome is False:
            # A 2xx that could not be recorded: each waiter makes its call now, together.
            posted: dict[str, Any] = {"unrecorded": True}
        elif isinstance(outcome, ProxyError):
            # Unreachable, timed out, broken off.
            posted = {"failure": outcome.fields()}
        elif isinstance(outcome, Relayed) and self._shareable(incoming, outcome):
            # The upstream's error answer, for the waiters that sent the same (`origin`).
            posted = {"relayed": outcome.fields()}
        else:
            return
        assert incoming.canon is not None
        name = outcome_name(incoming.canon.key, token)
        # A post that fails costs the waiters a call of their own, not this answer.
        with contextlib.suppress(StoreError):
            await store.post(name, orjson.dumps(posted), SHARED_OUTCOME_TTL_MS)

    def _shareable(self, incoming: Incoming, relayed: Relayed) -> bool:
        """Whether an upstream error answer may be posted in the shared store: a small one that
        repeats no secret of the request (an API key quoted back by a 401, say), since the
        store keeps no secret of a request either."""
        if len(relayed.body) > SHARED_ANSWER_LIMIT:
            return False
        values = [value for _, value in relayed.headers]
        # The client's key whatever its shape (a local server's, Azure's): a 401 may quote it.
        secrets = {*self._secrets(incoming), incoming.api_key} - {""}
        return not any(
            secret.encode() in relayed.body or any(secret in value for value in values)
            for secret in secrets
        )

    async def _left_for(
        self, request: web.Request, incoming: Incoming, store: Locking, token: str
    ) -> web.StreamResponse | None:
        """What the holder `token` left for the requests that waited on its call: its failure
        (raised), its upstream's error answer when this request is the very same as its
        (`Relayed.origin`), or, when its answer could not be recorded, this request's own call;
        None when it left nothing for this one."""
        assert incoming.canon is not None
        key = incoming.canon.key
        posted = await store.read_post(outcome_name(key, token))
        if posted is None:
            return None
        left = orjson.loads(posted)
        if left.get("unrecorded"):
            return await self._lead(request, incoming, coalesce=False)
        if "failure" in left:
            raise failure_from(left["failure"], key)
        relayed = Relayed.from_fields(left["relayed"])
        if relayed.origin != origin_of(incoming.raw, incoming.api_key):
            return None  # its error may come from what the key leaves out: our own call
        return relayed.response()

    @staticmethod
    async def _keep_lock(store: Locking, name: str, token: str) -> None:
        """Extend a fill lock every third of its life until cancelled."""
        while True:
            await asyncio.sleep(SHARED_LOCK_TTL_MS / 3000)
            with contextlib.suppress(StoreError):
                if not await store.extend(name, token, SHARED_LOCK_TTL_MS):
                    return  # lost (expired while Redis was away): nothing left to keep

    async def _forward(
        self,
        request: web.Request,
        incoming: Incoming,
        *,
        status: str,
        flight: asyncio.Future[Outcome] | None = None,
    ) -> web.StreamResponse:
        """Send the request upstream and relay the answer, recording it when `flight` is given."""
        started = time.monotonic()
        counted = False  # the upstream's error answer, counted with its status
        try:
            async with self.upstream.open(
                incoming.method, incoming.path, request.headers.items(), incoming.raw or None
            ) as live:
                headers = response_headers(live.headers.items())
                if incoming.canon is not None:
                    headers[KEY] = incoming.canon.key
                if not 200 <= live.status < 300:
                    self.metrics.upstream_error(live.status)
                    counted = True
                    # A recorded endpoint's answer must come through the proxy; elsewhere (a
                    # file download's redirect to its blob store) the client may follow it.
                    if incoming.canon is not None and (redirect := elsewhere(live)):
                        raise redirect
                    body = await read_body(live)
                    headers[STATUS] = "bypass" if flight is None else "miss"
                    if flight is not None:
                        origin = origin_of(incoming.raw, incoming.api_key)
                        relayed = Relayed(live.status, tuple(headers.items()), body, origin)
                        flight.set_result(relayed)
                    return web.Response(status=live.status, headers=headers, body=body)
                headers[STATUS] = status
                if live.content_type == "text/event-stream":
                    return await self._relay_stream(request, incoming, live, headers, flight)
                body = await read_body(live)
                sample = None
                if flight is not None:
                    known = self._secrets(incoming)
                    sample = self._body_sample(incoming, live, body, started, known)
                    recorded = sample is not None and await self._recorded(
                        self._record(request, incoming, sample, flight, headers, len(body)),
                        incoming.shown_path,
                    )
                    if not recorded:
                        headers[STATUS] = status = "miss"  # forwarded, but not recorded
                        unrecorded(flight)
                fingerprint = sample.system_fingerprint if sample else None
                self.metrics.count(status, incoming.model, fingerprint)
                return web.Response(status=live.status, headers=headers, body=body)
        except ProxyError as exc:
            if not counted:  # unreachable, timed out, broken off: no status to count it with
                self.metrics.upstream_error(0)
            if incoming.canon is not None:
                exc.headers[KEY] = incoming.canon.key
            raise

    def _unrecorded_stream(
        self,
        request: web.Request,
        incoming: Incoming,
        response: web.StreamResponse,
        flight: asyncio.Future[Outcome] | None,
    ) -> web.StreamResponse:
        """A live stream that ended before it could be recorded (broken off, its client gone):
        its headers may have said otherwise; the stats and the access log say what it came to."""
        outcome = "miss" if flight is not None else status_of(response.headers)
        request[OUTCOME] = outcome
        self.metrics.count(outcome, incoming.model)
        return response

    def _secrets(self, incoming: Incoming) -> tuple[str, ...]:
        """The secrets of a request that its answer may echo and no recording may hold, longest
        first: the API-key shaped strings of its body (stored redacted), and the API keys it is
        sent with."""
        found = secrets_in(incoming.body, incoming.raw)
        for key in (incoming.api_key, self.upstream.api_key):
            if key and looks_secret(key):
                found.add(key)
        return tuple(sorted(found, key=len, reverse=True))

    def _body_sample(
        self,
        incoming: Incoming,
        live: ClientResponse,
        body: bytes,
        started: float,
        known: tuple[str, ...],
    ) -> Sample | None:
        # A BOM before the JSON: the SDK reads past it, and a replay re-serialises the body.
        text = body[len(codecs.BOM_UTF8) :] if body.startswith(codecs.BOM_UTF8) else body
        try:
            parsed: Any = orjson.loads(text)
        except orjson.JSONDecodeError:
            parsed = _NOT_JSON
        # orjson refuses NaN and ±Infinity, which the SDK reads, and reads an integer beyond 64
        # bits as a double.
        inexact = inexact_number(text)
        if inexact is not None:
            log.warning(
                "not recording %s: the upstream body holds %s, %s",
                incoming.shown_path,
                inexact,
                UNRECORDABLE,
            )
            return None
        if parsed is _NOT_JSON:
            log.warning("not recording %s: the upstream body is not JSON", incoming.shown_path)
            return None
        if not isinstance(parsed, (dict, list)):
            return None
        return self._sample(live, started, body=redact_json(parsed, body, known))

    async def _relay_stream(
        self,
        request: web.Request,
        incoming: Incoming,
        live: ClientResponse,
        headers: CIMultiDict[str],
        flight: asyncio.Future[Outcome] | None,
    ) -> web.StreamResponse:
        """Relay an upstream stream as it arrives and record its events if it completes.

        The client gets the upstream's bytes unchanged, keep-alive comments included (they keep
        its read timeout from firing while the model thinks); the recording keeps the events.
        In audit mode the stream is received whole first, so that the client's headers can
        carry the verdict. When recording, the bytes from the one that ends the stream
        (`data: [DONE]`) on are sent once the recording is stored: the SDK takes that event
        for the end of the answer, so an answer it has whole is one that is kept, even if the
        proxy is killed then.
        """
        started = time.monotonic()
        headers.update(SSE_HEADERS)
        response = web.StreamResponse(status=live.status, headers=headers)
        buffered = incoming.mode is Mode.AUDIT
        if not buffered:
            await begin(request, response)
        decoder = sse.Decoder()
        events: list[sse.Event] = []
        held: list[bytes] = []  # what the client gets once the stream is recorded
        holding = buffered
        size = 0
        try:
            async for chunk in iter_body(live):
                t_ms = int((time.monotonic() - started) * 1000)
                decoded = decoder.decode(chunk, t_ms)
                events.extend(decoded)
                size += len(chunk)
                if not holding and flight is not None:
                    holding = any(event.data == sse.DONE for event in decoded)
                if holding:
                    held.append(chunk)
                else:
                    async with asyncio.timeout(CLIENT_WRITE_TIMEOUT):
                        await response.write(chunk)
        except UpstreamBroken as exc:
            log.warning("upstream stream for %s broke off: %s", incoming.shown_path, exc)
            broken = upstream_failure(
                502, f"The upstream stream broke off: {exc}", "upstream_broken"
            )
            if buffered:
                raise broken from None  # counted by `_forward`, as its other failures
            self.metrics.upstream_error(0)
            if flight is not None and not flight.done():
                flight.set_result(broken)  # those waiting have had nothing yet: a clean 502
            # Broken off after its `data: [DONE]`: the answer is whole, and the client gets it.
            await self._send_held(request, response, held)
            # Ending the body cleanly would make a truncated answer look complete to the SDK:
            # close the connection with the chunked body unterminated instead.
            if request.transport is not None:
                request.transport.close()
            return self._unrecorded_stream(request, incoming, response, flight)
        except ConnectionError:
            # The client went away: what it did not receive is not recorded (DESIGN §5).
            log.info("client left during the stream of %s; nothing recorded", incoming.shown_path)
            return self._unrecorded_stream(request, incoming, response, flight)
        except TimeoutError:
            log.warning(
                "client of the stream of %s read nothing for %ss: closed, nothing recorded",
                incoming.shown_path,
                CLIENT_WRITE_TIMEOUT,
            )
            if request.transport is not None:
                request.transport.close()
            return self._unrecorded_stream(request, incoming, response, flight)
        events.extend(decoder.flush())
        known = self._secrets(incoming)
        sample = self._sample(live, started, events=tuple(redact_event(e, known) for e in events))
        outcome = status_of(headers)
        unrecordable = (
            None if flight is None else unrecordable_stream(decoder, events, incoming.path)
        )
        if flight is not None and unrecordable is None:
            recording = self._record(request, incoming, sample, flight, response.headers, size)
            if not await self._recorded(recording, incoming.shown_path):
                outcome = "miss"
                unrecorded(flight)
                if buffered:  # not sent yet: the header can still say so
                    response.headers[STATUS] = outcome
        elif flight is not None:
            log.warning(
                "not recording %s: the upstream stream %s", incoming.shown_path, unrecordable
            )
            outcome = "miss"
            unrecorded(flight)
            if buffered:  # not sent yet: the header can still say so
                response.headers[STATUS] = outcome
        if buffered:
            await begin(request, response)
        await self._send_held(request, response, held)
        request[OUTCOME] = outcome
        self.metrics.count(outcome, incoming.model, sample.system_fingerprint)
        return response

    @staticmethod
    async def _send_held(
        request: web.Request, response: web.StreamResponse, held: list[bytes]
    ) -> None:
        """Send the end of a live stream that was held back (`_relay_stream`)."""
        if not held:
            return
        try:
            async with asyncio.timeout(CLIENT_WRITE_TIMEOUT):
                await response.write(b"".join(held))
        except (ConnectionError, TimeoutError):
            # The client left, or stopped reading, at the very end: what was recorded stays.
            if request.transport is not None:
                request.transport.close()

    def _sample(
        self,
        live: ClientResponse,
        started: float,
        *,
        body: Any = None,
        events: tuple[sse.Event, ...] | None = None,
    ) -> Sample:
        model, fingerprint = response_identity(body, events or ())
        return Sample(
            recorded_at=utc_now(),
            upstream=self.config.upstream_base,
            model=model,
            system_fingerprint=fingerprint,
            status=live.status,
            headers=stored_headers(live.headers.items()),
            elapsed_ms=int((time.monotonic() - started) * 1000),
            body=body,
            events=events,
        )

    async def _recorded(self, recording: Awaitable[None], path: str) -> bool:
        """Whether `recording` (a `_record`) could store: a store that fails now (Redis went away
        during the upstream call, or is full), or a recording under the key that cannot be read,
        must not cost the client the answer it waited, and paid, for. A 503 would also make the
        SDK retry: another paid call."""
        try:
            await recording
        except FormatError as exc:  # a hand edit, a merge: said for each such key
            log.error("not recording %s: %s", path, exc)
            return False
        except StoreError as exc:  # it fails every miss alike while it lasts
            self.store_failures.error("record", "not recording %s: %s", path, exc)
            return False
        self.store_failures.ended("record", "recording again")
        return True

    async def _record(
        self,
        request: web.Request,
        incoming: Incoming,
        sample: Sample,
        flight: asyncio.Future[Outcome],
        headers: MutableMapping[str, str],
        received: int,
    ) -> None:
        """Store a live sample (`received` bytes from upstream); when the key already had
        samples, audit it against them."""
        canon = incoming.canon
        assert canon is not None
        await self._remember_fingerprint(canon.model, sample.system_fingerprint)
        fresh = Recording(
            key=canon.key,
            method=canon.method,
            path=redact_path(canon.path),  # a query string may carry a key (?key=AIza…)
            body=redact(canon.body),
            namespace=canon.namespace,
        )
        # Audit mode records only what is absent (under --repeat sequence, a sample past the
        # last); Cache-Control: no-store records nothing.
        keep_existing = incoming.mode is Mode.AUDIT
        sequence = self.config.repeat is Repeat.SEQUENCE
        if sequence and incoming.mode is Mode.RECORD and incoming.write:
            # A record run rewrites the recording, so that a replay run gets what it saw: the
            # samples past the ones it reached go when it ends (`_trim_sequences`).
            self._rerecorded[canon.key] = canon.namespace
        if incoming.turns is not None and incoming.write and not incoming.replaces:
            # Added after the last sample: only once the identical requests numbered before this
            # one have added theirs (or failed), so that sample k answers the k-th request even
            # when the upstream answered a later one first.
            await incoming.turns.wait_for_earlier(incoming.ordinal)
        seen: list[bytes | None] = [None]
        written = [False]

        def add(stored: bytes | None) -> bytes | None:
            # The store hands us what it holds, so the audit needs no read of its own.
            seen[0] = stored
            written[0] = False  # the store may call again, with what it holds then
            if not incoming.write or (keep_existing and stored is not None and not sequence):
                return None
            recording = fresh if stored is None else load(stored, canon.key, self._store_shown)
            if keep_existing and incoming.ordinal < len(recording.samples):
                return None  # the sample this answer is audited against stays as it was
            written[0] = True
            if sequence:
                index = incoming.ordinal if incoming.replaces else len(recording.samples)
                recording = recording.with_sample_at(sample, index)
            else:
                recording = recording.with_sample(sample)
            return recording.dumps(pretty=self.store.pretty)

        await self.store.update(canon.namespace, canon.key, add)
        old = seen[0]
        if old is not None:
            try:
                # --repeat sequence: the k-th identical request's answer is compared with
                # sample k, what a replay would have served it.
                position = incoming.ordinal if sequence else None
                verdict = await self._audit(request, old, sample, len(old) + received, position)
            except FormatError as exc:
                if not written[0]:
                    raise  # nothing was stored, and nothing could be compared
                # Stored: the store's updater read the recording, but a sample of it will not
                # assemble for the comparison (a hand edit).
                log.error("not auditing %s against its recording: %s", canon.key[:12], exc)
            else:
                if incoming.mode is Mode.AUDIT:
                    headers[VERDICT] = verdict
        elif incoming.mode is Mode.AUDIT:
            headers[VERDICT] = "new"
        if not written[0]:
            return
        self._recordings.pop(canon.key, None)
        if self.used is not None:
            self.used.add(canon.key)
        if self._index is not None:
            self._index.add(canon.key, fresh.namespace, fresh.method, fresh.path, fresh.body)
        if not flight.done():
            flight.set_result(True)

    async def _audit(
        self,
        request: web.Request,
        stored: bytes,
        live: Sample,
        size: int,
        position: int | None,
    ) -> str:
        """Compare a live sample with its recording (`stored`, as the store holds it), write the
        audit event, return the verdict: with the pinned sample, the sample of the same
        fingerprint, or the sample at `position` (--repeat sequence; "new" past the last).
        Reading the recording and comparing are done in a worker thread when `size` (both, in
        bytes) passes
        AUDIT_INLINE_LIMIT: they only read what they are given, and this request, the only one
        holding the live sample, waits for them."""
        large = size > AUDIT_INLINE_LIMIT
        recording = await _off_loop_if(large, Recording.loads, stored)
        if position is None:
            # A pin names the sample to compare with (today's answer against a baseline
            # backend); without one, the sample of the live answer's fingerprint.
            pinned = pinned_fingerprint(request)
            recorded = baseline(recording.samples, live.system_fingerprint, pinned=pinned)
        else:
            samples = recording.samples
            recorded = samples[position] if position < len(samples) else None
        if recorded is None:
            return "new"
        distance = None
        # An embeddings response already carries its vectors: compare() measures those.
        if self.config.audit_embeddings and not recording.path.startswith("/v1/embeddings"):
            distance = await self._embedding_distance(request, recorded, live, large)
        event, comparison = await _off_loop_if(
            large, audit_event, recording, recorded, live, embedding_distance=distance
        )
        await self.audit.write(event)
        if comparison.diverged:
            self.metrics.divergence(
                recording.model,
                live.system_fingerprint,
                comparison.verdict.value,
                comparison.fingerprint_changed,
            )
        return comparison.verdict.value

    async def _embedding_distance(
        self, request: web.Request, recorded: Sample, live: Sample, large: bool
    ) -> float | None:
        """Cosine distance of upstream embeddings of the two texts (the seed guide's measure)."""
        texts = await _off_loop_if(large, _output_texts, recorded, live)
        if not any(texts):
            return None  # nothing was said on either side: no meaning to compare
        if texts[0] == texts[1]:
            return 0.0
        body = {"model": self.config.audit_embeddings, "input": texts, "encoding_format": "float"}
        try:
            async with self.upstream.open(
                "POST", "/v1/embeddings", request.headers.items(), orjson.dumps(body)
            ) as answer:
                data = orjson.loads(await read_body(answer)) if answer.status == 200 else None
            vectors = [item["embedding"] for item in data["data"]] if data else []
            if len(vectors) == 2:
                return cosine_distance(vectors[0], vectors[1])
        except (ProxyError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("audit embeddings with %s failed: %s", body["model"], exc)
        return None


async def _index_all(index: RequestIndex, found: AsyncIterator[tuple[str, str, bytes]]) -> None:
    """Add every readable recording `found` (as `Store.scan` yields them) to `index`."""
    read = 0
    async for _, key, raw in found:
        read += 1
        if read % INDEX_BATCH == 0:
            await asyncio.sleep(0)  # let the requests meanwhile be served
        try:
            recording = await _off_loop_if(len(raw) > PARSE_INLINE_LIMIT, Recording.loads, raw)
        except FormatError:
            continue
        # As `_record` stores paths now: one recorded before may hold a key in its query string.
        path = redact_path(recording.path)
        index.add(key, recording.namespace, recording.method, path, recording.body)


async def _off_loop_if(large: bool, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`work(*args, **kwargs)`, in a worker thread when it is `large`, so that the event loop
    serves other requests meanwhile."""
    if large:
        return await asyncio.to_thread(work, *args, **kwargs)
    return work(*args, **kwargs)


def _output_texts(recorded: Sample, live: Sample) -> list[str]:
    return [output_text(recorded.response()), output_text(live.response())]


def outcome_name(key: str, token: str) -> str:
    """Where the holder of the fill lock `token` posts what its call for `key` came to."""
    return f"outcome:{key}:{token}"


def failure_from(fields: dict[str, Any], key: str) -> ProxyError:
    """The upstream failure another proxy posted for `key`, as this proxy answers it."""
    error = ProxyError.from_fields(fields)
    error.headers[KEY] = key
    return error


def parse_request(
    method: str, path: str, namespace: str, raw: bytes, route: str
) -> tuple[Any, CanonicalRequest | None]:
    """The parsed body and the key of a recorded endpoint's request (None: never replayed, as it
    depends on state held upstream); a 400 for a body the proxy refuses."""
    body: Any = None
    if method == "POST":  # a GET is keyed without its body
        body = parse_json(raw)
        check_body(body)
        check_storable(body)
    if route == "/v1/responses" and any(body.get(m) for m in STATEFUL):
        return body, None
    return body, make_key(method, path, body, namespace)


async def begin(request: web.Request, response: web.StreamResponse) -> None:
    """Send a streamed response's status and headers. From here on a failure cannot become an
    error response: `error_middleware` finds the response in STARTED and cuts it off."""
    STARTED.set(response)
    if request.version < HttpVersion11:
        # No chunked encoding in HTTP/1.0: the body ends when the connection closes, also for
        # a client that asked to keep it alive.
        response.force_close()
    await response.prepare(request)


def load(raw: bytes, key: str, store: str) -> Recording:
    """The recording stored under `key` in `store` (a --store value as shown); one that cannot be
    read says how to get past it."""
    try:
        return Recording.loads(raw)
    except FormatError as exc:
        raise unreadable(exc, key, store) from None


def unreadable(exc: FormatError, key: str, store: str) -> FormatError:
    """The error of a recording that cannot be read or replayed, saying how to get past it."""
    remove = f"seedcache rm --store {shlex.quote(store)} {key[:12]}"
    return FormatError(
        f"recording {key[:12]}: {exc}. Fix it, or delete it ({remove}) to record it again"
    )


class Throttled:
    """Log lines of each kind at most once every `interval` seconds; the next line of a kind
    logged says how many of it were left out meanwhile."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self._logger = logger
        self._interval = interval
        self._spells: dict[str, _Spell] = {}

    def error(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        spell = self._spells.setdefault(kind, _Spell())
        if now - spell.logged_at < self._interval:
            spell.left_out += 1
            spell.left_out_at = now
            return
        if spell.left_out:
            span = spell.left_out_at - spell.logged_at
            message += (
                f" ({spell.left_out} more like it were not logged, in the {span:.0f} s after "
                "the line before)"
            )
        spell.logged_at, spell.left_out = now, 0
        self._logger.error(message, *args)

    def ended(self, kind: str, message: str, *, closing: bool = False) -> None:
        """Say `message`, and how many lines of `kind` were left out, if any were, once what
        failed has worked for as long as lines are kept apart (or the proxy stops, `closing`):
        no line of the kind may come to say it."""
        spell = self._spells.get(kind)
        if spell is None or not spell.left_out:
            return
        if not closing and time.monotonic() - spell.left_out_at < self._interval:
            return  # still failing now and then: the next line of the kind will count them
        span = spell.left_out_at - spell.logged_at
        self._logger.warning(
            "%s; %d more like the last failure logged were not logged, in the %.0f s after it",
            message,
            spell.left_out,
            span,
        )
        spell.left_out = 0

    def close(self) -> None:
        """Say what was left out of every kind, as the proxy stops."""
        for kind in self._spells:
            self.ended(kind, f"stopping ({kind})", closing=True)


@dataclass(slots=True)
class _Spell:
    """One kind of `Throttled` line: when it was last logged, and what was left out since."""

    logged_at: float = -math.inf
    left_out: int = 0
    left_out_at: float = -math.inf


def _log_failure(task: asyncio.Task[Any]) -> None:
    """A background task's failure, logged (and so retrieved) rather than left to a warning."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("could not build the index that explains misses: %s", exc)


def remember(cache: dict[K, V], key: K, value: V, size: int) -> V:
    """Put `value` in a bounded cache, dropping the oldest entry when it is full."""
    if key not in cache and len(cache) >= size:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def origin_of(raw: bytes, api_key: str) -> str:
    """A digest of a request's body bytes and API key, which tells whether an upstream error is
    another identical request's answer too (`Relayed`); posted for other proxies where the key
    itself must not be."""
    digest = hashlib.sha256(api_key.encode())
    digest.update(b"\0")  # a header value holds no NUL: the key ends here
    digest.update(raw)
    return digest.hexdigest()


def client_key(headers: Mapping[str, str]) -> str:
    """The client's API key: a bearer token, or Azure's `api-key` header."""
    authorization = request_header(headers, "Authorization")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request_header(headers, "api-key").strip()


def request_header(headers: Mapping[str, str], name: str, default: str = "") -> str:
    """A request header seedcache reads; a 400 naming it when its value is not UTF-8 text."""
    value = headers.get(name, default)
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            # aiohttp keeps bytes that are not UTF-8 (a latin-1 client's é) as lone surrogates,
            # which no message, log line, JSON or digest can take as they are.
            raise bad_request(
                f"The {name} header is not UTF-8 text; send it encoded as UTF-8.",
                code="invalid_header",
            ) from None
    return value


def namespaces_phrase(namespaces: list[str]) -> str:
    """Where a request is recorded, in words: "in namespace 'a'", "in namespaces 'a' and 'b'",
    "in the default namespace and in 'a'" ("" is the default namespace)."""
    named = [repr(n) for n in namespaces if n]
    listed = ", ".join(named[:-1]) + " and " + named[-1] if len(named) > 1 else "".join(named)
    if "" not in namespaces:
        return f"in namespace{'s' if len(named) > 1 else ''} {listed}"
    return f"in the default namespace and in {listed}" if named else "in the default namespace"


def pin_hint(samples: Iterable[Sample]) -> str:
    """What can answer a request whose pinned fingerprint no sample has: recording again cannot,
    since the upstream answers from whatever backend it runs now."""
    known = list(dict.fromkeys(s.system_fingerprint for s in samples if s.system_fingerprint))
    return (
        f"Pin a fingerprint the recording has ({', '.join(known)}) or drop the pin: the upstream "
        "cannot be asked for a given backend"
    )


def pinned_fingerprint(request: web.Request) -> str | None:
    """The fingerprint a request pins with X-Seedcache-Fingerprint, if any."""
    # A template whose variable is unset sends the header empty: no pin.
    return request_header(request.headers, FINGERPRINT).strip() or None


# Why an answer holding a number orjson cannot write exactly is relayed but not recorded.
UNRECORDABLE = "which no recording can hold as it was sent"
_NOT_JSON = object()  # what an upstream body that is not JSON parses to


def unrecordable_stream(decoder: sse.Decoder, events: Sequence[sse.Event], path: str) -> str | None:
    """Why a stream that ended cleanly is not recorded, or None: what the client got live could
    not be replayed as it was (DESIGN §5)."""
    if not sse.is_complete(events, path):
        # No [DONE] or terminal event, an error event: not a successful answer.
        return "did not complete"
    if not decoder.utf8:
        return "is not valid UTF-8 (a client reading it strictly, as the SDK does, fails on it)"
    if decoder.bom:
        return "begins with a byte order mark (the SDK then drops its first event)"
    inexact = inexact_events(events)
    if inexact is not None:
        return f"holds {inexact}, {UNRECORDABLE}"
    return None


def elsewhere(live: ClientResponse) -> ProxyError | None:
    """A 502 for an upstream redirect to another address: relayed, the client would follow it
    around the proxy (the openai SDK follows redirects), unrecorded, every time."""
    location = live.headers.get("Location", "")
    if not 300 <= live.status < 400 or "//" not in location.split("?", 1)[0]:
        return None  # not a redirect, or one back to this proxy (a relative location)
    shown = location.split("?", 1)[0][:200]  # a query may carry a key
    return ProxyError(
        502,
        f"The upstream answered {live.status}, redirecting to {shown}: seedcache does not follow "
        "redirects, and a client that did would leave the proxy. Set --upstream to the address "
        "the upstream redirects to.",
        type="upstream_error",
        code="upstream_redirect",
    )


def unrecorded(flight: asyncio.Future[Outcome]) -> None:
    """Tell those waiting on a call that its 2xx answer was not recorded."""
    if not flight.done():
        flight.set_result(False)


def status_of(headers: Mapping[str, str]) -> str:
    """The X-Seedcache-Status a response carries."""
    return str(headers.get(STATUS, "bypass"))


def response_identity(body: Any, events: tuple[sse.Event, ...]) -> tuple[str | None, str | None]:
    """The response `model` and `system_fingerprint` of a body, or of the first chunk of a stream
    that names its model (Azure's first chunk, a content-filter report, names none)."""
    first: Any = body
    if first is None:
        for event in events:
            try:
                first = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(first, dict) and isinstance(first.get("response"), dict):
                first = first["response"]  # Responses API events carry the response inside
            if not isinstance(first, dict) or first.get("model") != "":
                break
    if not isinstance(first, dict):
        return None, None
    model, fingerprint = first.get("model"), first.get("system_fingerprint")
    if isinstance(fingerprint, str) and fingerprint and not header_safe(fingerprint):
        # A replay sends it as X-Seedcache-Fingerprint, which cannot carry it: kept as unknown
        # (the body still holds it as sent), so the recording replays.
        log.warning(
            "the upstream's system_fingerprint %r has control characters: recorded as unknown",
            fingerprint[:80],
        )
        fingerprint = None
    return (
        model if isinstance(model, str) and model else None,
        fingerprint if isinstance(fingerprint, str) and fingerprint else None,
    )


# Bookkeeping members (not in the key) that a response repeats from its request, with what a
# Responses object says when the request leaves them out. A chat completion repeats only
# `metadata` (since 2026-08), and only when asked with some. `service_tier` is not among them: the
# response names the tier that served it.
_RESPONSES_ECHO: dict[str, Any] = {
    "metadata": {},
    "store": True,
    "user": None,
    "safety_identifier": None,
    "prompt_cache_key": None,
}
_ECHO_NAMES = tuple(f'"{name}"' for name in _RESPONSES_ECHO)
_ECHO_BYTES = tuple(name.encode() for name in _ECHO_NAMES)


def echoed(body: Any) -> dict[str, Any]:
    """The members of a request that its response repeats."""
    if not isinstance(body, dict):
        return {}
    return {name: body[name] for name in _RESPONSES_ECHO if body.get(name) is not None}


def echo(body: bytes, asked: dict[str, Any], *, stream: bool, exact: bool) -> bytes:
    """A replay that repeats this request's bookkeeping (`echoed`), not the recorded request's:
    the same question asked with other metadata or `store` gets them back, as it would live.
    Called only when the request asks some or the rendered body repeats some (`Decoded.render`
    finds that once per rendering), read and written by the standard library's json when
    `exact` (`Decoded.exact`)."""
    if not stream:
        return _echoed_json(body, asked, exact=exact) or body
    events = sse.Decoder().decode(body)
    return b"".join(sse.encode(echo_event(event, asked, exact=exact)) for event in events)


def echo_event(event: sse.Event, asked: dict[str, Any], *, exact: bool) -> sse.Event:
    """One streamed event with this request's bookkeeping repeated (see `echo`); `exact`: the
    stream holds a number orjson cannot hold as sent (`Decoded.render`), perhaps in this event."""
    if not event.data.startswith("{") or not (
        asked or any(name in event.data for name in _ECHO_NAMES)
    ):
        return event
    exact = exact and inexact_number(event.data) is not None
    text = _echoed_json(event.data, asked, exact=exact)
    return event if text is None else sse.Event(text.decode(), event.event, event.t_ms)


def _echoed_json(text: str | bytes, asked: dict[str, Any], *, exact: bool) -> bytes | None:
    """JSON `text` with this request's bookkeeping repeated, or None when that changes nothing;
    `exact`: read and written by the standard library (see `exact_dumps`)."""
    data = json.loads(text) if exact else orjson.loads(text)
    if not _echo_into(data, asked):
        return None
    return exact_dumps(data) if exact else orjson.dumps(data)


def exact_dumps(data: Any) -> bytes:
    """Compact JSON, as orjson writes it, but with integers beyond 64 bits, NaN and ±Infinity
    written as they were read (by the standard library)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _echo_into(data: Any, asked: dict[str, Any]) -> bool:
    """Set the echoed members of a response, chunk or Responses event; True if any changed."""
    if not isinstance(data, dict):
        return False
    inner = data.get("response")
    target: dict[str, Any] = inner if isinstance(inner, dict) else data
    before = dict(target)
    kind = target.get("object")
    if kind == "response":
        for name, default in _RESPONSES_ECHO.items():
            if name in target or name in asked:
                target[name] = asked.get(name, default)
    elif kind not in ("chat.completion", "chat.completion.chunk"):
        return False  # embeddings, models, legacy completions, Responses deltas: no echo
    elif "metadata" in asked:
        target["metadata"] = asked["metadata"]
    else:
        target.pop("metadata", None)
    return bool(target != before)


def replay_headers(sample: Sample, key: str, *, stream: bool) -> dict[str, str]:
    """The headers of a replay, but X-Seedcache-Status: the stored ones and seedcache's."""
    headers = dict(sample.headers)
    headers.pop("content-type", None)
    headers.update(SSE_HEADERS if stream else {"Content-Type": "application/json"})
    headers[KEY] = key
    headers[RECORDED_AT] = sample.recorded_at
    headers.setdefault("x-request-id", f"req_replay_{key[:24]}")
    if sample.system_fingerprint is not None:
        headers[FINGERPRINT] = sample.system_fingerprint
    return headers


def replay_events(sample: Sample, incoming: Incoming) -> list[sse.Event]:
    """The events a streaming request gets from a sample: as recorded, with the usage chunk the
    request asks for or not (`usage_events`), and without the random `obfuscation` padding of
    each chunk when it asks for none (as the upstream then sends them)."""
    events = usage_events(sample, include_usage=incoming.include_usage)
    if incoming.padded:
        return events
    return [unpadded for event in events if (unpadded := without_padding(event))]


def usage_events(sample: Sample, *, include_usage: bool) -> list[sse.Event]:
    """The events of a sample for a stream that asks for a usage chunk (`include_usage`) or not.

    A streamed sample is replayed as recorded, unless the request's include_usage differs from
    the recording's: code that reads `chunk.choices[0]` crashes on a usage chunk it did not ask
    for, so a stream recorded with one is replayed without it, as a plain stream is sent; a
    stream recorded without one is rebuilt from the assembled response, with its usage. (A
    stream with its usage on the finishing chunk, as llama.cpp sends it, answers either way as
    recorded.)
    """
    if sample.events is not None:
        usage_chunk = has_usage_chunk(sample.events)
        if (
            usage_chunk == include_usage
            or (include_usage and not stream_lacks_usage(sample))
            or is_responses(sample.events)
        ):
            return list(sample.events)
        if usage_chunk:
            return [plain for event in sample.events if (plain := without_usage(event))]
    try:
        return sse.synthesise(sample.response(), include_usage=include_usage)
    except ValueError as exc:
        raise FormatError(f"no stream can be built from the recorded answer: {exc}") from None


def without_usage(event: sse.Event) -> sse.Event | None:
    """A chunk of a stream recorded with include_usage as a plain stream has it: the usage chunk
    is left out, and the `"usage": null` every other chunk carried is dropped. The events keep
    their chunking, logprobs and timing, which an assembled response would lose."""
    if not event.data.startswith("{") or '"usage"' not in event.data:
        return event
    return _edited(event, _drop_usage)


def _drop_usage(data: dict[str, Any]) -> bool | None:
    if "usage" not in data:
        return False
    if data.get("choices") == [] and data["usage"]:
        return None  # the usage chunk
    if data["usage"] is not None:
        return False
    del data["usage"]
    return True


def without_padding(event: sse.Event) -> sse.Event | None:
    """A chunk as the upstream sends it when asked for no padding: without `obfuscation`."""
    if not event.data.startswith("{") or '"obfuscation"' not in event.data:
        return event
    return _edited(event, lambda data: data.pop("obfuscation", _ABSENT) is not _ABSENT)


_ABSENT = object()


def _edited(event: sse.Event, edit: Callable[[dict[str, Any]], bool | None]) -> sse.Event | None:
    """`event` with its JSON object changed in place by `edit`, which says whether it changed it
    (None: the event is left out). Its other members keep their order and their numbers as sent."""
    exact = inexact_number(event.data) is not None
    try:
        data = json.loads(event.data) if exact else orjson.loads(event.data)
    except ValueError:  # a payload that only looks like an object: replayed as recorded
        return event
    if not isinstance(data, dict):
        return event
    changed = edit(data)
    if changed is None:
        return None
    if not changed:
        return event
    text = exact_dumps(data) if exact else orjson.dumps(data)
    return sse.Event(text.decode(), event.event, event.t_ms)


def lacks_usage(sample: Sample, incoming: Incoming) -> bool:
    """Whether a stream asks for a usage chunk (include_usage) that the sample cannot give: a chat
    or completions stream recorded without include_usage never learnt its usage. (A non-streaming
    answer assembled from such a stream says `usage: null`, as the SDK's types allow.)"""
    return incoming.include_usage and stream_lacks_usage(sample)
