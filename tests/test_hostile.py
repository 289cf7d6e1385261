"""A hostile world: servers that lie or redirect, keys pasted badly, closed terminals, full disks, lines built to
break a parser. Nothing paid twice, nothing hangs, the key stays home."""

from __future__ import annotations

import asyncio
import errno
import gzip
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    API_KEY,
    SCRIPT,
    outputs,
    request,
    run_cli,
    run_in_process,
    write_jsonl,
)
from fake_anthropic import Listener

import api_request_parallel_processor as app

# -- the key stays home ----------------------------------------------------------------------------


def test_a_redirect_is_never_followed_with_the_key(tmp_path, fake_server, captured_logs):
    with Listener() as elsewhere:
        async def redirect(request, body):  # a hostile target echoes the key it was sent
            return web.Response(status=307, headers={"location": f"{elsewhere.url}/v1/messages?k={API_KEY}"})

        fake = fake_server(hostile=redirect)
        requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(5)])

        stats = run_in_process(requests_path, fake)

        assert elsewhere.seen == []
        assert any("it redirects (HTTP 307)" in line for line in captured_logs)
        assert not any(API_KEY in line for line in captured_logs)
        assert stats.exit_code == 2 and stats.stop is app.Stop.UNUSABLE_ADDRESS
        assert outputs(requests_path) == ([], [])  # every line is left for the next run


def test_a_redirect_after_answers_fails_the_line_naming_the_target(tmp_path, fake_server):
    with Listener() as elsewhere:
        async def redirect_one(request, body):
            if "moved" in json.dumps(body):
                return web.Response(status=301, headers={"location": elsewhere.url + "/v1/messages"})
            return None

        fake = fake_server(hostile=redirect_one)
        rows = [request(f"q{i}", i) for i in range(6)] + [request("moved", 6)]
        requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

        stats = run_in_process(requests_path, fake, max_concurrent_requests=1)

        results, errors = outputs(requests_path)
        assert elsewhere.seen == [] and stats.succeeded == 6 and len(results) == 6
        assert len(errors) == 1 and f"a redirect to {elsewhere.url}/v1/messages, not followed" in errors[0][1][-1]


def test_batch_results_at_another_address_are_fetched_without_the_key(tmp_path, fake_server):
    fake_holder = []

    async def forward(request):  # serves the fake's results, as a storage host would
        headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
        async with aiohttp.ClientSession() as session, session.get(fake_holder[0] + request.path,
                                                                   headers=headers) as got:
            return web.Response(status=got.status, body=await got.read())

    with Listener(forward) as storage:
        fake = fake_server(results_origin=storage.url)
        fake_holder.append(fake.url.removesuffix("/v1/messages"))
        requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(8)])

        stats = run_in_process(requests_path, fake, batch=True, batch_poll_seconds=0.05)

        assert stats.exit_code == 0 and len(outputs(requests_path)[0]) == 8
        assert len(storage.seen) >= 1 and storage.keys_received == 0


def test_a_key_read_with_its_newline_works(tmp_path, fake_server, monkeypatch):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(3)])
    monkeypatch.setenv("ANTHROPIC_API_KEY", f"  {API_KEY}\n")  # as `export ANTHROPIC_API_KEY=$(cat key.txt)`

    stats = run_in_process(requests_path, fake, api_key=None)

    assert stats.exit_code == 0 and len(outputs(requests_path)[0]) == 3


def test_a_key_with_a_control_character_is_refused_without_showing_it(tmp_path, fake_server, monkeypatch):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("q", 1)])
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY[:10] + "\n" + API_KEY[10:])

    with pytest.raises(app.ConfigError) as refused:
        run_in_process(requests_path, fake, api_key=None)

    assert "the API key holds a control character (character 11 of" in str(refused.value)
    assert API_KEY[:10] not in str(refused.value) and fake.stats.received == 0


# -- closed terminals --------------------------------------------------------------------------------


