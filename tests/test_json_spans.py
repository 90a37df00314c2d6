"""A reply body parsed once: the same values as json.loads, and each step's bytes as they were sent."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.json_spans import split_steps

# --- a serializer that writes what a re-serializer would not ------------------------------------

_SPACES = st.sampled_from(["", " ", "  ", "\n", "\t", "\r\n ", " \n\t"])

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


def _number(value: float | int, data: st.DataObject) -> str:
    """One of the spellings JSON allows for a number."""
    if isinstance(value, int):
        spellings = [str(value)]
        if value == 0:
            spellings.append("-0")
        if 0 < abs(value) < 10**15:
            spellings += [f"{value}.0", f"{value:.6E}".replace("E+", "E"), f"{value}e0", f"{value}E+00"]
        return data.draw(st.sampled_from(spellings))
    spellings = [repr(value), f"{value:.17e}", f"{value:.17E}"]
    if value.is_integer() and abs(value) < 1e15:
        spellings.append(f"{int(value)}.0E+0")
    return data.draw(st.sampled_from(spellings))


def _string(value: str, data: st.DataObject) -> str:
    """A JSON string: raw non-ASCII, \\u escapes for everything, or escapes for some."""
    style = data.draw(st.sampled_from(["raw", "ascii", "all"]))
    if style == "all":
        return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else json.dumps(c)[1:-1] for c in value) + '"'
    return json.dumps(value, ensure_ascii=style == "ascii")


def render(value: Any, data: st.DataObject) -> str:
    """`value` as JSON text with odd spacing, shuffled keys and unusual number spellings."""

    def space() -> str:
        return data.draw(_SPACES)

    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return _number(value, data)
    if isinstance(value, str):
        return _string(value, data)
    if isinstance(value, list):
        inner = ("," + space()).join(render(item, data) + space() for item in value)
        return "[" + space() + inner + "]"
    keys = data.draw(st.permutations(list(value)))
    members = [space() + _string(key, data) + space() + ":" + space() + render(value[key], data) for key in keys]
    return "{" + ",".join(members) + space() + "}"


# --- properties --------------------------------------------------------------------------------


@settings(
    max_examples=300, derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    steps=st.lists(_values, max_size=5),
    before=st.dictionaries(st.text(max_size=6).filter(lambda k: k != "steps"), _values, max_size=3),
    after=st.dictionaries(st.text(max_size=6).filter(lambda k: k != "steps"), _values, max_size=3),
    earlier=st.none() | st.lists(_values, max_size=3) | _scalars,
    data=st.data(),
)
def test_steps_are_the_bytes_sent_and_parse_as_json_loads_does(
    steps: list[Any], before: dict[str, Any], after: dict[str, Any], earlier: Any, data: st.DataObject
) -> None:
    """For any body, the parsed object equals json.loads and each step's bytes are exactly what the body held (an earlier, overridden `steps` key included)."""
    written = [render(step, data) for step in steps]

    def space() -> str:
        return data.draw(_SPACES)

    array = "[" + space() + ("," + space()).join(text + space() for text in written) + "]"
    members = [_string(k, data) + space() + ":" + space() + render(v, data) for k, v in before.items()]
    if earlier is not None:
        members.insert(0, '"steps":' + render(earlier, data))
    members.append(_string("steps", data) + space() + ":" + space() + array)
    members += [_string(k, data) + ":" + render(v, data) for k, v in after.items()]
    body = (space() + "{" + space() + ("," + space()).join(members) + space() + "}" + space()).encode()

    parsed, step_bytes = split_steps(body)

    assert parsed == json.loads(body)
    assert step_bytes == [text.encode() for text in written]
    for index, raw in enumerate(step_bytes):
        assert raw in body
        assert json.loads(raw) == parsed["steps"][index]


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(value=_values, data=st.data())
def test_anything_json_loads_refuses_or_that_is_not_an_object_is_refused(value: Any, data: st.DataObject) -> None:
    """A body cut short, with a byte changed, or holding a value other than an object raises ValueError, as json.loads does."""
    text = render({"steps": [value], "id": value}, data).encode()
    cut = data.draw(st.integers(min_value=0, max_value=len(text)))
    noise = data.draw(st.sampled_from([b"", b",", b"}", b"]", b'"', b":", b"x", b"\xff", b" "]))
    body = text[:cut] + noise + text[cut + data.draw(st.integers(0, 1)) :]
    try:
        expected = json.loads(body)
    except ValueError:
        with pytest.raises(ValueError):  # noqa: PT011 - JSONDecodeError or UnicodeDecodeError, as json.loads
            split_steps(body)
        return
    if not isinstance(expected, dict):
        with pytest.raises(ValueError, match="Expecting a JSON object"):
            split_steps(body)
        return
    parsed, step_bytes = split_steps(body)
    assert parsed == expected
    steps = expected.get("steps")
    assert [json.loads(raw) for raw in step_bytes] == (steps if isinstance(steps, list) else [])


# --- the cases worth naming --------------------------------------------------------------------


