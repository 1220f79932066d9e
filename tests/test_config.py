"""Modes, aliases and validation of the configuration (DESIGN §2)."""

from __future__ import annotations

import pytest

from proxy.config import Config, Mode, OnFingerprintChange, Repeat
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
        ({"port": 70000}, "port"),
        ({"max_body": 0}, "max-body"),
        ({"on_fingerprint_change": "ignore"}, "keep, refresh, fail"),
        ({"repeat": "cycle"}, "reuse, sequence"),
        ({"bogus": 1}, "unknown option"),
        ({"upstream_api_key_env": "SEEDCACHE_TEST_UNSET_VARIABLE"}, "not set"),
    ],
)
def test_invalid_values_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.build(**options)
