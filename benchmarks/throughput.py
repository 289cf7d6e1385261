"""Throughput against a zero-latency, unlimited fake: the processor versus a bare aiohttp loop.

Both send the same 20,000 small requests to the same fake server (in its own process), in the same run,
with the same number of requests in flight, in alternating rounds. Prints both rates (the best round of
each, so a noisy moment on a small machine does not decide the ratio) and their ratio; the same ratio in
CPU time of this process (the client is CPU-bound here, and CPU time is far less disturbed by neighbours);
and whether every request was answered exactly once in every round of the processor.

A third loop, in the same rounds, does only the work any tool must do per line beyond the bare loop: read
the line from the file and parse it, count its tokens with tiktoken, and append the answer to a results
file with one unbuffered write. Its ratios tell how much of the gap to the bare loop that work explains.

    python benchmarks/throughput.py [--requests 20000] [--concurrency 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from _common import API_KEY, fake_server_process, write_requests

import api_request_parallel_processor as app


def timed(coroutine: Coroutine[Any, Any, Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to run a coroutine to completion."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu, started = usage.ru_utime + usage.ru_stime, time.perf_counter()
    asyncio.run(coroutine)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime - cpu


async def bare_loop(url: str, bodies: list[dict], concurrency: int) -> None:
    """The reference: a semaphore and session.post, nothing else."""
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    semaphore = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def send(body: dict) -> None:
            async with semaphore, session.post(url, json=body, headers=headers) as response:
                await response.read()

        await asyncio.gather(*(send(body) for body in bodies))


async def essential_loop(url: str, requests_path: Path, concurrency: int) -> None:
    """The bare loop, plus reading and parsing each line, counting its tokens, and saving each answer."""
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    count_tokens = app.load_token_counter()
    semaphore = asyncio.Semaphore(concurrency)
    results_path = requests_path.with_name("essential.jsonl")
    with open(requests_path, "rb") as lines, open(results_path, "wb", buffering=0) as results:  # noqa: ASYNC230 - as
        # the processor: the reads are buffered, each write a few hundred bytes
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

            async def send(line: bytes) -> None:
                body = json.loads(line)
                metadata = body.pop("metadata")
                count_tokens(body["messages"][0]["content"])
                payload = json.dumps(body).encode()
                async with semaphore, session.post(url, data=payload, headers=headers) as response:
                    answer = await response.read()
                json.loads(answer)
                results.write(b"[" + payload + b"," + answer + b"," + json.dumps(metadata).encode() + b"]\n")

            await asyncio.gather(*(send(line) for line in lines))


async def processor(url: str, requests_path: Path, concurrency: int) -> None:
    results_path = app.default_save_filepath(str(requests_path))
    for path in (results_path, app.index_path(results_path)):
        Path(path).unlink(missing_ok=True)  # a fresh run, not a resume
    stats = await app.process_api_requests_from_file(
        str(requests_path), request_url=url, api_key=API_KEY, max_requests_per_minute=1e9,
        max_tokens_per_minute=1e12, max_concurrent_requests=concurrency, logging_level="WARNING")
    assert stats.succeeded == stats.total, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bare_rounds: list[tuple[float, float]] = []
    essential_rounds: list[tuple[float, float]] = []
    our_rounds: list[tuple[float, float]] = []
    answered_once = True
    with tempfile.TemporaryDirectory() as folder, fake_server_process() as url:
        requests_path = write_requests(Path(folder) / "requests.jsonl", args.requests)
        bodies = [{key: value for key, value in json.loads(line).items() if key != "metadata"}
                  for line in requests_path.read_text().splitlines()]
        asyncio.run(bare_loop(url, bodies[:500], args.concurrency))  # warm up the fake and the tokenizer
        app.load_token_counter()
        for _ in range(args.rounds):
            bare_rounds.append(timed(bare_loop(url, bodies, args.concurrency)))
            essential_rounds.append(timed(essential_loop(url, requests_path, args.concurrency)))
            our_rounds.append(timed(processor(url, requests_path, args.concurrency)))
            with open(Path(folder) / "requests_results.jsonl") as results:
                rows = Counter(json.loads(line)[2]["row"] for line in results)
            answered_once &= len(rows) == args.requests and set(rows.values()) == {1}
    bare, ours = min(wall for wall, _ in bare_rounds), min(wall for wall, _ in our_rounds)
    essential = min(wall for wall, _ in essential_rounds)
    bare_cpu = statistics.median(cpu for _, cpu in bare_rounds)
    essential_cpu = statistics.median(cpu for _, cpu in essential_rounds)
    our_cpu = statistics.median(cpu for _, cpu in our_rounds)
    print(f"requests:            {args.requests:,} (concurrency {args.concurrency}, {args.rounds} rounds each)")
    print(f"rounds, wall s:      bare {', '.join(f'{w:.2f}' for w, _ in bare_rounds)}; "
          f"essential {', '.join(f'{w:.2f}' for w, _ in essential_rounds)}; "
          f"processor {', '.join(f'{w:.2f}' for w, _ in our_rounds)}")
    print(f"bare aiohttp loop:   {args.requests / bare:,.0f} requests/s (best round {bare:.2f} s)")
    print(f"processor:           {args.requests / ours:,.0f} requests/s (best round {ours:.2f} s)")
    print(f"ratio, wall:         {bare / ours:.2f} of the bare loop's rate (target >= 0.8)")
    print(f"ratio, CPU:          {bare_cpu / our_cpu:.2f} (median CPU per request: bare "
          f"{bare_cpu / args.requests * 1e6:.0f} us, processor {our_cpu / args.requests * 1e6:.0f} us)")
    print(f"essential work loop: {args.requests / essential:,.0f} requests/s (best round {essential:.2f} s): "
          f"{bare / essential:.2f} of the bare loop's rate, {bare_cpu / essential_cpu:.2f} in CPU "
          f"({essential_cpu / args.requests * 1e6:.0f} us); the processor is {essential / ours:.2f} of its rate, "
          f"{essential_cpu / our_cpu:.2f} in CPU")
    print(f"every request answered exactly once: {answered_once}")


if __name__ == "__main__":
    main()
