"""The official SDK (anthropic, pinned in requirements-dev.txt) as the oracle: what it rebuilds from a stream, the
tool rebuilds the same; what it reads from JSON cut off, the tool reads the same."""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx2
import pytest
from aiohttp import web
from anthropic import Anthropic
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message
from conftest import outputs, request, run_in_process, write_jsonl
from fake_anthropic import FakeAnthropic, sse, stream_events
from jiter import from_json

import api_request_parallel_processor as app

TOOL_INPUT = {"query": "weather in Paris", "units": "celsius", "days": [1, 2, 3.5, -4e-3, 12345678901234567890],
              "flags": {"a": True, "b": False, "c": None}, "nested": [[], {}, [{"x": "y\"z\\n\u00e9 \U0001f600"}]],
              "empty": "", "big": 1.0e10}


@pytest.mark.parametrize("text", [json.dumps(TOOL_INPUT), json.dumps(TOOL_INPUT, indent=2),
                                  json.dumps(TOOL_INPUT, ensure_ascii=False, separators=(",", ":"))],
                         ids=["compact", "indented", "unicode"])
def test_json_cut_anywhere_reads_as_the_sdk_reads_it(text):
    for cut in range(1, len(text) + 1):
        prefix = text[:cut]
        assert app.PartialJson.parse(prefix) == from_json(prefix.encode(), partial_mode=True), repr(prefix)


def without_none(value: Any) -> Any:
    """The SDK's models hold every field, None where absent; the API's JSON leaves some out."""
    if isinstance(value, dict):
        return {key: without_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_none(item) for item in value]
    return value


def rebuilt_by_both(events: list[dict[str, Any]]) -> tuple[Any, Any]:
    snapshot, buffers = None, {}
    for event in copy.deepcopy(events):
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=buffers)
    ours = app.StreamedMessage()
    for event in copy.deepcopy(events):
        ours.apply(event)
    return without_none(snapshot.to_dict(mode="json")), without_none(ours.message)


def rich_events() -> list[dict[str, Any]]:
    fake = FakeAnthropic()
    body = request("[[blocks:all]] what colour is the sky?")
    return [data for _, data in stream_events(fake.answer(body, fake.prompt_of(body), 20))]


def cut_tool_events() -> list[dict[str, Any]]:
    """A tool's input stopped by max_tokens in the middle of a string, as the API streams it."""
    cut = json.dumps(TOOL_INPUT)[:-40]
    message = {"id": "msg_cut", "type": "message", "role": "assistant", "model": "claude-sonnet-5-5", "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 30, "output_tokens": 1}}
    block = {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}
    return [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me look."}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": block},
        *({"type": "content_block_delta", "index": 1,
           "delta": {"type": "input_json_delta", "partial_json": cut[i:i + 7]}} for i in range(0, len(cut), 7)),
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
         "usage": {"output_tokens": 64}},
        {"type": "message_stop"},
    ]


def refusal_events() -> list[dict[str, Any]]:
    events = rich_events()[:1] + [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "I can't help."}},
        {"type": "content_block_stop", "index": 0},
        {"type": "some_future_event", "index": 0, "payload": {"x": 1}},  # unknown events are ignored
        {"type": "message_delta", "delta": {"stop_reason": "refusal", "stop_sequence": None,
                                            "stop_details": {"type": "refusal", "category": "cyber",
                                                             "explanation": "no"}},
         "usage": {"output_tokens": 5, "cache_read_input_tokens": 100,
                   "server_tool_use": {"web_search_requests": 1, "web_fetch_requests": 0}}},
        {"type": "message_stop"},
    ]
    return events


CITATIONS = [
    {"type": "page_location", "cited_text": "p", "document_index": 0, "document_title": "Report",
     "start_page_number": 1, "end_page_number": 2},
    {"type": "content_block_location", "cited_text": "b", "document_index": 1, "document_title": None,
     "start_block_index": 0, "end_block_index": 1},
    {"type": "search_result_location", "cited_text": "s", "search_result_index": 0, "source": "https://example.com",
     "title": "Example", "start_block_index": 0, "end_block_index": 1},
    {"type": "web_search_result_location", "cited_text": "w", "encrypted_index": "Eo8B", "title": "Example",
     "url": "https://example.com"},
]


