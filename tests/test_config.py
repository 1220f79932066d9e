"""Modes, aliases and validation of the configuration (DESIGN §2)."""

from __future__ import annotations

import re

import pytest

from proxy.config import Config, Mode, OnFingerprintChange, Repeat, StoreSpec
from proxy.errors import ConfigError


@pytest.mark.parametrize(
    ("given", "mode"),
    [
        ("auto", Mode.AUTO),
        ("replay", Mode.REPLAY),
        ("record", Mode.RECORD),
        ("audit", Mode.AUDIT),
        ("passthrough", Mode.PASSTHROUGH),
        ("none", Mode.REPLAY),
        ("once", Mode.AUTO),
        ("new_episodes", Mode.AUTO),
        ("all", Mode.RECORD),
        (" Replay ", Mode.REPLAY),
    ],
)
def test_modes_and_vcr_aliases(given: str, mode: Mode) -> None:
    assert Mode.parse(given) is mode
    assert Config.build(mode=given).mode is mode


def test_unknown_mode_is_an_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown mode 'replya'.*auto.*new_episodes"):
        Mode.parse("replya")


def test_defaults_live_in_config() -> None:
    config = Config.build(host=None, port=None, mode=None, store=None)
    assert (config.host, config.port, config.mode, config.store) == (
        "127.0.0.1",
        8080,
        Mode.AUTO,
        ".seedcache",
    )
    assert config.upstream_base == "https://api.openai.com/v1"
    assert config.max_body == 32 * 1024 * 1024
    assert config.on_fingerprint_change is OnFingerprintChange.KEEP
    assert config.repeat is Repeat.REUSE
    assert config.public_url == "http://127.0.0.1:8080/v1"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"upstream": "ftp://x"}, "http"),
        ({"upstream": "https://user:pw@example.com/v1"}, "must not carry credentials"),
        ({"upstream": "https://x.example.com/openai?api-version=2024-10-21"}, "query string"),
        ({"upstream": "https://example.com/v1#part"}, "fragment"),
        ({"upstream": "https://example.com/v1?"}, "query string"),
        ({"upstream_timeout": float("nan")}, "upstream-timeout must be a positive number"),
        ({"connect_timeout": 0}, "connect-timeout must be a positive number"),
        ({"port": 70000}, "port"),
        ({"max_body": 0}, "max-body"),
        ({"on_fingerprint_change": "ignore"}, "keep, refresh, fail"),
        ({"repeat": "cycle"}, "reuse, sequence"),
        ({"bogus": 1}, "unknown option"),
        ({"upstream_api_key_env": "SEEDCACHE_TEST_UNSET_VARIABLE"}, "not set"),
        ({"allowed_hosts": ["seedcache.test:8080"]}, "--allow-host takes a host name"),
        ({"allowed_hosts": ["https://seedcache.test"]}, "without scheme, port or path"),
        ({"allowed_hosts": ["[::2]"]}, "--allow-host takes"),
        ({"allowed_hosts": [" "]}, "--allow-host takes"),
        ({"access_tokens": ("team-token", "")}, "--access-token is empty"),
    ],
)
def test_invalid_values_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.build(**options)


@pytest.mark.parametrize(
    ("options", "checks"),
    [
        ({}, True),
        ({"host": "localhost"}, True),
        ({"host": "127.0.0.2"}, True),
        ({"host": "::1"}, True),
        ({"host": "0.0.0.0"}, False),
        ({"host": ""}, False),
        ({"host": "192.168.1.5"}, False),
        ({"host": "0.0.0.0", "allowed_hosts": ["seedcache.internal", "10.0.0.7", "FD00::7"]}, True),
    ],
)
def test_names_are_checked_on_a_loopback_address_or_when_some_are_allowed(
    options: dict[str, object], checks: bool
) -> None:
    config = Config.build(**options)
    assert config.checks_hosts is checks
    assert all(name == name.lower() for name in config.allowed_hosts)


