"""Options and helpers shared by the commands: `--store`, the environment names of options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from proxy.config import DEFAULT_STORE

F = TypeVar("F", bound=Callable[..., Any])


def env(name: str) -> str:
    """The environment variable that feeds option `name`: SEEDCACHE_<NAME>."""
    return "SEEDCACHE_" + name.upper().replace("-", "_")


def store_option(func: F) -> F:
    """The `--store` option of every command that reads or writes recordings."""
    return click.option(
        "--store",
        envvar=env("store"),
        help=f"Where recordings live: a directory (default {DEFAULT_STORE}), files:DIR, "
        "or redis://host:port/db.",
    )(func)
