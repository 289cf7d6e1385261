"""Retries, failures, bad lines and pacing, through real HTTP to the fake server."""

from __future__ import annotations

import asyncio
import codecs
import json
from collections import Counter

import pytest
from conftest import MODEL, outputs, request, run_in_process, write_jsonl

import api_request_parallel_processor as app

BLIND_429_SLOWING = ("A 429 that shows no exhausted limit (no rate-limit headers, or capacity left: an acceleration "
                     "limit): slowing to")


@pytest.mark.parametrize("fault", ["529", "500", "502", "drop", "truncated", "slow", "429", "408", "409"])
def test_each_retryable_fault_is_retried_until_it_succeeds(tmp_path, fake_server, fault):
    fake = fake_server(slow_seconds=2.0)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"[[fault:{fault}x2]] please", 7, max_tokens=16)])

    stats = run_in_process(requests_path, fake, request_timeout=1.0)  # 16 max_tokens: a plain request

    results, errors = outputs(requests_path)
    assert errors == []
    assert len(results) == 1 and results[0][1]["type"] == "message" and results[0][2] == {"row": 7}
    assert fake.stats.faults[fault] == 2 and stats.retries == 2
    assert stats.succeeded == 1 and stats.exit_code == 0


@pytest.mark.parametrize(("fault", "status"), [
    ("400", "HTTP 400 invalid_request_error"), ("403", "HTTP 403 permission_error"),
    ("404", "HTTP 404 not_found_error"), ("413", "HTTP 413 request_too_large"),
])
def test_non_retryable_errors_fail_at_once_with_the_reason(tmp_path, fake_server, fault, status):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"[[always:{fault}]]", 3), request("fine", 4)])

    stats = run_in_process(requests_path, fake, max_attempts=5)

    results, errors = outputs(requests_path)
    assert [record[2] for record in results] == [{"row": 4}]
    (error,) = errors
    sent, messages, metadata, failure = error
    assert metadata == {"row": 3} and sent == request(f"[[always:{fault}]]")
    assert failure == {"line": 1, "permanent": True}  # the request's own fault: a rerun does not send it again
    assert len(messages) == 1  # no attempts were spent on a request that cannot succeed
    assert messages[0].startswith(f"line 1, attempt 1: {status}") and "request-id req_fake" in messages[0]
    assert stats.failed == 1 and stats.exit_code == 1


def test_retryable_failure_gives_up_after_max_attempts_with_one_message_per_attempt(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("[[always:502]]", 1)])
    stats = run_in_process(requests_path, fake, max_attempts=3)
    (error,) = outputs(requests_path)[1]
    assert [message.split(":")[0] for message in error[1]] == ["line 1, attempt 1", "line 1, attempt 2",
                                                               "line 1, attempt 3"]
    assert "non-JSON body" in error[1][0] and "502 Bad Gateway" in error[1][0]
    assert error[3] == {"line": 1, "permanent": False}  # the server's fault: the next run sends it again
    assert fake.stats.received == 3 and stats.failed == 1


def test_bad_lines_are_reported_by_line_number_and_do_not_stop_the_others(tmp_path, fake_server):
    fake = fake_server()
    lines = [
        json.dumps(request("good one", 1)),                                   # 1
        "{this is not json",                                                   # 2
        "[1, 2, 3]",                                                           # 3
        "",                                                                    # 4 (blank: skipped)
        json.dumps({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),          # 5
        json.dumps(request("x", max_tokens=-1)),                               # 6
        json.dumps(request("x", max_tokens="10")),                             # 7
        json.dumps(request("x", messages=[])),                                 # 8
        json.dumps(request("x", messages=[{"role": "tool", "content": "x"}])),  # 9
        json.dumps({**request("x"), "metadata": "not an object"}),             # 10
        json.dumps(request("x", stream="yes")),                                # 11
        json.dumps(request("good two", 2)),                                    # 12
    ]
    requests_path = tmp_path / "r.jsonl"
    requests_path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"model": "\xff\xfe"}\n')  # 13: not UTF-8

    stats = run_in_process(requests_path, fake)

    results, errors = outputs(requests_path)
    assert sorted(record[2]["row"] for record in results) == [1, 2]
    problems = {int(record[1][0].split(":")[0].removeprefix("line ")): record[1][0] for record in errors}
    assert sorted(problems) == [2, 3, 5, 6, 7, 8, 9, 10, 11, 13]
    assert "not valid JSON" in problems[2] and "expected a JSON object" in problems[3]
    assert "'model'" in problems[5] and "'max_tokens'" in problems[6] and "'max_tokens'" in problems[7]
    assert "'messages'" in problems[8] and "role" in problems[9] and "metadata" in problems[10]
    assert "stream" in problems[11] and "UTF-8" in problems[13]
    assert errors[0][0] == "{this is not json"  # the raw line, for a line that could not be parsed
    assert stats.bad_lines == 10 and stats.exit_code == 1
    assert fake.stats.received == 2


