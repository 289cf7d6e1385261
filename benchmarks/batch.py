"""The Message Batches road (`--batch`) against the tests' fake server, run as a user runs the command.

1. 5,000 requests with --batch --batch_size 1000: lines answered, how often each request was submitted, and
   whether the records have the shape of a direct run's (the same file sent directly, compared record by record).
2. The same with 5% of results errored on the API's side, 3% expired, 20% of calls to the batch endpoints failing
   with a 5xx, the first results download cut off, and 10 requests the API refuses.
3. SIGKILL once the first batches are submitted (each create takes 0.3 s to answer, so the kill may land between
   the API making a batch and the run hearing of it), then the same command again.
4. --no_wait twice: submit, then collect once the batches have ended; the exit codes.
5. Peak RSS of one batch of 10,000 and of 100,000 requests.

    python benchmarks/batch.py [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import API_KEY, ROOT, fake_server_process, small_request
from fake_anthropic import FakeAnthropic, FakeConfig, ServerThread

SCRIPT = ROOT / "api_request_parallel_processor.py"


def command(requests_path: Path, fake: FakeAnthropic | None, *flags: str) -> list[str]:
    url = ["--request_url", fake.url] if fake else []
    return [sys.executable, str(SCRIPT), "--requests_filepath", str(requests_path), *url, "--api_key", API_KEY,
            "--batch", "--batch_poll_seconds", "0.2", "--logging_level", "WARNING", *flags]


def run(requests_path: Path, fake: FakeAnthropic, *flags: str) -> tuple[int, float, float]:
    """The command's exit code, seconds and peak RSS in MB."""
    started = time.monotonic()
    process = subprocess.Popen(command(requests_path, fake, *flags), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    return os.waitstatus_to_exitcode(status), time.monotonic() - started, usage.ru_maxrss / 1024


def write_file(folder: Path, name: str, count: int, refused: int = 0) -> Path:
    path = folder / f"{name}.jsonl"
    with open(path, "w") as file:
        file.writelines(json.dumps(small_request(i)) + "\n" for i in range(count))
        # a misspelt field: the API refuses these, as `errored` results
        file.writelines(json.dumps({**small_request(count + i), "temprature": 0.5}) + "\n" for i in range(refused))
    return path


def records(path: Path) -> list[list]:
    return [json.loads(line) for line in open(path)] if path.exists() else []


def tally(requests_path: Path, fake: FakeAnthropic, count: int) -> str:
    stem = str(requests_path)[: -len(".jsonl")]
    results, errors = records(Path(stem + "_results.jsonl")), records(Path(stem + "_results_errors.jsonl"))
    rows = Counter(record[2]["row"] for record in results)
    once = sum(1 for row in range(count) if rows[row] == 1)
    submissions = Counter(fake.stats.batch_submissions.values())
    return (f"{once:,}/{count:,} lines answered exactly once, {sum(rows.values()) - once:,} extra results, "
            f"{len(errors):,} in the errors file; {fake.stats.submitted_twice:,} requests submitted while answered or "
            f"in an open batch; submissions per request {dict(sorted(submissions.items()))}; "
            f"{len(fake.batches)} batches")


def plain(folder: Path) -> None:
    requests_path = write_file(folder, "plain", 5_000)
    with ServerThread(FakeConfig(batch_seconds=1.0)) as fake:
        code, seconds, _ = run(requests_path, fake, "--batch_size", "1000")
        print(f"5,000 requests, --batch_size 1000: exit {code} in {seconds:.1f} s; {tally(requests_path, fake, 5_000)}")
    direct_path = folder / "direct.jsonl"
    direct_path.write_bytes(requests_path.read_bytes())
    with ServerThread(FakeConfig()) as fake:
        subprocess.run([sys.executable, str(SCRIPT), "--requests_filepath", str(direct_path), "--request_url", fake.url,
                        "--api_key", API_KEY, "--max_requests_per_minute", "600000", "--max_tokens_per_minute",
                        "100000000", "--logging_level", "WARNING"], check=True)
    batched = {record[2]["row"]: record for record in records(folder / "plain_results.jsonl")}
    same = sum(1 for record in records(folder / "direct_results.jsonl")
               if batched[record[2]["row"]][0] == record[0] and {**batched[record[2]["row"]][1], "id": ""} ==
               {**record[1], "id": ""} and batched[record[2]["row"]][2] == record[2])
    print(f"  records identical to a direct run's (request, response but its id, metadata): {same:,}/5,000")


def faults(folder: Path) -> None:
    requests_path = write_file(folder, "faults", 5_000, refused=10)
    config = FakeConfig(batch_seconds=1.0, batch_errored_rate=0.05, batch_expired_rate=0.03, batch_fault_rate=0.2,
                        batch_fault_kinds=("500", "529", "502"), batch_cut_downloads=1)
    with ServerThread(config) as fake:
        code, seconds, _ = run(requests_path, fake, "--batch_size", "1000")
        print(f"5,000 + 10 refused, 5% errored, 3% expired, 20% endpoint 5xx, a cut download: exit {code} in "
              f"{seconds:.1f} s; {tally(requests_path, fake, 5_000)}; {fake.stats.batch_faults} endpoint faults, "
              f"{fake.stats.batch_downloads} downloads")
    errors = records(folder / "faults_results_errors.jsonl")
    refused = "invalid_request_error: temprature: Extra inputs are not permitted"
    print(f"  errors file: {sum(refused in e[1][-1] for e in errors)}"
          f" of {len(errors)} records carry the API's message")


def killed(folder: Path) -> None:
    requests_path = write_file(folder, "killed", 5_000)
    with ServerThread(FakeConfig(batch_seconds=1.0, batch_create_seconds=0.3)) as fake:
        process = subprocess.Popen(command(requests_path, fake, "--batch_size", "500"), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        journal = folder / "killed_results.jsonl.batches" / "journal.jsonl"
        while not journal.exists() or journal.read_text().count('"submitted"') < 3:
            time.sleep(0.01)
        time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait()
        made, recorded = len(fake.batches), journal.read_text().count('"submitted"')
        code, seconds, _ = run(requests_path, fake, "--batch_size", "500")
        print(f"SIGKILL after {recorded} batches recorded ({made} made by the API), then the same command: exit {code} "
              f"in {seconds:.1f} s; {tally(requests_path, fake, 5_000)}")


def no_wait(folder: Path) -> None:
    requests_path = write_file(folder, "no_wait", 5_000)
    with ServerThread(FakeConfig(batch_seconds=2.0)) as fake:
        first, seconds_first, _ = run(requests_path, fake, "--batch_size", "1000", "--no_wait")
        time.sleep(2.5)
        second, seconds_second, _ = run(requests_path, fake, "--batch_size", "1000", "--no_wait")
        third, _, _ = run(requests_path, fake, "--batch_size", "1000", "--no_wait")
        print(f"--no_wait: submit -> exit {first} ({seconds_first:.1f} s); after the batches ended, collect -> exit "
              f"{second} ({seconds_second:.1f} s); once more -> exit {third}; {tally(requests_path, fake, 5_000)}")


def memory(folder: Path) -> None:
    """The peak is the child's own high-water mark (VmHWM), read until it exits: `ru_maxrss` would also count
    what the child shared with this process between fork and exec."""
    for count in (10_000, 100_000):
        requests_path = write_file(folder, f"memory{count}", count)
        with fake_server_process() as url:
            started = time.monotonic()
            process = subprocess.Popen([*command(requests_path, None, "--request_url", url)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            peak = 0
            while process.poll() is None:
                try:
                    status = Path(f"/proc/{process.pid}/status").read_text()
                    peak = max(peak, int(status.split("VmHWM:")[1].split()[0]))
                except (OSError, IndexError):  # exiting
                    pass
                time.sleep(0.01)
        rows = Counter(record[2]["row"] for record in records(folder / f"memory{count}_results.jsonl"))
        megabytes = requests_path.stat().st_size / 1e6
        print(f"{count:,} requests in one batch ({megabytes:.0f} MB): exit {process.returncode}"
              f" in {time.monotonic() - started:.1f} s, peak RSS {peak / 1024:.0f} MB; "
              f"{sum(rows[row] == 1 for row in range(count)):,}/{count:,} lines answered exactly once")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="plain, faults, killed, no_wait or memory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for scenario in (plain, faults, killed, no_wait, memory):
            if args.only in (None, scenario.__name__):
                scenario(Path(folder))


if __name__ == "__main__":
    main()
