"""The `seedcache` command: `key` (DESIGN §3), `serve` options and their environment variables
(§11), and `serve` as a real process in front of the fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
from aiohttp import web
from click.testing import CliRunner

from cli.main import main, serve_command, start_line, stop_signals
from proxy.app import CONFIG
from proxy.config import Config, Mode, Repeat
from tests.conftest import API_KEY, RunningProxy, StartProxy
from tests.fake_upstream import FakeUpstream, chat_request, legacy_request
from tests.redis_server import RedisServer
from tests.servers import free_port

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "trip_planner"
HEX64 = re.compile(r"[0-9a-f]{64}")
# Built at run time so that no key-shaped string is committed.
QUERY_KEY = "sk-" + "proj-" + "Q1w2E3r4" * 4


def run(
    *args: str,
    input: str | None = None,
    env: dict[str, str] | None = None,
    terminal_width: int | None = None,
) -> Any:
    return CliRunner().invoke(main, list(args), input=input, env=env, terminal_width=terminal_width)


def printed_key(output: str) -> str:
    last = output.strip().splitlines()[-1]
    assert last.startswith("key: ")
    key = last.removeprefix("key: ")
    assert HEX64.fullmatch(key)
    return key


# -- seedcache key --------------------------------------------------------------------------------


def test_key_of_a_file_is_the_key_the_proxy_uses(proxy: RunningProxy, tmp_path: Path) -> None:
    body = chat_request()
    request_file = tmp_path / "request.json"
    request_file.write_text(json.dumps(body))

    result = run("key", str(request_file))
    proxied = proxy.request("POST", "/v1/chat/completions", body)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "seedcache-key/1"
    assert lines[1:4] == ["", "POST", "/v1/chat/completions"]  # namespace, method, path
    assert json.loads(lines[4]) == body
    assert lines[4] == json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert printed_key(result.stdout) == proxied.headers["x-seedcache-key"]


def test_key_reads_stdin_and_ignores_what_does_not_change_the_output(
    proxy: RunningProxy,
) -> None:
    body = chat_request(seed=5)
    as_sent = dict(reversed(list({**body, "stream": True, "user": "u1", "top_p": None}.items())))

    result = run("key", "-", input=json.dumps(as_sent))
    proxied = proxy.request("POST", "/v1/chat/completions", body)

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "seedcache-key/1"
    assert "stream" not in result.stdout and "top_p" not in result.stdout
    assert printed_key(result.stdout) == proxied.headers["x-seedcache-key"]


@pytest.mark.parametrize("path", ["/v1/completions", "/completions"])
def test_key_of_another_endpoint(path: str, proxy: RunningProxy) -> None:
    body = legacy_request()

    result = run("key", "-", "--path", path, input=json.dumps(body))
    proxied = proxy.request("POST", "/v1/completions", body)

    assert result.exit_code == 0, result.output
    assert "/v1/completions" in result.stdout.splitlines()
    assert printed_key(result.stdout) == proxied.headers["x-seedcache-key"]


def test_keys_of_different_requests_differ() -> None:
    keys = {
        printed_key(run("key", "-", input=json.dumps(body)).stdout)
        for body in (chat_request(), chat_request(seed=124), chat_request(temperature=1))
    }

    assert len(keys) == 3


BIG_SEED = '{"model": "m", "messages": [], "seed": 123456789012345678901234567890}'
DEEP = '{"model": "m", "messages": ' + "[" * 300 + "]" * 300 + "}"


@pytest.mark.parametrize(
    "text",
    [
        "{oops",
        "",
        "[1, 2]",
        '{"model": 5, "messages": []}',
        '{"model": "m", "messages": [], "temperature": NaN}',
        BIG_SEED,
        '{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
        DEEP,
    ],
    ids=[
        "malformed",
        "empty",
        "not-an-object",
        "wrong-type",
        "nan",
        "beyond-64-bits",
        "lone-surrogate",
        "too-deep",
    ],
)
def test_key_refuses_what_the_proxy_refuses_with_the_same_message(
    text: str, proxy: RunningProxy
) -> None:
    refused = proxy.request("POST", "/v1/chat/completions", text)

    result = run("key", "-", input=text)

    assert refused.status == 400
    assert result.exit_code == 2
    assert result.stderr == f"seedcache: {refused.json()['error']['message']}\n"
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "body", "says"),
    [
        (["--path", "/v1/files"], "{}", "POST /v1/files is never recorded"),
        (["--method", "GET", "--path", "/v1/files"], "", "GET /v1/files is never recorded"),
        (["--path", "/v1/../v1/chat/completions"], "{}", "has '.' or '..' segments"),
        (["--namespace", ".hidden"], "{}", "namespace '.hidden' is not valid"),
        (
            ["--path", "/v1/responses"],
            '{"model": "m", "input": "hi", "previous_response_id": "resp_1"}',
            "depends on state held upstream",
        ),
    ],
    ids=["other-endpoint", "other-get", "dot-segments", "namespace", "stateful"],
)
def test_key_refuses_a_request_the_proxy_never_keys(
    args: list[str], body: str, says: str, start_proxy: StartProxy
) -> None:
    replaying = start_proxy(mode="replay")
    method = args[args.index("--method") + 1] if "--method" in args else "POST"
    path = args[args.index("--path") + 1] if "--path" in args else "/v1/chat/completions"
    namespace = args[args.index("--namespace") + 1] if "--namespace" in args else ""
    answered = replaying.request(method, path, body, {"X-Seedcache-Namespace": namespace})

    result = run("key", "-", *args, input=body)

    assert "x-seedcache-key" not in answered.headers  # the proxy gives it no key either
    assert result.exit_code == 2
    assert result.stderr.startswith("seedcache: ") and says in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_key_of_the_model_list_ignores_a_body_as_the_proxy_does(proxy: RunningProxy) -> None:
    listed = proxy.request("GET", "/v1/models")

    result = run("key", "-", "--method", "get", "--path", "/models", input="")

    assert result.exit_code == 0, result.output
    assert printed_key(result.stdout) == listed.headers["x-seedcache-key"]


def test_key_of_a_missing_file_fails(tmp_path: Path) -> None:
    result = run("key", str(tmp_path / "absent.json"))

    assert result.exit_code == 2
    assert "absent.json" in result.stderr


# -- seedcache serve: options and environment -----------------------------------------------------


def test_serve_help_lists_its_options() -> None:
    result = run("serve", "--help")

    assert result.exit_code == 0
    for option in (
        "--host",
        "--port",
        "--mode",
        "--store",
        "--upstream",
        "--max-body",
        "--replay-timing",
        "--upstream-timeout",
        "--on-fingerprint-change",
    ):
        assert option in result.stdout
    assert "OPENAI_BASE_URL" in result.stdout


@pytest.mark.parametrize(
    ("host", "url"),
    [("::1", "http://[::1]:8099 "), ("127.0.0.1", "http://127.0.0.1:8099 ")],
    ids=["ipv6", "ipv4"],
)
def test_the_start_line_writes_an_ipv6_address_in_brackets(host: str, url: str) -> None:
    line = start_line(Config.build(host=host), 8099)

    assert f"seedcache listening on {url}" in line
    assert line.endswith(f"export OPENAI_BASE_URL={url.strip()}/v1")


def test_serve_help_gives_the_defaults_and_the_environment_variables() -> None:
    result = run("serve", "--help", terminal_width=200)

    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    for option, says in {
        "--host": "(default 127.0.0.1)",
        "--port": "(default 8080; 0 picks a free port",
        "--max-body": "(default 32 MiB;",
        "--upstream-timeout": "(default 600)",
        "--connect-timeout": "(default 10)",
        "--workers": "(default 1;",
        "--mode": "auto (default)",
        "--log-level": "info (default)",
    }.items():
        assert says in lines[option], lines[option]
    assert "set in the environment as SEEDCACHE_<OPTION>" in " ".join(result.stdout.split())


@pytest.fixture
def captured_run_app(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace aiohttp's run_app, so that `serve` returns after building its app."""
    captured: dict[str, Any] = {}

    def run_app(app: web.Application, **options: Any) -> None:
        captured["app"] = app
        captured.update(options)
        # The sockets `serve` bound; it closes them when run_app returns.
        captured["addresses"] = [sock.getsockname() for sock in options.get("sock", ())]
        if callable(options.get("print")):
            options["print"]("======== Running ========")  # as aiohttp does once it listens
        if options.get("loop") is not None:
            options["loop"].close()  # as aiohttp does: its signal handlers go with it

    monkeypatch.setattr(web, "run_app", run_app)
    return captured


