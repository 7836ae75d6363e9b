"""WaveSpeed's webhook signature scheme, computed by hand from the reference text."""

import hashlib
import hmac

import pytest

from workers.models import WaveSpeedWebhook
from workers.webhook_in import MAX_ID_LENGTH, WebhookRejected, verify

SECRET = "whsec_abc123"
BODY = b'{"id":"p-1","status":"completed"}'
NOW = 1_790_000_000


def signed(webhook_id: str = "p-1", ts: int = NOW, body: bytes = BODY) -> dict[str, str]:
    # Keyed with the secret minus "whsec_", as plain UTF-8 (not base64-decoded).
    digest = hmac.new(b"abc123", f"{webhook_id}.{ts}.".encode() + body, hashlib.sha256)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": f"v3,{digest.hexdigest()}",
    }


def test_valid_signature_answers_the_prediction_id() -> None:
    assert verify(SECRET, signed(), BODY, now=NOW + 10) == "p-1"


def test_one_of_several_signatures_may_match() -> None:
    headers = signed()
    headers["webhook-signature"] = "v3,deadbeef " + headers["webhook-signature"]
    assert verify(SECRET, headers, BODY, now=NOW) == "p-1"


@pytest.mark.parametrize(
    ("headers", "body", "now", "why"),
    [
        (signed(), BODY + b" ", NOW, "no valid signature"),
        (signed(), BODY, NOW + 301, "tolerance"),
        (signed(), BODY, NOW - 301, "tolerance"),
        ({**signed(), "webhook-id": "p-2"}, BODY, NOW, "no valid signature"),
        ({k: v for k, v in signed().items() if k != "webhook-signature"}, BODY, NOW, "missing"),
        ({**signed(), "webhook-timestamp": "soon"}, BODY, NOW, "unix seconds"),
        # Starlette decodes header bytes as Latin-1: non-ASCII arrives as str like these.
        ({**signed(), "webhook-signature": "v3,\u00e9\u00e9"}, BODY, NOW, "ASCII"),
        ({**signed(), "webhook-signature": "v3,\u00c3\u00a9" * 32}, BODY, NOW, "ASCII"),
        ({**signed(), "webhook-id": "p-\u00e9"}, BODY, NOW, "ASCII"),
        ({**signed(), "webhook-timestamp": "\u00b9\u00b2"}, BODY, NOW, "ASCII"),
        (signed(webhook_id="p" * 65), BODY, NOW, "longer than 64"),
        (
            {**signed(), "webhook-signature": signed()["webhook-signature"].replace("v3", "v1")},
            BODY,
            NOW,
            "no valid signature",
        ),
    ],
)
def test_bad_webhooks_are_rejected(
    headers: dict[str, str], body: bytes, now: int, why: str
) -> None:
    with pytest.raises(WebhookRejected, match=why):
        verify(SECRET, headers, body, now=now)


def test_other_secret_is_rejected() -> None:
    with pytest.raises(WebhookRejected):
        verify("whsec_other", signed(), BODY, now=NOW)


@pytest.mark.parametrize("secret", ["", "whsec_"])
def test_without_a_configured_secret_everything_is_rejected(secret: str) -> None:
    digest = hmac.new(b"", f"p-1.{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    headers = {
        "webhook-id": "p-1",
        "webhook-timestamp": str(NOW),
        "webhook-signature": f"v3,{digest}",
    }
    with pytest.raises(WebhookRejected, match="no WaveSpeed webhook secret"):
        verify(secret, headers, BODY, now=NOW)


def test_a_signed_id_at_the_dedupe_columns_length_is_taken() -> None:
    assert WaveSpeedWebhook.__table__.c.id.type.length == MAX_ID_LENGTH
    longest = "p" * MAX_ID_LENGTH
    assert verify(SECRET, signed(webhook_id=longest), BODY, now=NOW) == longest
