"""How long a replay miss takes to explain itself with thousands of recordings in the store.

`python benchmarks/miss_explain.py [--recordings 5000]`: fills a fresh disk store with recordings
of one model (the worst case: every one is a candidate for the nearest), starts seedcache in replay
mode, and times misses from a raw HTTP client: the first (which builds the index of recordings),
the following ones (which reuse it), and one that finds the index due for a refresh (as it is every
few seconds, to see what other proxies recorded), against a hit on the same proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import aiohttp
import orjson

from proxy import handlers
from proxy.config import Config
from proxy.embedded import EmbeddedProxy
from proxy.keys import make_key
from proxy.recording import Recording, Sample, utc_now
from proxy.stores.disk import DiskStore


def chat(i: int) -> dict[str, object]:
    return {
        "model": "gpt-4o-mini",
        "seed": i,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": f"Question number {i}: tell me about planet {i % 97}."},
        ],
    }


async def fill(directory: str, count: int) -> None:
    store = DiskStore(directory)
    body = {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Fine."},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
    }
    for i in range(count):
        canon = make_key("POST", "/v1/chat/completions", chat(i))
        sample = Sample(
            utc_now(),
            "http://upstream/v1",
            "gpt-4o-mini",
            "fp_1",
            200,
            {"content-type": "application/json"},
            1,
            body,
        )
        recording = Recording(canon.key, "POST", canon.path, canon.body, "", (sample,))
        await store.put("", canon.key, recording.dumps())
    await store.close()


async def timed(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> float:
    start = time.perf_counter()
    async with session.post(
        url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
    ) as response:
        await response.read()
    return (time.perf_counter() - start) * 1000


async def measure(base: str, rounds: int) -> dict[str, float]:
    url = base + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        first = await timed(session, url, chat(10_000_000))
        misses = [await timed(session, url, chat(20_000_000 + i)) for i in range(rounds)]
        hits = [await timed(session, url, chat(i)) for i in range(rounds)]
        # The index is due: this miss waits for its refresh.
        handlers.INDEX_TTL = handlers.INDEX_STALE_LIMIT = 0.0
        refreshed = await timed(session, url, chat(30_000_000))
    return {
        "first_miss_ms": first,
        "miss_p50_ms": statistics.median(misses),
        "refresh_miss_ms": refreshed,
        "hit_p50_ms": statistics.median(hits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recordings", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(fill(directory, args.recordings))
        config = Config.build(port=0, mode="replay", store=directory, access_log=False)
        with EmbeddedProxy(config) as proxy:
            result = asyncio.run(measure(proxy.url, args.rounds))
    print(f"{args.recordings} recordings of one model:")
    for name, value in result.items():
        print(f"  {name:14} {value:8.2f}")


if __name__ == "__main__":
    main()