def test_a_message_batches_file_runs_as_it_is_with_a_byte_order_mark_and_crlf_line_ends(tmp_path, fake_server):
    fake = fake_server()
    lines = [json.dumps({"custom_id": f"row-{i}", "params": request(f"question {i}")}) for i in range(3)]
    requests_path = tmp_path / "r.jsonl"
    requests_path.write_bytes(codecs.BOM_UTF8 + "\r\n".join(lines).encode() + b"\r\n")

    stats = run_in_process(requests_path, fake)

    results, errors = outputs(requests_path)
    assert stats.exit_code == 0 and errors == []
    assert sorted(record[2]["custom_id"] for record in results) == ["row-0", "row-1", "row-2"]  # the custom_id kept
    assert all(record[0] == request(record[1]["content"][0]["text"].removeprefix("Echo: ")) for record in results)
    assert all(set(body) == {"model", "max_tokens", "messages"} for body in fake.stats.bodies_seen)


OPENAI_CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text"}}


@pytest.mark.parametrize(("content", "expected"), [
    (json.dumps([request("a"), request("b")]), "looks like a JSON array"),
    ("[\n" + json.dumps(request("a")) + ",", "looks like a JSON array"),
    ("{\n" + json.dumps(request("a"))[1:], "a JSON object written over several lines"),
    ("id,prompt\n1,hello\n", "looks like CSV"),
    (json.dumps(OPENAI_CHAT), "an OpenAI chat request (model 'gpt-4o'): this tool reads JSON Lines"),
    (json.dumps({"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": OPENAI_CHAT}),
     "a line of an OpenAI batch file"),
])
def test_a_file_in_a_neighbouring_format_gets_one_message_and_nothing_is_sent(tmp_path, fake_server, capsys, content,
                                                                             expected):
    fake = fake_server()
    requests_path = tmp_path / "r.jsonl"
    requests_path.write_text(content + "\n" + json.dumps(request("fine")) + "\n")

    exit_code = app.main(["--requests_filepath", str(requests_path), "--request_url", fake.url, "--api_key", "k"])

    error = capsys.readouterr().err
    assert exit_code == 2 and error.count("\n") == 1 and expected in error and "its first line" in error
    assert fake.stats.received == 0 and not (tmp_path / "r_results.jsonl").exists()


def test_a_list_of_openai_requests_is_refused_with_what_to_change(fake_server):
    with pytest.raises(app.ConfigError, match="add 'max_tokens'.*\\(response_format\\)"):
        asyncio.run(app.process_requests([OPENAI_CHAT], request_url=fake_server().url, api_key="k"))


