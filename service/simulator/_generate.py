"""`POST /{version}/models/{model}:generateContent`, as the google-genai SDK sends it.

The same simulated model answers it as it answers the Interactions surface (service/simulator/
_model.py), over the same conversation: `contents` are read back into Interactions steps (a user
content's text and media into one user_input step, a functionResponse into a function_result,
model parts into thought, model_output and function_call steps) and the model's turn is rendered
as generateContent parts. Strict where the real service is: every thoughtSignature must be one
this simulator issued (on either surface), a function call it signed must be replayed with its
signature, and a function response must answer a call of the model content before it.

The answer's steps, in the form the Interactions API would give them, go into the ledger of
produced steps, so that a client that converts the answer back into Interactions steps and
replays them on the Interactions surface is accepted, and one that converts them differently is
refused there. That form (what a client must produce):

- a thought part (`thought: true`, only with `thinkingConfig.includeThoughts`) ->
  `{"type": "thought", "signature": S, "summary": [{"type": "text", "text": T}]}`;
- without includeThoughts the turn's thought signature rides on its first text part ->
  `{"type": "thought", "signature": S}` before the model_output (a turn that opens with a
  function call carries the call's own signature instead, as Gemini 3 does);
- text parts -> one `{"type": "model_output", "content": [{"type": "text", "text": ...}]}`;
- a functionCall part -> `{"type": "function_call", "id", "name", "arguments", "signature"?}`.

Unknown step types and fields of the model (`emit_unknown`) have no generateContent form and are
left out of the answer, as they would be by the real surface.

Field names are read in either spelling, as the service's JSON parser does: the SDK writes the
top level in camelCase but the objects it nests from its typed models (a part's `inlineData`,
`thinkingConfig`, a function declaration) in snake_case (`mime_type`, `thinking_level`,
`parameters_json_schema`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from typing import TYPE_CHECKING, Any

from ._errors import ApiError, invalid

if TYPE_CHECKING:
    from ._app import Simulator

__all__ = ["generate", "generate_model", "surface_of"]

# /{version}/models/{model}:generateContent, with Vertex's projects/{p}/locations/{l}/publishers/{x}/
_ROUTE = re.compile(
    r"^/[^/]+/(?:projects/[^/]+/locations/[^/]+/publishers/[^/]+/)?models/(?P<model>[^/:]+):generateContent$"
)
_FIELDS = frozenset(
    {
        "contents",
        "systemInstruction",
        "tools",
        "toolConfig",
        "safetySettings",
        "generationConfig",
        "cachedContent",
        "labels",
    }
)
_PART_DATA = frozenset({"text", "inlineData", "fileData", "functionCall", "functionResponse"})
_PART_FIELDS = _PART_DATA | {"thought", "thoughtSignature"}
_LEVELS = frozenset({"MINIMAL", "LOW", "MEDIUM", "HIGH", "XHIGH"})


def _camel(value: Any) -> Any:
    """An object's own keys in camelCase (its values untouched: they may be the caller's JSON)."""
    if not isinstance(value, dict):
        return value
    return {re.sub(r"_([a-z])", lambda m: m.group(1).upper(), key): item for key, item in value.items()}


def generate_model(path: str) -> str | None:
    """The model a generateContent path names, or None when the path is not one."""
    match = _ROUTE.match(path)
    return match.group("model") if match else None


def surface_of(path: str) -> str:
    """Which surface a request is for, as faults name it."""
    return "generate_content" if _ROUTE.match(path) else "interactions"


def generate(sim: Simulator, model: str, raw: bytes) -> dict[str, Any]:
    """One generateContent call: the model's answer to `contents`."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise invalid("Invalid JSON payload received.") from None
    if not isinstance(body, dict):
        raise invalid("Invalid JSON payload received: the body must be an object.")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise invalid(f"Invalid JSON payload received. Unknown name {unknown[0]!r}.")
    config = _camel(body.get("generationConfig", {}))
    if not isinstance(config, dict):
        raise invalid("generationConfig must be an object")
    thinking = _camel(config.get("thinkingConfig", {}))
    level = thinking.get("thinkingLevel") if isinstance(thinking, dict) else None
    if level is not None and level not in _LEVELS:
        raise invalid(f"generationConfig.thinkingConfig.thinkingLevel must be one of {sorted(_LEVELS)}")
    temperature = config.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2):
        raise invalid("generationConfig.temperature must be a number in [0, 2]")
    transcript = _transcript(sim, body.get("contents"))
    settings: dict[str, Any] = {"tools": _tools(body.get("tools", []))}
    if isinstance(config.get("responseJsonSchema"), dict):
        settings["response_format"] = {"schema": config["responseJsonSchema"]}
    if isinstance(body.get("systemInstruction"), dict):
        settings["system_instruction"] = body["systemInstruction"]
    answer_id = "gc_" + secrets.token_hex(12)
    turn = sim.model.reply(answer_id, transcript, settings)
    include_thoughts = isinstance(thinking, dict) and thinking.get("includeThoughts") is True
    parts, steps = _answer(turn.steps, include_thoughts=include_thoughts)
    sim.ledger.record(steps)
    usage = turn.usage
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    candidate["finishReason"] = "STOP" if turn.status != "failed" else "OTHER"
    return {
        "candidates": [candidate],
        "usageMetadata": {
            "promptTokenCount": usage["total_input_tokens"],
            "candidatesTokenCount": usage["total_output_tokens"],
            "thoughtsTokenCount": usage["total_thought_tokens"],
            "totalTokenCount": usage["total_tokens"],
        },
        "modelVersion": model,
        "responseId": answer_id,
    }


