"""The Redis store (`redis://host:port/db`, `rediss://`): one store shared by many proxies.

Recordings at `seedcache:<namespace>:rec:<key>`, the current fingerprints in the hash
`seedcache:meta`, audit events in the stream `seedcache:audit`; every redis-py error becomes a
StoreError naming the server without its credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.config import StoreSpec
from proxy.errors import ConfigError, StoreError, StoreFull
from proxy.stores.base import DELETE, Holder, Updater

PREFIX = "seedcache:"
META = "seedcache:meta"
AUDIT = "seedcache:audit"
LOCK_PREFIX = "seedcache:lock:"
POST_PREFIX = "seedcache:post:"
_RECORDINGS = "seedcache:*:rec:*"
_KEY = re.compile(r"[0-9a-f]{64}")

CONNECT_TIMEOUT = 2.0
TIMEOUT = 5.0
# Connections per proxy; a command holds one only while it runs (no blocking commands here).
MAX_CONNECTIONS = 64
# An idle pooled connection is PINGed before use after this many seconds, so one that died with
# a restarted server is replaced instead of failing a request.
HEALTH_CHECK_INTERVAL = 15
# Keys per SCAN step and per MGET: bounds one reply to a few recordings' worth of bytes.
_SCAN_BATCH = 100
_MGET_BATCH = 32
_EVENTS_PAGE = 500
# Optimistic transactions retried this often before giving up; each retry means another writer
# committed in between, so the store as a whole always makes progress.
_MAX_ATTEMPTS = 200

# Take a lock if free, else say who holds it: waiters tell the holders apart by their tokens.
_ACQUIRE = """
local held = redis.call("get", KEYS[1])
if held then
    return {0, held}
end
redis.call("set", KEYS[1], ARGV[1], "px", ARGV[2])
return {1, ARGV[1]}
"""
# Compare-and-delete: release a lock only if it still holds our token (it may have expired and
# been taken by another proxy since).
_RELEASE = """
if redis.call("get", KEYS[1]) == ARGV[1] then
    return redis.call("del", KEYS[1])
end
return 0
"""
_EXTEND = """
if redis.call("get", KEYS[1]) == ARGV[1] then
    return redis.call("pexpire", KEYS[1], ARGV[2])
