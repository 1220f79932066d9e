"""`create_app(config)`: routes, the error middleware, admin endpoints and the app's lifecycle.

Long-lived resources (the store, the upstream session) live in `cleanup_ctx`; nothing is global.
"""

from __future__ import annotations

import asyncio
import heapq
import hmac
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http import HttpProcessingError
from aiohttp.typedefs import Middleware

from proxy import __version__
from proxy.audit import READ_BATCH, parse_since, read_events, summarise
from proxy.config import Config, Mode, StoreSpec, is_loopback
from proxy.errors import FormatError, ProxyError, StoreError, bad_request
from proxy.handlers import KEY, OUTCOME, STARTED, STATUS, Handlers, client_key
from proxy.recording import Recording, printable, redact_path
from proxy.report import totals
from proxy.stores.base import Deferred, Store, open_store
from proxy.upstream import Upstream

log = logging.getLogger("seedcache")

HANDLERS = web.AppKey("handlers", Handlers)
CONFIG = web.AppKey("config", Config)
# What every client on this machine calls it; other loopback addresses (127.0.0.2) are allowed
# too, but looked up only when a request names one.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(config: Config, *, store: Store | None = None) -> web.Application:
    """The seedcache application for `config`; a given `store` is used instead of opening one."""
    quiet_bad_http(logging.getLogger("aiohttp.server"))
    hosts = LOOPBACK_NAMES.union(config.allowed_hosts) if config.checks_hosts else None
    # The access check only when there are tokens: a middleware costs every request.
    middlewares = [error_middleware(hosts)]
    if config.access_tokens:
        middlewares.append(access_middleware)
    # Bodies over max_body are refused by aiohttp itself while reading (413).
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body)
    app[CONFIG] = config

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        opened = store if store is not None else _open_store(config)
        upstream = Upstream(config)
        await upstream.start()
        app[HANDLERS] = handlers = Handlers(config, opened, upstream)
        try:
            yield
        finally:
            await handlers.close()
            await upstream.close()
            if store is None:
                await opened.close()

    app.cleanup_ctx.append(lifecycle)
    admin = {
        "/_seedcache/health": health,
        "/_seedcache/stats": stats,
        "/_seedcache/recordings": recordings,
        "/_seedcache/audit": audit,
        "/metrics": metrics,
    }
    for path, handler in admin.items():
        app.router.add_get(path, handler)
        app.router.add_route("*", path, wrong_method)
    # A typo under /_seedcache/ is answered here: forwarded, it would carry the client's key.
    # /_seedcache/ns/<name>/v1 is a namespaced base URL (NAMESPACE_PREFIX), for the proxy.
    app.router.add_route("*", "/_seedcache{tail:(/(?!ns/).*)?}", no_such_endpoint)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def _open_store(config: Config) -> Store:
    """The configured store; in passthrough mode, a local one only once a request needs it."""
    if config.mode is Mode.PASSTHROUGH and StoreSpec.parse(config.store).directory is not None:
        return Deferred(config.store, timeout=config.store_timeout)
    return open_store(config.store, timeout=config.store_timeout)


async def wrong_method(request: web.Request) -> web.StreamResponse:
    """An admin endpoint asked with another method than GET."""
    error = ProxyError(
        405, f"{request.path} answers GET, not {request.method}.", code="method_not_allowed"
    )
    error.headers["Allow"] = "GET, HEAD"
    raise error


async def no_such_endpoint(request: web.Request) -> web.StreamResponse:
    """A path under /_seedcache/ that is no admin endpoint (never forwarded upstream)."""
    raise ProxyError(
        404,
        f"seedcache has no endpoint {request.path}: there are /_seedcache/health, "
        "/_seedcache/stats, /_seedcache/recordings, /_seedcache/audit and /metrics.",
        code="unknown_url",
    )


async def proxy(request: web.Request) -> web.StreamResponse:
    """Every path that is not an admin endpoint."""
    return await request.app[HANDLERS].handle(request)