def test_serve_reads_every_option_from_seedcache_environment_variables(
    captured_run_app: dict[str, Any], tmp_path: Path
) -> None:
    (tmp_path / "store").mkdir()  # replay needs a store that exists
    store = str(tmp_path / "store")
    port = free_port()
    env = {
        "SEEDCACHE_MODE": "none",
        "SEEDCACHE_PORT": str(free_port()),
        "SEEDCACHE_STORE": store,
        "SEEDCACHE_UPSTREAM": "http://127.0.0.1:1/v1",
        "SEEDCACHE_MAX_BODY": "1000",
        "SEEDCACHE_REPLAY_TIMING": "true",
        "SEEDCACHE_UPSTREAM_TIMEOUT": "2.5",
        "SEEDCACHE_ON_FINGERPRINT_CHANGE": "refresh",
        "SEEDCACHE_NAMESPACE": "ci",
        "SEEDCACHE_ALLOW_HOST": "seedcache.test devbox",
    }

    result = run("serve", "--port", str(port), env=env)

    assert result.exit_code == 0, result.output
    config = captured_run_app["app"][CONFIG]
    assert config.mode is Mode.REPLAY
    # The command line wins, and the address is loopback unless told otherwise.
    assert captured_run_app["addresses"] == [("127.0.0.1", port)]
    assert config.port == port
    assert (config.store, config.upstream_base) == (store, "http://127.0.0.1:1/v1")
    assert (config.max_body, config.replay_timing, config.upstream_timeout) == (1000, True, 2.5)
    assert (config.on_fingerprint_change.value, config.namespace) == ("refresh", "ci")
    assert config.allowed_hosts == ("seedcache.test", "devbox")
    assert result.stdout == (
        f"seedcache listening on http://127.0.0.1:{port} in replay mode, store {store}, "
        f"upstream http://127.0.0.1:1/v1; export OPENAI_BASE_URL=http://127.0.0.1:{port}/v1\n"
    )


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"SEEDCACHE_MODE": "sometimes"}, "unknown mode 'sometimes'"),
        ({"SEEDCACHE_UPSTREAM": "ftp://example.com"}, "upstream must be an http(s) URL"),
        ({"SEEDCACHE_MAX_BODY": "0"}, "max-body must be positive"),
        ({"SEEDCACHE_ON_FINGERPRINT_CHANGE": "maybe"}, "unknown on-fingerprint-change"),
        ({"SEEDCACHE_LOG_LEVEL": "loud"}, "unknown log-level 'loud'"),
        ({"SEEDCACHE_ALLOW_HOST": "seedcache.test:8080"}, "--allow-host takes a host name"),
    ],
    ids=["mode", "upstream", "max-body", "on-fingerprint-change", "log-level", "allow-host"],
)
def test_serve_refuses_bad_settings_from_the_environment_with_exit_code_2(
    env: dict[str, str], says: str, captured_run_app: dict[str, Any]
) -> None:
    result = run("serve", env=env)

    assert result.exit_code == 2
    assert says in result.stderr
    assert f"(set in the environment: {next(iter(env))})" in result.stderr  # not on the line
    assert "app" not in captured_run_app  # nothing was started


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"SEEDCACHE_PORT": "abc"},
            "Invalid value for '--port' (set in the environment: SEEDCACHE_PORT): 'abc' is not "
            "a valid integer",
        ),
        (
            {"SEEDCACHE_ACCESS_LOG": "maybe"},
            "Invalid value for '--access-log' (set in the environment: SEEDCACHE_ACCESS_LOG): "
            "'maybe' is not a valid boolean",
        ),
        (
            {"SEEDCACHE_PORT": "0", "SEEDCACHE_WORKERS": "2"},
            "--workers needs a fixed --port "
            "(set in the environment: SEEDCACHE_PORT, SEEDCACHE_WORKERS)",
        ),
    ],
    ids=["port", "access-log", "workers"],
)
def test_serve_names_the_environment_variable_of_a_value_it_cannot_take(
    env: dict[str, str], says: str, captured_run_app: dict[str, Any]
) -> None:
    result = run("serve", env=env)

    assert result.exit_code == 2
    assert says in result.stderr
    assert "app" not in captured_run_app  # nothing was started


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("--port", "99999"), {"SEEDCACHE_ACCESS_TOKEN": "tok-x"}, "port must be 0-65535"),
        (("--workers", "2", "--port", "0"), {"SEEDCACHE_STORE": "st"}, "--workers needs a fixed"),
        (
            (),
            {"SEEDCACHE_MAX_BODY": "0", "SEEDCACHE_STORE": "st"},
            "max-body must be positive (set in the environment: SEEDCACHE_MAX_BODY)\n",
        ),
        (
            ("--upstream-timeout", "0"),
            {"SEEDCACHE_CONNECT_TIMEOUT": "5"},
            "upstream-timeout must be a positive number\n",
        ),
    ],
    ids=["other-variable", "store-variable", "the-variable-at-fault", "the-other-timeout"],
)
def test_a_setting_refused_is_blamed_on_its_own_variable_only(
    args: tuple[str, ...], env: dict[str, str], says: str, captured_run_app: dict[str, Any]
) -> None:
    result = run("serve", *args, env=env)

    assert result.exit_code == 2
    assert says in result.stderr
    if "SEEDCACHE_MAX_BODY" not in says:
        assert "environment" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("--access-token", ""), {}, "--access-token is empty: the proxy would answer anyone"),
        (
            ("--access-token", "team-token", "--access-token", "  "),
            {},
            "--access-token is empty: the proxy would answer anyone",
        ),
        (("--access-token", "@{empty}"), {}, "--access-token @{empty} holds no token"),
        (
            (),
            {"SEEDCACHE_ACCESS_TOKEN": ""},
            "SEEDCACHE_ACCESS_TOKEN is set but holds no token",
        ),
        (
            (),
            {"SEEDCACHE_ACCESS_TOKEN": "  "},
            "SEEDCACHE_ACCESS_TOKEN is set but holds no token",
        ),
        (
            (),
            {"SEEDCACHE_ACCESS_TOKEN": "@{empty}"},
            "holds no token: the proxy would answer anyone; put one token per line in it "
            "(set in the environment: SEEDCACHE_ACCESS_TOKEN)",
        ),
    ],
    ids=["empty", "one-blank", "empty-file", "empty-variable", "blank-variable", "variable-file"],
)
def test_serve_refuses_access_control_that_yields_no_token(
    args: tuple[str, ...],
    env: dict[str, str],
    says: str,
    captured_run_app: dict[str, Any],
    tmp_path: Path,
) -> None:
    # An empty secret mount, an unset shell variable, `${TOKEN}` in a compose file: each used to
    # start a proxy that answered anyone, without a word.
    empty = tmp_path / "tokens.txt"
    empty.write_text("\n  \n")
    args = tuple(arg.format(empty=empty) for arg in args)
    env = {name: value.format(empty=empty) for name, value in env.items()}

    result = run("serve", "--port", "0", "--store", str(tmp_path / "s"), *args, env=env)

    assert result.exit_code == 2
    assert says.format(empty=empty) in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "app" not in captured_run_app  # nothing was started


