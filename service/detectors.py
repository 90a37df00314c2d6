"""Content detectors: find data classes a turn's input carries that the client did not declare.

A hit raises the conversation's classification (it never falls: design invariant 1), which can
turn provider storage off for the rest of the conversation, or refuse the turn when the route
does not allow the class. Detectors return class names only; the matched text never leaves here.

Every detector runs in time linear in the input, with bounded work per character: a turn may
carry a megabyte of client text, and detection runs on the request path before anything else.
Patterns are compiled with RE2 only (`compile_linear`), which matches in linear time and refuses
patterns that would need backtracking (backreferences, lookaround). RE2 finds candidates; the
boundary and exclusion checks that used to be lookarounds are plain Python on bounded spans.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterable, Iterator
from itertools import accumulate, repeat
from operator import add, eq, mod
from typing import Any, Protocol

import re2  # type: ignore[import-untyped]

__all__ = ["LinearPattern", "PatternRefused", "compile_linear", "detect_classes"]


class _Match(Protocol):
    def start(self) -> int: ...

    def end(self) -> int: ...


class LinearPattern(Protocol):
    """A pattern compiled by RE2 (the part of its interface the detectors use)."""

    def search(self, text: str | bytes) -> _Match | None: ...

    def finditer(self, text: str | bytes) -> Iterator[_Match]: ...


class PatternRefused(ValueError):
    """A pattern RE2 cannot compile, typically because it needs backtracking."""


def compile_linear(pattern: str) -> LinearPattern:
    """Compile `pattern` with RE2, which matches in time linear in the input.

    There is deliberately no fallback to Python's `re`: a pattern RE2 refuses (backreferences,
    lookahead, lookbehind) raises `PatternRefused` when it is compiled, rather than backtracking
    later on a hostile input.
    """
    options = re2.Options()
    # The refusal is reported by the exception; RE2 would otherwise also log it to stderr.
    options.log_errors = False
    try:
        compiled: LinearPattern = re2.compile(pattern, options)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else ""
        reason = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
        raise PatternRefused(
            f"pattern {pattern!r} cannot be compiled by RE2 ({reason}); detector patterns must match "
            "in linear time, so backreferences and lookaround are not supported"
        ) from exc
    return compiled


# Card numbers (PAN) have 13 to 19 digits (ISO/IEC 7812).
_PAN_MIN, _PAN_MAX = 13, 19
# RFC 5321 section 4.5.3.1: at most 64 octets of local part and 255 of domain.
_LOCAL_MAX, _DOMAIN_MAX = 64, 255

# Runs of digits joined by single spaces or dashes (how card numbers are typed), when they hold
# enough digits for one. The scan sees every decimal digit as an ASCII one (`_ascii_digits`).
_DIGIT_RUN = compile_linear(r"[0-9](?:[ -]?[0-9]){12,}")
# US Social Security numbers in their written form; the word boundaries and the never-issued
# ranges are checked on each candidate.
_SSN = compile_linear(r"[0-9]{3}-[0-9]{2}-[0-9]{4}")
# A decimal digit other than 0-9 (RE2 has no class subtraction: "neither a non-digit nor 0-9").
_OTHER_DIGIT = compile_linear(r"[^\P{Nd}0-9]")
# An "@" and a domain-shaped text after it, ending at an ASCII word boundary (wherever Python's
# Unicode-aware boundary holds, this one does too). The local part before the "@", and the
# domain's length and end, are checked on at most 64 characters before and 255 after it.
_AT_DOMAIN = compile_linear(r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")

_ASCII_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_ASCII_ALNUM = _ASCII_LETTERS | frozenset("0123456789")
# Characters of an address's local part ("_" is a word character, the others are not).
_LOCAL_PUNCTUATION = frozenset(".%+-")
_LOCAL_CHARS = "".join(sorted(_ASCII_ALNUM | _LOCAL_PUNCTUATION | {"_"}))
_LABEL_CHARS = _ASCII_ALNUM | frozenset("-")

# Luhn tables over the ASCII digits: a digit's value, and its value doubled (less 9 above 9).
_VALUE = bytes.maketrans(b"0123456789", bytes(range(10)))
_DOUBLED = bytes.maketrans(b"0123456789", bytes((0, 2, 4, 6, 8, 1, 3, 5, 7, 9)))
_SHAPE = bytes.maketrans(b"0123456789", b"dddddddddd")
# Markers that keep a place that cannot start (or end) a card number from ever comparing equal:
# Luhn residues are 0-9, so a residue plus 20 or 40 can never equal the other side's.
_NO_END, _NO_START = 20, 40
_END_MARK = bytes.maketrans(b"ed", bytes((0, _NO_END)))
_START_MARK = bytes.maketrans(b"sd", bytes((0, _NO_START)))

# Joins the texts of one turn into a single scan. It is not a word character, digit, dash,
# space or e-mail character, so no candidate spans two texts and every detector sees each
# text's edges exactly as it would see the start and end of a text of its own.
_SEPARATOR = "\n"
# Integers at or beyond this have more than 19 digits: too many for any detector to match.
_INT_LIMIT = 10**20


def _is_word(char: str) -> bool:
    # What `\b` in Python's `re` counts as a word character, so boundaries stay where they were.
    return char.isalnum() or char == "_"


@functools.cache
def _decimal_digits() -> dict[int, int]:
    # Every character Python takes for a decimal digit (what `\d` in `re` matched), as its ASCII
    # digit; built on the first text that is not ASCII.
    digits = filter(str.isdecimal, map(chr, range(0x110000)))
    return {ord(char): ord("0") + unicodedata.decimal(char) for char in digits if not char.isascii()}


def _ascii_digits(text: str) -> str:
    """`text` with every decimal digit written as an ASCII digit, so that card numbers and SSNs
    typed in other scripts (full-width digits, say) are still found. Lengths are unchanged."""
    if text.isascii() or _OTHER_DIGIT.search(text) is None:
        return text
    return text.translate(_decimal_digits())


def _subject(text: str) -> str | bytes:
    # For ASCII text, RE2's byte offsets are our character offsets: skip the binding's
    # offset translation, which costs more per match than the match itself.
    return text.encode("ascii") if text.isascii() else text


def _pan_in_run(run: bytes, may_start: bool, may_end: bool) -> bool:
    """Whether `run` (ASCII digits joined by single spaces or dashes) holds a card number.

    A card number is a stretch of whole space-separated groups, 13 to 19 digits in all, that
    passes the Luhn check; it may not start right after a dash (`may_start` is False when the
    run itself does) nor end right before one (`may_end`). Every such stretch is checked, not
    only the first or the longest, so a short number or a CVV typed next to a card number does
    not hide it. The work is a fixed number of passes over the run, each in C: prefix sums give
    any stretch's Luhn total, and each of the seven lengths is one comparison of two arrays.
    """
    digits = run.translate(None, b" -")
    count = len(digits)
    if b" " not in run:
        return may_start and may_end and _PAN_MIN <= count <= _PAN_MAX and _luhn(digits)
    # Per digit ("d"): whether a space-separated group starts there ("s") or ends there ("e").
    shape = run.translate(_SHAPE, b"-")
    starts_here = shape.replace(b" d", b"s")
    ends_here = shape.replace(b"d ", b"e")
    # Luhn doubles every second digit counting back from the last one. Prefix sums (mod 10) with
    # the digits at even offsets doubled, and with those at odd offsets doubled: a stretch
    # [start, end) sums to the difference of the one whose doubled offsets have end's parity.
    values, doubled = digits.translate(_VALUE), digits.translate(_DOUBLED)
    even_doubled, odd_doubled = bytearray(values), bytearray(doubled)
    even_doubled[0::2], odd_doubled[0::2] = doubled[0::2], values[0::2]
    sums_even = bytes(map(mod, accumulate(even_doubled, initial=0), repeat(10)))
    sums_odd = bytes(map(mod, accumulate(odd_doubled, initial=0), repeat(10)))
    # At each offset p: the sum whose doubled offsets have p's parity, and the other one.
    own, other = bytearray(sums_even), bytearray(sums_odd)
    own[1::2], other[1::2] = sums_odd[1::2], sums_even[1::2]
    end_marks = bytes((_NO_END,)) + ends_here[:-1].translate(_END_MARK) + bytes((0 if may_end else _NO_END,))
    start_marks = bytes((0 if may_start else _NO_START,)) + starts_here[1:].translate(_START_MARK)
    start_marks += bytes((_NO_START,))
    ends = bytes(map(add, own, end_marks))
    starts_even_length = bytes(map(add, own, start_marks))
    starts_odd_length = bytes(map(add, other, start_marks))
    for length in range(_PAN_MIN, _PAN_MAX + 1):
        starts = starts_odd_length if length % 2 else starts_even_length
        if any(map(eq, starts[: count + 1 - length], ends[length:])):
            return True
    return False


def _luhn(digits: bytes) -> bool:
    values, doubled = digits.translate(_VALUE), digits.translate(_DOUBLED)
    # The last digit is not doubled, the one before it is, and so on.
    return (sum(values[-1::-2]) + sum(doubled[-2::-2])) % 10 == 0


def _has_pan(digits: str) -> bool:
    subject = digits.encode("utf-8")
    for match in _DIGIT_RUN.finditer(subject):
        start, end = match.start(), match.end()
        may_start = start == 0 or subject[start - 1] != ord("-")
        may_end = end == len(subject) or subject[end] != ord("-")
        if _pan_in_run(subject[start:end], may_start, may_end):
            return True
    return False


def _has_ssn(digits: str) -> bool:
    # A valid SSN cannot hide inside a rejected candidate: starting inside it, it would start
    # right after one of its dashes, where three digits and a dash never follow.
    for match in _SSN.finditer(_subject(digits)):
        start, end = match.start(), match.end()
        if (start > 0 and _is_word(digits[start - 1])) or (end < len(digits) and _is_word(digits[end])):
            continue
        area, group, serial = digits[start : start + 3], digits[start + 4 : start + 6], digits[start + 7 : end]
        # Never issued: area 000, 666 and 900-999, group 00, serial 0000.
        if area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000":
            return True
    return False


def _local_part_ends_at(text: str, at: int) -> bool:
    """Whether a local part of 1 to 64 characters that starts at a word boundary ends at `at`."""
    window = text[max(0, at - _LOCAL_MAX) : at]
    local = window[len(window.rstrip(_LOCAL_CHARS)) :]
    if not local:
        return False
    start = at - len(local)
    previous_is_word = start > 0 and _is_word(text[start - 1])
    # A boundary lies before one of these characters unless they, and the one before them, are
    # all word characters or all punctuation.
    kinds = set(local)
    has_word, has_punctuation = not kinds <= _LOCAL_PUNCTUATION, not kinds.isdisjoint(_LOCAL_PUNCTUATION)
    return (has_word and has_punctuation) or has_word != previous_is_word


def _domain_starts_at(text: str, at: int) -> bool:
    """Whether a domain of at most 255 characters starts at `at`: labels joined by single dots,
    the last one starting with 2+ letters that end at a word boundary."""
    limit = min(len(text), at + _DOMAIN_MAX)
    position, labels = at, 0
    while True:
        end = position
        while end < limit and text[end] in _LABEL_CHARS:
            end += 1
        if end == position:
            return False
        labels += 1
        if labels >= 2:
            letters = position
            while letters < end and text[letters] in _ASCII_LETTERS:
                letters += 1
            if letters - position >= 2 and (letters == len(text) or not _is_word(text[letters])):
                return True
        if end == limit or text[end] != ".":
            return False
        position = end + 1


def _has_email(text: str) -> bool:
    # A candidate is an "@" and domain-shaped text, which holds no "@", so one candidate never
    # hides the next; each check reads at most 64 characters back and 255 ahead.
    for match in _AT_DOMAIN.finditer(_subject(text)):
        at = match.start()
        if _local_part_ends_at(text, at) and _domain_starts_at(text, at + 1):
            return True
    return False


def _scalar_text(value: object) -> str | None:
    """A JSON number as `json.dumps` writes it; None for what can hold nothing detectable."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):
        # Writing out a huge integer would raise (sys.get_int_max_str_digits), and could not match.
        return str(value) if -_INT_LIMIT < value < _INT_LIMIT else None
    return repr(value)