def test_request_shapes_pass_through_unchanged(tmp_path, fake_server):
    fake = fake_server()
    tool = {"name": "calc", "description": "adds", "input_schema": {"type": "object", "properties": {}}}
    shapes = [
        request("string content", system="You are terse."),
        request("blocks", system=[{"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}]),
        {**request("x"), "tools": [tool], "messages": [
            {"role": "user", "content": "use the tool"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "calc", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": [{"type": "text", "text": "2"}]}]}]},
        request([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
                 {"type": "text", "text": "what is this?"}]),
        request([{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "A doc."}},
                 {"type": "brand_new_block", "payload": {"text": "from the future"}}]),
        request("special tokens <|endoftext|> and <|fim_prefix|> are just text"),
    ]
    requests_path = write_jsonl(tmp_path / "r.jsonl", [{**shape, "metadata": {"row": i}} for i, shape in
                                                       enumerate(shapes)])
    stats = run_in_process(requests_path, fake)
    results, errors = outputs(requests_path)
    assert errors == [] and stats.succeeded == len(shapes)
    for sent, _, metadata in results:
        assert sent == shapes[metadata["row"]]  # exactly as given, minus our metadata


def test_a_429_pauses_every_sender_for_its_retry_after(tmp_path, fake_server):
    fake = fake_server()
    rows = [request("[[fault:429x1]] first", 0)] + [request(f"q{i}", i) for i in range(1, 15)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake, max_requests_per_minute=1200)  # 20/s, so most come after the 429

    assert stats.succeeded == 15 and stats.rate_limited == 1
    (refused,) = fake.stats.rate_limited_times
    during_pause = [t for t in fake.stats.received_times if refused + 0.02 < t < refused + 0.28]  # retry-after-ms: 300
    assert during_pause == []
    assert any(refused + 0.28 <= t < refused + 0.5 for t in fake.stats.received_times)  # and then it resumes
    assert len(fake.stats.received_times) == 16


@pytest.mark.parametrize("max_attempts", [8, 1])
def test_400_requests_under_20_percent_faults_end_exactly_once(tmp_path, fake_server, max_attempts, monkeypatch):
    # A limit far above the run's rate, so that the 429s among the faults carry rate-limit headers as the
    # API's do (header-less ones slow the whole run down: another test covers that).
    monkeypatch.setattr(app, "backoff_seconds", lambda attempt: 0.05 * attempt)  # the outcome, not the waits
    fake = fake_server(fault_rate=0.2, slow_seconds=1.5, seed=max_attempts, requests_per_minute=100_000)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i, max_tokens=16) for i in range(400)])

    stats = run_in_process(requests_path, fake, max_attempts=max_attempts, request_timeout=1.0,
                           max_requests_per_minute=12_000)

    results, errors = outputs(requests_path)
    rows = Counter([record[2]["row"] for record in results] + [record[2]["row"] for record in errors])
    assert sorted(rows) == list(range(400)) and set(rows.values()) == {1}
    assert set(fake.stats.faults) == {"529", "500", "502", "drop", "truncated", "slow", "429"}
    if max_attempts == 8:
        assert errors == [] and stats.succeeded == 400
    else:
        failing = sum(count for kind, count in fake.stats.faults.items() if kind != "429")  # a 429 costs no attempt
        assert len(errors) == stats.failed == failing > 40


def test_an_outage_is_waited_out_without_failing_lines_or_hammering_the_api(tmp_path, fake_server, captured_logs,
                                                                           monkeypatch):
    monkeypatch.setattr(app, "OUTAGE_MIN_SECONDS", 0.3)  # 3 s in a real run
    fake = fake_server(outage_seconds=2.5)  # every connection dropped for 2.5 s from the first request
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(30)])

    stats = run_in_process(requests_path, fake, max_attempts=3, max_requests_per_minute=1200)

    results, errors = outputs(requests_path)
    assert stats.succeeded == 30 and errors == [] and sorted(r[2]["row"] for r in results) == list(range(30))
    during_outage = [t for t in fake.stats.received_times if t < fake.stats.received_times[0] + 2.5]
    assert len(during_outage) <= 15  # held once noticed: unheld, 20 a second for 2.5 s would be 50 and more
    assert any("the API or the network is down" in line for line in captured_logs)
    assert any("The API answers again after" in line for line in captured_logs)


def test_an_outage_longer_than_the_limit_stops_the_run_for_a_rerun(tmp_path, fake_server, monkeypatch):
    monkeypatch.setattr(app, "OUTAGE_MIN_SECONDS", 0.3)  # 3 s in a real run
    monkeypatch.setattr(app, "OUTAGE_MAX_SECONDS", 1.0)  # 15 minutes
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(20)])

    stats = run_in_process(requests_path, fake_server(outage_seconds=600), max_requests_per_minute=1200)

    assert stats.exit_code == 3 and stats.failed == 0 and outputs(requests_path) == ([], [])
    stats = run_in_process(requests_path, fake_server(), max_requests_per_minute=1200)  # the API is back
    results, errors = outputs(requests_path)
    assert stats.exit_code == 0 and errors == [] and sorted(r[2]["row"] for r in results) == list(range(20))


