"""The cookbook's caching check: the first request alone, then the cache read or a warning."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest
from conftest import API_KEY, outputs, request, write_jsonl
from fake_anthropic import FakeAnthropic, FakeConfig

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


# -- caching without asking ---------------------------------------------------------------------------

LONG = "The auditors went through every ledger of the year and wrote down what they found. " * 60  # ~1,000 tokens
TOOL = {"name": "lookup", "description": "Look a record up. " * 40, "input_schema": {"type": "object"}}
THOUGHT = {"type": "thinking", "thinking": "Let me see.", "signature": "c2ln"}


def shaped(kind: str, question: str) -> dict:
    """A line of each shape the prefix decision must handle, ending with `question` as its last turn."""
    last = {"role": "user", "content": question}
    bodies = {
        "string system": {"system": LONG, "messages": [last]},
        "block system": {"system": [{"type": "text", "text": "You audit."}, {"type": "text", "text": LONG}],
                         "messages": [last]},
        "tools only": {"tools": [TOOL, {**TOOL, "name": "other"}] * 3, "messages": [last]},
        "few-shot pair": {"system": "You audit.", "messages": [{"role": "user", "content": LONG},
                                                               {"role": "assistant", "content": "Noted."}, last]},
        "image": {"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}},
            {"type": "text", "text": "Describe it."}]}, {"role": "assistant", "content": "A chart."}, last]},
        "tool result": {"tools": [TOOL], "messages": [
            {"role": "user", "content": LONG}, {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"id": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "found"}]},
            {"role": "assistant", "content": "Found it."}, last]},
        "thinking last": {"system": LONG, "messages": [{"role": "user", "content": "Think."},
                                                       {"role": "assistant", "content": [THOUGHT]}, last]},
        "own breakpoint": {"system": [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}],
                           "messages": [last]},
        "top-level cache_control": {"cache_control": {"type": "ephemeral"}, "system": LONG, "messages": [last]},
        "four breakpoints": {"system": [{"type": "text", "text": LONG[:200 * (i + 1)],
                                         "cache_control": {"type": "ephemeral"}} for i in range(4)],
                             "messages": [last]},
        "short system": {"system": "You audit.", "messages": [last]},
    }
    return {"model": "claude-sonnet-5-5", "max_tokens": 64, **bodies[kind]}


def marked_blocks(body: dict) -> list[int]:
    return [index for index, (_, block) in enumerate(app.prompt_blocks(body)) if isinstance(block, dict)
            and "cache_control" in block]


@pytest.mark.parametrize(("kind", "breakpoint_at"), [
    ("string system", 0),  # the string becomes a one-block list to carry it
    ("block system", 1),
    ("tools only", 5),  # the last tool
    ("few-shot pair", 2),  # after the assistant's answer, before the last turn
    ("image", 2),
    ("tool result", 4),  # the assistant's last answer before the last turn
    ("thinking last", 1),  # a thinking block cannot carry one: the boundary before it
    ("own breakpoint", None),  # the user's breakpoints go as written
    ("top-level cache_control", None),
    ("four breakpoints", None),
    ("short system", None),  # below the model's minimum
])
def test_a_breakpoint_goes_at_the_end_of_the_longest_shared_prefix_that_pays(kind, breakpoint_at):
    cache = app.AutoCache(requests_per_second=10, batch=False)
    first, second = shaped(kind, "Question one?"), shaped(kind, "Question two?")
    if "cache_control" in json.dumps(first):  # the reader leaves these as written: AutoCache never sees them
        assert breakpoint_at is None
        return
    assert cache.mark(first, 1) == (first, None)  # seen once: a write would pay for nothing yet
    marked, prefix = cache.mark(second, 2)
    if breakpoint_at is None:
        assert (marked, prefix) == (second, None)
        return
    assert marked_blocks(marked) == [breakpoint_at] and prefix is not None
    assert app.hash_request(marked, None) == app.hash_request(second, None)  # a rerun finds it as written
    assert second == shaped(kind, "Question two?")  # the caller's body is left as it was
    later, _ = cache.mark(shaped(kind, "Question three?"), 3)
    assert marked_blocks(later) == [breakpoint_at]


def test_a_prefix_whose_lines_come_far_apart_gets_the_one_hour_lifetime():
    cache = app.AutoCache(requests_per_second=1, batch=False)  # 1 line a second: 300 lines apart is 5 minutes
    cache.mark(shaped("string system", "q1"), 1)
    near, _ = cache.mark(shaped("string system", "q2"), 50)
    assert near["system"][0]["cache_control"] == {"type": "ephemeral"}
    far_cache = app.AutoCache(requests_per_second=1, batch=False)
    far_cache.mark(shaped("string system", "q1"), 1)
    far, _ = far_cache.mark(shaped("string system", "q2"), 400)
    assert far["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    batched = app.AutoCache(requests_per_second=100, batch=True)
    batched.mark(shaped("string system", "q1"), 1)
    assert batched.mark(shaped("string system", "q2"), 2)[0]["system"][0]["cache_control"]["ttl"] == "1h"


def family_lines() -> list[dict]:
    """A job of five families, interleaved: a long shared system string; shared tools, system blocks and a few-shot
    pair; a short shared system (below the minimum); a long system of its own on every line; the user's own
    breakpoint on a shared system."""
    few_shot = [{"role": "user", "content": "Example: the 2024 ledger."}, {"role": "assistant", "content": LONG[:900]}]
    families = {
        "shared": lambda i: {"system": LONG, "messages": [{"role": "user", "content": f"Shared question {i}?"}]},
        "few-shot": lambda i: {"tools": [TOOL], "system": [{"type": "text", "text": "You audit."},
                                                           {"type": "text", "text": LONG}],
                               "messages": [*few_shot, {"role": "user", "content": f"Few-shot question {i}?"}]},
        "short": lambda i: {"system": "You audit ledgers.", "messages": [{"role": "user", "content": f"Short {i}?"}]},
        "own": lambda i: {"system": f"Ledger number {i}. " + LONG[:3000],
                          "messages": [{"role": "user", "content": "What stands out?"}]},
        "marked": lambda i: {"system": [{"type": "text", "text": LONG[::-1], "cache_control": {"type": "ephemeral"}}],
                             "messages": [{"role": "user", "content": f"Marked question {i}?"}]},
    }
    counts = {"shared": 80, "few-shot": 80, "short": 40, "own": 20, "marked": 40}
    lines = [{"model": "claude-sonnet-5-5", "max_tokens": 32, **families[name](i), "metadata": {"family": name, "i": i}}
             for name, count in counts.items() for i in range(count)]
    return sorted(lines, key=lambda line: (line["metadata"]["i"], line["metadata"]["family"]))  # interleaved


def test_a_job_of_several_families_is_cached_where_it_pays_at_near_the_ideal_cost_and_in_a_third_of_the_time(
        tmp_path, fake_server):
    limit = 300_000  # input tokens a minute, as the fake counts them: the limit that binds
    fake = fake_server(input_tokens_per_minute=limit, burst_seconds=1.0)
    lines = family_lines()
    requests_path = write_jsonl(tmp_path / "r.jsonl", lines)
    started = time.monotonic()

    stats = asyncio.run(app.process_api_requests_from_file(
        str(requests_path), request_url=fake.url, api_key=API_KEY, max_requests_per_minute=60_000,
        max_tokens_per_minute=limit))

    took = time.monotonic() - started
    results, errors = outputs(requests_path)
    assert stats.succeeded == len(lines) and errors == [] and fake.stats.paid_twice == 0
    # The ideal: as written, each line's prompt counted whole, but each shared prefix written once and read by the
    # rest (the user's own breakpoints as written).
    counter = FakeAnthropic(FakeConfig())
    whole = {id(line): counter.prompt_of(app.without_breakpoints(line)).input_tokens for line in lines}
    first = {line["metadata"]["family"]: line for line in reversed(lines)}
    prefixes = {"shared": counter.prompt_of(app.with_breakpoint(first["shared"], 0, "5m")).cache_write,
                "few-shot": counter.prompt_of(app.with_breakpoint(first["few-shot"], 4, "5m")).cache_write,
                "marked": counter.prompt_of(first["marked"]).cache_write}
    per_family = Counter(line["metadata"]["family"] for line in lines)
    ideal = sum(whole.values()) + sum(size * (1.25 + 0.1 * (per_family[name] - 1) - per_family[name])
                                      for name, size in prefixes.items())
    usage = stats.totals
    paid = usage.input_tokens + 1.25 * usage.cache_write_tokens + 0.1 * usage.cache_read_tokens
    assert paid <= 1.15 * ideal, (paid, ideal)
    for record in results:
        family = record[2]["family"]
        if family in ("own", "short"):
            assert record[1]["usage"]["cache_creation_input_tokens"] == 0 and "cache_control" not in json.dumps(
                record[0])
        if family == "marked":
            assert record[0]["system"] == first["marked"]["system"]  # the user's breakpoint, as written
    # As written, no read is free of the limit but the user's own: the least time the file needs at that limit.
    counted_as_written = sum(whole.values()) - prefixes["marked"] * (per_family["marked"] - 1)
    least_as_written = max(0.0, counted_as_written - limit / 60) / limit * 60
    assert took <= 0.35 * least_as_written, (took, least_as_written)


def test_auto_cache_off_sends_bodies_as_written_and_a_rerun_either_way_sends_only_new_lines(tmp_path, fake_server):
    fake = fake_server()
    lines = [shaped("string system", f"Question {i}?") | {"metadata": {"i": i}} for i in range(15)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", lines[:10])

    off = asyncio.run(app.process_api_requests_from_file(
        str(requests_path), request_url=fake.url, api_key=API_KEY, auto_cache="off",
        max_requests_per_minute=60000, max_tokens_per_minute=10_000_000))
    as_written = list(fake.stats.bodies_seen)
    write_jsonl(requests_path, lines)
    default = asyncio.run(app.process_api_requests_from_file(
        str(requests_path), request_url=fake.url, api_key=API_KEY, max_requests_per_minute=60000,
        max_tokens_per_minute=10_000_000))
    again_off = asyncio.run(app.process_api_requests_from_file(
        str(requests_path), request_url=fake.url, api_key=API_KEY, auto_cache=False,
        max_requests_per_minute=60000, max_tokens_per_minute=10_000_000))

    assert (off.succeeded, default.succeeded, default.already_done, again_off.already_done) == (10, 5, 10, 15)
    assert as_written == [{key: value for key, value in line.items() if key != "metadata"} for line in lines[:10]]
    new = fake.stats.bodies_seen[10:]
    assert len(new) == 5 and new[0]["system"] == lines[0]["system"]  # a new run's first sighting goes as written...
    assert all(body["system"][0]["cache_control"] == {"type": "ephemeral"} for body in new[1:])  # ...the rest marked
    assert len(outputs(requests_path)[0]) == 15
