"""The generateContent fallback: a turn the Interactions surface cannot take goes through
`models.generate_content` instead, on routes that ask for it (`fallback: generate_content`).

When it is taken: `interactions.create` failed with a server error after Custody's retries (5xx),
the Interactions surface itself is missing (404, 405 or 501 for an unchained create: the endpoint
is not there for this project, region or version; a chained create's 404 means only that the
provider's copy is gone, which `Upstream.create` handles with a full replay first), or the
circuit breaker is open. Not on a 429 (a quota is the caller's to respect, on either surface),
nor on a timeout (the turn's deadline is spent) or a refused request (4xx: the same request would
be refused again).

generateContent is stateless: it keeps nothing, so a fallback turn satisfies every storage rule
whatever the route permits. Its reply names no interaction, so the turn's finish sets the
conversation's chain to none: the history moved on without the provider's copy, and the next
permitted turn sends the whole history again before it chains anew.

The history is rebuilt from the stored steps on every fallback turn, with the same consecutive
role merging the API expects:

  user_input        -> a user part per block: text, or inline media (`inlineData`), or media by
                       URI (`fileData`)
  function_result   -> a user `functionResponse` part (id = call_id; name from the step or from
                       the call it answers; response = the result when it is an object, else
                       `{"output": result}`, or `{"error": result}` when `is_error`)
  thought           -> a model part `thought: true` with the summary's text and the signature;
                       a thought without a summary gives its signature to the next model part
  model_output      -> model parts: text, inline media
  function_call     -> a model `functionCall` part (id, name, args), with the step's signature
  anything else     -> left out: steps with no generateContent equivalent (built-in tool calls
                       and results, unknown step types such as the simulator's `x_sim_trace`)
                       stay in Custody's history and go to the Interactions surface on its
                       next turn, but a fallback turn's model does not see them

The answer is converted back into Interactions steps, deterministically, so that the
Interactions API can take them on a later turn: a `thought: true` part becomes a thought step
(its signature, and its text as the summary); a signature on any other part that is not a
function call becomes a signature-only thought step before it; consecutive text (and inline
media) parts become one model_output step; a function call becomes a function_call step with
its id (one is made when the API gave none), name, arguments and signature. Signatures travel
as standard base64, as the Interactions API spells them. Which surface answered is recorded on
the turn (`turns.surface`) and in its `turn.create` record, not on the steps: a stored step is
replayed as it is, and a field the API does not know could be refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
from collections.abc import Sequence
from typing import Any

import httpx
import httpx2
from google import genai
from google.genai import errors as sdk_errors
from google.genai import types

from .errors import UpstreamFailed
from .metrics import Metrics
from .upstream import Chain, Upstream, UpstreamReply, _backoff, _retry_after

__all__ = ["contents_of", "create_or_fall_back", "fallback_reason", "generate_turn", "steps_of"]

_TRANSIENT = frozenset({408, 429, 500, 502, 503, 504})
# A create refused with one of these, unchained, says the Interactions endpoint is not there.
_SURFACE_MISSING = frozenset({404, 405, 501})
_MEDIA = {"image", "audio", "video", "document"}
_USAGE = {
    "prompt_token_count": "total_input_tokens",
    "candidates_token_count": "total_output_tokens",
    "thoughts_token_count": "total_thought_tokens",
    "cached_content_token_count": "total_cached_tokens",
    "tool_use_prompt_token_count": "total_tool_use_tokens",
    "total_token_count": "total_tokens",
}


def fallback_reason(exc: UpstreamFailed) -> str | None:
    """Why a failed create may go through generateContent instead, or None when it may not."""
    if exc.code == "upstream_circuit_open":
        return "circuit_open"
    status = exc.upstream_status
    if status in _SURFACE_MISSING:
        return "interactions_unavailable"
    if status is not None and status >= 500:
        return "server_error"
    return None


async def create_or_fall_back(
    upstream: Upstream,
    *,
    fallback: bool,
    settings: dict[str, Any],
    steps: Sequence[bytes],
    store: bool,
    chain: Chain | None = None,
    deadline: float | None = None,
) -> UpstreamReply:
    """`upstream.create`, and when it fails in a way `fallback_reason` names and the route has
    `fallback` on, the same turn through generateContent. A fallback that fails too raises the
    Interactions failure (what the caller can act on: its status, its Retry-After), its attempts
    counting both surfaces' requests."""
    try:
        return await upstream.create(settings=settings, steps=steps, store=store, chain=chain, deadline=deadline)
    except UpstreamFailed as exc:
        reason = fallback_reason(exc) if fallback and "model" in settings else None
        if reason is None:
            raise
        try:
            reply = await upstream.generate_content(settings=settings, steps=steps, deadline=deadline)
        except UpstreamFailed as second:
            exc.attempts += second.attempts
            exc.fallback_failed = second.code
            raise exc from None
        return UpstreamReply(
            reply.body,
            reply.latency_ms,
            reply.attempts + exc.attempts,
            [],
            steps=reply.steps,
            history_sent=reply.history_sent,
            surface="generate_content",
            fallback_reason=reason,
        )


