"""The cookbook's caching check: the first request alone, then the cache read or a warning."""

from __future__ import annotations

import asyncio

from conftest import API_KEY, outputs, request, write_jsonl

import api_request_parallel_processor as app

LONG_DOCUMENT = "The committee reviewed the annual report line by line and took careful notes. " * 150


def cached_request(question: str, row: int, document: str = LONG_DOCUMENT) -> dict:
    system = [{"type": "text", "text": "Answer from the document."},
              {"type": "text", "text": document, "cache_control": {"type": "ephemeral"}}]
    return request(question, row, system=system)


def test_use_caching_sends_the_first_request_alone_then_reads_the_cache(tmp_path, fake_server, captured_logs):
    fake = fake_server(latency=(0.2, 0.2))
    requests_path = write_jsonl(tmp_path / "r.jsonl", [cached_request(f"question {i}", i) for i in range(8)])

    stats = asyncio.run(app.process_api_requests_from_file(
        str(requests_path), request_url=fake.url, api_key=API_KEY, use_caching=True,
        max_requests_per_minute=60000, max_tokens_per_minute=10_000_000))

    assert stats.succeeded == 8
    first_answer = fake.stats.answered_times[0]
    assert all(t >= first_answer for t in fake.stats.received_times[1:])  # the rest waited for it
    assert stats.cache_write_tokens > 0 and stats.cache_read_tokens == 7 * stats.cache_write_tokens
    assert any("Prompt caching works" in line for line in captured_logs)


def test_use_caching_warns_about_a_too_short_prefix_and_gives_time_to_stop(tmp_path, fake_server, captured_logs,
                                                                            monkeypatch):
    monkeypatch.setattr(app, "CACHING_WARNING_PAUSE_SECONDS", 0.6)
    fake = fake_server()
    short = "A short document."
    requests_path = write_jsonl(tmp_path / "r.jsonl", [cached_request(f"q{i}", i, short) for i in range(4)])

    stats = asyncio.run(app.process_api_requests_from_file(
        str(requests_path), request_url=fake.url, api_key=API_KEY, use_caching=True,
        max_requests_per_minute=60000, max_tokens_per_minute=10_000_000))

    assert stats.succeeded == 4
    (warning,) = [line for line in captured_logs if "no cache write or read" in line]
    assert warning.startswith("WARNING") and "minimum is 1,024 tokens" in warning and "Ctrl+C" in warning
    assert fake.stats.received_times[1] - fake.stats.answered_times[0] >= 0.55


def test_the_caching_probe_is_retried_like_any_request(tmp_path, fake_server):
    fake = fake_server()
    rows = [cached_request("[[fault:529x2]] first", 0)] + [cached_request(f"q{i}", i) for i in range(1, 4)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)
    stats = asyncio.run(app.process_api_requests_from_file(
        str(requests_path), request_url=fake.url, api_key=API_KEY, use_caching=True, max_attempts=4,
        max_requests_per_minute=60000, max_tokens_per_minute=10_000_000))
    assert stats.succeeded == 4 and stats.retries == 2
    assert len(outputs(requests_path)[0]) == 4
