"""`seedcache ls`, `show`, `rm`, `prune`, `export` and `import` over recordings made by a real
proxy in front of the fake upstream, on disk, files and Redis stores."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

import cli.recordings
from cli.main import main
from cli.recordings import merge, same_store
from proxy.recording import Recording
from proxy.stores.base import Store, Updater, open_store
from proxy.stores.disk import DiskStore
from tests.conftest import RunningProxy, StartProxy
from tests.fake_upstream import FakeUpstream, chat_request, legacy_request
from tests.redis_server import RedisServer

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def stored(spec: str) -> dict[str, tuple[str, bytes]]:
    """Every recording of a store: key → (namespace it is held under, bytes)."""

    async def scan() -> dict[str, tuple[str, bytes]]:
        store = open_store(spec)
        try:
            return {key: (namespace, raw) async for namespace, key, raw in store.scan()}
        finally:
            await store.close()

    return asyncio.run(scan())


def recordings(spec: str) -> dict[str, Recording]:
    return {key: Recording.loads(raw) for key, (_, raw) in stored(spec).items()}


def fingerprints(recording: Recording) -> list[str | None]:
    return [s.system_fingerprint for s in recording.samples]


@dataclass
class Recorded:
    """A disk store filled through a proxy; `keys` by name, `cutoff` between the two batches."""

    store: str
    keys: dict[str, str]
    cutoff: str
    proxy: RunningProxy

    def key(self, name: str) -> str:
        return self.keys[name]


def send(proxy: RunningProxy, body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    """One chat or legacy completion through the proxy (streamed when asked); its key."""
    client = proxy.client()
    api = client.completions if "prompt" in body else client.chat.completions
    raw: Any = api.with_raw_response.create(**body, extra_headers=headers or {})
    if body.get("stream"):
        for _ in raw.parse():  # a stream is recorded once it has been read to its end
            pass
    key: str = raw.headers["x-seedcache-key"]
    return key


@pytest.fixture
def recorded(start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path) -> Recorded:
    """Four recordings: `mini` has two samples (fp_old before the cutoff, fp_new after),
    `legacy` one before the cutoff, `stream` (gpt-4o, streamed) and `team` (namespace) after."""
    spec = str(tmp_path / "disk")
    proxy = start_proxy(store=spec)
    keys: dict[str, str] = {}
    upstream.fingerprint = "fp_old"
    keys["mini"] = send(proxy, chat_request(seed=1))
    keys["legacy"] = send(proxy, legacy_request(seed=3))
    time.sleep(0.02)  # recorded_at has millisecond precision
    cutoff = datetime.now(UTC).isoformat()
    time.sleep(0.02)
    upstream.fingerprint = "fp_new"
    assert send(proxy, chat_request(seed=1), {"X-Seedcache-Mode": "record"}) == keys["mini"]
    time.sleep(0.01)
    keys["stream"] = send(proxy, chat_request(seed=2, model="gpt-4o", stream=True))
    time.sleep(0.01)
    keys["team"] = send(proxy, chat_request(seed=4), {"X-Seedcache-Namespace": "team"})
    assert len(set(keys.values())) == 4
    return Recorded(spec, keys, cutoff, proxy)


def ls_json(spec: str, *filters: str) -> list[dict[str, Any]]:
    result = run("ls", "--store", spec, "--json", *filters)
    assert result.exit_code == 0, result.output
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def names(recorded: Recorded, rows: list[dict[str, Any]]) -> list[str]:
    by_key = {key: name for name, key in recorded.keys.items()}
    return [by_key[row["key"]] for row in rows]


def failed(result: Result, *fragments: str) -> None:
    """Exit 2 with a message, not a traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output


# -- ls -----------------------------------------------------------------------------------------


def test_ls_prints_one_line_per_recording_newest_first(recorded: Recorded) -> None:
    result = run("ls", "--store", recorded.store)

    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    assert header.split() == [
        "KEY", "PATH", "MODEL", "SEED", "SAMPLES", "FINGERPRINTS", "NEWEST", "NAMESPACE"
    ]  # fmt: skip
    assert [line[:12] for line in lines] == [
        recorded.key(name)[:12] for name in ("team", "stream", "mini", "legacy")
    ]
    team, stream, mini, legacy = (line.split() for line in lines)
    assert mini[1:6] == ["/v1/chat/completions", "gpt-4o-mini", "1", "2", "fp_old,fp_new"]
    assert mini[7] == "-"  # the default namespace
    assert stream[1:6] == ["/v1/chat/completions", "gpt-4o", "2", "1", "fp_new"]
    assert legacy[1:6] == ["/v1/completions", "gpt-3.5-turbo-instruct", "3", "1", "fp_old"]
    assert team[7] == "team"
    newest = recordings(recorded.store)[recorded.key("mini")].samples[-1].recorded_at
    assert mini[6] == newest


