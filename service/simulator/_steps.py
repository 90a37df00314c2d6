"""Input normalization and the strict checks on replayed history."""

from __future__ import annotations

import binascii
import hashlib
import json
import threading
from typing import Any

from ._errors import invalid

__all__ = ["CONTENT_TYPES", "MODEL_STEP_TYPES", "Ledger", "digest", "media_received", "normalize_input", "user_text"]

CONTENT_TYPES = frozenset({"text", "image", "audio", "video", "document"})
# Step types a client may originate; everything else in an input list must be replayed history.
CLIENT_STEP_TYPES = frozenset({"user_input", "function_result"})
MODEL_STEP_TYPES = frozenset({"thought", "model_output", "function_call"})


def _canonical(value: Any) -> Any:
    # The SDK re-serializes what it sends (1.50 -> 1.5, 1e2 -> 100.0, keys reordered), so the
    # comparison is over JSON values, with integral floats equal to their integers.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def digest(step: Any) -> str:
    """SHA-256 of a step's canonical JSON value."""
    text = json.dumps(_canonical(step), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def normalize_input(raw: Any) -> list[dict[str, Any]]:
    """Turn every accepted `input` shape into a list of steps."""
    if isinstance(raw, str):
        return [{"type": "user_input", "content": [{"type": "text", "text": raw}]}]
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise invalid("input must be a non-empty string, content block list or step list")
    if not all(isinstance(item, dict) for item in raw):
        raise invalid("input list items must be objects")
    kinds = {item.get("type") in CONTENT_TYPES for item in raw}
    if kinds == {True}:
        return [{"type": "user_input", "content": list(raw)}]
    if kinds != {False}:
        raise invalid("input mixes content blocks and steps")
    for index, step in enumerate(raw):
        if not isinstance(step.get("type"), str):
            raise invalid(f"input[{index}]: step has no type")
        if step["type"] == "user_input":
            _check_content(step.get("content"), f"input[{index}].content")
    return list(raw)


def _check_content(content: Any, where: str) -> None:
    if not isinstance(content, list):
        raise invalid(f"{where} must be a list of content blocks")
    for index, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") not in CONTENT_TYPES:
            raise invalid(f"{where}[{index}]: unsupported content block")
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise invalid(f"{where}[{index}]: text block needs a string 'text'")
        if block["type"] != "text":
            _check_media(block, f"{where}[{index}]")


def _check_media(block: dict[str, Any], where: str) -> None:
    # The API decodes inline data and refuses what does not decode; stricter here: no whitespace.
    if not isinstance(block.get("data"), str) and not isinstance(block.get("uri"), str):
        raise invalid(f"{where}: {block['type']} block needs 'data' or 'uri'")
    if isinstance(block.get("data"), str):
        try:
            binascii.a2b_base64(block["data"], strict_mode=True)
        except (binascii.Error, ValueError):
            raise invalid(f"{where}: {block['type']} block's 'data' is not valid base64") from None


def media_received(step: dict[str, Any]) -> list[str]:
    """What the media blocks of a user_input step are, as the simulated model reports them: kind,
    MIME type and decoded size (or `by uri`), never content."""
    seen = []
    for block in step.get("content", []):
        if block.get("type") in CONTENT_TYPES - {"text"}:
            mime_type = block.get("mime_type", "unknown")
            if isinstance(block.get("data"), str):
                data = block["data"]
                size = len(data) // 4 * 3 - (2 if data.endswith("==") else 1 if data.endswith("=") else 0)
                seen.append(f"{block['type']} {mime_type} {size} bytes")
            else:
                seen.append(f"{block['type']} {mime_type} by uri")
    return seen


def user_text(step: dict[str, Any]) -> str:
    """The text blocks of a user_input step, joined."""
    return " ".join(block["text"] for block in step.get("content", []) if block.get("type") == "text")


class Ledger:
    """Everything this simulator produced, so replayed history can be checked against it.

    Stateless clients replay history with `store=false`, so this must outlive any stored
    interaction; it holds digests and call ids only, never content.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: set[str] = set()
        self._signatures: set[str] = set()
        self._calls: dict[str, str] = {}
        self._signed_calls: set[str] = set()

    def record(self, steps: list[dict[str, Any]]) -> None:
        with self._lock:
            for step in steps:
                self._steps.add(digest(step))
                if isinstance(step.get("signature"), str):
                    self._signatures.add(step["signature"])
                if step.get("type") == "function_call":
                    self._calls[step["id"]] = step["name"]
                    if isinstance(step.get("signature"), str):
                        self._signed_calls.add(step["id"])

    def knows_signature(self, signature: str) -> bool:
        """Whether this simulator issued the signature (standard base64, as steps carry it)."""
        with self._lock:
            return signature in self._signatures

    def call(self, call_id: str) -> tuple[str, bool] | None:
        """A function call this simulator issued: (its name, whether it was signed)."""
        with self._lock:
            name = self._calls.get(call_id)
            return None if name is None else (name, call_id in self._signed_calls)

    def clear(self) -> None:
        with self._lock:
            self._steps.clear()
            self._signatures.clear()
            self._calls.clear()
            self._signed_calls.clear()

    def check_history(self, history: list[dict[str, Any]], new_input: list[dict[str, Any]], *, strict: bool) -> None:
        """Refuse an input the real model would mis-handle: altered replays, unanswered or
        unknown function calls, thoughts without their signature."""
        pending: dict[str, str] = {}
        for step in history:
            _track_calls(step, pending)
        for index, step in enumerate(new_input):
            kind = step["type"]
            where = f"input[{index}]"
            if kind == "user_input":
                if pending:
                    raise invalid(
                        f"{where}: function call(s) {sorted(pending)} must be answered with a "
                        "function_result before new user input"
                    )
            elif kind == "function_result":
                self._check_result(step, pending, where)
            elif kind == "thought":
                self._check_thought(step, where, strict=strict)
            elif kind not in CLIENT_STEP_TYPES and strict and digest(step) not in self._steps:
                raise invalid(f"{where}: replayed {kind} step does not match any step the model produced")
            _track_calls(step, pending)

    def _check_result(self, step: dict[str, Any], pending: dict[str, str], where: str) -> None:
        call_id = step.get("call_id")
        if not isinstance(call_id, str) or "result" not in step:
            raise invalid(f"{where}: function_result needs call_id and result")
        with self._lock:
            issued = self._calls.get(call_id)
        if issued is None:
            raise invalid(f"{where}: function_result call_id {call_id!r} matches no function call")
        if "name" in step and step["name"] != issued:
            raise invalid(f"{where}: function_result name {step['name']!r} does not match call {call_id!r}")
        if call_id not in pending:
            raise invalid(f"{where}: function call {call_id!r} is not awaiting a result in this history")

    def _check_thought(self, step: dict[str, Any], where: str, *, strict: bool) -> None:
        signature = step.get("signature")
        if not isinstance(signature, str) or not signature:
            raise invalid(f"{where}: replayed thought has no signature")
        with self._lock:
            known = signature in self._signatures and (not strict or digest(step) in self._steps)
        if not known:
            raise invalid(f"{where}: thought signature is not valid for this content")


def _track_calls(step: dict[str, Any], pending: dict[str, str]) -> None:
    if step.get("type") == "function_call" and isinstance(step.get("id"), str):
        pending[step["id"]] = step.get("name", "")
    elif step.get("type") == "function_result":
        pending.pop(step.get("call_id", ""), None)
