"""Content detectors: find data classes a turn carries that the client did not declare, in its input
and in the model's answer on its way into storage.

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
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, repeat
from operator import add, eq, mod
from typing import Any, Protocol

import re2  # type: ignore[import-untyped]

__all__ = [
    "ALWAYS_REFUSED",
    "BUILTINS",
    "Detector",
    "DetectorSet",
    "Findings",
    "LinearPattern",
    "PatternRefused",
    "compile_linear",
    "default_detectors",
    "detect_classes",
    "turn_text",
]


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


def _pan_runs(digits: str) -> Iterator[tuple[int, int]]:
    """The (start, end) of each run of digits that holds a card number, in order. Offsets are in
    UTF-8 bytes of `digits`, which are its character offsets when it is ASCII."""
    subject = digits.encode("utf-8")
    for match in _DIGIT_RUN.finditer(subject):
        start, end = match.start(), match.end()
        may_start = start == 0 or subject[start - 1] != ord("-")
        may_end = end == len(subject) or subject[end] != ord("-")
        if _pan_in_run(subject[start:end], may_start, may_end):
            yield start, end


def _has_pan(digits: str) -> bool:
    return next(_pan_runs(digits), None) is not None


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
            result = step.get("result")
            if isinstance(result, list):
                # Inline media's base64 is not text: scanned, it would find card numbers and
                # IBANs in random letters. Media blocks are left out here as in user input.
                result = [item for item in result if not _is_media(item)]
            yield from _json_texts(result)
        elif step.get("type") == "model_output":
            # The model's answer, on its way into storage: what it echoes counts too.
            content = step.get("content")
            for block in content if isinstance(content, list) else ():
                if isinstance(block, dict) and isinstance(block.get("text"), str):
                    yield block["text"]
        elif step.get("type") == "function_call":
            yield from _json_texts(step.get("arguments"))


def _is_media(item: object) -> bool:
    return isinstance(item, dict) and item.get("type") in {"image", "audio", "video", "document"}


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
    return set(default_detectors(catalogue).scan(steps).classes)


# --- Detectors under policy ---------------------------------------------------------------------
#
# The policy names the detectors a deployment runs and the data class each one raises: the
# built-ins below, and patterns of its own (a hospital's record number format, say). Without a
# `detectors` section the policy gets today's set (`default_detectors`).

# A card security code (CVV2, CVC2, CID...) written with its label: the label, up to 12
# characters that are neither digits nor line breaks, and 3 or 4 digits not followed by another.
_SECURITY_CODE = compile_linear(
    r"(?i)\b(?:cvv2?|cvc2?|cid|csc|cav2|security code|verification code|card code)\b[^0-9\n]{0,12}[0-9]{3,4}"
)
_ASCII_DIGIT_BYTES = frozenset(b"0123456789")
# How far (in characters) a labelled code may be from a card number to count as written next to it.
_NEXT_TO = 64
# IBANs (ISO 13616): 15 to 34 characters, a country code, two check digits, then the account in
# letters and digits; written compact or in groups of four. Case is ignored and the candidate's
# boundaries and check digits are checked on it.
_IBAN_COMPACT = compile_linear(r"(?i)\b[a-z]{2}[0-9]{2}[a-z0-9]{11,30}\b")
_IBAN_GROUPED = compile_linear(r"(?i)\b[a-z]{2}[0-9]{2}(?: [a-z0-9]{4}){2,7}(?: [a-z0-9]{1,4})?")
_IBAN_MIN, _IBAN_MAX = 15, 34
# Telephone numbers: international (E.164, "+", 8 to 15 digits, single spaces, dots or dashes
# between them) and North American (area code and exchange starting 2-9, 3-3-4 digits).
_PHONE_INTERNATIONAL = compile_linear(r"\+[1-9](?:[ .-]?[0-9]){7,14}")
_PHONE_NANP = compile_linear(r"(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[ .-])[2-9][0-9]{2}[ .-][0-9]{4}")


def _is_boundary_before(text: str, start: int) -> bool:
    # Not inside a word or a longer number (a digit group typed with separators).
    if start == 0:
        return True
    previous = text[start - 1]
    if _is_word(previous):
        return False
    return not (previous in "-." and start > 1 and text[start - 2].isdigit())


def _is_boundary_after(text: str, end: int) -> bool:
    if end == len(text):
        return True
    following = text[end]
    if _is_word(following):
        return False
    return not (following in "-." and end + 1 < len(text) and text[end + 1].isdigit())


def _has_security_code_next_to_pan(digits: str) -> bool:
    """A labelled card security code within 64 characters of a card number.

    PCI DSS forbids storing it after authorization, so a turn carrying one is refused outright.
    Card numbers are looked for only when a labelled code is present, and each code costs one
    binary search among their positions.
    """
    # Byte offsets throughout, as `_pan_runs` gives them (character offsets for ASCII text).
    subject = digits.encode("utf-8")
    codes = [
        (m.start(), m.end())
        for m in _SECURITY_CODE.finditer(subject)
        if m.end() == len(subject) or subject[m.end()] not in _ASCII_DIGIT_BYTES
    ]
    if not codes:
        return False
    runs = list(_pan_runs(digits))
    starts, ends = [start for start, _ in runs], [end for _, end in runs]
    for start, end in codes:
        # Runs do not overlap, so the last one starting before the window's end ends last.
        index = bisect_right(starts, end + _NEXT_TO)
        if index and ends[index - 1] >= start - _NEXT_TO:
            return True
    return False


def _iban_valid(candidate: str) -> bool:
    compact = candidate.replace(" ", "").upper()
    if not _IBAN_MIN <= len(compact) <= _IBAN_MAX:
        return False
    rotated = compact[4:] + compact[:4]
    # Letters count as 10 (A) to 35 (Z); the whole number is 1 modulo 97.
    number = "".join(str(int(char, 36)) for char in rotated)
    return int(number) % 97 == 1


def _has_iban(text: str) -> bool:
    for match in _IBAN_COMPACT.finditer(_subject(text)):
        if _iban_valid(text[match.start() : match.end()]):
            return True
    for match in _IBAN_GROUPED.finditer(_subject(text)):
        # The grouped form may have taken a word that follows for a last group: try each whole
        # group from the longest down (at most eight), each ending at a word boundary.
        candidate = text[match.start() : match.end()]
        while len(candidate) > 4:
            end = match.start() + len(candidate)
            if (end == len(text) or not _is_word(text[end])) and _iban_valid(candidate):
                return True
            candidate = candidate.rsplit(" ", 1)[0]
    return False


def _has_phone(digits: str) -> bool:
    subject = _subject(digits)
    for match in _PHONE_INTERNATIONAL.finditer(subject):
        start, end = match.start(), match.end()
        if (start == 0 or not _is_word(digits[start - 1])) and _is_boundary_after(digits, end):
            return True
    for match in _PHONE_NANP.finditer(subject):
        start, end = match.start(), match.end()
        if _is_boundary_before(digits, start) and _is_boundary_after(digits, end):
            return True
    return False


@dataclass(frozen=True)
class _Scan:
    # The turn's text, and the same with every decimal digit an ASCII one.
    text: str
    digits: str


# Built-in detectors by name: what each looks for, given the scanned text.
BUILTINS: dict[str, Callable[[_Scan], bool]] = {
    "pan": lambda scan: _has_pan(scan.digits),
    "card_security_code": lambda scan: _has_security_code_next_to_pan(scan.digits),
    "us_ssn": lambda scan: _has_ssn(scan.digits),
    "iban": lambda scan: _has_iban(scan.text),
    "email": lambda scan: _has_email(scan.text),
    "phone": lambda scan: _has_phone(scan.digits),
}
# A turn carrying what this built-in finds is always refused, whatever the route says.
ALWAYS_REFUSED = frozenset({"card_security_code"})


@dataclass(frozen=True)
class Detector:
    """One detector of the policy: a built-in (by name) or a deployment's own RE2 pattern, and the
    data class a hit raises."""

    name: str
    data_class: str
    builtin: str | None = None
    pattern: LinearPattern | None = field(default=None, repr=False)
    # The pattern as the policy writes it (operator's configuration, shown to ops).
    pattern_text: str | None = None

    def __post_init__(self) -> None:
        if (self.builtin is None) == (self.pattern is None):
            raise ValueError(f"detector {self.name}: set exactly one of builtin or pattern")
        if self.builtin is not None and self.builtin not in BUILTINS:
            raise ValueError(f"detector {self.name}: unknown built-in {self.builtin!r}")

    @property
    def always_refused(self) -> bool:
        return self.builtin in ALWAYS_REFUSED

    def _hit(self, scan: _Scan) -> bool:
        if self.pattern is not None:
            return self.pattern.search(_subject(scan.text)) is not None
        return BUILTINS[str(self.builtin)](scan)

    def matches(self, text: str) -> bool:
        """Whether this detector finds something in `text` (the policy's startup self-test)."""
        return self._hit(_scan_of(turn_text(text)))


@dataclass(frozen=True)
class Findings:
    """What the detectors found in a turn: the classes, the detectors that hit (policy names), and
    whether one of them always refuses the turn. Never the matched text."""

    classes: frozenset[str] = frozenset()
    detectors: frozenset[str] = frozenset()
    refused_by: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.detectors)