def test_ls_json_has_full_keys_and_every_field(recorded: Recorded) -> None:
    rows = ls_json(recorded.store)

    assert names(recorded, rows) == ["team", "stream", "mini", "legacy"]
    mini = rows[2]
    assert mini == {
        "key": recorded.key("mini"),
        "namespace": "",
        "method": "POST",
        "path": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "seed": 1,
        "samples": 2,
        "fingerprints": ["fp_old", "fp_new"],
        "response_models": ["gpt-4o-mini-2024-07-18"],
        "streamed": False,
        "newest_recorded_at": mini["newest_recorded_at"],
    }
    assert mini["newest_recorded_at"] > recorded.cutoff[:19]
    assert rows[1]["streamed"] is True
    assert rows[0]["namespace"] == "team"


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (["--model", "gpt-4o"], ["stream"]),
        (["--model", "gpt-4o-mini"], ["team", "mini"]),
        (["--model", "gpt-4o-2024-07-18"], ["stream"]),  # the model that answered
        (["--path", "/v1/completions"], ["legacy"]),
        (["--path", "completions"], ["legacy"]),  # without /v1, as a client may be configured
        (["--namespace", "team"], ["team"]),
        (["--namespace", ""], ["stream", "mini", "legacy"]),
        (["--fingerprint", "fp_old"], ["mini", "legacy"]),
        (["--since", "1h"], ["team", "stream", "mini", "legacy"]),
        (["--since", "2999-01-01"], []),
        (["--model", "gpt-4o-mini", "--namespace", "team"], ["team"]),
    ],
)
def test_ls_filters(recorded: Recorded, filters: list[str], expected: list[str]) -> None:
    assert names(recorded, ls_json(recorded.store, *filters)) == expected


def test_ls_since_a_moment_between_recordings(recorded: Recorded) -> None:
    rows = ls_json(recorded.store, "--since", recorded.cutoff)

    assert names(recorded, rows) == ["team", "stream", "mini"]


def test_ls_says_when_filters_match_nothing(recorded: Recorded) -> None:
    result = run("ls", "--store", recorded.store, "--model", "no-such-model")

    assert result.exit_code == 0, result.output
    assert (
        result.stdout.strip() == f"No recordings in {recorded.store} match the filters (4 in all)."
    )


def test_ls_rejects_a_bad_since(recorded: Recorded) -> None:
    result = run("ls", "--store", recorded.store, "--since", "yesterday")

    failed(result, "--since", "yesterday")


def test_ls_of_an_empty_store_is_friendly(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    asyncio.run(open_store(str(tmp_path / "disk")).close())  # a disk store, with nothing in it
    for spec in (str(tmp_path / "disk"), f"files:{tmp_path / 'files'}"):
        result = run("ls", "--store", spec)

        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"No recordings in {spec} yet.")
        assert "seedcache serve" in result.stdout
        assert ls_json(spec) == []


@pytest.mark.parametrize("command", [["ls"], ["ls", "--json"], ["prune", "--older-than", "1d"]])
def test_ls_and_prune_refuse_a_store_that_does_not_exist_and_create_none(
    command: list[str], tmp_path: Path
) -> None:
    for spec in (str(tmp_path / "none"), f"files:{tmp_path / 'nofiles'}"):
        result = run(command[0], "--store", spec, *command[1:])

        assert result.exit_code == 2, result.output
        assert result.stdout == ""
        assert f"there is no store at '{spec}': nothing has been recorded there" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("", "--store must not be empty"),
        ("files:", "--store files: needs a directory"),
        ("a-file", "a-file is a file, not a directory"),
        ("files:a-file", "a-file is a file, not a directory"),
        ("mysql://x", "'mysql://x' is not a store seedcache knows"),
        ("redis://127.0.0.1:1/abc", "the database 'abc' is not a number"),
    ],
    ids=["empty", "files-without-directory", "a-file", "files-a-file", "url", "redis-db"],
)
@pytest.mark.parametrize(
    "command",
    [["ls"], ["show", "abc"], ["prune", "--model", "gpt-4o"], ["audit"]],
    ids=lambda command: command[0],
)
def test_a_store_that_names_nothing_is_refused(
    command: list[str], spec: str, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a store\n")

    result = run(command[0], "--store", spec, *command[1:])

    failed(result, says)
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]
    assert (tmp_path / "a-file").read_text() == "not a store\n"


def test_ls_reads_the_store_from_the_environment(recorded: Recorded) -> None:
    result = CliRunner().invoke(main, ["ls", "--json"], env={"SEEDCACHE_STORE": recorded.store})

    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 4


# -- show ---------------------------------------------------------------------------------------