@pytest.mark.parametrize(
    ("spec", "kind", "directory", "resolved"),
    [
        (".seedcache", "disk", ".seedcache", "/root/.seedcache"),
        ("/abs/store", "disk", "/abs/store", "/abs/store"),
        ("files:tests/recordings", "files", "tests/recordings", "files:/root/tests/recordings"),
        ("files:/abs/rec", "files", "/abs/rec", "files:/abs/rec"),
        ("redis://h:6379/0", "redis", None, "redis://h:6379/0"),
        ("rediss://h/1", "redis", None, "rediss://h/1"),
        ("unix:///tmp/redis.sock", "redis", None, "unix:///tmp/redis.sock"),
    ],
)
def test_store_specs_are_read_one_way(
    spec: str, kind: str, directory: str | None, resolved: str
) -> None:
    parsed = StoreSpec.parse(spec)
    assert (parsed.kind, parsed.directory, str(parsed)) == (kind, directory, spec)
    assert parsed.resolved("/root") == resolved


@pytest.mark.parametrize(
    ("spec", "read_as"),
    [
        ("REDIS://h:6379/0", "redis://h:6379/0"),
        ("Rediss://h/1", "rediss://h/1"),
        ("UNIX:///tmp/redis.sock", "unix:///tmp/redis.sock"),
    ],
)
def test_url_schemes_are_case_insensitive(spec: str, read_as: str) -> None:
    parsed = StoreSpec.parse(spec)
    assert (parsed.kind, parsed.directory, str(parsed)) == ("redis", None, read_as)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("reddis://127.0.0.1:6379/0", "'reddis://127.0.0.1:6379/0' is not a store seedcache knows"),
        ("mysql://x", "'mysql://x' is not a store seedcache knows"),
        ("s3://bucket/recordings", "is not a store seedcache knows"),
        ("http://h/recordings", "is not a store seedcache knows"),
        ("redis://h:6379/abc", "the database 'abc' is not a number"),
        ("REDIS://h/-1", "the database '-1' is not a number"),
        ("redis://h:port/0", "'redis://h:port/0' is not a usable Redis URL"),
        ("redis:/h:6379/0", "is not a Redis URL: write redis://"),
        ("REDIS:/h:6379/0", "is not a Redis URL: write redis://"),
    ],
)
def test_a_store_that_looks_like_a_url_but_names_no_store_is_refused(
    spec: str, message: str
) -> None:
    # Never a directory named after the typo: every proxy would keep a private cache.
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        StoreSpec.parse(spec)
    if "seedcache knows" in message:
        assert "files:DIR, redis://host:port/db, rediss://" in str(refused.value)


@pytest.mark.parametrize(
    "spec",
    [
        "redis://:hunter2@h:6379/abc",
        "reddis://:hunter2@h/0",
        # A raw #, / or ? cuts the password short where a URL parser reads it.
        "redis://:hunt#er2/x@h:6379/0",
        "redis://:hunt?er2@h:6379/0",
        "redis://user:hunt/er2@h:6379/0",
    ],
)
def test_a_refused_redis_url_is_shown_without_its_password(spec: str) -> None:
    with pytest.raises(ConfigError) as refused:
        StoreSpec.parse(spec)
    assert "hunt" not in str(refused.value)
    if spec.startswith("redis:") and "#" in spec:
        assert "percent-encode" in str(refused.value)


@pytest.mark.parametrize(
    "spec", ["redis://:hunt#er2/x@h:6379/0", "redis://u:hunt/er2@h:6379/0", "redis://:pw@h/0?a=b"]
)
def test_a_redis_store_is_shown_without_anything_before_its_host(spec: str) -> None:
    shown = StoreSpec("redis", spec).shown
    assert shown.startswith("redis://h")
    assert "hunt" not in shown and "pw" not in shown and "?" not in shown


def test_the_default_audit_log_lives_in_a_disk_store_only() -> None:
    assert Config.build(store="/s").audit_log_path == "/s/audit.jsonl"
    assert Config.build(store="files:/s").audit_log_path is None
    assert Config.build(store="redis://h/0", audit_log="/a.jsonl").audit_log_path == "/a.jsonl"