end
return 0
"""


def recording_name(namespace: str, key: str) -> str:
    """The Redis key of a recording."""
    return f"{PREFIX}{namespace}:rec:{key}"


class RedisStore:
    """Recordings in Redis, for proxies on many machines sharing one store (DESIGN §8, §9).

    Only RedisStore is `Locking`: a short-lived lock per key, so that identical misses on
    different proxies make one upstream call.
    """

    pretty = False

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        timeout: float = TIMEOUT,
    ) -> None:
        self.description = StoreSpec("redis", url).shown  # no credentials, no options
        parts = urlsplit(url)
        self._has_password = bool(parts.password) or "password=" in parts.query
        unix = parts.scheme.lower() == "unix"
        try:
            # A blocking pool: past its connections a request waits for one to come back
            # instead of failing (redis-py's default pool raises "Too many connections" past
            # 100 at once, a 503 for every request over it). ?max_connections= in the URL wins.
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=MAX_CONNECTIONS,
                timeout=timeout,
                socket_connect_timeout=connect_timeout,
                socket_timeout=timeout,
                # Not on a unix socket, which no idle timeout drops; and there, with redis-py
                # 8, a health check that meets a refused AUTH reconnects until the stack ends.
                health_check_interval=0 if unix else HEALTH_CHECK_INTERVAL,
                # One immediate retry on a broken connection: a pooled connection that died
                # with a restarted server is replaced; a server that is down fails fast.
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            )
            if unix:  # whatever the URL says (its options win over the arguments above)
                pool.connection_kwargs["health_check_interval"] = 0
            self._redis: Redis = Redis.from_pool(pool)  # closed with the client
            # redis-py passes the URL's options to each connection it makes: one that does not
            # apply (ssl_cert_reqs on redis://) would fail every request, not this line.
            pool.connection_class(**pool.connection_kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self.description} is not a usable Redis URL: {exc}") from None
        if self._redis.connection_pool.connection_kwargs.get("decode_responses"):
            # Values are bytes (recordings need not be UTF-8); decoded replies would corrupt them.
            raise ConfigError(f"{self.description}: remove decode_responses from the Redis URL")
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._release = self._redis.register_script(_RELEASE)
        self._extend = self._redis.register_script(_EXTEND)

    async def get(self, namespace: str, key: str) -> bytes | None:
        with self._errors():
            value = await self._redis.get(recording_name(namespace, key))
        return None if value is None else _bytes(value)

    async def update(self, namespace: str, key: str, fn: Updater) -> bytes | None:
        """Apply `fn` with WATCH/MULTI/EXEC; `fn` runs again whenever another writer won the race,
        so it must only depend on the bytes it is given."""
        name = recording_name(namespace, key)
        with self._errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                for attempt in range(_MAX_ATTEMPTS):
                    try:
                        await pipe.watch(name)
                        stored = await pipe.get(name)
                        old = None if stored is None else _bytes(stored)
                        new = fn(old)
                        if new is None or new == old:
                            return old  # leaving the block UNWATCHes
                        pipe.multi()  # type: ignore[no-untyped-call]
                        if new is DELETE:
                            pipe.delete(name)
                        else:
                            pipe.set(name, new)
                        await pipe.execute()
                        return None if new is DELETE else new
                    except redis.exceptions.WatchError:
                        # Jitter, so writers that collided do not collide again in lockstep.
                        await asyncio.sleep(random.uniform(0, 0.001 * min(attempt + 1, 20)))
        raise StoreError(
            f"Redis at {self.description}: {_MAX_ATTEMPTS} writers in a row changed {name} "
            "while this one was updating it; try again"
        )

    async def put(self, namespace: str, key: str, value: bytes) -> None:
        with self._errors():
            await self._redis.set(recording_name(namespace, key), value)

    async def delete(self, namespace: str, key: str) -> bool:
        with self._errors():
            removed: int = await self._redis.delete(recording_name(namespace, key))
        return removed > 0

    async def scan(self) -> AsyncIterator[tuple[str, str, bytes]]:
        async for batch in self._scanned():
            with self._errors():
                values = await self._redis.mget(batch)
            for name, value in zip(batch, values, strict=True):
                parsed = _parse_name(name)
                if parsed is not None and value is not None:  # None: deleted since SCAN
                    yield parsed[0], parsed[1], _bytes(value)

    async def names(self) -> AsyncIterator[tuple[str, str]]:
        async for batch in self._scanned():
            for name in batch:
                if (parsed := _parse_name(name)) is not None:
                    yield parsed

    async def _scanned(self) -> AsyncIterator[list[bytes]]:
        """The Redis names of every recording, in batches of at most _MGET_BATCH."""
        # SCAN may return a key twice (while Redis rehashes); each name comes once.
        seen: set[bytes] = set()
        cursor = 0
        while True:
            with self._errors():
                cursor, names = await self._redis.scan(cursor, match=_RECORDINGS, count=_SCAN_BATCH)
            fresh = [name for name in map(_bytes, names) if name not in seen]
            seen.update(fresh)
            for start in range(0, len(fresh), _MGET_BATCH):
                yield fresh[start : start + _MGET_BATCH]
            if cursor == 0:
                return

    async def get_meta(self, name: str) -> str | None:
        with self._errors():
            value = await self._redis.hget(META, name)
        return None if value is None else _bytes(value).decode()

    async def check(self) -> None:
        await self.get_meta("health")

    async def set_meta(self, name: str, value: str) -> None:
        with self._errors():
            await self._redis.hset(META, name, value)

    async def add_meta(self, name: str, value: str) -> str:
        with self._errors():
            await self._redis.hsetnx(META, name, value)
            held = await self._redis.hget(META, name)
        return value if held is None else _bytes(held).decode()

    async def append_event(self, event: bytes) -> None:
        with self._errors():
            await self._redis.xadd(AUDIT, {"event": event})

    async def events(self) -> AsyncIterator[bytes]:
        start = "-"
        while True:
            with self._errors():
                page = await self._redis.xrange(AUDIT, min=start, max="+", count=_EVENTS_PAGE)
            page = page or []
            for _, fields in page:
                event = (fields or {}).get(b"event")
                if event is not None:
                    yield _bytes(event)
            if len(page) < _EVENTS_PAGE:
                return
            # The next page starts just after the last ID; computed rather than written as an
            # exclusive "(id" range, which Redis < 6.2 (Ubuntu 22.04's apt package) rejects.
            last = page[-1][0]
            if last is None:
                return
            millis, _, sequence = _bytes(last).decode().partition("-")
            start = f"{millis}-{int(sequence) + 1}"

    async def close(self) -> None:
        with self._errors():
            await self._redis.aclose()

    # -- cross-process locks ----------------------------------------------------------------

    async def acquire(self, name: str, ttl_ms: int) -> Holder:
        """Take the lock `name` for `ttl_ms` ms if nobody holds it; who holds it now."""
        token = secrets.token_hex(16)
        with self._errors():
            taken, held = await self._acquire(keys=[LOCK_PREFIX + name], args=[token, ttl_ms])
        return Holder(_bytes(held).decode(), ours=bool(taken))

    async def release(self, name: str, token: str) -> None:
        """Release the lock `name` if `token` still holds it (it may have expired meanwhile)."""
        with self._errors():
            await self._release(keys=[LOCK_PREFIX + name], args=[token])

    async def extend(self, name: str, token: str, ttl_ms: int) -> bool:
        """Keep the lock `name` for another `ttl_ms` ms if `token` still holds it."""
        with self._errors():
            return bool(await self._extend(keys=[LOCK_PREFIX + name], args=[token, ttl_ms]))

    async def post(self, name: str, value: bytes, ttl_ms: int) -> None:
        """Leave `value` under `name` for `ttl_ms` ms (what a lock holder's call came to)."""
        with self._errors():
            await self._redis.set(POST_PREFIX + name, value, px=ttl_ms)

    async def read_post(self, name: str) -> bytes | None:
        with self._errors():
            value = await self._redis.get(POST_PREFIX + name)
        return None if value is None else _bytes(value)

    async def eviction_policy(self) -> str | None:
        """The server's maxmemory-policy, or None when it will not say (managed Redis services
        often disable CONFIG)."""
        try:
            found = await self._redis.config_get("maxmemory-policy")
        except (redis.exceptions.RedisError, OSError):
            return None
        policy = found.get("maxmemory-policy")  # redis-py decodes CONFIG GET's reply
        return str(policy) if policy else None

    def _refused(self, exc: Exception) -> StoreError:
        if self._has_password:
            return StoreError(f"Redis at {self.description} refused the credentials: {exc}")
        return StoreError(
            f"Redis at {self.description} needs a password: give it in the store URL, "
            "redis://:PASSWORD@host:port/db or unix:///path?password=PASSWORD (percent-encode "
            "'@', ':', '/', '?' and '#' in it)"
        )

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Map redis-py's exceptions to StoreError at the store's boundary."""
        try:
            yield
        except redis.exceptions.AuthenticationError as exc:
            raise self._refused(exc) from None
        except redis.exceptions.ConnectionError as exc:
            if _REFUSED_AUTH.search(str(exc)):  # so a unix socket's refusal comes
                raise self._refused(exc) from None
            raise StoreError(f"cannot reach Redis at {self.description}: {exc}") from None
        except (redis.exceptions.TimeoutError, OSError) as exc:
            raise StoreError(f"cannot reach Redis at {self.description}: {exc}") from None
        except redis.exceptions.OutOfMemoryError as exc:
            raise StoreFull(f"Redis at {self.description} is full: {exc}") from None
        except redis.exceptions.RedisError as exc:
            raise StoreError(f"Redis at {self.description} failed: {exc}") from None


# How Redis refuses a client that sent no password or a wrong one.
_REFUSED_AUTH = re.compile(
    r"NOAUTH|WRONGPASS|Authentication required|HELLO must be called|invalid username-password"
)


def _bytes(value: bytes | str) -> bytes:
    # Narrows redis-py's reply types: decode_responses is refused above, so replies are bytes.
    return value if isinstance(value, bytes) else value.encode()


def _parse_name(name: bytes) -> tuple[str, str] | None:
    # Parsed from the right: the key is hex, the namespace may itself contain ":rec:".
    namespace, _, key = name.decode(errors="replace")[len(PREFIX) :].rpartition(":rec:")
    return (namespace, key) if _KEY.fullmatch(key) else None
