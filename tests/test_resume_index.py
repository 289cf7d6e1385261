"""The resume index beside the results file: lines recognised without parsing, and the results file
always the truth when the index is missing, stale or damaged."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, outputs, read_jsonl, request, run_cli, run_in_process, write_jsonl

import api_request_parallel_processor as app


def count_parses(monkeypatch) -> list[int]:
    """Counts every input line the processor parses."""
    calls: list[int] = []
    original = app.parse_request

    def counting(raw):
        calls.append(1)
        return original(raw)

    monkeypatch.setattr(app, "parse_request", counting)
    return calls


def rows_in(path: Path) -> Counter[int]:
    return Counter(record[2]["row"] for record in read_jsonl(path))


def first_run(tmp_path: Path, fake, count: int = 20, words: str = "") -> tuple[Path, Path]:
    rows = [request(f"question {i}{words}", i) for i in range(count)] + [request("repeat", 99)] * 2
    requests_path = write_jsonl(tmp_path / "r.jsonl", rows)
    assert run_in_process(requests_path, fake).succeeded == count + 2
    return requests_path, tmp_path / "r_results.jsonl"


def test_a_rerun_recognises_answered_lines_without_parsing_them(tmp_path, fake_server, monkeypatch):
    fake = fake_server()
    requests_path, results_path = first_run(tmp_path, fake)
    assert Path(str(results_path) + ".index").exists()
    with open(requests_path, "a") as file:
        file.write(json.dumps(request("new", 100)) + "\n" + json.dumps(request("repeat", 99)) + "\n")
    parses = count_parses(monkeypatch)

    stats = run_in_process(requests_path, fake)

    assert stats.already_done == 22 and stats.succeeded == 2 and fake.stats.received == 24
    assert len(parses) == 2  # only the new line and the third repeat, which has no result yet
    assert rows_in(results_path) == Counter({**{i: 1 for i in range(20)}, 99: 3, 100: 1})
    parses.clear()
    assert run_in_process(requests_path, fake).already_done == 24 and parses == []


def test_a_line_matched_by_content_is_learned_for_the_next_run(tmp_path, fake_server, monkeypatch):
    fake = fake_server()
    requests_path, results_path = first_run(tmp_path, fake)
    Path(str(results_path) + ".index").unlink()  # as if written by an older version: every line is parsed once...
    parses = count_parses(monkeypatch)
    assert run_in_process(requests_path, fake).already_done == 22 and len(parses) == 22
    parses.clear()
    assert run_in_process(requests_path, fake).already_done == 22 and parses == []
    assert fake.stats.received == 22


def damage_the_index(index: Path) -> None:
    """Point the first line's slot at the second line's result, behind an unchanged header: trusted, that
    would skip the first line on the second's result and send the second one twice."""
    header = index.read_bytes()[:app.INDEX_HEADER_BYTES]
    saved = app.ResumeIndex.read(str(index))
    first, second = (app.hash_line(line) for line in (index.parent / "r.jsonl").read_bytes().splitlines()[:2])
    first_position, second_position = saved.lines.index(first), saved.lines.index(second)
    saved.slots[saved.slots.index(first_position + 1)] = second_position + 1
    saved.lines[second_position] = first
    with open(index, "wb") as file:
        file.write(header)
        for part in (saved.contents, saved.lines, saved.slots):
            part.tofile(file)


def edit_a_result_away(results: Path) -> None:
    lines = results.read_bytes().splitlines(keepends=True)
    results.write_bytes(b"".join(line for line in lines if b'"question 7"' not in line))


def edit_a_result_in_place(results: Path) -> None:
    """The same length, another request: only the contents can tell."""
    data = results.read_bytes()
    record = next(line for line in data.splitlines() if b'"question 7"' in line)
    edited = record.replace(b'"question 7"', b'"qvestion 7"').replace(b'{"row": 7}', b'{"row":-7}')
    assert len(edited) == len(record) and edited != record
    results.write_bytes(data.replace(record, edited))