def test_paced_evenly_at_the_configured_rate_without_429s(tmp_path, fake_server):
    fake = fake_server(requests_per_minute=1200, burst_seconds=5)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(100)])

    stats = run_in_process(requests_path, fake, max_requests_per_minute=1200)

    assert stats.succeeded == 100 and fake.stats.rate_limited == 0
    times = fake.stats.accepted_times
    steady = [t for t in times if t >= times[0] + 1.0]
    rate_per_minute = (len(steady) - 1) / (steady[-1] - steady[0]) * 60
    assert rate_per_minute >= 0.9 * 1200
    assert rate_per_minute <= 1.02 * 1200
    busiest_second = max(sum(1 for t in times if start <= t < start + 1) for start in times)
    assert busiest_second <= 22  # even pacing: about 20 a second, never a minute's budget at once


def test_usage_corrects_the_input_estimate_so_the_token_limit_holds(tmp_path, fake_server):
    # The fake counts 1.5x what cl100k_base does; without correction the client would send 1.5x too much.
    fake = fake_server(input_tokens_per_minute=120_000, burst_seconds=2, token_ratio=1.5)
    text = "Explain the history of the printing press in several detailed paragraphs please. " * 12
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"{i} {text}", i) for i in range(40)])

    stats = run_in_process(requests_path, fake, max_tokens_per_minute=120_000)

    assert stats.succeeded == 40
    assert fake.stats.rate_limited <= 1
    times = fake.stats.accepted_times
    counted = stats.totals.input_tokens / len(times)
    achieved = (len(times) - 1) * counted / (times[-1] - times[0]) * 60
    assert 0.8 * 120_000 <= achieved <= 1.05 * 120_000


def test_a_request_larger_than_the_bucket_still_goes_and_does_not_stall_the_run(tmp_path, fake_server):
    fake = fake_server(input_tokens_per_minute=120_000, burst_seconds=5, token_ratio=1.0)
    huge = request("lorem ipsum dolor sit amet " * 1500, 0)  # ~7,500 tokens: more than a bucket holds
    rows = [huge] + [request(f"small {i}", i) for i in range(1, 11)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake, max_tokens_per_minute=120_000)

    assert stats.succeeded == 11 and fake.stats.rate_limited == 0
    assert stats.elapsed < 10


def test_flags_above_the_reported_limit_are_clamped_to_it(tmp_path, fake_server, captured_logs):
    fake = fake_server(requests_per_minute=1200, burst_seconds=5)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(70)])

    stats = run_in_process(requests_path, fake, max_requests_per_minute=2400)

    assert stats.succeeded == 70 and fake.stats.rate_limited == 0
    assert "1,200 requests/min" in stats.limits_in_force
    times = fake.stats.accepted_times
    assert (len(times) - 1) / (times[-1] - times[0]) * 60 <= 1200 * 1.05
    assert sum("reports a limit of 1,200 requests/min" in line for line in captured_logs) == 1


def test_auto_runs_at_the_limits_the_api_reports(tmp_path, fake_server):
    fake = fake_server(requests_per_minute=1200, input_tokens_per_minute=600_000, output_tokens_per_minute=300_000)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(50)])

    stats = run_in_process(requests_path, fake, max_requests_per_minute="auto", max_tokens_per_minute="auto",
                           max_output_tokens_per_minute="auto")

    assert stats.succeeded == 50 and fake.stats.rate_limited == 0
    assert stats.limits_in_force.replace(" (binding)", "") == ("1,164 requests/min, 582,000 input tokens/min, "
                                                               "291,000 output tokens/min")
    times = fake.stats.accepted_times
    assert (len(times) - 11) / (times[-1] - times[10]) * 60 >= 0.9 * 1200


def test_output_is_budgeted_by_what_responses_produce_not_max_tokens(tmp_path, fake_server):
    # 60,000 output tokens/min; each request may produce 1,000 but produces 50. Charged by max_tokens, 40
    # requests would take 40 s; budgeted by what they produce, about 2 s.
    fake = fake_server(output_tokens_per_minute=60_000, output_tokens=50, output_charging="max_tokens")
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i, max_tokens=1000) for i in range(40)])

    stats = run_in_process(requests_path, fake, max_output_tokens_per_minute=60_000)

    assert stats.succeeded == 40 and fake.stats.rate_limited == 0
    assert stats.elapsed < 6
    assert stats.totals.output_tokens == 40 * 50


