"""Answers out: one row per input line, in input order, from the results and errors files (--export, export_rows)."""

from __future__ import annotations

import csv
import json

import pytest
from aiohttp import web
from conftest import API_KEY, read_jsonl, request, run_in_process, write_jsonl

import api_request_parallel_processor as app


def mixed_file(tmp_path):
    """Answered lines (one of them twice), a refused request, a bad line and a line in the Batches format."""
    return write_jsonl(tmp_path / "r.jsonl", [
        request("first", 0), request("[[always:400]] refused", 1), "{oops", request("twice", 3), request("twice", 3),
        {"custom_id": "c-5", "params": request("batches format")},
    ])


def test_the_export_has_a_row_per_input_line_in_input_order(tmp_path, fake_server):
    fake = fake_server()
    requests_path = mixed_file(tmp_path)
    stats = run_in_process(requests_path, fake, export=str(tmp_path / "answers.csv"))
    assert stats.succeeded == 4
    with open(tmp_path / "r.jsonl", "a") as file:  # appended since: not sent yet
        file.write(json.dumps(request("later", 6)) + "\n")
    assert app.main(["--requests_filepath", str(requests_path), "--export", str(tmp_path / "answers.csv"),
                     "--export_only"]) == 0

    with open(tmp_path / "answers.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))

    assert [row["line"] for row in rows] == ["1", "2", "3", "4", "5", "6", "7"]
    assert [row["row"] for row in rows] == ["0", "1", "", "3", "3", "", "6"]  # the metadata's fields, as columns
    assert [row["custom_id"] for row in rows] == ["", "", "", "", "", "c-5", ""]
    assert [row["status"] for row in rows] == ["answered", "failed", "failed", "answered", "answered", "answered",
                                               "pending"]
    assert rows[0]["text"] == "Echo: first" and rows[0]["stop_reason"] == "end_turn"
    assert int(rows[0]["output_tokens"]) > 0 and float(rows[0]["cost_usd"]) > 0
    assert "HTTP 400 invalid_request_error" in rows[1]["error"] and "line 3: not valid JSON" in rows[2]["error"]
    assert rows[6]["text"] == rows[6]["error"] == ""


def test_export_rows_gives_the_same_rows_to_python_and_the_jsonl_export(tmp_path, fake_server):
    fake = fake_server()
    requests_path = mixed_file(tmp_path)
    run_in_process(requests_path, fake, export=str(tmp_path / "answers.jsonl"))

    rows = list(app.export_rows(str(requests_path)))

    assert rows == read_jsonl(tmp_path / "answers.jsonl")
    assert [row["status"] for row in rows] == ["answered", "failed", "failed", "answered", "answered", "answered"]
    assert rows[0]["row"] == 0 and rows[0]["model"] == "claude-sonnet-5-5" and rows[0]["line"] == 1
    assert set(rows[2]) == {"line", *app.EXPORT_COLUMNS}  # a bad line has no metadata


def test_export_only_needs_no_key_and_sends_nothing(tmp_path, fake_server, capsys):
    fake = fake_server()
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("not sent", 0)])

    exit_code = app.main(["--requests_filepath", str(requests_path), "--request_url", fake.url, "--export",
                          str(tmp_path / "a.jsonl"), "--export_only"])

    assert exit_code == 0 and fake.stats.received == 0
    assert [row["status"] for row in read_jsonl(tmp_path / "a.jsonl")] == ["pending"]


@pytest.mark.parametrize(("export", "expected"), [
    ("r_results.jsonl", "would overwrite the results file"),
    ("r.jsonl", "would overwrite the requests file"),
])
def test_an_export_that_would_overwrite_a_file_of_the_run_is_refused(tmp_path, fake_server, capsys, export,
                                                                      expected):
    requests_path = write_jsonl(tmp_path / "r.jsonl", [request("x", 0)])
    before = requests_path.read_bytes()

    exit_code = app.main(["--requests_filepath", str(requests_path), "--api_key", API_KEY, "--export",
                          str(tmp_path / export), "--export_only"])

    assert exit_code == 2 and expected in capsys.readouterr().err
    assert requests_path.read_bytes() == before
    with pytest.raises(app.ConfigError, match="must end in .csv or .jsonl"):
        app.Settings(requests_filepath=str(requests_path), export="answers.txt")


def test_a_refusal_is_counted_apart_and_a_fallback_is_priced_by_the_model_that_answered(tmp_path, fake_server,
                                                                                        captured_logs):
    async def refuse_or_fall_back(request, body):
        text = body["messages"][0]["content"]
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"], "content": [],
                   "stop_reason": "end_turn", "usage": {"input_tokens": 50_000, "output_tokens": 0}}
        if text == "refuse":
            return web.json_response({**message, "stop_reason": "refusal", "stop_details": {"category": "cyber"}})
        if text == "fall back":
            return web.json_response({**message, "model": "claude-haiku-5-5"})  # at Haiku 5.5's $0.10 a million
        return None

    fake = fake_server(hostile=refuse_or_fall_back)
    rows = [request("refuse", 0), request("fall back", 1, fallbacks=[{"model": "claude-haiku-5-5"}]), request("ok", 2)]
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)

    stats = run_in_process(requests_path, fake, export=str(tmp_path / "a.jsonl"))

    rows_out = read_jsonl(tmp_path / "a.jsonl")
    assert stats.exit_code == 0 and stats.refused == 1
    assert [row["status"] for row in rows_out] == ["refused", "answered", "answered"]
    assert stats.by_model["claude-haiku-5-5"].cost == pytest.approx(0.005)  # not Sonnet's $0.10
    assert any("1 line(s) the model refused" in line for line in captured_logs)
