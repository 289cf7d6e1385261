"""Long answers streamed under the hood: rebuilt exactly as a plain response, timed by silence, and every
failure in the middle of a stream retried without saving anything partial."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter

import pytest
from conftest import API_KEY, outputs, request, run_in_process, write_jsonl

import api_request_parallel_processor as app

RICH = "[[blocks:all]]"


def plain_answer(url: str, body: dict) -> dict:
    """What the fake answers the same body without streaming."""
    sent = urllib.request.Request(url, data=json.dumps({**body, "stream": False}).encode(), headers={
        "x-api-key": API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"})
    with urllib.request.urlopen(sent, timeout=10) as response:
        return json.loads(response.read())


def test_answers_longer_than_the_timeout_are_streamed_once_and_saved_as_plain_answers(tmp_path, fake_server):
    fake = fake_server(seconds_per_token=0.1, ping_seconds=0.1, output_tokens=30)  # 3 s per answer
    rows = [request(f"{RICH if i % 2 else ''} question {i}", i, max_tokens=64_000) for i in range(20)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake, request_timeout=1.5)  # 15 times the gap between two tokens

    results, errors = outputs(requests_path)
    assert errors == [] and len(results) == 20 and stats.succeeded == 20
    assert fake.stats.received == 20 and stats.retries == 0  # each request sent once
    assert all(body.get("stream") is True for body in fake.stats.bodies_seen)
    reference = fake_server(output_tokens=30)  # the same answers, not streamed and without the wait
    for sent, message, metadata in results:
        assert sent == {key: value for key, value in rows[metadata["row"]].items() if key != "metadata"}
        expected = plain_answer(reference.url, sent)
        assert len(message["content"]) == len(expected["content"]) == (3 if metadata["row"] % 2 else 1)
        for block, expected_block in zip(message["content"], expected["content"]):
            assert block == expected_block
        assert {**message, "id": ""} == {**expected, "id": ""}
    assert stats.totals.output_tokens == 20 * 30 and stats.totals.input_tokens > 0


def test_a_line_that_asks_for_a_stream_is_streamed_and_saved_as_written(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"{RICH} go", 1, stream=True)])
    run_in_process(requests_path, fake)
    ((sent, message, _),) = outputs(requests_path)[0]
    assert sent["stream"] is True and fake.stats.bodies_seen[0]["stream"] is True
    assert [block["type"] for block in message["content"]] == ["thinking", "text", "tool_use"]
    assert message["content"][2]["input"]["details"]["quote"] == 'The sky is "blue".'


@pytest.mark.parametrize(("fault", "message"), [
    ("stream_error", "an error event mid-stream (after HTTP 200): overloaded_error: Overloaded"),
    ("stream_drop", "network error"),
    ("stream_stall", "no event for 1 s"),
])
def test_a_stream_that_fails_halfway_is_retried_and_nothing_partial_is_saved(tmp_path, fake_server, fault, message):
    fake = fake_server(slow_seconds=2.0, ping_seconds=0.1)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"{RICH} [[fault:{fault}x2]] go", 7, stream=True)])

    stats = run_in_process(requests_path, fake, request_timeout=1.0)

    results, errors = outputs(requests_path)
    assert errors == [] and len(results) == 1 and stats.retries == 2 and fake.stats.faults[fault] == 2
    assert len(results[0][1]["content"]) == 3
    (collected,) = app.asyncio.run(app.process_requests(
        [request(f"{RICH} [[always:{fault}]] go", stream=True)], request_url=fake.url, api_key=API_KEY,
        max_attempts=2, request_timeout=1.0, max_requests_per_minute=60_000))
    assert collected.response is None and len(collected.errors) == 2
    assert all(message in error for error in collected.errors), collected.errors


def test_one_in_seven_streams_failing_halfway_still_answers_every_line_exactly_once(tmp_path, fake_server):
    fake = fake_server(fault_rate=0.15, fault_kinds=("stream_error", "stream_error", "stream_drop"), seed=7)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q {i}", i, stream=True) for i in range(200)])

    stats = run_in_process(requests_path, fake, max_attempts=8)

    results, errors = outputs(requests_path)
    assert errors == [] and stats.succeeded == 200
    assert Counter(record[2]["row"] for record in results) == Counter(range(200))
    assert fake.stats.faults["stream_error"] > 10 and fake.stats.faults["stream_drop"] > 5
    assert fake.stats.paid_twice == 0


def test_plain_requests_that_time_out_use_up_their_attempts_and_are_no_outage(tmp_path, fake_server, captured_logs,
                                                                              monkeypatch):
    """Timeouts for 4 s, past the outage rule's 3 s: counted as an outage, the lines' attempts would be given
    back and the run would hold them (until OUTAGE_MAX_SECONDS, shortened here, stopped it)."""
    monkeypatch.setattr(app, "OUTAGE_MAX_SECONDS", 8.0)
    fake = fake_server(seconds_per_token=0.1, output_tokens=10)  # 1 s to answer; 10 max_tokens stay plain
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q {i}", i, max_tokens=10) for i in range(5)])

    stats = run_in_process(requests_path, fake, request_timeout=0.3, max_attempts=4)

    assert stats.failed == 5 and fake.stats.received == 20 and stats.exit_code == 1
    errors = outputs(requests_path)[1]
    assert all("no complete response within 0.3 s" in message for record in errors for message in record[1])
    assert not any("the API or the network is down" in line for line in captured_logs)


def test_which_requests_are_streamed():
    assert not app.streams({"max_tokens": 21_333}, 600) and app.streams({"max_tokens": 21_334}, 600)  # the SDK's line
    assert app.streams({"max_tokens": 1024}, 20) and not app.streams({"max_tokens": 1024}, 60)  # or the timeout's
    assert app.streams({"max_tokens": 10, "stream": True}, 600) and not app.streams({"max_tokens": 10}, 600)


def events(*items: dict) -> list[dict]:
    return list(items)


def test_every_event_and_block_type_is_accumulated_and_unknown_ones_are_ignored():
    message = app.StreamedMessage()
    start = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [], "stop_reason": None,
             "stop_sequence": None, "usage": {"input_tokens": 12, "cache_read_input_tokens": 5, "output_tokens": 1}}
    citation = {"type": "char_location", "cited_text": "x", "document_index": 0}
    for event in events(
        {"type": "message_start", "message": start}, {"type": "ping"}, {"type": "a_future_event", "x": 1},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me "}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "think."}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig=="}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Blue"}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "citations_delta", "citation": citation}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "a_future_delta", "y": 2}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "."}},
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "t", "name": "f",
                                                                       "input": {}}},
        {"type": "content_block_delta", "index": 2,
         "delta": {"type": "input_json_delta", "partial_json": '{"a": [1, '}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '2]}'}},
        {"type": "content_block_stop", "index": 2},
        {"type": "content_block_start", "index": 3, "content_block": {"type": "tool_use", "id": "u", "name": "g",
                                                                       "input": {}}},
        {"type": "content_block_delta", "index": 3, "delta": {"type": "input_json_delta", "partial_json": ""}},
        {"type": "content_block_stop", "index": 3},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 42, "input_tokens": None}},
    ):
        message.apply(event)
    assert not message.stopped
    message.apply({"type": "message_stop"})
    assert message.stopped and message.error is None
    assert message.message == {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "stop_reason": "tool_use",
        "stop_sequence": None, "usage": {"input_tokens": 12, "cache_read_input_tokens": 5, "output_tokens": 42},
        "content": [{"type": "thinking", "thinking": "Let me think.", "signature": "sig=="},
                    {"type": "text", "text": "Blue.", "citations": [citation]},
                    {"type": "tool_use", "id": "t", "name": "f", "input": {"a": [1, 2]}},
                    {"type": "tool_use", "id": "u", "name": "g", "input": {}}]}
    failed = app.StreamedMessage()
    failed.apply({"type": "message_start", "message": start})
    failed.apply({"type": "error", "error": {"type": "api_error", "message": "Internal"}})
    assert failed.error == {"type": "api_error", "message": "Internal"} and not failed.stopped