def append_a_result_by_hand(results: Path) -> None:
    body = request("written by hand", 500)
    metadata = body.pop("metadata")
    with open(results, "a") as file:
        answer = {"id": "msg_byhand", "type": "message", "role": "assistant", "model": body["model"], "content": [],
                  "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 0}}
        file.write(json.dumps([body, answer, metadata]) + "\n")


@pytest.mark.parametrize("change, sent_again", [
    (lambda index, results: index.unlink(), []),  # missing
    (lambda index, results: damage_the_index(index), []),  # damaged
    (lambda index, results: index.write_bytes(b"not an index"), []),  # not an index at all
    (lambda index, results: edit_a_result_away(results), [7]),  # stale: a result removed by hand
    (lambda index, results: edit_a_result_in_place(results), [7]),  # stale: a result changed by hand
    (lambda index, results: results.write_bytes(b""), list(range(20)) + [99, 99]),  # stale: results emptied
    (lambda index, results: append_a_result_by_hand(results), []),  # records past what the index covers
])
def test_the_results_file_is_the_truth_whatever_the_index_says(tmp_path, fake_server, change, sent_again):
    fake = fake_server()
    requests_path, results_path = first_run(tmp_path, fake)
    with open(requests_path, "a") as file:
        file.write(json.dumps(request("written by hand", 500)) + "\n")
    change(Path(str(results_path) + ".index"), results_path)
    received_before = len(fake.stats.bodies_seen)

    stats = run_in_process(requests_path, fake)

    resent = sorted(body["messages"][0]["content"] for body in fake.stats.bodies_seen[received_before:])
    hand_written = "written by hand" in results_path.read_text() and not any(
        "written by hand" in text for text in resent)
    expected = sorted(["repeat" if row == 99 else f"question {row}" for row in sent_again]
                      + ([] if hand_written else ["written by hand"]))
    assert resent == expected
    assert stats.failed == 0 and outputs(requests_path)[1] == []
    final = Counter({row: count for row, count in rows_in(results_path).items() if row >= 0})
    assert final == Counter({**{i: 1 for i in range(20)}, 99: 2, 500: 1})
    index = app.ResumeIndex.load(str(results_path))  # what the next run will find: the index matches
    assert index.covered == results_path.stat().st_size and len(index) == len(read_jsonl(results_path))
    assert app.ResumeIndex.read(str(results_path) + ".index").covered == index.covered


def test_the_learned_token_ratio_carries_over_to_the_dry_run_and_the_next_run(tmp_path, fake_server):
    fake = fake_server(token_ratio=1.7)
    requests_path, results_path = first_run(tmp_path, fake, count=10, words=" about the annual report" * 40)
    learned = app.saved_token_ratios(str(results_path))["claude-sonnet-5-5"]
    assert 1.5 < learned < 2.5  # the fake counts 1.7x cl100k_base, plus a few tokens per message

    result = run_cli("--requests_filepath", str(requests_path), "--dry_run", "--start_over")  # as if sent again
    assert f"Claude counts about {learned:.2f}x, as learned by earlier runs" in result.stdout, result.stdout
    fresh = run_cli("--requests_filepath", str(ROOT / "examples" / "test_requests_to_parallel_process.jsonl"),
                    "--dry_run", "--save_filepath", str(tmp_path / "none.jsonl"))
    assert "Claude counts about 1.40x)" in fresh.stdout
    processor = app.Processor(app.Settings(api_key="k"), None, [], app.ResultCollector([]),
                              app.ResumeIndex.load(str(results_path)), app.RememberedFailures(""), {})
    assert processor.lanes["claude-sonnet-5-5"].input_ratio == pytest.approx(learned)


def test_many_results_survive_a_save_and_a_load_whatever_order_they_came_in(tmp_path, monkeypatch):
    monkeypatch.setattr(app, "INDEX_CHUNK", 1000)  # several chunks of new results to sort and merge
    results_path = tmp_path / "results.jsonl"
    results_path.write_bytes(b"")
    index = app.ResumeIndex()
    pairs = [((i * 0x9E3779B97F4A7C15) % (1 << 64), (i * 0xC2B2AE3D27D4EB4F) % (1 << 63) or 1) for i in range(1, 5001)]
    pairs += [(pairs[7][0], 0)] * 2  # the same request twice more, with no known line
    for content, line in pairs:
        index.result_written(content, line or None, b"")
    index.save(str(results_path), {"m": 1.25})

    loaded = app.ResumeIndex.read(str(results_path) + ".index")
    assert list(loaded.contents) == sorted(content for content, _ in pairs) and loaded.token_ratios == {"m": 1.25}
    assert all(loaded.claim_line(line) for _, line in pairs[:5000])
    assert loaded.claim_line(pairs[7][1]) and loaded.claim(pairs[7][0], None)  # three results of that request...
    assert not loaded.claim_line(pairs[7][1]) and not loaded.claim(pairs[7][0], None)  # ...all used up
    assert not loaded.claim_line(12345)  # a line never seen
