"""The pieces of pacing and retrying, on a controlled clock: buckets, retry-after, classification."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from conftest import API_KEY, MODEL, SCRIPT, read_jsonl, request, run_in_process, write_jsonl

import api_request_parallel_processor as app


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_refills_continuously_and_holds_a_tenth_of_a_second():
    clock = Clock()
    bucket = app.TokenBucket(per_minute=6000, clock=clock)  # 100 a second
    assert bucket.capacity == 10 and bucket.seconds_until_available(1) == pytest.approx(0.01)
    clock.now += 5
    assert bucket.seconds_until_available(10) == 0  # full after a tenth of a second, and no fuller after five
    assert bucket.level == 10
    bucket.take(10)
    assert bucket.seconds_until_available(1) == pytest.approx(0.01)


def test_a_request_larger_than_the_bucket_waits_for_a_full_bucket_then_leaves_a_debt():
    clock = Clock()
    bucket = app.TokenBucket(per_minute=60_000, initial=100, clock=clock)  # 1,000 a second, capacity 100
    assert bucket.seconds_until_available(1000) == 0  # full: the big one may go now, alone
    bucket.take(1000)
    assert bucket.seconds_until_available(1) == pytest.approx(0.901)  # the debt is waited out


def test_usage_correction_gives_back_or_charges_more():
    clock = Clock()
    bucket = app.TokenBucket(per_minute=60_000, initial=100, clock=clock)
    bucket.take(100)
    bucket.give_back(60)  # the estimate was 100, the API counted 40
    assert bucket.level == pytest.approx(60)
    bucket.give_back(-200)  # the API counted 200 more than estimated
    assert bucket.level == pytest.approx(-140)
    bucket.give_back(10_000)
    assert bucket.level == bucket.capacity  # never above capacity


def test_learned_ratio_scales_new_estimates():
    lane = app.ModelLane(limiter=None)
    assert lane.scale_input(100) == 100
    lane.estimated, lane.counted = 1000, 1300  # what the answers so far counted: 1.3 times the estimate
    assert lane.input_ratio == pytest.approx(1.3) and lane.scale_input(100) == 130


def test_retry_after_forms():
    assert app.parse_retry_after({"retry-after": "3"}) == 3
    assert app.parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 28 <= app.parse_retry_after({"retry-after": later}) <= 30
    assert app.parse_retry_after({"retry-after": "soon"}) is None
    assert app.parse_retry_after({"retry-after": "-1"}) is None
    assert app.parse_retry_after({}) is None


def test_backoff_grows_with_jitter_and_is_capped():
    assert 0.375 <= app.backoff_seconds(1) <= 0.5
    assert 1.5 <= app.backoff_seconds(3) <= 2
    assert 6 <= app.backoff_seconds(10) <= 8


def error_body(kind: str, **details: str) -> bytes:
    error = {"type": kind, "message": "m", **({"details": details} if details else {})}
    return json.dumps({"type": "error", "error": error, "request_id": "req_1"}).encode()


@pytest.mark.parametrize(("status", "retryable"), [
    (400, False), (401, False), (403, False), (404, False), (413, False),
    (408, True), (409, True), (429, True), (500, True), (502, True), (503, True), (529, True),
])
def test_statuses_are_classified_as_the_api_documents(status, retryable):
    attempt = app.interpret_response(status, {}, error_body("some_error"))
    assert attempt.retryable is retryable and attempt.response is None
    assert "(request-id req_1)" in attempt.error
    assert attempt.authentication_failed is (status == 401)


def test_x_should_retry_overrides_and_the_error_code_is_read():
    assert app.interpret_response(500, {"x-should-retry": "false"}, error_body("api_error")).retryable is False
    assert app.interpret_response(400, {"x-should-retry": "true"}, error_body("x")).retryable is True
    spend = error_body("rate_limit_error", error_code="enforced_spend_limit_reached")
    assert app.interpret_response(429, {}, spend).error_code == "enforced_spend_limit_reached"
    assert app.interpret_response(429, {}, error_body("rate_limit_error")).error_code == ""


MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
           "stop_reason": "end_turn", "usage": {"input_tokens": 3, "output_tokens": 1}}


@pytest.mark.parametrize(("body", "problem"), [
    (MESSAGE, None),
    ({**MESSAGE, "content": None}, "HTTP 200 with a message without content"),
    ({key: value for key, value in MESSAGE.items() if key != "content"}, "HTTP 200 with a message without content"),
    ({key: value for key, value in MESSAGE.items() if key != "usage"}, "HTTP 200 with a message without usage"),
    ({**MESSAGE, "usage": {"input_tokens": 3}}, "HTTP 200 with an impossible usage: output_tokens None"),
    ({**MESSAGE, "role": "user"}, "HTTP 200 with a message without its type and role"),
    ({"type": "message"}, "HTTP 200 with a message without id, model, content, usage"),
    ([1, 2], "HTTP 200 with a body that is list, not a message"),
    (b'{"id": "msg_1", "content": [', "HTTP 200 with a body that is not JSON (cut off?)"),
    ({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
     "an error body after HTTP 200: overloaded_error: busy"),
])
def test_a_200_is_saved_only_if_it_is_a_message_and_an_error_body_is_that_error(body, problem):
    attempt = app.interpret_response(200, {}, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert (attempt.response is None) is (problem is not None)
    if problem is not None:
        assert attempt.error.startswith(problem) and attempt.retryable and not attempt.refused
    if problem and problem.startswith("an error body"):
        assert attempt.status == 529 and attempt.server_side  # as an overloaded_error before the 200 would be


def test_output_expectation_learns_the_mean_bounded_by_max_tokens():
    lane = app.ModelLane(limiter=None)
    assert lane.expected_output(1024) == 1024  # nothing known yet: assume the worst
    lane.produced, lane.answers = 80 + 120 + 100, 3
    assert lane.expected_output(1024) == 100 and lane.expected_output(50) == 50


def test_rate_limit_headers_are_read_with_the_tokens_fallback():
    headers = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
               "anthropic-ratelimit-tokens-limit": "30000", "anthropic-ratelimit-tokens-remaining": "29000",
               "anthropic-ratelimit-output-tokens-limit": "junk"}
    assert app.rate_figures(headers) == {"requests": (50, 49), "input-tokens": (30000, 29000)}  # junk: left out


def test_a_reported_limit_below_the_flag_replaces_it_once(captured_logs):
    limit = app.Limit("requests", 1200)
    limit.observe(600, None)
    assert limit.bucket.per_minute == 600
    limit.observe(600, None)  # the same figure again: said once
    limit.observe(5000, None)
    assert limit.bucket.per_minute == 1200  # never above the flag
    warnings = [line for line in captured_logs if line.startswith("WARNING") and "reports a limit of" in line]
    assert len(warnings) == 1 and "600 requests/min, below the configured 1,200/min" in warnings[0]


def test_auto_follows_the_reported_limits_with_a_margin():
    limit = app.Limit("input-tokens", "auto")
    assert limit.bucket.per_minute == app.AUTO_STARTING_LIMITS["input-tokens"]  # cautious until told
    limit.observe(450_000, None)
    assert limit.bucket.per_minute == pytest.approx(450_000 * app.AUTO_SAFETY_MARGIN)


def test_remaining_lower_than_the_bucket_lowers_it_allowing_for_rounding():
    requests = app.Limit("requests", 6000, initial=100)
    requests.observe(None, 3)  # other clients spent the rest
    assert requests.bucket.level <= 3
    tokens = app.Limit("input-tokens", 600_000, initial=1000)
    tokens.observe(None, 1000)  # "1000" may be anything up to 1,499: no change
    assert tokens.bucket.level == pytest.approx(1000, abs=1)
    tokens.observe(None, 0)
    assert tokens.bucket.level <= app.TOKENS_REMAINING_ROUNDING


def test_each_model_has_its_own_limits(tmp_path, fake_server):
    fake = fake_server(per_model_limits=True, requests_per_minute=1200)  # 20/s for each model
    rows = [request(f"q{i}", i, **({"model": "claude-haiku-5-5"} if i % 2 else {})) for i in range(60)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake, max_requests_per_minute=1200)

    assert stats.succeeded == 60 and fake.stats.rate_limited == 0
    second = fake.stats.received_times[0] + 0.2  # past the first request, which goes alone
    in_a_second = [t for t in fake.stats.received_times if second <= t < second + 1.0]
    assert len(in_a_second) >= 30  # both models at 20/s: 40 a second; one limiter for both would allow 20
    assert stats.limits_in_force.count("1,200 requests/min") == 2  # each model its own limiter
    assert "claude-haiku-5-5: " in stats.limits_in_force and "claude-sonnet-5-5: " in stats.limits_in_force
    assert "| claude-haiku-5-5: " in app.status_line(stats)  # the status line gives each model's rates


def test_a_429_with_capacity_left_slows_the_run_and_one_with_a_limit_used_up_does_not(tmp_path, fake_server,
                                                                                       captured_logs):
    fake = fake_server(requests_per_minute=100_000)  # the headers show plenty left...
    rows = [request("[[fault:accelx1]] first", 0)] + [request(f"q{i}", i) for i in range(1, 5)]
    stats = run_in_process(write_jsonl(tmp_path / "a.jsonl", rows), fake, max_requests_per_minute=1200)
    assert stats.succeeded == 5 and stats.rate_limited == 1
    assert "1,080 requests/min" in stats.limits_in_force  # ...so an acceleration limit: 10% slower
    assert any("capacity left: an acceleration limit): slowing to" in line for line in captured_logs)

    captured_logs.clear()
    rows = [request("[[fault:429x1]] first", 0)] + [request(f"q{i}", i) for i in range(1, 5)]
    stats = run_in_process(write_jsonl(tmp_path / "b.jsonl", rows), fake, max_requests_per_minute=1200)
    assert stats.succeeded == 5 and stats.rate_limited == 1  # the requests limit reported used up
    assert "1,200 requests/min" in stats.limits_in_force and not any("slowing" in line for line in captured_logs)


def test_a_limit_is_exhausted_when_little_of_it_remains():
    def headers(limit: str, remaining: str) -> dict:
        return app.rate_figures({"anthropic-ratelimit-requests-limit": limit,
                                 "anthropic-ratelimit-requests-remaining": remaining})

    assert app.limit_exhausted(headers("600", "0"), "requests")
    assert not app.limit_exhausted(headers("600", "1"), "requests")
    assert not app.limit_exhausted({}, "requests")
    for remaining, exhausted in (("0", True), ("1000", True), ("2000", False)):
        tokens = {"anthropic-ratelimit-input-tokens-limit": "30000",
                  "anthropic-ratelimit-input-tokens-remaining": remaining}
        assert app.limit_exhausted(app.rate_figures(tokens), "input-tokens") is exhausted


def test_a_model_paused_by_429s_holds_up_no_other_model(tmp_path, fake_server):
    haiku = "claude-haiku-5-5"
    fake = fake_server(per_model_limits=True, requests_per_minute=600, throttled_seconds=3.5, throttled_models=(MODEL,))
    rows = [request(f"question {i}", i, model=model) for i in range(20) for model in (MODEL, haiku)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake, max_requests_per_minute=600)  # Haiku's 20 lines take 2 s

    assert stats.succeeded == 40 and stats.rate_limited > 0
    models = [record[1]["model"] for record in read_jsonl(tmp_path / "r_results.jsonl")]
    assert models[:20] == [haiku] * 20  # every Haiku line answered while Sonnet waited out its 429s


def test_each_models_sends_rise_to_the_full_rate_over_the_ramp_up(monkeypatch):
    monkeypatch.setattr(app, "RAMP_UP_SECONDS", 5.0)  # not the conftest's near-zero
    clock = Clock()
    pacing = app.Pacing([app.Limit("requests", 6000, clock=clock)], clock)  # 100 a second at the full rate
    sent_at = []
    while len(sent_at) < 400:
        clock.now = max(clock.now, pacing.earliest_send())
        sent_at.append(clock.now)
        pacing.sent(full_rate=100.0)
        clock.now += 0.001  # the bucket would space them at the full rate; here only the ramp does
    first = sent_at[1]  # the ramp is timed from the second send, the first having gone alone
    assert sum(1 for t in sent_at if t < first + 0.5) <= 15  # 1 + t + 9.9 t^2 sends by t: about 4; 50 at full rate
    assert 65 <= sum(1 for t in sent_at if first + 3.0 <= t < first + 4.0) <= 75  # about 70, rising
    assert first + 4.9 < sent_at[254] < first + 5.1  # about 254 sends in the 5 s ramp...
    assert sent_at[-1] - sent_at[255] < 0.2  # ...then the ramp holds nothing back


def test_pacing_pauses_on_429s_slows_down_when_blind_and_wins_the_rates_back():
    clock = Clock()
    limits = [app.Limit("requests", 600, clock=clock), app.Limit("input-tokens", 60_000, clock=clock)]
    pacing = app.Pacing(limits, clock)
    steps = [  # (seconds later, what happens, the earliest next send, the rates after it)
        (0.0, lambda: pacing.pause(2.0, blind=False), 102.0, [600, 60_000]),  # a limit shown used up: pause only
        (3.0, lambda: pacing.pause(2.0, blind=True), 105.0, [540, 54_000]),  # no limit shown: 10% slower
        (0.5, lambda: pacing.pause(2.0, blind=True), 105.5, [540, 54_000]),  # the same pause: counted once
        (16.5, pacing.recover, 105.5, [540, 54_000]),  # 16.5 s since the last blind 429: too soon
        (14.0, pacing.recover, 105.5, [600, 60_000]),  # 30.5 s: a step back, up to the configured rates
        (31.0, pacing.recover, 105.5, [600, 60_000]),  # nothing left to win back
        (1.0, lambda: pacing.share(0.8), 105.5, [480, 48_000]),  # another spends the limit
        (0.5, lambda: pacing.share(0.8), 105.5, [480, 48_000]),  # at most once a second
        (1.1, lambda: pacing.share(1.25), 105.5, [600, 60_000]),  # plenty left: back up to the allowed rates
        (0.0, lambda: pacing.pause(2.0, blind=True), pytest.approx(169.6), [540, 54_000]),  # a blind 429...
        (1.1, lambda: pacing.share(1.25), pytest.approx(169.6), [540, 54_000]),  # ...which the figures do not explain
    ]
    for seconds, event, earliest, rates in steps:
        clock.now += seconds
        event()
        assert (pacing.earliest_send(), [limit.bucket.per_minute for limit in limits]) == (earliest, rates)
        if event is steps[0][1]:
            assert all(limit.bucket.level <= 0 for limit in limits)  # a 429 empties the buckets, as the server's


def test_the_way_output_is_charged_is_told_from_what_the_api_reports():
    charging = app.OutputCharging()
    charging.in_flight = 3 * 1024
    charging.ended(1024, 2000.0, refused=False)  # an answer: the bucket holds 2,500 at least
    assert not charging.held and charging.capacity == 2500 and charging.admits(10**6)
    charging.in_flight += 1024
    charging.ended(1024, 1000.0, refused=True)  # refused with 500-1,500 left: less than max_tokens, more than 1
    assert charging.held and charging.in_flight == 2048 and not charging.admits(1024)  # 3,072 do not fit in 2,500
    charging.ended(1024, None, refused=False)  # a network failure: no figures, but one fewer in flight
    assert charging.admits(1024) and not charging.admits(1500)  # 2,048 fit; 2,524 do not
    assert charging.others_holding(1024) == 0
    charging.capacity, charging.in_flight = 20_000.0, 13 * 1024
    for _ in range(3):  # answers with 12,288 held by others, yet a full bucket: counted as produced after all
        charging.ended(1024, 19_000.0, refused=False)
        charging.in_flight += 1024
    assert not charging.held
    for _ in range(3):  # now short by about what the others hold
        charging.ended(1024, 8_000.0, refused=False)
        charging.in_flight += 1024
    assert charging.held


@pytest.mark.parametrize("charging", ["max_tokens", "produced"])
def test_with_max_tokens_held_the_requests_in_flight_fit_the_bucket(tmp_path, fake_server, captured_logs, charging):
    fake = fake_server(output_tokens_per_minute=30_000, output_tokens=100, output_charging=charging,
                       latency=(0.5, 0.7))  # the bucket holds 2,500: two requests of max_tokens 1,024
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i, max_tokens=1024) for i in range(14)])

    stats = run_in_process(requests_path, fake, max_requests_per_minute=100_000)

    assert stats.succeeded == 14
    held = [line for line in captured_logs if "holds each request's max_tokens" in line]
    if charging == "max_tokens":
        assert fake.stats.rate_limited <= 2 and len(held) == 1
    else:
        assert fake.stats.rate_limited == 0 and held == []


@pytest.mark.parametrize(("left", "rate_limited", "factor"), [
    (0.0, True, 0.8), (1.0, True, 0.8),  # a 429 that shows a limit used up: others spend from it
    (0.1, False, 0.8), (0.24, False, 0.8),  # running low
    (0.25, False, 1.0), (0.6, False, 1.0),  # enough
    (0.61, False, 1.25), (1.0, False, 1.25),  # plenty: a step back up (to the allowed rate at most)
])
def test_the_share_of_a_limit_left_steers_the_rates(left, rate_limited, factor):
    assert app.share_step(left, rate_limited) == pytest.approx(factor)


def test_runs_sharing_a_limit_slow_while_it_runs_low_and_speed_up_while_plenty_is_left(captured_logs):
    clock = Clock()
    limiter = app.RateLimiter(app.Settings(max_requests_per_minute=600), clock=clock)
    rates = []
    for remaining, rate_limited, seconds in ((50, False, 0), (5, False, 0.1), (5, False, 0.5), (0, True, 0.6),
                                             (50, False, 1.2), (50, False, 1.1), (50, False, 1.1)):
        clock.now += seconds
        limiter.observe({"requests": (600, remaining)}, 64, rate_limited)
        rates.append(round(limiter.requests.bucket.per_minute))
    # low: slower, once a second; a 429 showing the limit used up: slower; plenty left: faster, up to the 600 allowed
    assert rates == [600, 480, 480, 384, 480, 600, 600]
    assert sum("something else spends from it too" in line for line in captured_logs) == 1


NETWORK_FAILURE = app.Attempt(error="network error: ClientOSError", retryable=True)
TIMED_OUT = app.Attempt(error="no complete response within 600 s", retryable=True, timed_out=True)


def outcome(status: int | None, kind: str = "api_error", headers: dict | None = None, **details: str) -> app.Attempt:
    if status is None:
        return NETWORK_FAILURE
    return app.interpret_response(status, {"retry-after": "7", **(headers or {})}, error_body(kind, **details))


@pytest.mark.parametrize(("attempt", "action", "counted"), [
    (outcome(400, "invalid_request_error"), app.FAIL, True),
    (outcome(401, "authentication_error"), app.STOP, True),
    (outcome(403, "permission_error"), app.FAIL, True),
    (outcome(404, "not_found_error"), app.FAIL, True),
    (outcome(413, "request_too_large"), app.FAIL, True),
    (outcome(408, "timeout_error"), app.RETRY, True),
    (outcome(409, "conflict"), app.RETRY, True),
    (outcome(429, "rate_limit_error"), app.RETRY, False),  # the run's pacing problem, not the line's
    (outcome(429, "rate_limit_error", error_code="enforced_spend_limit_reached"), app.STOP, True),
    (outcome(429, "rate_limit_error", error_code="contract_spend_limit_reached"), app.STOP, True),
    (outcome(402, "billing_error", error_code="linked_organization_spend_limit_reached"), app.STOP, True),
    (outcome(400, "invalid_request_error", error_code="organization_on_hold"), app.STOP, True),
    (outcome(400, "invalid_request_error", error_code="cmek_key_disabled"), app.STOP, True),
    (outcome(429, "rate_limit_error", error_code="ramp_limit_exceeded"), app.RETRY, False),
    (outcome(400, "invalid_request_error", error_code="a_code_from_the_future"), app.FAIL, True),
    (outcome(500), app.RETRY, True),
    (outcome(502), app.RETRY, True),
    (outcome(503), app.RETRY, True),
    (outcome(504, "timeout_error"), app.RETRY, True),
    (outcome(529, "overloaded_error"), app.RETRY, True),
    (outcome(500, headers={"x-should-retry": "false"}), app.FAIL, True),
    (outcome(400, headers={"x-should-retry": "true"}), app.RETRY, True),
    (NETWORK_FAILURE, app.RETRY, True),
    (TIMED_OUT, app.RETRY, True),
    (app.Attempt(error="no connection: Too many open files", retryable=True, out_of_files=True), app.RETRY, False),
])
def test_one_rule_decides_after_each_status_and_error_code(attempt, action, counted):
    decision = app.decide(attempt, attempts=1, max_attempts=5, since_answered=0.0, outage_seconds=None)
    assert (decision.action, decision.counted) == (action, counted)
    if action == app.RETRY and attempt.status is not None:
        assert decision.delay == 7  # the server's retry-after
    if action == app.RETRY and attempt.status is None:
        assert 0.375 <= decision.delay <= 0.5  # backoff
    last = app.decide(attempt, attempts=5, max_attempts=5, since_answered=0.0, outage_seconds=None)
    assert last.action == (app.FAIL if action == app.RETRY and counted else action)  # a 429 uses up no attempt


@pytest.mark.parametrize(("attempt", "refused"), [
    (outcome(400, "invalid_request_error"), True),
    (outcome(403, "permission_error"), True),
    (outcome(404, "not_found_error"), True),
    (outcome(413, "request_too_large"), True),
    (outcome(400, headers={"x-should-retry": "true"}), False),
    (outcome(429, "rate_limit_error"), False),
    (outcome(500, headers={"x-should-retry": "false"}), False),  # the server's failure, though not to be retried
    (app.interpret_response(404, {}, b"<html>Not Found</html>"), False),  # a page from something else
    (NETWORK_FAILURE, False),
    (TIMED_OUT, False),
])
def test_a_failure_is_the_requests_own_only_when_the_api_refused_the_request(attempt, refused):
    """A refused request is remembered across runs (RememberedFailures); any other failure is sent again."""
    assert attempt.refused is refused


@pytest.mark.parametrize(("attempt", "outage_seconds", "action", "counted", "hold_all"), [
    (outcome(503), 10.0, app.RETRY, False, True),  # an outage's failure: every sender waits, no attempt used
    (NETWORK_FAILURE, 10.0, app.RETRY, False, True),
    (TIMED_OUT, 10.0, app.FAIL, True, False),  # a timeout says nothing of an outage: its last attempt is used up
    (outcome(400, "invalid_request_error"), 10.0, app.FAIL, True, False),
    (outcome(503), 901.0, app.STOP, True, False),  # 15 minutes down: left for the next run
])
def test_an_outage_holds_every_sender_then_gives_up_after_fifteen_minutes(attempt, outage_seconds, action, counted,
                                                                          hold_all):
    decision = app.decide(attempt, attempts=5, max_attempts=5, since_answered=0.0, outage_seconds=outage_seconds)
    assert (decision.action, decision.counted, decision.hold_all) == (action, counted, hold_all)
    if action == app.STOP:
        assert decision.cause is app.Stop.OUTAGE and decision.cause.exit_code == 3


def test_fifteen_minutes_of_nothing_but_429s_gives_up():
    limited = outcome(429, "rate_limit_error")  # retry-after: 7
    assert app.decide(limited, 1, 5, since_answered=892.0, outage_seconds=None).action == app.RETRY
    decision = app.decide(limited, 1, 5, since_answered=894.0, outage_seconds=None)  # the wait would end past 900 s
    assert decision.action == app.STOP and decision.cause is app.Stop.ONLY_429S
    an_hour = outcome(429, "rate_limit_error", {"retry-after": "3600"})  # honoured, but not past the 15 minutes
    assert app.decide(an_hour, 1, 5, since_answered=0.0, outage_seconds=None).action == app.STOP


RAISE_IT = ("16,000 input tokens/min is what holds the run back: if your limit is higher, raise "
            "--max_tokens_per_minute (or set it to auto).")


@pytest.mark.parametrize(("reported", "advice"), [
    (None, RAISE_IT),
    (30_000, RAISE_IT),  # under twice the figure: a raise, if the real limit is higher
    (450_000, ("16,000 input tokens/min is what holds the run back, and the API reports a limit of 450,000: set "
               "--max_tokens_per_minute auto to run at it.")),
])
def test_the_limit_that_holds_the_run_back_is_named_once(captured_logs, monkeypatch, reported, advice):
    monkeypatch.setattr(app.log, "threshold", app.LOG_LEVELS["INFO"])  # whatever level an earlier run left
    clock = Clock()
    settings = app.Settings(max_requests_per_minute=1200, max_tokens_per_minute=16_000)
    limiter = app.RateLimiter(settings, clock=clock)
    limiter.input_tokens.reported = reported
    charges = [(limiter.requests, 1), (limiter.input_tokens, 100)]  # 16,000 tokens/min allow 160 of these a minute

    for _ in range(60):
        wait, binding = limiter.until_room(charges)
        if wait > 0:
            limiter.bound_by(binding)
            clock.now += wait
        limiter.take(charges, 0)

    assert limiter.binding is limiter.input_tokens
    assert limiter.describe() == "1,200 requests/min, 16,000 input tokens/min (binding)"
    told = [line for line in captured_logs if "holds the run back" in line]
    assert told == [f"INFO {advice}"]


def test_runs_that_share_a_limit_settle_near_it_with_few_429s(tmp_path, fake_server):
    """Ten runs of 40 lines at once, each told the whole limit of 1,200 requests a minute: the API's figures show
    each run the others' traffic, and together they stay near the limit (the code before: 0.6 429s an answer)."""
    fake = fake_server(requests_per_minute=1200)
    runs = []
    for run in range(10):
        requests_path = write_jsonl(tmp_path / f"r{run}.jsonl", [request(f"run {run} q{i}", i) for i in range(40)])
        runs.append(subprocess.Popen([sys.executable, str(SCRIPT), "--requests_filepath", str(requests_path),
                                      "--request_url", fake.url, "--api_key", API_KEY, "--max_requests_per_minute",
                                      "1200", "--max_tokens_per_minute", "10000000"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    started = time.monotonic()
    codes = [run.wait(timeout=120) for run in runs]

    answered = sum(fake.stats.answered.values())
    assert codes == [0] * 10 and answered == 400 and fake.stats.paid_twice == 0
    assert fake.stats.rate_limited <= 0.25 * answered
    assert time.monotonic() - started < 60  # 20 s at the limit: runs that never settle take minutes