def test_without_rate_limit_headers_429s_slow_the_run_down_until_they_stop(tmp_path, fake_server, captured_logs):
    fake = fake_server(requests_per_minute=1200, burst_seconds=1, rate_limit_headers=False)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(90)])

    stats = run_in_process(requests_path, fake, max_requests_per_minute=2400)

    assert stats.succeeded == 90 and 1 <= fake.stats.rate_limited <= 9
    slowed_to = float(stats.limits_in_force.split(" requests/min")[0].replace(",", ""))
    assert slowed_to < 2400
    assert any(BLIND_429_SLOWING in line for line in captured_logs)
    last_refusal = fake.stats.rate_limited_times[-1]
    assert last_refusal < fake.stats.accepted_times[-1] - 1  # the 429s stopped well before the end


def test_after_header_less_429s_stop_the_run_speeds_back_up(tmp_path, fake_server, captured_logs, monkeypatch):
    monkeypatch.setattr(app, "RECOVERY_SECONDS", 0.3)  # 30 s in a real run
    fake = fake_server()  # enforces no limit, so its 429s carry no rate-limit headers, like a proxy's
    rows = [request(f"[[fault:429x1]] q{i}" if i in (0, 16, 32) else f"q{i}", i) for i in range(80)]  # then none
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake, max_requests_per_minute=2400)

    assert stats.succeeded == 80 and fake.stats.rate_limited == 3
    assert sum(BLIND_429_SLOWING in line for line in captured_logs) == 3
    assert any("speeding back up to 2,400 requests/min" in line for line in captured_logs)
    assert stats.limits_in_force.startswith("2,400 requests/min")


def test_429s_beyond_a_lines_attempts_still_pause_the_other_senders_and_cost_no_line(tmp_path, fake_server):
    fake = fake_server()
    rows = [request("[[fault:429x3]] first", 0)] + [request(f"q{i}", i) for i in range(1, 15)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake, max_requests_per_minute=1200, max_attempts=1)

    assert stats.failed == 0 and stats.succeeded == 15 and stats.rate_limited == 3
    for refused in fake.stats.rate_limited_times:  # retry-after-ms: 300
        assert [t for t in fake.stats.received_times if refused + 0.02 < t < refused + 0.28] == []


def test_new_top_level_fields_pass_through_and_sampling_rules_are_the_apis(tmp_path, fake_server):
    fake = fake_server()
    rows = [request("new fields", 0, output_config={"effort": "low"}, inference_geo="us", speed="fast"),
            request("sampling on an older model", 1, model="claude-sonnet-4-5", temperature=0),
            request("sampling on Sonnet 5.5", 2, temperature=0)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    run_in_process(requests_path, fake, anthropic_version="2023-06-01")  # the version that takes sampling parameters

    results, errors = outputs(requests_path)
    assert sorted(record[2]["row"] for record in results) == [0, 1]
    assert results[[r[2]["row"] for r in results].index(0)][0]["output_config"] == {"effort": "low"}
    (error,) = errors
    assert error[2] == {"row": 2} and "HTTP 400 invalid_request_error: temperature" in error[1][0]


def test_a_429_uses_up_no_attempt_so_a_throttled_stretch_costs_no_line(tmp_path, fake_server):
    fake = fake_server(throttled_seconds=2.0)  # every request gets a 429 (retry-after 0.3 s) for 2 s
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q {i}", i) for i in range(20)])

    stats = run_in_process(requests_path, fake, max_attempts=2)

    results, errors = outputs(requests_path)
    assert errors == [] and len(results) == 20 and stats.exit_code == 0
    assert fake.stats.rate_limited >= 5 and stats.rate_limited == fake.stats.rate_limited


def test_nothing_but_429s_for_too_long_stops_the_run_for_a_rerun(tmp_path, fake_server, monkeypatch, captured_logs):
    monkeypatch.setattr(app, "OUTAGE_MAX_SECONDS", 1.0)
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"[[always:429]] q {i}", i) for i in range(5)])

    stats = run_in_process(requests_path, fake, max_attempts=2)

    assert stats.exit_code == 3 and stats.failed == 0 and outputs(requests_path) == ([], [])
    assert fake.stats.rate_limited > 5
    assert any("Nothing but 429s" in line and line.startswith("ERROR") for line in captured_logs)


