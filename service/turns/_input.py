"""What a client may send as a turn's input, and the check that function results answer calls."""

from __future__ import annotations

import re
from typing import Any

from ..errors import FunctionResultMismatch, InvalidInput

__all__ = ["normalize_client_input", "pending_calls", "check_function_results"]

# Error messages never quote what the client sent (it may be patient or card data); they point
# at it with a JSON pointer instead. Only identifier-like field names are echoed.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

CONTENT_TYPES = frozenset({"text", "image", "audio", "video", "document"})
_BLOCK_KEYS = {
    "text": {"type", "text"},
    "image": {"type", "data", "uri", "mime_type", "resolution"},
    "audio": {"type", "data", "uri", "mime_type", "sample_rate", "channels"},
    "video": {"type", "data", "uri", "mime_type", "resolution"},
    "document": {"type", "data", "uri", "mime_type"},
}
_STEP_KEYS = {
    "user_input": {"type", "content"},
    "function_result": {"type", "call_id", "name", "result", "is_error"},
}


def normalize_client_input(raw: Any) -> list[dict[str, Any]]:
    """A string, content blocks, or client steps (`user_input`, `function_result`) as steps.

    Strict on purpose: an unknown key or step type is refused here (422) rather than sent to
    the model, where it would be stored and replayed for the life of the conversation.
    """
    if isinstance(raw, str):
        if not raw.strip():
            raise InvalidInput("input text is empty", pointer="/input")
        return [{"type": "user_input", "content": [{"type": "text", "text": raw}]}]
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise InvalidInput("input must be a non-empty string, content blocks or steps", pointer="/input")
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise InvalidInput("each input item needs a string `type`", pointer=f"/input/{index}")
    if all(item["type"] in CONTENT_TYPES for item in raw):
        _check_blocks(raw, "/input")
        return [{"type": "user_input", "content": list(raw)}]
    for index, step in enumerate(raw):
        _check_step(step, f"/input/{index}")
    return list(raw)


def _check_step(step: dict[str, Any], pointer: str) -> None:
    kind = step["type"]
    if kind not in _STEP_KEYS:
        allowed = ", ".join(sorted(_STEP_KEYS))
        raise InvalidInput(
            f"this step type cannot be sent by a client (allowed: {allowed}; "
            "content blocks may not be mixed with steps)",
            pointer=f"{pointer}/type",
        )
    _no_unknown_keys(step, _STEP_KEYS[kind], pointer)
    if kind == "user_input":
        content = step.get("content")
        if not isinstance(content, list) or not content:
            raise InvalidInput("user_input needs a non-empty `content` list", pointer=f"{pointer}/content")
        _check_blocks(content, f"{pointer}/content")
        return
    if not isinstance(step.get("call_id"), str) or not step["call_id"]:
        raise InvalidInput("function_result needs a `call_id`", pointer=f"{pointer}/call_id")
    if "result" not in step or not isinstance(step["result"], (str, dict, list)):
        raise InvalidInput(
            "function_result needs a `result` (string, object or content list)", pointer=f"{pointer}/result"
        )
    if "name" in step and not isinstance(step["name"], str):
        raise InvalidInput("function_result `name` must be a string", pointer=f"{pointer}/name")
    if "is_error" in step and not isinstance(step["is_error"], bool):
        raise InvalidInput("function_result `is_error` must be a boolean", pointer=f"{pointer}/is_error")


def _check_blocks(blocks: list[Any], pointer: str) -> None:
    for index, block in enumerate(blocks):
        where = f"{pointer}/{index}"
        if not isinstance(block, dict) or block.get("type") not in CONTENT_TYPES:
            raise InvalidInput(
                f"unsupported content block (allowed: {', '.join(sorted(CONTENT_TYPES))})", pointer=where
            )
        _no_unknown_keys(block, _BLOCK_KEYS[block["type"]], where)
        if block["type"] == "text":
            if not isinstance(block.get("text"), str) or not block["text"]:
                raise InvalidInput("a text block needs non-empty `text`", pointer=f"{where}/text")
        elif not isinstance(block.get("data") or block.get("uri"), str):
            raise InvalidInput("a media block needs `data` or `uri`", pointer=where)


def _no_unknown_keys(item: dict[str, Any], allowed: set[str], pointer: str) -> None:
    unknown = sorted(set(item) - allowed)
    if unknown:
        name = unknown[0] if _IDENTIFIER.fullmatch(unknown[0]) else None
        raise InvalidInput(
            f"unknown field {name!r}" if name else "unknown field", pointer=f"{pointer}/{name}" if name else pointer
        )


def pending_calls(history: list[Any]) -> dict[str, str]:
    """Function calls in the history still waiting for a result: call id -> function name."""
    pending: dict[str, str] = {}
    for step in history:
        if not isinstance(step, dict):
            continue
        if step.get("type") == "function_call" and isinstance(step.get("id"), str):
            pending[step["id"]] = str(step.get("name", ""))
        elif step.get("type") == "function_result":
            pending.pop(str(step.get("call_id")), None)
    return pending


def check_function_results(history: list[Any], new_steps: list[dict[str, Any]]) -> None:
    """Every function_result must answer a pending call by id and name, and pending calls must
    be answered before new user input: the model would otherwise answer with an empty reply."""
    pending = pending_calls(history)
    for index, step in enumerate(new_steps):
        pointer = f"/input/{index}"
        if step["type"] == "function_result":
            call_id = step["call_id"]
            if call_id not in pending:
                waiting = ", ".join(sorted(pending)) or "none"
                raise FunctionResultMismatch(
                    f"this function_result's call_id answers no pending call (pending: {waiting})",
                    pointer=f"{pointer}/call_id",
                )
            if "name" in step and step["name"] != pending[call_id]:
                raise FunctionResultMismatch(
                    f"this function_result's name does not match call {call_id} ({pending[call_id]!r})",
                    pointer=f"{pointer}/name",
                )
            del pending[call_id]
        elif pending:
            raise FunctionResultMismatch(
                f"function call(s) {', '.join(sorted(pending))} must be answered with function_result "
                "steps before new user input",
                pointer=pointer,
            )
    if pending:
        # Gemini expects the results of a turn's parallel calls together.
        raise FunctionResultMismatch(
            f"function call(s) {', '.join(sorted(pending))} are still waiting for a function_result", pointer="/input"
        )