async def generate_turn(
    client: genai.Client,
    *,
    settings: dict[str, Any],
    steps: Sequence[bytes],
    attempts: int,
    timeout_seconds: float,
    deadline: float | None,
    metrics: Metrics,
) -> UpstreamReply:
    """One turn through `models.generate_content`: the history rebuilt from `steps` (their JSON),
    the route's settings mapped, and the answer as Interactions steps. Nothing is stored by the
    provider, so every transient failure (408, 429, 5xx, a timeout, a dropped connection) is
    retried like a store-less create, within the turn's deadline."""
    started = time.perf_counter()
    contents = contents_of(steps)
    config = config_of(settings)
    for attempt in range(1, attempts + 1):
        timeout = timeout_seconds
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _failed("upstream_deadline", "the turn's deadline passed", attempt - 1, timeout=True)
            timeout = min(timeout, left)
        per_attempt = config.model_copy(update={"http_options": types.HttpOptions(timeout=max(1, int(timeout * 1000)))})
        wait: float | None = None
        try:
            with metrics.upstream_request("generate_content", _outcome):
                response = await client.aio.models.generate_content(
                    model=settings["model"], contents=contents, config=per_attempt
                )
        except sdk_errors.APIError as exc:
            status = int(exc.code or 0)
            asked = _retry_after(exc.response.headers) if exc.response is not None else None
            if status not in _TRANSIENT or attempt == attempts:
                # The status only: an error body may quote the request's content.
                raise UpstreamFailed(
                    f"upstream_http_{status}",
                    f"the generateContent call failed with HTTP {status}",
                    attempts=attempt,
                    upstream_status=status,
                    unavailable=status in {429, 503},
                    retry_after=asked,
                ) from None
            wait = asked or _backoff(attempt)
        except (httpx.TimeoutException, httpx2.TimeoutException):
            if attempt == attempts:
                raise _failed("upstream_timeout", "the model did not answer in time", attempt, timeout=True) from None
            wait = 0.0
        except (httpx.TransportError, httpx2.TransportError):
            if attempt == attempts:
                raise _failed("upstream_unreachable", "the model service could not be reached", attempt) from None
            wait = _backoff(attempt)
        else:
            return _reply(response, (time.perf_counter() - started) * 1000, attempt)
        if deadline is not None and time.monotonic() + wait >= deadline:
            raise _failed("upstream_deadline", "the turn's deadline passed", attempt, timeout=True)
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")  # the loop always returns or raises


def _failed(code: str, message: str, attempts: int, *, timeout: bool = False) -> UpstreamFailed:
    return UpstreamFailed(code, message, attempts=attempts, timeout=timeout)


def _outcome(exc: BaseException) -> str:
    """How a generateContent request ended, for the metrics: a code, never a message."""
    if isinstance(exc, sdk_errors.APIError):
        return f"http_{exc.code}"
    if isinstance(exc, (httpx.TimeoutException, httpx2.TimeoutException)):
        return "timeout"
    if isinstance(exc, (httpx.TransportError, httpx2.TransportError)):
        return "unreachable"
    return "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"


# --- the history -------------------------------------------------------------------------------


