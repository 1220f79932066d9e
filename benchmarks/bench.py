"""seedcache against bare aiohttp baselines, measured in one run: throughput, latency, stream TTFB.

Usage: python benchmarks/bench.py [--quick] [--json FILE] [--rounds N] [--client raw|aiohttp]

Every server is a separate process; the load generator runs in this process (or in `--load-procs`
child processes, summed) and is the same code for every target. benchmarks/README.md explains
each number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
SCRIPT = os.path.abspath(__file__)
PATH = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
QUIET_WAIT = 60.0  # longest wait for other processes to leave the machine before measuring

# -- payloads ------------------------------------------------------------------------------------
# The request is what the OpenAI SDK sends for a small chat call; the response is a real
# chat.completion (~600 bytes) and a real stream (20 chunks + [DONE]).

_MESSAGES = (
    '[{"role":"system","content":"You are a terse assistant."},'
    '{"role":"user","content":"Name the three primary colours of light and of paint."}]'
)


def request_body(seed: int, *, stream: bool = False) -> bytes:
    """A chat request; the seed makes it a different key."""
    tail = ',"stream":true' if stream else ""
    return (
        f'{{"model":"{MODEL}","messages":{_MESSAGES},"temperature":0,"seed":{seed}{tail}}}'
    ).encode()


_COMPLETION = (
    '{"id":"chatcmpl-bench<ID>","object":"chat.completion","created":1741569952,'
    '"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant",'
    '"content":"Light: red, green and blue. Paint: red, yellow and blue, or cyan, magenta '
    'and yellow in print (answer <N>).","refusal":null,"annotations":[]},"logprobs":null,'
    '"finish_reason":"stop"}],"usage":{"prompt_tokens":31,"completion_tokens":28,'
    '"total_tokens":59,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},'
    '"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    '"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},'
    '"service_tier":"default","system_fingerprint":"fp_b376dfbbd5"}'
)
_CHUNK = (
    'data: {"id":"chatcmpl-bench<ID>","object":"chat.completion.chunk","created":1741569952,'
    '"model":"gpt-4o-mini-2024-07-18","service_tier":"default",'
    '"system_fingerprint":"fp_b376dfbbd5","choices":[{"index":0,"delta":<DELTA>,'
    '"logprobs":null,"finish_reason":<FINISH>}]}\n\n'
)
# 18 content deltas; with the role chunk and the finish chunk, a stream of 20 chunks.
_WORDS = "Light|:| red|,| green| and| blue|.| Paint|:| red|,| yellow| and| blue| (<N>)|.|!"


def completion(n: int) -> bytes:
    """A chat.completion body; `n` varies its id and content (the upstream's response counter)."""
    return _COMPLETION.replace("<ID>", f"{n:012d}").replace("<N>", str(n)).encode()


def stream(n: int) -> bytes:
    """An SSE body: a role chunk, 18 content chunks, a finish chunk, then [DONE]."""
    deltas = ['{"role":"assistant","content":"","refusal":null}']
    deltas += [json.dumps({"content": w.replace("<N>", str(n))}) for w in _WORDS.split("|")]
    frames = [_CHUNK.replace("<DELTA>", d).replace("<FINISH>", "null") for d in deltas]
    frames.append(_CHUNK.replace("<DELTA>", "{}").replace("<FINISH>", '"stop"'))
    frames.append("data: [DONE]\n\n")
    return "".join(frames).replace("<ID>", f"{n:012d}").encode()


# Headers a real upstream sends that seedcache stores with a sample (so replay sends them too).
UPSTREAM_HEADERS = {
    "openai-processing-ms": "312",
    "openai-version": "2020-10-01",
    "x-request-id": "req_0123456789abcdef0123456789abcdef",
}

# -- servers (child processes) -------------------------------------------------------------------


# Answer times of the `slow` upstreams the record path is also measured behind. An instant
# upstream makes the record path a measure of CPU per request; a real model takes hundreds of ms,
# and from a few ms on the record path waits on the upstream rather than on the CPU.
SLOW_UPSTREAM_MS = (2, 5, 20)


def make_server_app(kind: str, upstream: str | None, delay_ms: float = 0) -> Any:
    """`fixed`: baseline A. `vary`: a new body per request. `slow`: `vary` answering after
    `delay_ms`, like a real model. `hop`: baseline B, a bare proxy."""
    import orjson
    from aiohttp import ClientSession, TCPConnector, web

    app = web.Application()
    counter = itertools.count(1)
    fixed_json, fixed_sse = completion(0), stream(0)
    json_headers = {**UPSTREAM_HEADERS, "Content-Type": "application/json"}
    sse_headers = {**UPSTREAM_HEADERS, "Content-Type": "text/event-stream; charset=utf-8"}

    async def answer(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        n = next(counter) if kind in ("vary", "slow") else 0
        if kind == "slow":
            await asyncio.sleep(delay_ms / 1000)
        if body.get("stream") is True:
            response = web.StreamResponse(headers=sse_headers)
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(fixed_sse if n == 0 else stream(n))
            return response
        return web.Response(body=fixed_json if n == 0 else completion(n), headers=json_headers)

    session_key = web.AppKey("session", ClientSession)

    async def hop(request: web.Request) -> web.Response:
        # Forward the body with the one shared session; relay status, content type and body.
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        async with request.app[session_key].post(
            f"{upstream}{request.path}", data=await request.read(), headers=headers
        ) as live:
            body = await live.read()
            return web.Response(
                status=live.status,
                body=body,
                headers={"Content-Type": live.headers.get("Content-Type", "application/json")},
            )

    async def session(app: web.Application) -> Any:
        # The same pool settings seedcache's Upstream uses.
        async with ClientSession(connector=TCPConnector(limit=256)) as opened:
            app[session_key] = opened
            yield

    if kind == "hop":
        app.cleanup_ctx.append(session)
        app.router.add_post(PATH, hop)
    else:
        app.router.add_post(PATH, answer)
    return app


async def serve_child(kind: str, upstream: str | None, delay_ms: float) -> None:
    """Serve `kind` on a free port, print `PORT n`, run until SIGTERM/SIGINT."""
    from aiohttp import web

    runner = web.AppRunner(make_server_app(kind, upstream, delay_ms), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


# -- the load generator --------------------------------------------------------------------------
# "raw" is a minimal HTTP/1.1 keep-alive client on asyncio protocols: it costs a fraction of
# what a server costs per request, so on 2 cores the numbers measure the server, not the client.
# "aiohttp" is the aiohttp client (a TCPConnector with limit = connections), for comparison.


class Closed(ConnectionError):
    """The server closed a keep-alive connection."""


class RawConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: write a request, parse one response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.lost: BaseException | None = None
        self.watch = False
        self.marked_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport  # asyncio sets TCP_NODELAY on TCP sockets

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.watch and b"data:" in self.buf:
            # Time the arrival of the first SSE data byte here, not when the coroutine wakes.
            self.marked_at = time.perf_counter()
            self.watch = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or Closed("the server closed the connection")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    async def _more(self) -> None:
        if self.lost is not None:
            raise self.lost
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def exchange(self, request: bytes, *, watch: bool = False) -> tuple[int, bytes]:
        """Send `request`; once the whole body is in, the status and lower-cased header block."""
        assert self.transport is not None
        self.watch, self.marked_at = watch, 0.0
        self.transport.write(request)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            await self._more()
        head = bytes(buf[: end + 2]).lower()
        status = int(head[9:12])
        pos = end + 4
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = pos + int(head[at + 17 : head.index(b"\r\n", at + 2)])
            while len(buf) < stop:
                await self._more()
            pos = stop
        elif b"\r\ntransfer-encoding: chunked" in head:
            while True:
                while (eol := buf.find(b"\r\n", pos)) < 0:
                    await self._more()
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                while len(buf) < eol + 4 + size:
                    await self._more()
                pos = eol + 4 + size  # no trailers: the last chunk is "0\r\n\r\n"
                if size == 0:
                    break
        else:
            raise ValueError(f"response without framing: {head[:200]!r}")
        del buf[:pos]
        return status, head


def raw_request(port: int, body: bytes) -> bytes:
    """The bytes of a POST as the OpenAI SDK would send it (the headers that matter)."""
    return (
        f"POST {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAccept: application/json\r\n"
        "Content-Type: application/json\r\nUser-Agent: AsyncOpenAI/Python 1.99.0\r\n"
        f"Authorization: Bearer sk-bench\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Client:
    """`connections` keep-alive connections to one port, through the chosen client."""

    def __init__(self, kind: str, port: int, connections: int) -> None:
        self.kind = kind
        self.port = port
        self.connections = connections
        self.raw: list[RawConnection] = []
        self.session: Any = None

    async def __aenter__(self) -> Client:
        if self.kind == "raw":
            loop = asyncio.get_running_loop()
            for _ in range(self.connections):
                _, conn = await loop.create_connection(RawConnection, HOST, self.port)
                self.raw.append(conn)
        else:
            import aiohttp

            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections),
                headers={"Authorization": "Bearer sk-bench"},
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in self.raw:
            if conn.transport is not None:
                conn.transport.close()
        if self.session is not None:
            await self.session.close()

    def caller(self, index: int) -> Callable[[bytes, bool], Awaitable[tuple[int, bytes, float]]]:
        """A function sending one body on connection `index`: (status, head, first data time)."""
        if self.kind == "raw":
            conn = self.raw[index]

            async def call_raw(body: bytes, watch: bool) -> tuple[int, bytes, float]:
                status, head = await conn.exchange(raw_request(self.port, body), watch=watch)
                return status, head, conn.marked_at

            return call_raw
        url = f"http://{HOST}:{self.port}{PATH}"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}

        async def call_aiohttp(body: bytes, watch: bool) -> tuple[int, bytes, float]:
            marked = 0.0
            async with self.session.post(url, data=body, headers=headers) as response:
                if watch:
                    seen = b""
                    async for chunk in response.content.iter_any():
                        if not marked:
                            seen += chunk
                            if b"data:" in seen:
                                marked = time.perf_counter()
                else:
                    await response.read()
                head = "".join(f"{k}: {v}\r\n" for k, v in response.headers.items())
                return response.status, head.lower().encode(), marked

        return call_aiohttp


def payloads(kind: str, seed_base: int) -> Callable[[], bytes]:
    """`same`: one recorded body; `stream`: one recorded streaming body; `unique`: new seeds."""
    if kind == "same":
        body = request_body(1)
        return lambda: body
    if kind == "stream":
        body = request_body(2, stream=True)
        return lambda: body
    seeds = itertools.count(seed_base)
    return lambda: request_body(next(seeds))


async def throughput(
    client_kind: str,
    port: int,
    connections: int,
    payload: str,
    seed_base: int,
    expect: bytes,
    start_at: float,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    """Requests completed in the window [start_at + warmup, + duration) over keep-alive."""
    make = payloads(payload, seed_base)
    async with Client(client_kind, port, connections) as client:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        begin = time.perf_counter() + warmup - (time.time() - start_at)
        end = begin + duration
        errors: list[str] = []

        async def worker(index: int) -> int:
            call, done = client.caller(index), 0
            while True:
                status, head, _ = await call(make(), False)
                now = time.perf_counter()
                if status != 200 or expect not in head:
                    errors.append(f"status {status}: {head[:300]!r}")
                    return done
                if now >= end:
                    return done
                if now >= begin:
                    done += 1

        async def own_cpu() -> float:
            # This process's CPU time over the window: shows whether the client was the limit.
            await asyncio.sleep(max(0.0, begin - time.perf_counter()))
            before = time.process_time()
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            return time.process_time() - before

        cpu = asyncio.ensure_future(own_cpu())
        counts = await asyncio.gather(*(worker(i) for i in range(connections)))
        client_cpu = await cpu
    return {
        "requests": sum(counts),
        "seconds": duration,
        "client_cpu": client_cpu,
        "errors": errors[:3],
    }


async def sequential(
    client_kind: str, port: int, payload: str, expect: bytes, warmup: int, count: int
) -> dict[str, Any]:
    """One connection, one request at a time: per-request latency and first-`data:` time, in s."""
    make = payloads(payload, 0)
    watch = payload == "stream"
    totals, firsts = [], []
    async with Client(client_kind, port, 1) as client:
        call = client.caller(0)
        for i in range(warmup + count):
            started = time.perf_counter()
            status, head, marked = await call(make(), watch)
            finished = time.perf_counter()
            if status != 200 or expect not in head:
                raise BenchError(f"request to port {port} failed: {status} {head[:300]!r}")
            if watch and not marked:
                raise BenchError(f"no SSE data from port {port}")
            if i >= warmup:
                totals.append(finished - started)
                if watch:
                    firsts.append(marked - started)
    return {"total": totals, "first": firsts}


def load_child(args: argparse.Namespace) -> None:
    """`bench.py _load ...`: one share of a throughput run; prints its result as JSON."""
    result = asyncio.run(
        throughput(
            args.client,
            args.port,
            args.connections,
            args.payload,
            args.seed_base,
            args.expect.encode(),
            args.start_at,
            args.warmup,
            args.duration,
        )
    )
    print(json.dumps(result), flush=True)


# -- processes -----------------------------------------------------------------------------------


class BenchError(Exception):
    """The benchmark cannot go on (a server did not start, a request failed)."""


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM if this process dies, even by SIGKILL (survives exec).
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Processes:
    """Every subprocess this run started; `stop_all` ends them (SIGTERM, then SIGKILL)."""

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, argv: list[str], log: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if log is None else log,
            stderr=subprocess.STDOUT if log is not None else None,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if proc in self.started:
            self.started.remove(proc)

    def cpu(self) -> float:
        """CPU seconds used so far by this process and every process it started."""
        return time.process_time() + sum(process_cpu(p.pid) for p in self.started)

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            self.stop(proc)


@dataclass
class Server:
    """A running server process and where it listens."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        return process_cpu(self.proc.pid)


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (Linux /proc); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> float:
    """CPU seconds every process on the machine has used in user and system mode (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system = (int(v) for v in f.readline().split()[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def start_baseline(
    procs: Processes, kind: str, upstream: str | None = None, delay_ms: float = 0
) -> Server:
    """Start a bench server child (fixed, vary, slow or hop) and read the port it prints."""
    argv = [sys.executable, SCRIPT, "_serve", kind, "--delay-ms", str(delay_ms)]
    if upstream:
        argv += ["--upstream", upstream]
    proc = procs.spawn(argv, log=None)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()  # the child prints its port once it listens
    if not line.startswith("PORT "):
        raise BenchError(f"the {kind} server did not start: {line!r}")
    return Server(kind, proc, int(line.split()[1]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(port: int, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """A blocking request, for setup and checks only."""
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=body)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _NO_PROXY.open(request, timeout=30) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def start_seedcache(
    procs: Processes, name: str, mode: str, upstream: int, store: str, log_dir: str
) -> Server:
    """`seedcache serve` as a real subprocess; returns once /_seedcache/health answers."""
    exe = shutil.which("seedcache")
    if exe is None:
        raise BenchError("the seedcache command is not on PATH; pip install -e . first")
    port = free_port()
    argv = [
        exe,
        "serve",
        "--port",
        str(port),
        "--mode",
        mode,
        "--upstream",
        f"http://{HOST}:{upstream}/v1",
        "--store",
        store,
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    log_path = os.path.join(log_dir, f"{name}.log")
    with open(log_path, "wb") as log:
        proc = procs.spawn(argv, log=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                raise BenchError(f"seedcache ({name}) exited at start:\n{f.read()[-2000:]}")
        with contextlib.suppress(OSError):
            if http(port, "/_seedcache/health")[0] == 200:
                return Server(name, proc, port)
        time.sleep(0.05)
    raise BenchError(f"seedcache ({name}) did not answer /_seedcache/health within 30 s")


# -- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How long and how often to measure, and with which client."""

    duration: float
    warmup: float
    rounds: int
    latency_requests: int
    stream_requests: int
    client: str
    load_procs: int
    attempts: int
    max_foreign: float


@dataclass
class Runner:
    """Runs single measurements against a server with the one load generator."""

    settings: Settings
    procs: Processes
    seeds: Iterator[int] = field(default_factory=lambda: itertools.count(10**9, 10**9))

    def rps(self, server: Server, connections: int, payload: str, expect: bytes) -> dict[str, Any]:
        """One throughput run against `server`: req/s and the server's CPU time per request."""
        s = self.settings
        shares = max(1, min(s.load_procs, connections))
        seed_base = next(self.seeds)
        start_at = time.time() + (1.5 if shares > 1 else 0.2)

        async def measure_cpu() -> tuple[float, float]:
            await asyncio.sleep(max(0.0, start_at + s.warmup - time.time()))
            before = self.cpu_snapshot(server)
            await asyncio.sleep(s.duration)
            return self.cpu_delta(server, before)

        async def in_process() -> tuple[list[dict[str, Any]], tuple[float, float]]:
            load = throughput(
                s.client,
                server.port,
                connections,
                payload,
                seed_base,
                expect,
                start_at,
                s.warmup,
                s.duration,
            )
            result, cpu = await asyncio.gather(load, measure_cpu())
            return [result], cpu

        async def children() -> tuple[list[dict[str, Any]], tuple[float, float]]:
            started = []
            for share in range(shares):
                argv = [sys.executable, SCRIPT, "_load"]
                argv += ["--client", s.client, "--port", str(server.port)]
                mine = connections // shares + (share < connections % shares)
                argv += ["--connections", str(mine)]
                argv += ["--payload", payload, "--seed-base", str(seed_base + share * 10**8)]
                argv += ["--expect", expect.decode(), "--start-at", repr(start_at)]
                argv += ["--warmup", str(s.warmup), "--duration", str(s.duration)]
                started.append(self.procs.spawn(argv, log=None))
            cpu = await measure_cpu()
            outputs = []
            for proc in started:
                assert proc.stdout is not None
                out = await asyncio.to_thread(proc.stdout.read)
                self.procs.stop(proc)
                if not out.strip():
                    raise BenchError(f"a load generator process failed (exit {proc.returncode})")
                outputs.append(json.loads(out))
            return outputs, cpu

        shares_out, (server_cpu, foreign) = asyncio.run(children() if shares > 1 else in_process())
        errors = [e for out in shares_out for e in out["errors"]]
        if errors:
            raise BenchError(f"{server.name} answered wrongly under load: {errors[0]}")
        requests = sum(out["requests"] for out in shares_out)
        return {
            "rps": requests / s.duration,
            "requests": requests,
            "cpu_us_per_request": server_cpu / max(requests, 1) * 1e6,
            "server_cpu_share": server_cpu / s.duration,
            "client_cpu_share": sum(out["client_cpu"] for out in shares_out) / s.duration,
            "foreign_cpu_share": foreign / s.duration,
        }

    def cpu_snapshot(self, server: Server) -> tuple[float, float, float]:
        """Now: (machine CPU, this process and every process it started, the server alone)."""
        return machine_cpu(), self.procs.cpu(), server.cpu_seconds()

    def cpu_delta(self, server: Server, before: tuple[float, float, float]) -> tuple[float, float]:
        """The server's CPU seconds since `before`, and everyone else's.

        "Everyone else" is CPU used by processes this benchmark did not start: on a shared
        2-core machine that is the noise that makes a measurement worthless.
        """
        machine, ours, server_cpu = (
            b - a for a, b in zip(before, self.cpu_snapshot(server), strict=True)
        )
        return server_cpu, max(0.0, machine - ours)

    def seq(self, server: Server, payload: str, expect: bytes, count: int) -> dict[str, Any]:
        """Sequential requests on one connection: latency percentiles in ms."""
        before, started = self.cpu_snapshot(server), time.perf_counter()
        raw = asyncio.run(
            sequential(
                self.settings.client, server.port, payload, expect, max(50, count // 10), count
            )
        )
        _, foreign = self.cpu_delta(server, before)
        out = {"p50_ms": pct(raw["total"], 50) * 1e3, "p99_ms": pct(raw["total"], 99) * 1e3}
        out["foreign_cpu_share"] = foreign / (time.perf_counter() - started)
        if raw["first"]:
            out["ttfb_p50_ms"] = pct(raw["first"], 50) * 1e3
            out["ttfb_p99_ms"] = pct(raw["first"], 99) * 1e3
        return out


def say(text: str) -> None:
    """Progress, on stderr so that stdout carries only the table."""
    print(text, file=sys.stderr, flush=True)


def wait_for_quiet(procs: Processes, most: float, patience: float) -> float:
    """Wait (up to `patience` s) until other processes use at most `most` cores; seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < patience:
        machine, ours = machine_cpu(), procs.cpu()
        time.sleep(0.5)
        if (machine_cpu() - machine) - (procs.cpu() - ours) <= most * 0.5:
            break
    return time.monotonic() - started


def summary(result: dict[str, Any]) -> str:
    """One measurement in a few words, for the progress lines."""
    if "rps" in result:
        return f"{result['rps']:,.0f} req/s, server {result['cpu_us_per_request']:.0f} us/req"
    text = f"p50 {result['p50_ms']:.3f} ms, p99 {result['p99_ms']:.3f} ms"
    if "ttfb_p50_ms" in result:
        text += f", first data p50 {result['ttfb_p50_ms']:.3f} ms"
    return text


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def median_of(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Per metric, the median over rounds."""
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def run(settings: Settings, procs: Processes, store_root: str) -> dict[str, Any]:
    """Start the servers, record, then measure every pair (baseline, seedcache) in turn."""
    fixed = start_baseline(procs, "fixed")
    vary = start_baseline(procs, "vary")
    hop = start_baseline(procs, "hop", upstream=f"http://{HOST}:{vary.port}")
    replay_store = os.path.join(store_root, "replay-store")
    record_store = os.path.join(store_root, "record-store")

    # Record the two requests once in auto mode, then serve them from a replay-mode proxy.
    seeding = start_seedcache(procs, "seed", "auto", vary.port, replay_store, store_root)
    for body in (request_body(1), request_body(2, stream=True)):
        status, headers, _ = http(seeding.port, PATH, body)
        if status != 200 or headers.get("X-Seedcache-Status") != "recorded":
            raise BenchError(f"recording failed: {status} {headers}")
    procs.stop(seeding.proc)
    replay = start_seedcache(procs, "replay", "replay", vary.port, replay_store, store_root)
    recorder = start_seedcache(procs, "record", "auto", vary.port, record_store, store_root)
    # Behind each slow upstream: a bare hop B and a recording seedcache.
    slow: dict[int, tuple[Server, Server]] = {}
    for delay in SLOW_UPSTREAM_MS:
        upstream = start_baseline(procs, "slow", delay_ms=delay)
        slow[delay] = (
            start_baseline(procs, "hop", upstream=f"http://{HOST}:{upstream.port}"),
            start_seedcache(
                procs, f"record-{delay}ms", "auto", upstream.port,
                f"{record_store}-{delay}ms", store_root,
            ),
        )  # fmt: skip
    for body in (request_body(1), request_body(2, stream=True)):
        status, headers, _ = http(replay.port, PATH, body)
        if status != 200 or headers.get("X-Seedcache-Status") != "hit":
            raise BenchError(f"replay did not hit: {status} {headers}")

    ok, hit = b"content-type:", b"x-seedcache-status: hit"
    recorded = b"x-seedcache-status: recorded"
    r = Runner(settings, procs)
    rounds: dict[str, list[dict[str, Any]]] = {}

    def measure(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        # Other processes on the machine take cores from the servers and the client: start when
        # the machine is quiet, and measure again (a few times at most) when other processes
        # used more than --max-foreign cores meanwhile; keep the least disturbed result.
        best: dict[str, Any] | None = None
        for attempt in range(1, settings.attempts + 1):
            waited = wait_for_quiet(procs, settings.max_foreign, QUIET_WAIT)
            result = fn()
            foreign = result["foreign_cpu_share"]
            result["attempts"] = attempt
            note = f" after waiting {waited:.0f} s for a quiet machine" if waited >= 1 else ""
            say(f"  {name}: {summary(result)}; other processes {foreign:.2f} cores{note}")
            if best is None or foreign < best["foreign_cpu_share"]:
                best = result
            if foreign <= settings.max_foreign:
                break
        assert best is not None
        rounds.setdefault(name, []).append(best)

    for i in range(settings.rounds):
        say(f"round {i + 1}/{settings.rounds}")
        # Baseline and seedcache alternate, so slow drift on the machine hits both alike.
        for conns in (8, 64):
            measure(f"A_rps_{conns}", functools.partial(r.rps, fixed, conns, "same", ok))
            measure(f"S_rps_{conns}", functools.partial(r.rps, replay, conns, "same", hit))
        measure("A_latency", lambda: r.seq(fixed, "same", ok, settings.latency_requests))
        measure("S_latency", lambda: r.seq(replay, "same", hit, settings.latency_requests))
        measure("A_stream", lambda: r.seq(fixed, "stream", ok, settings.stream_requests))
        measure("S_stream", lambda: r.seq(replay, "stream", hit, settings.stream_requests))
        measure("B_record_8", lambda: r.rps(hop, 8, "unique", ok))
        measure("S_record_8", lambda: r.rps(recorder, 8, "unique", recorded))
        for delay, (slow_hop, slow_recorder) in slow.items():
            measure(f"B_record_{delay}ms_8", functools.partial(r.rps, slow_hop, 8, "unique", ok))
            measure(
                f"S_record_{delay}ms_8",
                functools.partial(r.rps, slow_recorder, 8, "unique", recorded),
            )
    return {"rounds": rounds, "median": {k: median_of(v) for k, v in rounds.items()}}


# -- report --------------------------------------------------------------------------------------


def report(result: dict[str, Any], settings: Settings) -> str:
    """The table: absolute numbers for baseline and seedcache, their ratio, target, verdict."""
    m = result["median"]
    rows: list[tuple[str, str, str, str, str, str]] = []

    def row(
        name: str, base: float, ours: float, fmt: str, ratio: float | None, target: str, ok: Any
    ) -> None:
        verdict = "" if ok is None else ("PASS" if ok else "FAIL")
        shown = "" if ratio is None else f"{ratio:.2f}"
        rows.append((name, format(base, fmt), format(ours, fmt), shown, target, verdict))

    for c in (8, 64):
        a, s = m[f"A_rps_{c}"], m[f"S_rps_{c}"]
        row(f"replay req/s @{c} conns (vs A)", a["rps"], s["rps"], ",.0f", s["rps"] / a["rps"],
            "ratio >= 0.50", s["rps"] / a["rps"] >= 0.5)  # fmt: skip
    for c in (8, 64):
        a, s = m[f"A_rps_{c}"], m[f"S_rps_{c}"]
        row(f"  server CPU us/req @{c}", a["cpu_us_per_request"], s["cpu_us_per_request"], ".0f",
            s["cpu_us_per_request"] / a["cpu_us_per_request"], "-", None)  # fmt: skip
    a, s = m["A_latency"], m["S_latency"]
    row("latency p50 @1 conn, ms (vs A)", a["p50_ms"], s["p50_ms"], ".3f",
        s["p50_ms"] / a["p50_ms"], "seedcache <= 0.300 ms", s["p50_ms"] <= 0.3)  # fmt: skip
    row("latency p99 @1 conn, ms (vs A)", a["p99_ms"], s["p99_ms"], ".3f",
        s["p99_ms"] / a["p99_ms"], "-", None)  # fmt: skip
    a, s = m["A_stream"], m["S_stream"]
    row("stream TTFB p50, ms (vs A)", a["ttfb_p50_ms"], s["ttfb_p50_ms"], ".3f",
        s["ttfb_p50_ms"] / a["ttfb_p50_ms"], "-", None)  # fmt: skip
    row("stream total p50, ms (vs A)", a["p50_ms"], s["p50_ms"], ".3f",
        s["p50_ms"] / a["p50_ms"], "-", None)  # fmt: skip
    b, s = m["B_record_8"], m["S_record_8"]
    row("record req/s @8 conns (vs hop B)", b["rps"], s["rps"], ",.0f", s["rps"] / b["rps"],
        "ratio >= 0.80", s["rps"] / b["rps"] >= 0.8)  # fmt: skip
    row("  server CPU us/req @8", b["cpu_us_per_request"], s["cpu_us_per_request"], ".0f",
        s["cpu_us_per_request"] / b["cpu_us_per_request"], "-", None)  # fmt: skip
    for delay in SLOW_UPSTREAM_MS:
        b, s = m[f"B_record_{delay}ms_8"], m[f"S_record_{delay}ms_8"]
        row(f"record req/s @8, upstream {delay} ms", b["rps"], s["rps"], ",.0f",
            s["rps"] / b["rps"], "ratio >= 0.80", s["rps"] / b["rps"] >= 0.8)  # fmt: skip

    header = ("measurement", "baseline", "seedcache", "ratio", "target", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(6)]
    lines = []
    for n, r in enumerate([header, *rows]):
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in (1, 2, 3)]
        cells += [r[4].ljust(widths[4]), r[5]]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    kept = [r for runs in result["rounds"].values() for r in runs]
    noisy = [r for r in kept if r["foreign_cpu_share"] > settings.max_foreign]
    worst = max(r["foreign_cpu_share"] for r in kept)
    lines.append(
        f"\nratio = seedcache / baseline. Other processes on the machine used up to {worst:.2f} "
        f"cores during a kept measurement; {len(noisy)} of {len(kept)} kept measurements were "
        f"above the {settings.max_foreign:.2f}-core limit (see --json for each)."
    )
    env = result["environment"]
    lines.insert(
        0,
        f"seedcache {env['seedcache']} vs bare aiohttp {env['aiohttp']}, Python {env['python']}, "
        f"{env['cpus']} CPUs; {settings.client} client x{settings.load_procs} process(es); "
        f"{settings.duration:g} s per throughput run after {settings.warmup:g} s warm-up; "
        f"median of {settings.rounds} round(s)\n",
    )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "seedcache": version("seedcache"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def child_main(argv: list[str]) -> int:
    """The hidden entry points this script starts itself with: `_serve KIND`, `_load ...`."""
    parser = argparse.ArgumentParser(prog="bench.py")
    sub = parser.add_subparsers(dest="child", required=True)
    serve = sub.add_parser("_serve")
    serve.add_argument("kind", choices=["fixed", "vary", "slow", "hop"])
    serve.add_argument("--upstream")
    serve.add_argument("--delay-ms", type=float, default=0)
    load = sub.add_parser("_load")
    for name, kind in [
        ("--client", str),
        ("--port", int),
        ("--connections", int),
        ("--payload", str),
        ("--seed-base", int),
        ("--expect", str),
        ("--start-at", float),
        ("--warmup", float),
        ("--duration", float),
    ]:
        load.add_argument(name, type=kind, required=True)
    args = parser.parse_args(argv)
    if args.child == "_serve":
        asyncio.run(serve_child(args.kind, args.upstream, args.delay_ms))
    else:
        load_child(args)
    return 0


def main() -> int:
    if sys.argv[1:2] in (["_serve"], ["_load"]):
        return child_main(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s runs, 1 round (a smoke test)")
    parser.add_argument("--json", metavar="FILE", help="also write every result to FILE")
    parser.add_argument("--rounds", type=int, help="rounds per measurement (default 3, quick 1)")
    parser.add_argument(
        "--client", choices=["raw", "aiohttp"], default="raw", help="load generator (default raw)"
    )
    parser.add_argument(
        "--load-procs", type=int, default=1, help="load generator processes, summed (default 1)"
    )
    parser.add_argument(
        "--attempts",
        type=int,
        default=3,
        help="tries per measurement while other processes keep the machine busy (default 3)",
    )
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.15,
        help="CPU cores other processes may use during a measurement (default 0.15)",
    )
    args = parser.parse_args()

    quick = args.quick
    settings = Settings(
        duration=2.0 if quick else 5.0,
        warmup=0.5 if quick else 1.0,
        rounds=args.rounds or (1 if quick else 3),
        latency_requests=500 if quick else 2000,
        stream_requests=200 if quick else 500,
        client=args.client,
        load_procs=args.load_procs,
        attempts=args.attempts,
        max_foreign=args.max_foreign,
    )
    # SIGTERM unwinds like Ctrl-C, so the finally below stops every server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="seedcache-bench-") as tmp:
            try:
                result = run(settings, procs, tmp)
            finally:
                procs.stop_all()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130
    result["environment"] = environment()
    result["settings"] = settings.__dict__
    print(report(result, settings))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