def test_a_run_started_with_stderr_closed_logs_beside_the_results(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(3)])
    command = " ".join(shlex.quote(part) for part in [
        sys.executable, str(SCRIPT), "--requests_filepath", str(requests_path), "--request_url", fake.url,
        "--api_key", API_KEY])

    done = subprocess.run(["sh", "-c", command + " 2>&-"], capture_output=True, text=True, timeout=60, check=False)

    log_path = tmp_path / "r_results.jsonl.log"
    assert done.returncode == 0, done.stdout
    assert f"stderr is closed: the log goes to {log_path}" in done.stdout
    assert len(outputs(requests_path)[0]) == 3 and "3 succeeded" in log_path.read_text()


# -- lines built to break a parser -------------------------------------------------------------------


def nested(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


def test_each_hostile_line_is_its_own_problem_and_the_others_are_answered(tmp_path, fake_server):
    fake = fake_server()
    good = [json.dumps(request(f"q{i}", i)) for i in range(4)]
    hostile = {
        2: "[" * 100_000,  # RecursionError in the parser
        3: json.dumps(request("x"))[:-1] + ', "metadata": ' + nested(5_000) + "}",
        4: json.dumps(request("x", max_tokens=10 ** 400)),  # OverflowError as a float
        5: json.dumps(request("x", max_tokens=2_000_000)),
        6: json.dumps(request("x")).replace('"max_tokens": 64', '"max_tokens": 64, "temperature": NaN'),
        7: json.dumps(request("x")).replace('"max_tokens": 64', '"max_tokens": 64, "top_p": -Infinity'),
        8: '{"model": "m", "max_tokens": 5, "messages": "\x01"}',
        9: json.dumps(request([{"type": "text", "text": "deep", "extra": json.loads(nested(900))}])),
    }
    lines = [good[0], *hostile.values(), *good[1:]]
    requests_path = write_jsonl(tmp_path / "r.jsonl", lines)

    stats = run_in_process(requests_path, fake)

    results, errors = outputs(requests_path)
    assert stats.exit_code == 1 and stats.succeeded == 4 and len(results) == 4
    by_line = {int(record[1][0].split(":")[0].removeprefix("line ")): record[1][0] for record in errors}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert all("nested too deeply to be read" in by_line[line] for line in (2, 3, 9))
    assert "'max_tokens' is over 1,000,000" in by_line[4] and "'max_tokens' is over 1,000,000" in by_line[5]
    assert "NaN is not JSON" in by_line[6] and "-Infinity is not JSON" in by_line[7]
    assert "at at" not in by_line[8] and "Invalid control character at column" in by_line[8]
    for record in errors:
        json.dumps(record, allow_nan=False)  # every record is JSON


def test_the_dry_run_reports_hostile_lines_too(tmp_path):
    requests_path = write_jsonl(tmp_path / "r.jsonl", ["[" * 100_000, json.dumps(request("fine"))])

    done = run_cli("--requests_filepath", str(requests_path), "--dry_run")

    assert done.returncode == 1 and "1 line(s) to send, 1 bad" in done.stdout
    assert "line 1: nested too deeply to be read" in done.stdout and "Traceback" not in done.stderr


# -- answers checked before they are trusted ---------------------------------------------------------


def test_a_usage_that_cannot_be_believed_is_a_torn_answer(tmp_path, fake_server):
    lies = {"strings": {"input_tokens": "12", "output_tokens": "3"}, "huge": {"input_tokens": 10 ** 30},
            "negative": {"input_tokens": 5, "output_tokens": -60_000}, "bool": {"output_tokens": True}}
    told: dict[str, int] = {}

    async def lie_once(request, body):  # each "lie:" line is answered with its lie once, then truthfully
        text = body["messages"][0]["content"]
        if text.startswith("lie:") and not told.get(text):
            told[text] = 1
            message = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                       "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                       "usage": lies[text.removeprefix("lie:")]}
            return web.json_response(message)
        return None

    fake = fake_server(hostile=lie_once)
    rows = [request(f"lie:{name}", i) for i, name in enumerate(lies)] + [request("truth", 9)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake)

    results, errors = outputs(requests_path)
    assert stats.exit_code == 0 and errors == [] and len(results) == 5
    assert all(record[1]["usage"]["input_tokens"] >= 1 for record in results)
    assert stats.retries == 4 and stats.totals.cost >= 0


def test_an_answer_without_content_is_never_saved_and_an_error_body_is_retried_as_its_error(tmp_path, fake_server):
    async def hollow(request, body):
        text = body["messages"][0]["content"]
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                   "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                   "usage": {"input_tokens": 10, "output_tokens": 5}}
        if text == "null":
            return web.json_response({**message, "content": None})
        if text == "missing":
            return web.json_response({key: value for key, value in message.items() if key != "content"})
        if text == "busy" and not hollow.busy:  # an overloaded_error in a 200's body, once
            hollow.busy = True
            return web.json_response({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
        return None

    hollow.busy = False
    fake = fake_server(hostile=hollow)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(text, i) for i, text in
                                                       enumerate(("null", "missing", "busy", "fine"))])

    stats = run_in_process(requests_path, fake, max_attempts=2)

    results, errors = outputs(requests_path)
    assert stats.exit_code == 1 and sorted(record[2]["row"] for record in results) == [2, 3]
    assert sorted(record[2]["row"] for record in errors) == [0, 1]
    assert all(record[3]["permanent"] is False and "a message without content" in record[1][-1]
               for record in errors)  # sent again by the next run


def test_rate_limit_headers_that_cannot_be_true_do_not_stall_the_run(tmp_path, fake_server, captured_logs):
    async def lying_headers(request, body):
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                   "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                   "usage": {"input_tokens": 10, "output_tokens": 5}}
        headers = {"anthropic-ratelimit-requests-limit": "0.001", "anthropic-ratelimit-requests-remaining": "-1e9",
                   "anthropic-ratelimit-input-tokens-limit": "100000",
                   "anthropic-ratelimit-input-tokens-remaining": "-1000000000",
                   "anthropic-ratelimit-output-tokens-limit": "nan"}
        return web.json_response(message, headers=headers)

    fake = fake_server(hostile=lying_headers)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(20)])

    stats = run_in_process(requests_path, fake, max_requests_per_minute=6000, max_tokens_per_minute=600_000)

    assert stats.exit_code == 0 and stats.succeeded == 20
    assert sum("limit of 0.001 requests/min: too low to be true" in line for line in captured_logs) == 1


