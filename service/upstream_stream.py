"""A streamed create: the request sent with `"stream": true`, its Server-Sent Events read as they
arrive, and the turn's steps assembled from them as the non-streaming answer would carry them.

The events are read one at a time off the response (never the whole body), handed to the caller
as they come, and folded into the steps by `StepAssembler`. What the assembler gives back must be
what `create` would have stored for the same interaction, byte for byte: the steps' JSON values
rebuilt from `step.start`, `step.delta` and `step.stop`, with their fields in the order the API's
non-streaming answer writes them (`_FIELD_ORDER`: the known fields of the known step types first,
then every other field in the order `step.start` carried it), serialized as the API serializes a
body (compact separators, non-ASCII escaped). tests/turns/test_streaming_turns.py compares a
streamed turn's stored steps with the non-streaming rendering of the very same interaction.

A stream is assembled only from what Custody knows how to fold: a delta of a type it does not know
fails the turn (`upstream_bad_response`) rather than store a step that misses part of what the
model said. Likewise a stream that ends without `interaction.completed`, an `error` event, or a
step that never stopped.

The request is built exactly as `create` builds it (`service/upstream.py`, `_sdk_create_sender`),
through the SDK's own request building, auth hooks and HTTP client, with `Accept:
text/event-stream` and the response read as a stream.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from google import genai
from google.genai import _interactions as sdk_errors

from .errors import ConfigurationError

__all__ = [
    "STREAM_CONTENT_TYPES",
    "AssemblyError",
    "StepAssembler",
    "UpstreamErrorEvent",
    "sdk_stream_opener",
    "sse_events",
]

# Content blocks a delta may carry whole (an image, a piece of audio): appended to the step's content.
STREAM_CONTENT_TYPES = frozenset({"image", "audio", "video", "document"})

# The order in which the API's non-streaming answer writes the known fields of each step type;
# any other field follows, in the order step.start carried it.
_FIELD_ORDER: dict[str, tuple[str, ...]] = {
    "thought": ("type", "signature", "summary"),
    "model_output": ("type", "content"),
    "function_call": ("type", "id", "name", "arguments"),
}
_LINE_END = re.compile(rb"\r\n|\r|\n")
# An SSE line (or event) longer than this is refused: a stream must not make the service buffer
# without bound.
_MAX_LINE = 8 * 1024 * 1024


class AssemblyError(Exception):
    """The events do not add up to a turn Custody can store (a message, never content)."""


class UpstreamErrorEvent(AssemblyError):
    """The model service ended the stream with an `error` event."""


@dataclass
class _Step:
    value: dict[str, Any]
    order: list[str]
    arguments: list[str] | None = None
    stopped: bool = False


@dataclass
class StepAssembler:
    """Folds one interaction's stream events into its steps and final body."""

    steps: list[_Step] = field(default_factory=list)
    interaction: dict[str, Any] | None = None
    completed: bool = False

    def add(self, event: dict[str, Any]) -> None:
        kind = event.get("event_type")
        if self.completed:
            raise AssemblyError("an event after interaction.completed")
        if kind == "interaction.created":
            interaction = event.get("interaction")
            self.interaction = dict(interaction) if isinstance(interaction, dict) else {}
        elif kind == "step.start":
            self._start(event)
        elif kind == "step.delta":
            self._delta(event)
        elif kind == "step.stop":
            step = self._at(event)
            if step.arguments is not None:
                try:
                    step.value["arguments"] = json.loads("".join(step.arguments))
                except ValueError:
                    raise AssemblyError("a function call's streamed arguments are not JSON") from None
                _place(step, "arguments")
            step.stopped = True
        elif kind == "interaction.completed":
            interaction = event.get("interaction")
            if not isinstance(interaction, dict):
                raise AssemblyError("interaction.completed without its interaction")
            self.interaction = {**(self.interaction or {}), **interaction}
            self.completed = True
        elif kind == "error":
            raise UpstreamErrorEvent("the model service sent an error event")
        # interaction.status_update and event types added later carry no step content.

    def result(self) -> tuple[dict[str, Any], list[bytes]]:
        """(the body as the non-streaming answer would carry it, the exact bytes of each step)."""
        if not self.completed or self.interaction is None:
            raise AssemblyError("the stream ended before interaction.completed")
        if not all(step.stopped for step in self.steps):
            raise AssemblyError("the stream ended with a step that never stopped")
        values = [_ordered(step) for step in self.steps]
        body = {**self.interaction, "steps": values}
        return body, [_serialize(value) for value in values]

    def _start(self, event: dict[str, Any]) -> None:
        index, step = event.get("index"), event.get("step")
        if index != len(self.steps) or not isinstance(step, dict) or not isinstance(step.get("type"), str):
            raise AssemblyError("step.start out of order or without a step")
        if self.steps and not self.steps[-1].stopped:
            raise AssemblyError("step.start before the previous step stopped")
        self.steps.append(_Step(dict(step), list(step)))

    def _at(self, event: dict[str, Any]) -> _Step:
        index = event.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(self.steps):
            raise AssemblyError("an event for a step that was not started")
        step = self.steps[index]
        if step.stopped:
            raise AssemblyError("an event for a step that has stopped")
        return step

    def _delta(self, event: dict[str, Any]) -> None:
        step = self._at(event)
        delta = event.get("delta")
        kind = delta.get("type") if isinstance(delta, dict) else None
        value = step.value
        if kind == "text" and isinstance(delta, dict) and isinstance(delta.get("text"), str):
            content = _list_field(step, "content")
            if content and isinstance(content[-1], dict) and content[-1].get("type") == "text":
                content[-1]["text"] = str(content[-1].get("text", "")) + delta["text"]
            else:
                content.append({"type": "text", "text": delta["text"]})
        elif kind == "thought_summary" and isinstance(delta, dict) and isinstance(delta.get("content"), dict):
            _list_field(step, "summary").append(delta["content"])
        elif kind == "thought_signature" and isinstance(delta, dict) and isinstance(delta.get("signature"), str):
            value["signature"] = str(value.get("signature", "")) + delta["signature"]
            _place(step, "signature")
        elif kind == "arguments_delta" and isinstance(delta, dict) and isinstance(delta.get("arguments"), str):
            step.arguments = [*(step.arguments or []), delta["arguments"]]
        elif kind in STREAM_CONTENT_TYPES and isinstance(delta, dict):
            _list_field(step, "content").append(dict(delta))
        else:
            raise AssemblyError(f"a step.delta Custody cannot assemble ({str(kind)[:40]!r})")


