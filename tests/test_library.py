"""The file as a library: both entry points awaited inside a running event loop, as in a notebook."""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import subprocess
import sys

from conftest import API_KEY, ROOT, outputs, read_jsonl, request, write_jsonl

import api_request_parallel_processor as app

FAST = {"max_requests_per_minute": 60000, "max_tokens_per_minute": 10_000_000}


def mixed_requests() -> list[dict]:
    """50 requests: most fine, some retried after faults, two that fail for good."""
    requests = [request(f"question {i}", i) for i in range(50)]
    for i in (3, 17, 30):
        requests[i]["messages"][0]["content"] = f"[[fault:529x1]] question {i}"
    for i in (8, 41):
        requests[i]["messages"][0]["content"] = f"[[always:400]] question {i}"
    return requests


def test_process_requests_returns_one_result_per_request_in_order(fake_server, captured_logs):
    fake = fake_server(latency=(0.0, 0.05))
    requests = mixed_requests()
    originals = json.loads(json.dumps(requests))

    async def notebook_cell() -> list[app.RequestResult]:
        return await app.process_requests(requests, request_url=fake.url, api_key=API_KEY, max_attempts=3, **FAST)

    results = asyncio.run(notebook_cell())

    assert requests == originals  # the caller's dicts are not changed (metadata stays in them)
    assert len(results) == 50
    for i, result in enumerate(results):
        assert result.metadata == {"row": i}
        assert result.request["messages"] == originals[i]["messages"] and "metadata" not in result.request
        if i in (8, 41):
            assert not result.ok and result.response is None and "HTTP 400" in result.errors[0]
        else:
            assert result.ok and result.text == f"Echo: {originals[i]['messages'][0]['content']}"
    assert [len(results[i].errors) for i in (3, 17, 30)] == [1, 1, 1]  # the retried ones say so
    assert not any(line.startswith(("DEBUG", "TRACE")) for line in captured_logs)
    assert any(line.startswith("INFO Finished") for line in captured_logs)


def test_process_requests_reports_bad_items_in_place(fake_server):
    fake = fake_server()
    items = [request("fine", 0), {"model": "m"}, "not a dict", request("unserialisable", 3,
                                                                        stop_sequences=[datetime.date(2026, 1, 1)])]
    results = asyncio.run(app.process_requests(items, request_url=fake.url, api_key=API_KEY, **FAST))
    assert [result.ok for result in results] == [True, False, False, False]
    assert "line 2: missing or invalid 'max_tokens'" in results[1].errors[0]
    assert "line 3: expected a JSON object, got str" in results[2].errors[0]
    assert "line 4: cannot be sent as JSON (Object of type date is not JSON serializable)" in results[3].errors[0]


def test_metadata_that_cannot_be_saved_is_a_bad_item_not_a_lost_result(tmp_path, fake_server):
    fake = fake_server()
    items = [{**request("fine"), "metadata": {"row": 0}},
             {**request("dated"), "metadata": {"when": datetime.date.today()}}]
    results = asyncio.run(app.process_requests(items, request_url=fake.url, api_key=API_KEY,
                                               save_filepath=str(tmp_path / "out.jsonl"), **FAST))
    assert [result.ok for result in results] == [True, False]
    assert "cannot be sent as JSON" in results[1].errors[0] and fake.stats.received == 1
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 1


def test_process_requests_with_a_save_file_appends_and_resumes(tmp_path, fake_server):
    fake = fake_server()
    save = tmp_path / "out.jsonl"
    first = [request(f"q{i}", i) for i in range(10)]
    asyncio.run(app.process_requests(first, request_url=fake.url, api_key=API_KEY, save_filepath=str(save), **FAST))
    assert len(read_jsonl(save)) == 10 and fake.stats.received == 10

    more = first + [request(f"q{i}", i) for i in range(10, 15)]
    results = asyncio.run(app.process_requests(more, request_url=fake.url, api_key=API_KEY, save_filepath=str(save),
                                               **FAST))

    assert fake.stats.received == 15  # only the five new ones were sent
    assert [result.metadata["row"] for result in results] == list(range(15))
    assert all(result.ok and result.text == f"Echo: q{i}" for i, result in enumerate(results))
    assert sorted(record[2]["row"] for record in read_jsonl(save)) == list(range(15))


def test_process_api_requests_from_file_in_a_running_loop_with_faults(tmp_path, fake_server):
    fake = fake_server(latency=(0.0, 0.05))
    requests_path = write_jsonl(tmp_path / "r.jsonl", mixed_requests())

    async def notebook_cell() -> app.RunStats:
        assert asyncio.get_running_loop().is_running()
        return await app.process_api_requests_from_file(str(requests_path), request_url=fake.url, api_key=API_KEY,
                                                        max_attempts=3, **FAST)

    stats = asyncio.run(notebook_cell())

    assert (stats.succeeded, stats.failed, stats.retries, stats.exit_code) == (48, 2, 3, 1)
    results, errors = outputs(requests_path)
    by_row = {record[2]["row"]: record for record in results}
    assert sorted(by_row) == sorted(set(range(50)) - {8, 41})
    for row, (sent, response, _) in by_row.items():
        assert response["content"][0]["text"] == "Echo: " + sent["messages"][0]["content"]
        assert sent["messages"][0]["content"].endswith(f"question {row}")
    assert sorted(record[2]["row"] for record in errors) == [8, 41]


def test_the_key_comes_from_the_environment_when_not_given(fake_server, monkeypatch):
    fake = fake_server()
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    (result,) = asyncio.run(app.process_requests([request("hi", 0)], request_url=fake.url, **FAST))
    assert result.ok


def test_importing_runs_nothing_and_leaves_loguru_alone():
    code = (
        "from loguru import logger\n"
        "before = dict(logger._core.handlers)\n"
        "import api_request_parallel_processor as app\n"
        "assert dict(logger._core.handlers) == before, 'handlers changed'\n"
        "assert app._encoder is None, 'the tokenizer was loaded at import'\n"
        "print('imported')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "imported\n" and result.stderr == ""


def test_a_save_file_with_a_foreign_line_still_returns_every_result(tmp_path, fake_server, captured_logs):
    fake = fake_server()
    save = tmp_path / "out.jsonl"
    asyncio.run(app.process_requests([request("q0", 0)], request_url=fake.url, api_key=API_KEY,
                                     save_filepath=str(save), **FAST))
    with open(save, "a") as file:
        file.write("not a result record\n")

    results = asyncio.run(app.process_requests([request("q0", 0), request("q1", 1)], request_url=fake.url,
                                               api_key=API_KEY, save_filepath=str(save), **FAST))

    assert [result.text for result in results] == ["Echo: q0", "Echo: q1"] and fake.stats.received == 2
    assert sum("1 line(s) of" in line and "not result records" in line for line in captured_logs) == 2


def test_an_interrupted_list_run_says_a_call_sends_everything_again_unless_saved(captured_logs):
    listener = socket.socket()  # a port where nothing listens: the run stops at once, nothing answered
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()

    results = asyncio.run(app.process_requests([request("x")], request_url=f"http://127.0.0.1:{port}/v1/messages",
                                               api_key=API_KEY))

    assert not results[0].ok and "not sent" in results[0].errors[0]
    assert any("calling again sends every request again (give save_filepath" in line for line in captured_logs)
    assert not any("Run the same command again" in line for line in captured_logs)