@pytest.mark.parametrize(
    ("args", "warned"),
    [
        (("--access-token", "team-token-1"), True),
        (("--access-token", "team-token-1", "--upstream-api-key-env", "UPSTREAM_KEY"), False),
        # Replay never goes upstream.
        (("--access-token", "team-token-1", "--mode", "replay"), False),
        ((), False),
    ],
)
def test_serve_warns_when_access_tokens_leave_the_upstream_without_a_key(
    args: tuple[str, ...],
    warned: bool,
    captured_run_app: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A client's token is seedcache's own: it is not sent on, so without a key of the proxy's
    # every miss reached the upstream with none, and nothing said so.
    monkeypatch.setenv("UPSTREAM_KEY", "proxy-own-key")
    store = tmp_path / "s"
    store.mkdir()

    result = run("serve", "--port", "0", "--store", str(store), *args)

    assert result.exit_code == 0, result.output
    assert "app" in captured_run_app
    warning = (
        "seedcache: warning: with --access-token, clients' tokens are not sent upstream: "
        "misses reach the upstream without an API key; give --upstream-api-key-env VAR to "
        "send the key in VAR\n"
    )
    assert (warning in result.stderr) is warned


def test_a_bad_value_on_the_command_line_is_not_said_to_come_from_the_environment(
    captured_run_app: dict[str, Any],
) -> None:
    result = run("serve", "--port", "abc", env={"SEEDCACHE_PORT": "8081"})

    assert result.exit_code == 2
    assert "Invalid value for '--port': 'abc' is not a valid integer" in result.stderr
    assert "environment" not in result.stderr


def test_serve_refuses_an_unknown_log_level_with_one_line_naming_the_levels(
    captured_run_app: dict[str, Any],
) -> None:
    result = run("serve", "--log-level", "loud")

    assert result.exit_code == 2
    assert result.stderr == (
        "seedcache: unknown log-level 'loud'; choose one of debug, info, warning, error, critical\n"
    )
    assert "app" not in captured_run_app


@pytest.mark.parametrize("level", ["debug", "INFO", "Warning", "error", "critical"])
def test_serve_takes_every_log_level_its_help_lists(
    level: str, captured_run_app: dict[str, Any], tmp_path: Path
) -> None:
    result = run("serve", "--port", "0", "--log-level", level, "--store", str(tmp_path / "s"))

    assert result.exit_code == 0, result.output
    assert captured_run_app["app"][CONFIG].log_level == level.lower()
    assert level.lower() in run("serve", "--help").stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--mode", "replay", "--store", "no-such-store"), "replay on a store that does not exist"),
        (("--store", "redis:/127.0.0.1:6379"), "is not a Redis URL: write redis://"),
        (("--store", "reddis://127.0.0.1:6379/0"), "is not a store seedcache knows"),
        (("--store", "mysql://x"), "'mysql://x' is not a store seedcache knows"),
        (("--store", "redis://127.0.0.1:6379/abc"), "the database 'abc' is not a number"),
    ],
    ids=["replay-on-nothing", "redis-typo", "scheme-typo", "other-scheme", "redis-db"],
)
def test_a_mistyped_store_is_refused_not_created(
    args: tuple[str, ...],
    says: str,
    captured_run_app: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("serve", *args)

    assert result.exit_code == 2
    assert says in result.stderr
    assert "app" not in captured_run_app
    assert list(tmp_path.iterdir()) == []  # no directory made of the typo


@pytest.mark.parametrize("mode", ["replay", "auto"])
def test_serve_refuses_a_files_store_given_without_files(
    mode: str, captured_run_app: dict[str, Any], tmp_path: Path
) -> None:
    recordings = tmp_path / "recordings"
    shutil.copytree(EXAMPLE / "tests" / "recordings", recordings)
    before = sorted(path.name for path in recordings.iterdir())

    result = run("serve", "--mode", mode, "--store", str(recordings))

    assert result.exit_code == 2
    assert f"holds recording files (<key>.json): use --store files:{recordings}" in result.stderr
    assert "app" not in captured_run_app  # refused before anything listens
    assert sorted(path.name for path in recordings.iterdir()) == before


def test_the_start_up_line_shows_a_redis_store_without_its_password(
    captured_run_app: dict[str, Any], own_redis_server: RedisServer
) -> None:
    with redis.Redis(port=own_redis_server.port) as client:
        client.config_set("requirepass", "hunter2-password")
    url = f"redis://:hunter2-password@127.0.0.1:{own_redis_server.port}/0?client_name=ci"

    result = run("serve", "--port", "0", "--store", url)

    assert result.exit_code == 0, result.output
    assert f"store redis://127.0.0.1:{own_redis_server.port}/0, upstream" in result.stdout
    assert "hunter2" not in result.stdout


@pytest.mark.parametrize(
    ("policy", "warned"),
    [
        ("allkeys-lru", True),
        ("allkeys-random", True),
        ("volatile-lru", False),
        ("noeviction", False),
    ],
)
def test_serve_warns_of_a_redis_that_evicts_recordings(
    policy: str, warned: bool, captured_run_app: dict[str, Any], own_redis_server: RedisServer
) -> None:
    with redis.Redis(port=own_redis_server.port) as client:
        client.config_set("maxmemory-policy", policy)

    result = run("serve", "--port", "0", "--store", f"redis://127.0.0.1:{own_redis_server.port}/0")

    assert result.exit_code == 0, result.output
    assert "app" in captured_run_app
    if warned:
        assert f"has maxmemory-policy {policy}: when it fills up it deletes recordings" in (
            result.stderr
        )
    else:
        assert "maxmemory-policy" not in result.stderr


@pytest.mark.parametrize(
    ("store", "says"),
    [
        ("redis://127.0.0.1:1/0", "cannot reach Redis at redis://127.0.0.1:1/0: "),
        (
            "redis://:hunter2@127.0.0.1:1/0?ssl_cert_reqs=none",
            "redis://127.0.0.1:1/0 is not a usable Redis URL: ",
        ),
    ],
    ids=["unreachable", "option-of-rediss"],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_redis_it_cannot_use_exits_at_start_with_one_line(
    store: str, says: str, workers: str, captured_run_app: dict[str, Any]
) -> None:
    # Every request would get a 503 (`ls` and the other commands refuse it the same way).
    result = run(
        "serve",
        "--mode",
        "replay",
        "--store",
        store,
        "--workers",
        workers,
        "--port",
        str(free_port()),
    )

    assert result.exit_code == 2
    assert result.stderr.startswith(f"seedcache: {says}")
    assert result.stderr.count("\n") == 1
    assert "hunter2" not in result.stderr
    assert result.stdout == ""
    assert "app" not in captured_run_app


def test_serve_in_passthrough_does_not_touch_its_redis_at_start(
    captured_run_app: dict[str, Any],
) -> None:
    # Passthrough never uses the store (DESIGN §2): a Redis that is down is no reason to stop.
    store = "redis://127.0.0.1:1/0"
    result = run("serve", "--mode", "passthrough", "--store", store, "--port", str(free_port()))

    assert result.exit_code == 0, result.output
    assert "app" in captured_run_app


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("store", "says"),
    [
        ("redis://:wrong@127.0.0.1:{port}/0", "refused the credentials"),
        ("redis://127.0.0.1:{port}/0", "needs a password: give it in the store URL, redis://"),
        # Over a unix socket redis-py says so with a plain ConnectionError; and a health check
        # meeting it reconnected until the stack ran out, for ever.
        ("unix://{socket}?db=0", "needs a password: give it in the store URL"),
        ("unix://{socket}?db=0&password=wrong", "refused the credentials"),
        ("unix://{socket}?db=0&health_check_interval=15", "needs a password"),
    ],
    ids=[
        "wrong-password",
        "no-password",
        "socket-no-password",
        "socket-wrong-password",
        "socket-health-checks-asked",
    ],
)
def test_serve_on_a_redis_that_refuses_the_client_exits_at_start_saying_why(
    store: str, says: str, captured_run_app: dict[str, Any], own_redis_server: RedisServer
) -> None:
    with redis.Redis(port=own_redis_server.port) as client:
        client.config_set("requirepass", "right-password")
    url = store.format(port=own_redis_server.port, socket=own_redis_server.socket)

    result = run("serve", "--store", url)

    assert result.exit_code == 2
    assert says in result.stderr
    assert "HELLO" not in result.stderr and "app" not in captured_run_app


def test_serve_on_a_port_in_use_is_a_one_line_error(
    captured_run_app: dict[str, Any], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = run("serve", "--port", str(port), "--store", str(tmp_path / "store"))

    assert result.exit_code == 2
    assert (
        result.stderr == f"seedcache: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )
    assert result.stdout == ""
    assert "app" not in captured_run_app


def test_serve_refuses_a_non_integer_port_from_the_environment(
    captured_run_app: dict[str, Any],
) -> None:
    result = run("serve", env={"SEEDCACHE_PORT": "eighty"})

    assert result.exit_code == 2
    assert "eighty" in result.stderr
    assert "app" not in captured_run_app


# -- seedcache serve as a process -----------------------------------------------------------------


def seedcache_executable() -> str:
    """The console script installed next to this interpreter."""
    script = Path(sys.executable).with_name("seedcache")
    assert script.exists(), f"{script} is missing: pip install -e '.[test]'"
    return str(script)


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The next stdout line of `process`, failing after `timeout` seconds instead of hanging."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    return process.stdout.readline()


def wait_healthy(port: int, process: subprocess.Popen[str], timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, "seedcache serve exited"
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", "/_seedcache/health")
            response = connection.getresponse()
            if response.status == 200:
                health: dict[str, Any] = json.loads(response.read())
                return health
        except OSError:
            pass
        finally:
            connection.close()
        assert time.monotonic() < deadline, f"seedcache serve not healthy within {timeout} s"
        time.sleep(0.05)


def test_serve_runs_as_a_process_prints_one_line_and_proxies(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    port = free_port()
    store = tmp_path / "store"
    env = {
        **os.environ,
        "SEEDCACHE_MODE": "once",
        "SEEDCACHE_STORE": str(store),
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        seedcache_executable(),
        "serve",
        "--port",
        str(port),
        "--upstream",
        upstream.base_url,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        line = read_line(process, timeout=30)
        health = wait_healthy(port, process)
        base_url = f"http://127.0.0.1:{port}/v1"
        with openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
            first = client.chat.completions.with_raw_response.create(**chat_request())
            second = client.chat.completions.with_raw_response.create(**chat_request())
            in_query = client.chat.completions.with_raw_response.create(
                **chat_request(seed=3), extra_query={"api_key": QUERY_KEY}
            )
    finally:
        process.terminate()
        out, err = process.communicate(timeout=15)

    assert line == (
        f"seedcache listening on http://127.0.0.1:{port} in auto mode, store {store}, "
        f"upstream {upstream.base_url}; export OPENAI_BASE_URL={base_url}\n"
    )
    assert out == ""  # the start-up line is the only thing on stdout
    assert health["mode"] == "auto"
    assert first.headers["x-seedcache-status"] == "recorded"
    assert second.headers["x-seedcache-status"] == "hit"
    assert second.parse().id == upstream.chat_completion(chat_request())["id"]
    assert upstream.count() == 2  # the first request and the one with a query string
    assert upstream.calls[0].headers["authorization"] == f"Bearer {API_KEY}"
    assert first.headers["x-seedcache-key"] in err  # the access log went to stderr…
    assert API_KEY not in err  # …without the client's key
    assert in_query.headers["x-seedcache-key"] in err
    assert "api_key=<redacted>" in err and QUERY_KEY not in err  # …or one in a query string
    assert process.returncode == 0


def test_serve_on_port_0_announces_the_port_it_listens_on(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    command = [seedcache_executable(), "serve", "--port", "0", "--upstream", upstream.base_url]
    env = {**os.environ, "SEEDCACHE_STORE": str(tmp_path / "store"), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True
    )
    try:
        line = read_line(process, timeout=30)
        announced = re.search(r"listening on http://127\.0\.0\.1:(\d+) ", line)
        assert announced, line
        port = int(announced[1])
        assert port != 0
        assert line.endswith(f"export OPENAI_BASE_URL=http://127.0.0.1:{port}/v1\n")
        assert wait_healthy(port, process)["status"] == "ok"
    finally:
        process.terminate()
        process.communicate(timeout=15)
    assert process.returncode == 0


def test_a_replay_server_says_how_to_record_its_miss_where_it_replays_from(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    store = tmp_path / "my store"
    store.mkdir()
    port = free_port()
    command = [seedcache_executable(), "serve", "--port", str(port), "--mode", "replay"]
    command += ["--store", str(store), "--upstream", upstream.base_url, "--namespace", "evals"]
    command += ["--repeat", "sequence"]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ, text=True
    )
    try:
        wait_healthy(port, process)
        base_url = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
        with client, pytest.raises(openai.NotFoundError) as missed:
            client.chat.completions.create(**chat_request())
    finally:
        process.terminate()
        process.communicate(timeout=15)

    assert (
        f"Record it with: seedcache serve --mode auto --store '{store}' "
        f"--upstream {upstream.base_url} --namespace evals --repeat sequence"
    ) in missed.value.message
    assert upstream.count() == 0


@pytest.mark.parametrize(
    ("given", "command"),
    [
        ({}, "seedcache serve --mode record"),
        ({"store": "files:recordings"}, "seedcache serve --mode record --store files:recordings"),
        # The store's credentials stay out of an answer a client reads.
        (
            {"store": "redis://:hunter2secret@cache:6379/0?ssl_cert_reqs=none"},
            "seedcache serve --mode record --store redis://cache:6379/0",
        ),
        ({"isolate_by_key": True}, "seedcache serve --mode record --isolate-by-key"),
        ({"repeat": Repeat.REUSE}, "seedcache serve --mode record"),
    ],
)
def test_the_record_command_of_a_hint_carries_what_decides_where_recordings_go(
    given: dict[str, Any], command: str
) -> None:
    assert serve_command(Config.build(**given), "record") == command


# -- seedcache serve --workers ---------------------------------------------------------------------


def test_workers_on_a_port_in_use_fail_with_one_line_and_exit_code_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [seedcache_executable(), "serve", "--workers", "2", "--port", str(port)]
        command += ["--store", str(tmp_path / "store")]

        finished = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert finished.returncode == 2
    assert finished.stdout == ""  # nothing announced: no worker could listen
    assert finished.stderr == (
        f"seedcache: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


def worker_pids(parent: int) -> list[int]:
    """The processes `serve --workers N` started to serve (not multiprocessing's helpers)."""
    children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True)
    return [
        int(pid)
        for pid in children.stdout.split()
        if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    ]


def start_workers(
    upstream: FakeUpstream, store: Path, workers: int = 2
) -> tuple[subprocess.Popen[str], int, list[int]]:
    """`serve --workers N` in a session of its own, serving: the process, its port, its workers
    (none when N is 1: serve serves itself)."""
    port = free_port()
    command = [seedcache_executable(), "serve", "--workers", str(workers), "--port", str(port)]
    command += ["--upstream", upstream.base_url, "--store", str(store)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SEEDCACHE_ACCESS_LOG": "false"}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        start_new_session=True,  # so that a test can signal the whole group, and clean it up
    )
    try:
        line = read_line(process, timeout=60)
        assert f"listening on http://127.0.0.1:{port} " in line
        assert (f"{workers} workers" in line) == (workers > 1)
        assert wait_healthy(port, process)["status"] == "ok"  # announced once serving
        return process, port, worker_pids(process.pid) if workers > 1 else []
    except BaseException:
        # The callers clean up only what they were handed: left running, it would outlive pytest.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise


@pytest.mark.parametrize(
    ("workers", "signalled", "signals"),
    [
        (2, "serve", 1),
        (2, "its process group", 1),
        (2, "its process group", 2),
        (1, "serve", 1),
        (1, "serve", 2),
    ],
)
def test_serve_stopped_with_sigterm_finishes_and_records_the_requests_in_flight(
    workers: int, signalled: str, signals: int, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # docker stop signals serve; systemd signals every process of the group, workers included,
    # and may signal again: a second SIGTERM dropped every request in flight.
    upstream.delay = 3
    process, port, _ = start_workers(upstream, tmp_path / "store", workers)
    answer: dict[str, Any] = {}
    asking = threading.Thread(target=ask, args=(port, answer))
    try:
        asking.start()
        wait_until_upstream(upstream)
        for _ in range(signals):
            if signalled == "serve":
                process.send_signal(signal.SIGTERM)
            else:
                os.killpg(process.pid, signal.SIGTERM)
            time.sleep(0.3)  # the second one while the first one's shutdown runs
        _, err = process.communicate(timeout=90)
        asking.join(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()

    assert answer["status"] == 200
    assert answer["headers"]["X-Seedcache-Status"] == "recorded"
    assert answer["body"]["id"] == upstream.chat_completion(chat_request())["id"]
    assert process.returncode == 0, err
    assert "killed" not in err and "Traceback" not in err
    listed = run("ls", "--store", str(tmp_path / "store"), "--json")
    assert [r["key"] for r in json.loads(listed.output)] == [answer["headers"]["X-Seedcache-Key"]]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_ctrl_c_stops_serve_at_once_and_says_so(
    workers: int, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # The first one waits for the requests in flight (up to a minute); a user who presses it
    # again means now.
    upstream.delay = 30
    process, port, _ = start_workers(upstream, tmp_path / "store", workers)
    asking = threading.Thread(target=ask_quietly, args=(port,), daemon=True)
    try:
        asking.start()
        wait_until_upstream(upstream)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's process group
        time.sleep(0.3)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()

    assert process.returncode == 130, err
    assert "interrupted again: stopped without finishing" in err
    assert "Traceback" not in err


def ask(port: int, answer: dict[str, Any]) -> None:
    """A chat request to the proxy at `port`; its status, headers and body go into `answer`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(chat_request()).encode())
        response = connection.getresponse()
        answer.update(status=response.status, headers=dict(response.headers))
        answer["body"] = json.loads(response.read())
    except OSError as exc:  # the request in flight was dropped
        answer["status"] = repr(exc)
    finally:
        connection.close()


def wait_until_upstream(upstream: FakeUpstream) -> None:
    """Until a request has reached the fake upstream."""
    deadline = time.monotonic() + 10
    while upstream.count() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def ask_quietly(port: int) -> None:
    """A chat request to the proxy at `port` whose answer nobody waits for."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    with contextlib.suppress(OSError):
        connection.request("POST", "/v1/chat/completions", json.dumps(chat_request()).encode())
        connection.getresponse().read()
    connection.close()


def test_a_worker_starts_one_graceful_shutdown_however_many_sigterms_arrive() -> None:
    # systemd signals the whole group and serve forwards one more: two SIGTERMs can reach the
    # worker's loop in one read of its wake-up pipe, and the second must not cut the shutdown
    # the first one started (the requests in flight were dropped).
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    loop = asyncio.new_event_loop()
    try:
        stop_signals(loop, worker=True)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # both before the loop reads either
        with pytest.raises(web.GracefulExit):
            loop.run_until_complete(asyncio.sleep(0.05))
        loop.run_until_complete(asyncio.sleep(0.05))  # the shutdown's turn: nothing raised
        signal.raise_signal(signal.SIGTERM)  # ignored from now on
        loop.run_until_complete(asyncio.sleep(0.05))
    finally:
        loop.close()
        for number, handler in saved.items():
            signal.signal(number, handler)


def test_a_worker_stopped_by_a_signal_of_its_own_makes_serve_exit_non_zero(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    process, _, (first, _) = start_workers(upstream, tmp_path / "store")
    try:
        os.kill(first, signal.SIGTERM)  # serve was not asked to stop: the service is down
        _, err = process.communicate(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()

    assert process.returncode == 1
    assert re.fullmatch(r"seedcache: worker seedcache-\d stopped; the others were stopped\n", err)


def test_when_a_worker_dies_the_others_stop_and_serve_exits_non_zero(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    process, _, (first, second) = start_workers(upstream, tmp_path / "store")
    try:
        os.kill(first, signal.SIGKILL)
        _, err = process.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left, workers included
        process.communicate()

    assert process.returncode == 1
    assert re.fullmatch(
        r"seedcache: worker seedcache-\d was killed by signal 9; the others were stopped\n", err
    )
    deadline = time.monotonic() + 10
    while Path(f"/proc/{second}").exists():  # stopped, and reaped by serve
        assert time.monotonic() < deadline, "the other worker is still running"
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Whether process `pid` runs: one that ended but is not reaped yet (an orphan waits for
    whoever adopted it) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_when_serve_is_killed_its_workers_finish_the_requests_in_flight_and_stop(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    # kill -9 (the OOM killer, a supervisor giving up) left the workers serving the port on
    # their own, with the old settings, for ever.
    upstream.delay = 2
    process, port, workers = start_workers(upstream, tmp_path / "store")
    answer: dict[str, Any] = {}
    asking = threading.Thread(target=ask, args=(port, answer))
    try:
        asking.start()
        wait_until_upstream(upstream)
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(running(pid) for pid in workers):
            assert time.monotonic() < deadline, "the workers still run without serve"
            time.sleep(0.05)
        asking.join(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the workers, when they do not stop
        _, err = process.communicate(timeout=10)

    assert answer["status"] == 200
    assert answer["headers"]["X-Seedcache-Status"] == "recorded"
    listed = run("ls", "--store", str(tmp_path / "store"), "--json")
    assert [r["key"] for r in json.loads(listed.output)] == [answer["headers"]["X-Seedcache-Key"]]
    assert sorted(re.findall(r"the serve process of worker (seedcache-\d) ended", err)) == [
        "seedcache-0",
        "seedcache-1",
    ]
    assert "Traceback" not in err
    with pytest.raises(ConnectionRefusedError):  # nothing serves the port any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_serve_with_workers_refuses_the_port_of_another_with_one_line_and_exit_code_2(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    # Workers share their port with SO_REUSEPORT, and so with the workers of another serve: a
    # replay serve started beside a running one served some of the requests it was sent.
    process, port, _ = start_workers(upstream, tmp_path / "store")
    (tmp_path / "other").mkdir()
    command = [seedcache_executable(), "serve", "--workers", "2", "--port", str(port)]
    command += ["--mode", "replay", "--store", str(tmp_path / "other")]
    second = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = second.communicate(timeout=30)
        modes = {wait_healthy(port, process)["mode"] for _ in range(10)}
    finally:
        for started in (second, process):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started.pid, signal.SIGKILL)
            started.communicate()

    assert second.returncode == 2
    assert out == ""
    assert err == f"seedcache: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert modes == {"auto"}  # the first one serves every request, as before


def test_serve_starts_where_the_loop_has_no_signal_handlers() -> None:
    # Windows: aiohttp's own handling skipped them; serve must not fail at start either.
    class WindowsLoop(asyncio.SelectorEventLoop):
        def add_signal_handler(self, *args: Any) -> None:
            raise NotImplementedError

    loop = WindowsLoop()
    saved = signal.getsignal(signal.SIGINT)
    try:
        assert stop_signals(loop, worker=False) is loop
    finally:
        loop.close()
        signal.signal(signal.SIGINT, saved)
