"""The pytest plugin (entry point `pytest11`): one seedcache proxy for the test session.

The `seedcache` fixture starts it on a free loopback port and points `OPENAI_BASE_URL` at it. By
default it replays `files:tests/recordings` and fails closed: a request with no recording is an
explained error, never a call that spends money.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.config import Config, Mode, StoreSpec
from proxy.embedded import EmbeddedProxy
from proxy.errors import ConfigError, FormatError
from proxy.keys import NAMESPACE, NAMESPACE_RULE
from proxy.recording import Recording

# The plugin's own defaults, where they differ from `seedcache serve`'s (Config's).
DEFAULTS = {"mode": "replay", "store": "files:tests/recordings"}
# Settings taken from `--seedcache-NAME` or the ini's `seedcache_NAME`, passed on to Config.build.
SETTINGS = ("mode", "store", "upstream", "repeat", "on_fingerprint_change")
RECORD_HINT = "pytest --seedcache-mode auto"
PLACEHOLDER_KEY = "seedcache-placeholder-key"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("seedcache", "record and replay OpenAI calls with seedcache")
    group.addoption(
        "--seedcache-mode",
        help="replay (default: fail closed), auto (record misses), record, audit, passthrough.",
    )
    group.addoption(
        "--seedcache-store",
        help="Where recordings live (default files:tests/recordings, relative to the rootdir).",
    )
    group.addoption("--seedcache-upstream", help="The real API (default the OpenAI API).")
    group.addoption(
        "--seedcache-repeat",
        help="reuse (default: identical requests get the same sample) or sequence (the k-th "
        "identical request gets the k-th sample).",
    )
    group.addoption(
        "--seedcache-on-fingerprint-change",
        help="When the current system_fingerprint has no sample: keep (default: replay the "
        "newest, marked stale), refresh (record a new one), fail.",
    )
    group.addoption(
        "--seedcache-fail-on-miss",
        action="store_true",
        default=None,
        help="Fail the session when any request had no recording.",
    )
    parser.addini("seedcache_mode", "seedcache mode for the test session", default="")
    parser.addini("seedcache_store", "seedcache store for the test session", default="")
    parser.addini("seedcache_upstream", "seedcache upstream for the test session", default="")
    parser.addini("seedcache_repeat", "seedcache repeat (reuse, sequence)", default="")
    parser.addini(
        "seedcache_on_fingerprint_change",
        "seedcache on-fingerprint-change (keep, refresh, fail)",
        default="",
    )
    parser.addini("seedcache_fail_on_miss", "fail the session on misses", type="bool", default=None)


@dataclass
class _Plugin:
    """The plugin's state in one pytest process: its settings, and the proxy once started."""

    config: Config
    fail_on_miss: bool
    rootdir: str
    session: SeedcacheSession | None = None

    def missing_store(self) -> str | None:
        """Why replay cannot work: its store directory does not exist (recordings that were not
        committed, a mistyped store, another rootdir). None when there is nothing to say."""
        directory = StoreSpec.parse(self.config.store).directory
        if self.config.mode is not Mode.REPLAY or directory is None or os.path.isdir(directory):
            return None
        return (
            f"seedcache: no recordings to replay: {os.path.abspath(directory)} does not exist "
            f"(a relative store is taken from the rootdir, {self.rootdir}). Record them with "
            f"{RECORD_HINT} and commit them, or point --seedcache-store / seedcache_store at "
            "the recordings"
        )


_PLUGIN = pytest.StashKey[_Plugin]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "seedcache(namespace): record and replay this test's (or module's) calls in a namespace",
    )
    config.stash[_PLUGIN] = _settings(config)


def _setting(config: pytest.Config, name: str) -> Any:
    """A setting given on the command line or in the ini file; None if neither gives it."""
    value = config.getoption(f"--seedcache-{name.replace('_', '-')}")
    if value is None:
        value = config.getini(f"seedcache_{name}")
    # An ini key that is absent reads as its default: "" for text, None (or [] before pytest 9)
    # for the flag; an explicit `false` stays False.
    return None if value is None or value == "" or value == [] else value


def _settings(config: pytest.Config) -> _Plugin:
    """The session's settings, checked once: a mistyped one stops the run with a usage error
    instead of failing every test that asks for the proxy."""
    options = {name: _setting(config, name) for name in SETTINGS}
    options = {name: value or DEFAULTS.get(name) for name, value in options.items()}
    try:
        # Relative directories are taken from the rootdir, so `pytest` works from any folder.
        options["store"] = StoreSpec.parse(str(options["store"])).resolved(str(config.rootpath))
        built = Config.build(port=0, access_log=False, record_hint=RECORD_HINT, **options)
    except ConfigError as exc:
        raise pytest.UsageError(f"seedcache: {exc}") from None
    return _Plugin(built, bool(_setting(config, "fail_on_miss")), str(config.rootpath))


