"""Shared helpers: a fake Anthropic server per test, and ways to run the processor against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anthropic.types import Message

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "api_request_parallel_processor.py"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_anthropic import API_KEY, FakeAnthropic, FakeConfig, ServerThread

MODEL = "claude-sonnet-5-5"


@pytest.fixture(autouse=True)
def no_ramp_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs skip the first seconds' ramp up, which would blur every other pacing test's early
    seconds; test_rate_limiting tests the ramp itself, and runs of the command line keep it."""
    import api_request_parallel_processor as app

    monkeypatch.setattr(app, "RAMP_UP_SECONDS", 1e-3)


@pytest.fixture
def fake_server() -> Iterator[Any]:
    """Call it with FakeConfig fields to start a fake on loopback; every one started is stopped."""
    threads: list[ServerThread] = []

    def start(**config: Any) -> FakeAnthropic:
        thread = ServerThread(FakeConfig(**config))
        threads.append(thread)
        return thread.__enter__()

    yield start
    for thread in threads:
        thread.__exit__(None, None, None)


def request(text: str, row: int | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": text}]}
    if row is not None:
        body["metadata"] = {"row": row}
    body.update(extra)
    return body


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with open(path, "w", encoding="utf-8") as file:
        file.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    return path


def read_jsonl(path: Path) -> list[Any]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def outputs(requests_path: Path) -> tuple[list[Any], list[Any]]:
    """The records of the results and errors files that a run on `requests_path` wrote by default; every answer
    must validate as the official SDK's Message (the SDK is the oracle of what the API returns)."""
    stem = str(requests_path)[: -len(".jsonl")]
    results = read_jsonl(Path(stem + "_results.jsonl"))
    for record in results:
        Message.model_validate(record[1])
    return results, read_jsonl(Path(stem + "_results_errors.jsonl"))


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the script as a user would, in a subprocess with a clean environment."""
    full_env = {key: value for key, value in os.environ.items() if key != "ANTHROPIC_API_KEY"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def cli_args(fake: FakeAnthropic, requests_path: Path, *extra: str) -> list[str]:
    return ["--requests_filepath", str(requests_path), "--request_url", fake.url, "--api_key", API_KEY,
            "--max_requests_per_minute", "60000", "--max_tokens_per_minute", "10000000", *extra]


def run_in_process(requests_path: Path, fake: FakeAnthropic, **settings: Any) -> Any:
    """Await the library entry point (inside asyncio.run's running loop) with fast default limits."""
    import asyncio

    import api_request_parallel_processor as app

    options: dict[str, Any] = {"request_url": fake.url, "api_key": API_KEY, "max_requests_per_minute": 60000,
                               "max_tokens_per_minute": 10_000_000}
    options.update(settings)
    return asyncio.run(app.process_api_requests_from_file(str(requests_path), **options))


@pytest.fixture
def captured_logs() -> Iterator[list[str]]:
    """Every loguru message emitted during the test, formatted as 'LEVEL message'."""
    from loguru import logger

    messages: list[str] = []
    handler = logger.add(lambda m: messages.append(f"{m.record['level'].name} {m.record['message']}"), level=0)
    yield messages
    logger.remove(handler)
