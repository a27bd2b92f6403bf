"""What notify-router decides about a notification, without touching the host.

Everything here is plain Python with no import of the generated bindings, so it runs (and is
unit-tested) under an ordinary CPython as well as inside the component.
"""

import json
import math
import re

PREFIX = "notifications:"
DEAD_LETTERS = "notifications:dead"
DEAD_KIND = "dead"

# The fields that must be non-empty strings in a notification of each kind, checked in this
# order. The keys are also the names of the outputs the plugin calls.
REQUIRED_FIELDS = {
    "email": ("to", "subject"),
    "sms": ("phone", "message"),
    "push": ("device_id",),
}

# The deepest nesting of arrays and objects accepted. RFC 8259 lets a parser limit nesting;
# the Rust build (serde_json) stops at 128 levels, so 127 is the deepest it accepts and every
# build of the router must draw the same line. Checking before parsing also keeps a payload of
# thousands of brackets from running the parser's recursion into the Wasm stack.
MAX_DEPTH = 127


def _nesting_pattern(max_depth: int) -> "re.Pattern[str]":
    """A regex matching exactly the texts whose brackets, outside strings, balance and nest at
    most `max_depth` deep.

    Python's re has no recursion, so the pattern spells out each level: level k is filler
    with bracketed level k-1 groups in it. Every quantifier is possessive, so a match never
    backtracks and takes time linear in the text, at the regex engine's C speed.
    """
    # Anything but a bracket: runs of other characters, and whole strings (the brackets in
    # a string are text, not structure).
    filler = r'(?:[^\[\]{}"]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+'
    level = filler
    for _ in range(max_depth):
        level = filler + r"(?:[\[{]" + level + r"[\]}]" + filler + r")*+"
    return re.compile(level, re.DOTALL)


_NESTING = _nesting_pattern(MAX_DEPTH)

# A \u escape in the surrogate range (either half). Matching text does not prove a lone
# surrogate (pairs match too, and so does an escaped backslash before "ud800"), it only says
# that the parsed value is worth checking.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class Deliver:
    """Pass the payload, unchanged, to the output named like the kind."""


class Ignore:
    """One of our own dead letters, seen again through `notifications:*`."""


class Reject:
    """Park the message on the dead-letter channel for `reason`."""

    def __init__(self, reason: str):
        self.reason = reason

    def __eq__(self, other):
        return isinstance(other, Reject) and other.reason == self.reason

    def __repr__(self):
        return f"Reject({self.reason!r})"


DELIVER = Deliver()
IGNORE = Ignore()


def route(kind: str, payload: bytes):
    """Decides from the kind and the payload alone: DELIVER, IGNORE or a Reject."""
    if kind == DEAD_KIND:
        return IGNORE
    fields = REQUIRED_FIELDS.get(kind)
    if fields is None:
        return Reject(f'unknown notification kind "{kind}"')
    reason = check_payload(payload, fields)
    return DELIVER if reason is None else Reject(reason)


def check_payload(payload: bytes, fields) -> "str | None":
    """The reason `payload` is not a JSON object with all `fields` non-empty strings, or None.

    Reasons carry no parser details, so every language's build gives the same dead letters.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return "payload is not valid UTF-8"
    value = parse_json(text)
    if value is _INVALID:
        return "payload is not valid JSON"
    if not isinstance(value, dict):
        return "payload must be a JSON object"
    for field in fields:
        if field not in value:
            return f'missing field "{field}"'
        found = value[field]
        if not isinstance(found, str) or not found:
            return f'field "{field}" must be a non-empty string'
    return None


_INVALID = object()


def parse_json(text: str):
    """Parses `text` as exactly one RFC 8259 JSON value, or returns _INVALID.

    Python's json module is more lenient than the RFC, and than the Rust build, in a few ways
    that the hooks and checks below take away: it accepts NaN, Infinity and -Infinity; it
    turns numbers too large for a double into inf (or huge ints) instead of refusing them; it
    keeps an unpaired surrogate escape such as "\\ud800" as a lone code point; and its nesting
    limit is the interpreter's recursion limit.
    """
    if _too_deep(text):
        return _INVALID
    try:
        value = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_finite_int,
        )
    except (ValueError, RecursionError):
        # json.JSONDecodeError is a ValueError, and so are the refusals of the hooks and the
        # interpreter's limit on the digits of an int.
        return _INVALID
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        return _INVALID
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite_float(literal: str) -> float:
    number = float(literal)
    if math.isinf(number):
        raise ValueError("number out of range")
    return number


def _finite_int(literal: str) -> int:
    # An int too large for a double (309 digits or more, past 1.8e308) is out of range for the
    # Rust build, which reads large integers as doubles. Shorter literals cannot overflow.
    if len(literal.lstrip("-")) >= 309 and math.isinf(float(literal)):
        raise ValueError("number out of range")
    return int(literal)


def _too_deep(text: str) -> bool:
    # Counting brackets at C speed first: fewer openers than the limit cannot nest too deep,
    # which is every ordinary notification.
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    # No match means too deep, or brackets or strings that do not pair up, which is not JSON
    # either: the reason is the same. A bracket closed by the wrong kind passes here and is
    # the parser's to refuse.
    return _NESTING.fullmatch(text) is None


def _has_lone_surrogate(value) -> bool:
    # Valid UTF-8 cannot encode a surrogate and the parser joins escaped pairs into one code
    # point, so any surrogate left in a parsed string came from an unpaired escape.
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(
            _has_lone_surrogate(key) or _has_lone_surrogate(item) for key, item in value.items()
        )
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False


def dead_letter(channel: str, reason: str, payload: bytes) -> bytes:
    """The dead letter for a message: its channel, the reason, and the payload as text."""
    letter = {
        "channel": channel,
        "payload": payload.decode("utf-8", "replace"),
        "reason": reason,
    }
    # ensure_ascii=False keeps non-ASCII text as UTF-8, as the Rust build writes it; both are
    # valid JSON. No surrogate can reach the encoder: the channel is a WIT string and the
    # lossy decode produces none.
    return json.dumps(letter, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def status_failure(status: int):
    """For a gateway reply's status: None when delivered, else (transient, text)."""
    if status == 0 or 200 <= status <= 299:
        return None
    transient = status in (408, 429) or 500 <= status <= 599
    return transient, f"gateway answered HTTP status {status}"
