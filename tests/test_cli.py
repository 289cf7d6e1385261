"""The command line as a user runs it: flags, defaults, exit codes, messages, and the key kept secret."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import API_KEY, ROOT, cli_args, outputs, read_jsonl, request, run_cli, write_jsonl

import api_request_parallel_processor as app


def test_example_file_end_to_end_keeps_metadata_out_of_the_request(tmp_path, fake_server):
    fake = fake_server()
    requests_path = tmp_path / "test_requests_to_parallel_process.jsonl"
    shutil.copy(ROOT / "examples" / "test_requests_to_parallel_process.jsonl", requests_path)

    result = run_cli("--requests_filepath", str(requests_path), "--request_url", fake.url,
                     "--max_requests_per_minute", "6000", env={"ANTHROPIC_API_KEY": API_KEY})

    assert result.returncode == 0, result.stderr
    results, errors = outputs(requests_path)
    assert errors == []
    assert sorted(record[2]["row_id"] for record in results) == list(range(10))
    for sent, response, metadata in results:
        assert "metadata" not in sent
        assert response["type"] == "message"
        assert sent["messages"][0]["content"] == f"How much is 8 * {metadata['row_id']}?"
    assert all("metadata" not in body for body in fake.stats.bodies_seen)
    assert "Finished after" in result.stderr and "10 succeeded" in result.stderr


def test_record_without_metadata_has_two_elements(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("plain")])
    assert run_cli(*cli_args(fake, requests_path)).returncode == 0
    (record,) = read_jsonl(tmp_path / "r_results.jsonl")
    assert len(record) == 2 and record[0] == request("plain")


def test_key_is_read_from_a_dotenv_file(tmp_path, fake_server):
    fake = fake_server()
    (tmp_path / ".env").write_text(f"ANTHROPIC_API_KEY={API_KEY}\n")
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("hi", 1)])
    result = run_cli("--requests_filepath", "r.jsonl", "--request_url", fake.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(outputs(requests_path)[0]) == 1


@pytest.mark.parametrize(("args", "expected"), [
    ([], "--requests_filepath"),
    (["--requests_filepath", "missing.jsonl", "--api_key", "k"], "requests file not found"),
    (["--requests_filepath", "r.jsonl"], "no API key"),
    (["--requests_filepath", "r.jsonl", "--api_key", "k", "--max_attempts", "0"], "--max_attempts"),
    (["--requests_filepath", "r.jsonl", "--api_key", "k", "--max_requests_per_minute", "fast"], "expected a number"),
    (["--requests_filepath", "r.jsonl", "--api_key", "k", "--max_tokens_per_minute", "-5"], "positive"),
    (["--requests_filepath", "r.jsonl", "--api_key", "k", "--logging_level", "LOUD"], "logging_level"),
    (["--requests_filepath", "r.jsonl", "--api_key", "k", "--use_caching", "maybe"], "--use_caching"),
    (["--requests_filepath", "r.jsonl", "--api_key", "k", "--no_such_flag", "1"], "unrecognized"),
    (["--requests_filepath", "r.jsonl", "--api_key", "k", "--request_url", "api.anthropic.com/v1"], "https://"),
    (["--requests_filepath", "r.jsonl", "--api_key", "k", "--request_url", "https:///v1/messages"], "no host"),
    (["--requests_filepath", "r.jsonl", "--api_key", "k", "--request_url", "https://x:port/v1"], "cannot be used"),
])
def test_usage_errors_give_one_line_and_exit_2(tmp_path, args, expected):
    write_jsonl(tmp_path / "r.jsonl", [request("hi")])
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_unwritable_results_path_is_a_usage_error(tmp_path):
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("hi")])
    (tmp_path / "blocker").write_text("a file, not a folder")
    result = run_cli("--requests_filepath", str(requests_path), "--api_key", "k",
                     "--save_filepath", str(tmp_path / "blocker" / "out.jsonl"))
    assert result.returncode == 2 and "cannot write results" in result.stderr
    assert "Traceback" not in result.stderr


def test_flags_and_defaults_match_the_cookbook_script():
    parsed = app.build_argument_parser().parse_args(["--requests_filepath", "data/x.jsonl"])
    assert parsed.save_filepath is None
    assert parsed.request_url == "https://api.anthropic.com/v1/messages"
    assert parsed.max_requests_per_minute == 40
    assert parsed.max_tokens_per_minute == 16_000
    assert parsed.max_attempts == 5
    assert app.parse_logging_level(parsed.logging_level) == 20
    assert parsed.use_caching is False
    assert app.Settings(requests_filepath="data/x.jsonl").save_filepath == "data/x_results.jsonl"
    assert app.Settings(requests_filepath="data/x.jsonl").errors_filepath == "data/x_results_errors.jsonl"
    assert app.Settings(requests_filepath="data/x.txt").save_filepath == "data/x.txt_results.jsonl"
    assert app.parse_logging_level("10") == 10 and app.parse_logging_level("trace") == 5


@pytest.mark.parametrize(("value", "expected"), [
    (None, True), ("True", True), ("yes", True), ("1", True), ("False", False), ("no", False), ("0", False),
])
def test_use_caching_accepts_the_seed_spellings(value, expected):
    extra = ["--use_caching"] + ([value] if value is not None else [])
    parsed = app.build_argument_parser().parse_args(["--requests_filepath", "x.jsonl", *extra])
    assert parsed.use_caching is expected


def test_exit_code_1_when_a_request_fails_and_0_when_all_succeed(tmp_path, fake_server):
    fake = fake_server()
    good = write_jsonl(tmp_path / "good.jsonl", [request("a"), request("b")])
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [request("a"), request("[[always:400]]")])
    assert run_cli(*cli_args(fake, good)).returncode == 0
    result = run_cli(*cli_args(fake, mixed))
    assert result.returncode == 1
    assert "see " + str(tmp_path / "mixed_results_errors.jsonl") in result.stderr


def test_rejected_key_stops_the_run_with_exit_2_and_every_line_accounted_for(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(30)])
    args = cli_args(fake, requests_path, "--max_requests_per_minute", "60")  # a burst of one
    args[args.index(API_KEY)] = "sk-ant-wrong-key-abcdef"
    result = run_cli(*args)
    assert result.returncode == 2
    assert "the API rejected the key" in result.stderr and "Traceback" not in result.stderr
    assert fake.stats.received <= 2  # it stopped instead of trying all 30 lines
    results, errors = outputs(requests_path)
    assert results == []
    assert sorted(record[2]["row"] for record in errors) == list(range(30))
    assert "sk-ant-wrong-key-abcdef" not in result.stderr + (tmp_path / "r_results_errors.jsonl").read_text()


def test_api_key_never_appears_in_logs_or_files_even_at_trace(tmp_path, fake_server):
    fake = fake_server()
    rows = [request("ok", 0), request("[[fault:529x1]]", 1), request("[[always:400]]", 2), "{not json"]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)
    result = run_cli(*cli_args(fake, requests_path, "--logging_level", "TRACE"))
    assert result.returncode == 1
    assert "TRACE" in result.stderr and "DEBUG" in result.stderr  # the most verbose level really was on
    written = "".join(path.read_text() for path in tmp_path.glob("*.jsonl"))
    assert API_KEY not in result.stderr + result.stdout + written
    assert all(headers.get("x-api-key") == API_KEY for headers in fake.stats.headers_seen)


def test_redact_hides_the_key_in_any_message():
    assert app.redact(f"echoed {API_KEY} back", API_KEY) == "echoed [redacted] back"
    assert repr(app.Settings(requests_filepath="x.jsonl", api_key=API_KEY)).count(API_KEY) == 0


@pytest.mark.parametrize("package", ["aiohttp", "tiktoken", "loguru", "dotenv"])
def test_a_missing_dependency_is_one_line_not_a_traceback(package):
    hide_package = (f"import runpy, sys; sys.modules[{package!r}] = None; sys.argv = ['x', '--help']; "
                    f"runpy.run_path({str(ROOT / 'api_request_parallel_processor.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide_package], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    expected = f"error: the package {package!r} is not installed: run  pip install -r requirements.txt"
    assert result.stderr.strip() == expected


def test_an_unresolvable_host_stops_the_run_at_once_with_exit_2_and_leaves_every_line(tmp_path, fake_server):
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(5)])
    started = time.monotonic()
    result = run_cli("--requests_filepath", str(requests_path), "--api_key", API_KEY,
                     "--request_url", "https://api.anthropic.invalid/v1/messages")
    assert result.returncode == 2 and time.monotonic() - started < 10
    (line,) = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert "Cannot use https://api.anthropic.invalid/v1/messages: the host name does not resolve" in line
    assert app.without_userinfo("https://user:secret@proxy.example:8443/v1/messages?x=1") == \
        "https://proxy.example:8443/v1/messages?x=1"
    assert "unencrypted" not in result.stderr and "Traceback" not in result.stderr
    assert outputs(requests_path) == ([], [])  # nothing failed: every line is left for the next run

    fake = fake_server()
    assert run_cli(*cli_args(fake, requests_path)).returncode == 0
    assert len(outputs(requests_path)[0]) == 5


def test_plain_http_to_another_host_draws_one_warning_before_anything_is_sent(tmp_path, fake_server):
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("hi")])
    result = run_cli("--requests_filepath", str(requests_path), "--api_key", API_KEY,
                     "--request_url", "http://api.anthropic.invalid/v1/messages")
    warnings = [line for line in result.stderr.splitlines() if "unencrypted" in line]
    assert len(warnings) == 1 and "plain http:// to api.anthropic.invalid" in warnings[0]
    assert result.stderr.index("unencrypted") < result.stderr.index("Cannot use")
    for url, host in (("http://localhost:8080/v1", None), ("http://127.0.0.5/v1", None), ("http://[::1]:80/v1", None),
                      ("https://proxy.example/v1", None), ("http://10.0.0.8/v1", "10.0.0.8"),
                      ("http://proxy.internal/v1", "proxy.internal")):
        assert app.unencrypted_host(url) == host, url
    fake = fake_server()
    assert "unencrypted" not in run_cli(*cli_args(fake, requests_path)).stderr


def test_help_shows_every_default_and_the_exit_codes():
    result = run_cli("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for default in ("(default: 40)", "(default: 16000)", "(default: 5)", "(default: INFO)", "(default: 600.0)",
                    "(default: https://api.anthropic.com/v1/messages)", "(default: 100000)"):
        assert default in text, default
    assert "exit codes: 0 every line succeeded" in text and "5 stopped at the budget" in text


def test_a_wrong_path_or_a_port_where_nothing_listens_stops_at_once_with_nothing_failed(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(5)])
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        idle_port = probe.getsockname()[1]
    for url, problem in ((fake.url.removesuffix("/messages"), "HTTP 404 from something that is not the Messages API"),
                         (f"http://127.0.0.1:{idle_port}/v1/messages", "nothing listens at that port")):
        started = time.monotonic()
        result = run_cli("--requests_filepath", str(requests_path), "--api_key", API_KEY, "--request_url", url)
        assert result.returncode == 2 and time.monotonic() - started < 10, result.stderr
        assert problem in result.stderr and "check --request_url" in result.stderr
        assert outputs(requests_path) == ([], [])  # nothing failed: every line is left for the next run
    assert run_cli(*cli_args(fake, requests_path)).returncode == 0  # the right address answers them all
    assert len(outputs(requests_path)[0]) == 5


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path, fake_server):
    fake = fake_server()
    requests_path = tmp_path / "r.jsonl"
    requests_path.write_bytes(b"\xef\xbb\xbf" + json.dumps(request("q", 0)).encode() + b"\r\n")
    assert run_cli(*cli_args(fake, requests_path)).returncode == 0
    assert len(outputs(requests_path)[0]) == 1


def test_a_csv_of_ones_own_rows_becomes_a_requests_file_in_one_command(tmp_path, fake_server):
    rows = tmp_path / "reviews.csv"
    with open(rows, "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "text", "stars"])
        writer.writerow(["1", 'Great, "really" great 🎉', "5"])
        writer.writerow(["2", "Two lines,\nof text", "3"])
        writer.writerow(["3", "Plain", "1"])
    (tmp_path / "prompt.txt").write_text("Classify the review as positive or negative.", encoding="utf-8")

    made = subprocess.run([sys.executable, str(ROOT / "examples" / "rows_to_requests.py"), str(rows), "--template",
                           "Review {id}: {text}", "--system", str(tmp_path / "prompt.txt"), "--metadata", "id,stars"],
                          capture_output=True, text=True, check=False)
    refused = run_cli("--requests_filepath", str(rows), "--api_key", API_KEY)

    assert made.returncode == 0, made.stderr
    requests = read_jsonl(tmp_path / "reviews_requests.jsonl")
    assert [request["messages"][0]["content"] for request in requests] == [
        'Review 1: Great, "really" great 🎉', "Review 2: Two lines,\nof text", "Review 3: Plain"]
    assert requests[0]["system"] == "Classify the review as positive or negative."
    assert [request["metadata"] for request in requests] == [{"id": "1", "stars": "5"}, {"id": "2", "stars": "3"},
                                                             {"id": "3", "stars": "1"}]
    assert refused.returncode == 2 and "examples/rows_to_requests.py turns a CSV into one" in refused.stderr
    fake = fake_server()
    assert run_cli(*cli_args(fake, tmp_path / "reviews_requests.jsonl")).returncode == 0
    missing = subprocess.run([sys.executable, str(ROOT / "examples" / "rows_to_requests.py"), str(rows),
                              "--template", "{review}"], capture_output=True, text=True, check=False)
    assert missing.returncode == 2 and "row 1 has no column 'review'" in missing.stderr


@pytest.mark.parametrize("script", ["generate_requests.py", "generate_caching_requests.py", "rows_to_requests.py"])
def test_each_example_scripts_help_is_whole_and_writes_nothing(script):
    before = {path: path.stat().st_mtime_ns for path in (ROOT / "examples").iterdir()}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--help"], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith("usage:")
    description = result.stdout.split("\n\n")[1]
    assert description.rstrip().endswith((".", ")")), description
    assert {path: path.stat().st_mtime_ns for path in (ROOT / "examples").iterdir()} == before


def test_the_fake_can_be_made_realistic_from_its_command_line_and_reports_what_it_served(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    helped = subprocess.run([sys.executable, str(ROOT / "tests" / "fake_anthropic.py"), "--help"],
                            capture_output=True, text=True, check=False).stdout
    assert all(flag in helped for flag in ("--latency", "--requests_per_minute", "--input_tokens_per_minute",
                                           "--output_tokens_per_minute", "--output_tokens", "--fault_rate"))
    assert "answered twice" in " ".join(helped.split())
    fake = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_anthropic.py"), "--port", str(port),
                             "--latency", "0.01", "0.03", "--requests_per_minute", "6000", "--output_tokens", "5"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert "/_stats" in fake.stdout.readline()
        requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(20)])
        url = f"http://127.0.0.1:{port}/v1/messages"
        assert run_cli("--requests_filepath", str(requests_path), "--request_url", url, "--api_key", API_KEY,
                       "--max_requests_per_minute", "6000").returncode == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=10) as answer:
            served = json.loads(answer.read())
        assert (served["received"], served["answered"], served["answered_twice"]) == (20, 20, 0)
        assert all(record[1]["usage"]["output_tokens"] == 5 for record in outputs(requests_path)[0])
    finally:
        fake.terminate()
        last = fake.communicate(timeout=30)[0].strip().splitlines()[-1]
    assert last.startswith("Served: ") and json.loads(last.removeprefix("Served: "))["answered"] == 20
