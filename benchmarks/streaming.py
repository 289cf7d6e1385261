"""Streaming: long answers under a short timeout, failures halfway, and the CPU a stream costs.

1. 20 requests with max_tokens 64,000 whose answers take 15 s each to generate, run with --request_timeout 5:
   prints the results, how often each request was sent, and how long the run took.
2. 1,000 streamed requests, with an `error` event in 10% of the streams and the connection dropped in 5%:
   prints whether every line was answered exactly once.
3. Short answers (20 tokens), 2,000 requests sent plain and then streamed, against a fake in its own process:
   prints the client's CPU per request each way, the measurement behind sending short answers plain.

    python benchmarks/streaming.py [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import API_KEY, fake_server_process, small_request, write_jsonl_rows
from fake_anthropic import FakeConfig, ServerThread

import api_request_parallel_processor as app

FAST = {"api_key": API_KEY, "max_requests_per_minute": 1e9, "max_tokens_per_minute": 1e12, "logging_level": "ERROR"}


def run(requests_path: Path, url: str, **settings: object) -> tuple[app.RunStats, list, float]:
    """Process a file; return the stats, the saved records and the CPU seconds it took."""
    results_path = Path(app.default_save_filepath(str(requests_path)))
    for path in (results_path, Path(app.index_path(str(results_path)))):
        path.unlink(missing_ok=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    before = usage.ru_utime + usage.ru_stime
    stats = asyncio.run(app.process_api_requests_from_file(str(requests_path), request_url=url,
                                                           **{**FAST, **settings}))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    records = [app.json.loads(line) for line in results_path.read_text().splitlines()]
    return stats, records, usage.ru_utime + usage.ru_stime - before


def long_answers(folder: Path, seconds: float) -> None:
    tokens = 300
    config = FakeConfig(output_tokens=tokens, seconds_per_token=seconds / tokens, ping_seconds=2.0)
    rows = [{**small_request(i), "max_tokens": 64_000} for i in range(20)]
    with ServerThread(config) as fake:
        started = time.monotonic()
        stats, _, _ = run(write_jsonl_rows(folder / "long.jsonl", rows), fake.url, request_timeout=5)
        elapsed = time.monotonic() - started
        sent = Counter(body["messages"][0]["content"] for body in fake.stats.bodies_seen)
    print(f"long answers:   20 requests of {seconds:g} s each, --request_timeout 5: {stats.succeeded} results, "
          f"{stats.failed} failed, each sent {sorted(set(sent.values()))} time(s), {elapsed:.1f} s in all, "
          f"{stats.totals.output_tokens:,} output tokens")


def failures_halfway(folder: Path) -> None:
    config = FakeConfig(fault_rate=0.15, fault_kinds=("stream_error", "stream_error", "stream_drop"))
    rows = [{**small_request(i), "stream": True} for i in range(1000)]
    with ServerThread(config) as fake:
        stats, records, _ = run(write_jsonl_rows(folder / "faults.jsonl", rows), fake.url, max_attempts=8)
        rows_saved = Counter(record[2]["row"] for record in records)
        print(f"failures:       1,000 streams, {fake.stats.faults.get('stream_error', 0)} error events and "
              f"{fake.stats.faults.get('stream_drop', 0)} dropped connections halfway: {stats.succeeded} results, "
              f"{stats.failed} failed, every line exactly once: {rows_saved == Counter(range(1000))}")


def cpu_per_answer(folder: Path) -> None:
    plain = [small_request(i) for i in range(2000)]
    streamed = [{**row, "stream": True} for row in plain]
    with fake_server_process() as url:
        run(write_jsonl_rows(folder / "warm.jsonl", plain[:200]), url)
        cpu = {"plain": [], "streamed": []}
        for _ in range(3):
            for name, rows in (("plain", plain), ("streamed", streamed)):
                cpu[name].append(run(write_jsonl_rows(folder / f"{name}.jsonl", rows), url)[2])
    plain_us, streamed_us = (min(cpu[name]) / 2000 * 1e6 for name in ("plain", "streamed"))
    print(f"short answers:  client CPU per request, best of 3 rounds of 2,000: plain {plain_us:.0f} us, streamed "
          f"{streamed_us:.0f} us ({streamed_us / plain_us:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="generation time of each long answer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        long_answers(Path(folder), args.seconds)
        failures_halfway(Path(folder))
        cpu_per_answer(Path(folder))


if __name__ == "__main__":
    main()
