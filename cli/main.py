"""The `seedcache` command: parses options into a `Config` and calls into `proxy/`.

Options default to None so that `Config` alone decides the defaults; every `serve` option also
reads `SEEDCACHE_<OPTION>` from the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import multiprocessing
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import click

from cli.audit import audit, probe, verify
from cli.options import EnvOption, F, env, shown, store_option
from cli.recordings import export, import_, ls, prune, rm, show
from proxy.config import (
    LOG_LEVELS,
    Config,
    MiB,
    Mode,
    OnFingerprintChange,
    Repeat,
    StoreSpec,
)
from proxy.errors import ConfigError, SeedcacheError
from proxy.keys import (
    RECORDED,
    CanonicalRequest,
    has_dot_segments,
    namespace_problem,
    normalise_path,
)
from proxy.stores.base import check_store, open_store


class Group(click.Group):
    """Maps the package's errors to a one-line message and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SeedcacheError as exc:
            click.echo(f"seedcache: {exc}", err=True)
            sys.exit(2)


@click.group(cls=Group)
@click.version_option(package_name="seedcache")
def main() -> None:
    """seedcache: record, replay and audit OpenAI-compatible LLM calls."""
    # A redirected output on Windows is written in its ANSI code page (cp1252), which lacks most
    # of what recordings hold: such characters are written as \u escapes instead of failing.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


# Config owns the defaults (STYLE: defaults in one place); the help texts name them from it.
DEFAULTS = Config()


def _size(n: int) -> str:
    """A byte count as the help text gives it: 32 MiB, or bytes."""
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n} bytes"


def _choices(values: list[str], default: str) -> str:
    """ "keep (default), refresh or fail" """
    named = [f"{v} (default)" if v == default else v for v in values]
    return ", ".join(named[:-1]) + " or " + named[-1]


def serve_option(*decls: str, **attrs: Any) -> Callable[[F], F]:
    """An option of `serve`, which also reads SEEDCACHE_<OPTION> (named after its long flag,
    `--max-body`: SEEDCACHE_MAX_BODY) and names it when its value there is bad."""
    flag = next(d for d in decls if d.startswith("--")).split("/")[0]
    return click.option(*decls, cls=EnvOption, envvar=env(flag[2:]), **attrs)


