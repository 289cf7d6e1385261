"""Prompt-cache writes with and without the per-prefix warm-up.

90 requests share 3 cached prefixes of about 4,000 tokens each (interleaved, as a dataset of questions about
three documents would be), against the tests' fake server, which creates a cache entry only when the
response that writes it is sent, with 0.3-0.6 s latency. Prints the cache-write tokens against the ideal (each
prefix written once) and the share of the other requests that read the cache, with the warm-up on, then
switched off (every request sent as soon as capacity allows, as the cookbook script does after its first).

    python benchmarks/caching.py
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from _common import API_KEY, MODEL, write_jsonl_rows
from fake_anthropic import FakeAnthropic, FakeConfig, ServerThread, segments

import api_request_parallel_processor as app

SENTENCE = "Clause {n}: the supplier delivers the goods within thirty days and the buyer pays within sixty days. "


def document(index: int) -> str:
    return f"CONTRACT {index}\n" + "".join(SENTENCE.format(n=n) for n in range(190))  # ~4,000 tokens


def requests(prefixes: int, per_prefix: int) -> list[dict]:
    return [{"model": MODEL, "max_tokens": 64,
             "system": [{"type": "text", "text": "Answer from the contract."},
                        {"type": "text", "text": document(d), "cache_control": {"type": "ephemeral"}}],
             "messages": [{"role": "user", "content": f"Question {i} about contract {d}?"}]}
            for i in range(per_prefix) for d in range(prefixes)]


def prefix_tokens(body: dict) -> int:
    """What the fake counts for a request's cached prefix: the ideal write, once per prefix."""
    fake = FakeAnthropic(FakeConfig(token_ratio=1.0))
    parts = segments(body)
    last = max(i for i, (_, marked) in enumerate(parts) if marked)
    return sum(fake.count_tokens(part) for part, _ in parts[: last + 1])


def run(rows: list[dict], path: Path) -> tuple[int, int]:
    """(cache-write tokens, cache-read tokens) of one run."""
    write_jsonl_rows(path, rows)
    with ServerThread(FakeConfig(latency=(0.3, 0.6), token_ratio=1.0)) as fake:
        stats = asyncio.run(app.process_api_requests_from_file(
            str(path), request_url=fake.url, api_key=API_KEY, max_requests_per_minute=6000,
            max_tokens_per_minute=10_000_000, logging_level="ERROR"))
        assert stats.succeeded == len(rows), stats
        return fake.stats.cache_write_tokens, fake.stats.cache_read_tokens


def main() -> None:
    rows = requests(3, 30)
    ideal = prefix_tokens(rows[0])
    others = len(rows) - 3
    with tempfile.TemporaryDirectory() as folder:
        for label, warm_up in (("warm-up on", True), ("warm-up off", False)):
            original = app.PrefixWarmer.admit
            if not warm_up:
                app.PrefixWarmer.admit = lambda self, job: True
            try:
                written, read = run(rows, Path(folder) / f"{label.replace(' ', '-')}.jsonl")
            finally:
                app.PrefixWarmer.admit = original
            readers = round(read / ideal)
            print(f"{label:<12} cache writes {written:>8,} tokens = {written / (3 * ideal):4.2f}x the ideal "
                  f"(3 x {ideal:,}); {readers} of the other {others} requests read the cache ({readers / others:.0%})")


if __name__ == "__main__":
    main()
