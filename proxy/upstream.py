"""The connection to the upstream API: one `ClientSession`, header hygiene, error mapping.

Everything that knows how aiohttp's client fails lives here; callers see `ProxyError` (502 for a
connection failure, 504 for a timeout) or `UpstreamBroken` once a response has started.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.config import Config
from proxy.errors import ProxyError, SeedcacheError

# RFC 9110 §7.6.1 hop-by-hop headers, never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Not forwarded upstream: the upstream URL sets Host; aiohttp sets the framing and asks for the
# encodings it can decode itself (forwarding the client's `br` would give us bytes we cannot read).
# `Expect: 100-continue` was answered by our server before the body was read; forwarded, it makes
# aiohttp hold the body back until the upstream says 100, which some never do.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "cookie", "expect"}

# Request encodings aiohttp's server decodes before the body is read (its parser's rule: the
# whole header value, lower-cased; a body it cannot decode is refused); br and zstd need the
# decoders pyproject.toml installs. The body we forward is the decoded one, so such a
# Content-Encoding would make the upstream decode it a second time.
DECODED_REQUEST_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})

# Not copied back onto a body we re-frame: aiohttp has already decompressed it, so the upstream's
# content-encoding and content-length would describe bytes the client never gets (the SDK then
# fails and retries). Cookies from the upstream's CDN mean nothing to a local client.
_RESPONSE_DROP = HOP_BY_HOP | {"content-encoding", "content-length", "set-cookie"}


class UpstreamBroken(SeedcacheError):
    """The upstream connection failed after the response had started."""


def request_headers(
    headers: Iterable[tuple[str, str]], *, api_key: str | None = None, strip_auth: bool = False
) -> CIMultiDict[str]:
    """The client's headers as sent upstream: hop-by-hop and seedcache's own removed."""
    headers = list(headers)
    drop = _REQUEST_DROP | _nominated(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers:
        lower = name.lower()
        if lower in drop or lower.startswith("x-seedcache-"):
            continue
        if lower == "content-encoding" and value.lower() in DECODED_REQUEST_ENCODINGS:
            continue
        if (api_key is not None or strip_auth) and lower in ("authorization", "api-key"):
            continue
        out.add(name, value)
    if api_key is not None:
        out["Authorization"] = f"Bearer {api_key}"
    return out


def response_headers(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """The upstream's response headers as passed to the client of a live response."""
    headers = list(headers)
    drop = _RESPONSE_DROP | _nominated(headers)
    return CIMultiDict((n, v) for n, v in headers if n.lower() not in drop)


def _nominated(headers: list[tuple[str, str]]) -> set[str]:
    # RFC 9110 §7.6.1: headers named in Connection are hop-by-hop for this connection only.
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
        if token.strip()
    }


class Upstream:
    """Forwards requests to the configured upstream; a request never chooses where we connect."""

    def __init__(self, config: Config) -> None:
        self.base = config.upstream_base
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout, sock_read=config.upstream_timeout
        )
        # The proxy's own upstream key (--upstream-api-key-env), sent instead of the client's.
        self.api_key = (
            os.environ[config.upstream_api_key_env] if config.upstream_api_key_env else None
        )
        # Clients that present an access token must not have it sent upstream.
        self._strip_auth = bool(config.access_tokens)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the one shared session."""
        connector = aiohttp.TCPConnector(limit=256, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=True, trust_env=False
        )

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str) -> URL:
        """The upstream URL for a normalised `/v1/...` path (with query string), kept exactly as
        the client encoded it: parsing it again would decode `%2F` and resolve `..`."""
        return URL(self.base + path.removeprefix("/v1"), encoded=True)

    @asynccontextmanager
    async def open(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | Iterable[tuple[str, str]],
        body: bytes | None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send a request upstream and yield the response with its body unread."""
        if self._session is None:
            raise RuntimeError("Upstream.start() was not called")
        items = headers.items() if isinstance(headers, Mapping) else headers
        try:
            response = await self._session.request(
                method,
                self.url(path),
                headers=request_headers(items, api_key=self.api_key, strip_auth=self._strip_auth),
                data=body,
                allow_redirects=False,
            )
        except TimeoutError as exc:
            raise upstream_failure(
                504,
                f"The upstream {self.base} did not answer in time ({exc.__class__.__name__}).",
                "upstream_timeout",
            ) from None
        except aiohttp.ClientResponseError as exc:
            # It answered, but not in HTTP aiohttp can read (a header line over 8 KB, say):
            # asking again would be paid for again and answered the same way.
            raise ProxyError(
                502,
                f"The upstream {self.base} answered with a response that cannot be read: "
                f"{exc.message}",
                type="upstream_error",
                code="upstream_bad_response",
            ) from None
        except aiohttp.ClientError as exc:
            raise upstream_failure(
                502, f"Could not reach the upstream {self.base}: {exc}", "upstream_unreachable"
            ) from None
        try:
            yield response
        finally:
            # A body left unread closes the connection instead of returning it to the pool.
            response.release()


async def iter_body(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The response body as it arrives; a failure mid-body becomes `UpstreamBroken`."""
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise UpstreamBroken(f"the upstream stream broke off: {exc!r}") from None


async def read_body(response: aiohttp.ClientResponse) -> bytes:
    """The whole response body; a failure mid-body becomes a 502/504 `ProxyError`."""
    try:
        return await response.read()
    except TimeoutError as exc:
        raise upstream_failure(
            504, f"The upstream timed out while sending its body ({exc!r}).", "upstream_timeout"
        ) from None
    except aiohttp.ClientError as exc:
        raise upstream_failure(
            502, f"The upstream connection broke while sending its body: {exc}", "upstream_broken"
        ) from None


def upstream_failure(status: int, message: str, code: str) -> ProxyError:
    """A 502/504 for a failed upstream: transient, so the SDK may retry it."""
    return ProxyError(status, message, type="upstream_error", code=code, retry=True)