class SeedcacheSession:
    """The proxy of a test session, as the `seedcache` fixture hands it to tests."""

    def __init__(self, proxy: EmbeddedProxy) -> None:
        self.proxy = proxy

    @property
    def base_url(self) -> str:
        """The OPENAI_BASE_URL the tests use."""
        return self.proxy.base_url

    @property
    def mode(self) -> Mode:
        return self.proxy.config.mode

    def namespaced_url(self, namespace: str) -> str:
        """A base URL whose requests are recorded in `namespace`."""
        if not NAMESPACE.fullmatch(namespace):
            # A '/' would make it part of the request path: a different endpoint, not recorded.
            raise ConfigError(f"namespace {namespace!r} is not valid: use {NAMESPACE_RULE}")
        return f"{self.proxy.url}/_seedcache/ns/{namespace}/v1" if namespace else self.base_url

    def stats(self) -> dict[str, Any]:
        """Hits, misses, recorded, … so far."""
        result: dict[str, Any] = self.proxy.handlers.metrics.to_json()
        return result

    def unused(self) -> list[Recording]:
        """Recordings in the store that no request of this session replayed or recorded."""
        return self.scan_unused()[0]

    def scan_unused(self) -> tuple[list[Recording], list[str]]:
        """The recordings no request of this session used, and the keys of those that could
        not be read (a merge conflict in a committed file): one bad file hides no others."""
        used = self.proxy.handlers.used or set()

        async def scan() -> tuple[list[Recording], list[str]]:
            found, unreadable = [], []
            async for _, key, raw in self.proxy.handlers.store.scan():
                if key in used:
                    continue
                try:
                    found.append(Recording.loads(raw))
                except FormatError:
                    unreadable.append(key)
            return found, unreadable

        result: tuple[list[Recording], list[str]] = self.proxy.call(scan())
        return result


@pytest.fixture(scope="session")
def seedcache(request: pytest.FixtureRequest) -> Iterator[SeedcacheSession]:
    """One seedcache proxy for the session; OPENAI_BASE_URL points at it while tests run."""
    config = request.config
    plugin = config.stash[_PLUGIN]
    missing = plugin.missing_store()
    if missing:
        # Opening the store would create an empty directory, and every request would miss.
        pytest.fail(missing, pytrace=False)
    proxy = EmbeddedProxy(plugin.config).start()
    session = plugin.session = SeedcacheSession(proxy)
    saved = {name: os.environ.get(name) for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    os.environ["OPENAI_BASE_URL"] = session.base_url
    # The SDK refuses to start without a key; replays need none, so a placeholder will do.
    os.environ.setdefault("OPENAI_API_KEY", PLACEHOLDER_KEY)
    try:
        yield session
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _report(config, plugin, session)
        proxy.stop()


@pytest.fixture(autouse=True)
def _seedcache_namespace(request: pytest.FixtureRequest) -> Iterator[None]:
    """Apply `@pytest.mark.seedcache(namespace=...)` by pointing OPENAI_BASE_URL at it."""
    marker = request.node.get_closest_marker("seedcache")
    if marker is None:
        yield
        return
    namespace = str(marker.kwargs.get("namespace", marker.args[0] if marker.args else ""))
    if not NAMESPACE.fullmatch(namespace):
        # Checked before the test runs: a request would fail in the SDK, or worse, go elsewhere.
        pytest.fail(
            f"@pytest.mark.seedcache(namespace={namespace!r}): not a valid namespace; use "
            f"{NAMESPACE_RULE}",
            pytrace=False,
        )
    session: SeedcacheSession = request.getfixturevalue("seedcache")
    saved = os.environ.get("OPENAI_BASE_URL")
    os.environ["OPENAI_BASE_URL"] = session.namespaced_url(namespace)
    try:
        yield
    finally:
        os.environ["OPENAI_BASE_URL"] = saved or session.base_url


def _report(config: pytest.Config, plugin: _Plugin, session: SeedcacheSession) -> None:
    stats = session.stats()
    lines = [
        f"seedcache ({session.mode.value}): {stats['hits']} hits, {stats['misses']} misses, "
        f"{stats['recorded']} recorded, {stats['stale']} stale, "
        f"{stats['upstream_errors']} upstream errors"
    ]
    try:
        unused, unreadable = session.scan_unused()
    except Exception as exc:  # the summary must never hide the session's own result
        lines.append(f"seedcache: could not list unused recordings: {exc}")
        unused, unreadable = [], []
    if unused:
        lines.append(f"seedcache: {len(unused)} recording(s) no test used:")
        for recording in unused[:20]:
            lines.append(
                f"  {recording.key[:12]} {recording.method} {recording.path} "
                f"model={recording.model} namespace={recording.namespace or '-'}"
            )
        if len(unused) > 20:
            lines.append(f"  … and {len(unused) - 20} more")
    if unreadable:
        keys = ", ".join(key[:12] for key in sorted(unreadable)[:5])
        more = ", …" if len(unreadable) > 5 else ""
        store = StoreSpec.parse(session.proxy.config.store).shown
        lines.append(
            f"seedcache: {len(unreadable)} unreadable recording(s) skipped ({keys}{more}): fix "
            f"them, or delete them with seedcache rm --store {store} KEY"
        )
    config.stash.setdefault(_SUMMARY, []).extend(lines)
    if plugin.fail_on_miss and stats["misses"]:
        config.stash[_FAILED] = True


_SUMMARY = pytest.StashKey[list[str]]()
_FAILED = pytest.StashKey[bool]()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lines = config.stash.get(_SUMMARY, [])
    if not lines:
        return
    terminalreporter.section("seedcache")
    for line in lines:
        terminalreporter.write_line(line)
    if config.stash.get(_FAILED, False):
        terminalreporter.write_line(
            "seedcache: failing the session because requests had no recording "
            "(--seedcache-fail-on-miss)",
            red=True,
        )


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.stash.get(_FAILED, False) and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
