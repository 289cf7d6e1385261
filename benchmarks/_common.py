"""Shared by the benchmarks: a fake Anthropic server in its own process, and request files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fake_anthropic import API_KEY

__all__ = ["API_KEY", "MODEL", "cpu_seconds", "fake_server_process", "small_request", "write_jsonl_rows",
           "write_requests"]


MODEL = "claude-sonnet-5-5"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def fake_server_process(*args: str) -> Iterator[str]:
    """The tests' fake server in a separate process (so it does not share our GIL); yields its URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_anthropic.py"), "--port", str(port), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        process.stdout.readline()  # "Fake Anthropic API at ..." once it listens
        yield f"http://127.0.0.1:{port}/v1/messages"
    finally:
        process.terminate()
        process.wait(10)


def small_request(index: int) -> dict:
    return {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": f"How much is 8 * {index}?"}],
            "metadata": {"row": index}}


def write_requests(path: Path, count: int) -> Path:
    with open(path, "w") as file:
        file.writelines("".join(json.dumps(small_request(i)) + "\n" for i in range(start, min(count, start + 10_000)))
                        for start in range(0, count, 10_000))
    return path


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a live process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_jsonl_rows(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    return path
