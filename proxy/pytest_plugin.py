"""The pytest plugin (entry point `pytest11`): one seedcache proxy for the test session.

The proxy runs on a free loopback port and `OPENAI_BASE_URL` points at it: from the start, before
conftest files and test modules are imported, when the project sets any seedcache setting; else
from when a test first asks for the `seedcache` fixture. By default it replays
`files:tests/recordings` and fails closed: a request with no recording is an explained error,
never a call that spends money. Under pytest-xdist each worker runs its own proxy and the
controller reports for all of them.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import pytest

from proxy.config import Config, Mode, OnFingerprintChange, StoreSpec
from proxy.embedded import EmbeddedProxy
from proxy.errors import ConfigError, FormatError, SeedcacheError, StoreError
from proxy.keys import NAMESPACE_RULE, namespace_problem
from proxy.recording import Recording, redact_path

# The plugin's own defaults, where they differ from `seedcache serve`'s (Config's).
DEFAULTS = {"mode": "replay", "store": "files:tests/recordings"}
# Settings taken from `--seedcache-NAME` or the ini's `seedcache_NAME`, passed on to Config.build.
# Any of them, or `fail_on_miss`, given: the project uses seedcache, so the proxy and environment
# are set up before anything is imported (a module-level `OpenAI()` reads them when created).
SETTINGS = ("mode", "store", "upstream", "repeat", "on_fingerprint_change")
# The variables the plugin sets, and restores when pytest is done.
ENV = ("OPENAI_BASE_URL", "OPENAI_API_KEY")
# The settings that the commands a miss advises (record, re-record) repeat when this run's command
# line gave them: a `pytest` without them would record elsewhere, or the wrong number of samples.
CARRIED = ("store", "repeat")
PLACEHOLDER_KEY = "seedcache-placeholder-key"
# The totals of the summary line (/_seedcache/stats names).
COUNTED = ("hits", "misses", "recorded", "stale", "upstream_errors")
# Options under which pytest runs no test (their `dest` names): --version, --markers,
# --fixtures, --fixtures-per-test, --collect-only, --setup-plan.
_NO_TESTS = (
    "version",
    "markers",
    "showfixtures",
    "show_fixtures_per_test",
    "collectonly",
    "setupplan",
)
# Unused recordings listed by name in the summary; the rest are counted.
LISTED = 20
# The pytest APIs the plugin uses (Config.args_source, stash, …): on an older pytest it stays
# out of the way of every project that does not use it, and says why to one that does.
SUPPORTED = int(pytest.__version__.split(".")[0]) >= 8
UNSUPPORTED = (
    f"seedcache: the pytest plugin needs pytest 8 or newer, and this is pytest "
    f"{pytest.__version__}; upgrade it (pip install 'pytest>=8')"
)


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
        help="Fail the session when any request had no recording, or one that cannot be read.",
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
    early: bool  # the project set a seedcache setting: the proxy starts with pytest
    session: SeedcacheSession | None = None
    fixture_used: bool = False
    # What each proxy did: this process's own, or on a pytest-xdist controller, its workers'.
    tallies: list[Tally] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)  # pytest-xdist workers that sent none
    summary: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # why the session fails: "because …"
    placeholder_key: bool = False  # OPENAI_API_KEY was not set: the plugin set a placeholder
    deselected: bool = False  # -k, -m, --deselect, --lf or another plugin left tests out

    def missing_store(self) -> str | None:
        """Why replay cannot work: its store directory does not exist (recordings that were not
        committed, a mistyped store, another rootdir). None when there is nothing to say."""
        directory = StoreSpec.parse(self.config.store).directory
        if self.config.mode is not Mode.REPLAY or directory is None or os.path.isdir(directory):
            return None
        return (
            f"seedcache: no recordings to replay: {os.path.abspath(directory)} does not exist "
            f"(a relative store is taken from the rootdir, {self.rootdir}). Record them with "
            f"{self.config.record_hint} and commit them, or point --seedcache-store / "
            "seedcache_store at the recordings"
        )


_PLUGIN = pytest.StashKey[_Plugin]()


class Tally(TypedDict):
    """What one proxy did in a session, in plain types: a pytest-xdist worker sends its tally
    to the controller, which prints one summary for all of them."""

    mode: str
    counts: dict[str, int]
    requests: int  # that reached the proxy, answered or refused
    fixture_used: bool
    early: bool
    # Recordings this proxy did not use: [key, method, path, model, namespace].
    unused: list[list[Any]]
    unreadable: list[str]
    # Recordings requests asked for that could not be read or replayed: they got no answer.
    asked_unreadable: list[str]
    # Unused recordings whose `key` member is not the key they are stored under (a file copied
    # under another name): [stored key, key member].
    misnamed: list[list[str]]
    error: str | None  # why the store could not be scanned for unused recordings
    damaged_meta: str | None  # the files store's meta file, when a merge left it unreadable
    # Namespaces written to that are folder names Windows refuses (con, aux, a trailing '.').
    unportable: list[str]
    # [namespace, folder]: a namespace written to, and a folder whose name differs only in case.
    clashing: list[list[str]]
    # [key, folder, `namespace` member] of recordings filed in another namespace's folder.
    misfiled: list[list[str]]
    store: str
    placeholder_key: bool
    # How this process's run left tests out (deselected them), or None.
    narrowed: str | None


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    # The earliest hook a plugin gets: the command line and ini file are read, and neither
    # conftest files nor test modules are imported yet.
    _setup(early_config)


def pytest_sessionstart(session: pytest.Session) -> None:
    # Conftest files are imported by now: one that set OPENAI_BASE_URL would send the clients
    # created from here on (test modules') past a proxy the project asked for.
    plugin = session.config.stash.get(_PLUGIN, None)
    if plugin is not None and plugin.session is not None:
        os.environ["OPENAI_BASE_URL"] = plugin.session.base_url


def pytest_deselected(items: Sequence[pytest.Item]) -> None:
    if items and (plugin := items[0].config.stash.get(_PLUGIN, None)) is not None:
        plugin.deselected = True


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "seedcache(namespace): record and replay this test's (or module's) calls in a namespace",
    )
    _setup(config)  # when the plugin was registered too late for the hook above


def _setup(config: pytest.Config) -> None:
    """Check the settings; if the project set any, start the proxy and set the environment."""
    if _PLUGIN in config.stash or getattr(config.known_args_namespace, "help", False):
        return
    if not SUPPORTED:
        if _opted_in(_given(config)):
            raise pytest.UsageError(UNSUPPORTED)
        return  # never stashed: every hook and fixture below does nothing
    if any(getattr(config.known_args_namespace, name, False) for name in _NO_TESTS):
        # Nothing will run (IDE test discovery, --fixtures): no proxy and no store to check,
        # but a client created while test modules are imported still needs a key offline.
        if _opted_in(_given(config)):
            _set_environment(config, None)
        return
    plugin = config.stash[_PLUGIN] = _settings(config)
    if not plugin.early:
        return  # seedcache is installed, not used (yet): no proxy, no change to the environment
    missing = plugin.missing_store()
    if missing:
        # Opening the store would create an empty directory, and every request would miss.
        raise pytest.UsageError(missing)
    try:
        _start(config, plugin)
    except (SeedcacheError, OSError) as exc:
        raise pytest.UsageError(_problem(exc)) from None


def _start(config: pytest.Config, plugin: _Plugin) -> SeedcacheSession:
    """Start the proxy and point the environment at it until pytest is done."""
    proxy = EmbeddedProxy(plugin.config).start()
    session = plugin.session = SeedcacheSession(proxy)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # set before configure, unlike config.workerinput
        # A pytest-xdist worker: the other workers record into the same store, and how many
        # identical requests their tests made is theirs to know.
        proxy.handlers.trim_sequences = False
    # Cleanups run even when pytest stops before its session (a usage error found later).
    config.add_cleanup(proxy.stop)
    # Set by the plugin: here, or by the pytest-xdist controller whose environment a worker has.
    plugin.placeholder_key = os.environ.get("OPENAI_API_KEY", PLACEHOLDER_KEY) == PLACEHOLDER_KEY
    _set_environment(config, session.base_url)
    return session


def _set_environment(config: pytest.Config, base_url: str | None) -> None:
    """Point OPENAI_BASE_URL at the proxy (when there is one) and set a placeholder key if none
    is set, until pytest is done."""
    saved = {name: os.environ.get(name) for name in ENV}
    if base_url is not None:
        os.environ["OPENAI_BASE_URL"] = base_url
    # The SDK refuses to start without a key; replays need none, so a placeholder will do.
    os.environ.setdefault("OPENAI_API_KEY", PLACEHOLDER_KEY)

    def restore() -> None:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    config.add_cleanup(restore)


def _option(config: pytest.Config, name: str) -> Any:
    """A setting given on the command line; None if it gives none."""
    dest = f"seedcache_{name}"
    # The command line as parsed before conftest files load: `getoption` reads it only from
    # pytest_configure on (and only it has the options of a plugin a conftest file registered).
    value = getattr(config.known_args_namespace, dest, None)
    return config.getoption(dest, None) if value is None else value


def _setting(config: pytest.Config, name: str) -> Any:
    """A setting given on the command line or in the ini file; None if neither gives it."""
    value = _option(config, name)
    if value is None:
        value = config.getini(f"seedcache_{name}")
    # An ini key that is absent reads as its default: "" for text, None (or [] before pytest 9)
    # for the flag; an explicit `false` stays False.
    return None if value is None or value == "" or value == [] else value


def _settings(config: pytest.Config) -> _Plugin:
    """The session's settings, checked once: a mistyped one stops the run with a usage error
    instead of failing every test that asks for the proxy."""
    given = _given(config)
    options = {name: given[name] or DEFAULTS.get(name) for name in SETTINGS}
    try:
        spec = StoreSpec.parse(str(options["store"]))
        if spec.directory == "":
            raise ConfigError("--seedcache-store files: needs a directory: files:tests/recordings")
        # Relative directories are taken from the rootdir, so `pytest` works from any folder.
        options["store"] = spec.resolved(str(config.rootpath))
        built = Config.build(
            port=0,
            access_log=False,
            record_hint=_command(config, "auto"),
            rerecord_hint=_command(config, "record"),
            rerecord_header="",
            **options,
        )
    except ConfigError as exc:
        raise pytest.UsageError(_problem(exc)) from None
    return _Plugin(built, bool(given["fail_on_miss"]), str(config.rootpath), _opted_in(given))


def _command(config: pytest.Config, mode: str) -> str:
    """The pytest command line that runs the suite in `mode` as this run was set up."""
    words = ["pytest", "--seedcache-mode", mode]
    for name in CARRIED:
        value = _option(config, name)
        if value is not None:
            words += [f"--seedcache-{name}", shlex.quote(str(value))]
    return " ".join(words)


def _given(config: pytest.Config) -> dict[str, Any]:
    """Every seedcache setting the command line or ini file gives (None for the others)."""
    return {name: _setting(config, name) for name in (*SETTINGS, "fail_on_miss")}


def _opted_in(given: dict[str, Any]) -> bool:
    """Any setting given: the project uses seedcache, so the proxy starts with pytest."""
    return any(value is not None for value in given.values())


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
        if problem := namespace_problem(namespace):
            # A '/' would make it part of the request path: a different endpoint, not recorded.
            raise ConfigError(problem)
        return f"{self.proxy.url}/_seedcache/ns/{namespace}/v1" if namespace else self.base_url

    def stats(self) -> dict[str, Any]:
        """Hits, misses, recorded, … so far."""
        result: dict[str, Any] = self.proxy.handlers.metrics.to_json()
        return result

    def unused(self) -> list[Recording]:
        """Recordings in the store that no request of this session replayed or recorded."""
        return self.scan_unused()[0]

    def damaged_meta(self) -> str | None:
        """The files store's meta file when it cannot be read (a merge conflict): the current
        fingerprints are unknown while it is. None when it reads, and for other stores."""
        from proxy.stores.files import FilesStore  # fcntl: the plugin loads where it is not

        store = self.proxy.handlers.store
        if not isinstance(store, FilesStore):
            return None  # not a committed file, so no merge meets it
        result: str | None = self.proxy.call(store.damaged_meta())
        return result

    def unportable_namespaces(self) -> tuple[list[str], list[list[str]]]:
        """The namespaces the files store wrote to that Windows refuses as folder names, and
        [namespace, folder] of those that differ from a folder there only in case."""
        from proxy.stores.files import FilesStore

        store = self.proxy.handlers.store
        if not isinstance(store, FilesStore):
            return [], []
        return store.unportable_namespaces(), store.case_clashes()

    def scan_unused(self) -> tuple[list[Recording], list[str], list[list[str]], list[list[str]]]:
        """The recordings no request of this session used, the keys of those that could not be
        read (a merge conflict in a committed file): one bad file hides no others, [stored
        key, `key` member] of those whose member disagrees, and [key, namespace stored under,
        `namespace` member] of those filed in another namespace (a folder of another case).

        Requests find a recording by the key it is stored under (a files store's file name), so
        each is returned under that key: a file copied under another name is the unused one,
        not the recording it was copied from."""
        from proxy.stores.files import FilesStore

        used = self.proxy.handlers.used or set()

        async def scan() -> tuple[list[Recording], list[str], list[list[str]], list[list[str]]]:
            found, unreadable, misnamed, misfiled = [], [], [], []
            # Only a files store files recordings by namespace (its folders); the others list
            # every recording under none.
            by_folder = isinstance(self.proxy.handlers.store, FilesStore)
            async for namespace, key, raw in self.proxy.handlers.store.scan():
                if key in used:
                    continue
                try:
                    recording = Recording.loads(raw)
                except FormatError:
                    unreadable.append(key)
                    continue
                if recording.key != key:
                    misnamed.append([key, recording.key])
                    recording = recording.stored_under(key)
                if by_folder and recording.namespace != namespace:
                    misfiled.append([key, namespace, recording.namespace])
                found.append(recording)
            return found, unreadable, misnamed, misfiled

        result: tuple[list[Recording], list[str], list[list[str]], list[list[str]]]
        result = self.proxy.call(scan())
        return result


@pytest.fixture(scope="session")
def seedcache(request: pytest.FixtureRequest) -> SeedcacheSession:
    """The session's seedcache proxy; OPENAI_BASE_URL points at it while tests run."""
    if not SUPPORTED:
        pytest.fail(UNSUPPORTED, pytrace=False)
    plugin = request.config.stash[_PLUGIN]
    plugin.fixture_used = True
    if plugin.session is not None:
        # A conftest file imported after the proxy started may have pointed it elsewhere: the
        # tests asked for the proxy, and a replay must never be a live call.
        os.environ["OPENAI_BASE_URL"] = plugin.session.base_url
        return plugin.session
    missing = plugin.missing_store()
    if missing:
        # Opening the store would create an empty directory, and every request would miss.
        pytest.fail(missing, pytrace=False)
    try:
        return _start(request.config, plugin)
    except (SeedcacheError, OSError) as exc:
        pytest.fail(_problem(exc), pytrace=False)


def _problem(exc: Exception) -> str:
    """A seedcache error as the plugin reports it: here the option is --seedcache-store."""
    return "seedcache: " + str(exc).replace("--store ", "--seedcache-store ")


@pytest.fixture(autouse=True)
def _seedcache_per_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Per test: `@pytest.mark.seedcache(namespace=...)` applies to every request the test makes
    (through clients created at import time too), and `--seedcache-repeat sequence` counts the
    test's identical requests from the first, whatever ran before."""
    marker = request.node.get_closest_marker("seedcache")
    namespace = None
    if marker is not None:
        namespace = str(marker.kwargs.get("namespace", marker.args[0] if marker.args else ""))
        if namespace_problem(namespace):
            # Checked before the test runs: a request would fail in the SDK, or go elsewhere.
            pytest.fail(
                f"@pytest.mark.seedcache(namespace={namespace!r}): not a valid namespace; use "
                f"{NAMESPACE_RULE}",
                pytrace=False,
            )
        request.getfixturevalue("seedcache")  # the proxy, started if it is not yet
    plugin = request.config.stash.get(_PLUGIN, None)
    if plugin is None or plugin.session is None:
        yield
        return
    handlers = plugin.session.proxy.handlers
    handlers.restart_sequences()
    if namespace is None:
        yield
        return
    # The proxy's namespace for requests that name none, while this test runs.
    handlers.namespace = namespace
    try:
        yield
    finally:
        handlers.namespace = plugin.config.namespace


def _narrowing(session: pytest.Session, plugin: _Plugin, exitstatus: int) -> str | None:
    """How this run left part of the suite out (what it did, said after "this run"), or None
    when it ran the whole suite: only such a run knows which recordings no test uses, and how
    many identical requests the tests sharing a recording make (--seedcache-repeat sequence)."""
    config = session.config
    invocation = config.invocation_params
    if plugin.deselected:
        return "deselected tests (-k, -m, --deselect, --lf)"
    if config.args_source is pytest.Config.ArgsSource.ARGS and not _whole_suite(config):
        return "was given test paths or node ids"
    if (
        config.args_source is pytest.Config.ArgsSource.INVOCATION_DIR
        and invocation.dir != config.rootpath
    ):
        # Started below the rootdir without paths: pytest collects that folder only.
        return f"collected the tests under {invocation.dir} only"
    # In the ini's addopts, --ignore shapes the suite; on the command line it leaves part out.
    if any(str(arg).split("=", 1)[0] in ("--ignore", "--ignore-glob") for arg in invocation.args):
        return "ignored test paths (--ignore)"
    if config.getoption("lf", False):  # files it skips whole are not reported as deselected
        return "ran the tests that failed last (--lf)"
    if session.shouldfail or session.shouldstop or exitstatus == pytest.ExitCode.INTERRUPTED:
        return "stopped before every test had run (-x, --maxfail, --sw, an interruption)"
    return None


def _whole_suite(config: pytest.Config) -> bool:
    """Whether the paths given on the command line are the suite's own: its `testpaths`, or the
    rootdir without them (`pytest tests/`, as a CI runs it)."""
    if any("::" in str(arg) for arg in config.args):
        return False
    base = config.invocation_params.dir
    given = {(base / str(arg)).resolve() for arg in config.args}
    suite = {(config.rootpath / path).resolve() for path in config.getini("testpaths")}
    return given == (suite or {config.rootpath.resolve()})


def _tally(plugin: _Plugin, narrowed: str | None) -> Tally | None:
    """What this process's proxy did; None if it did nothing for the tests (none was started,
    or it is a pytest-xdist controller's, which runs no tests)."""
    session = plugin.session
    if session is None or not (plugin.fixture_used or session.proxy.requests):
        return None
    stats = session.stats()
    tally = Tally(
        mode=session.mode.value,
        counts={name: int(stats[name]) for name in COUNTED},
        requests=session.proxy.requests,
        fixture_used=plugin.fixture_used,
        early=plugin.early,
        unused=[],
        unreadable=[],
        asked_unreadable=sorted(session.proxy.handlers.unreadable or ()),
        misnamed=[],
        error=None,
        damaged_meta=None,
        unportable=[],
        clashing=[],
        misfiled=[],
        store=StoreSpec.parse(session.proxy.config.store).shown,
        placeholder_key=plugin.placeholder_key,
        narrowed=narrowed,
    )
    tally["unportable"], tally["clashing"] = session.unportable_namespaces()
    with contextlib.suppress(StoreError):  # a store it cannot read fails requests, which say so
        tally["damaged_meta"] = session.damaged_meta()
    try:
        unused, tally["unreadable"], tally["misnamed"], tally["misfiled"] = session.scan_unused()
    except Exception as exc:  # the summary must never hide the session's own result
        tally["error"] = str(exc)
    else:
        tally["unused"] = [
            [r.key, r.method, redact_path(r.path), r.model, r.namespace] for r in unused
        ]
    return tally


def _summary(
    tallies: list[Tally], crashed: list[str], narrowed: str | None
) -> tuple[list[str], int, int]:
    """The summary's lines for the tallies of one or more proxies (and the pytest-xdist workers
    that crashed before sending theirs, and how the run left part of the suite out), their
    misses, and the recordings requests asked for that could not be read."""
    counts = {name: sum(tally["counts"][name] for tally in tallies) for name in COUNTED}
    workers = f" ({len(tallies)} workers)" if len(tallies) > 1 else ""
    lines = [
        f"seedcache ({tallies[0]['mode']}): {counts['hits']} hits, {counts['misses']} misses, "
        f"{counts['recorded']} recorded, {counts['stale']} stale, "
        f"{counts['upstream_errors']} upstream errors{workers}"
    ]
    if any(tally["fixture_used"] for tally in tallies) and not any(
        tally["requests"] for tally in tallies
    ):
        lines.append(
            "seedcache: tests used the seedcache fixture, but no request reached the proxy"
            + (
                ": do their clients set a base_url of their own?"
                if tallies[0]["early"]
                else ": a client created before the fixture ran (`client = OpenAI()` at import "
                "time) does not see OPENAI_BASE_URL and calls the API it was given. Set any "
                "seedcache_* ini setting (seedcache_mode = replay) to have the environment set "
                "before test modules are imported, or create clients inside functions"
            )
        )
    if any(tally["placeholder_key"] and tally["counts"]["upstream_errors"] for tally in tallies):
        lines.append(
            "seedcache: OPENAI_API_KEY is not set, so the requests that went upstream carried "
            f"the placeholder key {PLACEHOLDER_KEY!r}: if the upstream refused it (401), set "
            "OPENAI_API_KEY to record"
        )
    if crashed:
        lines.append(
            f"seedcache: worker(s) {', '.join(crashed)} crashed: their numbers are not counted, "
            "and the recordings no test used are not listed"
        )
    errors = sorted({tally["error"] for tally in tallies if tally["error"] is not None})
    lines += [f"seedcache: could not list unused recordings: {error}" for error in errors]
    # Workers share the store: a recording is unused only if no worker's proxy used it (and a
    # crashed worker's use is unknown).
    unused = [] if errors or crashed else tallies[0]["unused"]
    for tally in tallies[1:]:
        also = {entry[0] for entry in tally["unused"]}
        unused = [entry for entry in unused if entry[0] in also]
    if unused and narrowed is not None:
        # The recordings of the tests left out would be listed: only a run of every test knows.
        lines.append(
            "seedcache: recordings no test used are listed only on a run of the whole suite; "
            f"this run {narrowed}"
        )
    elif unused:
        lines.append(f"seedcache: {len(unused)} recording(s) no test used:")
        for key, method, path, model, namespace in unused[:LISTED]:
            lines.append(f"  {key[:12]} {method} {path} model={model} namespace={namespace or '-'}")
        if len(unused) > LISTED:
            lines.append(f"  … and {len(unused) - LISTED} more")
    misnamed = sorted({(pair[0], pair[1]) for tally in tallies for pair in tally["misnamed"]})
    if misnamed:
        pairs = _first_few([f"{stored[:12]} holds {member[:12]}" for stored, member in misnamed])
        lines.append(
            f"seedcache: {len(misnamed)} recording(s) stored under another key than their `key` "
            f"member ({pairs}): requests find a recording by the key it is stored under "
            f"(its file name), so that is the one listed; delete a stray copy with seedcache rm "
            f"--store {tallies[0]['store']} KEY"
        )
    # The store logs it once, at WARNING, which a passing pytest run does not show.
    damaged = sorted({tally["damaged_meta"] for tally in tallies if tally["damaged_meta"]})
    lines += [
        f"seedcache: {path} cannot be read (a merge conflict?): while it is damaged the current "
        "fingerprints are unknown, so recordings of any fingerprint replay as current "
        "(--seedcache-on-fingerprint-change fail refuses none) and the fingerprints seen live "
        "are not saved. Resolve it by taking either side of the conflict: git checkout "
        f"--theirs (or --ours) {path} during the merge, or by hand, keeping one side's lines"
        for path in damaged
    ]
    # Logged once, at WARNING, too: a passing run does not show it.
    unportable = sorted({name for tally in tallies for name in tally["unportable"]})
    if unportable:
        lines.append(
            f"seedcache: namespace(s) {', '.join(map(repr, unportable))} of the recordings are "
            "folder names Windows refuses (a device name such as con or aux, or a trailing "
            "'.'): a checkout there cannot create them; prefer other names"
        )
    clashing = sorted({(pair[0], pair[1]) for tally in tallies for pair in tally["clashing"]})
    if clashing:
        pairs = _first_few([f"{ns!r} and {other!r}" for ns, other in clashing])
        lines.append(
            f"seedcache: namespaces that differ only in letter case ({pairs}): on macOS and "
            "Windows they are one folder, so the recordings of one are written into the "
            "other's; prefer names that differ otherwise"
        )
    misfiled = sorted({tuple(row) for tally in tallies for row in tally["misfiled"]})
    if misfiled:
        listed = _first_few(
            [
                f"{key[:12]} of namespace {member!r} in {folder!r}"
                for key, folder, member in misfiled
            ]
        )
        lines.append(
            f"seedcache: {len(misfiled)} recording(s) in the folder of another namespace "
            f"({listed}), where their requests do not look for them: recorded on macOS or "
            "Windows, where folders whose names differ only in case are one; move each into "
            "its namespace's folder (git mv), and give namespaces names that differ otherwise"
        )
    store = tallies[0]["store"]
    asked = sorted({key for tally in tallies for key in tally["asked_unreadable"]})
    if asked:
        keys = _first_few([key[:12] for key in asked])
        lines.append(
            f"seedcache: {len(asked)} recording(s) that requests asked for could not be read, "
            f"so they got no recorded answer ({keys}): where a merge left conflict markers "
            "in one, take one side of the conflict (git checkout --theirs or --ours on its file, "
            f"KEY.json); else fix it, or delete it with seedcache rm --store {store} KEY and "
            "record it again"
        )
    # Those asked for are said above; another worker's proxy may not have used one either.
    unreadable = sorted({key for tally in tallies for key in tally["unreadable"]} - set(asked))
    if unreadable:
        keys = _first_few([key[:12] for key in unreadable])
        lines.append(
            f"seedcache: {len(unreadable)} unreadable recording(s) skipped ({keys}): fix "
            f"them, or delete them with seedcache rm --store {store} KEY"
        )
    return lines, counts["misses"], len(asked)


def _first_few(names: list[str], most: int = 5) -> str:
    """The first `most` of `names`, joined, with an ellipsis when there are more."""
    return ", ".join(names[:most]) + (", …" if len(names) > most else "")


def _failures(plugin: _Plugin, misses: int, unreadable: int) -> list[str]:
    """Why the session fails, though its tests may pass (each said after "because")."""
    failures = []
    if plugin.fail_on_miss and misses:
        failures.append("requests had no recording (--seedcache-fail-on-miss)")
    if plugin.fail_on_miss and unreadable:
        # Answered with an error, not a miss, but as unanswered from the recordings: code that
        # swallows API errors passes on it just the same.
        failures.append("requests found their recording unreadable (--seedcache-fail-on-miss)")
    if plugin.config.on_fingerprint_change is OnFingerprintChange.FAIL and any(
        tally["damaged_meta"] for tally in plugin.tallies
    ):
        # Unknown fingerprints match every sample: a strict CI would refuse no stale one.
        failures.append(
            "the current fingerprints are unknown while the meta file is damaged "
            "(--seedcache-on-fingerprint-change fail)"
        )
    return failures


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object | None) -> None:
    """pytest-xdist, on the controller: keep the tally of a worker that finished."""
    tally = getattr(node, "workeroutput", {}).get("seedcache")
    plugin = node.config.stash.get(_PLUGIN, None)
    if plugin is None:
        return
    if tally is not None:
        plugin.tallies.append(tally)
    elif error is not None:
        plugin.crashed.append(str(getattr(getattr(node, "gateway", None), "id", "?")))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    plugin = config.stash.get(_PLUGIN, None)
    if plugin is None or not plugin.summary:
        return
    terminalreporter.section("seedcache")
    for line in plugin.summary:
        terminalreporter.write_line(line)
    for reason in plugin.failures:
        terminalreporter.write_line(f"seedcache: failing the session because {reason}", red=True)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    plugin = session.config.stash.get(_PLUGIN, None)
    if plugin is None:
        return
    narrowed = _narrowing(session, plugin, exitstatus)
    if narrowed is not None and plugin.session is not None:
        # The tests left out may ask a recording for more samples than the tests that ran:
        # trimmed to the count of these, it would lose the samples those others replay.
        plugin.session.proxy.handlers.trim_sequences = False
    tally = _tally(plugin, narrowed)
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: the controller reports
        if tally is not None:
            workeroutput["seedcache"] = tally
        return
    if tally is not None:
        plugin.tallies.append(tally)
    if not plugin.tallies:
        return
    # Under pytest-xdist the workers collect, and deselect, the tests.
    narrowed = narrowed or next((t["narrowed"] for t in plugin.tallies if t["narrowed"]), None)
    plugin.summary, misses, unreadable = _summary(plugin.tallies, plugin.crashed, narrowed)
    plugin.failures = _failures(plugin, misses, unreadable)
    if plugin.failures and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
