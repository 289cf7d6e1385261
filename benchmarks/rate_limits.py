"""How close to its rate limits the processor runs, and how many 429s that costs.

Starts the tests' fake server with the limits of each scenario (input tokens counted 1.3x what
cl100k_base counts, a 5-second burst allowance, 0.2-0.4 s latency), runs the processor against it, and
prints the steady rate of the binding limit as a fraction of that limit (the first 5 seconds, the ramp-up,
left out) and the share of requests that drew a 429. Last, 20 seconds in which the fake answers every
request with a 429, then recovers: prints how many lines were answered and how many failed.

    python benchmarks/rate_limits.py [--seconds 25] [--only NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import API_KEY, MODEL, write_jsonl_rows
from fake_anthropic import FakeConfig, ServerThread

import api_request_parallel_processor as app

RAMP_UP_SECONDS = 5.0
PARAGRAPH = "The committee reviewed the quarterly figures and asked for a short summary of the main risks. "


@dataclass
class Scenario:
    name: str
    binding: str  # "requests", "input" or "output"
    limit: float  # the fake's real per-minute limit of the binding kind
    fake: dict[str, Any]
    flags: dict[str, Any]
    request_words: int = 1  # paragraphs per request
    max_tokens: int = 64
    per_second: float = 10.0  # expected requests per second at the limit, to size the file
    extra: dict[str, Any] = field(default_factory=dict)


SCENARIOS = [
    Scenario("requests/min bound", "requests", 600, {"requests_per_minute": 600},
             {"max_requests_per_minute": 600, "max_tokens_per_minute": 10_000_000}),
    Scenario("input tokens/min bound", "input", 60_000, {"input_tokens_per_minute": 60_000},
             {"max_requests_per_minute": 100_000, "max_tokens_per_minute": 60_000}, request_words=12, per_second=4),
    Scenario("output tokens/min bound, charged as produced", "output", 30_000,
             {"output_tokens_per_minute": 30_000, "output_tokens": 100, "output_charging": "produced"},
             {"max_requests_per_minute": 100_000, "max_tokens_per_minute": 10_000_000,
              "max_output_tokens_per_minute": 30_000}, max_tokens=1024, per_second=5),
    Scenario("output tokens/min bound, max_tokens charged up front", "output", 30_000,
             {"output_tokens_per_minute": 30_000, "output_tokens": 100, "output_charging": "max_tokens"},
             {"max_requests_per_minute": 100_000, "max_tokens_per_minute": 10_000_000,
              "max_output_tokens_per_minute": 30_000}, max_tokens=1024, per_second=5),
    Scenario("output bound, no output flag, charged as produced", "output", 30_000,
             {"output_tokens_per_minute": 30_000, "output_tokens": 100, "output_charging": "produced"},
             {"max_requests_per_minute": 100_000, "max_tokens_per_minute": 10_000_000}, max_tokens=1024, per_second=5),
    Scenario("output bound, no output flag, max_tokens charged up front", "output", 30_000,
             {"output_tokens_per_minute": 30_000, "output_tokens": 100, "output_charging": "max_tokens"},
             {"max_requests_per_minute": 100_000, "max_tokens_per_minute": 10_000_000}, max_tokens=1024, per_second=5),
    Scenario("output bound, no flag, max_tokens held, 2-3 s answers (at most 2 fit in flight: ~16%)", "output", 30_000,
             {"output_tokens_per_minute": 30_000, "output_tokens": 100, "output_charging": "max_tokens",
              "latency": (2.0, 3.0)},
             {"max_requests_per_minute": 100_000, "max_tokens_per_minute": 10_000_000}, max_tokens=1024, per_second=5),
    Scenario("output bound, no flag, charged as produced, 2-3 s answers", "output", 30_000,
             {"output_tokens_per_minute": 30_000, "output_tokens": 100, "output_charging": "produced",
              "latency": (2.0, 3.0)},
             {"max_requests_per_minute": 100_000, "max_tokens_per_minute": 10_000_000}, max_tokens=1024, per_second=5),
    Scenario("two models, each its own limit, flags at it", "requests", 1200,
             {"requests_per_minute": 600, "per_model_limits": True},
             {"max_requests_per_minute": 600, "max_tokens_per_minute": 10_000_000}, per_second=20,
             extra={"models": 2}),
    Scenario("two models, each its own limit, auto", "requests", 1200,
             {"requests_per_minute": 600, "input_tokens_per_minute": 200_000, "per_model_limits": True},
             {"max_requests_per_minute": "auto", "max_tokens_per_minute": "auto"}, per_second=20,
             extra={"models": 2}),
    Scenario("two model names sharing one limit, flags at it", "requests", 600,
             {"requests_per_minute": 600, "per_model_limits": True,
              "model_classes": {"claude-sonnet-5-5": "sonnet-5", "claude-sonnet-5": "sonnet-5"}},
             {"max_requests_per_minute": 600, "max_tokens_per_minute": 10_000_000},
             extra={"models": 2, "names": ["claude-sonnet-5-5", "claude-sonnet-5"]}),
    Scenario("flags at twice the real limits", "requests", 600,
             {"requests_per_minute": 600, "input_tokens_per_minute": 200_000, "output_tokens_per_minute": 100_000},
             {"max_requests_per_minute": 1200, "max_tokens_per_minute": 400_000,
              "max_output_tokens_per_minute": 200_000}),
    Scenario("flags at twice the real limits, no rate-limit headers", "requests", 600,
             {"requests_per_minute": 600, "input_tokens_per_minute": 200_000, "output_tokens_per_minute": 100_000,
              "rate_limit_headers": False},
             {"max_requests_per_minute": 1200, "max_tokens_per_minute": 400_000,
              "max_output_tokens_per_minute": 200_000}),
    Scenario("auto: no limits given", "requests", 600,
             {"requests_per_minute": 600, "input_tokens_per_minute": 200_000, "output_tokens_per_minute": 100_000},
             {"max_requests_per_minute": "auto", "max_tokens_per_minute": "auto",
              "max_output_tokens_per_minute": "auto"}),
]


def measure(scenario: Scenario, seconds: float, folder: Path) -> str:
    count = int(scenario.per_second * seconds)
    models = scenario.extra.get("names") or [MODEL, "claude-haiku-5-5"][: scenario.extra.get("models", 1)]
    rows = [{"model": models[i % len(models)], "max_tokens": scenario.max_tokens,
             "messages": [{"role": "user", "content": f"Request {i}. " + PARAGRAPH * scenario.request_words}]}
            for i in range(count)]
    requests_path = write_jsonl_rows(folder / f"scenario{SCENARIOS.index(scenario)}.jsonl", rows)
    config = FakeConfig(**{"burst_seconds": 5, "token_ratio": 1.3, "latency": (0.2, 0.4), **scenario.fake})
    with ServerThread(config) as fake:
        stats = asyncio.run(app.process_api_requests_from_file(
            str(requests_path), request_url=fake.url, api_key=API_KEY, logging_level="ERROR", **scenario.flags))
        admitted = fake.stats.admitted_usage
        rate_limited = fake.stats.rate_limited
    start = admitted[0][0] + RAMP_UP_SECONDS
    steady = [entry for entry in admitted if entry[0] >= start]
    duration = steady[-1][0] - start
    index = {"requests": None, "input": 1, "output": 2}[scenario.binding]
    amount = len(steady) if index is None else sum(entry[index] for entry in steady)
    achieved = amount / duration * 60
    sent = len(admitted) + rate_limited
    return (f"{scenario.name:<55} steady {achieved:>9,.0f}/min of {scenario.limit:>7,.0f} = "
            f"{achieved / scenario.limit:5.1%}   429s {rate_limited:>3} of {sent:>4} requests = "
            f"{rate_limited / sent:5.1%}   ({stats.succeeded} succeeded, input ratio learned "
            f"{', '.join(f'{ratio:.2f}' for ratio in stats.input_ratios.values())})")


def throttled(seconds: float, folder: Path) -> str:
    """The API answers every request with a 429 for `seconds` (another program took the whole limit), then
    recovers: every line must end with a result, none in the errors file, exit code 0."""
    rows = [{"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": f"Request {i}."}]}
            for i in range(200)]
    requests_path = write_jsonl_rows(folder / "throttled.jsonl", rows)
    with ServerThread(FakeConfig(throttled_seconds=seconds, requests_per_minute=600, latency=(0.2, 0.4))) as fake:
        stats = asyncio.run(app.process_api_requests_from_file(
            str(requests_path), request_url=fake.url, api_key=API_KEY, logging_level="ERROR",
            max_requests_per_minute=600))
        rate_limited = fake.stats.rate_limited
    errors = Path(app.default_save_filepath(str(requests_path))[: -len(".jsonl")] + "_errors.jsonl")
    return (f"{f'{seconds:g} s of nothing but 429s, then recovery':<55} {stats.succeeded} of 200 answered, "
            f"{0 if not errors.exists() else len(errors.read_text().splitlines())} in the errors file, "
            f"{rate_limited} 429s, exit code {stats.exit_code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=25.0, help="length of each scenario at its limit")
    parser.add_argument("--only", help="run only the scenarios whose name contains this")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for scenario in SCENARIOS:
            if args.only is None or args.only in scenario.name:
                print(measure(scenario, args.seconds, Path(folder)), flush=True)
        if args.only is None or args.only in "429s":
            print(throttled(20.0, Path(folder)), flush=True)


if __name__ == "__main__":
    main()