@main.command(
    epilog="Every option can also be set in the environment as SEEDCACHE_<OPTION>, e.g. "
    "SEEDCACHE_MODE=replay or SEEDCACHE_UPSTREAM_TIMEOUT=60; the command line wins."
)
@serve_option("--host", help=f"Address to bind (default {DEFAULTS.host}).")
@serve_option(
    "--port",
    type=int,
    help=f"Port to listen on (default {DEFAULTS.port}; 0 picks a free port, which the start-up "
    "line names).",
)
@serve_option(
    "--mode",
    help=f"{_choices([m.value for m in Mode], DEFAULTS.mode.value)}; VCR aliases none, once, "
    "new_episodes, all.",
)
@store_option
@serve_option(
    "--upstream",
    help=f"The real API's base URL (default {DEFAULTS.upstream}).",
)
@serve_option("--namespace", help="Namespace of the recordings.")
@serve_option(
    "--max-body",
    type=int,
    help=f"Largest request body, bytes (default {_size(DEFAULTS.max_body)}; larger ones get 413).",
)
@serve_option(
    "--replay-timing/--no-replay-timing",
    default=None,
    help="Replay streams with their recorded pacing.",
)
@serve_option(
    "--upstream-timeout",
    type=float,
    help=f"Read timeout of an upstream call, s (default {DEFAULTS.upstream_timeout:g}).",
)
@serve_option(
    "--connect-timeout",
    type=float,
    help=f"Connect timeout of an upstream call, s (default {DEFAULTS.connect_timeout:g}).",
)
@serve_option(
    "--on-fingerprint-change",
    help=f"{_choices([o.value for o in OnFingerprintChange], DEFAULTS.on_fingerprint_change)}, "
    "when no sample has the current fingerprint.",
)
@serve_option(
    "--repeat",
    help=f"{_choices([r.value for r in Repeat], DEFAULTS.repeat)}.",
)
@serve_option("--audit-log", help="JSONL audit log (default in the store).")
@serve_option(
    "--audit-embeddings",
    help="Embedding model for the audit's embedding distance (off by default).",
)
@serve_option(
    "--access-token",
    "access_tokens",
    multiple=True,
    help="Require clients to present this token as their API key (repeatable; @FILE reads "
    "one token per line).",
)
@serve_option(
    "--allow-host",
    "allowed_hosts",
    multiple=True,
    help="Also answer requests addressed to this host name, and from web pages on it "
    "(repeatable). On a loopback address, or with this option, requests addressed to other names "
    "than localhost and loopback addresses are refused: a web page could use the proxy.",
)
@serve_option(
    "--upstream-api-key-env",
    help="Send the key in this environment variable upstream instead of the client's.",
)
@serve_option(
    "--isolate-by-key/--no-isolate-by-key",
    default=None,
    help="Keep each client API key's recordings in its own namespace.",
)
@serve_option(
    "--workers",
    type=int,
    help=f"Processes on one port (default {DEFAULTS.workers}; more than one needs a fixed "
    "--port). Identical concurrent misses are coalesced across them only through a Redis store.",
)
@serve_option(
    "--log-level",
    help=f"{_choices(list(LOG_LEVELS), DEFAULTS.log_level)}.",
)
@serve_option(
    "--access-log/--no-access-log",
    default=None,
    help=f"One line per request (default {'on' if DEFAULTS.access_log else 'off'}).",
)
def serve(**options: Any) -> None:
    """Run the proxy. Point OPENAI_BASE_URL at the URL it prints."""
    variable = env("access-token")
    if not options.get("access_tokens") and variable in os.environ:
        # click takes an empty variable for an unset one, but whoever set it (`${TOKEN}` in a
        # compose file) asked for access control: without a token the proxy would answer anyone.
        raise ConfigError(
            f"{variable} is set but holds no token: the proxy would answer anyone; give the "
            f"token, or unset {variable}"
        )
    try:
        options["access_tokens"] = read_tokens(options.get("access_tokens") or ())
        config = Config.build(**options)
        # A miss or a stale recording says how to record it: into the same store and namespace,
        # with the same --repeat, as this server reads them.
        config = replace(
            config,
            record_hint=serve_command(config, "auto"),
            rerecord_hint=serve_command(config, "record"),
        )
        if config.workers > 1 and config.port == 0:
            raise ConfigError("--workers needs a fixed --port", options=("workers", "port"))
    except ConfigError as exc:
        # A value at fault from SEEDCACHE_* is not on the command line: say where it came from.
        given = click.get_current_context()
        from_env = [
            param.envvar
            for param in given.command.params
            if param.name in exc.options
            and isinstance(param.envvar, str)
            and given.get_parameter_source(param.name) is click.core.ParameterSource.ENVIRONMENT
        ]
        if from_env:
            raise ConfigError(f"{exc} (set in the environment: {', '.join(from_env)})") from None
        raise
    if config.access_tokens and not config.upstream_api_key_env and config.mode is not Mode.REPLAY:
        # A client's token is seedcache's, not the upstream's: it is never sent on, so a miss
        # would reach the upstream with no key at all (fine for a local server only).
        click.echo(
            "seedcache: warning: with --access-token, clients' tokens are not sent upstream: "
            "misses reach the upstream without an API key; give --upstream-api-key-env VAR "
            "to send the key in VAR",
            err=True,
        )
    # A files store's directory given without files: (or the reverse) is refused before binding.
    spec = check_store(config.store)
    if spec.kind == "redis" and config.mode is not Mode.PASSTHROUGH:  # DESIGN §2: not touched
        # Every request would fail with a 503: most likely a mistyped URL or a server not up.
        asyncio.run(reach(config.store))
    directory = spec.directory
    if config.mode is Mode.REPLAY and directory is not None and not os.path.isdir(directory):
        # Every request would miss: most likely a mistyped --store.
        raise ConfigError(
            f"--mode replay on a store that does not exist ({directory!r}): nothing could be "
            "replayed; check --store, or record into it first with --mode auto"
        )
    if config.workers == 1:
        # The line is printed once the proxy serves, so that it never announces a failure, and
        # with the port bound (--port 0 picks one).
        run_server(config, on_ready=lambda port: click.echo(start_line(config, port)))
        return
    code = run_workers(config)
    if code:
        sys.exit(code)


def serve_command(config: Config, mode: str) -> str:
    """The `seedcache serve` command line that records in `mode` where `config` replays from."""
    words = ["seedcache", "serve", "--mode", mode]
    if config.store != DEFAULTS.store:
        words += ["--store", shlex.quote(StoreSpec.parse(config.store).shown)]
    if config.upstream != DEFAULTS.upstream:
        words += ["--upstream", shlex.quote(config.upstream_base)]
    if config.namespace != DEFAULTS.namespace:
        words += ["--namespace", shlex.quote(config.namespace)]
    if config.repeat is not DEFAULTS.repeat:
        words += ["--repeat", config.repeat.value]
    if config.isolate_by_key:
        words.append("--isolate-by-key")
    return " ".join(words)


