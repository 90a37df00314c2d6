"""A JSON response body parsed once, with the exact bytes of each element of its `steps` array.

Replay must send the model's steps back exactly as the API sent them. Parsing a reply with
`json.loads` and serializing the steps again would change what a re-serializer changes (key
spacing, number spellings such as `1.50E+2`, escapes) and would cost a second pass over the whole
history on every turn. So the body is walked here once, with the C decoder doing every value
(`JSONDecoder.raw_decode` returns where a value ends), and each step's bytes are sliced from the
body itself.

The parsed values are exactly what `json.loads` gives for the same body, including its choices
where JSON leaves room: a duplicated key keeps its last value, `NaN`, `Infinity` and numbers
too large for a float (`1e400`) parse as the float `json.loads` makes of them (non-finite), and
a number keeps its spelling in the step bytes whatever it parses as. Bodies must be UTF-8, what
the API sends; like `json.loads` with bytes, a leading byte-order mark is skipped and UTF-8-encoded
lone surrogates are accepted, but unlike it UTF-16 and UTF-32 bodies are refused.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["split_steps"]

_DECODER = json.JSONDecoder()
# JSON's whitespace: exactly these four characters, anywhere between tokens.
_SPACE = re.compile(r"[ \t\n\r]*")


def split_steps(raw: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """(the body's top-level object, the bytes of each element of its top-level `steps` array).

    The list is empty when `steps` is missing or not an array; with a repeated `steps` key it
    follows the last one, as the parsed object does. Anything that is not one JSON object raises
    `json.JSONDecodeError` (a `ValueError`), or `UnicodeDecodeError` for bytes that are not
    UTF-8; nesting too deep for the decoder raises `RecursionError`, as `json.loads` does.
    """
    text = raw.decode("utf-8", "surrogatepass")
    # In an ASCII body each character is one byte, so spans slice the bytes directly; otherwise
    # the text is sliced and encoded again, which gives back the very bytes it was decoded from.
    ascii_only = len(text) == len(raw)
    decode = _DECODER.raw_decode
    # A UTF-8 byte-order mark is skipped, as `json.loads` skips it in bytes.
    index = _skip(text, 1 if text.startswith("\ufeff") else 0)
    if text[index : index + 1] != "{":
        raise json.JSONDecodeError("Expecting a JSON object", text, index)
    index = _skip(text, index + 1)
    parsed: dict[str, Any] = {}
    spans: list[tuple[int, int]] = []
    if text[index : index + 1] == "}":
        index += 1
    else:
        while True:
            if text[index : index + 1] != '"':
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, index)
            key, index = decode(text, index)
            index = _skip(text, index)
            if text[index : index + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, index)
            index = _skip(text, index + 1)
            if key == "steps":
                spans = []
                if text[index : index + 1] == "[":
                    parsed[key], index = _array(text, index, spans)
                else:
                    parsed[key], index = decode(text, index)
            else:
                parsed[key], index = decode(text, index)
            index = _skip(text, index)
            separator = text[index : index + 1]
            if separator == "}":
                index += 1
                break
            if separator != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
            index = _skip(text, index + 1)
    index = _skip(text, index)
    if index != len(text):
        raise json.JSONDecodeError("Extra data", text, index)
    if ascii_only:
        return parsed, [raw[start:end] for start, end in spans]
    return parsed, [text[start:end].encode("utf-8", "surrogatepass") for start, end in spans]


def _skip(text: str, index: int) -> int:
    """The index of the first character at or after `index` that is not JSON whitespace."""
    match = _SPACE.match(text, index)
    return index if match is None else match.end()


def _array(text: str, index: int, spans: list[tuple[int, int]]) -> tuple[list[Any], int]:
    """The array starting at `text[index]` (a `[`), parsed, with each element's (start, end)
    appended to `spans`; and the index just past its `]`."""
    decode = _DECODER.raw_decode
    items: list[Any] = []
    index = _skip(text, index + 1)
    if text[index : index + 1] == "]":
        return items, index + 1
    while True:
        item, end = decode(text, index)
        items.append(item)
        spans.append((index, end))
        index = _skip(text, end)
        separator = text[index : index + 1]
        if separator == "]":
            return items, index + 1
        if separator != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
        index = _skip(text, index + 1)
