"""Unit tests of the pure rules, under any CPython 3.11 or later:

    python3 -m unittest discover -s plugins/notify-router-py/tests
"""

import json
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import notification_rules as rules  # noqa: E402
from notification_rules import DELIVER, IGNORE, Reject, route  # noqa: E402


def reason(kind: str, payload: bytes) -> str:
    decision = route(kind, payload)
    assert isinstance(decision, Reject), f"expected a rejection, got {decision!r}"
    return decision.reason


def nested(depth: int) -> bytes:
    """A push notification whose deepest container is `depth` levels down (the object is 1)."""
    inner = depth - 1
    return b'{"device_id":"d","x":' + b"[" * inner + b"]" * inner + b"}"


class Route(unittest.TestCase):
    def test_valid_notifications_are_delivered(self):
        for kind, payload in [
            ("email", b'{"to":"a@example.com","subject":"Hi","body":"hello"}'),
            ("sms", b'{"phone":"+15550100","message":"hi"}'),
            ("push", b'{"device_id":"d1","extra":[1,2]}'),
            ("push", b'  {"device_id" : "\\"q\\"" }\r\n\t'),
            ("push", b'{"device_id":"\\ud83d\\ude00"}'),
            ("push", b'{"device_id":"\\\\ud800"}'),
            ("push", b'{"device_id":"d","n":-0,"e":1E+2,"f":1e308,"g":1e-400}'),
        ]:
            self.assertIs(route(kind, payload), DELIVER, payload)

    def test_dead_letters_are_ignored_whatever_they_hold(self):
        self.assertIs(route("dead", b"\xff not json"), IGNORE)

    def test_unknown_kinds_are_named(self):
        self.assertEqual(reason("fax", b"{}"), 'unknown notification kind "fax"')
        self.assertEqual(reason("", b"{}"), 'unknown notification kind ""')
        self.assertEqual(reason("Email", b"{}"), 'unknown notification kind "Email"')

    def test_reasons_name_the_problem(self):
        self.assertEqual(reason("email", b"{"), "payload is not valid JSON")
        self.assertEqual(reason("email", b"[1]"), "payload must be a JSON object")
        self.assertEqual(reason("email", b'"x"'), "payload must be a JSON object")
        self.assertEqual(reason("email", b'{"to":"a"}'), 'missing field "subject"')
        self.assertEqual(
            reason("email", b'{"to":"","subject":"s"}'), 'field "to" must be a non-empty string'
        )
        self.assertEqual(
            reason("sms", b'{"phone":5550100,"message":"m"}'),
            'field "phone" must be a non-empty string',
        )
        self.assertEqual(
            reason("push", b'{"device_id":null}'), 'field "device_id" must be a non-empty string'
        )
        self.assertEqual(reason("push", b'{"device_id":"\xff"}'), "payload is not valid UTF-8")
        # The last of duplicate keys counts, as in the Rust build.
        self.assertEqual(
            reason("push", b'{"device_id":"x","device_id":""}'),
            'field "device_id" must be a non-empty string',
        )

    def test_json_is_strict(self):
        for payload in [
            b"",
            b" ",
            b'{"device_id":"d"} x',
            b'{"device_id":"d"}{}',
            b'{"device_id":"d",}',
            b"{'device_id':'d'}",
            b'{"device_id":"d","n":01}',
            b'{"device_id":"d","n":NaN}',
            b'{"device_id":"d","n":Infinity}',
            b'{"device_id":"d","n":-Infinity}',
            b'{"device_id":"d","n":1e309}',
            b'{"device_id":"d","n":' + b"1" + b"0" * 309 + b"}",
            b'{"device_id":"d","n":' + b"1" + b"0" * 5000 + b"}",
            b'{"device_id":"d","n":\xd9\xa1}',
            b'{"device_id":"tab\there"}',
            b'{"device_id":"\\ud800"}',
            b'{"device_id":"d","\\udc00":1}',
            b'{"device_id":"d","x":["\\ude00\\ud83d"]}',
            b'\xef\xbb\xbf{"device_id":"d"}',
            b'{"device_id":"d"}\x0c',
            b'{"device_id":"d"}\xc2\xa0',
        ]:
            self.assertEqual(reason("push", payload), "payload is not valid JSON", payload)

    def test_large_numbers_that_a_double_holds_are_valid(self):
        self.assertIs(route("push", b'{"device_id":"d","n":' + b"1" + b"0" * 308 + b"}"), DELIVER)
        self.assertIs(
            route("push", b'{"device_id":"d","n":' + b"1" + b"0" * 5000 + b"e-5000}"), DELIVER
        )

    def test_nesting_stops_at_127_levels(self):
        self.assertIs(route("push", nested(127)), DELIVER)
        self.assertEqual(reason("push", nested(128)), "payload is not valid JSON")
        self.assertEqual(reason("push", nested(100_000)), "payload is not valid JSON")
        many = b'{"device_id":"d","x":[' + b",".join([b"[[]]"] * 1000) + b"]}"
        self.assertIs(route("push", many), DELIVER)
        # Brackets in strings are not structure, escaped quotes included.
        in_strings = b'{"device_id":"d","s":"\\"' + b"[" * 300 + b'"}'
        self.assertIs(route("push", in_strings), DELIVER)


class DeadLetter(unittest.TestCase):
    def test_keeps_the_original_as_lossy_text(self):
        letter = json.loads(rules.dead_letter("notifications:fax", "why", b"a\xffb\xe2\x82"))
        self.assertEqual(
            letter,
            {"channel": "notifications:fax", "reason": "why", "payload": "a\ufffdb\ufffd"},
        )

    def test_escapes_what_json_must_escape(self):
        raw = rules.dead_letter('x"\\\x01', "r", b'\x00\x1f"\\\x7f\xf0\x9f\x98\x80')
        self.assertEqual(
            json.loads(raw),
            {"channel": 'x"\\\x01', "reason": "r", "payload": '\x00\x1f"\\\x7f\U0001f600'},
        )


class Status(unittest.TestCase):
    def test_statuses(self):
        for status in (0, 200, 204, 299):
            self.assertIsNone(rules.status_failure(status))
        for status in (408, 429, 500, 503, 599):
            self.assertEqual(
                rules.status_failure(status), (True, f"gateway answered HTTP status {status}")
            )
        for status in (1, 199, 300, 400, 404, 600):
            self.assertEqual(
                rules.status_failure(status), (False, f"gateway answered HTTP status {status}")
            )


if __name__ == "__main__":
    unittest.main()