async def reach(spec: str) -> None:
    """Read the store once, as the health check does: StoreError when it cannot be reached.
    Warn when the server may evict recordings."""
    from proxy.stores.redis_store import RedisStore

    store = open_store(spec)
    try:
        await store.get_meta("health")
        policy = await store.eviction_policy() if isinstance(store, RedisStore) else None
    finally:
        await store.close()
    if policy is not None and policy.startswith("allkeys-"):
        # Recordings carry no TTL: volatile-* policies never evict them, allkeys-* ones do,
        # silently, and each evicted recording is a paid upstream call again.
        click.echo(
            f"seedcache: warning: Redis at {shown(spec)} has maxmemory-policy "
            f"{policy}: when it fills up it deletes recordings, and their requests go upstream "
            "again; use noeviction (or a volatile-* policy) for a store of recordings",
            err=True,
        )


# What a worker of `serve --workers N` sends its parent once it serves; otherwise it sends why it
# could not start.
READY = "ready"
# How long a stopping worker may take to finish the requests in flight: aiohttp's graceful
# shutdown (60 s) and a little more. One still running then is killed.
WORKER_SHUTDOWN = 65.0


def run_workers(config: Config) -> int:
    """Serve `config` from `config.workers` processes on one port, until interrupted or until one
    of them ends, which stops the others; the exit code for the parent."""
    # The workers bind with SO_REUSEPORT, which shares the port with any listener that sets it
    # too: beside the workers of another serve (another store, another mode) they would each get
    # some of the requests. Bound first as serve without workers binds it (without SO_REUSEPORT),
    # a port in use is refused, with the same line.
    for sock in listen(config.host, config.port):
        sock.close()
    context = multiprocessing.get_context("spawn")
    workers: dict[Connection, BaseProcess] = {}
    senders: list[Connection] = []
    for n in range(config.workers):
        receiver, sender = context.Pipe(duplex=False)
        workers[receiver] = context.Process(
            target=run_worker, args=(config, sender), name=f"seedcache-{n}"
        )
        senders.append(sender)
    # SIGTERM (docker stop, systemd) stops serve as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    ended = None
    try:
        for worker in workers.values():
            worker.start()
        for sender in senders:
            sender.close()  # each worker holds its own end now
        _wait_until_serving(workers)
        click.echo(start_line(config, config.port))
        channel, ended = _first_to_end(workers)
        told = _message(channel)
    except KeyboardInterrupt:
        pass  # asked to stop
    finally:
        forced = _stop_workers(list(workers.values()))
    if forced:
        return 130
    if ended is None:
        return 0
    if told is not None and told != READY:
        click.echo(f"seedcache: {told}", err=True)  # a worker's error once it served
    code = ended.exitcode or 0
    if code > 0:
        why = f"exited with code {code}"
    elif code < 0:
        why = f"was killed by signal {-code}"
    else:
        why = "stopped"  # by a signal of its own: serve was not asked to stop
    click.echo(f"seedcache: worker {ended.name} {why}; the others were stopped", err=True)
    return code if code > 0 else 1


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _stop_workers(workers: list[BaseProcess]) -> bool:
    """Ask each worker once to stop (SIGTERM: it finishes the requests in flight, and records
    them), then wait; kill those still running after WORKER_SHUTDOWN, or at a second Ctrl-C
    (then True). Another SIGTERM meanwhile (systemd signals the whole group) is ignored."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    running = [worker for worker in workers if worker.is_alive()]
    for worker in running:
        worker.terminate()
    deadline = time.monotonic() + WORKER_SHUTDOWN
    forced = False
    try:
        for worker in running:
            worker.join(max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        forced = True
        click.echo(INTERRUPTED_AGAIN.format(what="the workers' requests in flight"), err=True)
    for worker in running:
        if worker.is_alive():
            if not forced:
                click.echo(
                    f"seedcache: worker {worker.name} did not stop in time: killed", err=True
                )
            worker.kill()
            worker.join()
    return forced


def _wait_until_serving(workers: dict[Connection, BaseProcess]) -> None:
    """Return once every worker serves; raise the first start-up error one of them reports."""
    waiting = dict(workers)
    while waiting:
        ready = wait([*waiting, *(worker.sentinel for worker in waiting.values())])
        for channel, worker in list(waiting.items()):
            if channel not in ready and worker.sentinel not in ready:
                continue
            message = _message(channel)
            if message == READY:
                del waiting[channel]
            elif message is not None:
                raise ConfigError(message)
            else:  # it ended without a word: its traceback went to stderr
                worker.join()
                raise SeedcacheError(
                    f"worker {worker.name} ended with exit code {worker.exitcode} before it "
                    "could serve"
                )


def _message(channel: Connection) -> str | None:
    """What a worker sent, or None when it sent nothing (it ended without a word)."""
    if not channel.poll():
        return None
    try:
        return str(channel.recv())
    except EOFError:
        return None


def _first_to_end(workers: dict[Connection, BaseProcess]) -> tuple[Connection, BaseProcess]:
    ended = wait([worker.sentinel for worker in workers.values()])
    channel, worker = next(item for item in workers.items() if item[1].sentinel in ended)
    worker.join()
    return channel, worker


def run_worker(config: Config, parent: Connection) -> None:
    """One process of `serve --workers N`: tells the parent once it serves, or why it cannot
    (and exits 2, as `serve` does)."""
    try:
        run_server(config, worker=True, on_ready=lambda _: parent.send(READY))
    except SeedcacheError as exc:
        parent.send(str(exc))
        sys.exit(2)
    finally:
        parent.close()


def start_line(config: Config, port: int) -> str:
    """What `serve` prints once it listens on `port`: how it runs, and the OPENAI_BASE_URL."""
    listening = replace(config, port=port)
    # An IPv6 address takes brackets in a URL (RFC 3986): http://[::1]:8080.
    host = f"[{config.host}]" if ":" in config.host else config.host
    return (
        f"seedcache listening on http://{host}:{port} in {config.mode.value} mode, "
        f"store {StoreSpec.parse(config.store).shown}, upstream {config.upstream_base}"
        + (f", {config.workers} workers" if config.workers > 1 else "")
        + f"; export OPENAI_BASE_URL={listening.public_url}"
    )


def run_server(
    config: Config, worker: bool = False, on_ready: Callable[[int], None] | None = None
) -> None:
    """Serve `config` until interrupted (as one of several processes on the port when `worker`
    is set); `on_ready` gets the port once the proxy serves on it."""
    from aiohttp import web

    from proxy.app import AccessLog, create_app

    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sockets = listen(config.host, config.port, reuse_port=worker)
    port = int(sockets[0].getsockname()[1])
    # Signals are handled on a loop of our own (aiohttp closes it), not by aiohttp, whose handler
    # raises again at a second signal, inside the shutdown.
    loop = stop_signals(asyncio.new_event_loop(), worker=worker)
    try:
        web.run_app(
            create_app(replace(config, port=port)),
            sock=sockets,
            # aiohttp prints once the app has started and every socket serves.
            print=(lambda _: on_ready(port)) if on_ready else None,
            access_log=logging.getLogger("seedcache.access") if config.access_log else None,
            access_log_class=AccessLog,
            handle_signals=False,
            loop=loop,
        )
    finally:
        for sock in sockets:
            sock.close()


def stop_signals(loop: asyncio.AbstractEventLoop, *, worker: bool) -> asyncio.AbstractEventLoop:
    """The signals that stop a server: the first SIGTERM (docker stop, systemd) or Ctrl-C
    starts the graceful shutdown, which finishes and records the requests in flight; a second
    SIGTERM (systemd signals the whole process group, and `serve --workers` forwards one more)
    must not cut it short, so it is ignored; a second Ctrl-C stops at once, saying so. A worker
    leaves Ctrl-C, which reaches the whole group, to its parent, and stops as at a SIGTERM when
    its parent ends, however it ended."""
    from aiohttp import web

    parent = multiprocessing.parent_process() if worker else None
    if worker:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopping: list[bool] = []

    def stop(number: int) -> None:
        # Two signals read from the loop's wake-up pipe at once schedule this twice: the second
        # must not raise again, inside the shutdown the first one started.
        if not stopping:
            stopping.append(True)
            raise web.GracefulExit
        if number == signal.SIGINT:
            click.echo(INTERRUPTED_AGAIN.format(what="the requests in flight"), err=True)
            os._exit(130)

    def orphaned(sentinel: int) -> None:
        loop.remove_reader(sentinel)  # at EOF it stays readable: once is enough
        logging.getLogger("seedcache").warning(
            "the serve process of worker %s ended: stopping once the requests in flight are "
            "finished",
            multiprocessing.current_process().name,
        )
        stop(signal.SIGTERM)

    # Windows has no loop signal handlers: there Ctrl-C raises KeyboardInterrupt, which aiohttp
    # takes for a graceful stop.
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, stop, signal.SIGTERM)
        if not worker:
            loop.add_signal_handler(signal.SIGINT, stop, signal.SIGINT)
    if parent is not None:
        # A worker whose parent was killed (kill -9, the OOM killer) would serve the port on its
        # own, with the old settings, for ever. multiprocessing's sentinel of the parent is the
        # end of a pipe whose other end only the parent holds: the system closes that when the
        # parent ends, however it ended, and the sentinel reads EOF.
        loop.add_reader(parent.sentinel, orphaned, parent.sentinel)
    return loop


INTERRUPTED_AGAIN = "seedcache: interrupted again: stopped without finishing {what}"


def listen(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Sockets bound on every address of `host` ("" for all) as asyncio's create_server binds
    them, bound here so that the port is known before serving: with port 0, one free port for
    all of them. ConfigError when they cannot be bound."""
    sockets: list[socket.socket] = []
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # As asyncio does: an IPv6 socket does not also take the IPv4 addresses.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # With port 0 the first socket picks the port, and the others take the same one.
            chosen = port if sock is sockets[0] else sockets[0].getsockname()[1]
            sock.bind((address[0], chosen, *address[2:]))
    except BaseException as exc:
        for sock in sockets:
            sock.close()
        if isinstance(exc, OSError):  # port in use, address not here: one line, no traceback
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        raise
    return sockets


