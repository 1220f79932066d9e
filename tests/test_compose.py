"""The Dockerfile and docker-compose.yml agree with the CLI and the app: every SEEDCACHE_* variable
is one `serve` reads, the commands parse, and the health checks hit the health endpoint.

No Docker engine is needed: the files are parsed, and what they name is checked against the code.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from cli.main import main, serve
from proxy.app import create_app
from proxy.config import Config
from tests.conftest import StartProxy

ROOT = Path(__file__).resolve().parent.parent
HEALTH = "/_seedcache/health"
# ${NAME:-default} in compose files: the default is what `docker compose up` uses when unset.
_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def seedcache_service() -> dict[str, Any]:
    service: dict[str, Any] = compose()["services"]["seedcache"]
    return service


def compose_environment() -> dict[str, str]:
    """The seedcache service's environment as the container sees it with nothing exported."""
    environment = seedcache_service()["environment"]
    if isinstance(environment, list):  # the "- NAME=value" form
        environment = dict(item.split("=", 1) for item in environment)
    return {name: _DEFAULTED.sub(r"\2", str(value)) for name, value in environment.items()}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, arguments = line.partition(" ")
            instructions.append((name.upper(), arguments.strip()))
    return instructions


def instruction(name: str) -> list[str]:
    return [arguments for found, arguments in dockerfile() if found == name]


def exec_form(arguments: str) -> list[str]:
    """An exec-form (JSON array) ENTRYPOINT/CMD; the shell form would not pass signals on."""
    assert arguments.startswith("["), f"use the exec form (a JSON array): {arguments}"
    words: list[str] = json.loads(arguments)
    return words


def dockerfile_environment() -> dict[str, str]:
    environment = {}
    for arguments in instruction("ENV"):
        for pair in shlex.split(arguments):
            name, _, value = pair.partition("=")
            environment[name] = value
    return environment


def serve_envvars() -> set[str]:
    names: set[str] = set()
    for param in serve.params:
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str):
            names.add(envvar)
        elif envvar:
            names.update(envvar)
    return names


def seedcache_variables(environment: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in environment.items() if name.startswith("SEEDCACHE_")}


# -- environment --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environment", [compose_environment, dockerfile_environment], ids=["compose", "Dockerfile"]
)
def test_every_seedcache_variable_is_one_serve_reads(environment: Any) -> None:
    variables = seedcache_variables(environment())

    assert variables
    assert set(variables) <= serve_envvars(), set(variables) - serve_envvars()


def test_the_containers_environment_builds_a_valid_config(monkeypatch: pytest.MonkeyPatch) -> None:
    environment = {**dockerfile_environment(), **compose_environment()}
    for name, value in seedcache_variables(environment).items():
        monkeypatch.setenv(name, value)

    context = serve.make_context("serve", [])
    config = Config.build(**context.params)

    assert config.host == "0.0.0.0"  # inside a container, the explicit choice (DESIGN §10)
    assert config.port == 8080
    assert config.store == "redis://redis:6379/0"
    assert config.mode.value == "auto"
    assert config.upstream_base == "https://api.openai.com/v1"


def test_the_upstream_can_be_overridden_from_the_host() -> None:
    upstream = seedcache_service()["environment"]["SEEDCACHE_UPSTREAM"]

    assert upstream == "${SEEDCACHE_UPSTREAM:-https://api.openai.com/v1}"


# -- commands -----------------------------------------------------------------------------------


def test_the_image_runs_the_seedcache_command() -> None:
    (entrypoint,) = instruction("ENTRYPOINT")
    (cmd,) = instruction("CMD")

    assert exec_form(entrypoint) == ["seedcache"]
    assert exec_form(cmd) == ["serve"]
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'seedcache = "cli.main:main"' in scripts


@pytest.mark.parametrize("source", ["Dockerfile", "compose"])
def test_the_command_parses(source: str) -> None:
    if source == "compose":
        command = seedcache_service().get("command", [])
        args = shlex.split(command) if isinstance(command, str) else list(command)
    else:
        args = exec_form(instruction("CMD")[0])

    context = main.make_context("seedcache", [*args])
    name, command, rest = main.resolve_command(context, [*args])
    assert command is serve
    assert command.make_context(name or "serve", rest, parent=context).params
    result = CliRunner().invoke(main, [*args, "--help"])

    assert result.exit_code == 0, result.output
    assert "Run the proxy" in result.output


def test_the_seedcache_service_waits_for_a_healthy_redis() -> None:
    document = compose()
    service = seedcache_service()

    assert service["build"] == "."
    assert service["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert service["ports"] == ["127.0.0.1:8080:8080"]  # the host's loopback only
    redis = document["services"]["redis"]
    assert redis["image"] == "redis:7-alpine"
    assert redis["command"] == ["redis-server", "--appendonly", "yes"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    volume = redis["volumes"][0].split(":")[0]
    assert volume in document["volumes"]


# -- health checks ------------------------------------------------------------------------------


def health_urls() -> dict[str, str]:
    (healthcheck,) = instruction("HEALTHCHECK")
    dockerfile_test = " ".join(exec_form(healthcheck.partition(" CMD ")[2].strip()))
    compose_test = " ".join(seedcache_service()["healthcheck"]["test"])
    urls = {}
    for name, text in (("Dockerfile", dockerfile_test), ("compose", compose_test)):
        match = re.search(r"http://127\.0\.0\.1:[^/]+(/[\w/]+)", text)
        assert match, text
        assert "urllib.request" in text  # python:3.11-slim has no curl or wget
        urls[name] = match[1]
    return urls


def test_health_checks_use_a_route_the_app_serves(start_proxy: StartProxy) -> None:
    routes = {resource.canonical for resource in create_app(Config()).router.resources()}
    proxy = start_proxy()

    for source, path in health_urls().items():
        assert path == HEALTH, source
        assert path in routes
        answer = proxy.request("GET", path)
        assert answer.status == 200
        assert answer.json()["status"] == "ok"


def test_the_image_leaves_out_tests_data_and_history() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }

    assert {".git", ".seedcache", "tests", "examples"} <= ignored
    for arguments in instruction("COPY"):
        *sources, _ = arguments.split()
        for source in sources:
            assert source not in ignored
            assert (ROOT / source).exists(), source
    assert any(line.startswith("USER") for line in (ROOT / "Dockerfile").read_text().splitlines())
