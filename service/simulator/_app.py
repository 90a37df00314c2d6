"""The simulator as an ASGI application: routing, the request log and fault handling."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from ._config import SimulatorConfig
from ._continuation import Continuations, requested_hops, split_into_hops
from ._errors import ApiError, failed_precondition, invalid
from ._faults import FaultPlan, FaultSpec
from ._generate import generate, generate_model, surface_of
from ._model import ModelTurn, SimulatedModel
from ._sse import DONE, encode_event, stream_events
from ._steps import Ledger, normalize_input, user_text
from ._store import Clock, InteractionStore, StoredInteraction

__all__ = ["DroppedConnection", "RecordedRequest", "Simulator"]

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

# /{version}/interactions[/{id}][/cancel], with Vertex's /projects/{p}/locations/{l} prefix too.
_ROUTE = re.compile(r"^/(?P<version>[^/]+)/(?:projects/[^/]+/locations/[^/]+/)?interactions(?:/(?P<rest>.+))?$")
_CREATE_FIELDS = frozenset(
    {
        "model",
        "agent",
        "agent_config",
        "input",
        "previous_interaction_id",
        "system_instruction",
        "tools",
        "generation_config",
        "store",
        "background",
        "stream",
        "response_format",
        "response_mime_type",
        "response_modalities",
        "safety_settings",
        "labels",
        "service_tier",
        "cached_content",
        "webhook_config",
        "environment",
        "continuation_token",
    }
)
_THINKING_LEVELS = frozenset({"minimal", "low", "medium", "high", "xhigh"})
_REDACTED_HEADERS = frozenset({"x-goog-api-key", "authorization"})


class DroppedConnection(Exception):
    """Raised after a partial response so the server closes the connection (fault injection)."""


@dataclass
class RecordedRequest:
    """One request exactly as the client sent it, and the JSON the simulator answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw text when the body is not JSON, or None when empty
    status: int | None = field(default=None, compare=False)
    response: Any = field(default=None, compare=False)  # JSON body, or the SSE events
    # The body's bytes exactly as they arrived, for tests of what a client put on the wire (not in
    # `as_json`: the parsed `body` is what the log shows).
    raw: bytes = field(default=b"", compare=False, repr=False)

    def as_json(self, *, redact: bool = True) -> dict[str, Any]:
        data = asdict(self)
        # The body's size as sent, not the bytes: what a benchmark of the wire needs.
        data["body_bytes"] = len(data.pop("raw"))
        if redact:
            data["headers"] = {k: ("<redacted>" if k in _REDACTED_HEADERS else v) for k, v in self.headers.items()}
        return data


