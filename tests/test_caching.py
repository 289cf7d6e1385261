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
    assert stats.totals.cache_write_tokens > 0
    assert stats.totals.cache_read_tokens == 7 * stats.totals.cache_write_tokens
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
    assert warning.startswith("WARNING") and "Ctrl+C" in warning
    assert "the minimum for claude-sonnet-5-5 is 1,024 tokens" in warning
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


def cache_prefix(body: dict) -> tuple[int, float] | None:
    return app.TokenEstimator(len).estimate(body).prefix


def test_cache_prefix_identity_follows_the_api_order_model_and_ttl():
    cached = {"cache_control": {"type": "ephemeral"}}
    tool = {"name": "t", "input_schema": {}}
    base = {"model": "m1", "max_tokens": 5, "tools": [{**tool, **cached}],
            "messages": [{"role": "user", "content": "q1"}]}
    other_question = {**base, "messages": [{"role": "user", "content": "q2"}]}
    assert cache_prefix(base) == cache_prefix(other_question)  # tools breakpoint: questions do not matter
    assert cache_prefix({**base, "model": "m2"}) != cache_prefix(base)
    assert cache_prefix({"model": "m1", "messages": [{"role": "user", "content": "q"}]}) is None

    def with_document(document: str, question: str, ttl: str | None = None) -> dict:
        control = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
        return {"model": "m1", "max_tokens": 5, "system": "Be brief.", "messages": [{"role": "user", "content": [
            {"type": "text", "text": document, "cache_control": control}, {"type": "text", "text": question}]}]}

    assert cache_prefix(with_document("doc A", "x")) == cache_prefix(with_document("doc A", "y"))
    assert cache_prefix(with_document("doc A", "x")) != cache_prefix(with_document("doc B", "x"))
    assert cache_prefix(with_document("doc A", "x"))[1] == 300
    assert cache_prefix(with_document("doc A", "x", "1h"))[1] == 3600


def test_recently_seen_prefixes_keep_their_keys_and_estimates_however_many_documents_interleave():
    """One estimator recognises recent prefixes by comparison and estimates the others afresh: both
    ways must give what a new estimator gives, and never give two documents one key."""
    estimator = app.TokenEstimator(len)
    documents = [f"Document {d}. " + LONG_DOCUMENT[: 1000 * (d + 1)] for d in range(app.RECENT_PREFIXES * 2)]
    order = [d % 3 for d in range(12)] + list(range(len(documents))) * 2  # a few hot ones, then a wide sweep
    keys: dict[int, set] = {}
    for step, d in enumerate(order):
        body = cached_request(f"question {step}", step, documents[d])
        if step % 3 == 0:  # the same prefix written with its keys in another order is the same prefix
            body["system"][1] = dict(reversed(list(body["system"][1].items())))
        estimate = estimator.estimate(body)
        assert estimate == app.TokenEstimator(len).estimate(body)
        keys.setdefault(d, set()).add(estimate.prefix)
    assert all(len(found) == 1 for found in keys.values())
    assert len({found.pop() for found in keys.values()}) == len(documents)


def interleaved_requests(documents: list[str], per_document: int) -> list[dict]:
    return [cached_request(f"question {i} about document {d}", d * per_document + i, document)
            for i in range(per_document) for d, document in enumerate(documents)]


