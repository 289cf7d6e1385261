"""Every way a run stops is one value of one type, with its exit code and its message; the exit codes are one
table, which --help and the README show."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, run_cli

import api_request_parallel_processor as app

FACTS = {"lasted": "15m00s", "asked": "", "budget": "$0.98 of the $1.00 budget"}


@pytest.mark.parametrize(("stop", "exit_code", "cuts", "logged"), [
    (app.Stop.SIGINT, 130, True, "WARNING SIGINT: sending no new requests."),
    (app.Stop.SIGTERM, 143, True, "WARNING SIGTERM: sending no new requests."),
    (app.Stop.SIGHUP, 129, True, "WARNING SIGHUP: sending no new requests."),
    (app.Stop.KEY_REJECTED, 2, False, ("ERROR Stopping the run: the API rejected the key (HTTP 401 "
                                      "authentication_error): check ANTHROPIC_API_KEY.")),
    (app.Stop.UNUSABLE_ADDRESS, 2, True, ("ERROR Cannot use HTTP 401 authentication_error. Nothing was ever answered "
                                         "there: check --request_url and the network. Stopping.")),
    (app.Stop.NO_PRICE, 2, True, ("ERROR --max_cost needs the price of every model, and HTTP 401 authentication_error "
                                 "has none: give it with --prices. Stopping.")),
    (app.Stop.WRITE_FAILED, 2, True, "ERROR HTTP 401 authentication_error: sending no new requests."),
    (app.Stop.BATCH_REFUSED, 2, True, ("ERROR A batch endpoint refused a call: HTTP 401 authentication_error. "
                                      "Stopping; run again once this is fixed.")),
    (app.Stop.OUTAGE, 3, True, ("ERROR No answer from the API for 15m00s (the last: HTTP 401 authentication_error): "
                               "stopping. Run the same command again once it is back.")),
    (app.Stop.ONLY_429S, 3, True, ("ERROR Nothing but 429s (rate limited) for 15m00s: another program may be using "
                                  "the whole limit. Stopping.")),
    (app.Stop.INPUT_CHANGED, 3, False, ("WARNING The requests file changed while it was read (rewritten in place?): "
                                       "line HTTP 401 authentication_error and the rest are left for the next run.")),
    (app.Stop.LEFT_FOR_NEXT_RUN, 3, False, ("WARNING HTTP 401 authentication_error line(s) were left for the next run "
                                           "(canceled, or expired or errored on the API's side --max_attempts times): "
                                           "run the same command again to send them.")),
    (app.Stop.BATCHES_OPEN, 4, False, ("INFO HTTP 401 authentication_error: run the same command again later to "
                                      "collect them.")),
    (app.Stop.BUDGET, 5, False, ("WARNING The next request could take this run's cost past the budget: sending no new "
                                "requests. So far $0.98 of the $1.00 budget.")),
    (app.Stop.ORGANIZATION_REFUSED, 6, True, ("ERROR The API refuses every request of the organization "
                                             "(HTTP 401 authentication_error): . Stopping.")),
])
def test_each_stop_has_its_exit_code_its_grace_and_its_message(captured_logs, monkeypatch, stop, exit_code, cuts,
                                                                logged):
    monkeypatch.setattr(app.log, "threshold", 0)
    app.log_stop(stop, "HTTP 401 authentication_error", **FACTS)
    assert (stop.exit_code, stop.cuts_requests_in_flight, captured_logs) == (exit_code, cuts, [logged])


def test_an_organizations_refusal_says_what_to_do_and_the_fate_follows_the_message(captured_logs, monkeypatch):
    monkeypatch.setattr(app.log, "threshold", 0)
    app.log_stop(app.Stop.ORGANIZATION_REFUSED, "organization_on_hold", "Nothing is in flight.", **FACTS)
    assert captured_logs == [("ERROR The API refuses every request of the organization (organization_on_hold): the "
                             "organization is on hold: see the Console, or contact Anthropic's support. Stopping. "
                             "Nothing is in flight.")]


@pytest.mark.parametrize(("first", "then", "kept"), [
    (None, app.Stop.INPUT_CHANGED, app.Stop.INPUT_CHANGED),
    (app.Stop.INPUT_CHANGED, app.Stop.BATCHES_OPEN, app.Stop.BATCHES_OPEN),  # 4 says more than 3
    (app.Stop.BATCHES_OPEN, app.Stop.LEFT_FOR_NEXT_RUN, app.Stop.BATCHES_OPEN),
    (app.Stop.BATCHES_OPEN, app.Stop.SIGINT, app.Stop.SIGINT),  # an interruption says more than an ending
    (app.Stop.KEY_REJECTED, app.Stop.WRITE_FAILED, app.Stop.WRITE_FAILED),
    (app.Stop.SIGINT, app.Stop.OUTAGE, app.Stop.SIGINT),  # the first interruption stands
    (app.Stop.SIGTERM, app.Stop.SIGINT, app.Stop.SIGTERM),
    (app.Stop.KEY_REJECTED, app.Stop.KEY_REJECTED, app.Stop.KEY_REJECTED),
])
def test_the_stop_that_says_most_of_the_run_is_kept(first, then, kept):
    stats = app.RunStats(stop=first)
    assert stats.stop_with(then) is (kept is then and kept is not first)
    assert stats.stop is kept and stats.exit_code == kept.exit_code


def readme_exit_codes() -> dict[int, str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(code): meaning.replace("`", "") for code, meaning in re.findall(r"^\| (\d+) \| (.+) \|$", table,
                                                                               flags=re.MULTILINE)}


def test_every_exit_code_is_in_the_one_table_and_the_readme_and_help_show_it():
    assert {0, 1} | {stop.exit_code for stop in app.Stop} == set(app.EXIT_CODES)
    assert readme_exit_codes() == app.EXIT_CODES
    result = run_cli("--help")
    shown = "".join(result.stdout.split())  # argparse wraps the epilog anywhere
    assert result.returncode == 0 and all("".join(f"{code} {meaning}".split()) in shown
                                          for code, meaning in app.EXIT_CODES.items())