def read_tokens(values: tuple[str, ...]) -> tuple[str, ...]:
    """Access tokens as given, with `@FILE` values read one token per line. A value that yields
    no token is refused: the proxy would answer anyone, when access control was asked for."""
    tokens: list[str] = []
    for value in values:
        if not value.startswith("@"):
            tokens.append(value.strip())  # an empty one is Config's to refuse
            continue
        try:
            with open(value[1:], encoding="utf-8") as handle:
                read = [line.strip() for line in handle if line.strip()]
        except OSError as exc:
            raise ConfigError(
                f"cannot read access tokens from {value[1:]}: {exc}", options=("access_tokens",)
            ) from None
        if not read:
            # An empty secret mount, say.
            raise ConfigError(
                f"--access-token {value} holds no token: the proxy would answer anyone; put "
                "one token per line in it",
                options=("access_tokens",),
            )
        tokens.extend(read)
    return tuple(tokens)


@main.command()
@click.argument("request_file", type=click.File("rb"))
@click.option("--method", default="POST", show_default=True, help="HTTP method of the request.")
@click.option(
    "--path",
    default="/v1/chat/completions",
    show_default=True,
    help="Request path (with or without /v1).",
)
@click.option("--namespace", default="", help="Namespace the key is made in.")
def key(request_file: Any, method: str, path: str, namespace: str) -> None:
    """Print the key material and the key of a request body (a file, or - for stdin)."""
    canon = request_key(method, path, request_file.read(), namespace)
    click.echo(canon.material)
    click.echo(f"key: {canon.key}")