# -- a full disk, a replaced file ----------------------------------------------------------------------


def limit_file_size(size: int) -> None:
    """Files this process writes stop growing at `size` bytes (EFBIG, as a full disk's ENOSPC): a full disk
    without root. Python ignores the SIGXFSZ that comes with it."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def whole_records(path) -> list:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def test_a_full_disk_stops_the_spending_and_the_rerun_pays_only_what_was_in_flight(tmp_path, fake_server):
    fake = fake_server(latency=(0.01, 0.05))
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(300)])
    args = ["--requests_filepath", str(requests_path), "--request_url", fake.url, "--api_key", API_KEY,
            "--max_requests_per_minute", "30000", "--max_tokens_per_minute", "10000000", "--grace_period", "1"]

    full = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: limit_file_size(20_000), check=False)

    results_path = tmp_path / "r_results.jsonl"
    saved = whole_records(results_path)
    answered = sum(fake.stats.answered.values())
    assert full.returncode == 2, full.stderr
    assert "Traceback" not in full.stderr and f"cannot write {results_path}: File too large" in full.stderr
    assert "could not be saved; the next run sends those lines again" in full.stderr
    assert 0 < len(saved) < answered < 300  # it stopped sending soon after the disk filled
    in_flight_when_full = answered - len(saved)

    rerun = run_cli(*args)

    assert rerun.returncode == 0, rerun.stderr
    assert sorted(record[2]["row"] for record in whole_records(results_path)) == list(range(300))
    assert fake.stats.paid_twice <= in_flight_when_full <= 64


def test_answers_wait_in_memory_until_room_comes_back(tmp_path, fake_server):
    fake = fake_server(latency=(0.05, 0.2))
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(300)])
    results_path = tmp_path / "r_results.jsonl"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def room_comes_back() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and fake.stats.received < 40:
            time.sleep(0.01)
        time.sleep(0.5)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    limit_file_size(8_000)
    helper = threading.Thread(target=room_comes_back)
    helper.start()
    try:
        stats = run_in_process(requests_path, fake, grace_period=10)
    finally:
        helper.join()
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    saved = whole_records(results_path)
    assert stats.exit_code == 2 and stats.stop is app.Stop.WRITE_FAILED
    assert len(saved) == sum(fake.stats.answered.values())  # every answer paid for was saved
    stats = run_in_process(requests_path, fake)
    assert stats.exit_code == 0 and fake.stats.paid_twice == 0
    assert sorted(record[2]["row"] for record in whole_records(results_path)) == list(range(300))


def test_a_results_file_replaced_during_the_run_stops_it(tmp_path, fake_server):
    fake = fake_server(latency=(0.05, 0.1))
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(200)])
    results_path = tmp_path / "r_results.jsonl"

    def replace_it() -> None:  # as an editor saves: a new file renamed over the old
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and fake.stats.received < 30:
            time.sleep(0.01)
        copy = tmp_path / "copy.jsonl"
        copy.write_bytes(results_path.read_bytes())
        os.replace(copy, results_path)

    helper = threading.Thread(target=replace_it)
    helper.start()
    stats = run_in_process(requests_path, fake, max_requests_per_minute=3000)
    helper.join()

    assert stats.exit_code == 2 and stats.stop is app.Stop.WRITE_FAILED
    rerun = run_in_process(requests_path, fake)
    assert rerun.exit_code == 0
    assert sorted(record[2]["row"] for record in whole_records(results_path)) == list(range(200))
    assert fake.stats.paid_twice <= 20


def test_a_results_folder_deleted_during_the_run_is_not_said_to_hold_the_results(tmp_path, fake_server, captured_logs):
    fake = fake_server(latency=(0.05, 0.1))
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(200)])
    folder = tmp_path / "out"

    def delete_it() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and fake.stats.received < 30:
            time.sleep(0.01)
        shutil.rmtree(folder)

    helper = threading.Thread(target=delete_it)
    helper.start()
    stats = run_in_process(requests_path, fake, max_requests_per_minute=3000, save_filepath=str(folder / "r.jsonl"))
    helper.join()

    assert stats.exit_code == 2 and not any("Results saved" in line for line in captured_logs)
    assert any(line.endswith("is gone (moved or deleted during the run): the answers saved to it went with it.")
               for line in captured_logs)


# -- files that are not what they seem -----------------------------------------------------------------


def test_no_file_the_run_writes_may_be_the_requests_file(tmp_path, fake_server):
    fake = fake_server()
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [request("q", 1)])
    requests_path = write_jsonl(tmp_path / "data_errors.jsonl", [request("q", 1)])
    before = requests_path.read_bytes()

    for extra in (["--save_filepath", str(data)], ["--save_filepath", str(data), "--start_over"],
                  ["--save_filepath", str(requests_path)]):
        done = run_cli("--requests_filepath", str(requests_path), "--request_url", fake.url, "--api_key", API_KEY,
                       *extra)
        assert done.returncode == 2 and "would be the requests file" in done.stderr, done.stderr
        assert requests_path.read_bytes() == before and "Traceback" not in done.stderr
    assert fake.stats.received == 0


def test_an_unreadable_requests_file_is_named_and_nothing_is_created(tmp_path, monkeypatch, capsys):
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("q", 1)])

    def no_permission(path, *args, **kwargs):  # what the OS answers a user without read permission (root reads all)
        if str(path) == str(requests_path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(app, "open", no_permission, raising=False)

    exit_code = app.main(["--requests_filepath", str(requests_path), "--api_key", API_KEY])

    stderr = capsys.readouterr().err
    assert exit_code == 2 and f"cannot read the requests file {requests_path}: Permission denied" in stderr
    assert "Traceback" not in stderr and sorted(tmp_path.iterdir()) == [requests_path]


def test_two_start_overs_in_the_same_second_keep_both_earlier_results(tmp_path):
    results = tmp_path / "r_results.jsonl"
    moved = []
    for content in (b"first\n", b"second\n"):
        results.write_bytes(content)
        moved.append(app.set_aside(str(results)))

    assert len(set(moved)) == 2 and sorted(Path(path).read_bytes() for path in moved) == [b"first\n", b"second\n"]


def test_a_requests_file_rewritten_in_place_is_never_read_as_a_chimera(tmp_path, fake_server, monkeypatch):
    monkeypatch.setattr(app, "READ_BUFFER_BYTES", 4096)  # many reads, so that the rewrite falls between two
    fake = fake_server(latency=(0.02, 0.05))
    old = [request(f"old question {i} " + "o" * 300, i) for i in range(300)]
    new = [request(f"new {i} " + "n" * 150, i) for i in range(300)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", old)

    def rewrite() -> None:  # as `cat new > requests.jsonl` does: the same file, truncated and written again
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and fake.stats.received < 20:
            time.sleep(0.01)
        with open(requests_path, "r+b") as file:
            file.truncate(0)
            file.write("".join(json.dumps(row) + "\n" for row in new).encode())

    helper = threading.Thread(target=rewrite)
    helper.start()
    stats = run_in_process(requests_path, fake, max_requests_per_minute=3000)
    helper.join()

    sent = [json.dumps(body, sort_keys=True) for body in fake.stats.bodies_seen]
    known = {json.dumps({k: v for k, v in row.items() if k != "metadata"}, sort_keys=True) for row in old + new}
    assert stats.exit_code == 3 and stats.stop is app.Stop.INPUT_CHANGED and stats.succeeded < 300
    assert all(body in known for body in sent)
    rerun = run_in_process(requests_path, fake)
    assert rerun.exit_code == 0 and rerun.succeeded == 300 - rerun.already_done


def test_the_progress_line_never_passes_100_percent_when_lines_are_appended():
    stats = app.RunStats(total=300, succeeded=400)
    assert "400/400 lines (100.0%)" in app.status_line(stats)


# -- bounded answers ------------------------------------------------------------------------------------


def endless(content_type: str, first: bytes, piece: bytes, encoding: str | None = None):
    async def answer(request, body):
        if "endless" not in json.dumps(body):
            return None
        headers = {"content-type": content_type, **({"content-encoding": encoding} if encoding else {})}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        try:
            await response.write(first)
            while True:
                await response.write(piece)
        except (ConnectionError, RuntimeError):  # the client hung up
            return response
    return answer


GZIP_BOMB = gzip.compress(b"\0" * (16 << 20))  # 16 MB of zeros in about 16 KB


@pytest.mark.parametrize(("hostile", "streamed", "expected"), [
    (endless("application/json", b'{"type": "message", "content": "', b"x" * 65536), False,
     "a response larger than 1 MB, cut off"),
    (endless("application/json", GZIP_BOMB, GZIP_BOMB, encoding="gzip"), False, "a response larger than 1 MB"),
    (endless("text/event-stream", b"event: message_start\ndata: ", b"y" * 65536), True,
     "a response larger than 1 MB"),
    (endless("text/event-stream", b'event: message_start\ndata: {"type": "message_start", "message": {"content": []}}'
             b'\n\nevent: content_block_start\ndata: {"type": "content_block_start", "index": 1000000000, '
             b'"content_block": {"type": "text", "text": ""}}\n\n', b"event: ping\ndata: {}\n\n"), True,
     "block 1000000000 started after 0 blocks"),
], ids=["endless body", "gzip bomb", "endless event line", "block index 10^9"])
def test_answers_too_large_to_be_true_are_cut_off(tmp_path, fake_server, monkeypatch, hostile, streamed, expected):
    monkeypatch.setattr(app, "MAX_RESPONSE_BYTES", 1 << 20)
    fake = fake_server(hostile=hostile)
    rows = [request("fine", 1), request("endless", 2, **({"stream": True} if streamed else {})), request("too", 3)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake, max_attempts=2, request_timeout=20)

    results, errors = outputs(requests_path)
    assert stats.succeeded == 2 and sorted(record[2]["row"] for record in results) == [1, 3]
    assert len(errors) == 1 and len(errors[0][1]) == 2 and all(expected in message for message in errors[0][1])


def test_a_stream_of_nothing_but_pings_is_cut_and_retried(fake_server):
    fake = fake_server(ping_seconds=0.05, slow_seconds=30)
    rows = [request("[[fault:stream_pingsx1]] hold on", 1, stream=True)]

    results = asyncio.run(app.process_requests(rows, request_url=fake.url, api_key=API_KEY, request_timeout=1))

    assert results[0].ok and len(results[0].errors) == 1
    assert "nothing but pings for 1 s" in results[0].errors[0]


def test_a_lost_batch_create_is_adopted_when_this_machine_s_clock_is_an_hour_off(tmp_path, fake_server):
    fake = fake_server(batch_lost_creates=1, clock_offset_seconds=-3600)  # the API's clock an hour behind ours
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(20)])

    stats = run_in_process(requests_path, fake, batch=True, batch_poll_seconds=0.05)

    assert stats.exit_code == 0 and len(outputs(requests_path)[0]) == 20
    assert len(fake.batches) == 1 and fake.stats.submitted_twice == 0


def test_a_server_that_never_completes_connections_is_an_outage_not_a_long_wait(tmp_path, monkeypatch,
                                                                                captured_logs):
    monkeypatch.setattr(app, "CONNECT_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(app, "OUTAGE_MIN_SECONDS", 1.0)
    monkeypatch.setattr(app, "OUTAGE_MAX_SECONDS", 1.5)
    with socket.socket() as server, socket.socket() as first:
        server.bind(("127.0.0.1", 0))
        server.listen(0)  # never accepted: once the queue holds one, connections hang
        first.connect(server.getsockname())
        url = f"http://127.0.0.1:{server.getsockname()[1]}/v1/messages"
        requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(5)])

        stats = asyncio.run(app.process_api_requests_from_file(str(requests_path), request_url=url, api_key=API_KEY,
                                                               grace_period=1))

    assert stats.exit_code == 3 and stats.stop is app.Stop.OUTAGE
    assert outputs(requests_path) == ([], [])  # every line is left for the next run
    assert any("got no answer or a 5xx" in line and "no connection within 0.5 s" in line for line in captured_logs)


# -- paths that are not files, nohup, exports that meet -----------------------------------------------


@pytest.mark.parametrize("where", ["/dev/null", "link to /dev/null", "errors: a directory", "index: a FIFO"])
def test_a_path_that_is_not_a_regular_file_is_refused_before_anything_is_sent(tmp_path, fake_server, where):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(3)])
    results = tmp_path / "r_results.jsonl"
    if where == "/dev/null":
        results = Path("/dev/null")
    elif where == "link to /dev/null":
        results.symlink_to("/dev/null")
    elif where == "errors: a directory":
        (tmp_path / "r_results_errors.jsonl").mkdir()
    else:
        os.mkfifo(tmp_path / "r_results.jsonl.index")

    result = subprocess.run([sys.executable, str(SCRIPT), "--requests_filepath", str(requests_path), "--save_filepath",
                             str(results), "--request_url", fake.url, "--api_key", API_KEY],
                            capture_output=True, text=True, timeout=60, check=False)

    role = where.split(":")[0] if ":" in where else "results"
    assert result.returncode == 2 and fake.stats.received == 0, result.stderr
    assert result.stderr.startswith(f"error: cannot write {role} to ") and result.stderr.count("\n") == 1


def test_a_requests_file_under_dev_needs_a_results_path(tmp_path):
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("q", 0)])
    with open(requests_path) as stdin:
        result = subprocess.run([sys.executable, str(SCRIPT), "--requests_filepath", "/dev/stdin", "--api_key",
                                 API_KEY], stdin=stdin, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "give --save_filepath" in result.stderr
    assert not Path("/dev/stdin_results.jsonl").exists()


def test_under_nohup_a_hangup_is_ignored_and_the_run_finishes(tmp_path, fake_server):
    fake = fake_server(latency=(0.05, 0.1))
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(60)])
    process = subprocess.Popen(["nohup", sys.executable, str(SCRIPT), "--requests_filepath", str(requests_path),
                                "--request_url", fake.url, "--api_key", API_KEY, "--max_requests_per_minute", "1200"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while fake.stats.received < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and "SIGHUP" not in stderr, stderr
    assert len(outputs(requests_path)[0]) == 60


def test_two_exports_to_one_path_at_once_both_end_whole(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i} " + "x" * 200, i) for i in range(3000)])
    run_in_process(requests_path, fake, max_requests_per_minute=600_000)
    export = tmp_path / "answers.jsonl"
    args = [sys.executable, str(SCRIPT), "--requests_filepath", str(requests_path), "--export", str(export),
            "--export_only"]

    exports = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = [process.wait(timeout=120) for process in exports]

    assert codes == [0, 0]
    rows = [json.loads(line) for line in export.read_text(encoding="utf-8").splitlines()]
    assert [row["line"] for row in rows] == list(range(1, 3001)) and {row["status"] for row in rows} == {"answered"}
    assert [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")] == []


# -- a paused process -------------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True])
def test_a_pause_longer_than_the_timeout_pays_for_nothing_twice(tmp_path, fake_server, streamed):
    """Ctrl+Z then fg, docker pause, a laptop lid: the answers that came during the pause are read, not timed out and
    sent again. The fake answers in 1-1.5 s; the process stops for twice the 2.5 s timeout with ~100 in flight."""
    fake = fake_server(latency=(1.0, 1.5))
    extra = {"stream": True} if streamed else {}
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i, **extra) for i in range(150)])
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--requests_filepath", str(requests_path),
                                "--request_url", fake.url, "--api_key", API_KEY, "--max_requests_per_minute", "60000",
                                "--max_tokens_per_minute", "10000000", "--request_timeout", "2.5"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while fake.stats.received < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGSTOP)
    time.sleep(5.0)
    answered_during_the_pause = sum(fake.stats.answered.values())
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 0, stderr
    assert answered_during_the_pause >= 90 and fake.stats.paid_twice == 0, stderr
    assert len(outputs(requests_path)[0]) == 150


# -- few file descriptors ---------------------------------------------------------------------------


def test_with_few_file_descriptors_the_run_slows_instead_of_failing_lines(tmp_path, fake_server):
    """`ulimit -n 64` and the default 500 requests in flight: every line answered in one run."""
    fake = fake_server(latency=(0.3, 0.6))  # at the rate given, ~900 would be in flight (the code before: exit 2)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(1000)])

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    result = subprocess.run([sys.executable, str(SCRIPT), "--requests_filepath", str(requests_path), "--request_url",
                             fake.url, "--api_key", API_KEY, "--max_requests_per_minute", "120000",
                             "--max_tokens_per_minute", "100000000"], preexec_fn=few_files, capture_output=True,
                            text=True, timeout=120, check=False)

    assert result.returncode == 0, result.stderr[-2000:]
    assert "(ulimit -n): at most" in result.stderr and result.stderr.count("ulimit -n") == 1
    results, errors = outputs(requests_path)
    assert len(results) == 1000 and errors == []


def test_a_retry_after_past_the_fifteen_minutes_stops_at_once_and_says_so(tmp_path, fake_server, captured_logs):
    async def a_day(request, body):
        return web.json_response({"type": "error", "error": {"type": "rate_limit_error", "message": "later"}},
                                 status=429, headers={"retry-after": "86400"})

    fake = fake_server(hostile=a_day)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(3)])

    stats = run_in_process(requests_path, fake)

    stopped = [line for line in captured_logs if line.startswith("ERROR Nothing but 429s")]
    assert stats.exit_code == 3 and outputs(requests_path) == ([], [])  # every line left for the next run
    assert len(stopped) == 1 and ", and it asks to wait 24h00m more:" in stopped[0], stopped


def test_a_header_reaches_every_call_of_both_roads_and_never_a_log_line_or_a_file(tmp_path, fake_server):
    secret = "gw-secret-4d9f1c"
    seen: list[dict[str, str]] = []

    async def echo(request, body):  # a gateway that echoes what it was sent into its error
        seen.append(dict(request.headers))
        text = body["messages"][0]["content"] if "messages" in body else ""
        if text == "echo" and sum(1 for headers in seen if headers.get("x-gateway-auth")) == 1:
            return web.json_response({"type": "error", "error": {"type": "api_error",
                                                                 "message": f"bad gateway auth {secret}"}}, status=500)
        return None

    fake = fake_server(hostile=echo)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("echo", 0), request("plain", 1)])
    direct = subprocess.run([sys.executable, str(SCRIPT), "--requests_filepath", str(requests_path), "--request_url",
                             fake.url, "--api_key", API_KEY, "--header", f"x-gateway-auth: {secret}", "--header",
                             "anthropic-workspace-id: wrkspc_1", "--logging_level", "TRACE"],
                            capture_output=True, text=True, timeout=60, check=False)
    batch_path = write_jsonl(tmp_path / "b.jsonl", [request("batched", 0)])
    batched = subprocess.run([sys.executable, str(SCRIPT), "--requests_filepath", str(batch_path), "--request_url",
                              fake.url, "--api_key", API_KEY, "--header", f"x-gateway-auth: {secret}", "--batch",
                              "--batch_poll_seconds", "0.05"], capture_output=True, text=True, timeout=60, check=False)

    assert direct.returncode == 0 and batched.returncode == 0, direct.stderr + batched.stderr
    assert all(headers.get("x-gateway-auth") == secret and headers.get("anthropic-workspace-id") == "wrkspc_1"
               for headers in seen[:3])  # the two lines' attempts
    assert len(fake.stats.batch_headers_seen) >= 3 and all(  # create, retrieve, results
        headers.get("x-gateway-auth") == secret for headers in fake.stats.batch_headers_seen)
    written = "".join(path.read_text(errors="replace") for path in tmp_path.rglob("*") if path.is_file())
    assert secret not in direct.stderr + batched.stderr + written
    assert "[redacted]" in direct.stderr  # the echo was logged, without the value


def test_running_time_leaves_out_the_pauses_that_its_ticks_show():
    now = [100.0]
    running = app.RunningTime(clock=lambda: now[0])
    for step, expected in ((0.5, 0.5), (0.5, 1.0), (3.0, 1.5), (0.5, 2.0), (1.0, 3.0)):  # a 2.5 s gap is a pause
        now[0] += step
        assert running.now() - 100.0 == pytest.approx(expected)  # a pause not yet ticked is left out already...
        running.tick()
        assert running.now() - 100.0 == pytest.approx(expected)  # ...and once ticked, the same