@dataclass(frozen=True)
class DetectorSet:
    detectors: tuple[Detector, ...] = ()

    def scan(self, steps: Iterable[dict[str, Any]]) -> Findings:
        """Run every detector over `steps`: a client's input, or the model's answer (its text and
        its function calls' arguments)."""
        if not self.detectors:
            return Findings()
        scan = _scan_of(_scan_text(steps))
        hits = [detector for detector in self.detectors if detector._hit(scan)]
        return Findings(
            classes=frozenset(d.data_class for d in hits),
            detectors=frozenset(d.name for d in hits),
            refused_by=frozenset(d.name for d in hits if d.always_refused),
        )


def turn_text(text: str) -> list[dict[str, Any]]:
    """`text` as one user turn, the way detectors see client input."""
    return [{"type": "user_input", "content": [{"type": "text", "text": text}]}]


def _scan_of(text: str | Sequence[dict[str, Any]]) -> _Scan:
    joined = text if isinstance(text, str) else _scan_text(text)
    return _Scan(joined, _ascii_digits(joined))


def default_detectors(catalogue: Iterable[str]) -> DetectorSet:
    """The detectors of a policy without a `detectors` section: card numbers (`pan`), SSNs and
    e-mail addresses (`pii`), each only when the catalogue declares its class."""
    declared = set(catalogue)
    chosen = [
        Detector(name, data_class, builtin=builtin)
        for name, builtin, data_class in (("pan", "pan", "pan"), ("us_ssn", "us_ssn", "pii"), ("email", "email", "pii"))
        if data_class in declared
    ]
    return DetectorSet(tuple(chosen))
