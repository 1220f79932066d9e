"""`seedcache audit`, `verify` and `probe` through click's CliRunner, against the fake upstream and
stores recorded through a proxy; plus the report's charts and tables."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import orjson
import pytest
from click.testing import CliRunner, Result

from cli.main import main
from proxy import report
from proxy.audit import AuditLog, audit_event, summarise
from proxy.recording import Recording, Sample
from proxy.stores.disk import DiskStore
from tests.conftest import API_KEY, StartProxy
from tests.fake_upstream import (
    DEFAULT_FINGERPRINT,
    FakeUpstream,
    chat_request,
    completion,
    legacy_request,
    responses_request,
)
from tests.servers import free_port

CHAT = "/v1/chat/completions"
NOW = datetime.now(UTC)


def seedcache(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """Run the `seedcache` command in-process, with no SEEDCACHE_* settings from outside."""
    environment: dict[str, str | None] = {
        "OPENAI_API_KEY": API_KEY,
        "SEEDCACHE_UPSTREAM": None,
        "SEEDCACHE_STORE": None,
        **(env or {}),
    }
    return CliRunner().invoke(main, list(args), env=environment, catch_exceptions=False)


def verify(store: Path, upstream: str, *args: str) -> Result:
    """`seedcache verify` of `store` against the upstream at base URL `upstream`."""
    return seedcache("verify", "--store", str(store), "--upstream", upstream, *args)


def disk_events(store: Path) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        disk = DiskStore(str(store))
        try:
            return [orjson.loads(line) async for line in disk.events()]
        finally:
            await disk.close()

    return asyncio.run(read())


def disk_recordings(store: Path) -> dict[str, bytes]:
    async def read() -> dict[str, bytes]:
        disk = DiskStore(str(store))
        try:
            return {key: value async for _, key, value in disk.scan()}
        finally:
            await disk.close()

    return asyncio.run(read())


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- verify --------------------------------------------------------------------------------------

ENDPOINTS = 7  # recordings made by `recorded_store`


@pytest.fixture
def recorded_store(start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path) -> Path:
    """A disk store with one recording per recorded endpoint (and a streamed one), made through
    a proxy in auto mode; the proxy is stopped and the upstream's call list cleared."""
    store = tmp_path / "recorded"
    proxy = start_proxy(store=str(store))
    with proxy.client() as client:
        client.chat.completions.create(**chat_request())
        client.chat.completions.create(**chat_request(seed=7))
        client.completions.create(**legacy_request())
        client.embeddings.create(model="text-embedding-3-small", input="Vectors, please.")
        client.responses.create(**responses_request())
        client.models.list()
    # Raw HTTP reads the stream to its end, which comes after the sample is stored.
    streamed = chat_request(messages=[{"role": "user", "content": "Stream it."}], stream=True)
    assert proxy.request("POST", CHAT, streamed).status == 200
    proxy.stop()
    assert len(disk_recordings(store)) == ENDPOINTS
    upstream.reset()
    return store


def test_verify_against_an_unchanged_upstream_finds_everything_identical(
    recorded_store: Path, upstream: FakeUpstream
) -> None:
    before = disk_recordings(recorded_store)

    result = verify(recorded_store, upstream.base_url)

    assert result.exit_code == 0, result.output
    events = jsonl(recorded_store / "audit.jsonl")
    assert len(events) == ENDPOINTS
    assert {e["verdict"] for e in events} == {"identical"}
    assert sorted(e["key"] for e in events) == sorted(before)
    # Written concurrently: the log and the store may order them differently.
    assert sorted(disk_events(recorded_store), key=str) == sorted(events, key=str)
    assert disk_recordings(recorded_store) == before  # verify never modifies recordings
    assert f"{ENDPOINTS} identical, 0 diverged (0.0%), 0 failed" in result.stdout
    audit_log = recorded_store / "audit.jsonl"
    assert f"{ENDPOINTS} audit events appended to {audit_log} and the store" in result.stdout
    assert result.stderr == ""  # not on a terminal: no progress bar, and no bare label either
    assert "gpt-4o-mini" in result.stdout and DEFAULT_FINGERPRINT in result.stdout
    # Live calls, each the stored canonical request, marked so a seedcache upstream passes it on.
    assert upstream.count() == ENDPOINTS
    for call in upstream.calls:
        assert call.headers["x-seedcache-mode"] == "passthrough"
        assert call.headers["authorization"] == f"Bearer {API_KEY}"
        assert call.body is None or "stream" not in call.body