@pytest.mark.parametrize("charging", ["produced", "max_tokens"])
def test_output_tokens_are_paced_at_the_reported_limit_without_a_flag(tmp_path, fake_server, charging):
    """The fake's bucket holds 5 s (1,000 tokens): a burst of 30 requests holding 256 each would overrun it,
    and at 50 tokens each they need 7.5 s of the limit."""
    fake = fake_server(output_tokens_per_minute=12_000, output_tokens=50, output_charging=charging,
                       latency=(0.05, 0.1))
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q {i}", i, max_tokens=256) for i in range(30)])

    stats = run_in_process(requests_path, fake)  # no max_output_tokens_per_minute

    assert stats.succeeded == 30 and stats.failed == 0
    assert fake.stats.rate_limited <= 1, fake.stats.rate_limited
    assert "output tokens/min" in stats.limits_in_force and "11,640" in stats.limits_in_force  # 97% of 12,000


def test_a_spend_cap_stops_the_run_at_once_and_the_rerun_answers_every_line_once(tmp_path, fake_server,
                                                                                 captured_logs):
    capped = {"on": False, "refused": 0}

    async def spend_cap(request, body):  # the organization's monthly cap is reached after 20 requests
        if capped["on"] or fake.stats.received > 20:
            capped["on"] = True
            capped["refused"] += 1
            return fake.error(429, "rate_limit_error", "You have reached your monthly spend limit.",
                              details={"error_code": "enforced_spend_limit_reached"})
        return None

    fake = fake_server(hostile=spend_cap, latency=(0.01, 0.03))
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(100)])

    stats = run_in_process(requests_path, fake, max_requests_per_minute=6000, max_concurrent_requests=5)

    results, errors = outputs(requests_path)
    assert stats.exit_code == 6 and stats.stop is app.Stop.ORGANIZATION_REFUSED
    assert any("refuses every request of the organization (enforced_spend_limit_reached)" in line
               and "until 00:00 UTC on the 1st of next month" in line for line in captured_logs)
    assert errors == [] and 15 <= len(results) <= 21 and capped["refused"] <= 5  # the requests in flight at most

    capped["on"] = False
    fake.config.hostile = None
    rerun = run_in_process(requests_path, fake)

    assert rerun.exit_code == 0
    assert sorted(record[2]["row"] for record in outputs(requests_path)[0]) == list(range(100))
    assert fake.stats.paid_twice == 0


def test_more_refusals_of_the_organization_abandon_none_of_the_answers_in_flight(tmp_path, fake_server,
                                                                                captured_logs):
    async def on_hold(request, body):  # from the 21st request on, every one is refused (slowly, so that several
        if fake.stats.received > 20:  # refusals come back while answers accepted before are still in flight)
            await asyncio.sleep(0.3)
            return fake.error(400, "invalid_request_error", "This organization is on hold.",
                              details={"error_code": "organization_on_hold"})
        return None

    fake = fake_server(hostile=on_hold, latency=(0.2, 1.0))
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(60)])

    stats = run_in_process(requests_path, fake, max_concurrent_requests=10)

    results, errors = outputs(requests_path)
    assert stats.stop is app.Stop.ORGANIZATION_REFUSED and errors == []
    assert fake.stats.received - 20 >= 2  # more than one refusal came back
    assert not any("again: stopping now" in line for line in captured_logs)
    assert len(results) == sum(fake.stats.answered.values()) == 20  # every answer accepted before the hold is saved

    fake.config.hostile = None
    run_in_process(requests_path, fake)
    assert len(outputs(requests_path)[0]) == 60 and fake.stats.paid_twice == 0


def test_requests_the_api_accepts_are_sent_cache_warming_and_system_messages(tmp_path, fake_server):
    fake = fake_server()
    rows = [request("warm the cache", 1, max_tokens=0),
            request("hi", 2, messages=[{"role": "user", "content": "hi"},
                                       {"role": "system", "content": "Answer in French from now on."}])]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake)

    results, errors = outputs(requests_path)
    assert stats.exit_code == 0 and errors == [] and fake.stats.received == 2
    warmed = next(record[1] for record in results if record[2] == {"row": 1})
    assert warmed["content"] == [] and warmed["stop_reason"] == "max_tokens" and warmed["usage"]["output_tokens"] == 0


DOCUMENT_BLOCK = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Notes."}}
CITED_TEXT = {"type": "text", "text": "As noted.", "citations": [{"type": "char_location", "cited_text": "Notes.",
                                                                   "document_index": 0, "start_char_index": 0,
                                                                   "end_char_index": 6}]}


