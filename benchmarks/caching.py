"""Prompt caching: the per-prefix warm-up, and caching without asking.

90 requests share 3 cached prefixes of about 4,000 tokens each (interleaved, as a dataset of questions about
three documents would be), against the tests' fake server, which creates a cache entry only when the
response that writes it is sent, with 0.3-0.6 s latency. Prints the cache-write tokens against the ideal (each
prefix written once) and the share of the other requests that read the cache, with the warm-up on, then
switched off (every request sent as soon as capacity allows, as the cookbook script does after its first).

Then automatic caching (--auto_cache, on by default), on the job of the tests: 260 lines in five families (a long
shared system string; shared tools, system blocks and a few-shot pair; a short shared system; a long system of its
own on every line; the user's own breakpoint), none but the last marked, against the fake with 300,000 input tokens a
minute binding: input cost in tokens (input + 1.25 x writes + 0.1 x reads) against the ideal, dollars and wall time,
with it and with --auto_cache off. And a file of 1,000,000 lines, each with a system of its own (the most prefixes
to remember): the time until the first request reaches the fake, and the dry run's time and peak RSS over the
whole file, on and off.

    python benchmarks/caching.py [--only warm-up|auto|million]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import API_KEY, MODEL, ROOT, write_jsonl_rows
from fake_anthropic import FakeAnthropic, FakeConfig, ServerThread, segments
from test_caching import family_lines

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


def warm_up(folder: str) -> None:
    rows = requests(3, 30)
    ideal = prefix_tokens(rows[0])
    others = len(rows) - 3
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


def automatic(folder: str) -> None:
    lines, limit = family_lines(), 300_000
    counter = FakeAnthropic(FakeConfig())
    first = {line["metadata"]["family"]: line for line in reversed(lines)}
    prefixes = {"shared": counter.prompt_of(app.with_breakpoint(first["shared"], 0, "5m")).cache_write,
                "few-shot": counter.prompt_of(app.with_breakpoint(first["few-shot"], 4, "5m")).cache_write,
                "marked": counter.prompt_of(first["marked"]).cache_write}
    families = Counter(line["metadata"]["family"] for line in lines)
    ideal = sum(counter.prompt_of(app.without_breakpoints(line)).input_tokens for line in lines) + sum(
        size * (1.25 + 0.1 * (families[name] - 1) - families[name]) for name, size in prefixes.items())
    for auto_cache in (True, False):
        path = write_jsonl_rows(Path(folder) / f"families-{auto_cache}.jsonl", lines)
        with ServerThread(FakeConfig(input_tokens_per_minute=limit, burst_seconds=1.0)) as fake:
            started = time.monotonic()
            stats = asyncio.run(app.process_api_requests_from_file(
                str(path), request_url=fake.url, api_key=API_KEY, max_requests_per_minute=60_000,
                max_tokens_per_minute=limit, auto_cache=auto_cache, logging_level="ERROR"))
            took, usage = time.monotonic() - started, stats.totals
        paid = usage.input_tokens + 1.25 * usage.cache_write_tokens + 0.1 * usage.cache_read_tokens
        print(f"auto_cache {'on ' if auto_cache else 'off'}: {stats.succeeded} answered in {took:5.1f} s; input cost "
              f"{paid:>9,.0f} tokens = {paid / ideal:4.2f}x the ideal ({ideal:,.0f}); ${usage.cost:.4f} in all")


def million(folder: str) -> None:
    path = Path(folder) / "million.jsonl"
    with open(path, "w") as file:
        for start in range(0, 1_000_000, 10_000):
            file.writelines(json.dumps({"model": MODEL, "max_tokens": 16, "system": f"Ledger {i}: " + "entry " * 60,
                                        "messages": [{"role": "user", "content": f"Total of ledger {i}?"}]}) + "\n"
                            for i in range(start, start + 10_000))
    script = str(ROOT / "api_request_parallel_processor.py")
    with ServerThread(FakeConfig()) as fake:
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, script, "--requests_filepath", str(path), "--request_url",
                                    fake.url, "--api_key", API_KEY, "--logging_level", "ERROR"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not fake.stats.received and time.monotonic() - started < 120:
            time.sleep(0.01)
        print(f"1,000,000 lines ({path.stat().st_size / 2**20:,.0f} MB): the first request after "
              f"{time.monotonic() - started:.2f} s")
        process.terminate()
        process.wait()
    for auto_cache in ("on", "off"):
        started = time.monotonic()
        result = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, script, "--requests_filepath", str(path),
                                 "--dry_run", "--auto_cache", auto_cache], capture_output=True, text=True, check=False)
        peak = int(result.stderr.strip().splitlines()[-1]) / 1024
        print(f"  dry run, auto_cache {auto_cache}: {time.monotonic() - started:.0f} s, peak RSS {peak:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("warm-up", "auto", "million"))
    only = parser.parse_args().only
    with tempfile.TemporaryDirectory() as folder:
        for name, measure in (("warm-up", warm_up), ("auto", automatic), ("million", million)):
            if only in (None, name):
                measure(folder)


if __name__ == "__main__":
    main()