def test_show_prints_the_recording_as_pretty_json(recorded: Recorded) -> None:
    key = recorded.key("mini")

    result = run("show", "--store", recorded.store, key[:8])

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith('{\n  "format": "seedcache.recording/1",\n')
    assert Recording.loads(result.stdout) == recordings(recorded.store)[key]
    assert result.stdout == recordings(recorded.store)[key].dumps(pretty=True).decode()


def test_show_writes_what_the_output_cannot_encode_as_escapes(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    # Windows writes a redirected output (a CI log) in its ANSI code page, cp1252: no ✈ there.
    store = str(tmp_path / "disk")
    content = "Plan a trip ✈ to Kraków"
    key = send(
        start_proxy(store=store), chat_request(messages=[{"role": "user", "content": content}])
    )

    shown = subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", "show", "--store", store, key],
        env={**os.environ, "PYTHONIOENCODING": "cp1252"},
        capture_output=True,
        timeout=60,
    )

    assert shown.returncode == 0, shown.stderr.decode("cp1252")
    assert '"content": "Plan a trip \\u2708 to Krak\xf3w"'.encode("latin-1") in shown.stdout


def test_show_takes_a_full_key_in_any_case(recorded: Recorded) -> None:
    key = recorded.key("team")

    result = run("show", "--store", recorded.store, key.upper())

    assert result.exit_code == 0, result.output
    shown = Recording.loads(result.stdout)
    assert (shown.key, shown.namespace) == (key, "team")


def test_an_ambiguous_prefix_lists_the_candidates(
    recorded: Recorded, start_proxy: StartProxy
) -> None:
    # Record until two keys share their first digit (at most 17 keys by pigeonhole).
    keys = list(recorded.keys.values())
    seed = 100
    while len({key[0] for key in keys}) == len(keys):
        keys.append(send(recorded.proxy, chat_request(seed=seed)))
        seed += 1
    first = next(k[0] for k in keys if sum(other[0] == k[0] for other in keys) > 1)
    candidates = sorted(k for k in keys if k[0] == first)

    for command in ("show", "rm"):
        result = run(command, "--store", recorded.store, first)

        failed(result, f"key prefix {first!r} matches {len(candidates)} recordings", "more digits")
        assert [line.strip() for line in result.stderr.splitlines()[1:]] == candidates
    assert len(stored(recorded.store)) == len(keys)  # rm deleted nothing


@pytest.mark.parametrize("prefix", ["0123456789ab0123", "not-hex"])
def test_an_unknown_or_malformed_key_is_an_error(recorded: Recorded, prefix: str) -> None:
    for command in ("show", "rm"):
        result = run(command, "--store", recorded.store, prefix)

        failed(result, repr(prefix) if prefix == "not-hex" else "no recording")
    assert len(stored(recorded.store)) == 4


def test_show_in_a_store_that_does_not_exist(tmp_path: Path) -> None:
    result = run("show", "--store", str(tmp_path / "none"), "abc")

    failed(result, "there is no store at")
    assert not (tmp_path / "none").exists()


# -- rm -----------------------------------------------------------------------------------------


def test_rm_deletes_by_prefix_in_any_namespace(recorded: Recorded) -> None:
    mini, team = recorded.key("mini"), recorded.key("team")

    result = run("rm", "--store", recorded.store, mini[:10], team)

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"removed {mini[:12]} POST /v1/chat/completions gpt-4o-mini",
        f"removed {team[:12]} POST /v1/chat/completions gpt-4o-mini",
    ]
    assert set(stored(recorded.store)) == {recorded.key("legacy"), recorded.key("stream")}


def test_rm_in_a_namespaced_store(recorded: Recorded, tmp_path: Path) -> None:
    files = f"files:{tmp_path / 'files'}"
    assert run("export", "--store", recorded.store, files).exit_code == 0
    team = recorded.key("team")
    assert stored(files)[team][0] == "team"

    result = run("rm", "--store", files, team[:12])

    assert result.exit_code == 0, result.output
    assert team not in stored(files)
    assert not (tmp_path / "files" / "team" / f"{team}.json").exists()


def test_rm_resolves_every_key_before_deleting_any(recorded: Recorded) -> None:
    result = run("rm", "--store", recorded.store, recorded.key("mini"), "fffffffffff0000")

    failed(result, "no recording")
    assert len(stored(recorded.store)) == 4


# -- prune --------------------------------------------------------------------------------------


def test_prune_needs_a_filter(recorded: Recorded) -> None:
    failed(run("prune", "--store", recorded.store), "prune needs a filter")


def test_prune_rejects_a_bad_duration(recorded: Recorded) -> None:
    failed(run("prune", "--store", recorded.store, "--older-than", "ages"), "--older-than")


