"""How fast --dry_run reads the caching example, per 10,000 lines, beside the floor of just parsing it.

Builds 10,000-line files from examples/test_caching_requests_to_parallel_process.jsonl (about 11 KB a
line: one long handbook in a cached system block, then a question):

- "repeated": the example's 10 lines repeated, as they are;
- "unique questions": each line asks its own question, as a real dataset would.

Each is dry-run from the command line, as a user runs it, several times. Printed per file: the dry run's
own figure for reading the file (best and median; loading the tokenizer, about 0.2 s, is part of it),
the whole command's wall time (which adds Python's start-up and imports), and the floor measured in the
same run: reading the same file and json.loads of every line, in this process. The ratio to the floor
is what a noisy machine moves least.

    python benchmarks/dry_run.py [--lines 10000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT

SCRIPT = ROOT / "api_request_parallel_processor.py"
EXAMPLE = ROOT / "examples" / "test_caching_requests_to_parallel_process.jsonl"


def build(path: Path, lines: int, unique_questions: bool) -> Path:
    example = [json.loads(line) for line in EXAMPLE.read_text().splitlines() if line.strip()]
    with open(path, "w") as file:
        for row in range(lines):
            request = example[row % len(example)]
            if unique_questions:
                question = request["messages"][0]["content"]
                request = {**request, "messages": [{"role": "user", "content": f"{question} (case {row})"}],
                           "metadata": {"row_id": row}}
            file.write(json.dumps(request) + "\n")
    return path


def floor_seconds(path: Path) -> float:
    """Reading the file and parsing every line: what any dry run must at least do."""
    started = time.perf_counter()
    with open(path, "rb") as file:
        for line in file:
            json.loads(line)
    return time.perf_counter() - started


def dry_run(path: Path) -> tuple[float, float]:
    """(the dry run's own figure for reading the file, the command's wall time)."""
    started = time.perf_counter()
    output = subprocess.run([sys.executable, str(SCRIPT), "--requests_filepath", str(path), "--dry_run"],
                            capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - started
    return float(re.search(r"read in ([\d.]+) s", output).group(1)), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    per_10k = 10_000 / args.lines
    with tempfile.TemporaryDirectory() as directory:
        for name, unique in (("repeated", False), ("unique questions", True)):
            path = build(Path(directory) / "requests.jsonl", args.lines, unique)
            size = path.stat().st_size / 1e6
            runs = [dry_run(path) for _ in range(args.rounds)]
            floors = [floor_seconds(path) for _ in range(args.rounds)]
            reads, walls = [run[0] for run in runs], [run[1] for run in runs]
            print(f"{name}: {args.lines:,} lines, {size:.0f} MB. Per 10,000 lines: dry run reads in "
                  f"{min(reads) * per_10k:.2f} s best, {statistics.median(reads) * per_10k:.2f} s median "
                  f"(whole command {min(walls) * per_10k:.2f} s best); floor (read + json.loads) "
                  f"{min(floors) * per_10k:.2f} s best; ratio {min(reads) / min(floors):.1f}x the floor")


if __name__ == "__main__":
    main()
