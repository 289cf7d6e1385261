"""Usage and cost per model, the price table and its override, and the dry run."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, request, run_cli, run_in_process, write_jsonl

import api_request_parallel_processor as app


def test_cost_applies_the_cache_multipliers():
    usage = app.ModelUsage()
    usage.add({"input_tokens": 1000, "output_tokens": 2000, "cache_creation_input_tokens": 3000,
               "cache_read_input_tokens": 10_000, "cache_creation": {"ephemeral_1h_input_tokens": 1000}})
    assert (usage.cache_write_5m_tokens, usage.cache_write_1h_tokens) == (2000, 1000)
    price = app.Price(input=3, output=15)
    # 1,000 x 3 + 2,000 x 3 x 1.25 + 1,000 x 3 x 2 + 10,000 x 3 x 0.1 + 2,000 x 15, per million
    assert app.usage_cost(usage, price) == pytest.approx((3000 + 7500 + 6000 + 3000 + 30_000) / 1e6)
    assert app.uncached_cost(usage, price) == pytest.approx((14_000 * 3 + 2000 * 15) / 1e6)


def test_prices_match_the_longest_prefix_and_a_file_overrides_them(tmp_path):
    prices = app.load_prices(None)
    assert app.price_for("claude-sonnet-4-5-20250929", prices) == app.Price(3, 15)
    assert app.price_for("claude-opus-4-1-20250805", prices) == app.Price(15, 75)
    assert app.price_for("claude-opus-4-5", prices) == app.Price(5, 25)
    assert app.price_for("my-fine-tune", prices) is None
    override = tmp_path / "prices.json"
    override.write_text(json.dumps({"claude-sonnet-4-5": {"input": 1.5, "output": 7.5}, "my-fine": {"input": 1,
                                                                                                   "output": 2}}))
    prices = app.load_prices(str(override))
    assert app.price_for("claude-sonnet-4-5", prices) == app.Price(1.5, 7.5)
    assert app.price_for("my-fine-tune", prices) == app.Price(1, 2)
    (tmp_path / "bad.json").write_text('{"x": {"input": 1}}')
    with pytest.raises(app.ConfigError, match="--prices"):
        app.load_prices(str(tmp_path / "bad.json"))


def test_the_summary_gives_tokens_and_cost_per_model(tmp_path, fake_server, captured_logs):
    fake = fake_server()
    rows = [request("a", 0), request("b", 1), request("c", 2, model="my-own-model")]
    run_in_process(write_jsonl(tmp_path / "r.jsonl", rows), fake)
    sonnet = next(line for line in captured_logs if line.startswith("INFO claude-sonnet-4-5:"))
    assert "2 requests" in sonnet and "40 output" in sonnet and "$0.000" in sonnet
    own = next(line for line in captured_logs if line.startswith("INFO my-own-model:"))
    assert "1 requests" in own and "no price known for my-own-model: give one with --prices" in own


def test_dry_run_reports_per_model_without_key_or_network_and_writes_nothing(tmp_path):
    example = ROOT / "examples" / "test_caching_requests_to_parallel_process.jsonl"
    lines = example.read_text().splitlines()
    requests_path = tmp_path / "r.jsonl"
    requests_path.write_text("\n".join(lines + [json.dumps(request("plain", 99, model="claude-haiku-4-5"))]) + "\n")

    result = run_cli("--requests_filepath", str(requests_path), "--dry_run", "--request_url", "http://127.0.0.1:9/x")

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "11 valid lines, 0 bad" in out and "Nothing was sent" in out
    assert "claude-sonnet-4-5: 10 requests" in out and "1 distinct cached prefix;" in out
    assert "claude-haiku-4-5: 1 requests" in out
    assert "Estimated cost: $" in out and "Expected duration: about 0m16s, bound by requests/min (40/min)" in out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r.jsonl"]


def test_dry_run_lists_bad_lines_and_exits_1(tmp_path):
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("ok"), "{broken", {"model": "m", "max_tokens": 1}])
    result = run_cli("--requests_filepath", str(requests_path), "--dry_run", "--max_tokens_per_minute", "auto")
    assert result.returncode == 1
    assert "1 valid lines, 2 bad" in result.stdout
    assert "bad line 2: not valid JSON" in result.stdout and "bad line 3: missing or invalid 'messages'" in result.stdout
    assert "cautious starting figures of 'auto'" in result.stdout


def test_dry_run_names_the_binding_limit():
    plans = {"m": app.ModelPlan(requests=100, input_tokens=1_000_000, max_output_tokens=100_000)}
    config = app.Settings(requests_filepath="x.jsonl", max_requests_per_minute=1000, max_tokens_per_minute=100_000)
    assert "bound by input tokens/min (100,000/min)" in app.expected_duration(config, plans)
    config.max_output_tokens_per_minute = 1000
    assert "bound by output tokens/min (1,000/min)" in app.expected_duration(config, plans)