async def health(request: web.Request) -> web.Response:
    """Liveness, with the mode, store and upstream: a 503 when the store cannot be read, so that
    a health check (compose, Docker) sees a Redis that went away."""
    config = request.app[CONFIG]
    store = request.app[HANDLERS].store
    facts = {
        "version": __version__,
        "mode": config.mode.value,
        "store": store.description,
        "upstream": config.upstream_base,
    }
    try:
        await store.check()
    except StoreError as exc:
        return json_response({"status": "store_unavailable", "error": str(exc), **facts}, 503)
    return json_response({"status": "ok", **facts})


async def stats(request: web.Request) -> web.Response:
    """Counters: hits, misses, recorded, stale, divergences, upstream errors, by model."""
    return json_response(request.app[HANDLERS].metrics.to_json())


def _not_across_tenants(request: web.Request) -> None:
    """Refuse a listing of the whole store when the store is shared by isolated tenants."""
    if request.app[CONFIG].isolate_by_key:
        raise ProxyError(
            403,
            f"{request.path} lists every tenant's recordings, so it is off with "
            "--isolate-by-key; run `seedcache ls` or `seedcache audit` on the store instead.",
            code="isolated_by_key",
        )


async def recordings(request: web.Request) -> web.Response:
    """The recordings in the store, newest first; ?model= and ?limit= narrow the list."""
    _not_across_tenants(request)
    model = request.query.get("model")
    limit = _int_query(request, "limit", 1000)
    # Only the `limit` newest are kept while the store is read (a shared store may hold tens of
    # thousands), and other requests are served between every READ_BATCH recordings.
    newest: list[tuple[str, int, dict[str, Any]]] = []
    read = total = 0
    async for _, key, raw in request.app[HANDLERS].store.scan():
        read += 1
        if read % READ_BATCH == 0:
            await asyncio.sleep(0)
        try:
            recording = Recording.loads(raw).stored_under(key)
        except FormatError:
            continue
        if model is None or recording.model == model:
            total += 1
            row = recording.summary()
            # `total` breaks ties, so that rows are never compared.
            entry = (row["newest_recorded_at"] or "", -total, row)
            if len(newest) < limit:
                heapq.heappush(newest, entry)
            elif limit:
                heapq.heappushpop(newest, entry)
    rows = [row for _, _, row in sorted(newest, reverse=True)]
    return json_response({"recordings": rows, "total": total})


async def audit(request: web.Request) -> web.Response:
    """The audit summary per model and fingerprint (?since=24h, ?model=), as `seedcache audit`."""
    _not_across_tenants(request)
    try:
        since = parse_since(request.query["since"]) if "since" in request.query else None
    except ValueError as exc:
        raise bad_request(f"?since= {exc}", param="since") from None
    events = await read_events(
        request.app[HANDLERS].store, since=since, model=request.query.get("model")
    )
    groups = summarise(events)
    return json_response({"events": len(events), "totals": totals(groups), "groups": groups})


def _int_query(request: web.Request, name: str, default: int) -> int:
    try:
        return max(0, int(request.query.get(name, default)))
    except ValueError:
        raise bad_request(f"?{name}= must be a whole number", param=name) from None


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = request.app[HANDLERS].metrics.prometheus()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


def json_response(data: object, status: int = 200) -> web.Response:
    """A JSON response serialised with orjson."""
    return web.Response(
        status=status, body=orjson.dumps(data), headers={"Content-Type": "application/json"}
    )


def error_response(error: ProxyError) -> web.Response:
    """An OpenAI-shaped error; `x-should-retry` tells the SDK whether retrying can help."""
    response = json_response(error.envelope(), status=error.status)
    response.headers["x-should-retry"] = "true" if error.retry else "false"
    response.headers["x-request-id"] = f"req_seedcache_{uuid.uuid4().hex[:24]}"
    response.headers["X-Seedcache-Status"] = "error"
    response.headers.update(error.headers)
    if error.status == 408:
        # RFC 9110 §15.5.9: the connection closes; the rest of the body is not waited for.
        response.force_close()
    return response


