"""The admin endpoints under /_seedcache/ (DESIGN §11): health, stats, recordings, audit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from proxy.app import HANDLERS
from proxy.errors import StoreError
from tests.conftest import StartProxy, status
from tests.fake_upstream import FakeUpstream, chat_request, embedding_request


def test_recordings_lists_what_the_store_holds(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy()
    client = proxy.client()
    client.chat.completions.create(**chat_request(seed=1))
    list(client.chat.completions.create(**chat_request(seed=2), stream=True))
    client.embeddings.create(**embedding_request())

    listing = proxy.request("GET", "/_seedcache/recordings").json()
    assert listing["total"] == 3
    rows = {
        row["seed"]: row
        for row in listing["recordings"]
        if row["path"].endswith("/chat/completions")
    }
    assert set(rows) == {1, 2}
    assert rows[1]["samples"] == 1 and rows[1]["fingerprints"] == ["fp_fake0001"]
    assert rows[2]["streamed"] is True and rows[1]["streamed"] is False
    assert rows[1]["response_models"] == ["gpt-4o-mini-2024-07-18"]

    only = proxy.request("GET", "/_seedcache/recordings?model=text-embedding-3-small").json()
    assert [row["path"] for row in only["recordings"]] == ["/v1/embeddings"]
    assert proxy.request("GET", "/_seedcache/recordings?limit=1").json()["total"] == 3
    assert len(proxy.request("GET", "/_seedcache/recordings?limit=1").json()["recordings"]) == 1
    bad = proxy.request("GET", "/_seedcache/recordings?limit=many")
    assert bad.status == 400 and bad.json()["error"]["param"] == "limit"
    # Only the newest `limit` are kept while the store is read: the head of the whole list.
    newest = [row["key"] for row in listing["recordings"]]
    times = [row["newest_recorded_at"] for row in listing["recordings"]]
    assert times == sorted(times, reverse=True)
    for limit in (0, 1, 2, 5):
        head = proxy.request("GET", f"/_seedcache/recordings?limit={limit}").json()
        assert [row["key"] for row in head["recordings"]] == newest[:limit]
        assert head["total"] == 3


def test_recordings_lists_a_copied_file_by_its_name(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # Requests find a recording by its file name, so that is the key listed.
    directory = tmp_path / "rec"
    proxy = start_proxy(store=f"files:{directory}")
    proxy.request("POST", "/v1/chat/completions", chat_request(seed=1))
    (original,) = directory.glob("[0-9a-f]*.json")
    shutil.copy(original, directory / f"{'f' * 64}.json")

    listing = proxy.request("GET", "/_seedcache/recordings").json()

    assert sorted(row["key"] for row in listing["recordings"]) == sorted([original.stem, "f" * 64])


def test_audit_summarises_the_events_in_the_store(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="audit")
    client = proxy.client()
    body = chat_request()
    client.chat.completions.create(**body)  # new: recorded, no event
    client.chat.completions.create(**body)  # identical
    upstream.nondeterministic = True
    client.chat.completions.create(**body)  # content

    summary = proxy.request("GET", "/_seedcache/audit").json()
    assert summary["events"] == 2
    [group] = summary["groups"]
    assert (group["model"], group["fingerprint"]) == ("gpt-4o-mini", "fp_fake0001")
    assert (group["comparisons"], group["identical"], group["divergence_rate"]) == (2, 1, 0.5)
    assert group["verdicts"] == {"content": 1, "identical": 1}
    assert proxy.request("GET", "/_seedcache/audit?model=other").json()["events"] == 0
    assert proxy.request("GET", "/_seedcache/audit?since=1h").json()["events"] == 2
    bad = proxy.request("GET", "/_seedcache/audit?since=yesterday")
    assert bad.status == 400 and bad.json()["error"]["param"] == "since"
    assert "--since" not in bad.json()["error"]["message"]
    assert "?since=" in bad.json()["error"]["message"]
    assert proxy.stats()["divergences"] == 1
    assert summary["totals"] == {
        "comparisons": 2,
        "identical": 1,
        "same_output": 1,
        "divergences": 1,
        "divergence_rate": 0.5,
        "fingerprint_changes": 0,
        "model_changes": 0,
        "fingerprint_changed_divergences": 0,
        "divergence_rate_fingerprint_changed": None,
        "divergence_rate_same_fingerprint": 0.5,
    }


def test_audit_splits_the_divergences_by_fingerprint_change(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy(mode="audit")
    client = proxy.client()
    for seed in (1, 3):
        client.chat.completions.create(**chat_request(seed=seed))  # recorded at fp_fake0001
    upstream.fingerprint = "fp_fake0002"
    client.chat.completions.create(**chat_request(seed=2))  # recorded at fp_fake0002
    client.chat.completions.create(**chat_request(seed=3))  # changed, identical
    upstream.nondeterministic = True
    client.chat.completions.create(**chat_request(seed=1))  # changed, content
    client.chat.completions.create(**chat_request(seed=2))  # same, content

    summary = proxy.request("GET", "/_seedcache/audit").json()

    [group] = summary["groups"]
    assert group["fingerprint"] == "fp_fake0002"
    assert (group["comparisons"], group["divergences"], group["fingerprint_changes"]) == (3, 2, 2)
    assert group["fingerprint_changed_divergences"] == 1
    assert group["divergence_rate_fingerprint_changed"] == 0.5
    assert group["divergence_rate_same_fingerprint"] == 1.0
    assert summary["totals"]["divergence_rate_fingerprint_changed"] == 0.5
    assert summary["totals"]["divergence_rate_same_fingerprint"] == 1.0


def test_a_disk_store_removed_while_serving_is_created_again(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    # rm -rf .seedcache while serving: recording goes on into a new store at the same path,
    # instead of into the removed file (lost at the next start).
    proxy = start_proxy()
    client = proxy.client()
    client.chat.completions.create(**chat_request(seed=1))
    shutil.rmtree(tmp_path / "store")
    (tmp_path / "store").write_text("not a directory")
    health = proxy.request("GET", "/_seedcache/health")
    assert health.status == 503 and health.json()["status"] == "store_unavailable"
    assert "cannot be created again" in health.json()["error"]

    (tmp_path / "store").unlink()
    assert proxy.request("GET", "/_seedcache/health").json()["status"] == "ok"
    raw = client.chat.completions.with_raw_response.create(**chat_request(seed=2))
    assert status(raw) == "recorded"
    assert [r.body["seed"] for r in proxy.recordings()] == [2]


def test_a_mistyped_admin_request_is_answered_here_not_forwarded(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy()
    wrong = {
        ("POST", "/_seedcache/health"): 405,
        ("DELETE", "/_seedcache/recordings"): 405,
        ("POST", "/metrics"): 405,
        ("GET", "/_seedcache/stat"): 404,
        ("GET", "/_seedcache/"): 404,
        ("POST", "/_seedcache"): 404,
        ("GET", "/_seedcache/health/extra"): 404,
    }
    for (method, path), expected in wrong.items():
        result = proxy.request(method, path, b"{}")
        assert result.status == expected, (method, path)
        assert result.json()["error"]["message"].startswith(("seedcache has no", path))
        assert result.headers["x-seedcache-status"] == "error"
    assert proxy.request("POST", "/metrics").headers["allow"] == "GET, HEAD"
    assert proxy.request("HEAD", "/_seedcache/health").status == 200
    assert upstream.count() == 0  # the client's Authorization never went upstream


def test_the_proxys_own_error_answers_are_counted_by_code(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A store outage was seen on /metrics only as a drop in traffic, while every failed request
    # wrote its own ERROR line.
    store = tmp_path / "rec"
    recorder = start_proxy(store=f"files:{store}")
    recorder.request("POST", "/v1/chat/completions", chat_request())
    [key] = [r.key for r in recorder.recordings()]
    [path] = [p for p in store.rglob("*.json") if p.stem == key]
    data = json.loads(path.read_text())
    data["samples"][0]["headers"] = ["content-type"]  # a hand edit that breaks it
    path.write_text(json.dumps(data))
    proxy = start_proxy(store=f"files:{store}")

    unreadable = proxy.request("POST", "/v1/chat/completions", chat_request())
    bad = proxy.request("POST", "/v1/chat/completions", b"{not json")
    replay = {"X-Seedcache-Mode": "replay"}
    miss = proxy.request("POST", "/v1/chat/completions", chat_request(seed=9), replay)
    upstream.fail_next(500)
    failed = proxy.request("POST", "/v1/chat/completions", chat_request(seed=10))

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("the store went away")

    monkeypatch.setattr(proxy.running.app[HANDLERS].store, "get", unavailable)
    outage = [proxy.request("POST", "/v1/chat/completions", chat_request(seed=s)) for s in (1, 2)]

    assert (unreadable.status, bad.status, miss.status, failed.status) == (500, 400, 404, 500)
    assert [answer.status for answer in outage] == [503, 503]
    stats = proxy.stats()
    assert stats["errors"] == 4  # not the miss, nor the upstream's error
    assert (stats["misses"], stats["upstream_errors"]) == (1, 1)
    metrics = proxy.request("GET", "/metrics").body.decode()
    assert 'seedcache_errors_total{code="recording_unreadable"} 1.0' in metrics
    assert 'seedcache_errors_total{code="invalid_json"} 1.0' in metrics
    assert 'seedcache_errors_total{code="store_unavailable"} 2.0' in metrics
    store_lines = [r for r in caplog.records if "store failure" in r.getMessage()]
    assert len(store_lines) == 1  # one line in a while, however many requests fail
