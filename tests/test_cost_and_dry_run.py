"""Usage and cost per model, the price table and its override, and the dry run."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT, outputs, request, run_cli, run_in_process, write_jsonl

import api_request_parallel_processor as app

DOCUMENT = "The committee reviewed the annual report line by line and took careful notes. " * 150

# Anthropic's pricing page of late 2026, typed in by hand (USD per million tokens): input, 5-minute cache write,
# 1-hour cache write, cache read, output. One model id per row of the built-in table.
HAND_PRICES = {
    "claude-fable-5-2": (8, 10, 16, 0.20, 40),
    "claude-mythos-5-2-20261109": (8, 10, 16, 0.20, 40),
    "claude-fable-5-1": (10, 12.50, 20, 0.25, 50),
    "claude-mythos-5-1-20261020": (10, 12.50, 20, 0.25, 50),
    "claude-fable-5-20260601": (10, 12.50, 20, 1, 50),
    "claude-mythos-5": (10, 12.50, 20, 1, 50),
    "claude-opus-5-5": (4, 5, 8, 0.20, 20),
    "claude-opus-5-20260301": (5, 6.25, 10, 0.50, 25),
    "claude-opus-4-8": (5, 6.25, 10, 0.50, 25),
    "claude-opus-4-7": (5, 6.25, 10, 0.50, 25),
    "claude-opus-4-6": (5, 6.25, 10, 0.50, 25),
    "claude-opus-4-5-20251101": (5, 6.25, 10, 0.50, 25),
    "claude-opus-4-1-20250805": (15, 18.75, 30, 1.50, 75),
    "claude-opus-4-0": (15, 18.75, 30, 1.50, 75),
    "claude-opus-4-20250514": (15, 18.75, 30, 1.50, 75),
    "claude-sonnet-5-5": (2, 2.50, 4, 0.10, 10),  # reads at $0.10 since 7 October 2026
    "claude-sonnet-5": (2, 2.50, 4, 0.20, 10),
    "claude-sonnet-4-6": (3, 3.75, 6, 0.30, 15),
    "claude-sonnet-4-5-20250929": (3, 3.75, 6, 0.30, 15),
    "claude-sonnet-4-0": (3, 3.75, 6, 0.30, 15),
    "claude-sonnet-4-20250514": (3, 3.75, 6, 0.30, 15),
    "claude-haiku-5-5": (0.10, 0.125, 0.20, 0.01, 0.50),
    "claude-haiku-4-5-20251001": (1, 1.25, 2, 0.10, 5),
    "claude-3-5-haiku-20241022": (0.80, 1, 1.60, 0.08, 4),
}
# The whole request at another row when its prompt (input + cache writes + cache reads) is over the threshold.
HAND_LONG_PROMPT = {
    "claude-haiku-5-5": (100_000, (0.50, 0.625, 1.0, 0.05, 2.50)),
    "claude-sonnet-4-5-20250929": (200_000, (6, 7.50, 12, 0.60, 22.50)),
    "claude-sonnet-4-0": (200_000, (6, 7.50, 12, 0.60, 22.50)),
    "claude-sonnet-4-20250514": (200_000, (6, 7.50, 12, 0.60, 22.50)),
}


def hand_cost(model: str, usage: dict, us_only: bool) -> float:
    written, read = usage["cache_creation_input_tokens"], usage["cache_read_input_tokens"]
    one_hour = usage["cache_creation"]["ephemeral_1h_input_tokens"]
    row = HAND_PRICES[model]
    over, long_row = HAND_LONG_PROMPT.get(model, (None, None))
    if over is not None and usage["input_tokens"] + written + read > over:
        row = long_row
    cost = (usage["input_tokens"] * row[0] + (written - one_hour) * row[1] + one_hour * row[2] + read * row[3]
            + usage["output_tokens"] * row[4]) / 1e6
    return cost * 1.1 if us_only else cost


def cached(question: str, ttl: str | None = None, **extra) -> dict:
    control = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    system = [{"type": "text", "text": DOCUMENT, "cache_control": control}]
    return request(question, system=system, **extra)


def test_every_models_cost_matches_a_hand_computation(tmp_path, fake_server, captured_logs):
    fake = fake_server(output_tokens=300)
    rows = []
    for model in HAND_PRICES:  # a 5-minute write, reads of it, a 1-hour write and a US-only request
        rows += [cached("first", model=model), cached("second", model=model), cached("third", model=model),
                 cached("hourly", "1h", model=model, messages=[{"role": "user", "content": "other"}]),
                 request("plain", model=model, inference_geo="us")]
    rows += [request("word " * 80_000, model="claude-haiku-5-5"),  # ~104,000 tokens by the fake's count
             request("word " * 160_000, model="claude-sonnet-4-5-20250929")]  # ~208,000 tokens
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake)

    results, errors = outputs(requests_path)
    assert stats.succeeded == len(rows) and not errors
    expected: dict[str, float] = {}
    for body, response in results:
        cost = hand_cost(body["model"], response["usage"], body.get("inference_geo") == "us")
        expected[body["model"]] = expected.get(body["model"], 0.0) + cost
    assert set(stats.by_model) == set(HAND_PRICES)
    for model, usage in stats.by_model.items():
        assert usage.cost == pytest.approx(expected[model], rel=1e-9, abs=1e-12), model
        (line,) = [line for line in captured_logs if line.startswith(f"INFO {model}:")]
        assert f"| ${expected[model]:,.4f}" in line, line
    assert stats.totals.cache_write_1h_tokens and stats.totals.cache_write_5m_tokens and stats.totals.cache_read_tokens
    total = next(line for line in captured_logs if line.startswith("INFO Cost: $"))
    assert f"${sum(expected.values()):,.4f} in all" in total
    long_haiku = next(response["usage"] for body, response in results
                      if body["model"] == "claude-haiku-5-5" and len(body["messages"][0]["content"]) > 100_000)
    assert long_haiku["input_tokens"] > 100_000  # the long-prompt tier was exercised


def test_a_price_row_bills_each_kind_of_token_and_the_long_prompt_tier():
    row = app.price_row(3, 15, long_prompt=(200_000, app.price_row(6, 22.5)))
    assert (row.cache_write_5m, row.cache_write_1h, row.cache_read) == (3.75, 6.0, pytest.approx(0.3))
    # 1,000 x 3 + 2,000 x 3.75 + 1,000 x 6 + 10,000 x 0.3 + 2,000 x 15, per million
    assert row.cost(1000, 2000, 1000, 10_000, 2000) == pytest.approx((3000 + 7500 + 6000 + 3000 + 30_000) / 1e6)
    assert row.cost(200_000, 0, 0, 0, 1000) == pytest.approx((200_000 * 3 + 1000 * 15) / 1e6)  # not over
    assert row.cost(150_000, 0, 0, 60_000, 1000) == pytest.approx((150_000 * 6 + 60_000 * 0.6 + 1000 * 22.5) / 1e6)
    assert row.cost(1000, 0, 0, 0, 0, us_only=True) == pytest.approx(0.0033)
    assert row.cost(1000, 0, 0, 0, 1000, batch=True) == pytest.approx((3000 + 15_000) / 2 / 1e6)

    usage = app.ModelUsage()
    usage.add({"input_tokens": 1000, "output_tokens": 2000, "cache_creation_input_tokens": 3000,
               "cache_read_input_tokens": 10_000, "cache_creation": {"ephemeral_1h_input_tokens": 1000}}, row)
    assert (usage.cache_write_5m_tokens, usage.cache_write_1h_tokens) == (2000, 1000)
    assert usage.cost == pytest.approx((3000 + 7500 + 6000 + 3000 + 30_000) / 1e6)
    assert usage.uncached_cost == pytest.approx((14_000 * 3 + 2000 * 15) / 1e6)


def test_prices_match_the_longest_prefix_and_a_file_overrides_them_in_either_form(tmp_path):
    prices = app.load_prices(None)
    assert app.price_for("claude-opus-5-5-20261101", prices).input == 4
    assert app.price_for("claude-opus-5-20260301", prices).input == 5
    assert app.price_for("claude-fable-5-1", prices).cache_read == 0.25
    assert app.price_for("claude-fable-5", prices).cache_read == 1
    assert app.price_for("my-fine-tune", prices) is None
    override = tmp_path / "prices.json"
    override.write_text(json.dumps({
        "claude-sonnet-5-5": {"input": 1.5, "output": 7.5},  # the old two-field form
        "my-fine": {"input": 1, "output": 2, "cache_read": 0.05, "cache_write_1h": 1.5,
                    "long_prompt": {"over": 50_000, "input": 2, "output": 4}},
    }))
    prices = app.load_prices(str(override))
    assert app.price_for("claude-sonnet-5-5", prices) == app.price_row(1.5, 7.5)
    assert app.price_for("claude-sonnet-5-5", prices).cache_write_5m == 1.875
    assert app.price_for("my-fine-tune", prices) == app.price_row(1, 2, None, 1.5, 0.05, (50_000, app.price_row(2, 4)))
    assert app.price_for("claude-haiku-4-5", prices).input == 1  # the rest of the table stays
    for bad in ('{"x": {"input": 1}}', '{"x": {"input": 1, "output": 2, "cache_reads": 1}}', '[1]'):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(app.ConfigError, match="--prices .*claude-sonnet-5-5"):
            app.load_prices(str(tmp_path / "bad.json"))


def test_the_summary_gives_tokens_and_cost_per_model(tmp_path, fake_server, captured_logs):
    fake = fake_server()
    rows = [request("a", 0), request("b", 1), request("c", 2, model="my-own-model")]
    run_in_process(write_jsonl(tmp_path / "r.jsonl", rows), fake)
    sonnet = next(line for line in captured_logs if line.startswith("INFO claude-sonnet-5-5:"))
    assert "2 requests" in sonnet and "40 output" in sonnet and "$0.000" in sonnet
    own = next(line for line in captured_logs if line.startswith("INFO my-own-model:"))
    assert "1 requests" in own and "no price known for my-own-model: give one with --prices" in own
    assert not any(line.startswith("INFO Cost:") for line in captured_logs)  # no total when one model has no price


def test_dry_run_reports_per_model_without_key_or_network_and_writes_nothing(tmp_path):
    example = ROOT / "examples" / "test_caching_requests_to_parallel_process.jsonl"
    lines = example.read_text().splitlines()
    requests_path = tmp_path / "r.jsonl"
    requests_path.write_text("\n".join(lines + [json.dumps(request("plain", 99, model="claude-haiku-4-5"))]) + "\n")

    result = run_cli("--requests_filepath", str(requests_path), "--dry_run", "--request_url", "http://127.0.0.1:9/x")

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "11 line(s) to send, 0 bad" in out and "Nothing was sent" in out
    assert "claude-sonnet-5-5: 10 requests" in out and "1 distinct cached prefix;" in out
    assert "Claude counts about 1.40x" in out and "Claude counts about 1.30x" in out  # per model family
    assert "claude-haiku-4-5: 1 requests" in out
    assert "Estimated cost: $" in out  # the limits are each model's: the 10 Sonnet requests set the duration
    assert "Expected duration: about 0m15s, bound by requests/min (40/min for claude-sonnet-5-5)" in out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r.jsonl"]


def test_dry_run_prices_each_request_at_its_own_tier():
    tokens = app.TokenEstimate(total=90_000)  # 1.4x for Sonnet 5.5, 1.3x here: 117,000 tokens, over Haiku 5.5's 100K
    plan = app.ModelPlan(1.3, app.price_for("claude-haiku-5-5", app.load_prices(None)))
    plan.add(tokens, {"max_tokens": 1000})
    plan.add(app.TokenEstimate(total=1000), {"max_tokens": 1000, "inference_geo": "us"})
    long_cost = (117_000 * 0.5 + 1000 * 2.5) / 1e6
    short_cost = (1300 * 0.1 + 1000 * 0.5) / 1e6 * 1.1
    assert plan.high.cost == pytest.approx(long_cost + short_cost)


def test_dry_run_lists_bad_lines_and_exits_1(tmp_path):
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("ok"), "{broken", {"model": "m", "max_tokens": 1}])
    result = run_cli("--requests_filepath", str(requests_path), "--dry_run", "--max_tokens_per_minute", "auto")
    assert result.returncode == 1
    assert "1 line(s) to send, 2 bad" in result.stdout
    assert "bad line 2: not valid JSON" in result.stdout
    assert "bad line 3: missing or invalid 'messages'" in result.stdout
    assert "cautious starting figures of 'auto'" in result.stdout


def test_dry_run_names_the_binding_limit():
    plan = app.ModelPlan(requests=100)
    plan.high.input_tokens, plan.low.output_tokens = 1_000_000, 25_000
    config = app.Settings(requests_filepath="x.jsonl", max_requests_per_minute=1000, max_tokens_per_minute=100_000)
    assert "bound by input tokens/min (100,000/min)" in app.expected_duration(config, {"m": plan})
    config.max_output_tokens_per_minute = 1000
    assert "bound by output tokens/min (1,000/min)" in app.expected_duration(config, {"m": plan})


def test_the_dry_run_reports_lines_the_api_version_refuses(tmp_path):
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("fine"), request("sampled", temperature=0.5)])

    current = run_cli("--requests_filepath", str(requests_path), "--dry_run")
    older = run_cli("--requests_filepath", str(requests_path), "--dry_run", "--anthropic_version", "2023-06-01")

    assert current.returncode == 1 and "1 line(s) to send, 1 bad" in current.stdout
    assert "line 2: API version 2026-10-21 does not accept 'temperature'" in current.stdout
    assert older.returncode == 1 and "2 line(s) to send, 0 bad" in older.stdout  # sent, and then...
    assert "400 expected: line 2: claude-sonnet-5-5 refuses a non-default 'temperature'" in older.stdout  # ...refused


THINK = {"type": "enabled", "budget_tokens": 2048}


@pytest.mark.parametrize(("model", "extra", "problem"), [
    ("claude-sonnet-5-5", {"temperature": 1.0, "top_p": 1.0}, None),  # the defaults
    ("claude-sonnet-5-5", {"top_k": 1}, "refuses a non-default 'top_k'"),
    ("claude-sonnet-5", {"thinking": THINK}, "refuses manual extended thinking"),
    ("claude-sonnet-5-5-20261001", {"thinking": {"type": "adaptive"}}, None),
    ("claude-opus-5-5", {"thinking": {"type": "disabled"}}, "cannot turn thinking off"),
    ("claude-fable-5-2", {"thinking": THINK}, "cannot turn thinking off or budget it"),
    ("claude-fable-5-1", {"tool_choice": {"type": "any"}}, "refuses a forced tool_choice ('any')"),
    ("claude-mythos-5-2", {"tool_choice": {"type": "tool", "name": "f"}}, "refuses a forced tool_choice ('tool')"),
    ("claude-opus-5-5", {"tool_choice": {"type": "auto"}}, None),
    ("claude-fable-5", {"thinking": {"type": "disabled"}}, None),  # Fable 5 still turns it off
    ("claude-opus-5", {"temperature": 0.2}, None),
])
def test_what_each_model_refuses_is_one_table(model, extra, problem):
    found = app.model_problem(request("x", model=model, **extra))
    assert found == problem if problem is None else problem in found


def test_the_dry_run_counts_what_a_rerun_would_send_and_names_a_misspelt_model(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("a", 0), request("[[always:400]] b", 1)])
    run_in_process(requests_path, fake)
    write_jsonl(tmp_path / "more.jsonl", [request("c", 2, model="claude-sonnet-5.5")])
    with open(requests_path, "a") as file:
        file.write((tmp_path / "more.jsonl").read_text())

    result = run_cli("--requests_filepath", str(requests_path), "--dry_run")
    again = run_cli("--requests_filepath", str(requests_path), "--dry_run", "--retry_failed")

    assert "1 line(s) to send, 0 bad" in result.stdout
    assert "Skipped: 1 line(s) with a result in" in result.stdout and "and 1 that failed for good" in result.stdout
    assert "claude-sonnet-5.5 (first on line 3) is not a model this tool knows: did you mean claude-sonnet-5-5?" \
        in result.stdout
    assert "2 line(s) to send" in again.stdout and "failed for good" not in again.stdout


@pytest.mark.parametrize(("model", "today", "expected"), [
    ("claude-opus-4-1", "2026-11-29",
     (True, "claude-opus-4-1 is retired: the API answers 404 not_found_error to it; use claude-opus-5-5")),
    ("claude-opus-4-20250514", "2020-01-01", True),  # Opus 4 by its dated id: retired before the table's date
    ("claude-sonnet-4-5-20250929", "2026-11-29", False),  # the day before
    ("claude-sonnet-4-5", "2026-11-30", True),  # the day itself
    ("claude-opus-4-5", "2026-11-22", None),  # 61 days ahead: not yet
    ("claude-opus-4-5", "2026-11-23", False),  # 60 days ahead
    ("claude-opus-4-6", "2030-01-01", None),  # no entry covers another model, as a prefix would
    ("claude-sonnet-5-5", "2030-01-01", None),
    ("my-model", "2030-01-01", None),
])
def test_a_model_retired_or_retiring_soon_is_named_with_its_successor(model, today, expected):
    notice = app.retirement_notice(model, app.date.fromisoformat(today))
    assert (notice if notice is None or isinstance(expected, tuple) else notice[0]) == expected
    if notice is not None and not notice[0]:
        assert "retires on" in notice[1] and "from then on the API answers 404" in notice[1]


def test_lines_for_a_retired_model_are_named_by_the_dry_run_and_the_run(tmp_path, fake_server, captured_logs):
    lines = [request(f"q{i}", i, model="claude-opus-4-1-20250805") for i in range(3)] + [request("fine", 3)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", lines)

    dry_run = run_cli("--requests_filepath", str(requests_path), "--dry_run")
    run_in_process(requests_path, fake_server())

    assert dry_run.returncode == 1
    assert ("404 expected: 3 line(s), the first on line 1: claude-opus-4-1-20250805 is retired: the API answers 404 "
            "not_found_error to it; use claude-opus-5-5") in dry_run.stdout
    warnings = [line for line in captured_logs if "is retired" in line]
    assert len(warnings) == 1  # once per model, not per line
    assert warnings[0] == ("WARNING Line 1: claude-opus-4-1-20250805 is retired: the API answers 404 not_found_error "
                           "to it; use claude-opus-5-5.")


def test_the_dry_run_and_the_rerun_skip_the_same_lines(tmp_path, fake_server):
    """Both read through LineReader: every skip rule (answered by bytes, answered by content, a remembered refusal, a
    remembered bad line, a line the API version refuses, a repeat that needs a result of its own) counts alike."""
    fake = fake_server()
    answered, reordered = request("a", 0), request("c", 3)
    first = [answered, request("[[always:400]] b", 1), "{broken", reordered]
    requests_path = write_jsonl(tmp_path / "r.jsonl", first)
    run_in_process(requests_path, fake)
    sent_before = fake.stats.received
    rerun = [answered, request("[[always:400]] b", 1), "{broken", dict(reversed(list(reordered.items()))),
             request("sampled", 4, temperature=0.5), request("d", 5), answered]
    write_jsonl(requests_path, rerun)

    dry = run_cli("--requests_filepath", str(requests_path), "--dry_run")
    stats = run_in_process(requests_path, fake)

    counts = re.search(r"(\d+) line\(s\) to send, (\d+) bad .* Skipped: (\d+) line\(s\) with a result in .*, and (\d+) "
                       r"that failed for good", dry.stdout)
    assert counts is not None, dry.stdout
    assert tuple(map(int, counts.groups())) == (2, 1, 2, 2)
    assert (fake.stats.received - sent_before, stats.bad_lines, stats.already_done, stats.failures_remembered) == (
        2, 1, 2, 2)


def test_the_dry_run_prices_automatic_caching_at_most_half_the_cost_as_written(tmp_path):
    prompt = "Read the contract and answer from it alone. Clause by clause, the parties agree as follows. " * 200
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"Question {i}?", i, system=prompt) for i in range(200)])

    cached = run_cli("--requests_filepath", str(requests_path), "--dry_run")
    as_written = run_cli("--requests_filepath", str(requests_path), "--dry_run", "--auto_cache", "off")

    def estimate(output: str) -> tuple[float, float]:
        low, high = re.search(r"Estimated cost: \$([\d,.]+) to \$([\d,.]+)", output).groups()
        return float(low.replace(",", "")), float(high.replace(",", ""))

    assert cached.returncode == as_written.returncode == 0
    pairs = zip(estimate(cached.stdout), estimate(as_written.stdout))
    assert all(with_it <= 0.5 * without for with_it, without in pairs)
    assert "Automatic caching: a breakpoint on 199 line(s) that share 1 prefix(es)" in cached.stdout
    assert "Automatic caching" not in as_written.stdout and "1 distinct cached prefix;" in cached.stdout


def test_the_dry_run_names_every_model_that_will_404_and_the_model_to_use(tmp_path):
    models = ["claude-3-5-sonnet-20240620", "claude-3-haiku-20240307", "claude-sonnet-4-5", "claude-sonet-5-5",
              "claude-sonnet-5-5"]
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i, model=model) for i, model in
                                                       enumerate(models)])
    result = run_cli("--requests_filepath", str(requests_path), "--dry_run")
    out = result.stdout
    assert result.returncode == 1
    assert "the first on line 1: claude-3-5-sonnet-20240620 is retired: the API answers 404 not_found_error to it; " \
           "use claude-sonnet-5-5" in out
    assert "the first on line 2: claude-3-haiku-20240307 is retired" in out and "use claude-haiku-5-5" in out
    assert "the first on line 3: claude-sonnet-4-5 is retired" in out
    assert "claude-sonet-5-5 (first on line 4) is not a model this tool knows: did you mean claude-sonnet-5-5?" in out


def test_sonnet_5_5_reads_its_cache_at_ten_cents_a_million():
    stats = app.RunStats(prices=app.load_prices(None))
    cost = stats.add_usage("claude-sonnet-5-5", {"input_tokens": 0, "cache_read_input_tokens": 1_000_000,
                                                 "output_tokens": 0})
    assert cost == pytest.approx(0.10)
    assert stats.add_usage("claude-sonnet-5", {"cache_read_input_tokens": 1_000_000}) == pytest.approx(0.20)


def test_the_dry_run_advises_only_where_there_is_something_to_gain(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", [request(f"Essay {i}?", i, max_tokens=20_000) for i in range(500)])
    small = write_jsonl(tmp_path / "small.jsonl", [request("Hi?", 0)])

    defaults = run_cli("--requests_filepath", str(big), "--dry_run").stdout
    given = run_cli("--requests_filepath", str(big), "--dry_run", "--max_requests_per_minute", "4000",
                    "--max_tokens_per_minute", "2000000").stdout
    batched = run_cli("--requests_filepath", str(big), "--dry_run", "--batch").stdout
    tiny = run_cli("--requests_filepath", str(small), "--dry_run", "--max_requests_per_minute", "auto").stdout

    assert "Advice: the duration assumes the default limits (40 requests and 16,000" in defaults
    assert "Advice: with --batch, about $" in defaults and "Advice: with --batch" in given
    assert "default limits" not in given and "Advice" not in batched and "Advice" not in tiny