def test_verify_names_a_copied_files_store_recording_by_its_file_name(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    directory = tmp_path / "rec"
    start_proxy(store=f"files:{directory}").request("POST", CHAT, chat_request())
    (original,) = directory.glob("[0-9a-f]*.json")
    shutil.copy(original, directory / f"{'f' * 64}.json")

    result = verify(Path(f"files:{directory}"), upstream.base_url)

    assert result.exit_code == 0, result.output
    events = jsonl(directory / ".audit" / "events.jsonl")
    assert sorted(e["key"] for e in events) == sorted([original.stem, "f" * 64])


def test_verify_through_a_replaying_proxy_fails_instead_of_finding_replays_identical(
    recorded_store: Path, upstream: FakeUpstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    served = tmp_path / "served"
    shutil.copytree(recorded_store, served)
    proxy = start_proxy(mode="replay", store=str(served))  # ignores X-Seedcache-Mode: passthrough

    result = verify(recorded_store, proxy.base_url)

    assert result.exit_code == 1, result.output
    failures = [line for line in result.stderr.splitlines() if line.startswith("failed ")]
    assert len(failures) == ENDPOINTS
    for line in failures:
        assert line.endswith(
            "answered from a recording (X-Seedcache-Status: hit), not live: is "
            f"{proxy.base_url} a seedcache proxy in replay mode?"
        )
    assert f"verified 0 of {ENDPOINTS} recordings" in result.stdout
    assert f"{ENDPOINTS} failed" in result.stdout
    assert "audit events appended" not in result.stdout
    assert not (recorded_store / "audit.jsonl").exists()  # nothing written as identical
    assert disk_events(recorded_store) == []
    assert upstream.count() == 0


def test_verify_through_a_proxy_in_auto_mode_is_live(
    recorded_store: Path, upstream: FakeUpstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    served = tmp_path / "served"
    shutil.copytree(recorded_store, served)
    proxy = start_proxy(store=str(served))  # auto: passthrough requests go upstream

    result = verify(recorded_store, proxy.base_url)

    assert result.exit_code == 0, result.output
    assert f"{ENDPOINTS} identical, 0 diverged (0.0%), 0 failed" in result.stdout
    assert upstream.count() == ENDPOINTS


def test_verify_exits_1_when_the_divergence_rate_is_over_the_limit(
    recorded_store: Path, upstream: FakeUpstream
) -> None:
    upstream.nondeterministic = True
    args = ["verify", "--store", str(recorded_store), "--upstream", upstream.base_url]

    over = seedcache(*args, "--max-divergence", "0.1")

    assert over.exit_code == 1
    events = jsonl(recorded_store / "audit.jsonl")
    verdicts = {e["path"]: e["verdict"] for e in events}
    # Every generated output changes; the model list does not depend on the generation.
    assert verdicts == {
        "/v1/chat/completions": "content",
        "/v1/completions": "content",
        "/v1/embeddings": "content",
        "/v1/responses": "content",
        "/v1/models": "identical",
    }
    assert sum(e["verdict"] == "content" for e in events) == ENDPOINTS - 1
    assert "above --max-divergence 10.0%" in over.stderr

    # 6 of 7 diverged (85.7%): under a 0.9 limit that passes.
    under = seedcache(*args, "--max-divergence", "0.9")
    assert under.exit_code == 0, under.output


def test_verify_counts_a_change_of_usage_alone_as_no_divergence(
    recorded_store: Path, upstream: FakeUpstream
) -> None:
    upstream.usage_delta = 3  # chat completions: the same output, other token counts

    result = verify(recorded_store, upstream.base_url, "--max-divergence", "0")

    assert result.exit_code == 0, result.output
    verdicts = [e["verdict"] for e in jsonl(recorded_store / "audit.jsonl")]
    # Three chat recordings, one of them streamed without include_usage: no usage to compare.
    assert sorted(verdicts) == ["identical"] * 5 + ["usage_only"] * 2
    assert "5 identical, 2 usage only, 0 diverged (0.0%), 0 failed" in result.stdout


def test_verify_separates_a_fingerprint_change_from_a_divergence(
    recorded_store: Path, upstream: FakeUpstream
) -> None:
    upstream.fingerprint = "fp_fake0002"

    result = verify(recorded_store, upstream.base_url)

    assert result.exit_code == 0, result.output
    events = jsonl(recorded_store / "audit.jsonl")
    assert {e["verdict"] for e in events} == {"identical"}
    changed = [e for e in events if e["fingerprint_changed"]]
    # Chat (three recordings) and legacy completions carry a fingerprint; the rest none.
    assert len(changed) == 4
    assert {(e["recorded_fingerprint"], e["live_fingerprint"]) for e in changed} == {
        (DEFAULT_FINGERPRINT, "fp_fake0002")
    }


def test_verify_sample_model_and_audit_log_options(
    recorded_store: Path, upstream: FakeUpstream, tmp_path: Path
) -> None:
    log = tmp_path / "verify.jsonl"
    base = ["verify", "--store", str(recorded_store), "--upstream", upstream.base_url]

    sampled = seedcache(*base, "--sample", "2", "--audit-log", str(log), "--concurrency", "1")
    assert sampled.exit_code == 0, sampled.output
    assert len(jsonl(log)) == 2
    assert not (recorded_store / "audit.jsonl").exists()

    one_model = seedcache(*base, "--model", "text-embedding-3-small", "--audit-log", str(log))
    assert one_model.exit_code == 0, one_model.output
    assert [e["path"] for e in jsonl(log)[2:]] == ["/v1/embeddings"]


def test_verify_skips_recordings_it_cannot_reissue_with_a_count(
    recorded_store: Path, upstream: FakeUpstream
) -> None:
    foreign = Recording(
        key="f" * 64,
        method="POST",
        path="/v1/moderations",
        body={"input": "hello"},
        samples=(
            Sample("2026-11-01T00:00:00Z", "u", None, None, 200, {}, 1, body={"results": []}),
        ),
    )

    async def put() -> None:
        disk = DiskStore(str(recorded_store))
        try:
            await disk.put("", foreign.key, foreign.dumps())
            await disk.put("", "e" * 64, b"not a recording")
        finally:
            await disk.close()

    asyncio.run(put())

    result = verify(recorded_store, upstream.base_url)

    assert result.exit_code == 0, result.output
    assert "skipped 2 recordings (1 not a re-issuable endpoint, 1 unreadable)" in result.stdout
    assert len(jsonl(recorded_store / "audit.jsonl")) == ENDPOINTS
    assert not any(c.path.startswith("/v1/moderations") for c in upstream.calls)


def test_verify_skips_a_recording_whose_request_had_a_secret_redacted(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    store = tmp_path / "recorded"
    proxy = start_proxy(store=str(store))
    secret = "sk-" + "proj-" + "A1b2C3d4" * 6  # built here: no key-shaped string is committed
    prose = "Explain Bearer authentication in HTTP"  # looks like no key, and is not one
    with proxy.client() as client:
        client.chat.completions.create(
            **chat_request(messages=[{"role": "user", "content": prose}])
        )
        client.chat.completions.create(
            **chat_request(messages=[{"role": "user", "content": f"My key is {secret}"}])
        )
    proxy.stop()
    upstream.reset()

    result = verify(store, upstream.base_url)

    assert result.exit_code == 0, result.output
    assert "skipped 1 recording (1 a secret redacted from the request)" in result.stdout
    assert "verified 1 of 1 recording against" in result.stdout
    assert "1 audit event appended to" in result.stdout  # one, said in the singular
    # What was sent again is the prompt as recorded, not one with "<redacted>" in it.
    assert [c.body["messages"][0]["content"] for c in upstream.calls] == [prose]


def test_verify_reports_upstream_failures_and_exits_1(
    recorded_store: Path, upstream: FakeUpstream
) -> None:
    # 400 is not retried by the SDK: one failure per recording of that endpoint.
    upstream.fail_next(400, times=100, path="/v1/embeddings")

    result = verify(recorded_store, upstream.base_url)

    assert result.exit_code == 1
    assert "failed" in result.stderr and "/v1/embeddings" in result.stderr
    assert "upstream answered 400" in result.stderr
    assert f"verified {ENDPOINTS - 1} of {ENDPOINTS} recordings" in result.stdout
    assert "1 failed" in result.stdout


def test_verify_needs_an_api_key_for_openai(recorded_store: Path) -> None:
    result = seedcache("verify", "--store", str(recorded_store), env={"OPENAI_API_KEY": None})

    assert result.exit_code == 2
    assert "OPENAI_API_KEY" in result.output


def test_verify_without_an_api_key_says_it_sends_a_placeholder_to_a_local_server(
    recorded_store: Path, upstream: FakeUpstream
) -> None:
    result = seedcache(
        "verify",
        "--store",
        str(recorded_store),
        "--upstream",
        upstream.base_url,
        env={"OPENAI_API_KEY": None},
    )

    assert result.exit_code == 0, result.output
    assert result.stderr == (
        f"OPENAI_API_KEY is not set: sending {upstream.base_url} a placeholder key (local servers "
        "take any); set OPENAI_API_KEY if it answers 401.\n"
    )
    assert upstream.last.headers["authorization"] == "Bearer seedcache-no-key"


def test_verify_reads_the_upstream_from_the_environment(
    recorded_store: Path, upstream: FakeUpstream
) -> None:
    result = seedcache(
        "verify", "--store", str(recorded_store), env={"SEEDCACHE_UPSTREAM": upstream.base_url}
    )

    assert result.exit_code == 0, result.output
    assert upstream.count() == ENDPOINTS


def test_verify_with_an_empty_store_verifies_nothing_and_does_not_pass(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    asyncio.run(DiskStore(str(tmp_path / "empty")).close())  # a store, with nothing in it

    result = verify(tmp_path / "empty", upstream.base_url, "--max-divergence", "0")

    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"seedcache: no recordings to verify in {tmp_path / 'empty'}: nothing was verified\n"
    )
    assert upstream.count() == 0


@pytest.mark.parametrize("made", [False, True], ids=["missing", "empty-directory"])
def test_verify_refuses_a_store_that_does_not_exist_and_creates_none(
    made: bool, upstream: FakeUpstream, tmp_path: Path
) -> None:
    typo = tmp_path / "typo"
    if made:
        typo.mkdir()

    result = verify(typo, upstream.base_url)

    assert result.exit_code == 2, result.output
    assert f"there is no store at '{typo}'" in result.stderr
    assert list(tmp_path.iterdir()) == ([typo] if made else [])
    assert not made or list(typo.iterdir()) == []
    assert upstream.count() == 0


def test_verify_fails_when_the_model_filter_leaves_nothing(
    recorded_store: Path, upstream: FakeUpstream
) -> None:
    # A mistyped --model must not pass a drift gate that measured nothing.
    result = verify(
        recorded_store, upstream.base_url, "--model", "gpt-4o-mni", "--max-divergence", "0"
    )

    assert result.exit_code == 2, result.output
    assert f"no recordings of model gpt-4o-mni to verify in {recorded_store} (" in result.stderr
    assert "of other models): nothing was verified" in result.stderr
    assert upstream.count() == 0


def test_audit_summarises_what_verify_wrote_to_the_store(
    recorded_store: Path, upstream: FakeUpstream
) -> None:
    upstream.nondeterministic = True
    verify(recorded_store, upstream.base_url)

    result = seedcache("audit", "--store", str(recorded_store), "--json")

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["events"] == ENDPOINTS
    assert document["totals"]["comparisons"] == ENDPOINTS
    assert document["totals"]["divergences"] == ENDPOINTS - 1
    chat = [g for g in document["groups"] if g["model"] == "gpt-4o-mini"]
    # Chat (three) and responses (one, no fingerprint) recordings of gpt-4o-mini.
    assert sorted((g["fingerprint"] or "", g["comparisons"]) for g in chat) == [
        ("", 1),
        (DEFAULT_FINGERPRINT, 3),
    ]


# -- audit ---------------------------------------------------------------------------------------


def event(
    model: str,
    fingerprint: str | None,
    verdict: str,
    *,
    ago: timedelta,
    ratio: float | None = None,
    distance: float | None = None,
    changed: bool = False,
    texts: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """An audit event as the proxy writes it, with the fields the summary reads."""
    ts = (NOW - ago).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    result: dict[str, Any] = {
        "ts": ts,
        "key": hashlib.sha256(f"{model} {ts} {verdict}".encode()).hexdigest(),
        "path": CHAT,
        "model": model,
        "response_model": f"{model}-2024-07-18",
        "seed": 123,
        "namespace": "",
        "recorded_fingerprint": "fp_old" if changed else fingerprint,
        "live_fingerprint": fingerprint,
        "fingerprint_changed": changed,
        "verdict": verdict,
        "differences": [],
        "similarity": {
            "text_ratio": ratio,
            "ngram_cosine_distance": distance,
            "first_difference_at": None,
            "embedding_distance": None,
        },
    }
    if texts is not None:
        result["texts"] = {"recorded": texts[0], "live": texts[1]}
    return result


HOUR = timedelta(hours=1)
KNOWN = [
    event("gpt-4o-mini", "fp_a", "identical", ago=10 * HOUR, ratio=1.0, distance=0.0),
    event(
        "gpt-4o-mini",
        "fp_a",
        "content",
        ago=8 * HOUR,
        ratio=0.5,
        distance=0.3,
        texts=("Paris is the <b>capital</b>.", "Lyon & <script>alert('x')</script>"),
    ),
    event("gpt-4o-mini", "fp_a", "identical", ago=6 * HOUR, ratio=1.0, distance=0.0,
          changed=True),
    event(
        "gpt-4o-mini",
        "fp_b",
        "content",
        ago=4 * HOUR,
        ratio=0.2,
        distance=0.7,
        changed=True,
        texts=("Worst recorded text", "Worst live text"),
    ),
    event("text-embedding-3-small", None, "content", ago=2 * HOUR),
    event("gpt-4o", None, "identical", ago=1 * HOUR, ratio=1.0, distance=0.0),
]  # fmt: skip
OLD = event("gpt-4o-mini", "fp_a", "content", ago=timedelta(days=10), ratio=0.9, distance=0.05)


@pytest.fixture
def audit_log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    lines = [json.dumps(e) for e in [OLD, *KNOWN]]
    lines.insert(3, '{"torn line')  # a line cut short by a crash is skipped
    path.write_text("\n".join(lines) + "\n")
    return path


def test_audit_json_numbers_match_a_known_sequence(audit_log: Path) -> None:
    result = seedcache("audit", "--audit-log", str(audit_log), "--json", "--since", "1d")

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["events"] == len(KNOWN)
    groups = {(g["model"], g["fingerprint"]): g for g in document["groups"]}
    assert list(groups) == [
        ("gpt-4o", None),
        ("gpt-4o-mini", "fp_a"),
        ("gpt-4o-mini", "fp_b"),
        ("text-embedding-3-small", None),
    ]
    assert groups[("gpt-4o-mini", "fp_a")] == {
        "model": "gpt-4o-mini",
        "fingerprint": "fp_a",
        "comparisons": 3,
        "identical": 2,
        "same_output": 2,
        "divergences": 1,
        "divergence_rate": 0.3333,
        "mean_text_ratio": 0.8333,
        "mean_ngram_distance": 0.1,
        "mean_embedding_distance": None,
        "fingerprint_changes": 1,
        "model_changes": 0,
        "fingerprint_changed_divergences": 0,
        "divergence_rate_fingerprint_changed": 0.0,
        "divergence_rate_same_fingerprint": 0.5,
        "verdicts": {"content": 1, "identical": 2},
    }
    fp_b = groups[("gpt-4o-mini", "fp_b")]
    assert (fp_b["comparisons"], fp_b["divergence_rate"], fp_b["fingerprint_changes"]) == (1, 1, 1)
    assert (fp_b["mean_text_ratio"], fp_b["mean_ngram_distance"]) == (0.2, 0.7)
    embedding = groups[("text-embedding-3-small", None)]
    assert (embedding["divergence_rate"], embedding["mean_text_ratio"]) == (1, None)
    assert document["totals"] == {
        "comparisons": 6,
        "identical": 3,
        "same_output": 3,
        "divergences": 3,
        "divergence_rate": 0.5,
        "fingerprint_changes": 2,
        "model_changes": 0,
        "fingerprint_changed_divergences": 1,
        "divergence_rate_fingerprint_changed": 0.5,
        "divergence_rate_same_fingerprint": 0.5,
    }
    assert (embedding["divergence_rate_fingerprint_changed"], embedding["fingerprint_changes"]) == (
        None,
        0,
    )


def test_audit_counts_usage_only_as_the_same_output(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    events = [
        event("gpt-4o-mini", "fp_a", "identical", ago=HOUR, ratio=1.0, distance=0.0),
        event("gpt-4o-mini", "fp_a", "usage_only", ago=HOUR, ratio=1.0, distance=0.0),
        event("gpt-4o-mini", "fp_a", "usage_only", ago=HOUR, ratio=1.0, distance=0.0),
        event("gpt-4o-mini", "fp_a", "content", ago=HOUR, ratio=0.5, distance=0.3),
    ]
    log.write_text("".join(json.dumps(e) + "\n" for e in events))

    document = json.loads(seedcache("audit", "--audit-log", str(log), "--json").stdout)
    table = seedcache("audit", "--audit-log", str(log)).stdout
    page = report.html_page(events, summarise(events), source="log")

    [group] = document["groups"]
    assert (group["comparisons"], group["identical"], group["same_output"]) == (4, 1, 3)
    assert (group["divergences"], group["divergence_rate"]) == (1, 0.25)
    assert group["verdicts"] == {"content": 1, "identical": 1, "usage_only": 2}
    totals = document["totals"]
    assert (totals["identical"], totals["same_output"], totals["divergences"]) == (1, 3, 1)
    assert totals["divergence_rate"] == 0.25
    assert "4 events: 1 identical, 2 usage only, 1 diverged (25.0%)" in table
    assert table.splitlines()[1].split()[2:5] == ["4", "3", "25.0%"]
    assert "4 comparisons, 1 identical, 2 usage only, divergence rate 25.0%" in page
    assert "1/4 diverged" in report.rate_chart(events)
    assert [w["verdict"] for w in report.worst_divergences(events)] == ["content"]


def split_events(changed_verdict: str, same_verdict: str) -> list[dict[str, Any]]:
    """Four comparisons at one live fingerprint: two with the fingerprint changed, two not."""
    return [
        event("gpt-4o-mini", "fp_b", verdict, ago=HOUR, changed=changed)
        for verdict, changed in (
            (changed_verdict, True),
            (changed_verdict, True),
            (same_verdict, False),
            (same_verdict, False),
        )
    ]


def test_audit_tells_a_changed_backend_from_a_different_output(tmp_path: Path) -> None:
    outputs = {}
    for name, events in (
        ("backend changed", split_events("content", "identical")),
        ("same backend", split_events("identical", "content")),
    ):
        log = tmp_path / f"{name}.jsonl"
        log.write_text("".join(json.dumps(e) + "\n" for e in events))
        page = tmp_path / f"{name}.html"
        table = seedcache("audit", "--audit-log", str(log), "--html", str(page))
        document = json.loads(seedcache("audit", "--audit-log", str(log), "--json").stdout)
        outputs[name] = (document, table.stdout, page.read_text())

    changed_doc, changed_table, changed_page = outputs["backend changed"]
    same_doc, same_table, same_page = outputs["same backend"]
    [changed], [same] = changed_doc["groups"], same_doc["groups"]
    assert changed["divergence_rate"] == same["divergence_rate"] == 0.5
    assert (
        changed["fingerprint_changed_divergences"],
        same["fingerprint_changed_divergences"],
    ) == (
        2,
        0,
    )
    assert (
        changed["divergence_rate_fingerprint_changed"],
        changed["divergence_rate_same_fingerprint"],
    ) == (1.0, 0.0)
    assert (
        same["divergence_rate_fingerprint_changed"],
        same["divergence_rate_same_fingerprint"],
    ) == (0.0, 1.0)
    assert changed_doc["totals"]["divergence_rate_fingerprint_changed"] == 1.0
    assert same_doc["totals"]["divergence_rate_same_fingerprint"] == 1.0

    header, row = changed_table.splitlines()[:2]
    assert header.split()[-8:] == ["fp", "changes", "div", "fp", "changed", "div", "same", "fp"]
    assert row.split()[-3:] == ["2", "100.0%", "0.0%"]
    assert same_table.splitlines()[1].split()[-3:] == ["2", "0.0%", "100.0%"]
    assert "Fingerprint changed: 2 of 2 diverged (100.0%); same or unknown fingerprint: 0 of 2" in (
        changed_table
    )
    assert "<th>div fp changed</th><th>div same fp</th>" in changed_page
    assert "<td>100.0%</td><td>0.0%</td>" in changed_page
    assert "<td>0.0%</td><td>100.0%</td>" in same_page


def test_audit_since_filters_by_time(audit_log: Path) -> None:
    def count(*args: str) -> int:
        result = seedcache("audit", "--audit-log", str(audit_log), "--json", *args)
        assert result.exit_code == 0, result.output
        return int(json.loads(result.stdout)["events"])

    assert count() == len(KNOWN) + 1
    assert count("--since", "7d") == len(KNOWN)
    # Durations are from the moment the command runs, so the margins are wide (an hour).
    assert count("--since", "5h") == 3
    assert count("--since", "300m") == 3
    assert count("--since", (NOW - timedelta(days=30)).date().isoformat()) == len(KNOWN) + 1
    assert count("--since", (NOW - 7 * HOUR).isoformat()) == 4

    for nonsense in ("last tuesday", "99999999d", "1" + "0" * 30 + "s"):
        bad = seedcache("audit", "--audit-log", str(audit_log), "--since", nonsense)
        assert bad.exit_code == 2, bad.output
        assert "--since" in bad.output


def test_audit_counts_a_foreign_similarity_without_its_numbers(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    lines = [{**KNOWN[0], "similarity": [0.5]}, {**KNOWN[0], "similarity": "n/a"}, KNOWN[0]]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))

    for extra in ((), ("--json",), ("--html", str(tmp_path / "a.html"))):
        result = seedcache("audit", "--audit-log", str(log), *extra)
        assert result.exit_code == 0, result.output
    groups = json.loads(seedcache("audit", "--audit-log", str(log), "--json").stdout)["groups"]
    assert sum(group["comparisons"] for group in groups) == 3


def test_audit_model_filter(audit_log: Path) -> None:
    result = seedcache("audit", "--audit-log", str(audit_log), "--json", "--model", "gpt-4o")

    document = json.loads(result.stdout)
    assert [(g["model"], g["comparisons"]) for g in document["groups"]] == [("gpt-4o", 1)]


def test_audit_prints_a_table(audit_log: Path) -> None:
    result = seedcache("audit", "--audit-log", str(audit_log), "--since", "1d")

    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.split("\n\n")[0].splitlines()
    assert header.split()[:5] == ["model", "fingerprint", "comparisons", "same", "output"]
    [fp_a] = [row for row in rows if "fp_a" in row]
    assert fp_a.split()[:5] == ["gpt-4o-mini", "fp_a", "3", "2", "33.3%"]
    assert "6 events: 3 identical, 3 diverged (50.0%), 2 with a fingerprint change." in (
        result.stdout
    )


# A model a client chose, a fingerprint or an error an upstream sent: clear the screen, retitle
# the terminal, overwrite the line, an 8-bit CSI.
HOSTILE = "\x1b[2J\x1b]0;owned\x07\rfake\x9b31m"
HOSTILE_SHOWN = "\\x1b[2J\\x1b]0;owned\\x07\\rfake\\x9b31m"


def on_a_terminal(*args: str) -> Result:
    """`seedcache` as a terminal shows it: click strips nothing (piped, it drops CSI only)."""
    return CliRunner().invoke(
        main, list(args), env={"OPENAI_API_KEY": API_KEY, "SEEDCACHE_STORE": None}, color=True
    )


def assert_escaped(result: Result) -> None:
    assert not any(c in result.output for c in "\x1b\x07\r\x9b"), result.output


def test_audit_prints_models_and_fingerprints_escaped(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    hostile = event("gpt" + HOSTILE, "fp" + HOSTILE, "content", ago=HOUR, ratio=0.5)
    path.write_text(json.dumps(hostile) + "\n")

    result = on_a_terminal("audit", "--audit-log", str(path))

    assert result.exit_code == 0, result.output
    assert_escaped(result)
    row = result.stdout.splitlines()[1]
    assert row.split()[:3] == ["gpt" + HOSTILE_SHOWN, "fp" + HOSTILE_SHOWN, "1"]


def test_verify_prints_an_upstream_error_escaped(
    recorded_store: Path, upstream: FakeUpstream
) -> None:
    upstream.fail_next(400, {"error": {"message": "bad" + HOSTILE}}, times=100, path="/embeddings")

    result = on_a_terminal(
        "verify", "--store", str(recorded_store), "--upstream", upstream.base_url
    )

    assert result.exit_code == 1
    assert_escaped(result)
    assert "bad" + HOSTILE_SHOWN in result.stderr


def test_probe_prints_a_fingerprint_and_an_output_escaped(upstream: FakeUpstream) -> None:
    upstream.fingerprint = "fp" + HOSTILE

    result = on_a_terminal(
        "probe", "--model", "gpt-4o-mini", "--prompt", "Tell me a story.", "--upstream",
        upstream.base_url, "--runs", "1",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert_escaped(result)
    assert "fp" + HOSTILE_SHOWN in result.stdout


def test_audit_html_is_a_self_contained_page_with_charts_and_escaped_texts(
    audit_log: Path, tmp_path: Path
) -> None:
    page_file = tmp_path / "report.html"

    result = seedcache(
        "audit", "--audit-log", str(audit_log), "--since", "1d", "--html", str(page_file)
    )

    assert result.exit_code == 0, result.output
    page = page_file.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == 2  # divergence rate over time, distance histogram
    for svg in re.findall(r"<svg.*?</svg>", page, re.DOTALL):
        ElementTree.fromstring(svg)  # well-formed
    assert "<polyline" in page
    assert "per hour" in page  # the events span less than two days
    # Texts are escaped, and nothing is loaded from elsewhere.
    assert "Lyon &amp; &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "Paris is the &lt;b&gt;capital&lt;/b&gt;." in page
    assert "<script" not in page and "<b>" not in page
    for external in ("http://", "https://", "<link", "@import", "url(", "<img"):
        assert external not in page
    # The worst divergence (lowest text ratio) comes first.
    assert page.index("Worst recorded text") < page.index("Paris is the")


def test_audit_html_into_a_missing_directory_is_a_one_line_error(
    audit_log: Path, tmp_path: Path
) -> None:
    page_file = tmp_path / "no-such-directory" / "report.html"

    result = seedcache("audit", "--audit-log", str(audit_log), "--html", str(page_file))

    assert result.exit_code == 2
    assert result.stderr == (
        f"seedcache: cannot write the HTML report to {page_file}: No such file or directory\n"
    )
    assert not page_file.parent.exists()


def test_audit_of_an_empty_store_or_log_says_so(tmp_path: Path) -> None:
    store = tmp_path / "empty"
    asyncio.run(DiskStore(str(store)).close())  # a store, with nothing in it
    result = seedcache("audit", "--store", str(store))
    assert result.exit_code == 0
    assert "No audit events in" in result.stdout

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = seedcache("audit", "--audit-log", str(empty))
    assert result.exit_code == 0
    assert "No audit events" in result.stdout

    for source in (["--audit-log", str(empty)], ["--store", str(store)]):
        totals = json.loads(seedcache("audit", *source, "--json").stdout)["totals"]
        # No comparisons: no rate, not a 0.0 that a gate would read as "no drift".
        assert (totals["comparisons"], totals["divergence_rate"]) == (0, None)
        assert totals["divergence_rate_same_fingerprint"] is None


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_audit_refuses_a_store_that_does_not_exist_and_creates_none(
    as_json: bool, tmp_path: Path
) -> None:
    missing = tmp_path / "never-used"

    result = seedcache("audit", "--store", str(missing), *(["--json"] if as_json else []))

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr == (
        f"seedcache: there is no store at '{missing}': nothing has been recorded there\n"
    )
    assert not missing.exists()  # reading does not create a store


def test_audit_reads_the_store_events_by_default(tmp_path: Path, monkeypatch: Any) -> None:
    async def write() -> None:
        disk = DiskStore(str(tmp_path / ".seedcache"))
        try:
            for e in KNOWN:
                await AuditLog(None, disk).write(e)
        finally:
            await disk.close()

    asyncio.run(write())
    monkeypatch.chdir(tmp_path)

    result = seedcache("audit", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["groups"] == summarise(KNOWN)


def test_audit_after_an_audit_mode_proxy(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = start_proxy(mode="audit")
    with proxy.client() as client:
        client.chat.completions.create(**chat_request())
        client.chat.completions.create(**chat_request())
        upstream.nondeterministic = True
        client.chat.completions.create(**chat_request())
    proxy.stop()

    from_store = seedcache("audit", "--store", proxy.config.store, "--json")
    from_log = seedcache(
        "audit", "--audit-log", str(Path(proxy.config.store) / "audit.jsonl"), "--json"
    )

    [group] = json.loads(from_store.stdout)["groups"]
    assert (group["comparisons"], group["identical"], group["divergence_rate"]) == (2, 1, 0.5)
    assert json.loads(from_log.stdout)["groups"] == [group]


def test_audit_of_a_files_store_reads_the_events_kept_where_earlier_versions_wrote_them(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    store = tmp_path / "rec"
    proxy = start_proxy(mode="audit", store=f"files:{store}")
    with proxy.client() as client:
        client.chat.completions.create(**chat_request())
        client.chat.completions.create(**chat_request())
        # Earlier versions kept the log beside the recordings, where git took it in.
        (store / ".audit" / "events.jsonl").rename(store / ".audit.jsonl")
        upstream.nondeterministic = True
        client.chat.completions.create(**chat_request())
    proxy.stop()
    kept = (store / ".audit.jsonl").read_bytes()

    result = seedcache("audit", "--store", f"files:{store}", "--json")

    assert result.exit_code == 0, result.output
    [group] = json.loads(result.stdout)["groups"]
    assert (group["comparisons"], group["identical"], group["divergence_rate"]) == (2, 1, 0.5)
    assert [event["verdict"] for event in proxy.events()] == ["identical", "content"]
    assert (store / ".audit.jsonl").read_bytes() == kept  # read, not written to
    assert (store / ".audit" / ".gitignore").read_text() == "*\n"


# -- the report, directly ------------------------------------------------------------------------


def test_the_rate_chart_buckets_by_day_over_long_spans() -> None:
    spread = [
        event("gpt-4o-mini", "fp_a", verdict, ago=timedelta(days=days))
        for days, verdict in ((5, "content"), (5, "identical"), (3, "identical"), (1, "content"))
    ]

    chart = report.rate_chart(spread)

    assert "per day" in chart
    # Three days with events: 50%, 0% and 100%.
    assert len(re.findall(r"<circle ", chart)) == 3
    assert "1/2 diverged" in chart and "0/1 diverged" in chart and "1/1 diverged" in chart


def test_the_rate_chart_note_says_what_it_plots_divergences_not_usage_changes() -> None:
    hour = [
        event("gpt-4o-mini", "fp_a", verdict, ago=timedelta(minutes=minutes))
        for minutes, verdict in (
            (5, "identical"),
            (4, "usage_only"),
            (3, "content"),
            (2, "identical"),
        )
    ]

    chart = report.rate_chart(hour)

    assert "1/4 diverged" in chart  # usage_only is no divergence
    assert "Share of comparisons that diverged, per hour" in chart
    assert "not identical" not in chart


def test_the_histogram_counts_every_distance() -> None:
    events = [event("m", None, "content", ago=HOUR, distance=d) for d in (0.0, 0.01, 0.5, 1.0)]

    chart = report.distance_histogram(events)

    assert "4 comparisons of output texts" in chart
    assert "0.00–0.05: 2" in chart
    assert "0.50–0.55: 1" in chart
    assert "0.95–1.00: 1" in chart


def test_worst_divergences_are_the_lowest_text_ratios_up_to_ten() -> None:
    events = [event("m", None, "content", ago=HOUR, ratio=r / 20) for r in range(15)] + [
        event("m", None, "content", ago=HOUR),
        event("m", None, "identical", ago=HOUR, ratio=0),
    ]

    worst = report.worst_divergences(events)

    assert len(worst) == 10
    assert [w["similarity"]["text_ratio"] for w in worst] == [r / 20 for r in range(10)]


def test_the_text_table_aligns_columns() -> None:
    table = report.text_table(summarise(KNOWN))

    lines = table.splitlines()
    assert len(lines) == 5
    # Numbers are right-aligned under their heading.
    end = lines[0].index("comparisons") + len("comparisons")
    assert [line[end - 1] for line in lines[1:]] == ["1", "3", "1", "1"]
    assert {line[end] for line in lines[1:]} == {" "}
    assert "null" in table  # an unknown fingerprint is named, not left blank
    # fp_a: one fingerprint change, with no divergence; one of the other two diverged.
    assert lines[2].split()[-3:] == ["1", "0.0%", "50.0%"]
    assert lines[1].split()[-3:] == ["0", "-", "0.0%"]  # gpt-4o: no fingerprint change


def test_an_html_page_without_events_says_so() -> None:
    page = report.html_page([], [], source="nowhere")

    assert "No audit events" in page
    assert "<svg" not in page


def test_a_divergence_from_samples_reaches_the_page_escaped() -> None:
    # The event as the proxy writes it, from `completion()` bodies: the page shows its texts.
    recording = Recording("a" * 64, "POST", CHAT, chat_request())

    def sample(text: str) -> Sample:
        return Sample("2026-11-01T00:00:00Z", "u", "m", None, 200, {}, 1, body=completion(text))

    produced, _ = audit_event(recording, sample("x < y"), sample("x > y"))
    page = report.html_page([produced], summarise([produced]), source="s")

    assert "x &lt; y" in page and "x &gt; y" in page


# -- probe ---------------------------------------------------------------------------------------


def probe(upstream_url: str, *args: str) -> Result:
    return seedcache(
        "probe", "--model", "gpt-4o-mini", "--prompt", "Tell me a story.", "--upstream",
        upstream_url, *args,
    )  # fmt: skip


def test_probe_with_a_deterministic_upstream(upstream: FakeUpstream) -> None:
    result = probe(upstream.base_url, "--runs", "3", "--compare-unseeded", "--json")

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    seeded, unseeded = document["groups"]
    assert (seeded["group"], seeded["runs"], unseeded["group"]) == ("seeded", 3, "unseeded")
    assert seeded["distinct_outputs"] == 1
    assert seeded["mean_ngram_distance"] == 0.0
    assert seeded["mean_text_ratio"] == 1.0
    assert seeded["fingerprints"] == [DEFAULT_FINGERPRINT]
    # The fake derives its output from the request body alone: without a seed, three identical
    # requests are also identical; the seed only makes the two groups' bodies (and texts) differ.
    assert unseeded["distinct_outputs"] == 1
    assert unseeded["mean_ngram_distance"] == 0.0
    runs = document["runs"]
    assert [r["group"] for r in runs] == ["seeded"] * 3 + ["unseeded"] * 3
    assert runs[0]["text"] != runs[3]["text"]
    assert runs[0]["text"].startswith(runs[0]["opening"].removesuffix("…"))
    assert runs[0]["completion_tokens"] == len(runs[0]["text"].split())
    assert runs[0]["prompt_tokens"] > 0
    assert document["seed"] == 123 and document["temperature"] == 0.7
    # What reached the upstream: seeded then unseeded, the documented defaults, live.
    bodies = [call.body for call in upstream.calls]
    assert [b.get("seed") for b in bodies] == [123] * 3 + [None] * 3
    assert all("seed" not in b for b in bodies[3:])
    assert {(b["temperature"], b["max_tokens"]) for b in bodies} == {(0.7, 200)}
    assert bodies[0]["messages"] == [{"role": "user", "content": "Tell me a story."}]
    assert {c.headers["x-seedcache-mode"] for c in upstream.calls} == {"passthrough"}
    assert result.stderr == ""  # not on a terminal: no progress bar, and no bare label either


def test_probe_of_a_reasoning_model_sends_max_completion_tokens_and_no_temperature(
    upstream: FakeUpstream,
) -> None:
    # o-series models refuse max_tokens and any temperature but the default.
    result = seedcache(
        "probe", "--model", "o3-mini", "--prompt", "Name a colour.", "--runs", "2", "--json",
        "--max-completion-tokens", "500", "--no-temperature", "--upstream", upstream.base_url,
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    bodies = [call.body for call in upstream.calls]
    assert len(bodies) == 2
    for body in bodies:
        assert body["max_completion_tokens"] == 500
        assert "max_tokens" not in body and "temperature" not in body
    document = json.loads(result.stdout)
    assert (document["temperature"], document["max_tokens"]) == (None, None)
    assert document["max_completion_tokens"] == 500


def test_probe_with_a_nondeterministic_upstream(upstream: FakeUpstream) -> None:
    # The fake's nondeterminism ignores the seed (as a backend whose seed is best effort can):
    # every run differs, in both groups.
    upstream.nondeterministic = True

    result = probe(upstream.base_url, "--runs", "3", "--compare-unseeded", "--json")

    assert result.exit_code == 0, result.output
    for group in json.loads(result.stdout)["groups"]:
        assert group["distinct_outputs"] == 3
        assert group["mean_ngram_distance"] > 0
        assert group["mean_text_ratio"] < 1


def test_probe_prints_each_run_and_the_groups(upstream: FakeUpstream) -> None:
    result = probe(upstream.base_url, "--runs", "2", "--seed", "9", "--temperature", "0")

    assert result.exit_code == 0, result.output
    text = upstream.chat_completion(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "temperature": 0.0,
            "max_tokens": 200,
            "seed": 9,
        }
    )["choices"][0]["message"]["content"]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run", "group", "fingerprint", "prompt", "completion", "opening"]
    assert lines[1].split()[:3] == ["1", "seeded", DEFAULT_FINGERPRINT]
    assert lines[1].endswith(text if len(text) <= 60 else text[:59] + "…")
    [summary] = [line for line in lines if line.startswith("seeded ")]
    assert summary.split() == ["seeded", "2", "1", DEFAULT_FINGERPRINT, "0.0000", "1.0000"]
    assert "unseeded" not in result.stdout


def test_probe_through_a_seedcache_proxy_is_live(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = start_proxy()  # auto mode: without the passthrough header, runs 2-3 would be hits

    for _ in range(2):
        result = probe(proxy.base_url, "--runs", "3", "--json")
        assert result.exit_code == 0, result.output

    assert upstream.count(CHAT) == 6
    proxy.stop()
    assert disk_recordings(Path(proxy.config.store)) == {}  # passthrough leaves the store alone


def test_probe_through_a_replaying_proxy_is_an_error(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    store = str(tmp_path / "probed")
    recorder = start_proxy(store=store)
    with recorder.client() as client:  # what probe sends, recorded without the passthrough header
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Tell me a story."}],
            temperature=0.7,
            max_tokens=200,
            seed=123,
        )
    recorder.stop()
    proxy = start_proxy(mode="replay", store=store)

    result = probe(proxy.base_url, "--runs", "2")

    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        "seedcache: seeded run 1 was answered from a recording (X-Seedcache-Status: hit), not "
        f"live: is {proxy.base_url} a seedcache proxy in replay mode? Point --upstream at the "
        "API, or at a proxy in another mode"
    )
    assert result.stdout == ""
    assert upstream.count() == 1  # the recording only


def test_probe_messages_from_a_file(upstream: FakeUpstream, tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi."},
    ]
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(messages))

    result = seedcache(
        "probe", "--model", "gpt-4o", "--messages", str(path), "--runs", "1", "--json",
        "--upstream", upstream.base_url,
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert upstream.last.body["messages"] == messages
    [group] = json.loads(result.stdout)["groups"]
    assert group["mean_ngram_distance"] is None  # one run: no pair to compare


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "gpt-4o"],  # neither --prompt nor --messages
        ["--model", "gpt-4o", "--prompt", "x", "--messages", "-"],  # both
        ["--prompt", "x"],  # no model
        ["--model", "gpt-4o", "--prompt", "x", "--runs", "0"],
        ["--model", "gpt-4o", "--prompt", "x", "--temperature", "3"],
        ["--model", "o3-mini", "--prompt", "x", "--temperature", "1", "--no-temperature"],
        [
            "--model",
            "o3-mini",
            "--prompt",
            "x",
            "--max-tokens",
            "9",
            "--max-completion-tokens",
            "9",
        ],
        ["--model", "o3-mini", "--prompt", "x", "--max-completion-tokens", "0"],
    ],
)
def test_probe_usage_errors_exit_2(args: list[str], upstream: FakeUpstream) -> None:
    result = seedcache("probe", *args, "--upstream", upstream.base_url)

    assert result.exit_code == 2, result.output
    assert upstream.count() == 0


def test_probe_messages_must_be_a_list_of_messages(upstream: FakeUpstream, tmp_path: Path) -> None:
    path = tmp_path / "messages.json"
    path.write_text(json.dumps({"role": "user", "content": "not a list"}))

    result = seedcache(
        "probe", "--model", "gpt-4o", "--messages", str(path), "--upstream", upstream.base_url
    )

    assert result.exit_code == 2
    assert "JSON list of messages" in result.output


def test_probe_messages_file_holding_null_is_not_a_missing_option(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "messages.json"
    path.write_text("null")

    result = seedcache(
        "probe", "--model", "gpt-4o", "--messages", str(path), "--upstream", upstream.base_url
    )

    assert result.exit_code == 2
    assert "Invalid value for --messages: the file holds null, not a JSON list" in result.stderr
    assert "give either" not in result.stderr
    assert upstream.count() == 0


def test_probe_upstream_errors_are_explained(upstream: FakeUpstream) -> None:
    upstream.fail_next(401, times=10)

    result = probe(upstream.base_url, "--runs", "2")

    assert result.exit_code == 2
    assert "seeded run 1 failed: upstream answered 401" in result.output
    assert upstream.count() == 1  # the SDK does not retry a 401


def test_probe_names_the_url_it_could_not_reach() -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"

    result = probe(closed, "--runs", "1")

    assert result.exit_code == 2
    assert "seeded run 1 failed: Connection error." in result.output
    assert closed in result.output


def test_audit_counts_answers_from_another_model_snapshot(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    snapshots = {"recorded_response_model": "gpt-4o-mini-2024-07-18"}
    lines = [
        {**KNOWN[0], **snapshots, "response_model": "gpt-4o-mini-2025-01-01"},
        {**KNOWN[0], **snapshots, "response_model": "gpt-4o-mini-2024-07-18"},
        KNOWN[0],  # an event of an older seedcache: no snapshots named
    ]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))

    table = seedcache("audit", "--audit-log", str(log))
    document = json.loads(seedcache("audit", "--audit-log", str(log), "--json").stdout)

    assert table.exit_code == 0, table.output
    assert ", 1 answered by another model snapshot." in table.stdout
    assert document["totals"]["model_changes"] == 1
    assert sum(group["model_changes"] for group in document["groups"]) == 1