class BadHttpLine(logging.Filter):
    """aiohttp answers a request it cannot parse (a malformed request line, header or chunk size,
    a header line over 8190 bytes) with a 400 itself, before any handler, and logs it as an ERROR
    with a traceback that quotes the offending bytes: an over-long Authorization header, say.
    Nothing failed here, and a client can send such requests at will: one WARNING line instead,
    without the client's bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            first = (str(exc.message).strip().splitlines() or [""])[0]
            # The words before any quote of the request ("Invalid header token"); with aiohttp's
            # pure-Python parser a message may be the client's text alone: then the error's name.
            words = _QUOTE.split(first, maxsplit=1)[0].strip()
            what = words if _PHRASE.fullmatch(words) else type(exc).__name__
            record.msg = "bad HTTP request from %s: %s (answered 400)"
            record.args = (record.args[0] if isinstance(record.args, tuple) else "-", what)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


# Where aiohttp's description of a parse error starts quoting the request: `…reading: b'…'`,
# `Bad status line '…'`; and what a description says in words of its own.
_QUOTE = re.compile(r"[:'\"]|\bb'")
_PHRASE = re.compile(r"[A-Za-z]+(?: [A-Za-z][A-Za-z0-9-]*| [0-9]+){1,12}")


def quiet_bad_http(logger: logging.Logger) -> None:
    """Install `BadHttpLine` on aiohttp's server logger, once."""
    if not any(isinstance(f, BadHttpLine) for f in logger.filters):
        logger.addFilter(BadHttpLine())


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With --access-token, every request but the health check presents one of the tokens."""
    tokens = request.app[CONFIG].access_tokens
    if tokens and request.path != "/_seedcache/health":
        presented = client_key(request.headers).encode()
        # compare_digest over every token: the time taken says nothing about which matched.
        if not any([hmac.compare_digest(presented, token.encode()) for token in tokens]):
            raise ProxyError(
                401,
                "This seedcache requires an access token: send one of its --access-token "
                "values as the API key (Authorization: Bearer <token>).",
                code="invalid_access_token",
            )
    return await handler(request)


def error_middleware(hosts: frozenset[str] | None) -> Middleware:
    """The middleware every request goes through: it refuses one from elsewhere when `hosts` are
    given (`refuse_foreign`: here rather than in a middleware of its own, which would cost every
    request), and turns every failure into an OpenAI error envelope, never a traceback."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Requests on one keep-alive connection share a task, and so a context: start afresh.
        token = STARTED.set(None)
        try:
            if hosts is not None:
                refuse_foreign(request, hosts)
            return await handler(request)
        except Exception as exc:
            started = STARTED.get()
            if started is not None and started.prepared:
                return cut_off(request, started, exc)
            if isinstance(exc, web.HTTPException) and exc.status < 400:
                raise
            return failure_response(request, exc)
        finally:
            STARTED.reset(token)

    return errors


def refuse_foreign(request: web.Request, hosts: frozenset[str]) -> None:
    """A 403 for a request addressed to a name outside `hosts` (its Host header), or sent by a
    web page on one (its Origin header). Any web page the user opens can send requests to a proxy
    on this machine: a cross-site POST (a text/plain body needs no CORS preflight), which carries
    the page's Origin, or, once DNS rebinding pointed the page's own name at 127.0.0.1, requests
    whose answers it reads, which carry that name in Host. Either spends the upstream key the
    proxy holds, or reads the recordings. A page sets neither header; SDKs send no Origin, and a
    page on localhost (an app in development) is the user's own."""
    host = request.headers.get(hdrs.HOST)  # an istr: looked up without case-folding the name
    if host is not None and not _allowed(host, hosts):
        raise ProxyError(
            403,
            f"seedcache answers only requests addressed to localhost, a loopback address or "
            f"a name given with --allow-host, not to Host: {host[:100]!r}: a web page could "
            "otherwise reach it through DNS rebinding. If you put seedcache behind that name, "
            "allow it with --allow-host NAME (or SEEDCACHE_ALLOW_HOST).",
            code="forbidden_host",
        )
    origin = request.headers.get(hdrs.ORIGIN)
    # "null" (a sandboxed page, a file) has no host: refused like any other page.
    if origin is not None and not _allowed(origin.partition("://")[2], hosts):
        raise ProxyError(
            403,
            f"seedcache refuses requests from web pages elsewhere (Origin: {origin[:100]!r}): "
            "any page the user opens could otherwise use it. Pages on localhost, a loopback "
            "address or a name given with --allow-host may; allow another with --allow-host "
            "NAME (or SEEDCACHE_ALLOW_HOST).",
            code="forbidden_origin",
        )


