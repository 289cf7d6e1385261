"""A hostile world, measured as a user meets it: the command line against hostile servers and a full disk.

1. A full disk: 2,000 requests, results on a file that cannot grow past 200 KB (RLIMIT_FSIZE stands in for a
   full filesystem): exit code, time, answers paid and saved, then the rerun with room: each line once, and how
   many requests were paid twice.
2. Hostile answers, each to one request with --max_attempts 2: an endless body, a gzip bomb, an endless event
   line, a stream block numbered 10^9, a stream of nothing but pings (--request_timeout 10): exit code, time and
   peak RSS of the run (VmHWM), beside a run that is answered normally.
3. A server that never completes connections: how long until the run says the API or the network is down.
4. A pause: the run stopped (SIGSTOP) for 25 s with about 100 requests in flight and --request_timeout 10, then
   continued (SIGCONT): exit code and requests paid twice, plain and streamed.
5. Runs that share a limit: ten runs of 60 lines at once on one 600 requests/minute limit, each told 600 (then
   auto): 429s per answer, and the time against the 60 s the limit allows.

    python benchmarks/hostile.py [--only disk|answers|connect|pause|shared]
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import API_KEY, MODEL, ROOT
from fake_anthropic import FakeConfig, ServerThread
from test_hostile import endless

SCRIPT = str(ROOT / "api_request_parallel_processor.py")


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(args: list[str], **popen: Any) -> tuple[int, float, float, str]:
    """Run the command line: (exit code, seconds, peak RSS in MB, stderr)."""
    started, peak = time.monotonic(), 0
    process = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, **popen)
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as status:
                peak = max([peak, *(int(line.split()[1]) for line in status if line.startswith("VmHWM"))])
        except OSError:
            pass
        time.sleep(0.05)
    return process.returncode, time.monotonic() - started, peak / 1024, process.stderr.read()


def full_disk(folder: Path) -> None:
    rows = [{"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": f"question {i} " + "x" * 60}],
             "metadata": {"row": i}} for i in range(2000)]
    requests_path = write_rows(folder / "disk.jsonl", rows)
    results_path = folder / "disk_results.jsonl"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))

    with ServerThread(FakeConfig(latency=(0.05, 0.3))) as fake:
        args = ["--requests_filepath", str(requests_path), "--request_url", fake.url, "--api_key", API_KEY,
                "--max_requests_per_minute", "30000", "--max_tokens_per_minute", "100000000"]
        code, seconds, _, stderr = run(args, preexec_fn=limit)
        saved = results_path.read_bytes().splitlines()
        [json.loads(line) for line in saved]  # every record whole
        answered = sum(fake.stats.answered.values())
        print(f"full disk: exit {code} after {seconds:.1f} s (the last {30} s waiting for room), traceback: "
              f"{'Traceback' in stderr}; {answered:,} answered, {len(saved):,} saved, whole records only")
        code, seconds, _, _ = run(args)
        rows_saved = sorted(json.loads(line)[2]["row"] for line in results_path.read_bytes().splitlines())
        print(f"  rerun with room: exit {code} in {seconds:.1f} s; every line exactly once: "
              f"{rows_saved == list(range(2000))}; paid twice: {fake.stats.paid_twice} (in flight when the disk "
              f"filled: {answered - len(saved)})")


def hostile_answers(folder: Path) -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))
    block = (b'event: message_start\ndata: {"type": "message_start", "message": {"content": []}}\n\n'
             b'event: content_block_start\ndata: {"type": "content_block_start", "index": 1000000000, '
             b'"content_block": {"type": "text", "text": ""}}\n\n')
    cases = {
        "answered normally": (FakeConfig(), {}, []),
        "endless body": (FakeConfig(hostile=endless("application/json", b'{"content": "', b"x" * 65536)), {}, []),
        "gzip bomb": (FakeConfig(hostile=endless("application/json", bomb, bomb, encoding="gzip")), {}, []),
        "endless event line": (FakeConfig(hostile=endless("text/event-stream", b"data: ", b"y" * 65536)),
                               {"stream": True}, []),
        "block 10^9": (FakeConfig(hostile=endless("text/event-stream", block, b"event: ping\ndata: {}\n\n")),
                       {"stream": True}, []),
        "nothing but pings": (FakeConfig(ping_seconds=1, slow_seconds=3600), {"stream": True},
                              ["--request_timeout", "10"]),
    }
    for name, (config, extra, args) in cases.items():
        text = "[[fault:stream_pingsx9]] endless" if name == "nothing but pings" else "endless"
        requests_path = write_rows(folder / "answers.jsonl", [{"model": MODEL, "max_tokens": 64, **extra,
                                                                "messages": [{"role": "user", "content": text}]}])
        for leftover in folder.glob("answers_results*"):
            leftover.unlink()
        with ServerThread(config) as fake:
            code, seconds, peak, stderr = run(["--requests_filepath", str(requests_path), "--request_url", fake.url,
                                               "--api_key", API_KEY, "--max_attempts", "2", *args])
        errors = folder / "answers_results_errors.jsonl"
        last = json.loads(errors.read_text())[1][-1] if errors.exists() else "answered"
        print(f"{name}: exit {code} in {seconds:.1f} s, peak RSS {peak:.0f} MB, traceback: {'Traceback' in stderr}; "
              f"{last[:110]}")


def never_connects(folder: Path) -> None:
    with socket.socket() as server, socket.socket() as first:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        first.connect(server.getsockname())  # the queue is full: every other connection hangs
        requests_path = write_rows(folder / "connect.jsonl", [{"model": MODEL, "max_tokens": 64, "messages": [
            {"role": "user", "content": f"q{i}"}]} for i in range(10)])
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, SCRIPT, "--requests_filepath", str(requests_path),
                                    "--request_url", f"http://127.0.0.1:{server.getsockname()[1]}/v1/messages",
                                    "--api_key", API_KEY, "--grace_period", "1"], stderr=subprocess.PIPE, text=True)
        for line in process.stderr:
            if "got no answer" in line or time.monotonic() - started > 120:
                break
        print(f"a server that never completes connections: recognised as down after "
              f"{time.monotonic() - started:.1f} s")
        process.send_signal(signal.SIGTERM)
        process.wait()


def pause(folder: Path) -> None:
    for extra in ({}, {"stream": True}):
        requests_path = write_rows(folder / "pause.jsonl", [{"model": MODEL, "max_tokens": 64, **extra, "messages": [
            {"role": "user", "content": f"q{i}"}]} for i in range(300)])
        for leftover in folder.glob("pause_results*"):
            leftover.unlink()
        with ServerThread(FakeConfig(latency=(3.0, 5.0))) as fake:
            process = subprocess.Popen([sys.executable, SCRIPT, "--requests_filepath", str(requests_path),
                                        "--request_url", fake.url, "--api_key", API_KEY, "--request_timeout", "10",
                                        "--max_requests_per_minute", "60000", "--max_tokens_per_minute", "10000000"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            while fake.stats.received < 100:
                time.sleep(0.01)
            process.send_signal(signal.SIGSTOP)
            time.sleep(25)
            in_flight = fake.stats.received - sum(fake.stats.answered.values())
            answered = sum(fake.stats.answered.values())
            process.send_signal(signal.SIGCONT)
            process.wait()
            saved = len((folder / "pause_results.jsonl").read_bytes().splitlines())
            print(f"a 25 s pause{', streamed' if extra else ''}: {answered} answered during it; exit "
                  f"{process.returncode}, {saved} of 300 saved, paid twice: {fake.stats.paid_twice} (in flight still: "
                  f"{in_flight})")


def shared(folder: Path) -> None:
    for told in ("600", "auto"):
        with ServerThread(FakeConfig(requests_per_minute=600)) as fake:
            runs, started = [], time.monotonic()
            for run in range(10):
                rows = [{"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": f"run {run} q{i}"}]}
                        for i in range(60)]
                requests_path = write_rows(folder / f"shared{run}.jsonl", rows)
                for leftover in folder.glob(f"shared{run}_results*"):
                    leftover.unlink()
                runs.append(subprocess.Popen([sys.executable, SCRIPT, "--requests_filepath", str(requests_path),
                                              "--request_url", fake.url, "--api_key", API_KEY,
                                              "--max_requests_per_minute", told, "--max_tokens_per_minute", "10000000"],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            codes = {run.wait() for run in runs}
            seconds, answered = time.monotonic() - started, sum(fake.stats.answered.values())
            print(f"ten runs sharing 600 requests/min, each told {told}: exit {codes}, {answered} answered, "
                  f"{fake.stats.rate_limited / answered:.2f} 429s an answer, {seconds:.1f} s "
                  f"({seconds / 60:.2f} of the 60 s the limit allows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("disk", "answers", "connect", "pause", "shared"))
    only = parser.parse_args().only
    with tempfile.TemporaryDirectory() as folder:
        for name, measure in (("disk", full_disk), ("answers", hostile_answers), ("connect", never_connects),
                              ("pause", pause), ("shared", shared)):
            if only in (None, name):
                measure(Path(folder))


if __name__ == "__main__":
    main()