def contents_of(steps: Sequence[bytes]) -> list[types.Content]:
    """The stored steps (their JSON bytes) as generateContent's `contents` (see the module)."""
    contents: list[types.Content] = []
    names: dict[str, str] = {}  # call id -> function name, for results that do not name theirs
    pending_signature: bytes | None = None  # a signature-only thought's, for the next model part

    def add(role: str, part: types.Part) -> None:
        nonlocal pending_signature
        if role == "model" and pending_signature is not None and part.thought_signature is None:
            part.thought_signature, pending_signature = pending_signature, None
        if role == "user":
            flush()
        if contents and contents[-1].role == role and contents[-1].parts is not None:
            contents[-1].parts.append(part)
        else:
            contents.append(types.Content(role=role, parts=[part]))

    def flush() -> None:
        # A signature left at the end of a model turn travels on a part of its own.
        nonlocal pending_signature
        if pending_signature is not None:
            signature, pending_signature = pending_signature, None
            add("model", types.Part(text="", thought=True, thought_signature=signature))

    for raw in steps:
        step = json.loads(raw)
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "user_input":
            for block in step.get("content") or []:
                part = _block_part(block)
                if part is not None:
                    add("user", part)
        elif kind == "function_result":
            call_id = str(step.get("call_id", ""))
            result = step.get("result")
            if step.get("is_error"):
                response = {"error": result}
            else:
                response = result if isinstance(result, dict) else {"output": result}
            name = step.get("name") or names.get(call_id, "")
            add("user", types.Part(function_response=types.FunctionResponse(id=call_id, name=name, response=response)))
        elif kind == "thought":
            signature = _signature(step.get("signature"))
            text = "".join(
                block.get("text", "")
                for block in step.get("summary") or []
                if isinstance(block, dict) and block.get("type") == "text"
            )
            if text:
                add("model", types.Part(text=text, thought=True, thought_signature=signature))
            elif signature is not None:
                flush()
                pending_signature = signature
        elif kind == "model_output":
            for block in step.get("content") or []:
                part = _block_part(block)
                if part is not None:
                    add("model", part)
        elif kind == "function_call":
            call_id, name = str(step.get("id", "")), str(step.get("name", ""))
            names[call_id] = name
            arguments = step.get("arguments")
            call = types.FunctionCall(id=call_id, name=name, args=arguments if isinstance(arguments, dict) else {})
            add("model", types.Part(function_call=call, thought_signature=_signature(step.get("signature"))))
        # Any other step has no generateContent equivalent and is left out (see the module).
    flush()
    return contents


def _block_part(block: Any) -> types.Part | None:
    """A content block as a part: text, inline media, or media by URI; None for anything else."""
    if not isinstance(block, dict):
        return None
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return types.Part(text=block["text"])
    if kind in _MEDIA:
        mime_type = block.get("mime_type")
        if isinstance(block.get("data"), str):
            return types.Part(inline_data=types.Blob(mime_type=mime_type, data=base64.b64decode(block["data"])))
        if isinstance(block.get("uri"), str):
            return types.Part(file_data=types.FileData(file_uri=block["uri"], mime_type=mime_type))
    return None


