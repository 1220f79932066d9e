"""Modes and the server configuration: every default lives here and is validated once.

The CLI passes options that were given (None means "not given"); `Config.build` fills the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import ipaddress
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from proxy.errors import ConfigError
from proxy.keys import namespace_problem


class Mode(enum.StrEnum):
    """What the proxy does with a request (DESIGN §2)."""

    AUTO = "auto"
    REPLAY = "replay"
    RECORD = "record"
    AUDIT = "audit"
    PASSTHROUGH = "passthrough"

    @classmethod
    def parse(cls, value: str) -> Mode:
        """A mode or a VCR-style alias; anything else is an error, never a fallback."""
        name = value.strip().lower()
        name = MODE_ALIASES.get(name, name)
        try:
            return cls(name)
        except ValueError:
            choices = ", ".join([m.value for m in cls] + sorted(MODE_ALIASES))
            raise ConfigError(f"unknown mode {value!r}; choose one of {choices}") from None


MODE_ALIASES = {"none": "replay", "once": "auto", "new_episodes": "auto", "all": "record"}


class OnFingerprintChange(enum.StrEnum):
    """What replay does when the current fingerprint has no sample (DESIGN §4)."""

    KEEP = "keep"
    REFRESH = "refresh"
    FAIL = "fail"


class Repeat(enum.StrEnum):
    """Which sample identical requests get (DESIGN §5)."""

    REUSE = "reuse"
    SEQUENCE = "sequence"


DEFAULT_UPSTREAM = "https://api.openai.com/v1"
# `verify` and `probe`, pointed at a seedcache proxy instead of the real API, must stay live.
PASSTHROUGH_HEADERS = {"X-Seedcache-Mode": "passthrough"}
# A proxy started in replay mode answers them from its recordings all the same (DESIGN §2): an
# answer with one of these X-Seedcache-Status values was not live, and compares with nothing.
REPLAYED_STATUSES = ("hit", "stale")


def not_live(status: str, url: str) -> str:
    """Why an answer from `url` with X-Seedcache-Status `status` (a replayed one) is no answer."""
    return (
        f"answered from a recording (X-Seedcache-Status: {status}), not live: is {url} a "
        "seedcache proxy in replay mode?"
    )


# `seedcache verify`: requests in flight, and the divergence rate above which it fails.
DEFAULT_VERIFY_CONCURRENCY = 4
DEFAULT_MAX_DIVERGENCE = 0.0
# `seedcache probe`: the seed guide's settings, a temperature high enough that sampling, not the
# argmax, picks the tokens, so what the seed fixes is visible (at 0 most runs agree anyway).
DEFAULT_PROBE_RUNS = 5
DEFAULT_PROBE_SEED = 123
DEFAULT_PROBE_TEMPERATURE = 0.7
DEFAULT_PROBE_MAX_TOKENS = 200
DEFAULT_STORE = ".seedcache"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Config:
    """Everything `seedcache serve` can be told; the defaults here are the only defaults."""

    host: str = "127.0.0.1"
    port: int = 8080
    mode: Mode = Mode.AUTO
    store: str = DEFAULT_STORE
    upstream: str = DEFAULT_UPSTREAM
    namespace: str = ""
    max_body: int = 32 * MiB
    replay_timing: bool = False
    # The SDK's own read timeout is 600 s (x-stainless-read-timeout); ours must not be shorter.
    upstream_timeout: float = 600.0
    connect_timeout: float = 10.0
    on_fingerprint_change: OnFingerprintChange = OnFingerprintChange.KEEP
    repeat: Repeat = Repeat.REUSE
    audit_log: str | None = None
    audit_embeddings: str | None = None
    isolate_by_key: bool = False
    access_tokens: tuple[str, ...] = ()
    # Names besides the loopback ones that requests may be addressed to and web pages may come
    # from (--allow-host); see `checks_hosts`.
    allowed_hosts: tuple[str, ...] = ()
    upstream_api_key_env: str | None = None
    workers: int = 1
    log_level: str = "info"
    access_log: bool = True
    # Seconds a disk store call may wait on SQLite's lock before failing (diskcache default is 60).
    store_timeout: float = 2.0
    # What a miss in replay tells the user to run to record, and a recording refused for its
    # fingerprint to record again (the pytest plugin names its option); and what a request can
    # send to record again, named only when the server is not in replay (which ignores it), and
    # never under the pytest plugin (whose requests come from the code under test).
    record_hint: str = "seedcache serve --mode auto"
    rerecord_hint: str = "seedcache serve --mode record"
    rerecord_header: str = "X-Seedcache-Mode: record"

    @classmethod
    def build(cls, **given: Any) -> Config:
        """A Config from the options that were given; None means "use the default"."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(given) - fields
        if unknown:
            raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
        values = {name: value for name, value in given.items() if value is not None}
        if "mode" in values and not isinstance(values["mode"], Mode):
            with _about("mode"):
                values["mode"] = Mode.parse(str(values["mode"]))
        if "on_fingerprint_change" in values:
            values["on_fingerprint_change"] = _choice(
                OnFingerprintChange, values["on_fingerprint_change"], "on-fingerprint-change"
            )
        if "repeat" in values:
            values["repeat"] = _choice(Repeat, values["repeat"], "repeat")
        if "log_level" in values:
            values["log_level"] = str(values["log_level"]).strip().lower()
        if "access_tokens" in values:
            values["access_tokens"] = tuple(values["access_tokens"])
        if "allowed_hosts" in values:
            # Host names are case-insensitive (RFC 4343); requests are compared in lower case.
            names = values["allowed_hosts"]
            values["allowed_hosts"] = tuple(name.strip().lower() for name in names)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work."""
        if not self.upstream.startswith(("http://", "https://")):
            raise ConfigError(
                f"upstream must be an http(s) URL, got {self.upstream!r}", options=("upstream",)
            )
        if "@" in urlsplit(self.upstream).netloc:
            # aiohttp refuses them beside the client's Authorization, which is forwarded.
            raise ConfigError(
                "the upstream URL must not carry credentials (user:password@); the client's "
                "Authorization is forwarded, or give the proxy its own key with "
                "--upstream-api-key-env",
                options=("upstream",),
            )
        parts = urlsplit(self.upstream)
        if parts.query or parts.fragment or "?" in self.upstream or "#" in self.upstream:
            # The request's path is appended to the upstream's: a query would end up inside it.
            base = self.upstream.split("?", 1)[0].split("#", 1)[0]  # a query may hold a key
            raise ConfigError(
                f"the upstream URL must not have a query string or fragment ({base!r} followed "
                "by one): give the base URL alone; a query a request needs (Azure's "
                "api-version) is sent by the client and forwarded with its path",
                options=("upstream",),
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535, got {self.port}", options=("port",))
        if self.max_body <= 0:
            raise ConfigError("max-body must be positive", options=("max_body",))
        if problem := namespace_problem(self.namespace):
            raise ConfigError(problem, options=("namespace",))
        if self.workers < 1:
            raise ConfigError("workers must be at least 1", options=("workers",))
        for option in ("upstream_timeout", "connect_timeout"):
            if not 0 < getattr(self, option) < math.inf:  # nan too: it would turn it off
                name = option.replace("_", "-")
                raise ConfigError(f"{name} must be a positive number", options=(option,))
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"unknown log-level {self.log_level!r}; choose one of {', '.join(LOG_LEVELS)}",
                options=("log_level",),
            )
        for name in self.allowed_hosts:
            if not is_host_name(name):
                raise ConfigError(
                    f"--allow-host takes a host name or IP address alone, without scheme, port "
                    f"or path (any port is allowed), got {name!r}",
                    options=("allowed_hosts",),
                )
        if any(not token.strip() for token in self.access_tokens):
            # `--access-token "$TOKEN"` with TOKEN unset: the proxy would answer anyone.
            raise ConfigError(
                "--access-token is empty: the proxy would answer anyone; give the token "
                "(is the variable that should hold it unset?)",
                options=("access_tokens",),
            )
        if self.upstream_api_key_env and not os.environ.get(self.upstream_api_key_env):
            raise ConfigError(
                f"--upstream-api-key-env names {self.upstream_api_key_env}, which is not set",
                options=("upstream_api_key_env",),
            )

    @property
    def checks_hosts(self) -> bool:
        """Whether requests must be addressed to a loopback name or an allowed one, and come
        from no web page elsewhere: on a loopback address (the default) every web page the user
        opens can reach the proxy (a cross-site POST, DNS rebinding), and only those send other
        names. Elsewhere the user exposed it on purpose, unless --allow-host says which names."""
        return is_loopback(self.host) or bool(self.allowed_hosts)

    @property
    def upstream_base(self) -> str:
        """The upstream URL without a trailing slash."""
        return self.upstream.rstrip("/")

    @property
    def audit_log_path(self) -> str | None:
        """The JSONL audit log: as configured, else inside the disk store's folder."""
        if self.audit_log:
            return self.audit_log
        spec = StoreSpec.parse(self.store)
        return os.path.join(spec.location, "audit.jsonl") if spec.kind == "disk" else None

    @property
    def public_url(self) -> str:
        """The base URL clients should use (OPENAI_BASE_URL)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/v1"


def is_loopback(host: str) -> bool:
    """Whether `host` names a loopback address: localhost, 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_host_name(name: str) -> bool:
    """Whether `name` is a host name or an IP address alone (an IPv6 one without brackets)."""
    if ":" in name:
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return False
        return True
    return _HOST_NAME.fullmatch(name) is not None