def _transcript(sim: Simulator, contents: Any) -> list[dict[str, Any]]:
    """`contents` as Interactions steps, checked as the real service checks a history."""
    if not isinstance(contents, list) or not contents:
        raise invalid("contents must be a non-empty list")
    steps: list[dict[str, Any]] = []
    pending: dict[str, str] = {}  # calls of the last model content not answered yet: id -> name
    for index, content in enumerate(contents):
        where = f"contents[{index}]"
        if not isinstance(content, dict) or content.get("role", "user") not in {"user", "model"}:
            raise invalid(f"{where}: role must be user or model")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise invalid(f"{where}: parts must be a non-empty list")
        parts = [_camel(part) for part in parts]
        for number, part in enumerate(parts):
            if not isinstance(part, dict) or set(part) - _PART_FIELDS or len(set(part) & _PART_DATA) != 1:
                raise invalid(f"{where}.parts[{number}]: a part carries exactly one of {sorted(_PART_DATA)}")
        if content.get("role", "user") == "model":
            pending = {}
            steps.extend(_model_steps(sim, parts, pending, where))
        else:
            steps.extend(_user_steps(sim, parts, pending, where))
    if pending:
        raise invalid(f"function call(s) {sorted(pending)} must be answered with a functionResponse")
    return steps


def _user_steps(sim: Simulator, parts: list[dict[str, Any]], pending: dict[str, str], where: str) -> list[Any]:
    steps: list[dict[str, Any]] = []
    blocks: list[dict[str, Any]] = []
    for number, part in enumerate(parts):
        if "functionResponse" in part:
            response = part["functionResponse"]
            call_id = response.get("id") if isinstance(response, dict) else None
            if not isinstance(call_id, str) or call_id not in pending:
                raise invalid(f"{where}.parts[{number}]: functionResponse answers no pending function call")
            if response.get("name") != pending.pop(call_id):
                raise invalid(f"{where}.parts[{number}]: functionResponse name does not match its call")
            steps.append(
                {
                    "type": "function_result",
                    "call_id": call_id,
                    "name": response["name"],
                    "result": response.get("response"),
                }
            )
            continue
        if pending:
            raise invalid(f"{where}: function call(s) {sorted(pending)} must be answered before new user input")
        blocks.append(_block(part, f"{where}.parts[{number}]"))
    if blocks:
        steps.insert(0, {"type": "user_input", "content": blocks})
    return steps


def _model_steps(sim: Simulator, parts: list[dict[str, Any]], pending: dict[str, str], where: str) -> list[Any]:
    steps: list[dict[str, Any]] = []
    for number, part in enumerate(parts):
        at = f"{where}.parts[{number}]"
        signature = _signature(part.get("thoughtSignature"), at)
        if signature is not None and not sim.ledger.knows_signature(signature):
            raise invalid(f"{at}: thought signature is not valid for this content")
        if "functionCall" in part:
            call = part["functionCall"]
            call_id, name = call.get("id"), call.get("name")
            issued = sim.ledger.call(call_id) if isinstance(call_id, str) else None
            if issued is None or issued[0] != name:
                raise invalid(f"{at}: functionCall matches no function call the model made")
            if issued[1] and signature is None:
                raise invalid(f"{at}: function call is missing its thought_signature")
            pending[call_id] = name
            steps.append({"type": "function_call", "id": call_id, "name": name, "arguments": call.get("args", {})})
        elif part.get("thought"):
            if signature is None:
                raise invalid(f"{at}: replayed thought has no signature")
            steps.append({"type": "thought", "signature": signature})
        else:
            steps.append({"type": "model_output", "content": [_block(part, at)]})
    return steps


