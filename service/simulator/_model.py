"""The simulated model: deterministic replies that depend on the whole conversation.

Triggers (matched case-insensitively in the newest user text):

- ``call NAME`` (optionally ``with {json}``) where NAME is a declared function tool: a
  ``function_call`` step per named tool, status ``requires_action``;
- ``what did I say first?``: quotes the first user text of the whole history, which only a
  client that replayed (or chained) its history can get right;
- ``how many messages``: counts the user inputs in the history;
- ``sim:fail``: the interaction ends ``failed`` with an error on its model_output;
- ``sim:continue N`` (1 to 5): the answer comes over N + 1 interactions (see _continuation);
- otherwise, with a ``response_format`` schema: JSON that validates against it;
- otherwise an echo that names the turn number and a digest of the whole input, and the media
  blocks (kind, MIME type, decoded size) of the newest input and of the history before it.

Every turn opens with a ``thought`` step carrying an opaque signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from ._steps import digest, media_received, user_text

__all__ = ["ModelTurn", "SimulatedModel", "json_from_schema"]

_CALL = re.compile(r"\bcall\s+([A-Za-z_][A-Za-z0-9_]*)(?:\s+with\s+(\{.*?\})(?=\s+and\s+call\b|\s*$))?", re.I | re.S)


@dataclass(frozen=True)
class ModelTurn:
    steps: list[dict[str, Any]]
    status: str
    usage: dict[str, int]


class SimulatedModel:
    """Produces one turn from the full transcript; signatures are keyed by a per-instance secret."""

    def __init__(self, *, emit_unknown: bool) -> None:
        self._secret = secrets.token_bytes(32)
        self._emit_unknown = emit_unknown

    def reply(self, interaction_id: str, transcript: list[dict[str, Any]], body: dict[str, Any]) -> ModelTurn:
        """The steps, status and usage of one turn; `transcript` ends with the new input."""
        user_texts = [user_text(s) for s in transcript if s.get("type") == "user_input"]
        history_digest = digest(transcript)[:12]
        turn = len(user_texts)
        steps: list[dict[str, Any]] = [self._thought(interaction_id, turn, len(transcript))]
        if self._emit_unknown:
            steps.append(
                {
                    "type": "x_sim_trace",
                    "turn": turn,
                    "history_digest": history_digest,
                    "note": "an unknown step type: store it and replay it as received",
                }
            )

        status = "completed"
        last = transcript[-1] if transcript else {}
        latest = user_texts[-1] if user_texts else ""
        calls = _requested_calls(latest, body.get("tools")) if last.get("type") == "user_input" else []
        if calls:
            for index, (name, arguments) in enumerate(calls):
                call_id = f"call_{hashlib.sha256(f'{interaction_id}:{index}'.encode()).hexdigest()[:16]}"
                step = {"type": "function_call", "id": call_id, "name": name, "arguments": arguments}
                if index == 0:
                    # Gemini 3 signs the first call of a turn; the SDK keeps it as an extra field.
                    step["signature"] = self._sign(interaction_id, "call")
                steps.append(step)
            status = "requires_action"
        elif last.get("type") == "function_result":
            results = [s for s in transcript[_trailing_results(transcript) :]]
            summary = "; ".join(
                f"{s.get('name', s['call_id'])} returned {json.dumps(s['result'], sort_keys=True)}" for s in results
            )
            steps.append(self._output(f"Function results received: {summary}.", turn))
        elif "sim:fail" in latest.lower():
            output = self._output("", turn)
            output["content"] = []
            output["error"] = {"code": 500, "message": "simulated model failure", "details": []}
            steps.append(output)
            status = "failed"
        elif re.search(r"what did i say first", latest, re.I):
            steps.append(self._output(f'You first said: "{user_texts[0]}".', turn))
        elif re.search(r"how many messages", latest, re.I):
            steps.append(self._output(f"You have sent {turn} messages.", turn))
        elif (schema := _response_schema(body.get("response_format"))) is not None:
            value = json_from_schema(schema, seed=latest)
            steps.append(self._output(json.dumps(value, sort_keys=True), turn))
        else:
            steps.append(
                self._output(
                    f'Turn {turn}: you said "{latest}". I have read {len(transcript)} steps '
                    f"of history (digest {history_digest}).{_media_note(transcript)}",
                    turn,
                )
            )
        return ModelTurn(steps, status, _usage(transcript, body, steps))

    def _sign(self, interaction_id: str, label: str) -> str:
        mac = hmac.new(self._secret, f"{interaction_id}:{label}".encode(), hashlib.sha256)
        return base64.b64encode(secrets.token_bytes(8) + mac.digest()).decode()

    def _thought(self, interaction_id: str, turn: int, size: int) -> dict[str, Any]:
        return {
            "type": "thought",
            "signature": self._sign(interaction_id, "thought"),
            "summary": [{"type": "text", "text": f"Turn {turn}: reading {size} steps of history."}],
        }

    def _output(self, text: str, turn: int) -> dict[str, Any]:
        step: dict[str, Any] = {"type": "model_output", "content": [{"type": "text", "text": text}]}
        if self._emit_unknown:
            # An unknown field, and a number the SDK would respell, to catch lossy storage.
            step["x_sim_meta"] = {"turn": turn, "confidence": 0.5, "nested": {"kept": None}}
        return step


def _media_note(transcript: list[dict[str, Any]]) -> str:
    """What media the model received: in the newest input, and earlier in the history."""
    inputs = [step for step in transcript if step.get("type") == "user_input"]
    newest = media_received(inputs[-1]) if inputs else []
    earlier = [item for step in inputs[:-1] for item in media_received(step)]
    note = f" Media in this input: {'; '.join(newest)}." if newest else ""
    return note + (f" Media earlier in the history: {'; '.join(earlier)}." if earlier else "")


def _trailing_results(transcript: list[dict[str, Any]]) -> int:
    index = len(transcript)
    while index > 0 and transcript[index - 1].get("type") == "function_result":
        index -= 1
    return index


def _requested_calls(text: str, tools: Any) -> list[tuple[str, dict[str, Any]]]:
    declared = {
        tool["name"]: tool
        for tool in tools or []
        if isinstance(tool, dict) and tool.get("type") == "function" and "name" in tool
    }
    calls: list[tuple[str, dict[str, Any]]] = []
    for match in _CALL.finditer(text):
        name = match.group(1)
        if name not in declared:
            continue
        arguments: Any = None
        if match.group(2):
            try:
                arguments = json.loads(match.group(2))
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(arguments, dict):
            schema = declared[name].get("parameters")
            arguments = json_from_schema(schema, seed=name) if isinstance(schema, dict) else {}
        calls.append((name, arguments))
    return calls


def _response_schema(response_format: Any) -> dict[str, Any] | None:
    formats = response_format if isinstance(response_format, list) else [response_format]
    for item in formats:
        if isinstance(item, dict):
            schema = item.get("schema") or item.get("json_schema")
            if isinstance(schema, dict):
                return schema
    return None


def json_from_schema(schema: dict[str, Any], *, seed: str, depth: int = 0) -> Any:
    """A deterministic value that validates against a JSON Schema (the subset models use)."""
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return json_from_schema(schema[key][0], seed=seed, depth=depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties", {})
        return {
            name: json_from_schema(sub, seed=f"{seed}:{name}", depth=depth + 1)
            for name, sub in properties.items()
            if depth < 6
        }
    if kind == "array":
        count = max(1, int(schema.get("minItems", 1)))
        raw_items = schema.get("items")
        items: dict[str, Any] = raw_items if isinstance(raw_items, dict) else {}
        return [json_from_schema(items, seed=f"{seed}[{i}]", depth=depth + 1) for i in range(count)]
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    text = f"sim:{hashlib.sha256(seed.encode()).hexdigest()[:8]}"
    if "minLength" in schema:
        text = text.ljust(int(schema["minLength"]), "x")
    if "maxLength" in schema:
        text = text[: int(schema["maxLength"])]
    return text


def _tokens(value: Any) -> int:
    # About four characters a token, as Gemini's documentation estimates.
    return len(json.dumps(value, separators=(",", ":"))) // 4 + 1


def _usage(transcript: list[dict[str, Any]], body: dict[str, Any], steps: list[dict[str, Any]]) -> dict[str, int]:
    prompt = [transcript, body.get("system_instruction"), body.get("tools")]
    input_tokens = _tokens(prompt)
    thought_tokens = sum(_tokens(s) for s in steps if s["type"] == "thought")
    output_tokens = sum(_tokens(s) for s in steps if s["type"] != "thought")
    return {
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "total_thought_tokens": thought_tokens,
        "total_cached_tokens": 0,
        "total_tool_use_tokens": 0,
        "total_tokens": input_tokens + output_tokens + thought_tokens,
    }