_HOST_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """A `--store` value taken apart: a diskcache directory, `files:DIR`, or a Redis URL."""

    kind: str  # "disk", "files" or "redis"
    location: str  # the directory, or the URL

    @classmethod
    def parse(cls, spec: str) -> StoreSpec:
        """The one reading of the --store grammar."""
        url = _URL.match(spec)
        if url:
            # URL schemes are case-insensitive (RFC 3986): REDIS:// is redis://.
            scheme = url[1].lower()
            if scheme not in REDIS_SCHEMES:
                # `mysql://x`, `reddis://…` would otherwise become a directory of that name.
                raise ConfigError(
                    f"--store {_public(spec)!r} is not a store seedcache knows: {STORE_FORMS}"
                )
            location = scheme + spec[len(url[1]) :]
            _check_redis_url(location)
            return cls("redis", location)
        scheme = spec.partition(":")[0].lower()
        if scheme in REDIS_SCHEMES:
            # `redis:/host` would otherwise become a directory of that name.
            raise ConfigError(f"--store {spec!r} is not a Redis URL: write {scheme}://host:port/db")
        if spec.startswith(FILES_PREFIX):
            return cls("files", spec[len(FILES_PREFIX) :])
        return cls("disk", spec)

    @property
    def directory(self) -> str | None:
        """The local directory of a disk or files store; None for Redis."""
        return None if self.kind == "redis" else self.location

    def resolved(self, root: str) -> str:
        """The spec with a relative directory taken from `root`."""
        if self.directory is None or os.path.isabs(self.directory):
            return str(self)
        return str(StoreSpec(self.kind, os.path.join(root, self.directory)))

    def __str__(self) -> str:
        return FILES_PREFIX + self.location if self.kind == "files" else self.location

    @property
    def shown(self) -> str:
        """The spec as messages print it: a Redis URL without its credentials or options."""
        if self.kind != "redis":
            return str(self)
        return _public(self.location)