def _allowed(authority: str, hosts: frozenset[str]) -> bool:
    """Whether the host of `authority` (a Host header, an origin's `host:port`) is one of `hosts`
    or a loopback address."""
    if authority.partition(":")[0] in hosts:  # what clients send: 127.0.0.1:8080, localhost
        return True
    if authority.startswith("["):  # an IPv6 address: [::1]:8080
        host = authority[1:].partition("]")[0]
    else:
        host = authority.partition(":")[0]
    return host.lower() in hosts or is_loopback(host)


def cut_off(
    request: web.Request, started: web.StreamResponse, exc: Exception
) -> web.StreamResponse:
    """A failure after a stream's headers have left: no error response can follow them, and
    ending the body cleanly would pass a cut answer off as whole. Close the connection instead."""
    if isinstance(exc, ConnectionError):
        log.info("client disconnected during %s %s", request.method, printable(request.path))
    else:
        log.error(
            "failed during the stream of %s %s; connection closed: %s",
            request.method,
            printable(request.path),
            exc,
            exc_info=not isinstance(exc, (ProxyError, StoreError, FormatError)),
        )
    if request.transport is not None:
        request.transport.close()
    return started


def failure_response(request: web.Request, exc: Exception) -> web.Response:
    """The OpenAI-shaped error response for a failure before any response was sent, counted
    in the stats when it is an error of the proxy's own: misses, stale recordings and
    upstream failures are counted as such where they happen."""
    error = _as_proxy_error(request, exc)
    if error is None:
        # The client went away mid-response; aiohttp drops the connection quietly.
        log.info("client disconnected during %s %s", request.method, printable(request.path))
        return web.Response(status=499)
    if error.type not in _COUNTED_APART and HANDLERS in request.app:
        request.app[HANDLERS].metrics.error(error.code or error.type)
    return error_response(error)


_COUNTED_APART = ("seedcache_miss", "seedcache_stale", "upstream_error")


def _as_proxy_error(request: web.Request, exc: Exception) -> ProxyError | None:
    """What the client is told of `exc`; None when the client is gone."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, StoreError):
        line = ("store failure on %s %s: %s", request.method, printable(request.path), exc)
        if HANDLERS in request.app:
            request.app[HANDLERS].store_failures.error("request", *line)
        else:
            log.error(*line)
        return ProxyError(
            503,
            f"The seedcache store is unavailable: {exc}",
            type="store_error",
            code="store_unavailable",
            retry=True,
        )
    if isinstance(exc, FormatError):
        log.error(
            "unreadable recording for %s %s: %s", request.method, printable(request.path), exc
        )
        return ProxyError(
            500,
            f"A stored recording could not be read: {exc}",
            type="store_error",
            code="recording_unreadable",
        )
    if isinstance(exc, ConnectionError):
        return None
    if isinstance(exc, web.HTTPException):
        code = "body_too_large" if exc.status == 413 else "http_error"
        message = exc.text or exc.reason
        if exc.status == 413:
            config = request.app[CONFIG]
            message = (
                f"The request body is larger than the proxy's --max-body of {config.max_body} "
                "bytes; raise it with --max-body or SEEDCACHE_MAX_BODY."
            )
        return ProxyError(exc.status, message, code=code)
    log.error("unexpected error on %s %s", request.method, printable(request.path), exc_info=exc)
    return ProxyError(
        500,
        "seedcache hit an internal error; the log has the details.",
        type="server_error",
        code="internal_error",
    )


class AccessLog(AbstractAccessLogger):
    """One line per request: client, request line (keys in the query string redacted), status,
    bytes, seconds, X-Seedcache-Status (what became of a live stream, which its header could
    not yet say) and X-Seedcache-Key."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        target = redact_path(request.rel_url.raw_path_qs)
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.6fs %s %s',
            request.remote,
            request.method,
            target,
            *request.version,
            response.status,
            response.body_length,
            time,
            request.get(OUTCOME) or response.headers.get(STATUS, "-"),
            response.headers.get(KEY, "-"),
        )