def request_key(method: str, path: str, raw: bytes, namespace: str) -> CanonicalRequest:
    """The key the proxy gives this request, after the checks it makes on its way in; an error
    for a request the proxy refuses (400) or never keys (forwarded only)."""
    from proxy.handlers import (  # aiohttp: imported by the commands that need it
        STATEFUL,
        parse_request,
    )

    method = method.upper()
    path, _, query = path.partition("?")
    if has_dot_segments(path):
        raise SeedcacheError(f"the path {path!r} has '.' or '..' segments; the proxy refuses it")
    if problem := namespace_problem(namespace):
        raise SeedcacheError(problem)
    path = normalise_path(path, query)
    route = path.partition("?")[0]
    if (method, route) not in RECORDED:
        recorded = ", ".join(f"{m} {p}" for m, p in sorted(RECORDED, key=lambda r: r[1]))
        raise SeedcacheError(
            f"{method} {route} is never recorded (seedcache only forwards it), so it has no "
            f"key; recorded: {recorded}"
        )
    _, canon = parse_request(method, path, namespace, raw, route)
    if canon is None:
        raise SeedcacheError(
            f"this request depends on state held upstream ({', '.join(STATEFUL)}), so it is "
            "never recorded and has no key"
        )
    return canon


for command in (audit, verify, probe, ls, show, rm, prune, export, import_):
    main.add_command(command)