def test_number_spellings_are_kept_and_parse_as_json_loads() -> None:
    """`1.0E+2`, `-0`, `1.50E+2` keep their spelling in the step bytes; `1e400` parses as inf, as json.loads gives."""
    body = b'{"steps":[ {"n":1.0E+2,"z":-0 ,"m":1.50E+2} , {"big":1e400,"neg":-1e400}]}'
    parsed, steps = split_steps(body)
    assert steps == [b'{"n":1.0E+2,"z":-0 ,"m":1.50E+2}', b'{"big":1e400,"neg":-1e400}']
    assert parsed["steps"][0] == {"n": 100.0, "z": 0, "m": 150.0}
    assert parsed["steps"][1]["big"] == math.inf
    assert parsed["steps"][1]["neg"] == -math.inf
    assert json.loads(body) == parsed


def test_nan_and_infinity_literals_parse_as_json_loads() -> None:
    """The NaN and Infinity literals json.loads accepts are accepted the same way, spelling kept."""
    parsed, steps = split_steps(b'{"steps":[NaN,-Infinity]}')
    assert steps == [b"NaN", b"-Infinity"]
    assert math.isnan(parsed["steps"][0])
    assert parsed["steps"][1] == -math.inf


def test_unicode_escapes_and_raw_non_ascii_are_kept_byte_for_byte() -> None:
    """A step with raw UTF-8, \\u escapes and an escaped surrogate pair comes back exactly as sent."""
    step = '{"text":"naïve \\u00e9 \\ud83d\\ude00 😀 中文","k":"\\"q\\" \\\\ \\/"}'
    body = ('{"id":"é","steps":[' + step + "]}").encode()
    parsed, steps = split_steps(body)
    assert steps == [step.encode()]
    assert parsed["steps"][0]["text"] == "naïve é 😀 😀 中文"
    assert parsed == json.loads(body)


def test_duplicate_keys_keep_the_last_value() -> None:
    """A repeated key keeps its last value and its first position, as json.loads; a repeated steps key gives the last array's bytes."""
    body = b'{"steps":[1,2],"a":1,"a":2,"steps":[ 3 ]}'
    parsed, steps = split_steps(body)
    assert parsed == json.loads(body) == {"steps": [3], "a": 2}
    assert list(parsed) == list(json.loads(body))
    assert steps == [b"3"]
    parsed, steps = split_steps(b'{"steps":[1],"steps":"none"}')
    assert parsed == {"steps": "none"}
    assert steps == []


def test_an_escaped_key_is_the_same_key() -> None:
    """`"st\\u0065ps"` is the key `steps`, for us as for json.loads."""
    parsed, steps = split_steps(b'{"st\\u0065ps":[{"a":1}]}')
    assert parsed == {"steps": [{"a": 1}]}
    assert steps == [b'{"a":1}']


@pytest.mark.parametrize(
    ("body", "parsed"),
    [
        (b"{}", {}),
        (b" \r\n{ \t}\n", {}),
        (b'{"status":"completed"}', {"status": "completed"}),
        (b'{"steps":null}', {"steps": None}),
        (b'{"steps":{"0":1}}', {"steps": {"0": 1}}),
        (b'{"steps":[]}', {"steps": []}),
        (b'{"steps":[ ]}', {"steps": []}),
        (b'{"outer":{"steps":[1]}}', {"outer": {"steps": [1]}}),
    ],
)
def test_no_steps_array_gives_no_step_bytes(body: bytes, parsed: dict[str, Any]) -> None:
    """A missing, null, non-array, empty or nested-only `steps` gives no step bytes and the body as json.loads reads it."""
    assert split_steps(body) == (parsed, [])
    assert json.loads(body) == parsed


def test_a_byte_order_mark_is_skipped_as_json_loads_skips_it() -> None:
    """A leading UTF-8 BOM is skipped; the step bytes are still exact."""
    parsed, steps = split_steps(b'\xef\xbb\xbf{"steps":["\xc3\xa9"]}')
    assert parsed == {"steps": ["é"]}
    assert steps == [b'"\xc3\xa9"']


@pytest.mark.parametrize(
    "body",
    [b"", b" ", b"[]", b'"steps"', b"1", b"null", b'[{"steps":[]}]', b'{"steps":[1,]}', b'{"steps":[1]', b'{"a":1,}'],
)
def test_anything_but_one_object_is_refused(body: bytes) -> None:
    """Empty bodies, top-level arrays, strings, numbers, null and broken objects raise JSONDecodeError."""
    with pytest.raises(json.JSONDecodeError):
        split_steps(body)


def test_trailing_data_and_bad_utf8_are_refused() -> None:
    """Data after the object raises JSONDecodeError, and bytes that are not UTF-8 UnicodeDecodeError, both ValueErrors."""
    with pytest.raises(json.JSONDecodeError, match="Extra data"):
        split_steps(b'{"steps":[]} {}')
    with pytest.raises(UnicodeDecodeError):
        split_steps(b'{"steps":["\xff"]}')