class Simulator:
    """A strict, deterministic stand-in for the Gemini Interactions REST API."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.clock = Clock()
        self.store = InteractionStore(self.clock)
        self.ledger = Ledger()
        self.continuations = Continuations()
        self.model = SimulatedModel(emit_unknown=self.config.emit_unknown)
        self.faults = FaultPlan()
        self.closing = threading.Event()
        self._log_lock = threading.Lock()
        self._requests: deque[RecordedRequest] = deque(maxlen=self.config.request_log_limit)
        self._verbatim: deque[bytes] = deque()

    # --- the Python API tests use -------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """API requests received so far, oldest first (admin calls are not recorded)."""
        with self._log_lock:
            return list(self._requests)

    def creates(self) -> list[dict[str, Any]]:
        """Bodies of the create requests received so far."""
        return [r.body for r in self.create_requests()]

    def create_requests(self) -> list[RecordedRequest]:
        """The create requests received so far, with what was answered."""
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/interactions")]

    def generate_requests(self) -> list[RecordedRequest]:
        """The generateContent requests received so far, with what was answered."""
        return [r for r in self.requests if r.method == "POST" and r.path.endswith(":generateContent")]

    def answer_next_create(self, body: bytes) -> None:
        """Answer the next valid create request with exactly these bytes (HTTP 200), instead of
        the simulated model's JSON: how a test shows that a step's spelling (key order, spacing,
        how a number is written) survives storage and replay, as a re-serializer's would not."""
        self._verbatim.append(body)

    def inject(self, fault: FaultSpec) -> None:
        self.faults.inject(fault)

    def set_fault_rates(self, rates: list[tuple[float, FaultSpec]], seed: int = 0) -> None:
        """Give requests faults at random (see _faults.py); `reset` stops it."""
        self.faults.set_rates(rates, seed)

    def advance(self, seconds: float) -> None:
        """Move the simulator's clock forward (expiry, background progress)."""
        self.clock.advance(seconds)

    def reset(self, *, state: bool = False) -> None:
        """Forget logged requests and pending faults; with `state`, stored interactions and the
        ledger of produced steps too."""
        with self._log_lock:
            self._requests.clear()
        self.faults.clear()
        self._verbatim.clear()
        if state:
            self.store.clear()
            self.ledger.clear()
            self.continuations.clear()

    # --- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        raw = await _read_body(receive)
        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith("/_simulator/"):
            await self._admin(method, path, raw, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        record = RecordedRequest(method, path, query, headers, _parse_body(raw), raw=raw)
        self._record(record)
        try:
            fault = self.faults.next_fault(headers.get("x-sim-fault"), surface_of(path))
        except ValueError as exc:
            await _send_json(send, 400, invalid(f"x-sim-fault: {exc}").body())
            return
        await self._delay(fault)
        if fault is not None and fault.status is not None:
            extra = [] if fault.retry_after is None else [(b"retry-after", _num(fault.retry_after))]
            err = ApiError(fault.status, f"simulated {fault.status}")
            record.status, record.response = fault.status, err.body()
            await _send_json(send, fault.status, err.body(), extra)
            return
        try:
            self._authenticate(headers)
            result = self._dispatch(method, path, query, raw)
        except ApiError as exc:
            record.status, record.response = exc.code, exc.body()
            await _send_json(send, exc.code, exc.body())
            return
        record.status, record.response = 200, result
        if self._verbatim and method == "POST" and path.endswith("/interactions"):
            verbatim = self._verbatim.popleft()
            record.response = _parse_body(verbatim)
            # Its steps count as the model's own, so that replaying them is accepted; a stored
            # interaction is kept as answered (its id and steps), so chaining onto it works.
            if isinstance(record.response, dict) and isinstance(record.response.get("steps"), list):
                self.ledger.record(record.response["steps"])
                if isinstance(result, dict) and isinstance(record.response.get("id"), str):
                    self.store.adopt(str(result.get("id")), record.response["id"], record.response["steps"])
            if isinstance(result, list) and isinstance(record.response, dict):
                # A streamed create: the given answer's steps streamed as the simulator streams its
                # own (its JSON spelling is the stream's to choose, as the real API's is).
                events = _verbatim_events(record.response, self.config.stream_chunk_words)
                record.response = events
                await _send_stream(send, events, drop_after=None, pacing=self._pacing(fault))
                return
            await _send_bytes(send, 200, verbatim)
            return
        drop = fault is not None and fault.drop
        if isinstance(result, list):
            await _send_stream(
                send, result, drop_after=fault.drop_after_events if drop and fault else None, pacing=self._pacing(fault)
            )
        else:
            await _send_json(send, 200, result, drop=drop)

    async def _delay(self, fault: FaultSpec | None) -> None:
        latency = self.config.latency_ms + (fault.latency_ms if fault else 0.0)
        if latency:
            await asyncio.sleep(latency / 1000)
        if fault is not None and fault.hang_seconds:
            # Poll so that stopping the simulator releases hung requests promptly. Polled, not
            # awaited: the deadline is on the simulator's clock, which tests move with advance(),
            # and `closing` is a threading.Event set from the thread that stops the server.
            deadline = self.clock.now() + fault.hang_seconds
            while self.clock.now() < deadline and not self.closing.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    def _pacing(self, fault: FaultSpec | None) -> Callable[[int], Awaitable[None]] | None:
        """What a stream waits for before its event number `n` (from 0): the fault's gap, and its
        pause (until the clock has moved on, or the simulator stops)."""
        if fault is None or (not fault.event_gap_ms and fault.pause_after_events is None):
            return None

        async def wait(number: int) -> None:
            if number and fault.event_gap_ms:
                await asyncio.sleep(fault.event_gap_ms / 1000)
            if number == fault.pause_after_events:
                deadline = self.clock.now() + fault.pause_seconds
                while self.clock.now() < deadline and not self.closing.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.02)

        return wait

    def _record(self, request: RecordedRequest) -> None:
        with self._log_lock:
            self._requests.append(request)
            if self.config.request_log_path is not None:
                with self.config.request_log_path.open("a", encoding="utf-8") as log:
                    log.write(json.dumps(request.as_json()) + "\n")

    def _authenticate(self, headers: dict[str, str]) -> None:
        key = headers.get("x-goog-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not key:
            raise ApiError(403, "Method doesn't allow unregistered callers. Please use an API key.")
        if self.config.api_key is not None and key != self.config.api_key:
            raise invalid("API key not valid. Please pass a valid API key.")

    def _dispatch(self, method: str, path: str, query: dict[str, str], raw: bytes) -> Any:
        model = generate_model(path)
        if model is not None:
            if method != "POST":
                raise ApiError(405, f"{method} is not allowed here", "METHOD_NOT_ALLOWED")
            return generate(self, model, raw)
        match = _ROUTE.match(path)
        if match is None:
            raise ApiError(404, f"no such endpoint: {method} {path}")
        rest = match.group("rest")
        if rest is None:
            if method != "POST":
                raise ApiError(405, f"{method} is not allowed here", "METHOD_NOT_ALLOWED")
            return self._create(_parse_create_body(raw))
        if method == "POST" and rest.endswith("/cancel"):
            return self._cancel(rest.removesuffix("/cancel"))
        if method == "GET":
            return self._get(rest, query)
        if method == "DELETE":
            self.store.delete(rest)
            return {}
        raise ApiError(405, f"{method} is not allowed here", "METHOD_NOT_ALLOWED")

    # --- the four operations ------------------------------------------------------------------

    def _create(self, body: dict[str, Any]) -> Any:
        _validate_create(body)
        if "continuation_token" in body:
            return self._continue(body)
        store = body.get("store", True)  # the real API stores unless told not to
        background = body.get("background", False)
        if background and not store:
            raise invalid("background=true requires store=true")
        if background and body.get("stream"):
            raise invalid("the simulator does not stream background interactions")
        history: list[dict[str, Any]] = []
        previous_id = body.get("previous_interaction_id")
        if previous_id is not None:
            previous = self.store.get(previous_id)
            if previous.status(self.clock.now()) in {"queued", "in_progress"}:
                raise failed_precondition(f"interaction {previous_id!r} has not finished")
            history = previous.transcript
        input_steps = normalize_input(body["input"])
        self.ledger.check_history(history, input_steps, strict=self.config.strict_replay)

        interaction_id = "int_" + secrets.token_hex(12)
        turn = self.model.reply(interaction_id, history + input_steps, body)
        last = input_steps[-1]
        if last["type"] == "user_input" and not background and not body.get("stream"):
            if extra_hops := requested_hops(user_text(last)):
                return self._first_hop(interaction_id, body, history, input_steps, turn, extra_hops)
        self.ledger.record(turn.steps)
        now = self.clock.now()
        item = StoredInteraction(
            id=interaction_id,
            body=body,
            history=history,
            input_steps=input_steps,
            steps=turn.steps,
            final_status=turn.status,
            usage=turn.usage,
            created=now,
            expires=now + self.config.retention_seconds,
            background=background,
        )
        if background:
            item.queued_until = now + self.config.background_queued_seconds
            item.done_at = item.queued_until + self.config.background_run_seconds
        if body.get("stream"):
            summary = self._render(item, include_input=False) | {"status": "in_progress", "steps": []}
            summary.pop("usage", None)
            final = self._render(item, include_input=False)
            final.pop("steps")
            item.events = stream_events(summary, turn.steps, final, self.config.stream_chunk_words)
        if store:
            self.store.put(item)
        return item.events if body.get("stream") else self._render(item, include_input=False)

    def _first_hop(
        self,
        interaction_id: str,
        body: dict[str, Any],
        history: list[dict[str, Any]],
        input_steps: list[dict[str, Any]],
        turn: ModelTurn,
        extra_hops: int,
    ) -> dict[str, Any]:
        """The first interaction of a turn the model answers over several (see _continuation)."""
        store = body.get("store", True)
        hops = split_into_hops(turn.steps, input_steps[-1], extra_hops)
        first = hops.pop(0)
        token = self.continuations.open(
            hops,
            store=store,
            original_input=body["input"],
            hop_id=interaction_id,
            final_status=turn.status,
            usage=turn.usage,
        )
        item = self._hop_item(interaction_id, body, history, input_steps, first.steps, "requires_continuation")
        if store:
            self.store.put(item)
        return self._render(item, include_input=False) | {"continuation_token": token}

    def _continue(self, body: dict[str, Any]) -> dict[str, Any]:
        hop, pending = self.continuations.take(body)
        interaction_id = "int_" + secrets.token_hex(12)
        history = self.store.get(pending.previous_id).transcript if pending.store else []
        status = pending.final_status if hop.last else "requires_continuation"
        item = self._hop_item(interaction_id, body, history, [], hop.steps, status)
        if hop.last:
            item.usage = pending.usage
        if pending.store:
            self.store.put(item)
        rendered = self._render(item, include_input=False)
        if not hop.last:
            rendered["continuation_token"] = self.continuations.reopen(pending, interaction_id)
        return rendered

    def _hop_item(
        self,
        interaction_id: str,
        body: dict[str, Any],
        history: list[dict[str, Any]],
        input_steps: list[dict[str, Any]],
        steps: list[dict[str, Any]],
        status: str,
    ) -> StoredInteraction:
        self.ledger.record(steps)
        now = self.clock.now()
        # A hop on its way to the answer costs little; the last one carries the turn's usage.
        usage = {"total_input_tokens": 0, "total_output_tokens": 1, "total_tokens": 1}
        return StoredInteraction(
            id=interaction_id,
            body=body,
            history=history,
            input_steps=input_steps,
            steps=steps,
            final_status=status,
            usage=usage,
            created=now,
            expires=now + self.config.retention_seconds,
        )

    def _get(self, interaction_id: str, query: dict[str, str]) -> Any:
        item = self.store.get(interaction_id)
        include_input = query.get("include_input") == "true"
        if query.get("stream") != "true":
            return self._render(item, include_input=include_input)
        rendered = self._render(item, include_input=False)
        if rendered["status"] in {"queued", "in_progress"}:
            return [{"event_type": "interaction.created", "interaction": rendered, "event_id": f"{item.id}:1"}]
        events = item.events or stream_events(
            rendered | {"steps": []}, item.steps, rendered, self.config.stream_chunk_words
        )
        after = query.get("last_event_id")
        if after is not None:
            ids = [e["event_id"] for e in events]
            if after not in ids:
                raise invalid(f"unknown last_event_id {after!r}")
            events = events[ids.index(after) + 1 :]
        return events

    def _cancel(self, interaction_id: str) -> Any:
        item = self.store.get(interaction_id)
        if item.status(self.clock.now()) not in {"queued", "in_progress"}:
            raise failed_precondition(f"interaction {interaction_id!r} is not running")
        item.cancelled_at = self.clock.now()
        return self._render(item, include_input=False)

    def _render(self, item: StoredInteraction, *, include_input: bool) -> dict[str, Any]:
        now = self.clock.now()
        status = item.status(now)
        done = status not in {"queued", "in_progress", "cancelled"}
        body = item.body
        data: dict[str, Any] = {"id": item.id, "object": "interaction", "status": status}
        data["agent" if "agent" in body else "model"] = body.get("agent") or body.get("model")
        data["created"] = self.clock.iso(item.created)
        data["updated"] = self.clock.iso(item.done_at if item.background and done else item.created)
        data["steps"] = item.steps if done else []
        if done:
            data["usage"] = item.usage
        if body.get("previous_interaction_id"):
            data["previous_interaction_id"] = body["previous_interaction_id"]
        if include_input:
            data["input"] = item.input_steps
        return data

    # --- admin endpoints for standalone use -----------------------------------------------------

    async def _admin(self, method: str, path: str, raw: bytes, send: Send) -> None:
        action = path.removeprefix("/_simulator/")
        try:
            if (method, action) == ("GET", "health"):
                reply: Any = {"ok": True}
            elif (method, action) == ("GET", "requests"):
                reply = [r.as_json() for r in self.requests]
            elif (method, action) == ("DELETE", "requests"):
                with self._log_lock:
                    self._requests.clear()
                reply = {}
            elif (method, action) == ("POST", "faults"):
                self.inject(FaultSpec.from_json(json.loads(raw or b"{}")))
                reply = {}
            elif (method, action) == ("POST", "fault-rates"):
                # {"seed": 1, "rates": [{"probability": 0.05, "fault": {"status": 503}}, ...]}
                spec = json.loads(raw or b"{}")
                self.set_fault_rates(
                    [(float(r["probability"]), FaultSpec.from_json(r["fault"])) for r in spec.get("rates", [])],
                    int(spec.get("seed", 0)),
                )
                reply = {}
            elif (method, action) == ("POST", "advance"):
                self.advance(float(json.loads(raw)["seconds"]))
                reply = {}
            elif (method, action) == ("POST", "reset"):
                self.reset(state=True)
                reply = {}
            else:
                raise ApiError(404, f"no such admin endpoint: {method} {path}")
        except (ValueError, KeyError, TypeError) as exc:
            await _send_json(send, 400, invalid(f"bad admin request: {exc}").body())
            return
        except ApiError as exc:
            await _send_json(send, exc.code, exc.body())
            return
        await _send_json(send, 200, reply)


def _verbatim_events(answer: dict[str, Any], chunk_words: int) -> list[dict[str, Any]]:
    steps = answer.get("steps") if isinstance(answer.get("steps"), list) else []
    final = {k: v for k, v in answer.items() if k != "steps"}
    final.setdefault("id", "int_verbatim")
    summary = {k: v for k, v in final.items() if k != "usage"} | {"status": "in_progress"}
    return stream_events(summary, list(steps or []), final, chunk_words)


def _parse_create_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise invalid("Invalid JSON payload received.") from None
    if not isinstance(body, dict):
        raise invalid("Invalid JSON payload received: the body must be an object.")
    return body


def _validate_create(body: dict[str, Any]) -> None:
    unknown = sorted(set(body) - _CREATE_FIELDS)
    if unknown:
        raise invalid(f"Invalid JSON payload received. Unknown name {unknown[0]!r}.")
    if ("model" in body) == ("agent" in body):
        raise invalid("exactly one of model or agent is required")
    target = body.get("model", body.get("agent"))
    if not isinstance(target, str) or not target:
        raise invalid("model/agent must be a non-empty string")
    if "continuation_token" in body and not isinstance(body["continuation_token"], str):
        raise invalid("continuation_token must be a string")
    if "input" not in body and "continuation_token" not in body:
        raise invalid("input is required")
    for flag in ("store", "background", "stream"):
        if flag in body and not isinstance(body[flag], bool):
            raise invalid(f"{flag} must be a boolean")
    if "previous_interaction_id" in body and not isinstance(body["previous_interaction_id"], str):
        raise invalid("previous_interaction_id must be a string")
    if "system_instruction" in body and not isinstance(body["system_instruction"], str):
        raise invalid("system_instruction must be a string")
    tools = body.get("tools", [])
    if not isinstance(tools, list):
        raise invalid("tools must be a list")
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise invalid(f"tools[{index}] needs a type")
        if tool["type"] == "function" and not isinstance(tool.get("name"), str):
            raise invalid(f"tools[{index}]: a function tool needs a name")
    config = body.get("generation_config", {})
    if not isinstance(config, dict):
        raise invalid("generation_config must be an object")
    temperature = config.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2):
        raise invalid("generation_config.temperature must be a number in [0, 2]")
    level = config.get("thinking_level")
    if level is not None and level not in _THINKING_LEVELS:
        raise invalid(f"generation_config.thinking_level must be one of {sorted(_THINKING_LEVELS)}")
    if "response_format" in body and not isinstance(body["response_format"], (dict, list)):
        raise invalid("response_format must be an object or a list")


def _parse_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw.decode("utf-8", "replace")


def _num(value: float) -> bytes:
    return (str(int(value)) if float(value).is_integer() else str(value)).encode()


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send_json(
    send: Send,
    status: int,
    payload: Any,
    extra: list[tuple[bytes, bytes]] | None = None,
    *,
    drop: bool = False,
) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    await _send_bytes(send, status, body, extra, drop=drop)


async def _send_bytes(
    send: Send,
    status: int,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
    *,
    drop: bool = False,
) -> None:
    headers = [
        (b"content-type", b"application/json; charset=UTF-8"),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if drop:
        await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
        raise DroppedConnection("simulated connection drop")
    await send({"type": "http.response.body", "body": body})


async def _send_stream(
    send: Send,
    events: list[dict[str, Any]],
    *,
    drop_after: int | None,
    pacing: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for number, event in enumerate(events):
        if pacing is not None:
            await pacing(number)
        if drop_after is not None and number >= drop_after:
            raise DroppedConnection("simulated connection drop mid-stream")
        await send({"type": "http.response.body", "body": encode_event(event), "more_body": True})
    await send({"type": "http.response.body", "body": DONE})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
