"""The pytest plugin, run on small test suites with pytester: replay by default, explained misses,
recording into files:, namespaces, the session summary (also under pytest-xdist), settings checked
when pytest starts, the environment set before test modules are imported, and the example's
offline tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import pytest_plugin
from tests.fake_upstream import FakeUpstream
from tests.servers import free_port

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "trip_planner"

APP_TESTS = """
import openai, pytest

pytestmark = pytest.mark.usefixtures("seedcache")

def ask(content, **extra):
    client = openai.OpenAI(max_retries=0)
    return client.chat.completions.create(
        model="gpt-4o-mini", seed=7, temperature=0,
        messages=[{"role": "user", "content": content}], **extra)

def test_question():
    assert ask("Tell me about Mars").choices[0].message.content

def test_stream():
    chunks = list(ask("Tell me about Mars", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
"""


def run(
    pytester: pytest.Pytester, *args: str, env: dict[str, str] | None = None
) -> pytest.RunResult:
    # A subprocess, so each inner session starts and stops its own proxy like a real run.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    pytester._monkeypatch.setattr(os, "environ", {**clean, **(env or {})})
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def readme_block(opening: str) -> str:
    """The README's fenced block whose first line is `opening`."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    return readme.split(f"\n{opening}\n", 1)[1].split("```", 1)[0]


def test_the_readme_pytest_example_runs_as_laid_out(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    ini = readme_block("# pytest.ini (or [tool.pytest.ini_options] in pyproject.toml)")
    (pytester.path / "pytest.ini").write_text(ini)
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests" / "test_app.py").write_text(readme_block("# tests/test_app.py"))
    (pytester.path / "my_app.py").write_text(
        "import openai\n\n"
        "def suggest_trip(topic):\n"
        "    answer = openai.OpenAI(max_retries=0).chat.completions.create(\n"
        "        model='gpt-4o-mini', seed=1, messages=[{'role': 'user', 'content': topic}])\n"
        "    return answer.choices[0].message.content\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}

    def pytest_run(*args: str) -> subprocess.CompletedProcess[str]:
        # From tests/, as an IDE or `pytest tests/test_app.py` may: `python -m` puts the working
        # directory on sys.path, which must not be what makes my_app importable.
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
            cwd=pytester.path / "tests",
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    recorded = pytest_run("--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    replayed = pytest_run()

    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    assert "1 recorded" in recorded.stdout
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "1 hits, 0 misses" in replayed.stdout


def test_replay_is_the_default_and_fails_closed_with_an_explanation(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    (pytester.path / "tests" / "recordings").mkdir(parents=True)
    pytester.makepyfile(test_app=APP_TESTS)
    # Without pytest-xdist, whose hooks the plugin implements only as optional ones.
    result = run(pytester, f"--seedcache-upstream={upstream.base_url}", "-p", "no:xdist")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*No recording for POST /v1/chat/completions*model=gpt-4o-mini*"])
    result.stdout.fnmatch_lines(["*Record it with: pytest --seedcache-mode auto*"])
    result.stdout.fnmatch_lines(["*seedcache (replay): 0 hits, 2 misses, 0 recorded*"])
    assert upstream.count() == 0, "replay must never contact the upstream"


@pytest.mark.parametrize(
    ("key", "xdist"), [(None, ()), (None, ("-n", "2")), ("sk-from-the-shell", ())]
)
def test_recording_without_an_api_key_says_the_placeholder_was_sent(
    key: str | None, xdist: tuple[str, ...], pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(test_app=APP_TESTS)
    upstream.fail_next(401, times=2)  # as OpenAI answers the placeholder
    env = {"OPENAI_API_KEY": key} if key else None

    result = run(
        pytester,
        "--seedcache-mode=auto",
        f"--seedcache-upstream={upstream.base_url}",
        *xdist,
        env=env,
    )

    result.assert_outcomes(failed=2)
    hint = "*OPENAI_API_KEY is not set, so the requests that went upstream carried the placeholder*"
    if key is None:
        result.stdout.fnmatch_lines([hint + "set OPENAI_API_KEY to record"])
    else:
        result.stdout.no_fnmatch_line(hint)


def test_record_then_replay_offline(pytester: pytest.Pytester, upstream: FakeUpstream) -> None:
    pytester.makepyfile(test_app=APP_TESTS)
    recorded = run(pytester, "--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    recorded.assert_outcomes(passed=2)
    recorded.stdout.fnmatch_lines(["*seedcache (auto): 1 hits, 0 misses, 1 recorded*"])
    files = sorted((pytester.path / "tests" / "recordings").glob("[0-9a-f]*.json"))
    assert len(files) == 1, "one recording serves the streaming and the plain request"
    calls = upstream.count()

    closed = f"http://127.0.0.1:{free_port()}/v1"
    replayed = run(pytester, f"--seedcache-upstream={closed}", "--seedcache-fail-on-miss")
    replayed.assert_outcomes(passed=2)
    replayed.stdout.fnmatch_lines(["*seedcache (replay): 2 hits, 0 misses, 0 recorded*"])
    assert upstream.count() == calls


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_audit_events_of_a_record_run_stay_out_of_git(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    # README: commit tests/recordings/. Re-recording writes audit events; were they in that
    # folder for git to take, they would grow with every run and conflict between branches.
    pytester.makepyfile(test_app=APP_TESTS)
    subprocess.run(["git", "init", "-q"], cwd=pytester.path, check=True)
    upstream_option = f"--seedcache-upstream={upstream.base_url}"
    run(pytester, "--seedcache-mode=auto", upstream_option).assert_outcomes(passed=2)
    rerecorded = run(pytester, "--seedcache-mode=record", upstream_option)
    rerecorded.assert_outcomes(passed=2)

    recordings = pytester.path / "tests" / "recordings"
    assert (recordings / ".audit" / "events.jsonl").read_text().count('"verdict"') == 2
    listed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "tests"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert sorted(line.rpartition("/")[2] for line in listed) == sorted(
        [".seedcache-meta.json", *(p.name for p in recordings.glob("[0-9a-f]*.json"))]
    )


def test_a_changed_prompt_names_the_nearest_recording(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(test_app=APP_TESTS)
    run(pytester, "--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    pytester.makepyfile(test_app=APP_TESTS.replace("Tell me about Mars", "Tell us about Mars"))
    result = run(pytester)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*The nearest recording, *, differs at (this request != recorded): "
            "messages[[]0[]].content: "
            "'Tell us about Mars' != 'Tell me about Mars'*"
        ]
    )


def test_fail_on_miss_fails_the_session_and_unused_recordings_are_listed(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(test_app=APP_TESTS)
    run(pytester, "--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    pytester.makepyfile(
        test_app="""
import openai, pytest

@pytest.mark.usefixtures("seedcache")
def test_other():
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(max_retries=0).models.list()
"""
    )
    result = run(pytester, "--seedcache-fail-on-miss")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*1 recording(s) no test used:*",
            "*POST /v1/chat/completions model=gpt-4o-mini*",
            "*failing the session because requests had no recording*",
        ]
    )


def test_ini_settings_and_namespace_marker(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makeini(
        f"""
[pytest]
seedcache_mode = auto
seedcache_store = files:cassettes
seedcache_upstream = {upstream.base_url}
"""
    )
    pytester.makepyfile(
        test_app=APP_TESTS
        + """
@pytest.mark.seedcache(namespace="team-a")
def test_in_a_namespace():
    assert ask("Tell me about Mars").choices[0].message.content
"""
    )
    result = run(pytester)
    result.assert_outcomes(passed=3)
    assert len(list((pytester.path / "cassettes").glob("[0-9a-f]*.json"))) == 1
    assert len(list((pytester.path / "cassettes" / "team-a").glob("[0-9a-f]*.json"))) == 1


def test_a_namespace_windows_cannot_check_out_is_said_in_the_summary(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    # The files store logs it at WARNING, which a passing run never showed.
    pytester.makepyfile(
        test_app=APP_TESTS
        + """
@pytest.mark.seedcache(namespace="con")
def test_in_a_device_name():
    assert ask("Tell me about Mars").choices[0].message.content
"""
    )
    upstream_option = f"--seedcache-upstream={upstream.base_url}"

    recorded = run(pytester, "--seedcache-mode=auto", upstream_option)
    replayed = run(pytester)

    recorded.assert_outcomes(passed=3)
    recorded.stdout.fnmatch_lines(
        [
            "seedcache: namespace(s) 'con' of the recordings are folder names Windows refuses (a "
            "device name such as con or aux, or a trailing '.'): a checkout there cannot create "
            "them; prefer other names"
        ]
    )
    replayed.assert_outcomes(passed=3)
    replayed.stdout.no_fnmatch_line("*Windows refuses*")  # only said of what a run writes


def test_namespaces_that_differ_only_in_case_and_recordings_filed_by_them_are_said(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    # One folder on macOS and Windows: recordings made there for "mars" land in "Mars/".
    pytester.makepyfile(
        test_app=APP_TESTS
        + """
@pytest.mark.seedcache(namespace="Mars")
def test_upper():
    assert ask("Tell me about Mars").choices[0].message.content

@pytest.mark.seedcache(namespace="mars")
def test_lower():
    assert ask("Tell me about Mars").choices[0].message.content
"""
    )
    recorded = run(pytester, "--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    recordings = pytester.path / "tests" / "recordings"
    [lower] = (recordings / "mars").glob("*.json")
    lower.rename(recordings / "Mars" / lower.name)  # as a commit from macOS holds it
    replayed = run(pytester)

    recorded.assert_outcomes(passed=4)
    recorded.stdout.fnmatch_lines(
        [
            "seedcache: namespaces that differ only in letter case ('mars' and 'Mars'): on macOS "
            "and Windows they are one folder, so the recordings of one are written into the "
            "other's; prefer names that differ otherwise"
        ]
    )
    replayed.assert_outcomes(passed=3, failed=1)
    replayed.stdout.fnmatch_lines(
        [
            f"seedcache: 1 recording(s) in the folder of another namespace ({lower.stem[:12]} of "
            "namespace 'mars' in 'Mars'), where their requests do not look for them: recorded on "
            "macOS or Windows, where folders whose names differ only in case are one; move each "
            "into its namespace's folder (git mv), and give namespaces names that differ otherwise"
        ]
    )


def test_unused_namespaced_recordings_of_a_disk_store_are_not_called_misfiled(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    # A disk store has no folders: it lists every recording under no namespace.
    namespaced = """
@pytest.mark.seedcache(namespace="team")
def test_team():
    assert ask("Tell me about Mars").choices[0].message.content
"""
    pytester.makepyfile(test_app=APP_TESTS + namespaced)
    store = f"--seedcache-store={pytester.path / 'disk'}"
    run(pytester, store, "--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    pytester.makepyfile(test_app=APP_TESTS)  # test_team is gone: its recording is unused

    replayed = run(pytester, store)

    replayed.assert_outcomes(passed=2)
    replayed.stdout.fnmatch_lines(["seedcache: 1 recording(s) no test used:"])
    replayed.stdout.no_fnmatch_line("*folder of another namespace*")


def test_the_namespace_marker_applies_to_a_client_created_at_import_time(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makeini(f"[pytest]\nseedcache_mode = auto\nseedcache_upstream = {upstream.base_url}\n")
    pytester.makepyfile(
        test_app="""
import openai, pytest

client = openai.OpenAI(max_retries=0)  # before any test or fixture runs

def ask():
    return client.chat.completions.create(
        model="gpt-4o-mini", seed=7, messages=[{"role": "user", "content": "Hi"}])

@pytest.mark.seedcache(namespace="team-a")
def test_in_a_namespace():
    assert ask().choices[0].message.content

def test_after_it():
    assert ask().choices[0].message.content
"""
    )
    result = run(pytester)
    result.assert_outcomes(passed=2)
    recordings = pytester.path / "tests" / "recordings"
    assert len(list((recordings / "team-a").glob("[0-9a-f]*.json"))) == 1
    assert len(list(recordings.glob("[0-9a-f]*.json"))) == 1  # the next test is back outside


def test_placeholder_api_key_lets_the_sdk_start_offline(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    (pytester.path / "tests" / "recordings").mkdir(parents=True)
    pytester.makepyfile(
        test_app="""
import os, pytest

def test_env(seedcache):
    assert os.environ["OPENAI_BASE_URL"] == seedcache.base_url
    assert os.environ["OPENAI_API_KEY"] == "seedcache-placeholder-key"
    assert seedcache.stats()["hits"] == 0
"""
    )
    run(pytester).assert_outcomes(passed=1)


def test_the_example_passes_offline_without_an_api_key() -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", f"--seedcache-upstream={closed}"],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout
    # Replayed through another upstream than the recordings', at the fingerprint they were made at.
    assert "6 hits, 0 misses, 0 recorded, 0 stale" in result.stdout


@pytest.mark.parametrize(
    ("args", "ini", "message"),
    [
        (["--seedcache-mode=reply"], "", "seedcache: unknown mode 'reply'; choose one of auto*"),
        ([], "seedcache_upstream = api.openai.com", "seedcache: upstream must be an http(s) URL*"),
        (["--seedcache-store=redis:/cache"], "", "seedcache: --seedcache-store 'redis:/c* is not*"),
        (["--seedcache-store=files:"], "", "seedcache: --seedcache-store files: needs a dir*"),
        (
            ["--seedcache-store=reddis://cache/0"],
            "",
            "seedcache: --seedcache-store 'reddis://cache/0' is not a store seedcache knows*",
        ),
    ],
    ids=["mode", "upstream", "redis-store", "files-store", "url-store"],
)
def test_invalid_settings_stop_the_run_with_one_usage_error(
    pytester: pytest.Pytester, args: list[str], ini: str, message: str
) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_app=APP_TESTS)
    result = run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


# The same unseeded question asked `times` times: without --repeat sequence, one answer.
UNSEEDED = """
import openai

def ask_unseeded(times):
    client = openai.OpenAI(max_retries=0)
    return [
        client.chat.completions.create(
            model="gpt-4o-mini", temperature=1,
            messages=[{"role": "user", "content": "Name a colour"}],
        ).choices[0].message.content
        for _ in range(times)
    ]
"""


def record_in_sequence(pytester: pytest.Pytester, upstream: FakeUpstream) -> pytest.RunResult:
    """The suite run in auto with --repeat sequence: each identical request records a sample."""
    upstream.nondeterministic = True
    return run(
        pytester,
        "--seedcache-mode=auto",
        f"--seedcache-upstream={upstream.base_url}",
        "--seedcache-repeat=sequence",
    )


def test_repeat_sequence_replays_the_kth_answer_to_the_kth_identical_request(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(
        test_app=UNSEEDED
        + """
def test_an_unseeded_question_asked_three_times(seedcache):
    assert len(set(ask_unseeded(3))) == 3
"""
    )
    recorded = record_in_sequence(pytester, upstream)
    recorded.assert_outcomes(passed=1)
    recorded.stdout.fnmatch_lines(["*seedcache (auto): 0 hits, 0 misses, 3 recorded*"])
    calls = upstream.count()

    pytester.makeini("[pytest]\nseedcache_repeat = sequence\n")
    replayed = run(pytester)
    replayed.assert_outcomes(passed=1)
    replayed.stdout.fnmatch_lines(["*seedcache (replay): 3 hits, 0 misses*"])
    assert upstream.count() == calls


def test_repeat_sequence_counts_per_test_so_a_selection_replays_what_was_recorded(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(
        test_app=UNSEEDED
        + """
import json

def ask_twice(name):
    with open(f"answers-{name}.jsonl", "a") as out:
        out.write(json.dumps(ask_unseeded(2)) + "\\n")

def test_a(seedcache):
    ask_twice("a")

def test_b(seedcache):
    ask_twice("b")
"""
    )
    recorded = record_in_sequence(pytester, upstream)
    # test_b's two requests are the first and second of its own: test_a's samples.
    recorded.stdout.fnmatch_lines(["*seedcache (auto): 2 hits, 0 misses, 2 recorded*"])
    replayed = run(pytester, "--seedcache-repeat=sequence", "-k", "test_b")
    replayed.assert_outcomes(passed=1)
    replayed.stdout.fnmatch_lines(["*seedcache (replay): 2 hits, 0 misses*"])

    first, again = (pytester.path / "answers-b.jsonl").read_text().splitlines()
    assert first == again == (pytester.path / "answers-a.jsonl").read_text().strip()


def test_the_record_hint_of_a_miss_carries_the_store_and_repeat_the_run_was_given(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(test_app=UNSEEDED + "\ndef test_twice(seedcache):\n    ask_unseeded(2)\n")
    upstream.nondeterministic = True
    live = f"--seedcache-upstream={upstream.base_url}"
    given = ("--seedcache-store=files:cassettes", "--seedcache-repeat=sequence")
    # Recorded without --seedcache-repeat: one sample, where the test asks twice.
    run(pytester, "--seedcache-mode=auto", live, given[0]).assert_outcomes(passed=1)

    missed = run(pytester, *given)

    missed.assert_outcomes(failed=1)
    hint = (
        "pytest --seedcache-mode auto --seedcache-store files:cassettes --seedcache-repeat sequence"
    )
    missed.stdout.fnmatch_lines([f"*only 1 sample(s) are recorded*Record it with: {hint}*"])
    # Run as it says (with an upstream to record from), it records what the run missed.
    run(pytester, *hint.split()[1:], live).assert_outcomes(passed=1)
    run(pytester, *given, "--seedcache-fail-on-miss").assert_outcomes(passed=1)


def answers_of_each_run(pytester: pytest.Pytester, name: str) -> list[list[str]]:
    """The answers a test wrote down, one list per run."""
    return [json.loads(line) for line in (pytester.path / name).read_text().splitlines()]


def recorded_samples(pytester: pytest.Pytester) -> int:
    """How many samples the one recording of the suite holds."""
    [path] = (pytester.path / "tests" / "recordings").glob("[0-9a-f]*.json")
    return len(json.loads(path.read_text())["samples"])


def test_repeat_sequence_record_rewrites_the_samples_so_that_replay_gets_what_it_saw(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(
        test_app=UNSEEDED
        + """
import json, os

def test_answers(seedcache):
    with open("answers.jsonl", "a") as out:
        out.write(json.dumps(ask_unseeded(int(os.environ["TIMES"]))) + "\\n")
"""
    )
    upstream.nondeterministic = True
    live = ("--seedcache-repeat=sequence", f"--seedcache-upstream={upstream.base_url}")
    run(pytester, "--seedcache-mode=auto", *live, env={"TIMES": "3"}).assert_outcomes(passed=1)
    # The test now asks twice, and is recorded again.
    twice = {"TIMES": "2"}
    run(pytester, "--seedcache-mode=record", *live, env=twice).assert_outcomes(passed=1)
    assert recorded_samples(pytester) == 2
    replayed = run(pytester, "--seedcache-repeat=sequence", "--seedcache-fail-on-miss", env=twice)
    replayed.assert_outcomes(passed=1)

    _, rerecorded, again = (pytester.path / "answers.jsonl").read_text().splitlines()
    assert again == rerecorded


def test_repeat_sequence_record_keeps_as_many_samples_as_the_test_that_asked_most(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    # test_b asks once what test_a asked twice: its answer is sample 1, test_a's second sample 2.
    pytester.makepyfile(
        test_app=UNSEEDED
        + """
import json

def ask_and_keep(name, times):
    with open(f"answers-{name}.jsonl", "a") as out:
        out.write(json.dumps(ask_unseeded(times)) + "\\n")

def test_a(seedcache):
    ask_and_keep("a", 2)

def test_b(seedcache):
    ask_and_keep("b", 1)
"""
    )
    upstream.nondeterministic = True
    recorded = run(
        pytester,
        "--seedcache-mode=record",
        "--seedcache-repeat=sequence",
        f"--seedcache-upstream={upstream.base_url}",
    )
    recorded.assert_outcomes(passed=2)
    assert recorded_samples(pytester) == 2
    replayed = run(pytester, "--seedcache-repeat=sequence", "--seedcache-fail-on-miss")
    replayed.assert_outcomes(passed=2)

    a_recorded, a_replayed = answers_of_each_run(pytester, "answers-a.jsonl")
    b_recorded, b_replayed = answers_of_each_run(pytester, "answers-b.jsonl")
    assert b_replayed == b_recorded
    assert a_replayed == [b_recorded[0], a_recorded[1]]


def test_repeat_sequence_record_under_xdist_keeps_what_every_worker_recorded(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    # Each worker knows only its own tests' counts: trimming to them would cut the other's.
    pytester.makepyfile(
        helper=UNSEEDED,
        test_a="from helper import ask_unseeded\ndef test_a(seedcache):\n    ask_unseeded(3)\n",
        test_b="from helper import ask_unseeded\ndef test_b(seedcache):\n    ask_unseeded(2)\n",
    )
    upstream.nondeterministic = True
    xdist = ("--seedcache-repeat=sequence", "-n", "2", "--dist", "loadfile")
    recorded = run(
        pytester, "--seedcache-mode=record", f"--seedcache-upstream={upstream.base_url}", *xdist
    )
    recorded.assert_outcomes(passed=2)

    assert recorded_samples(pytester) >= 3
    replayed = run(pytester, "--seedcache-fail-on-miss", *xdist)
    replayed.assert_outcomes(passed=2)


@pytest.mark.parametrize(
    "narrowing",
    [("-k", "test_b"), ("test_app.py::test_b",), ("-x",)],
    ids=["deselected", "node-id", "stopped"],
)
def test_repeat_sequence_record_of_part_of_the_suite_keeps_the_samples_of_the_rest(
    narrowing: tuple[str, ...], pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    # README: counted per test, so -k does not change what a test gets. A run of test_b alone
    # (or one stopped before test_a) knows of one request where test_a makes three.
    pytester.makepyfile(
        test_app=UNSEEDED
        + """
import os

def test_b(seedcache):
    ask_unseeded(1)

def test_stop():
    assert not os.environ.get("STOP"), "the run stops here under -x"

def test_a(seedcache):
    ask_unseeded(3)
"""
    )
    record_in_sequence(pytester, upstream).assert_outcomes(passed=3)
    rerecorded = run(
        pytester,
        "--seedcache-mode=record",
        "--seedcache-repeat=sequence",
        f"--seedcache-upstream={upstream.base_url}",
        *narrowing,
        env={"STOP": "1"},
    )
    rerecorded.stdout.fnmatch_lines(["seedcache (record): 0 hits, 0 misses, 1 recorded*"])

    assert recorded_samples(pytester) == 3
    replayed = run(
        pytester, "--seedcache-repeat=sequence", "--seedcache-fail-on-miss", env={"STOP": ""}
    )
    replayed.assert_outcomes(passed=3)


def test_on_fingerprint_change_fail_refuses_a_sample_of_an_older_fingerprint(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(test_app=APP_TESTS)
    run(pytester, "--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    upstream.fingerprint = "fp_moved"
    pytester.makepyfile(
        test_app=APP_TESTS
        + """
def test_a_new_question_sees_the_new_fingerprint():
    assert ask("Tell me about Venus").system_fingerprint == "fp_moved"

def test_the_old_recording_is_refused():
    with pytest.raises(openai.ConflictError, match="fingerprint") as refused:
        ask("Tell me about Mars")
    assert "Re-record it with: pytest --seedcache-mode record;" in str(refused.value)
""",
    )
    result = run(
        pytester,
        "--seedcache-mode=auto",
        f"--seedcache-upstream={upstream.base_url}",
        "--seedcache-on-fingerprint-change=fail",
        "-k",
        "new_question or old_recording",
    )
    result.assert_outcomes(passed=2, deselected=2)
    result.stdout.fnmatch_lines(["*1 recorded, 1 stale*"])

    kept = run(
        pytester,
        "--seedcache-mode=auto",
        f"--seedcache-upstream={upstream.base_url}",
        "-o",
        "seedcache_on_fingerprint_change=keep",
        "-k",
        "old_recording",
    )
    kept.assert_outcomes(failed=1, deselected=3)
    kept.stdout.fnmatch_lines(["*DID NOT RAISE*", "*0 hits, 0 misses, 0 recorded, 1 stale*"])


def test_a_plain_pytest_run_sees_a_fingerprint_change_recorded_through_another_upstream(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    # README: record with --seedcache-upstream, and CI runs plain `pytest`.
    pytester.makepyfile(test_app=APP_TESTS)
    upstream_option = f"--seedcache-upstream={upstream.base_url}"
    run(pytester, "--seedcache-mode=auto", upstream_option).assert_outcomes(passed=2)
    upstream.fingerprint = "fp_moved"
    pytester.makepyfile(
        test_app=APP_TESTS
        + """
def test_a_new_question_sees_the_new_fingerprint():
    assert ask("Tell me about Venus").system_fingerprint == "fp_moved"
""",
    )
    run(pytester, "--seedcache-mode=auto", upstream_option, "-k", "new_question")
    calls = upstream.count()

    strict = run(pytester, "--seedcache-on-fingerprint-change=fail", "-k", "test_question")
    kept = run(pytester, "-k", "test_question")

    strict.assert_outcomes(failed=1, deselected=2)
    strict.stdout.fnmatch_lines(["*ConflictError*no sample for the current fingerprint fp_moved*"])
    kept.assert_outcomes(passed=1, deselected=2)
    kept.stdout.fnmatch_lines(["*0 hits, 0 misses, 0 recorded, 1 stale*"])
    assert upstream.count() == calls


@pytest.mark.parametrize("policy", ["keep", "fail"])
def test_a_meta_file_left_with_merge_conflict_markers_is_said_and_fails_a_strict_session(
    policy: str, pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(test_app=APP_TESTS)
    run(pytester, "--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    # Two branches saw different fingerprints: git leaves both sides in the file.
    meta = pytester.path / "tests" / "recordings" / ".seedcache-meta.json"
    text = meta.read_text()
    moved = text.replace(upstream.fingerprint, "fp_moved")
    meta.write_text(f"<<<<<<< HEAD\n{text}=======\n{moved}>>>>>>> branch\n")

    result = run(pytester, f"--seedcache-on-fingerprint-change={policy}")

    result.assert_outcomes(passed=2)  # unknown fingerprints refuse no sample
    result.stdout.fnmatch_lines(
        [
            "seedcache (replay): 2 hits, 0 misses*",
            f"seedcache: {meta} cannot be read (a merge conflict?): while it is damaged the "
            "current fingerprints are unknown, so recordings of any fingerprint replay as "
            "current*Resolve it by taking either side of the conflict: git checkout --theirs "
            f"(or --ours) {meta} during the merge*",
        ]
    )
    failing = (
        "seedcache: failing the session because the current fingerprints are unknown while the "
        "meta file is damaged (--seedcache-on-fingerprint-change fail)"
    )
    if policy == "fail":
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.stdout.fnmatch_lines([failing])
    else:
        assert result.ret == pytest.ExitCode.OK
        result.stdout.no_fnmatch_line(failing)


def test_an_invalid_namespace_fails_the_test_before_it_runs(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(
        test_app=APP_TESTS
        + """
@pytest.mark.seedcache(namespace="eu/winter")
def test_with_a_slash():
    raise AssertionError("the test body ran")

@pytest.mark.seedcache("winter sports")
def test_with_a_space():
    raise AssertionError("the test body ran")

def test_with_a_url_asked_for(seedcache):
    with pytest.raises(ValueError, match="namespace 'eu/winter' is not valid"):
        seedcache.namespaced_url("eu/winter")
"""
    )
    result = run(
        pytester,
        "--seedcache-mode=auto",
        f"--seedcache-upstream={upstream.base_url}",
        "-k",
        "with_a",
    )
    result.assert_outcomes(errors=2, passed=1, deselected=2)
    result.stdout.fnmatch_lines(
        [
            "*@pytest.mark.seedcache(namespace='eu/winter'): not a valid namespace; use up to 128 "
            "letters, digits*",
            "*@pytest.mark.seedcache(namespace='winter sports'): not a valid namespace*",
        ]
    )
    assert "the test body ran" not in result.stdout.str()
    assert upstream.count() == 0


def test_an_unreadable_recording_is_skipped_and_counted_in_the_unused_list(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(test_app=APP_TESTS.replace("Tell me about Mars", "Tell me about Venus"))
    run(pytester, "--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    [venus] = (pytester.path / "tests" / "recordings").glob("[0-9a-f]*.json")
    pytester.makepyfile(test_app=APP_TESTS)
    run(pytester, "--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    [mars] = set((pytester.path / "tests" / "recordings").glob("[0-9a-f]*.json")) - {venus}
    # A merge conflict in a committed recording.
    text = mars.read_text()
    mars.write_text(f"<<<<<<< HEAD\n{text}=======\n{text}>>>>>>> branch\n")

    pytester.makepyfile(test_app="def test_nothing_asked(seedcache):\n    pass\n")
    result = run(pytester)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*1 recording(s) no test used:*",
            f"  {venus.stem[:12]} POST /v1/chat/completions model=gpt-4o-mini*",
            f"seedcache: 1 unreadable recording(s) skipped ({mars.stem[:12]}): fix them, or "
            f"delete them with seedcache rm --store files:{mars.parent} KEY",
        ]
    )
    assert "could not list" not in result.stdout.str()


def test_fail_on_miss_fails_the_session_on_an_unreadable_recording_the_code_swallowed(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(
        test_app="""
import openai

def test_mars(seedcache):
    try:
        openai.OpenAI(max_retries=0).chat.completions.create(
            model="gpt-4o-mini", seed=7,
            messages=[{"role": "user", "content": "Tell me about Mars"}])
    except openai.APIError:
        pass  # the application under test falls back on a default answer
"""
    )
    run(pytester, "--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    [mars] = (pytester.path / "tests" / "recordings").glob("[0-9a-f]*.json")
    text = mars.read_text()
    mars.write_text(f"<<<<<<< HEAD\n{text}=======\n{text}>>>>>>> branch\n")

    result = run(pytester, "--seedcache-fail-on-miss")

    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "seedcache (replay): 0 hits, 0 misses*",
            f"seedcache: 1 recording(s) that requests asked for could not be read, so they got "
            f"no recorded answer ({mars.stem[:12]}): where a merge left conflict markers in one, "
            "take one side of the conflict (git checkout --theirs or --ours on its file, "
            f"KEY.json); else fix it, or delete it with seedcache rm --store files:{mars.parent} "
            "KEY and record it again",
            "seedcache: failing the session because requests found their recording unreadable "
            "(--seedcache-fail-on-miss)",
        ]
    )
    assert "skipped" not in result.stdout.str()


def test_a_recording_copied_under_another_name_is_the_unused_one_in_the_summary(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(test_app=APP_TESTS)
    run(pytester, "--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    [used] = (pytester.path / "tests" / "recordings").glob("[0-9a-f]*.json")
    copy = used.with_name(f"{'f' * 64}.json")
    shutil.copy(used, copy)

    result = run(pytester)

    result.assert_outcomes(passed=2)
    # Listed by the name it is found by; `seedcache rm` of the key listed removes the copy.
    result.stdout.fnmatch_lines(
        [
            "*1 recording(s) no test used:*",
            "  ffffffffffff POST /v1/chat/completions model=gpt-4o-mini*",
            f"seedcache: 1 recording(s) stored under another key than their `key` member "
            f"(ffffffffffff holds {used.stem[:12]}): requests find a recording by the key it is "
            f"stored under (its file name), so that is the one listed; delete a stray copy with "
            f"seedcache rm --store files:{copy.parent} KEY",
        ]
    )
    assert f"  {used.stem[:12]} POST" not in result.stdout.str()


def test_replay_without_a_store_directory_names_the_path_and_creates_nothing(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\n")
    pytester.mkdir("tests")
    pytester.makepyfile(test_app=APP_TESTS)
    searched = pytester.path / "tests" / "recordings"
    message = (
        f"seedcache: no recordings to replay: {searched} does not exist (a relative store "
        f"is taken from the rootdir, {pytester.path}). Record them with pytest "
        "--seedcache-mode auto and commit them, or point --seedcache-store*"
    )
    # Started by the fixture: the tests that use it fail.
    result = run(pytester)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([f"*{message}"])
    assert "No recording for" not in result.stdout.str()
    assert not searched.exists()

    # Started with pytest (a seedcache setting is given): the run stops at once.
    result = run(pytester, "--seedcache-fail-on-miss")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])
    assert not searched.exists()


def questions(*topics: str) -> str:
    """A test module with one test per topic, asking about it; a miss is an expected error."""
    return "import openai, pytest\n" + "".join(
        f"""
def test_{topic.lower()}(seedcache):
    client = openai.OpenAI(max_retries=0)
    try:
        client.chat.completions.create(
            model="gpt-4o-mini", seed=7,
            messages=[{{"role": "user", "content": "Tell me about {topic}"}}])
    except openai.NotFoundError:
        pass  # the application under test copes with API errors
"""
        for topic in topics
    )


def test_under_xdist_one_summary_adds_up_the_workers_and_fails_on_a_miss(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    recordings = pytester.path / "tests" / "recordings"
    record = ("--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    pytester.makepyfile(test_a=questions("Mars"), test_b=questions("Venus"))
    run(pytester, *record).assert_outcomes(passed=2)
    used = {path.stem for path in recordings.glob("[0-9a-f]*.json")}
    pytester.makepyfile(test_c=questions("Jupiter"))
    run(pytester, *record, "test_c.py").assert_outcomes(passed=1)
    [unused] = {path.stem for path in recordings.glob("[0-9a-f]*.json")} - used
    (pytester.path / "test_c.py").unlink()

    # Each file on its own worker: each worker's proxy used one recording the other did not.
    pytester.makepyfile(test_a=questions("Mars", "Saturn"))
    result = run(pytester, "-n", "2", "--dist", "loadfile", "--seedcache-fail-on-miss")
    result.assert_outcomes(passed=3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "seedcache (replay): 2 hits, 1 misses, 0 recorded, 0 stale, 0 upstream errors "
            "(2 workers)",
            "seedcache: 1 recording(s) no test used:",
            f"  {unused[:12]} POST /v1/chat/completions model=gpt-4o-mini namespace=-",
            "*failing the session because requests had no recording*",
        ]
    )
    output = result.stdout.str()
    assert output.count("seedcache (replay)") == 1
    assert not any(key[:12] in output for key in used)


@pytest.mark.parametrize(
    ("narrowing", "reason"),
    [
        (("-k", "mars"), "deselected tests (-k, -m, --deselect, --lf)"),
        (("test_app.py::test_mars",), "was given test paths or node ids"),
        (("-n", "2", "-k", "mars"), "deselected tests (-k, -m, --deselect, --lf)"),
    ],
    ids=["deselected", "node-id", "xdist"],
)
def test_a_run_of_part_of_the_suite_calls_no_recording_unused(
    narrowing: tuple[str, ...], reason: str, pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(test_app=questions("Mars", "Venus"))
    record = ("--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    run(pytester, *record).assert_outcomes(passed=2)

    result = run(pytester, *narrowing)

    assert result.parseoutcomes()["passed"] == 1
    # Venus's recording is the left-out test's, not one that no test uses.
    result.stdout.fnmatch_lines(
        [
            "seedcache (replay): 1 hits, 0 misses*",
            "seedcache: recordings no test used are listed only on a run of the whole suite; "
            f"this run {reason}",
        ]
    )
    assert "no test used:" not in result.stdout.str()


def test_a_run_given_the_suites_own_folder_is_a_run_of_the_whole_suite(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    # `pytest tests/` (here the rootdir, which is the suite without testpaths), as a CI runs it.
    record = ("--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    pytester.makepyfile(test_app=questions("Mars", "Venus"))
    run(pytester, *record).assert_outcomes(passed=2)
    pytester.makepyfile(test_app=questions("Mars"))  # Venus's test is gone

    result = run(pytester, ".")

    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["seedcache: 1 recording(s) no test used:"])


def test_under_xdist_a_crashed_worker_is_named_and_no_recording_is_called_unused(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    record = ("--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    pytester.makepyfile(test_a=questions("Mars"), test_b=questions("Venus"))
    run(pytester, *record).assert_outcomes(passed=2)
    # The worker that runs test_a then dies: what its proxy replayed is unknown.
    (pytester.path / "test_a.py").write_text(
        questions("Mars") + "\n\ndef test_zz_crash():\n    import os\n    os._exit(3)\n"
    )

    result = run(pytester, "-n", "2", "--dist", "loadfile", "--max-worker-restart", "0")

    result.stdout.fnmatch_lines(
        ["seedcache: worker(s) gw* crashed: their numbers are not counted*"],
    )
    assert "recording(s) no test used:" not in result.stdout.str()
    assert result.ret != 0


APP_MODULE = """
from openai import OpenAI

client = OpenAI(max_retries=0)  # created when the module is imported


def ask(content):
    answer = client.chat.completions.create(
        model="gpt-4o-mini", seed=7, messages=[{"role": "user", "content": content}])
    return answer.choices[0].message.content
"""


def test_a_client_created_at_import_time_uses_the_proxy_once_a_setting_is_given(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makeini("[pytest]\nseedcache_fail_on_miss = true\n")
    pytester.makepyfile(app=APP_MODULE)
    pytester.makeconftest("import app  # imported before any test module\n")
    pytester.makepyfile(test_app="from app import ask\n\ndef test_ask():\n    assert ask('Mars')\n")
    # A developer's shell: a real key, and OPENAI_BASE_URL at the real API.
    shell = {"OPENAI_API_KEY": "sk-real", "OPENAI_BASE_URL": upstream.base_url}

    recorded = run(
        pytester, "--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}", env=shell
    )
    recorded.assert_outcomes(passed=1)
    recorded.stdout.fnmatch_lines(["seedcache (auto): 0 hits, 0 misses, 1 recorded*"])
    assert len(list((pytester.path / "tests" / "recordings").glob("[0-9a-f]*.json"))) == 1
    calls = upstream.count()

    replayed = run(pytester, env=shell)
    replayed.assert_outcomes(passed=1)
    replayed.stdout.fnmatch_lines(["seedcache (replay): 1 hits, 0 misses, 0 recorded*"])
    assert upstream.count() == calls, "replay made a live call"

    # CI: no key at all; the SDK, created while conftest.py is imported, needs one.
    offline = run(pytester, f"--seedcache-upstream=http://127.0.0.1:{free_port()}/v1")
    offline.assert_outcomes(passed=1)


def test_a_conftest_that_points_openai_base_url_elsewhere_does_not_bypass_replay(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    (pytester.path / "tests" / "recordings").mkdir(parents=True)
    pytester.makeini("[pytest]\nseedcache_mode = replay\nseedcache_fail_on_miss = true\n")
    # A default endpoint for development (a local server), set by the project's conftest.py.
    pytester.makeconftest(
        f"import os\nos.environ['OPENAI_BASE_URL'] = {upstream.base_url!r}\n"
        "os.environ.setdefault('OPENAI_API_KEY', 'sk-dev')\n"
    )
    pytester.makepyfile(
        test_app="""
import openai

module_client = openai.OpenAI(max_retries=0)  # a test module's, created at import

def ask(client):
    return client.chat.completions.create(
        model="gpt-4o-mini", seed=1, messages=[{"role": "user", "content": "hi"}])

def test_module_client():
    ask(module_client)

def test_fixture(seedcache):
    ask(openai.OpenAI(max_retries=0))
"""
    )
    result = run(pytester)
    result.assert_outcomes(failed=2)  # explained misses, not live answers
    result.stdout.fnmatch_lines(["*No recording for POST /v1/chat/completions*"])
    result.stdout.fnmatch_lines(["seedcache (replay): 0 hits, 2 misses*"])
    assert upstream.count() == 0


@pytest.mark.parametrize("listing", ["--collect-only", "--fixtures", "--markers", "-VV"])
def test_listing_runs_no_proxy_and_checks_no_store(listing: str, pytester: pytest.Pytester) -> None:
    # IDE test discovery on a fresh checkout: replay set, no recordings yet, no key.
    pytester.makeini("[pytest]\nseedcache_mode = replay\n")
    pytester.makepyfile(
        test_app="import openai\n\nclient = openai.OpenAI()\n\ndef test_it():\n    pass\n"
    )
    result = run(pytester, listing)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    if listing == "--collect-only":
        result.stdout.fnmatch_lines(["*test_it*"])
    assert not (pytester.path / "tests").exists()


def test_a_recordings_directory_given_without_files_is_refused_in_pytest_terms(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(test_app=APP_TESTS)
    record = ("--seedcache-mode=auto", f"--seedcache-upstream={upstream.base_url}")
    run(pytester, *record).assert_outcomes(passed=2)
    recordings = pytester.path / "tests" / "recordings"
    before = sorted(p.name for p in recordings.iterdir())

    result = run(pytester, "--seedcache-store=tests/recordings")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*seedcache: {recordings} holds recording files*use --seedcache-store files:{recordings}"]
    )
    assert sorted(p.name for p in recordings.iterdir()) == before  # no cache.db among them


def test_without_any_setting_the_environment_is_left_alone_until_the_fixture_runs(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_app="""
import os

AT_IMPORT = os.environ.get("OPENAI_BASE_URL")

def test_untouched():
    assert AT_IMPORT == os.environ.get("OPENAI_BASE_URL") == "http://api.example.invalid/v1"
"""
    )
    result = run(pytester, env={"OPENAI_BASE_URL": "http://api.example.invalid/v1"})
    result.assert_outcomes(passed=1)
    assert "seedcache (" not in result.stdout.str()
    assert not (pytester.path / "tests").exists()


def test_the_summary_says_when_the_fixture_was_used_but_nothing_reached_the_proxy(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    (pytester.path / "tests" / "recordings").mkdir(parents=True)
    pytester.makepyfile(app=APP_MODULE)
    pytester.makepyfile(
        test_app="""
import pytest
from app import ask

pytestmark = pytest.mark.usefixtures("seedcache")

def test_ask():
    assert ask("Mars")
"""
    )
    shell = {"OPENAI_API_KEY": "sk-real", "OPENAI_BASE_URL": upstream.base_url}
    result = run(pytester, env=shell)
    result.assert_outcomes(passed=1)
    assert upstream.count() == 1, "the client created at import time went to the real API"
    result.stdout.fnmatch_lines(
        [
            "seedcache (replay): 0 hits, 0 misses, 0 recorded*",
            "seedcache: tests used the seedcache fixture, but no request reached the proxy: a "
            "client created before the fixture ran*Set any seedcache_* ini setting*",
        ]
    )


def test_options_reach_a_plugin_that_a_conftest_file_registers(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makeconftest('pytest_plugins = ["proxy.pytest_plugin"]\n')
    pytester.makepyfile(test_app=APP_TESTS)
    result = run(
        pytester,
        "--seedcache-mode=auto",
        f"--seedcache-upstream={upstream.base_url}",
        env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["seedcache (auto): 1 hits, 0 misses, 1 recorded*"])


def test_on_a_pytest_older_than_8_the_plugin_leaves_other_suites_alone_and_says_why(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Installing seedcache installs its plugin into every pytest run of the environment.
    monkeypatch.setattr(pytest_plugin, "SUPPORTED", False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_plain="def test_plain():\n    assert 1\n")

    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert "OPENAI_BASE_URL" not in os.environ

    settings = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--seedcache-mode=replay")
    assert settings.ret == pytest.ExitCode.USAGE_ERROR
    settings.stderr.fnmatch_lines(["*seedcache: the pytest plugin needs pytest 8 or newer*"])

    pytester.makepyfile(test_uses="def test_uses(seedcache):\n    assert seedcache\n")
    fixture = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    fixture.assert_outcomes(passed=1, errors=1)
    fixture.stdout.fnmatch_lines(["*the pytest plugin needs pytest 8 or newer*"])
