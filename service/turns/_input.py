"""What a client may send as a turn's input, and the check that function results answer calls."""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from typing import Any

from ..errors import FunctionResultMismatch, InvalidInput
from ..policy import MediaBlock

__all__ = ["MediaBlock", "check_function_results", "media_blocks", "normalize_client_input", "pending_calls"]

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
MEDIA_TYPES = CONTENT_TYPES - {"text"}
# A MIME type as RFC 6838 spells one (optionally with parameters, which the route's rule ignores):
# checked before anything compares it, so a refusal never has to quote what a client wrote.
_MIME_TYPE = re.compile(
    r"([A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126})/([A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126})(?:\s*;.*)?", re.S
)
# Blocks whose kind the MIME type's top-level type must name; a document may be any type.
_TOP_LEVEL = {"image": "image", "audio": "audio", "video": "video"}
# The base64 alphabet's values, for the check that unused trailing bits are zero.
_B64_VALUE = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
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
    if isinstance(step["result"], list):
        # A content list may carry media too: the same checks as user input's, and the route's
        # rule at the claim. Other items are left as they are (a result may be any JSON list).
        for position, item in enumerate(step["result"]):
            if isinstance(item, dict) and item.get("type") in MEDIA_TYPES:
                _no_unknown_keys(item, _BLOCK_KEYS[item["type"]], f"{pointer}/result/{position}")
                _check_media(item, f"{pointer}/result/{position}")
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
        else:
            _check_media(block, where)


def _check_media(block: dict[str, Any], where: str) -> None:
    """A media block's own shape, whatever the route: exactly one of inline `data` (strict base64)
    or `uri`, and a `mime_type` of the block's kind. The route's rule (which types, how large,
    which URIs) is applied at the claim, where the conversation's route is known."""
    has_data, has_uri = "data" in block, "uri" in block
    if has_data == has_uri:
        raise InvalidInput("a media block needs exactly one of `data` or `uri`", pointer=where)
    if has_data:
        _check_base64(block["data"], f"{where}/data")
    elif not isinstance(block["uri"], str) or not block["uri"]:
        raise InvalidInput("a media block's `uri` must be a non-empty string", pointer=f"{where}/uri")
    mime_type = block.get("mime_type")
    match = _MIME_TYPE.fullmatch(mime_type) if isinstance(mime_type, str) else None
    if match is None:
        # Required, although the API may guess one: a route's allowed types cannot be checked
        # against a guess, and what the model is told it received should be what was checked.
        raise InvalidInput("a media block needs a `mime_type` such as image/png", pointer=f"{where}/mime_type")
    top = _TOP_LEVEL.get(block["type"])
    if top is not None and match.group(1).lower() != top:
        raise InvalidInput(f"{block['type']} blocks need a {top}/* `mime_type`", pointer=f"{where}/mime_type")


def _check_base64(data: Any, pointer: str) -> None:
    """Strict base64 (RFC 4648 section 4): the standard alphabet only (no whitespace, line breaks
    or URL-safe characters), padded to a multiple of four, and no stray bits in the last
    character. Anything else would be stored, replayed on every turn and left for the provider to
    read however it reads it."""
    if not isinstance(data, str) or not data:
        raise InvalidInput("a media block's `data` must be a non-empty base64 string", pointer=pointer)
    if len(data) % 4:
        raise InvalidInput("`data` is not strict base64 (length not a multiple of 4)", pointer=pointer)
    try:
        binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: a character outside ASCII
        raise InvalidInput(
            "`data` is not strict base64 (RFC 4648: no whitespace, standard alphabet, padded)", pointer=pointer
        ) from None
    padding = _padding(data)
    if padding and _B64_VALUE[data[-1 - padding]] & (0b1111 if padding == 2 else 0b11):
        raise InvalidInput("`data` is not canonical base64 (non-zero padding bits)", pointer=pointer)


def _padding(data: str) -> int:
    # Not rstrip: that would copy megabytes to count two characters.
    return 2 if data.endswith("==") else 1 if data.endswith("=") else 0


def media_blocks(raw: Any) -> list[MediaBlock]:
    """The media blocks of a turn's input as the client sent it (already checked by
    `normalize_client_input`): content blocks, user input, and content-list function results,
    each with a pointer into the request. Sizes come from the base64 length, without decoding."""
    found = []
    for pointer, block in _media_of(raw):
        data = block.get("data")
        size = None
        if isinstance(data, str):
            size = len(data) // 4 * 3 - _padding(data)
        essence = str(block["mime_type"]).split(";", 1)[0].strip().lower()
        found.append(MediaBlock(pointer, block["type"], essence, size, block.get("uri")))
    return found


def _media_of(raw: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    items = [raw] if isinstance(raw, dict) else raw if isinstance(raw, list) else []
    if all(item["type"] in CONTENT_TYPES for item in items):
        lists = [("/input", items)]
    else:
        lists = []
        for index, step in enumerate(items):
            if step["type"] == "user_input":
                lists.append((f"/input/{index}/content", step["content"]))
            elif isinstance(step.get("result"), list):
                lists.append((f"/input/{index}/result", step["result"]))
    for where, blocks in lists:
        for position, block in enumerate(blocks):
            if isinstance(block, dict) and block.get("type") in MEDIA_TYPES:
                yield f"{where}/{position}", block


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