def test_prune_dry_run_changes_nothing(recorded: Recorded) -> None:
    before = stored(recorded.store)

    result = run("prune", "--store", recorded.store, "--older-than", recorded.cutoff, "--dry-run")

    assert result.exit_code == 0, result.output
    assert f"would drop 1 of 2 samples from {recorded.key('mini')[:12]}" in result.stdout
    assert f"would drop 1 of 1 samples from {recorded.key('legacy')[:12]}" in result.stdout
    assert "(no samples left: recording would be deleted)" in result.stdout
    assert "would drop 2 samples from 2 recordings and delete 1" in result.stdout
    assert "nothing changed" in result.stdout
    assert stored(recorded.store) == before


def test_prune_older_than_drops_old_samples_and_empty_recordings(recorded: Recorded) -> None:
    before = recordings(recorded.store)

    result = run("prune", "--store", recorded.store, "--older-than", recorded.cutoff)

    assert result.exit_code == 0, result.output
    assert "dropped 2 samples from 2 recordings; deleted 1" in result.stdout
    after = recordings(recorded.store)
    assert set(after) == set(recorded.keys.values()) - {recorded.key("legacy")}
    mini = recorded.key("mini")
    assert after[mini].samples == before[mini].samples[1:]
    for name in ("stream", "team"):
        assert after[recorded.key(name)] == before[recorded.key(name)]


def test_prune_a_duration_keeps_recent_samples(recorded: Recorded) -> None:
    before = stored(recorded.store)

    result = run("prune", "--store", recorded.store, "--older-than", "1h")

    assert result.exit_code == 0, result.output
    assert "dropped 0 samples from 0 recordings" in result.stdout
    assert stored(recorded.store) == before


def test_prune_by_fingerprint_then_replay_serves_what_is_left(
    recorded: Recorded, start_proxy: StartProxy
) -> None:
    result = run("prune", "--store", recorded.store, "--fingerprint", "fp_old")

    assert result.exit_code == 0, result.output
    after = recordings(recorded.store)
    assert recorded.key("legacy") not in after
    assert fingerprints(after[recorded.key("mini")]) == ["fp_new"]
    # The rewritten recording is one the proxy still replays.
    replay = start_proxy(store=recorded.store, mode="replay")
    answer = replay.client().chat.completions.create(**chat_request(seed=1))
    assert answer.system_fingerprint == "fp_new"


