"""The Message Batches road: the same files as a direct run, exactly once across faults, kills and reruns."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from conftest import API_KEY, MODEL, outputs, read_jsonl, request, run_cli, run_in_process, write_jsonl
from test_resume_and_signals import result_rows, start_cli, wait_until

import api_request_parallel_processor as app

FAST = {"batch": True, "batch_poll_seconds": 0.05}


def batch_args(fake, requests_path: Path, *extra: str) -> list[str]:
    return ["--requests_filepath", str(requests_path), "--request_url", fake.url, "--api_key", API_KEY, "--batch",
            "--batch_poll_seconds", "0.05", *extra]


def journal(requests_path: Path) -> list[dict]:
    return read_jsonl(Path(str(requests_path)[: -len(".jsonl")] + "_results.jsonl.batches") / "journal.jsonl")


def end_batches(fake) -> None:
    """End every batch of the fake now: the tests decide when batches end, not a race with a busy machine."""
    for batch in fake.batches.values():
        batch.ends_at = 0.0


def each_submitted_once(fake) -> None:
    assert fake.stats.submitted_twice == 0
    assert set(fake.stats.batch_submissions.values()) == {1}


def test_a_batch_run_writes_what_a_direct_run_writes_at_half_the_cost(tmp_path, fake_server):
    rows = [request(f"question {i}", i) for i in range(30)]
    rows[3]["stream"] = True  # a batch takes no streams: sent without it, saved as written
    direct_path = write_jsonl(tmp_path / "direct.jsonl", rows)
    batch_path = write_jsonl(tmp_path / "batch.jsonl", rows)
    direct = run_in_process(direct_path, fake_server())
    fake = fake_server()

    stats = run_in_process(batch_path, fake, batch_size=10, **FAST)

    assert stats.exit_code == 0
    assert stats.batch.submitted == 3 and [len(b.requests) for b in fake.batches.values()] == [10, 10, 10]
    each_submitted_once(fake)
    assert not any("stream" in params for b in fake.batches.values() for _, params in b.requests)
    direct_records, batch_records = outputs(direct_path)[0], outputs(batch_path)[0]
    by_row = {record[2]["row"]: record for record in direct_records}
    assert sorted(record[2]["row"] for record in batch_records) == list(range(30))
    for request_body, response, metadata in batch_records:
        expected = by_row[metadata["row"]]
        assert request_body == expected[0]  # the body as written, "stream" included
        assert {**response, "id": ""} == {**expected[1], "id": ""}
    batched, listed = stats.by_model[MODEL], direct.by_model[MODEL]
    assert batched.output_tokens == listed.output_tokens > 0
    assert batched.cost == pytest.approx(listed.cost / 2) and batched.batch_saving == pytest.approx(listed.cost / 2)
    assert not list((tmp_path / "batch_results.jsonl.batches").glob("*.spool"))  # collected: nothing left over


def test_faults_errored_and_expired_results_and_a_cut_download_end_every_line_exactly_once(tmp_path, fake_server):
    rows = [request(f"question {i}", i) for i in range(300)]
    rows += [{**request(f"invalid {i}", 1000 + i), "temprature": 0.5} for i in range(3)]  # the API refuses these
    rows.append("{not json")
    fake = fake_server(batch_errored_rate=0.05, batch_expired_rate=0.03, batch_fault_rate=0.2, batch_cut_downloads=1,
                       batch_fault_kinds=("500", "529", "502"), batch_lost_creates=1)  # made, but the answer lost
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake, batch_size=100, **FAST)

    results, errors = outputs(requests_path)
    assert Counter(record[2]["row"] for record in results) == Counter(range(300))
    assert sorted(record[2]["row"] for record in errors if record[2]) == [1000, 1001, 1002]
    assert all("invalid_request_error: temprature: Extra inputs are not permitted" in record[1][0]
               for record in errors if record[2])
    bad_line = "line 304: not valid JSON (Expecting property name enclosed in double quotes at column 2); not sent"
    assert [record[1] for record in errors if not record[2]] == [[bad_line]]
    assert stats.batch.resubmitted > 0 and fake.stats.batch_faults > 0
    assert fake.stats.batch_downloads > stats.batch.collected  # the cut download was read again
    assert fake.stats.submitted_twice == 0  # resubmitted only what errored on the API's side or expired
    assert stats.exit_code == 1  # the invalid lines


def test_sigkill_while_submitting_then_the_rerun_submits_nothing_twice(tmp_path, fake_server):
    fake = fake_server(batch_create_seconds=0.3, batch_seconds=1.0)  # a kill can land between making and answering
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(80)])
    args = batch_args(fake, requests_path, "--batch_size", "10")

    process = start_cli(*args)
    wait_until(lambda: sum(entry["step"] == "submitted" for entry in journal(requests_path)) >= 2)
    time.sleep(0.15)
    process.send_signal(signal.SIGKILL)
    process.wait()
    made_before = len(fake.batches)
    recorded = sum(entry["step"] == "submitted" for entry in journal(requests_path))
    assert made_before < 8

    rerun = run_cli(*args)

    assert rerun.returncode == 0, rerun.stderr
    assert result_rows(tmp_path / "r_results.jsonl") == Counter(range(80))
    each_submitted_once(fake)
    if made_before > recorded:  # the kill landed while a batch was being made: the rerun found it
        assert "which an earlier run was creating when it stopped" in rerun.stderr


def test_a_rerun_adopts_a_batch_made_without_its_answer_and_resends_one_never_made(tmp_path, fake_server):
    fake = fake_server(batch_seconds=600)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(20)])
    first = run_cli(*batch_args(fake, requests_path, "--batch_size", "10", "--no_wait"))
    assert first.returncode == 4, first.stderr
    folder = tmp_path / "r_results.jsonl.batches"
    entries = journal(requests_path)
    lost, never_made = [entry["key"] for entry in entries if entry["step"] == "intent"]
    # As if the first run had been killed after the upload of each batch, before its answer was recorded; and the
    # API never made the second (it is gone from the fake).
    kept = [entry for entry in entries if entry["step"] == "intent" or entry["key"] not in (lost, never_made)]
    (folder / "journal.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in kept))
    second_id = next(entry["batch_id"] for entry in entries if entry.get("key") == never_made and "batch_id" in entry)
    del fake.batches[second_id]
    fake.config.batch_seconds = 0.2  # the batch the rerun submits ends on its own
    end_batches(fake)

    rerun = run_cli(*batch_args(fake, requests_path))

    assert rerun.returncode == 0, rerun.stderr
    assert "which an earlier run was creating when it stopped: collecting it" in rerun.stderr
    assert "the API never made it, so they are sent again" in rerun.stderr
    assert result_rows(tmp_path / "r_results.jsonl") == Counter(range(20))
    assert len(fake.batches) == 2  # the adopted one, and one new batch for the ten lines of the one never made
    assert not list(folder.glob("*.spool"))


def test_no_wait_submits_then_collects_with_the_documented_exit_codes(tmp_path, fake_server):
    fake = fake_server(batch_seconds=600)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(25)])
    args = batch_args(fake, requests_path, "--batch_size", "10", "--no_wait")

    submitted = run_cli(*args)
    assert submitted.returncode == 4, submitted.stderr  # batches still processing
    assert "3 batch(es) are still processing (25 requests)" in submitted.stderr
    assert not (tmp_path / "r_results.jsonl").exists()  # no result yet: no file
    again = run_cli(*args)  # before they end: nothing submitted twice, still 4
    assert again.returncode == 4 and "25 lines in earlier runs' batches" in again.stderr
    end_batches(fake)

    collected = run_cli(*args)

    assert collected.returncode == 0, collected.stderr
    assert result_rows(tmp_path / "r_results.jsonl") == Counter(range(25))
    each_submitted_once(fake)
    assert run_cli(*args).returncode == 0 and len(fake.batches) == 3  # all done: nothing more to submit


def test_nightly_no_wait_runs_pay_once_for_the_lines_the_api_refuses(tmp_path, fake_server):
    fake = fake_server(batch_seconds=600)
    refused = [request("refused", 5, model="claude-unknown-1"), request("refused too", 6, model="claude-unknown-2")]
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(5)] + refused)

    nights = [run_in_process(requests_path, fake, no_wait=True, **FAST).exit_code for _ in range(2)]
    end_batches(fake)
    nights += [run_in_process(requests_path, fake, no_wait=True, **FAST).exit_code for _ in range(3)]

    assert nights == [4, 4, 1, 0, 0]  # processing, processing, collected with 2 failures, then nothing new
    assert len(fake.batches) == 1
    each_submitted_once(fake)
    results, errors = outputs(requests_path)
    assert len(results) == 5 and sorted(record[2]["row"] for record in errors) == [5, 6]
    assert all(record[3]["permanent"] and "not_found_error" in record[1][0] for record in errors)


def test_a_direct_run_refuses_while_batches_are_open(tmp_path, fake_server):
    fake = fake_server(batch_seconds=30)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(5)])
    assert run_cli(*batch_args(fake, requests_path, "--no_wait")).returncode == 4

    direct = run_cli("--requests_filepath", str(requests_path), "--request_url", fake.url, "--api_key", API_KEY)

    assert direct.returncode == 2 and "add --batch to collect them" in direct.stderr
    assert fake.stats.received == 0  # nothing sent, nothing paid twice


def test_a_canceled_batch_leaves_its_lines_for_the_next_run(tmp_path, fake_server):
    fake = fake_server(batch_seconds=30)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(5)])
    assert run_cli(*batch_args(fake, requests_path, "--no_wait")).returncode == 4
    batch_id = next(iter(fake.batches))
    cancel = urllib.request.Request(f"{fake.url}/batches/{batch_id}/cancel", method="POST",
                                    headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"})
    urllib.request.urlopen(cancel).read()  # someone cancelled it in the console

    left = run_cli(*batch_args(fake, requests_path))
    assert left.returncode == 3, left.stderr
    assert "5 line(s) were left for the next run" in left.stderr
    assert read_jsonl(tmp_path / "r_results.jsonl") == [] and not (tmp_path / "r_results_errors.jsonl").exists()
    fake.config.batch_seconds = 0.2

    rerun = run_cli(*batch_args(fake, requests_path))

    assert rerun.returncode == 0, rerun.stderr
    assert result_rows(tmp_path / "r_results.jsonl") == Counter(range(5))


def test_results_written_before_a_kill_are_not_written_again(tmp_path, fake_server):
    fake = fake_server(batch_seconds=600)
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(40)])
    assert run_in_process(requests_path, fake, no_wait=True, **FAST).exit_code == 4
    folder, results_path = tmp_path / "r_results.jsonl.batches", tmp_path / "r_results.jsonl"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    end_batches(fake)
    assert run_in_process(requests_path, fake, **FAST).exit_code == 0
    # As if that run had been killed after writing 15 of the 40 results: its records up to then, and 15 results.
    for name, data in before.items():
        (folder / name).write_bytes(data)
    key = journal(requests_path)[0]["key"]
    with open(folder / "journal.jsonl", "a") as file:
        file.write(json.dumps({"step": "collecting", "key": key, "results_from": 0}) + "\n")
    results_path.write_bytes(b"".join(results_path.read_bytes().splitlines(keepends=True)[:15]))
    Path(str(results_path) + ".index").unlink()

    stats = run_in_process(requests_path, fake, **FAST)

    assert stats.exit_code == 0 and stats.already_done == 15 and stats.succeeded == 25
    assert result_rows(results_path) == Counter(range(40))
    each_submitted_once(fake)


def test_process_requests_with_batch_returns_results_in_order(tmp_path, fake_server):
    fake = fake_server()
    rows = [request(f"question {i}", i) for i in range(12)] + [{"model": MODEL}]
    settings = {"request_url": fake.url, "api_key": API_KEY, "batch_size": 5, **FAST}
    with pytest.raises(app.ConfigError, match="needs a save_filepath"):
        asyncio.run(app.process_requests(rows, **settings))

    results = asyncio.run(app.process_requests(rows, save_filepath=str(tmp_path / "out.jsonl"), **settings))

    assert [result.metadata for result in results[:12]] == [{"row": i} for i in range(12)]
    assert all(result.ok and result.text == f"Echo: question {i}" for i, result in enumerate(results[:12]))
    assert not results[12].ok and "line 13: missing or invalid 'max_tokens'" in results[12].errors[0]
    assert len(fake.batches) == 3


def test_batches_are_split_under_the_size_limit_too(tmp_path, fake_server, monkeypatch):
    fake = fake_server()
    monkeypatch.setattr(app, "MAX_BATCH_BYTES", 2_000)  # about ten of these requests
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"question {i}", i) for i in range(35)])

    run_in_process(requests_path, fake, **FAST)

    sizes = [len(batch.requests) for batch in fake.batches.values()]
    assert len(sizes) >= 3 and sum(sizes) == 35 and max(sizes) <= 15  # not one batch of 35
    assert result_rows(tmp_path / "r_results.jsonl") == Counter(range(35))


def test_a_rejected_key_stops_a_batch_run_with_exit_2(tmp_path, fake_server):
    fake = fake_server(api_key="sk-ant-another-key")
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("question", 1)])

    result = run_cli(*batch_args(fake, requests_path))

    assert result.returncode == 2
    assert "the API rejected the key" in result.stderr and API_KEY not in result.stderr


def test_batch_flags_are_checked(tmp_path):
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("question", 1)])
    for extra, message in ((["--no_wait"], "no_wait applies to batch runs only"),
                           (["--batch", "--batch_size", "100001"], "--batch_size: expected a whole number from 1 to")):
        result = run_cli("--requests_filepath", str(requests_path), "--api_key", API_KEY, *extra)
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_dry_run_with_batch_shows_the_batch_price(tmp_path):
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request(f"q {i}", i, max_tokens=20_000) for i in range(10)])
    listed = run_cli("--requests_filepath", str(requests_path), "--dry_run")
    batched = run_cli("--requests_filepath", str(requests_path), "--dry_run", "--batch")

    def total(output: str) -> tuple[float, float]:
        line = next(line for line in output.splitlines() if line.startswith("Estimated cost"))
        low, high = (float(part.split()[0].lstrip("$")) for part in line.split(": ", 1)[1].split(" to ")[:2])
        return low, high

    assert total(batched.stdout)[1] == pytest.approx(total(listed.stdout)[1] / 2, rel=0.02)
    assert "Message Batches API" in batched.stdout and "within the hour" in batched.stdout


@pytest.mark.parametrize(("result", "attempts", "action", "problem"), [
    ({"type": "errored", "error": {"error": {"type": "invalid_request_error", "message": "bad"}}}, 1, app.FAIL,
     "errored: invalid_request_error: bad"),
    ({"type": "errored", "error": {"error": {"type": "api_error", "message": "oops"}}}, 1, app.RETRY,
     "errored: api_error: oops"),
    ({"type": "errored", "error": {"error": {"type": "overloaded_error", "message": "busy"}}}, 5, app.GIVE_UP,
     "errored: overloaded_error: busy"),
    ({"type": "expired"}, 1, app.RETRY, "expired (not processed within 24 hours)"),
    ({"type": "expired"}, 5, app.GIVE_UP, "expired (not processed within 24 hours)"),
    ({"type": "canceled"}, 1, app.GIVE_UP, ""),
])
def test_each_batch_result_that_did_not_succeed_has_one_fate(result, attempts, action, problem):
    assert app.decide_batch_result(result, attempts, max_attempts=5) == (action, problem)


@pytest.mark.parametrize(("line", "expected"), [
    (b'{"custom_id": "k1-3", "result": {"type": "expired"}}', (3, {"type": "expired"})),
    (b'{"custom_id": "k1-b-0", "result": {}}', ValueError),  # another batch's
    (b'{"custom_id": "k1-4", "result": {}}', ValueError),  # past the batch's 4 requests
    (b'{"custom_id": "k1--1", "result": {}}', ValueError),
    (b'{"custom_id": "k1-x", "result": {}}', ValueError),
    (b'{"custom_id": "k1-0", "result": "succeeded"}', TypeError),
    (b'{"custom_id": "k1-0"}', KeyError),
    (b'{"custom_id": 7, "result": {}}', AttributeError),
    (b'["k1-0"]', TypeError),
    (b'{"custom_id": "k1-0", "res', ValueError),  # a line cut off
])
def test_a_result_line_is_one_of_the_batchs_requests_or_an_error(line, expected):
    if isinstance(expected, tuple):
        assert app.batch_result_item(line, "k1", 4) == expected
    else:
        with pytest.raises(expected):
            app.batch_result_item(line, "k1", 4)


def test_a_batch_refuses_max_tokens_0_per_line(tmp_path, fake_server):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("warm", 1, max_tokens=0), request("fine", 2)])

    stats = run_in_process(requests_path, fake, **FAST)

    results, errors = outputs(requests_path)
    assert stats.exit_code == 1 and [record[2] for record in results] == [{"row": 2}]
    assert len(errors) == 1 and "max_tokens 0 (warming the prompt cache) is not allowed in a batch" in errors[0][1][0]
    assert [len(batch.requests) for batch in fake.batches.values()] == [1]


@pytest.mark.parametrize(("version", "sent"), [("2026-10-21", [1]), ("2023-06-01", [1, 2])])
def test_batches_are_created_with_the_chosen_api_version(tmp_path, fake_server, version, sent):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("fine", 1), request("sampled", 2, temperature=1.0)])

    run_in_process(requests_path, fake, anthropic_version=version, **FAST)

    assert sorted(record[2]["row"] for record in outputs(requests_path)[0]) == sent
    assert fake.stats.versions_seen == {version: 1}  # the create call; its version applies to every request


def test_a_batch_holds_lines_with_the_same_betas_sent_on_its_create_call(tmp_path, fake_server):
    fake = fake_server()
    rows = [request("a", 0), request("b", 1, betas=["output-300k-2026-03-24"]),
            request("c", 2, betas=["output-300k-2026-03-24"]), request("d", 3)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake, **FAST)

    assert stats.exit_code == 0 and sorted(record[2]["row"] for record in outputs(requests_path)[0]) == [0, 1, 2, 3]
    assert fake.stats.betas_seen[:3] == [(), ("output-300k-2026-03-24",), ()]  # one create per run of equal betas
    assert [len(batch.requests) for batch in fake.batches.values()] == [1, 2, 1]
    assert not any("betas" in params for batch in fake.batches.values() for _, params in batch.requests)


def test_every_batch_result_line_validates_as_the_sdk_s_type(tmp_path, fake_server):
    from anthropic.types.messages import MessageBatchIndividualResponse

    fake = fake_server(batch_errored_rate=0.3, batch_expired_rate=0.2)
    rows = [request(f"q{i}", i) for i in range(20)] + [request("bad", 20, temprature=1)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)
    run_in_process(requests_path, fake, max_attempts=1, **FAST)

    lines = [json.dumps(result) for batch in fake.batches.values() for result in batch.results or []]

    assert {json.loads(line)["result"]["type"] for line in lines} == {"succeeded", "errored", "expired"}
    for line in lines:
        MessageBatchIndividualResponse.model_validate_json(line)