def test_lines_the_api_version_refuses_are_not_sent_and_the_older_version_sends_them(tmp_path, fake_server):
    fake = fake_server()
    rows = [request("fine", 0), request("sampling", 1, temperature=1.0), request("nucleus", 2, top_p=1.0),
            request("doc", 3, messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": [
                DOCUMENT_BLOCK]}, {"role": "user", "content": "go on"}]),
            request("cited", 4, messages=[{"role": "user", "content": [CITED_TEXT]}])]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake)

    results, errors = outputs(requests_path)
    assert [record[2]["row"] for record in results] == [0] and fake.stats.received == 1
    assert fake.stats.versions_seen == {"2026-10-21": 1}
    problems = {int(record[1][0].split(":")[0].removeprefix("line ")) - 1: record[1][0] for record in errors}  # rows
    assert "API version 2026-10-21 does not accept 'temperature'" in problems[1]
    assert "'top_p'" in problems[2] and "a document block in an assistant message (messages[1])" in problems[3]
    assert "citations on a user's text (messages[0])" in problems[4]
    assert all("--anthropic_version 2023-06-01 keeps the older rules" in problem for problem in problems.values())
    assert stats.bad_lines == 4

    rerun = run_in_process(requests_path, fake, anthropic_version="2023-06-01")

    assert rerun.exit_code == 0 and rerun.succeeded == 4 and fake.stats.versions_seen["2023-06-01"] == 4
    assert outputs(requests_path)[1] == []  # the records of the refusals, remembered by the lines' text, are gone


def test_betas_go_in_the_header_never_the_body_and_the_record_keeps_the_line(tmp_path, fake_server):
    fake = fake_server()
    rows = [request("plain", 0), request("long context", 1, betas=["context-1m-2025-08-07"]),
            request("streamed", 2, betas=["compact-2026-01-12"], stream=True),
            request("unknown", 3, betas=["no-such-beta-2020-01-01"])]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake, betas="fast-mode-2026-02-01", max_attempts=2)

    results, errors = outputs(requests_path)
    assert stats.succeeded == 3 and [record[2] for record in errors] == [{"row": 3}]
    assert "Unsupported beta header: no-such-beta-2020-01-01" in errors[0][1][0]
    assert sorted(fake.stats.betas_seen) == sorted([
        ("fast-mode-2026-02-01",), ("fast-mode-2026-02-01", "context-1m-2025-08-07"),
        ("fast-mode-2026-02-01", "compact-2026-01-12"), ("fast-mode-2026-02-01", "no-such-beta-2020-01-01")])
    assert not any("betas" in body for body in fake.stats.bodies_seen)
    by_row = {record[2]["row"]: record[0] for record in results}
    assert by_row[1]["betas"] == ["context-1m-2025-08-07"] and "betas" not in by_row[0]


def test_a_model_the_api_does_not_know_fails_its_lines_without_sending_them_and_the_others_go_on(
        tmp_path, fake_server, captured_logs):
    fake = fake_server(latency=(0.05, 0.1))
    rows = [request(f"q{i}", i, model="claude-unknown-9" if i % 2 else MODEL) for i in range(200)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake, max_requests_per_minute=600, max_concurrent_requests=4)

    results, errors = outputs(requests_path)
    sent_unknown = sum(1 for body in fake.stats.bodies_seen if body["model"] == "claude-unknown-9")
    assert stats.exit_code == 1 and len(results) == 100 and len(errors) == 100
    assert sent_unknown <= 5  # those on their way when the first 404 came back
    assert all(record[3]["permanent"] for record in errors)
    failures = [line for line in captured_logs if line.startswith("ERROR line")]
    assert len(failures) <= 2 and any("lines: failed (model not found)" in line for line in captured_logs)


def test_a_cause_shared_by_many_lines_is_logged_once_with_its_count(tmp_path, fake_server, captured_logs):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i, temperature=0.5) for i in range(3000)])

    stats = run_in_process(requests_path, fake)

    said = [line for line in captured_logs if "does not accept 'temperature'" in line]
    assert stats.bad_lines == 3000 and fake.stats.received == 0
    assert len(said) == 2 and said[0].startswith("WARNING line 1: ")
    assert said[1].startswith("WARNING 3,000 lines: API version 2026-10-21 does not accept 'temperature'")
    assert said[1].endswith("(lines 1, 2, 3, 4, 5, ...).")