def test_prune_keeps_a_sample_recorded_as_it_deletes_the_recording(
    recorded: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The proxy records a sample of `legacy` right after prune has dropped its last one: that
    # sample is kept, in the recording made again (prune used to delete the recording after).
    def open_and_record_after_update(spec: str) -> Store:
        store = open_store(spec)
        update = store.update

        async def update_then_record(namespace: str, key: str, fn: Updater) -> bytes | None:
            stored = await update(namespace, key, fn)
            if key == recorded.key("legacy"):
                send(recorded.proxy, legacy_request(seed=3), {"X-Seedcache-Mode": "record"})
            return stored

        monkeypatch.setattr(store, "update", update_then_record)
        return store

    monkeypatch.setattr(cli.recordings, "open_store", open_and_record_after_update)

    result = run("prune", "--store", recorded.store, "--older-than", recorded.cutoff)

    assert result.exit_code == 0, result.output
    assert "dropped 2 samples from 2 recordings; deleted 1" in result.stdout
    legacy = recordings(recorded.store)[recorded.key("legacy")]
    cutoff = datetime.fromisoformat(recorded.cutoff)
    assert [datetime.fromisoformat(s.recorded_at) > cutoff for s in legacy.samples] == [True]


def test_prune_by_model(recorded: Recorded) -> None:
    result = run("prune", "--store", recorded.store, "--model", "gpt-4o")

    assert result.exit_code == 0, result.output
    assert "(no samples left: recording deleted)" in result.stdout
    assert set(stored(recorded.store)) == set(recorded.keys.values()) - {recorded.key("stream")}


def test_prune_filters_combine(recorded: Recorded) -> None:
    result = run(
        "prune", "--store", recorded.store, "--model", "gpt-4o-mini", "--fingerprint", "fp_old"
    )

    assert result.exit_code == 0, result.output
    after = recordings(recorded.store)
    assert len(after) == 4  # legacy has fp_old but another model
    assert fingerprints(after[recorded.key("mini")]) == ["fp_new"]
    assert fingerprints(after[recorded.key("legacy")]) == ["fp_old"]


# -- export / import ----------------------------------------------------------------------------


def test_export_to_files_then_import_into_redis_and_back(
    recorded: Recorded, tmp_path: Path, redis_url: str
) -> None:
    original = recordings(recorded.store)
    files_dir = tmp_path / "files"
    files = f"files:{files_dir}"

    exported = run("export", "--store", recorded.store, files)

    assert exported.exit_code == 0, exported.output
    assert exported.stdout.strip() == (
        f"exported 4 recordings (4 new, 0 merged) from {recorded.store} to {files}"
    )
    # One pretty JSON file per key; the namespaced one in its namespace's folder.
    team = recorded.key("team")
    expected = {
        (files_dir / ("team" if key == team else "") / f"{key}.json"): recording
        for key, recording in original.items()
    }
    written = {p for p in files_dir.rglob("*.json") if not p.name.startswith(".")}
    assert written == set(expected)
    for path, recording in expected.items():
        assert path.read_bytes() == recording.dumps(pretty=True)

    imported = run("import", "--store", redis_url, files)

    assert imported.exit_code == 0, imported.output
    assert "imported 4 recordings (4 new, 0 merged)" in imported.stdout
    assert [(row["key"], row["namespace"]) for row in ls_json(redis_url)] == [
        (row["key"], row["namespace"]) for row in ls_json(recorded.store)
    ]
    assert stored(redis_url)[team][0] == "team"
    assert stored(redis_url)[team][1] == original[team].dumps()  # compact: Redis is not pretty

    back = str(tmp_path / "back")
    round_trip = run("export", "--store", redis_url, back)

    assert round_trip.exit_code == 0, round_trip.output
    assert recordings(back) == original


def test_import_merges_samples_from_both_sides(recorded: Recorded, tmp_path: Path) -> None:
    original = recordings(recorded.store)
    mini = recorded.key("mini")
    other = f"files:{tmp_path / 'other'}"
    assert run("export", "--store", recorded.store, other).exit_code == 0
    # Each side keeps one of mini's two samples; legacy (fp_old) is left only in `other`.
    assert run("prune", "--store", other, "--fingerprint", "fp_new").exit_code == 0
    assert run("prune", "--store", recorded.store, "--fingerprint", "fp_old").exit_code == 0
    assert fingerprints(recordings(other)[mini]) == ["fp_old"]
    assert fingerprints(recordings(recorded.store)[mini]) == ["fp_new"]

    result = run("import", "--store", recorded.store, other)

    assert result.exit_code == 0, result.output
    assert "imported 2 recordings (1 new, 1 merged)" in result.stdout
    assert recordings(recorded.store) == original  # oldest sample first again

    before = stored(recorded.store)
    again = run("import", "--store", recorded.store, other)

    assert again.exit_code == 0, again.output
    assert "imported 2 recordings (0 new, 2 merged)" in again.stdout
    assert stored(recorded.store) == before  # merging what is already there changes nothing


def test_merge_keeps_the_newest_sample_last(recorded: Recorded) -> None:
    mini = recordings(recorded.store)[recorded.key("mini")]
    old, new = mini.samples
    only_new = Recording(mini.key, mini.method, mini.path, mini.body, samples=(new,))
    only_old = Recording(mini.key, mini.method, mini.path, mini.body, samples=(old,))

    assert merge(only_new, only_old).samples == (old, new)
    assert merge(mini, only_old).samples == (old, new)  # with_sample alone would move `old` last


def test_import_keeps_every_sample_of_a_sequence_in_its_place(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # A --repeat sequence run that got the same answer twice holds it twice: the second
    # identical request replays the second sample.
    spec = str(tmp_path / "disk")
    asked = chat_request(seed=None, temperature=1)
    recorder = start_proxy(repeat="sequence", store=spec)
    client = recorder.client()
    recorded = [client.chat.completions.create(**asked).id for _ in range(2)]
    recorder.stop()
    copy = f"files:{tmp_path / 'teammate'}"
    assert run("export", "--store", spec, copy).exit_code == 0
    before = stored(spec)

    # A teammate's copy merged back, as after pulling their branch.
    result = run("import", "--store", spec, copy)

    assert result.exit_code == 0, result.output
    assert "imported 1 recording (0 new, 1 merged)" in result.stdout
    assert stored(spec) == before
    replayer = start_proxy(repeat="sequence", store=spec, mode="replay")
    client = replayer.client()
    assert [client.chat.completions.create(**asked).id for _ in range(2)] == recorded


def test_export_draws_no_progress_bar_or_label_off_a_terminal(
    recorded: Recorded, tmp_path: Path
) -> None:
    result = run("export", "--store", recorded.store, str(tmp_path / "copy"))

    assert result.exit_code == 0, result.output
    assert "exported 4 recordings" in result.stdout
    assert result.stderr == ""  # no bar, and no bare "exporting" among the messages


def test_export_of_one_recording_says_it_in_the_singular(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    spec = str(tmp_path / "one")
    proxy = start_proxy(store=spec)
    send(proxy, chat_request(seed=1))
    proxy.stop()
    copy = str(tmp_path / "copy")

    result = run("export", "--store", spec, copy)

    assert result.exit_code == 0, result.output
    assert result.stdout == f"exported 1 recording (1 new, 0 merged) from {spec} to {copy}\n"


@pytest.mark.parametrize("command", ["export", "import"])
def test_a_store_is_not_copied_into_itself(
    command: str, recorded: Recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = stored(recorded.store)
    monkeypatch.chdir(tmp_path)
    # The same directory, written another way.
    other = os.path.join(".", "disk", "..", "disk")

    result = run(command, "--store", recorded.store, other)

    assert result.exit_code == 2, result.output
    assert "are the same store: nothing to copy" in result.stderr
    assert stored(recorded.store) == before


def test_same_store_compares_directories_and_redis_databases(tmp_path: Path) -> None:
    assert same_store(str(tmp_path / "a"), f"{tmp_path}/x/../a/")
    assert not same_store(str(tmp_path / "a"), str(tmp_path / "b"))
    assert same_store("redis://localhost:6379/0", "redis://127.0.0.1")
    assert not same_store("redis://localhost:6379/0", "redis://localhost:6379/1")
    assert not same_store("redis://host-a/0", "redis://host-b/0")
    # The database in ?db= (as redis-py reads it), and unix sockets.
    assert not same_store("redis://localhost?db=1", "redis://localhost?db=2")
    assert same_store("redis://localhost?db=2", "redis://localhost:6379/2")
    assert not same_store("unix:///tmp/r.sock?db=1", "unix:///tmp/r.sock?db=2")
    assert same_store("unix:///tmp/r.sock", "unix:///tmp/../tmp/r.sock?db=0")
    assert not same_store("redis://localhost?db=x", "redis://localhost?db=0")  # said on opening
    assert not same_store("redis://localhost?db=x", "redis://localhost?db=x")
    assert not same_store(f"files:{tmp_path}", "redis://localhost/0")


def test_import_from_a_missing_store_is_an_error(tmp_path: Path) -> None:
    result = run("import", "--store", str(tmp_path / "dest"), str(tmp_path / "typo"))

    failed(result, "there is no store at")
    assert list(tmp_path.iterdir()) == []


def test_a_redis_url_in_capitals_is_the_same_store(
    recorded: Recorded, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shouting = redis_url.replace("redis://", "REDIS://")

    imported = run("import", "--store", shouting, recorded.store)

    assert imported.exit_code == 0, imported.output
    assert not (tmp_path / "REDIS:").exists()  # not a directory named after the URL
    keys = sorted(recorded.keys.values())
    assert sorted(row["key"] for row in ls_json(redis_url)) == keys
    assert sorted(row["key"] for row in ls_json(shouting)) == keys


# -- unreachable stores -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["ls", "--store", UNREACHABLE_REDIS],
        ["show", "--store", UNREACHABLE_REDIS, "abc"],
        ["rm", "--store", UNREACHABLE_REDIS, "abc"],
        ["prune", "--store", UNREACHABLE_REDIS, "--model", "gpt-4o"],
        ["import", UNREACHABLE_REDIS],
        ["export", UNREACHABLE_REDIS],
    ],
)
def test_an_unreachable_store_is_a_clear_error(
    args: list[str], recorded: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEEDCACHE_STORE", recorded.store)  # the other side of export/import

    result = CliRunner().invoke(main, args)

    failed(result, "cannot reach Redis at redis://127.0.0.1:1/0")


# -- a directory holding the other kind of store -------------------------------------------------

EXAMPLE_RECORDINGS = (
    Path(__file__).resolve().parent.parent / "examples/trip_planner/tests/recordings"
)


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes, to show that nothing was written there."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def committed(tmp_path: Path) -> Path:
    """A copy of the example's committed files store: four recordings, one in a namespace."""
    directory = tmp_path / "recordings"
    shutil.copytree(EXAMPLE_RECORDINGS, directory)
    return directory


@pytest.mark.parametrize(
    "command",
    [
        ["ls"],
        ["show", "e254"],
        ["rm", "e254"],
        ["prune", "--model", "gpt-4o-mini"],
        ["audit"],
        ["verify", "--upstream", "http://127.0.0.1:1/v1"],
        ["export", "DEST"],
    ],
    ids=lambda command: command[0],
)
def test_a_files_store_given_as_a_directory_is_refused_and_left_untouched(
    command: list[str], committed: Path, tmp_path: Path
) -> None:
    before = tree(committed)
    args = [part.replace("DEST", str(tmp_path / "dest")) for part in command]

    result = run(args[0], "--store", str(committed), *args[1:])

    failed(result, f"{committed} holds recording files", f"use --store files:{committed}")
    assert tree(committed) == before  # no cache.db written into the recordings
    assert not (tmp_path / "dest").exists()


def test_import_from_a_files_store_given_as_a_directory_is_refused(
    committed: Path, tmp_path: Path
) -> None:
    before = tree(committed)

    result = run("import", "--store", str(tmp_path / "dest"), str(committed))

    failed(result, f"holds recording files (<key>.json): use files:{committed}")
    assert "--store" not in result.output  # SRC is an argument
    assert tree(committed) == before
    assert not (tmp_path / "dest").exists()


def test_export_to_a_files_store_given_as_a_directory_names_the_argument(
    recorded: Recorded, committed: Path
) -> None:
    before = tree(committed)

    result = run("export", "--store", recorded.store, str(committed))

    failed(result, f"holds recording files (<key>.json): use files:{committed}")
    assert "--store" not in result.output  # DEST is an argument
    assert tree(committed) == before


@pytest.mark.parametrize(
    ("dest", "says"),
    [("", "DEST must not be empty"), ("mysql://x", "DEST 'mysql://x' is not a store")],
)
def test_export_to_no_store_names_the_argument(recorded: Recorded, dest: str, says: str) -> None:
    failed(run("export", "--store", recorded.store, dest), says)


def test_recordings_only_in_a_namespace_folder_are_recognised(
    committed: Path, tmp_path: Path
) -> None:
    only_winter = tmp_path / "winter-only"
    shutil.copytree(committed / "winter", only_winter / "winter")

    failed(run("ls", "--store", str(only_winter)), f"use --store files:{only_winter}")
    assert [row["namespace"] for row in ls_json(f"files:{only_winter}")] == ["winter"]

    # Also once a database was made beside them (what opening it as a disk store used to do).
    asyncio.run(DiskStore(str(only_winter)).close())
    failed(run("ls", "--store", str(only_winter)), f"use --store files:{only_winter}")


def test_with_files_the_same_directory_lists_its_recordings(committed: Path) -> None:
    rows = ls_json(f"files:{committed}")

    assert len(rows) == 4
    assert any(row["key"].startswith("e254fd01bb08") for row in rows)


def test_a_disk_store_made_inside_a_files_store_is_pointed_out(committed: Path) -> None:
    async def open_as_disk() -> None:
        # What opening the directory without files: used to do: an empty database beside the files.
        await DiskStore(str(committed)).close()

    asyncio.run(open_as_disk())
    assert (committed / "cache.db").exists()

    result = run("ls", "--store", str(committed))

    failed(result, f"use --store files:{committed}", "move its cache.db files")
    assert len(ls_json(f"files:{committed}")) == 4  # the files store reads past them


def test_a_disk_store_given_as_files_is_refused(recorded: Recorded) -> None:
    before = tree(Path(recorded.store))

    result = run("ls", "--store", f"files:{recorded.store}")

    failed(result, f"{recorded.store} holds a disk store", f"use --store {recorded.store}")
    assert tree(Path(recorded.store)) == before


@pytest.mark.parametrize(
    ("command", "code", "says"),
    [
        (["ls"], 2, "there is no store at"),
        (["show", "abc"], 2, "there is no store at"),
        (["rm", "abc"], 2, "there is no store at"),
        (["prune", "--model", "gpt-4o"], 2, "there is no store at"),
        (["audit"], 2, "there is no store at"),
        (["verify", "--upstream", "http://127.0.0.1:1/v1"], 2, "there is no store at"),
        (["export", "DEST"], 2, "there is no store at"),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else None,
)
def test_reading_commands_create_no_store_in_an_empty_directory(
    command: list[str], code: int, says: str, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [part.replace("DEST", str(tmp_path / "dest")) for part in command]

    result = run(args[0], "--store", str(empty), *args[1:])

    assert result.exit_code == code, result.output
    assert says in result.output
    assert "Traceback" not in result.output
    assert list(empty.iterdir()) == []
    assert not (tmp_path / "dest").exists()


# -- an unreadable recording ---------------------------------------------------------------------

CONFLICTED = "e254fd01bb0895290ef36ab824df5930c3637e0bc4a3321e8bc867f1199c1513"


@pytest.fixture
def conflicted(committed: Path) -> Path:
    """The committed files store with one recording left in a merge conflict."""
    path = committed / f"{CONFLICTED}.json"
    text = path.read_text()
    path.write_text(f"<<<<<<< HEAD\n{text}=======\n{text}>>>>>>> branch\n")
    return path


def test_show_of_an_unreadable_recording_names_its_file_and_how_to_remove_it(
    conflicted: Path, committed: Path
) -> None:
    result = run("show", "--store", f"files:{committed}", "e254")

    failed(
        result,
        f"recording {CONFLICTED} ({conflicted}) cannot be read: stored recording is not valid JSON",
        f"(seedcache rm --store files:{committed} e254fd01bb08) to record it again",
    )


def test_show_of_an_unreadable_recording_in_a_disk_store_names_the_store(
    recorded: Recorded,
) -> None:
    mini = recorded.key("mini")

    async def spoil() -> None:
        store = DiskStore(recorded.store)
        try:
            await store.put("", mini, b"{ not json")
        finally:
            await store.close()

    asyncio.run(spoil())

    result = run("show", "--store", recorded.store, mini[:12])

    failed(result, f"recording {mini} (in {recorded.store}) cannot be read")


def test_rm_of_an_unreadable_recording_removes_it_without_a_warning(
    conflicted: Path, committed: Path
) -> None:
    result = run("rm", "--store", f"files:{committed}", "e254")

    assert result.exit_code == 0, result.output
    assert result.output == "removed e254fd01bb08 (unreadable)\n"  # no "skipping …" warning
    assert not conflicted.exists()
    assert len(ls_json(f"files:{committed}")) == 3


def test_a_recording_copied_under_another_name_is_listed_and_removed_by_its_file_name(
    committed: Path,
) -> None:
    # Requests find a recording by its file name: the copy is the one no request uses.
    original = committed / f"{CONFLICTED}.json"
    copy = committed / f"{'f' * 64}.json"
    shutil.copy(original, copy)
    spec = f"files:{committed}"
    files = sorted(path.stem for path in committed.rglob("[0-9a-f]*.json"))

    listed = run("ls", "--store", spec)
    keys = [row["key"] for row in ls_json(spec)]
    removed = run("rm", "--store", spec, "ffff")

    assert listed.exit_code == 0, listed.output
    assert listed.stdout.count("ffffffffffff") == 1
    assert listed.stdout.count(CONFLICTED[:12]) == 1
    assert listed.stderr == (
        f"seedcache: ffffffffffff holds a recording whose `key` member is {CONFLICTED[:12]} (a "
        "copy under another name?): requests find it as ffffffffffff, the key it is stored "
        "under, and so do these commands\n"
    )
    assert sorted(keys) == files
    assert removed.exit_code == 0, removed.output
    assert removed.stdout == "removed ffffffffffff POST /v1/chat/completions gpt-4o-mini\n"
    assert original.exists() and not copy.exists()


def test_no_command_prints_the_password_of_a_redis_store(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    # CLI output lands in CI logs: a Redis store is named without its credentials, as serve does.
    with redis.Redis(port=own_redis_server.port) as client:
        client.config_set("requirepass", "S3cr3t-pw")
    url = f"redis://:S3cr3t-pw@127.0.0.1:{own_redis_server.port}/3"
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    commands = [
        ("ls", "--store", url),
        ("show", "--store", url, "abcd"),
        ("rm", "--store", url, "abcd"),
        ("prune", "--store", url, "--older-than", "1d"),
        ("audit", "--store", url),
        ("export", "--store", url, str(tmp_path / "out")),
        ("import", "--store", url, f"files:{empty_dir}"),
    ]
    outputs = [run(*command).output for command in commands]

    assert all(output.strip() for output in outputs)
    leaked = [c[0] for c, output in zip(commands, outputs, strict=True) if "S3cr3t" in output]
    assert leaked == []


# What a client of a shared proxy (or a recording in a pull request) can make a model: clear the
# screen, retitle the terminal, overwrite the line, and an 8-bit CSI.
HOSTILE = "gpt\x1b[2J\x1b]0;owned\x07\rfake\x9b31m\u202e"
HOSTILE_SHOWN = "gpt\\x1b[2J\\x1b]0;owned\\x07\\rfake\\x9b31m\\u202e"


def test_text_a_client_chose_reaches_the_terminal_escaped(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    spec = str(tmp_path / "disk")
    key = send(start_proxy(store=spec), chat_request(model=HOSTILE))

    def on_a_terminal(*args: str) -> Result:
        # color=True: click strips nothing, as on a terminal (piped, it drops CSI sequences only).
        return CliRunner().invoke(main, [*args, "--store", spec], color=True)

    listed = on_a_terminal("ls")
    as_json = on_a_terminal("ls", "--json")
    shown = on_a_terminal("show", key[:12])
    pruned = on_a_terminal("prune", "--model", HOSTILE, "--dry-run")
    removed = on_a_terminal("rm", key[:12])

    for result in (listed, as_json, shown, pruned, removed):
        assert result.exit_code == 0, result.output
        assert not any(c in result.output for c in "\x1b\x07\r\x9b\u202e"), result.output
    [row] = listed.stdout.splitlines()[1:]
    assert row.split()[1:4] == ["/v1/chat/completions", HOSTILE_SHOWN, "123"]
    described = f"{key[:12]} POST /v1/chat/completions {HOSTILE_SHOWN}"
    assert f"would drop 1 of 1 samples from {described} (no samples left" in pruned.stdout
    assert removed.stdout == f"removed {described}\n"
    # JSON stays JSON, of the very same text.
    assert json.loads(as_json.stdout)[0]["model"] == HOSTILE
    assert json.loads(shown.stdout)["request"]["body"]["model"] == HOSTILE
