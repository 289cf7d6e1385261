"""--max_cost: the bill the fake server adds up never passes the budget, on either road, faults or not."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import cli_args, outputs, read_jsonl, request, run_cli, run_in_process, write_jsonl

import api_request_parallel_processor as app

# A request of the tests costs about $0.00022 (10 input tokens at $2/M, 20 output at $10/M), and at most
# $0.00066 (all of its max_tokens of 64): $0.02 covers about 90 of 200.
BUDGET = 0.02


def rows_answered(requests_path) -> Counter:
    return Counter(record[2]["row"] for record in outputs(requests_path)[0])


def test_the_budget_takes_requests_in_flight_at_the_most_they_can_cost():
    budget = app.Budget(1.0, {})
    steps = [  # (what happens, whether a request costing at most 0.3 would fit then)
        (lambda: budget.reserve(0.3), True),  # 0.3 reserved
        (lambda: budget.reserve(0.3), True),  # 0.6
        (lambda: budget.reserve(0.3), False),  # 0.9: another 0.3 would pass 1.0
        (lambda: budget.release(0.3), True),  # answered; its cost counted apart (0.6 reserved)
        (lambda: setattr(budget, "spent", 0.25), False),  # what the answer cost: 0.25 + 0.6 + 0.3 > 1.0
        (lambda: budget.release(0.3, spent_anyway=0.3), False),  # timed out: counted at the most it could cost
        (lambda: budget.release(0.3), True),  # 0.55 spent, nothing in flight: 0.85 fits
    ]
    for event, fits in steps:
        event()
        assert budget.admits(0.3) is fits
    assert budget.in_flight == 0 and budget.spent == pytest.approx(0.55)
    assert budget.describe() == "$0.55 of the $1.00 budget"


@pytest.mark.parametrize("fault_rate", [0.0, 0.2])
def test_a_run_stops_before_its_bill_passes_the_budget_and_a_rerun_answers_the_rest(tmp_path, fake_server,
                                                                                     monkeypatch, fault_rate):
    monkeypatch.setattr(app, "backoff_seconds", lambda attempt: 0.05 * attempt)  # the outcome, not the waits
    fake = fake_server(latency=(0.05, 0.1), fault_rate=fault_rate, slow_seconds=1.5, seed=7)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(200)])

    stats = run_in_process(requests_path, fake, max_cost=BUDGET, request_timeout=1.0, max_attempts=8)

    assert stats.exit_code == 5 and stats.stop is app.Stop.BUDGET
    assert fake.stats.billed <= BUDGET  # never over...
    assert fake.stats.billed >= 0.8 * BUDGET and stats.budget.spent >= fake.stats.billed  # ...nor far under
    answered = rows_answered(requests_path)
    assert 40 < len(answered) < 200 and set(answered.values()) == {1}
    assert outputs(requests_path)[1] == []  # the lines not sent have no record: they are the rerun's

    rerun = run_in_process(requests_path, fake, max_cost=10.0, request_timeout=1.0, max_attempts=8)

    assert rerun.exit_code == 0 and rerun.already_done == len(answered)
    assert rows_answered(requests_path) == Counter(range(200))  # every line exactly once
    if not fault_rate:
        assert fake.stats.paid_twice == 0


def test_the_batch_road_submits_only_what_the_budget_covers(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(200)])

    stats = run_in_process(requests_path, fake, max_cost=BUDGET / 2, batch=True, batch_poll_seconds=0.05)

    assert stats.exit_code == 5 and fake.stats.billed <= BUDGET / 2
    answered = rows_answered(requests_path)  # as many as fit at the most each can cost, at the batch price (30)
    assert 20 < len(answered) < 200 and set(fake.stats.batch_submissions.values()) == {1}
    assert stats.budget.spent == pytest.approx(fake.stats.billed, rel=0.02)

    rerun = run_in_process(requests_path, fake, max_cost=10.0, batch=True, batch_poll_seconds=0.05)

    assert rerun.exit_code == 0 and rows_answered(requests_path) == Counter(range(200))
    assert set(fake.stats.batch_submissions.values()) == {1}


def test_a_model_without_a_price_stops_a_budgeted_run_before_it_sends_a_thing(tmp_path, fake_server, captured_logs):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("q", 0, model="claude-unpriced-1")])

    stats = run_in_process(requests_path, fake, max_cost=1.0)

    assert stats.exit_code == 2 and fake.stats.received == 0 and outputs(requests_path) == ([], [])
    assert any("claude-unpriced-1 has none: give it with --prices" in line for line in captured_logs)


def test_the_status_line_summary_and_dry_run_show_the_budget(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(200)])

    dry = run_cli("--requests_filepath", str(requests_path), "--dry_run", "--max_cost", str(BUDGET))
    assert "Budget: $0.02 (--max_cost) covers about " in dry.stdout and " of the 200 lines" in dry.stdout, dry.stdout

    result = run_cli(*cli_args(fake, requests_path, "--max_cost", str(BUDGET)))
    assert result.returncode == 5, result.stderr
    assert "of the $0.02 budget" in result.stderr
    assert "a rerun with the same --max_cost spends up to it again" in result.stderr
    assert len(read_jsonl(tmp_path / "r_results.jsonl")) < 200


@pytest.mark.parametrize(("ttl", "warm", "batch", "us_only", "expected"), [
    (300.0, False, False, False, 3880),  # 240 input at $2, 960 written at $2.50, 100 output at $10 (per million)
    (300.0, True, False, False, 1576),  # the prefix read at $0.10
    (3600.0, False, False, False, 5320),  # written for an hour at $4
    (300.0, False, True, False, 1940),  # the batch price: half
    (300.0, False, False, True, 4268),  # US-only inference: 1.1x
])
def test_the_most_a_request_can_cost_takes_its_prefix_at_the_right_price(ttl, warm, batch, us_only, expected):
    budget = app.Budget(1.0, app.load_prices(None))
    body = request("q", max_tokens=100, **({"inference_geo": "us"} if us_only else {}))
    job = app.Job(1, body, b"{}", None, None, app.TokenEstimate(1000, 800, (42, ttl)))
    # 1,000 tokens by cl100k_base, 800 of them in the prefix, at 1.0x and the 20% margin: 1,200 and 960
    assert budget.most_cost(job, 1.0, warm, batch) == pytest.approx(expected / 1e6)
    assert budget.most_cost(app.Job(1, {**body, "model": "claude-unpriced"}, b"", None, None, job.estimate),
                            1.0, warm) is None