def _block(part: dict[str, Any], where: str) -> dict[str, Any]:
    """A user or model part with content as an Interactions content block."""
    if "text" in part:
        if not isinstance(part["text"], str):
            raise invalid(f"{where}: text must be a string")
        return {"type": "text", "text": part["text"]}
    media = _camel(part.get("inlineData") or part.get("fileData"))
    if not isinstance(media, dict):
        raise invalid(f"{where}: unsupported part")
    mime_type = str(media.get("mimeType", ""))
    top = mime_type.split("/", 1)[0]
    block = {"type": top if top in {"image", "audio", "video"} else "document", "mime_type": mime_type}
    if "inlineData" in part:
        data = media.get("data")
        if not isinstance(data, str) or _decode(data) is None:
            raise invalid(f"{where}: inlineData.data is not valid base64")
        block["data"] = data
    else:
        block["uri"] = str(media.get("fileUri", ""))
    return block


def _decode(text: str) -> bytes | None:
    """Base64 in either alphabet (the SDK sends the URL-safe one), or None."""
    try:
        return base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_"))
    except (binascii.Error, ValueError):
        return None


def _signature(value: Any, where: str) -> str | None:
    """A part's thoughtSignature as the standard base64 the Interactions surface spells it in."""
    if value is None:
        return None
    raw = _decode(value) if isinstance(value, str) else None
    if not raw:
        raise ApiError(400, f"{where}: thoughtSignature is not valid base64")
    return base64.b64encode(raw).decode()


def _tools(tools: Any) -> list[dict[str, Any]]:
    """generateContent's function declarations as the Interactions tools the model reads."""
    if not isinstance(tools, list):
        raise invalid("tools must be a list")
    declared: list[dict[str, Any]] = []
    for tool in tools:
        for function in _camel(tool).get("functionDeclarations", []) if isinstance(tool, dict) else []:
            function = _camel(function)
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise invalid("a function declaration needs a name")
            parameters = function.get("parametersJsonSchema", function.get("parameters"))
            declared.append({"type": "function", "name": function["name"], "parameters": parameters or {}})
    return declared


def _answer(turn_steps: list[dict[str, Any]], *, include_thoughts: bool) -> tuple[list[Any], list[Any]]:
    """The model's steps as generateContent parts, and as the Interactions steps they convert to."""
    parts: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    loose: str | None = None  # the turn's thought signature, waiting for its first text part
    for step in turn_steps:
        kind = step.get("type")
        if kind == "thought":
            text = "".join(block.get("text", "") for block in step.get("summary", []))
            if include_thoughts:
                parts.append({"text": text, "thought": True, "thoughtSignature": step["signature"]})
                steps.append(
                    {"type": "thought", "signature": step["signature"], "summary": [{"type": "text", "text": text}]}
                )
            else:
                loose = step["signature"]
        elif kind == "function_call":
            loose = None  # the call carries a signature of its own
            call = {"id": step["id"], "name": step["name"], "args": step["arguments"]}
            converted = {key: step[key] for key in ("type", "id", "name", "arguments")}
            part: dict[str, Any] = {"functionCall": call}
            if "signature" in step:
                part["thoughtSignature"] = converted["signature"] = step["signature"]
            parts.append(part)
            steps.append(converted)
        elif kind == "model_output":
            texts = [block for block in step.get("content", []) if block.get("type") == "text"]
            if not texts:
                continue
            if loose is not None:
                steps.append({"type": "thought", "signature": loose})
            for number, block in enumerate(texts):
                part = {"text": block["text"]}
                if number == 0 and loose is not None:
                    part["thoughtSignature"] = loose
                parts.append(part)
            loose = None
            steps.append({"type": "model_output", "content": [{"type": "text", "text": b["text"]} for b in texts]})
        # Anything else (an unknown step type) has no generateContent form.
    return parts, steps