FILES_PREFIX = "files:"
REDIS_SCHEMES = ("redis", "rediss", "unix")
STORE_FORMS = (
    "use a directory, files:DIR, redis://host:port/db, rediss://host:port/db (TLS) or "
    "unix:///path/to/redis.sock?db=N"
)
# Anything that starts like a URL (`scheme://`) names a server, never a directory.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def _public(url: str) -> str:
    """A URL without its credentials or options, for messages."""
    scheme, _, rest = url.partition("://")
    # Everything up to the last @ is credentials, also where a raw #, / or ? in a password ends
    # the authority for a URL parser.
    try:
        parts = urlsplit(f"{scheme}://{rest.rpartition('@')[2]}")
    except ValueError:  # an unclosed [IPv6 address
        return scheme + "://…"
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _check_redis_url(url: str) -> None:
    """ConfigError for a Redis URL whose port or database is not a number: redis-py would
    quietly use its default instead (database 0 for `redis://host/abc`)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- reading it parses it
    except ValueError as exc:
        # The parser's reason would quote what it took for the port: part of such a password.
        reason = (
            "percent-encode the password's # / ? @ (as %23 %2F %3F %40)" if "@" in url else str(exc)
        )
        raise ConfigError(f"--store {_public(url)!r} is not a usable Redis URL: {reason}") from None
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not (db.isascii() and db.isdigit()):
        raise ConfigError(
            f"--store {_public(url)!r}: the database {db!r} is not a number: write "
            f"{parts.scheme}://host:port/N, for example {parts.scheme}://host:6379/0"
        )


def _choice(kind: type[enum.StrEnum], value: Any, option: str) -> Any:
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value).strip().lower())
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ConfigError(
            f"unknown {option} {value!r}; choose one of {choices}",
            options=(option.replace("-", "_"),),
        ) from None


@contextlib.contextmanager
def _about(*options: str) -> Iterator[None]:
    """A ConfigError raised inside concerns `options`."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(str(exc), options=exc.options or options) from None
