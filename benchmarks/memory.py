"""Memory, idle CPU and start-up on a 1,000,000-line file, with the command line as a user runs it.

1. Streams a generated 1,000,000-line file under a rate limit for 20 s: prints the time from start to the
   first request the fake received, and the peak RSS.
2. The same file at 60 requests/min: prints the CPU used over 20 s of waiting on the limit, as a share of
   one core.
3. Builds a results file for all but the last of those requests, as an older version would have left it (no
   resume index), and resumes over it: prints the time to the first new request (the last line), the whole
   run and its peak RSS. That run rebuilds the index. Then one line is appended and the run resumes again,
   now with the index: the same figures. `--script` measures another copy of the script (an older commit,
   say) on the same files.
4. Exports every line's answer to a CSV in input order (--export_only), from a results file written in another
   order: prints the time and peak RSS for the whole file, and for its first 10,000 lines as the reference, and
   checks that the rows are all there, in order.

    python benchmarks/memory.py [--lines 1000000] [--seconds 20] [--script path/to/script.py]
                                [--only streaming|resume|export]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from _common import API_KEY, ROOT, cpu_seconds, small_request, write_requests
from fake_anthropic import FakeConfig, ServerThread

SCRIPT = ROOT / "api_request_parallel_processor.py"


def start(requests_path: Path, url: str, *flags: str) -> tuple[subprocess.Popen[bytes], float]:
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--requests_filepath", str(requests_path),
                                "--request_url", url, "--api_key", API_KEY, "--logging_level", "WARNING", *flags],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return process, started


def stop(process: subprocess.Popen[bytes]) -> float:
    """SIGTERM (a graceful stop), then the child's peak RSS in MB from wait4."""
    process.send_signal(signal.SIGTERM)
    return finish(process)


def finish(process: subprocess.Popen[bytes]) -> float:
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024


def write_results(path: Path, count: int, reverse: bool = False) -> None:
    """Result records for the first `count` generated requests, as a finished run would have left them (in
    reverse order: as answers arriving in another order than the lines)."""
    with open(path, "w") as file:
        for start_index in range(0, count, 10_000):
            lines = []
            chunk = range(start_index, min(count, start_index + 10_000))
            for i in (reversed(range(count - chunk.stop, count - chunk.start)) if reverse else chunk):
                body = small_request(i)
                metadata = body.pop("metadata")
                response = {"id": f"msg_{i:08d}", "type": "message", "role": "assistant", "model": body["model"],
                            "content": [{"type": "text", "text": f"8 * {i} = {8 * i}"}], "stop_reason": "end_turn",
                            "stop_sequence": None, "usage": {"input_tokens": 14, "output_tokens": 9,
                                                             "cache_creation_input_tokens": 0,
                                                             "cache_read_input_tokens": 0}}
                lines.append(json.dumps([body, response, metadata]) + "\n")
            file.write("".join(lines))


def resume(requests_path: Path, results_path: Path, fake, label: str) -> None:
    """One resuming run: the time to the first new request, the whole run, its peak RSS."""
    received_before = fake.stats.received
    process, started = start(requests_path, fake.url, "--save_filepath", str(results_path))
    while fake.stats.received == received_before and process.poll() is None:
        time.sleep(0.005)
    first = fake.stats.received_times[-1] - started if fake.stats.received > received_before else float("nan")
    rss = finish(process)
    elapsed = time.monotonic() - started
    print(f"resume, {label + ':':<34} first new request {first:5.2f} s (target < 5 s), whole run {elapsed:5.1f} s, "
          f"peak RSS {rss:.0f} MB, {fake.stats.received - received_before} sent, exit code {process.returncode}")


def main() -> None:
    global SCRIPT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--script", type=Path, default=SCRIPT, help="the script to measure")
    parser.add_argument("--only", choices=["streaming", "resume", "export"], help="run one part only")
    args = parser.parse_args()
    SCRIPT = args.script
    with tempfile.TemporaryDirectory() as folder, ServerThread(FakeConfig(latency=(0.05, 0.1))) as fake:
        requests_path = write_requests(Path(folder) / "requests.jsonl", args.lines)
        size_mb = requests_path.stat().st_size / 1e6
        print(f"input:                       {args.lines:,} lines, {size_mb:,.0f} MB")
        if args.only in (None, "streaming"):
            measure_streaming(requests_path, fake, Path(folder), args.seconds)

        if args.only in (None, "resume"):
            results_path = Path(folder) / "resume.jsonl"
            write_results(results_path, args.lines - 1)
            print(f"results file:                {args.lines - 1:,} records, "
                  f"{results_path.stat().st_size / 1e6:,.0f} MB")
            resume(requests_path, results_path, fake, "no index (an older version's)")
            with open(requests_path, "a") as file:
                file.write(json.dumps(small_request(args.lines)) + "\n")
            resume(requests_path, results_path, fake, "with the index")

        if args.only in (None, "export"):
            measure_export(Path(folder), args.lines)


def measure_streaming(requests_path: Path, fake, folder: Path, seconds: float) -> None:
    process, started = start(requests_path, fake.url, "--max_requests_per_minute", "6000",
                             "--max_tokens_per_minute", "10000000", "--save_filepath", str(folder / "streamed.jsonl"))
    while not fake.stats.received_times:
        time.sleep(0.005)
    first_request = fake.stats.received_times[0] - started
    time.sleep(seconds)
    sent = fake.stats.received
    streaming_rss = stop(process)
    print(f"start to first request:      {first_request:.2f} s (target < 1 s)")
    print(f"streaming {seconds:g} s at 6,000/min: {sent:,} requests sent, peak RSS {streaming_rss:.0f} MB "
          "(target <= 100 MB)")

    process, _ = start(requests_path, fake.url, "--max_requests_per_minute", "60",
                       "--save_filepath", str(folder / "idle.jsonl"))
    time.sleep(5)  # past start-up and the background line count
    cpu_before, window_start = cpu_seconds(process.pid), time.monotonic()
    time.sleep(seconds)
    cpu_used = cpu_seconds(process.pid) - cpu_before
    share = cpu_used / (time.monotonic() - window_start)
    stop(process)
    print(f"waiting at 60/min:           {cpu_used:.2f} CPU s in {seconds:g} s = {100 * share:.1f}% of a core "
          "(target < 5%)")


def measure_export(folder: Path, lines: int) -> None:
    for count in (10_000, lines):
        requests_path = write_requests(folder / f"export-{count}.jsonl", count)
        results_path = folder / f"export-{count}_results.jsonl"
        write_results(results_path, count, reverse=True)
        export_path = folder / f"export-{count}.csv"
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, str(SCRIPT), "--requests_filepath", str(requests_path),
                                    "--export", str(export_path), "--export_only", "--logging_level", "WARNING"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rss = 0.0  # the child's own high-water mark: wait4's figure counts this process's memory, copied by fork
        while process.poll() is None:
            with suppress(OSError, StopIteration):
                status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
                rss = max(rss, int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 1024)
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        with open(export_path, newline="") as file:
            rows = csv.DictReader(file)
            in_order = all(int(row["line"]) == number and row["status"] == "answered"
                           and row["text"] == f"8 * {number - 1} = {8 * (number - 1)}"
                           for number, row in enumerate(rows, start=1)) and rows.line_num == count + 1
        print(f"export to CSV, {count:>9,} lines: {elapsed:5.1f} s, peak RSS {rss:4.0f} MB, every row answered and "
              f"in input order: {in_order}, exit code {process.returncode}")


if __name__ == "__main__":
    main()