def _list_field(step: _Step, name: str) -> list[Any]:
    current = step.value.get(name)
    if not isinstance(current, list):
        current = step.value[name] = []
        _place(step, name)
    return current


def _place(step: _Step, name: str) -> None:
    if name not in step.order:
        step.order.append(name)


def _ordered(step: _Step) -> dict[str, Any]:
    known = _FIELD_ORDER.get(str(step.value.get("type")), ("type",))
    names = [n for n in known if n in step.value] + [n for n in step.order if n not in known]
    return {name: step.value[name] for name in names}


def _serialize(value: Any) -> bytes:
    # How the API writes a body: compact, non-ASCII escaped (the simulator's json.dumps does the same).
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of an SSE byte stream, one at a time: `data:` lines joined per event, lines
    ended by CRLF, LF or CR (as the SDK's parser takes them), a leading byte-order mark, comments,
    other fields and the `[DONE]` sentinel skipped. A line past `_MAX_LINE` is refused."""
    buffer = b""
    data: list[bytes] = []
    held = 0  # the bytes of `data`
    first = True
    async for chunk in chunks:
        if first and chunk:
            chunk, first = chunk.removeprefix(b"\xef\xbb\xbf"), False
        buffer += chunk
        # A CR at the very end may be the first half of a CRLF: it waits for the next chunk.
        complete = buffer[:-1] if buffer.endswith(b"\r") else buffer
        *lines, rest = _LINE_END.split(complete)
        buffer = rest + buffer[len(complete) :]
        if len(buffer) > _MAX_LINE:
            raise AssemblyError("an event line too long")
        for line in lines:
            if line:
                if line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
                    held += len(line)
                    if held > _MAX_LINE:
                        raise AssemblyError("an event too long")
                continue
            if not data:
                continue
            payload, data, held = b"\n".join(data), [], 0
            if payload.strip() == b"[DONE]":
                continue
            yield _event(payload)
    if buffer.startswith(b"data:"):
        data.append(buffer[5:].removeprefix(b" "))
    if data and b"\n".join(data).strip() != b"[DONE]":
        # The stream ended without the blank line after its last event: SSE drops such an event.
        raise AssemblyError("the stream ended inside an event")


def _event(payload: bytes) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except ValueError:
        raise AssemblyError("an event that is not JSON") from None
    if not isinstance(event, dict):
        raise AssemblyError("an event that is not a JSON object")
    return event


def sdk_stream_opener(client: genai.Client) -> Callable[[bytes], Any]:
    """`open(body)`: an async context manager that POSTs a create whose JSON body is already
    bytes (with `"stream": true` in it) as `_sdk_create_sender` does, and yields the response's
    byte chunks; a 4xx/5xx raises the SDK's error classes before anything is yielded."""
    try:
        from google.genai._gaos._hooks import BeforeRequestContext, HookContext, ResponseContext
        from google.genai._gaos.lib.compat_errors import wrap_sdk_error
        from google.genai._gaos.models import CreateInteractionGlobals
        from google.genai._gaos.types import Security
        from google.genai._gaos.utils import SerializedRequestBody, get_security_from_env, template_url

        resource = client.aio.interactions
        config = resource.sdk_configuration
        build_request = resource._build_request_async
        hooks = config.__dict__["_hooks"]
        http = config.async_client
        path_globals = CreateInteractionGlobals(api_version=config.globals.api_version)
        base_url = template_url(*config.get_server_details())
        timeout_ms = config.timeout_ms
    except (ImportError, AttributeError, KeyError) as exc:
        raise ConfigurationError(
            f"this google-genai version is not one Custody can stream raw request bodies through: {exc!r}"
        ) from exc
    if http is None:
        raise ConfigurationError("the google-genai client has no async HTTP client")

    def translated(exc: Exception) -> BaseException:
        result: BaseException = wrap_sdk_error(exc)
        return result

    @asynccontextmanager
    async def open_stream(body: bytes) -> AsyncIterator[AsyncIterator[bytes]]:
        # Arguments as the generated `AsyncInteractions.create` passes them with stream=True.
        request = build_request(
            method="POST",
            path="/{api_version}/interactions",
            base_url=base_url,
            url_variables=None,
            request=None,
            request_body_required=True,
            request_has_path_params=True,
            request_has_query_params=True,
            user_agent_header="user-agent",
            accept_header_value="text/event-stream",
            http_headers=None,
            extra_query_params=None,
            _globals=path_globals,
            security=config.security,
            get_serialized_body=lambda: SerializedRequestBody("application/json", content=body),
            allow_empty_value=None,
            timeout_ms=timeout_ms,
        )
        context = HookContext(
            config=config,
            base_url=base_url or "",
            operation_id="CreateInteraction",
            oauth2_scopes=None,
            security_source=get_security_from_env(config.security, Security),
            tags=["interactions"],
            extensions=None,
            response=ResponseContext(mode="raw", execution="async"),
        )
        try:
            request = hooks.before_request(BeforeRequestContext(context), request)
            response = await http.send(request, stream=True)
        except Exception as exc:
            error = translated(exc)
            if error is exc:
                raise
            raise error from exc
        try:
            if 400 <= response.status_code < 600:
                content = await response.aread()
                try:
                    error_body: Any = json.loads(content)
                except (ValueError, RecursionError):
                    error_body = content.decode("utf-8", "replace")
                raise sdk_errors.APIError.generate(
                    status_code=response.status_code, body=error_body, message=None, response=response
                )
            yield _chunks(response, translated)
        finally:
            await response.aclose()

    return open_stream


async def _chunks(response: Any, translated: Callable[[Exception], BaseException]) -> AsyncIterator[bytes]:
    """The response's bytes as they arrive; a transport failure as the SDK's own error class."""
    iterator = response.aiter_bytes()
    while True:
        try:
            chunk: bytes = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except Exception as exc:
            error = translated(exc)
            if error is exc:
                raise
            raise error from exc
        yield chunk
