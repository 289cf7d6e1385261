"""Cron-grade runs: resume after a kill, graceful stop on signals, the run lock, progress output."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import random
import signal
import struct
import subprocess
import sys
import termios
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import API_KEY, SCRIPT, cli_args, outputs, read_jsonl, request, run_cli, run_in_process, write_jsonl

import api_request_parallel_processor as app


def start_cli(*args: str) -> subprocess.Popen[str]:
    env = {key: value for key, value in os.environ.items() if key != "ANTHROPIC_API_KEY"}
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def result_rows(path: Path) -> Counter[int]:
    """Rows in the results file; every line must parse."""
    return Counter(record[2]["row"] for record in read_jsonl(path))


def test_sigkill_at_a_random_moment_then_rerun_gives_every_line_exactly_once(tmp_path, fake_server):
    fake = fake_server(latency=(0.02, 0.1))
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(1500)])
    args = cli_args(fake, requests_path, "--max_requests_per_minute", "30000")
    kill_after = random.Random(1500).uniform(0.3, 2.0)  # seeded: the same moment on every run of the suite

    process = start_cli(*args)
    wait_until(lambda: fake.stats.received > 0)
    time.sleep(kill_after)
    process.kill()
    process.wait()
    time.sleep(0.3)  # let the fake finish answering what was in flight
    results_path = tmp_path / "r_results.jsonl"
    saved_before = results_path.read_bytes().count(b"\n")
    answered_before = sum(fake.stats.answered.values())
    assert 0 < saved_before < 1500, f"the kill at {kill_after:.2f} s should land mid-run"

    rerun = run_cli(*args)

    assert rerun.returncode == 0, rerun.stderr
    assert result_rows(results_path) == Counter(range(1500))  # each exactly once, every line parses
    assert f"holds {saved_before:,} results from earlier runs" in rerun.stderr
    in_flight_at_kill = answered_before - saved_before
    assert fake.stats.paid_twice <= in_flight_at_kill, f"killed at {kill_after:.2f} s"


@pytest.mark.parametrize(("signal_number", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130),
                                                               (signal.SIGHUP, 129)])
def test_a_signal_stops_gracefully_and_the_rerun_pays_nothing_twice(tmp_path, fake_server, signal_number, exit_code):
    fake = fake_server(latency=(1.0, 1.0))
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(25)])
    args = cli_args(fake, requests_path, "--max_requests_per_minute", "600", "--grace_period", "5")

    process = start_cli(*args)
    wait_until(lambda: fake.stats.received >= 5)
    signalled = time.monotonic()
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=10)
    stopped_within = time.monotonic() - signalled

    assert process.returncode == exit_code, stderr
    assert stopped_within < 5, "it must stop within the grace period"
    assert f"{signal_number.name}: sending no new requests" in stderr and "Run the same command again" in stderr
    assert "Traceback" not in stderr
    results_path = tmp_path / "r_results.jsonl"
    answered = sum(fake.stats.answered.values())
    assert len(read_jsonl(results_path)) == answered < 25  # every answered request was saved
    received_before = fake.stats.received

    rerun = run_cli(*args, "--max_requests_per_minute", "60000")  # the rerun's pace does not matter here

    assert rerun.returncode == 0, rerun.stderr
    assert result_rows(results_path) == Counter(range(25))
    assert fake.stats.paid_twice == 0
    assert fake.stats.received - received_before == 25 - answered


def test_a_second_signal_stops_at_once(tmp_path, fake_server):
    fake = fake_server(latency=(3.0, 3.0))
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(10)])
    process = start_cli(*cli_args(fake, requests_path, "--grace_period", "30"))
    wait_until(lambda: fake.stats.received >= 3)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 143 and time.monotonic() - started < 2, stderr
    assert "SIGTERM again: stopping now" in stderr and "abandoned" in stderr


def test_appended_lines_are_the_only_ones_sent_on_rerun(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"old {i}", i) for i in range(50)])
    assert run_in_process(requests_path, fake).succeeded == 50
    with open(requests_path, "a") as file:
        file.writelines(json.dumps(request(f"new {i}", i)) + "\n" for i in range(50, 150))

    stats = run_in_process(requests_path, fake)

    assert fake.stats.received == 150  # 50, then exactly the 100 new ones
    assert stats.already_done == 50 and stats.succeeded == 100
    assert result_rows(tmp_path / "r_results.jsonl") == Counter(range(150))


def test_repeats_and_reordering_are_matched_by_content(tmp_path, fake_server):
    fake = fake_server()
    rows = [request("same question")] * 3 + [request(f"other {i}", i) for i in range(5)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)
    run_in_process(requests_path, fake)
    assert len(read_jsonl(tmp_path / "r_results.jsonl")) == 8  # three results for the three repeats

    write_jsonl(requests_path, list(reversed(rows)) + [request("same question")])  # reordered, plus a 4th repeat
    stats = run_in_process(requests_path, fake)

    assert stats.already_done == 8 and stats.succeeded == 1 and fake.stats.received == 9
    assert sum(1 for record in read_jsonl(tmp_path / "r_results.jsonl") if len(record) == 2) == 4


def test_a_torn_last_line_is_repaired_and_its_request_sent_again(tmp_path, fake_server, captured_logs):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(5)])
    run_in_process(requests_path, fake)
    results_path = tmp_path / "r_results.jsonl"
    content = results_path.read_bytes()
    last_start = content.rstrip(b"\n").rfind(b"\n") + 1
    results_path.write_bytes(content[: last_start + (len(content) - last_start) // 2])  # a kill mid-write
    torn_row = json.loads(content[last_start:])[2]["row"]

    stats = run_in_process(requests_path, fake)

    assert stats.succeeded == 1 and fake.stats.received == 6
    assert result_rows(results_path) == Counter(range(5))
    assert any("Removed a torn last line" in line for line in captured_logs)
    assert fake.stats.bodies_seen[-1]["messages"][0]["content"] == f"q{torn_row}"


def test_transient_failures_are_sent_again_by_the_next_run(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("[[fault:502x2]] flaky", 0), request("fine", 1)])
    first = run_in_process(requests_path, fake, max_attempts=2)
    assert first.failed == 1 and first.exit_code == 1 and len(outputs(requests_path)[1]) == 1

    second = run_in_process(requests_path, fake, max_attempts=2)

    assert second.succeeded == 1 and second.already_done == 1 and second.exit_code == 0
    results, errors = outputs(requests_path)
    assert errors == [] and not (tmp_path / "r_results_errors.jsonl").exists()
    assert sorted(record[2]["row"] for record in results) == [0, 1]


def failing_file(tmp_path: Path) -> Path:
    """Two requests the API refuses, a line that is not JSON, and two fine ones."""
    return write_jsonl(tmp_path / "r.jsonl", [request("[[always:400]] refused", 0), request("fine", 1), "{oops",
                                              request("[[always:404]] not found", 2), request("fine too", 3)])


def test_the_lines_own_failures_are_remembered_and_not_paid_for_again(tmp_path, fake_server, captured_logs):
    fake = fake_server()
    requests_path = failing_file(tmp_path)

    runs = [run_in_process(requests_path, fake) for _ in range(3)]

    assert [stats.exit_code for stats in runs] == [1, 0, 0]  # only the run that wrote new failures says 1
    assert fake.stats.received == 4  # the two refused lines were sent once in all
    assert [(stats.failed, stats.bad_lines, stats.failures_remembered) for stats in runs] == [(2, 1, 0), (0, 0, 3),
                                                                                                (0, 0, 3)]
    errors = outputs(requests_path)[1]
    assert sorted(record[3]["line"] for record in errors) == [1, 3, 4]  # each record kept once
    assert all(record[3]["permanent"] for record in errors)
    assert sum("3 line(s) failed in an earlier run" in line and "--retry_failed" in line for line in captured_logs) == 2

    again = run_in_process(requests_path, fake, retry_failed=True)

    assert again.exit_code == 1 and (again.failed, again.bad_lines, again.failures_remembered) == (2, 1, 0)
    assert fake.stats.received == 6 and len(outputs(requests_path)[1]) == 3


def test_a_failed_line_changed_since_is_sent_and_its_old_record_dropped(tmp_path, fake_server):
    fake = fake_server()
    requests_path = failing_file(tmp_path)
    run_in_process(requests_path, fake)
    lines = requests_path.read_text().splitlines()
    lines[2] = json.dumps(request("fixed", 9))  # the line that was not JSON, mended
    lines.insert(0, json.dumps(request("[[always:400]] refused", 0)))  # a repeat needs its own record
    requests_path.write_text("\n".join(lines) + "\n")

    stats = run_in_process(requests_path, fake)

    assert (stats.succeeded, stats.failed, stats.failures_remembered, stats.exit_code) == (1, 1, 2, 1)
    results, errors = outputs(requests_path)
    assert sorted(record[2]["row"] for record in results) == [1, 3, 9]
    assert sorted(record[2]["row"] for record in errors) == [0, 0, 2]  # the mended line's record is gone
    assert run_in_process(requests_path, fake).exit_code == 0


def test_an_errors_file_with_other_lines_keeps_only_the_permanent_records(tmp_path):
    path = tmp_path / "e.jsonl"
    kept = '["x", ["line 1: bad"], null, {"line": 1, "permanent": true}]'
    lines = ['{"a": 1, "b": 2, "c": 3, "d": 4}', "[1, 2, 3, 4]", "not json", kept,
             '["y", ["m"], null, {"line": 2, "permanent": false}]', '["z", ["m"], null]']
    path.write_text("".join(line + "\n" for line in lines))

    failures = app.RememberedFailures.keep(str(path))

    assert len(failures) == 1 and path.read_text() == kept + "\n"
    assert failures.match(app.failure_identity("x", None))[0] == "x" and len(failures) == 0


def test_a_list_run_returns_the_remembered_failures_without_sending_them(tmp_path, fake_server):
    fake = fake_server()
    requests = [request("[[always:400]] refused", 0), request("fine", 1), request("bad", max_tokens=None)]
    options = {"request_url": fake.url, "api_key": API_KEY, "save_filepath": str(tmp_path / "out.jsonl")}
    first = asyncio.run(app.process_requests(requests, **options))

    second = asyncio.run(app.process_requests(requests, **options))

    assert fake.stats.received == 2
    assert [result.ok for result in second] == [False, True, False]
    assert [result.errors for result in second] == [result.errors for result in first]
    assert "HTTP 400" in second[0].errors[0] and "max_tokens" in second[2].errors[0]


def test_start_over_moves_earlier_results_aside_and_sends_everything(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(5)])
    run_in_process(requests_path, fake)
    result = run_cli(*cli_args(fake, requests_path, "--start_over"))
    assert result.returncode == 0 and fake.stats.received == 10
    (backup,) = tmp_path.glob("r_results.jsonl.*.bak")
    assert len(read_jsonl(backup)) == 5 and len(read_jsonl(tmp_path / "r_results.jsonl")) == 5
    assert f"moved {tmp_path / 'r_results.jsonl'} to {backup}" in result.stderr


def test_a_second_run_on_the_same_results_refuses_with_the_first_runs_pid(tmp_path, fake_server):
    fake = fake_server(latency=(3.0, 3.0))
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(3)])
    first = start_cli(*cli_args(fake, requests_path))
    wait_until(lambda: fake.stats.received >= 1)

    second = run_cli(*cli_args(fake, requests_path))

    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"another run (pid {first.pid}) is writing to" in second.stderr
    first.terminate()
    first.communicate(timeout=10)


def test_a_lock_left_by_a_crashed_run_does_not_block(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("q", 0)])
    (tmp_path / "r_results.jsonl.lock").write_text("999999")  # the crashed run's pid; nobody holds the lock
    result = run_cli(*cli_args(fake, requests_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r_results.jsonl.lock").read_text() != "999999"  # taken over, and left in place


def test_three_runs_started_together_answer_each_line_once(tmp_path, fake_server):
    """The lock file stays on disk: were it removed at the end of a run, a run that opened it just before and one
    that created it afresh just after could each hold "the" lock, on two different files."""
    fake = fake_server(latency=(0.05, 0.05))
    requests_path = tmp_path / "r.jsonl"
    rows: list = []
    for round_number in range(3):
        rows += [request(f"round {round_number} question {i}", len(rows) + i) for i in range(10)]
        write_jsonl(requests_path, rows)
        runs = [subprocess.Popen([sys.executable, str(SCRIPT), *cli_args(fake, requests_path)], text=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(3)]
        outcomes = [(run.wait(timeout=60), run.stderr.read()) for run in runs]
        for code, stderr in outcomes:
            assert code == 0 or code == 2 and "another run (pid" in stderr, stderr
        assert any(code == 0 for code, _ in outcomes)
    results, errors = outputs(requests_path)
    assert errors == [] and sorted(record[2]["row"] for record in results) == list(range(30))
    assert fake.stats.received == 30  # no line was sent by two runs at once
    assert (tmp_path / "r_results.jsonl.lock").exists()


def test_without_a_terminal_progress_is_a_plain_status_line_with_a_total(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(12)])
    result = run_cli(*cli_args(fake, requests_path, "--max_requests_per_minute", "240", "--status_interval", "1"))
    assert result.returncode == 0
    status = [line for line in result.stderr.splitlines() if "Status: " in line]
    assert status and "/12 lines (" in status[-1] and "ETA" in status[-1]
    assert "\x1b" not in result.stderr and "\r" not in result.stderr


def test_on_a_terminal_progress_is_one_live_line(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(12)])
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))  # a terminal 60 columns wide
    process = subprocess.Popen([sys.executable, str(SCRIPT), *cli_args(fake, requests_path, "--max_requests_per_minute",
                                                                         "240")],
                               stdout=subprocess.DEVNULL, stderr=terminal, stdin=subprocess.DEVNULL)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    process.wait(timeout=30)
    os.close(controller)
    text = output.decode()
    assert process.returncode == 0
    assert text.count("\r\x1b[K") >= 3 and "/12 lines (" in text
    redraws = [part for part in text.split("\r\x1b[K") if part and "\n" not in part]  # log lines end in a newline
    assert redraws and all(len(part) < 60 for part in redraws)  # never wider than the terminal: no wrapped rows
    assert "Status: " not in text  # the live line replaces the periodic log lines


@pytest.mark.parametrize(("width", "expected"), [
    (200, "12/40 lines (30.0%) | 12 succeeded, 0 failed | 600 requests/min"),
    (60, "12/40 lines (30.0%) | 12 succeeded, 0 failed"),
    (40, "12/40 lines (30.0%)"),
    (12, "12/40 lines"),
    (1, ""),
])
def test_the_live_line_fits_the_terminal_dropping_figures_from_the_right(width, expected):
    line = "12/40 lines (30.0%) | 12 succeeded, 0 failed | 600 requests/min"

    fitted = app.fit_width(line, width)

    assert fitted == expected and len(fitted) < max(width, 1)
