"""The simulator signs webhooks exactly as WaveSpeed documents it, checked by hand here rather
than with the simulator's own code."""

from __future__ import annotations

import base64
import hashlib
import hmac

from sandbox.wavespeed.webhooks import sign, signed_headers

SECRET = "whsec_c2ltdWxhdG9yLWRldmVsb3BtZW50LXNlY3JldA"
BODY = b'{"id":"abc","status":"completed","outputs":["http://x/y.mp4"]}'


def _by_hand(secret: str, webhook_id: str, timestamp: str, body: bytes) -> str:
    # Per the reference: key = secret without "whsec_" as plain UTF-8 (no base64 decoding),
    # message = "{webhook-id}.{webhook-timestamp}.{raw body}", hex digest, prefixed "v3,".
    key = secret[len("whsec_") :].encode("utf-8")
    message = webhook_id.encode() + b"." + timestamp.encode() + b"." + body
    return "v3," + hmac.new(key, message, hashlib.sha256).hexdigest()


def test_signature_matches_the_documented_scheme() -> None:
    assert sign(SECRET, "abc", "1758798328", BODY) == _by_hand(SECRET, "abc", "1758798328", BODY)


def test_known_vector() -> None:
    expected = hmac.new(
        b"c2ltdWxhdG9yLWRldmVsb3BtZW50LXNlY3JldA",
        b"abc.1758798328." + BODY,
        hashlib.sha256,
    ).hexdigest()
    assert sign(SECRET, "abc", "1758798328", BODY) == f"v3,{expected}"


def test_secret_is_not_base64_decoded() -> None:
    decoded_key = base64.b64decode("c2ltdWxhdG9yLWRldmVsb3BtZW50LXNlY3JldA==")
    standard = hmac.new(decoded_key, b"abc.1758798328." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, "abc", "1758798328", BODY) != f"v3,{standard}"


def test_headers_carry_id_timestamp_and_signature() -> None:
    headers = signed_headers(SECRET, "pred-1", BODY, now=1758798328.9)
    assert headers["webhook-id"] == "pred-1"
    assert headers["webhook-timestamp"] == "1758798328"
    assert headers["webhook-signature"] == _by_hand(SECRET, "pred-1", "1758798328", BODY)
    assert headers["content-type"] == "application/json"


def test_any_change_to_the_body_breaks_the_signature() -> None:
    assert sign(SECRET, "abc", "1", BODY) != sign(SECRET, "abc", "1", BODY + b" ")