def _signature(value: Any) -> bytes | None:
    """A step's signature (base64 text) as the bytes generateContent's parts carry."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


# --- the route's settings ----------------------------------------------------------------------


def config_of(settings: dict[str, Any]) -> types.GenerateContentConfig:
    """The route's Interactions settings as generateContent's config: the policy has already
    refused, at load, a fallback route with a setting this cannot carry."""
    config: dict[str, Any] = {
        # Function calls go back to the backend, never to Python callables in this process.
        "automatic_function_calling": types.AutomaticFunctionCallingConfig(disable=True),
    }
    if settings.get("system_instruction"):
        config["system_instruction"] = settings["system_instruction"]
    functions = []
    tools: list[types.Tool] = []
    for tool in settings.get("tools") or []:
        if tool["type"] == "function":
            functions.append(
                types.FunctionDeclaration(
                    name=tool["name"],
                    description=tool.get("description"),
                    parameters_json_schema=tool.get("parameters"),
                )
            )
        elif tool["type"] == "google_search":
            tools.append(types.Tool(google_search=types.GoogleSearch()))
        elif tool["type"] == "url_context":
            tools.append(types.Tool(url_context=types.UrlContext()))
    if functions:
        tools.insert(0, types.Tool(function_declarations=functions))
    if tools:
        config["tools"] = tools
    generation = dict(settings.get("generation_config") or {})
    for name in ("temperature", "top_p", "seed", "stop_sequences", "max_output_tokens"):
        if name in generation:
            config[name] = generation[name]
    thinking: dict[str, Any] = {}
    if "thinking_level" in generation:
        thinking["thinking_level"] = str(generation["thinking_level"]).upper()
    if "thinking_summaries" in generation:
        thinking["include_thoughts"] = generation["thinking_summaries"] == "auto"
    if thinking:
        config["thinking_config"] = types.ThinkingConfig(**thinking)
    formats = settings.get("response_format")
    response_format = formats[0] if isinstance(formats, list) and formats else formats
    if isinstance(response_format, dict):
        if "mime_type" in response_format:
            config["response_mime_type"] = response_format["mime_type"]
        if "schema" in response_format:
            config["response_json_schema"] = response_format["schema"]
    return types.GenerateContentConfig(**config)


# --- the answer --------------------------------------------------------------------------------


def steps_of(parts: Sequence[types.Part]) -> list[dict[str, Any]]:
    """The parts of generateContent's answer as Interactions steps (see the module)."""
    steps: list[dict[str, Any]] = []
    output: list[dict[str, Any]] | None = None  # the content of the model_output being built
    for part in parts:
        signature = base64.b64encode(part.thought_signature).decode() if part.thought_signature else None
        if part.thought:
            step: dict[str, Any] = {"type": "thought"}
            if signature:
                step["signature"] = signature
            if part.text:
                step["summary"] = [{"type": "text", "text": part.text}]
            steps.append(step)
            output = None
        elif part.function_call is not None:
            call = part.function_call
            step = {
                "type": "function_call",
                "id": call.id or f"call_{secrets.token_hex(8)}",
                "name": call.name or "",
                "arguments": call.args or {},
            }
            if signature:
                step["signature"] = signature
            steps.append(step)
            output = None
        else:
            block = _part_block(part)
            if block is None:
                continue
            if signature:
                steps.append({"type": "thought", "signature": signature})
                output = None
            if output is None:
                output = []
                steps.append({"type": "model_output", "content": output})
            output.append(block)
    return steps


def _part_block(part: types.Part) -> dict[str, Any] | None:
    if part.text is not None:
        return {"type": "text", "text": part.text}
    blob = part.inline_data
    if blob is not None and blob.data is not None:
        mime_type = blob.mime_type or "application/octet-stream"
        kind = mime_type.split("/", 1)[0]
        return {
            "type": kind if kind in {"image", "audio", "video"} else "document",
            "data": base64.b64encode(blob.data).decode(),
            "mime_type": mime_type,
        }
    return None  # code execution and other parts have no step here (see the module)


def _reply(response: types.GenerateContentResponse, latency_ms: float, attempts: int) -> UpstreamReply:
    candidate = response.candidates[0] if response.candidates else None
    parts = list(candidate.content.parts or []) if candidate and candidate.content else []
    steps = steps_of(parts)
    reason = candidate.finish_reason if candidate else None
    if candidate is None or (reason is not None and reason not in {types.FinishReason.STOP}):
        # No candidate (the prompt was blocked), or an answer cut short (length, safety...):
        # a turn the model did not complete, which stores nothing.
        status = "incomplete" if reason == types.FinishReason.MAX_TOKENS else "failed"
    else:
        status = "requires_action" if any(s["type"] == "function_call" for s in steps) else "completed"
    usage: dict[str, int] = {}
    metadata = response.usage_metadata
    if metadata is not None:
        for name, key in _USAGE.items():
            value = getattr(metadata, name)
            if isinstance(value, int):
                usage[key] = value
    body = {"object": "interaction", "status": status, "steps": steps, "usage": usage}
    raw = [json.dumps(step, ensure_ascii=False, separators=(",", ":")).encode() for step in steps]
    return UpstreamReply(body, latency_ms, attempts, [], steps=raw, history_sent="replayed", surface="generate_content")
