"""A hostile world: servers that lie or redirect, keys pasted badly, closed terminals, full disks, lines built to
break a parser. Nothing paid twice, nothing hangs, the key stays home."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import aiohttp
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


def test_a_redirect_is_never_followed_with_the_key(tmp_path, fake_server):
    with Listener() as elsewhere:
        async def redirect(request, body):
            return web.Response(status=307, headers={"location": elsewhere.url + "/v1/messages"})

        fake = fake_server(hostile=redirect)
        requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(5)])

        stats = run_in_process(requests_path, fake)

        assert elsewhere.seen == []
        assert stats.exit_code == 2 and stats.interrupted_by is app.Interruption.UNUSABLE_ADDRESS
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


def test_a_key_read_with_its_newline_works(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q{i}", i) for i in range(3)])

    done = run_cli("--requests_filepath", str(requests_path), "--request_url", fake.url,
                   env={"ANTHROPIC_API_KEY": f"  {API_KEY}\n"})

    assert done.returncode == 0, done.stderr
    assert len(outputs(requests_path)[0]) == 3


def test_a_key_with_a_control_character_is_refused_without_showing_it(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("q", 1)])
    broken = API_KEY[:10] + "\n" + API_KEY[10:]

    done = run_cli("--requests_filepath", str(requests_path), "--request_url", fake.url,
                   env={"ANTHROPIC_API_KEY": broken})

    assert done.returncode == 2 and fake.stats.received == 0
    assert "the API key holds a control character (character 11 of" in done.stderr
    assert API_KEY[:10] not in done.stderr + done.stdout and "Traceback" not in done.stderr


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