def _json_texts(value: object) -> Iterator[str]:
    """Every string (object keys included) and number in a JSON value, without recursion.

    One by one rather than as `json.dumps` output: that recursed, so deep nesting raised
    RecursionError, and its escapes glued letters to values (`"SSN:\\n123-45-6789"`).
    """
    pending: list[object] = [value]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, (dict, list, tuple)):
            # JSON values are never cyclic, but a Python caller's could be: visit each once.
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, dict):
                pending.extend(item.keys())
                pending.extend(item.values())
            else:
                pending.extend(item)
        else:
            text = _scalar_text(item)
            if text is not None:
                yield text


def _texts(steps: Iterable[dict[str, Any]]) -> Iterator[str]:
    for step in steps:
        if not isinstance(step, dict):
            continue
        if step.get("type") == "user_input":
            content = step.get("content")
            for block in content if isinstance(content, list) else ():
                if isinstance(block, dict) and isinstance(block.get("text"), str):
                    yield block["text"]
        elif step.get("type") == "function_result":
            yield from _json_texts(step.get("result"))


def _scan_text(steps: Iterable[dict[str, Any]]) -> str:
    text = _SEPARATOR.join(_texts(steps))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates (`json.loads` accepts "\ud800") cannot be handed to RE2 as UTF-8.
            # "?" replaces each: like a surrogate, it is neither a word character nor a digit.
            text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def detect_classes(steps: Iterable[dict[str, Any]], catalogue: Iterable[str]) -> set[str]:
    """The data classes found in client input, limited to classes the policy declares."""
    declared = set(catalogue)
    if not declared & {"pan", "pii"}:
        return set()
    text = _scan_text(steps)
    digits = _ascii_digits(text)
    found: set[str] = set()
    if "pan" in declared and _has_pan(digits):
        found.add("pan")
    if "pii" in declared and (_has_ssn(digits) or _has_email(text)):
        found.add("pii")
    return found
