"""Options and helpers shared by the commands: `--store` and the store it names, the environment
names of options."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import click

from proxy.config import DEFAULT_STORE, Config, StoreSpec
from proxy.errors import SeedcacheError
from proxy.stores.base import check_store, store_exists

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

F = TypeVar("F", bound=Callable[..., Any])


def env(name: str) -> str:
    """The environment variable that feeds option `name`: SEEDCACHE_<NAME>."""
    return "SEEDCACHE_" + name.upper().replace("-", "_")


class EnvOption(click.Option):
    """An option that also reads SEEDCACHE_<OPTION>: a value from there that click refuses (not
    a number, not a boolean) is named by its variable, which is what the user set."""

    def consume_value(
        self, ctx: click.Context, opts: Mapping[str, Any]
    ) -> tuple[Any, click.core.ParameterSource]:
        value, source = super().consume_value(ctx, opts)
        # Where the value came from is recorded on the context only once it is accepted.
        ctx.meta[_SOURCE + str(self.name)] = source
        return value, source

    def get_error_hint(self, ctx: click.Context | None) -> str:
        hint = super().get_error_hint(ctx)
        source = ctx.meta.get(_SOURCE + str(self.name)) if ctx is not None else None
        if source is click.core.ParameterSource.ENVIRONMENT and isinstance(self.envvar, str):
            return f"{hint} (set in the environment: {self.envvar})"
        return hint


_SOURCE = "seedcache.source."


def store_option(func: F) -> F:
    """The `--store` option of every command that reads or writes recordings."""
    return click.option(
        "--store",
        cls=EnvOption,
        envvar=env("store"),
        help=f"Where recordings live: a directory (default {DEFAULT_STORE}), files:DIR, "
        "or redis://host:port/db (rediss:// for TLS, unix:///path/to/redis.sock?db=N for a "
        "socket).",
    )(func)


def store_spec(store: str | None) -> str:
    """The `--store` value with the default filled in; ConfigError when it names no store."""
    # Config owns the default; it is built with the store alone, so nothing else is validated.
    spec = Config.build(store=store).store
    check_store(spec)
    return spec


def shown(spec: str) -> str:
    """A store as output names it: a Redis URL without its credentials (output lands in CI
    logs)."""
    return StoreSpec.parse(spec).shown


def require_store(spec: str) -> None:
    """Refuse a store that does not exist, instead of creating it by opening it: the commands
    that only read recordings must not leave an empty store behind a mistyped --store."""
    if not store_exists(spec):
        raise SeedcacheError(
            f"there is no store at {shown(spec)!r}: nothing has been recorded there"
        )


def counted(n: int, noun: str) -> str:
    """ "1 recording", "2 recordings": `noun` is singular and takes an s."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def progress(length: int, label: str) -> ProgressBar[int]:
    """A progress bar on stderr, drawn only on a terminal (DESIGN §11): piped, click would
    still print its bare label, among the messages a script reads."""
    return click.progressbar(
        length=length, label=label, file=sys.stderr, hidden=not sys.stderr.isatty()
    )
