"""The package's few exceptions and the OpenAI error envelope they become on the wire.

Every error a user can hit says what happened and what to do next; the CLI maps `SeedcacheError`
to exit code 2 and the app maps `ProxyError` to an OpenAI-shaped response.
"""

from __future__ import annotations

from typing import Any


class SeedcacheError(Exception):
    """Base of every error seedcache raises on purpose."""


class ConfigError(SeedcacheError, ValueError):
    """A configuration value that cannot work; `options` names the settings (Config fields) at
    fault, when known, so that the CLI can say where a bad value came from."""

    def __init__(self, message: str, *, options: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.options = options


class FormatError(SeedcacheError, ValueError):
    """Stored data in a format or version this seedcache does not read."""


class StoreError(SeedcacheError):
    """The store could not be read or written (unreachable, locked, full)."""


class StoreFull(StoreError):
    """The store refuses writes for want of room (a Redis at its maxmemory that may not evict),
    while it still answers reads."""


class ProxyError(SeedcacheError):
    """An error answered to the client as an OpenAI error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        # Text a client sent that is not UTF-8 (aiohttp keeps such bytes as lone surrogates)
        # cannot be written as JSON: escaped, it cannot turn the error into a crash of its own.
        self.message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        self.type = type
        self.code = code
        self.param = param
        self.retry = retry
        # Extra response headers (X-Seedcache-Status, X-Seedcache-Key) for the error response.
        self.headers: dict[str, str] = {}

    def fields(self) -> dict[str, Any]:
        """What the error says, in JSON types (for another proxy to answer it too)."""
        names = ("status", "message", "type", "code", "param", "retry")
        return {name: getattr(self, name) for name in names}

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> ProxyError:
        """The error `fields()` describes."""
        return cls(
            int(fields["status"]),
            str(fields["message"]),
            type=str(fields["type"]),
            code=fields.get("code"),
            param=fields.get("param"),
            retry=bool(fields.get("retry")),
        )

    def again(self) -> ProxyError:
        """The same error, to answer another request with."""
        error = ProxyError.from_fields(self.fields())
        error.headers.update(self.headers)
        return error

    def envelope(self) -> dict[str, Any]:
        """The OpenAI error body: {"error": {message, type, param, code}}."""
        return error_envelope(self.message, type=self.type, code=self.code, param=self.param)


def error_envelope(
    message: str, *, type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The body every OpenAI-compatible server sends with an error status."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(
    message: str, *, param: str | None = None, code: str = "invalid_body"
) -> ProxyError:
    """A 400 for input the proxy cannot use; the SDK does not retry it."""
    return ProxyError(400, message, code=code, param=param)