def test_each_cached_prefix_is_written_once_while_other_prefixes_keep_flowing(tmp_path, fake_server):
    fake = fake_server(latency=(0.3, 0.6))
    documents = [f"Document {d}. " + LONG_DOCUMENT for d in range(3)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", interleaved_requests(documents, 8))

    stats = asyncio.run(app.process_api_requests_from_file(
        str(requests_path), request_url=fake.url, api_key=API_KEY, max_requests_per_minute=60000,
        max_tokens_per_minute=10_000_000))

    assert stats.succeeded == 24 and stats.prefixes_cached == 3
    assert fake.stats.cache_read_tokens == 7 * fake.stats.cache_write_tokens  # 3 writes, 21 reads
    # No head-of-line wait: once the run's first request is answered, the other prefixes' first requests go at once.
    assert sum(1 for t in fake.stats.received_times if t < fake.stats.answered_times[1]) >= 3


def test_a_prefix_is_warmed_once_then_fans_out_and_is_warmed_again_after_its_ttl():
    clock = [1000.0]
    warmer = app.PrefixWarmer(clock=lambda: clock[0])
    body = cached_request("q", 0)
    body.pop("metadata")
    prefix = cache_prefix(body)

    def job(n: int) -> app.Job:
        return app.Job(n, body, b"{}", None, None, app.TokenEstimate(2000, 1900, prefix))

    first, second, third, fourth = job(1), job(2), job(3), job(4)
    assert warmer.admit(first) is True and warmer.is_warming(first) and not warmer.is_warm(first)  # cold: it warms
    assert warmer.admit(second) is False and warmer.admit(third) is False and warmer.parked == 2  # parked behind it
    assert warmer.settled(first, cached=False) == [second] and warmer.parked == 1  # failed: the next one warms it
    assert warmer.admit(second) is True  # the one warming it now goes
    assert warmer.settled(second, cached=True) == [third] and warmer.parked == 0  # written: the rest fan out
    assert warmer.admit(third) is True and warmer.is_warm(third) and not warmer.is_warming(third)  # a reader
    clock[0] += 301  # past the 5-minute TTL
    assert warmer.admit(fourth) is True and not warmer.is_warm(fourth)  # cold again: it warms it anew
    assert warmer.admit(job(5)) is False and [parked.line_number for parked in warmer.release_all()] == [5]


def test_automatic_caching_puts_the_breakpoint_on_the_last_block():
    estimator = app.TokenEstimator(len)
    conversation = [{"role": "user", "content": "A long question"}, {"role": "assistant", "content": "An answer"},
                    {"role": "user", "content": [{"type": "text", "text": "Go on"}]}]
    body = {"model": "m", "max_tokens": 5, "system": "Be brief.", "messages": conversation,
            "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    estimate = estimator.estimate(body)
    assert estimate.prefix is not None and estimate.prefix[1] == 3600
    assert estimate.cached_prefix == estimate.total - 3 * app.TOKENS_PER_MESSAGE  # everything is in the prefix
    assert estimator.estimate(dict(body)).prefix == estimate.prefix
    longer = {**body, "messages": [*conversation, {"role": "assistant", "content": "More"}]}
    assert estimator.estimate(longer).prefix != estimate.prefix
    marked_by_hand = {**body, "cache_control": None, "messages": [*conversation[:2], {"role": "user", "content": [
        {"type": "text", "text": "Go on", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]}
    assert estimator.estimate(marked_by_hand).cached_prefix == estimate.cached_prefix


def test_automatic_caching_is_warmed_once_like_a_marked_block(tmp_path, fake_server, captured_logs):
    fake = fake_server(latency=(0.2, 0.2))
    body = request(LONG_DOCUMENT, cache_control={"type": "ephemeral"})
    requests_path = write_jsonl(tmp_path / "r.jsonl", [{**body, "metadata": {"row": i}} for i in range(6)])

    stats = asyncio.run(app.process_api_requests_from_file(
        str(requests_path), request_url=fake.url, api_key=API_KEY, use_caching=True,
        max_requests_per_minute=60000, max_tokens_per_minute=10_000_000))

    assert stats.succeeded == 6 and stats.prefixes_cached == 1
    assert fake.stats.cache_write_tokens > 0 and fake.stats.cache_read_tokens == 5 * fake.stats.cache_write_tokens
    assert all(t >= fake.stats.answered_times[0] for t in fake.stats.received_times[1:])
    assert not any("marks no cache_control" in line for line in captured_logs)