def server_tool_events() -> list[dict[str, Any]]:
    """Redacted thinking, a web search (its input in pieces, its results), text citing it with every kind of
    citation, and a container in message_delta."""
    start = rich_events()[0]
    search_input = json.dumps({"query": "sky colour", "max_results": 3})
    result = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01", "content": [
        {"type": "web_search_result", "url": "https://example.com", "title": "Example", "encrypted_content": "Eq",
         "page_age": None}]}
    blocks: list[dict[str, Any]] = [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "redacted_thinking", "data": "EmwKAhgB"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "server_tool_use", "id": "srvtoolu_01",
                                                                     "name": "web_search", "input": {}}},
        *({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
                                                                 "partial_json": search_input[i:i + 5]}}
          for i in range(0, len(search_input), 5)),
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2, "content_block": result},
        {"type": "content_block_stop", "index": 2},
        {"type": "content_block_start", "index": 3, "content_block": {"type": "text", "text": "", "citations": []}},
        {"type": "content_block_delta", "index": 3, "delta": {"type": "text_delta", "text": "Blue."}},
        *({"type": "content_block_delta", "index": 3, "delta": {"type": "citations_delta", "citation": citation}}
          for citation in CITATIONS),
        {"type": "content_block_stop", "index": 3},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None,
                                            "container": {"id": "container_01", "expires_at": "2026-11-29T03:00:00Z"}},
         "usage": {"output_tokens": 30, "server_tool_use": {"web_search_requests": 1, "web_fetch_requests": 0}}},
        {"type": "message_stop"},
    ]
    return [start, *blocks]


@pytest.mark.parametrize("events", [rich_events(), cut_tool_events(), refusal_events(), server_tool_events()],
                         ids=["thinking, citations, tool input in pieces", "tool input cut by max_tokens",
                              "refusal, usage in message_delta, unknown event",
                              "redacted thinking, server tool use and results, every citation kind, container"])
def test_streams_are_rebuilt_as_the_sdk_rebuilds_them(events):
    sdk, ours = rebuilt_by_both(events)

    assert ours == sdk
    Message.model_validate(ours)


def test_a_streamed_answer_with_a_cut_tool_input_is_saved_after_one_attempt(tmp_path, fake_server):
    async def cut_stream(request, body):
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for event in cut_tool_events():
            await response.write(sse(event["type"], event))
        await response.write_eof()
        return response

    fake = fake_server(hostile=cut_stream)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i, stream=True) for i in range(3)])

    stats = run_in_process(requests_path, fake)

    results, errors = outputs(requests_path)
    assert stats.exit_code == 0 and errors == [] and len(results) == 3 and fake.stats.received == 3
    sdk, _ = rebuilt_by_both(cut_tool_events())
    assert all(without_none(record[1]) == sdk for record in results)


RETRY_HEADERS = [
    {}, {"retry-after": "3"}, {"retry-after": "0"}, {"retry-after": "-1"}, {"retry-after": "1.5"},
    {"retry-after": "600"}, {"retry-after": "soon"}, {"retry-after-ms": "1500", "retry-after": "9"},
    {"retry-after-ms": "abc", "retry-after": "9"}, {"retry-after-ms": "0", "retry-after": "9"},
    {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"},
]


@pytest.mark.parametrize("headers", RETRY_HEADERS, ids=[json.dumps(headers) for headers in RETRY_HEADERS])
def test_retry_after_is_read_as_the_sdk_reads_it(headers):
    sdk = Anthropic(api_key="unused")._parse_retry_after_header(httpx2.Headers(headers))
    expected = min(sdk, 4_294_967.0) if sdk is not None and sdk > 0 else None  # the SDK waits only when positive

    assert app.parse_retry_after(headers) == expected


STATUSES = [400, 401, 402, 403, 404, 405, 408, 409, 413, 422, 429, 500, 502, 503, 504, 529, 599]


@pytest.mark.parametrize("should_retry", [None, "true", "false"])
@pytest.mark.parametrize("status", STATUSES)
def test_what_is_retried_is_what_the_sdk_retries(status, should_retry):
    headers = {"x-should-retry": should_retry} if should_retry else {}
    sdk = Anthropic(api_key="unused")._should_retry(httpx2.Response(status, headers=headers))

    attempt = app.interpret_response(status, headers, b'{"type": "error", "error": {"type": "x", "message": "m"}}')

    assert attempt.retryable == sdk and attempt.authentication_failed == (status == 401 and not sdk)


@pytest.mark.parametrize("max_tokens", [0, 1, 1024, 21_333, 21_334, 32_000, 64_000, 128_000])
def test_requests_the_sdk_would_stream_are_streamed(max_tokens):
    """The SDK's rule for current models (its per-model caps name only retired Opus 4 and 4.1 ids)."""
    try:
        Anthropic(api_key="unused")._calculate_nonstreaming_timeout(max_tokens, None)
        sdk_streams = False
    except ValueError:
        sdk_streams = True

    assert app.streams({"max_tokens": max_tokens}, timeout=600.0) == sdk_streams
