"""--max_cost: what the fake server billed against the budget, on both roads, with faults and with long answers.

1. 2,000 requests with a budget that covers about half of them: the exit code, billed / budget, and a rerun with a
   larger budget (every line answered exactly once?). The same with 20% faults, and on the batch road with and
   without faults (results errored or expired, endpoint failures).
2. Long answers (max_tokens 64,000, streamed, 8,000 tokens produced in 0.8 s each) under a 600 requests/min limit:
   the share of the budget used when the run stops, and the request rate while the budget is far and near.

    python benchmarks/budget.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections import Counter
from pathlib import Path

from _common import API_KEY, small_request, write_jsonl_rows
from fake_anthropic import FakeConfig, ServerThread

import api_request_parallel_processor as app

FAST = {"api_key": API_KEY, "max_requests_per_minute": 60_000, "max_tokens_per_minute": 1e9, "logging_level": "ERROR",
        "request_timeout": 1.0, "max_attempts": 8, "batch_poll_seconds": 0.1}


def run(requests_path: Path, url: str, **settings: object) -> app.RunStats:
    return asyncio.run(app.process_api_requests_from_file(str(requests_path), request_url=url, **{**FAST, **settings}))


def answered(requests_path: Path) -> Counter:
    results = Path(app.default_save_filepath(str(requests_path)))
    return Counter(json.loads(line)[2]["row"] for line in results.read_text().splitlines())


def half_and_rest(folder: Path, name: str, count: int, budget: float, config: FakeConfig, **settings: object) -> None:
    requests_path = write_jsonl_rows(folder / f"{name}.jsonl", [small_request(i) for i in range(count)])
    with ServerThread(config) as fake:
        stats = run(requests_path, fake.url, max_cost=budget, **settings)
        billed, first = fake.stats.billed, len(answered(requests_path))
        rerun = run(requests_path, fake.url, max_cost=100.0, **settings)
        rows = answered(requests_path)
        print(f"{name:<24} exit {stats.exit_code}, billed ${billed:.4f} / budget ${budget:.4f} = {billed / budget:.1%}"
              f", {first:,} lines answered; rerun exit {rerun.exit_code}: {len(rows):,}/{count:,} lines, each once: "
              f"{set(rows.values()) == {1}}, paid twice {fake.stats.paid_twice}"
              + (f"; resubmitted {stats.batch.resubmitted}, endpoint faults {fake.stats.batch_faults}"
                 if stats.batch else ""))


def long_answers(folder: Path, budget: float) -> None:
    rows = [{**small_request(i), "max_tokens": 64_000} for i in range(400)]
    requests_path = write_jsonl_rows(folder / "long.jsonl", rows)
    config = FakeConfig(output_tokens=8_000, seconds_per_token=0.0001, requests_per_minute=600)
    with ServerThread(config) as fake:
        stats = run(requests_path, fake.url, max_cost=budget, max_requests_per_minute=600, request_timeout=30.0)
        times = fake.stats.received_times
        start, end = times[0], times[-1]
        far = [t for t in times if t < start + (end - start) / 2]
        near = [t for t in times if t >= end - 5]
        print(f"long answers            exit {stats.exit_code}, billed ${fake.stats.billed:.2f} / budget ${budget:.2f} "
              f"= {fake.stats.billed / budget:.1%} (the most one request can cost: $0.64); {len(times)} requests in "
              f"{end - start:.1f} s; while far: {len(far) / max(1e-9, (far[-1] - far[0])) * 60:.0f} requests/min "
              f"(limit 600); the last 5 s: {len(near)} requests")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2_000)
    args = parser.parse_args()
    app.load_token_counter()
    each = 20 * 10 / 1e6 + 13 * 2 / 1e6  # about what one small request costs: 20 output and ~13 input tokens
    with tempfile.TemporaryDirectory() as folder:
        half = args.requests * each / 2
        half_and_rest(Path(folder), "direct", args.requests, half, FakeConfig(latency=(0.05, 0.1)))
        half_and_rest(Path(folder), "direct, 20% faults", args.requests, half,
                      FakeConfig(latency=(0.05, 0.1), fault_rate=0.2, slow_seconds=1.5, seed=5))
        half_and_rest(Path(folder), "batch", args.requests, half / 2, FakeConfig(), batch=True)
        half_and_rest(Path(folder), "batch, 20% faults", args.requests, half / 2,
                      FakeConfig(batch_errored_rate=0.1, batch_expired_rate=0.05, batch_fault_rate=0.2, seed=5),
                      batch=True)
        long_answers(Path(folder), 30.0)


if __name__ == "__main__":
    main()
