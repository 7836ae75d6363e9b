"""The hostile-input corpus: named requests a naive or hostile caller sends, each with the
outcome issue 10 wants from the API (decompression bombs, non-finite numbers, oversized bodies,
metadata and headers, bad or oversized WaveSpeed webhooks).

    for case in cases(upload_id=..., webhook_secret=...):
        response = client.request(**request_kwargs(case, api_key))
        assert response.status_code == case.expect_status, case.name

Bodies are built on demand and large ones streamed in chunks, so a 50 MB case never sits in
memory. `python -m bench.hostile` lists the corpus.
"""

from __future__ import annotations

import functools
import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sandbox.wavespeed.webhooks import signed_headers

CHUNK = 64 * 1024
MB = 1024 * 1024
GENERATIONS = "/v1/generations"
UPLOADS = "/v1/uploads"
WEBHOOK = "/v1/wavespeed/webhook"
BOUNDARY = "hostile-corpus-boundary"


@dataclass(frozen=True)
class Body:
    """`prefix`, then `filler` `repeat` times, then `suffix`: its length is known up front and
    its bytes are only made while they are sent."""

    prefix: bytes = b""
    filler: bytes = b""
    repeat: int = 0
    suffix: bytes = b""

    @property
    def length(self) -> int:
        return len(self.prefix) + len(self.filler) * self.repeat + len(self.suffix)

    def chunks(self) -> Iterator[bytes]:
        """The body in chunks of about `CHUNK` bytes."""
        yield self.prefix
        per_chunk = max(1, CHUNK // max(1, len(self.filler)))
        left = self.repeat
        while left > 0:
            count = min(per_chunk, left)
            yield self.filler * count
            left -= count
        yield self.suffix

    def whole(self) -> bytes:
        """All of it at once; only for bodies small enough to hold."""
        if self.length > 4 * MB:
            raise ValueError(f"{self.length} bytes: stream this body with chunks()")
        return b"".join(self.chunks())


@dataclass(frozen=True)
class Case:
    """One hostile request and what the API should answer it."""

    name: str
    path: str
    body: Body
    expect_status: int
    why: str
    headers: dict[str, bytes] = field(default_factory=dict)
    # The problem+json `code` wanted; None where issue 10 names no code.
    expect_code: str | None = None
    auth: bool = True  # send the producer's API key (WaveSpeed's webhook carries none)
    declare_length: bool = True  # False: chunked, so only a limit while streaming catches it
    # For a batch: the status each item should get, in order.
    expect_items: tuple[int, ...] = ()
    # The answer's X-Request-Id must not be the one sent (it is ours to bound, not echo).
    request_id_replaced: bool = False
    method: str = "POST"


def request_kwargs(case: Case, api_key: str) -> dict[str, Any]:
    """Arguments for `httpx.Client.request` sending `case` as built."""
    headers = dict(case.headers)
    if case.auth:
        headers["authorization"] = f"Bearer {api_key}".encode()
    if case.declare_length:
        headers["content-length"] = str(case.body.length).encode()
    return {"method": case.method, "url": case.path, "headers": headers,
            "content": case.body.chunks()}  # fmt: skip


def cases(*, upload_id: str, webhook_secret: str, now: float | None = None) -> list[Case]:
    """The whole corpus; `upload_id` is a real upload of the tenant (for requests that must
    pass everything else), `webhook_secret` WaveSpeed's, to sign webhooks that must verify."""
    at = time.time() if now is None else now
    return [
        *image_cases(),
        *number_cases(upload_id),
        *size_cases(upload_id),
        *header_cases(upload_id),
        *webhook_cases(webhook_secret, at),
    ]


# -- images -------------------------------------------------------------------------------


def png(width: int, height: int, idat: bytes) -> bytes:
    """A PNG: signature, a valid 8-bit RGB IHDR for width x height, one IDAT, IEND."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def header_bomb_png() -> bytes:
    """A few KB claiming 20000x20000 (1.2 GB of RGB once decoded); the IDAT holds 50 rows, so
    only a decoder that trusts the header before reading pixels allocates the lot."""
    row = b"\x00" * (1 + 3 * 20000)  # filter byte, then the pixels
    return png(20000, 20000, zlib.compress(row * 50, 9))


@functools.cache
def solid_9000_png() -> bytes:
    """A complete, valid 9000x9000 black RGB PNG of about 236 KB (243 MB decoded); compressed
    row by row so it is never held raw."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * 9000)
    idat = b"".join(compressor.compress(row) for _ in range(9000)) + compressor.flush()
    return png(9000, 9000, idat)


def multipart(filename: str, content_type: str, data: Body) -> Body:
    """`data` as the multipart `file` field of POST /v1/uploads."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"'
        f"\r\nContent-Type: {content_type}\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    return Body(head + data.prefix, data.filler, data.repeat, data.suffix + tail)


MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}".encode()}


def image_cases() -> list[Case]:
    bomb, big = Body(header_bomb_png()), Body(solid_9000_png())
    return [
        Case("upload_png_header_bomb", UPLOADS, multipart("bomb.png", "image/png", bomb), 422,
             "a few KB whose IHDR claims 20000x20000", headers=MULTIPART,
             expect_code="image_too_large"),
        Case("upload_png_9000x9000", UPLOADS, multipart("big.png", "image/png", big), 422,
             "a valid 236 KB PNG of 81 megapixels", headers=MULTIPART,
             expect_code="image_too_large"),
    ]  # fmt: skip


# -- non-finite numbers, metadata ------------------------------------------------------------


JSON = {"content-type": b"application/json"}


def _create(upload_id: str, extra: str = "") -> str:
    """A valid create body as JSON text, with `extra` (raw members) appended."""
    text = json.dumps({"upload_id": upload_id, "prompt": "slow push-in", "duration": 5})
    return text[:-1] + (f", {extra}" if extra else "") + "}"


def _raw(text: str) -> Body:
    return Body(text.encode())


def number_cases(upload_id: str) -> list[Case]:
    # Python's json would write NaN too; the members are spelled out so the bytes are certain.
    nan = _create(upload_id, '"metadata": {"score": NaN}')
    batch = f'{{"items": [{_create(upload_id)}, {nan}]}}'
    keys = json.dumps({f"k{i:05d}": i for i in range(10_000)})
    return [
        Case("create_metadata_nan", GENERATIONS, _raw(nan), 422,
             "NaN is not JSON; the schema refuses non-finite numbers", headers=JSON,
             expect_code="validation_error"),
        Case("create_guidance_infinity", GENERATIONS,
             _raw(_create(upload_id, '"guidance_scale": Infinity')), 422,
             "Infinity as guidance_scale", headers=JSON, expect_code="validation_error"),
        Case("batch_item_metadata_nan", f"{GENERATIONS}/batch", _raw(batch), 200,
             "one bad item gets its own outcome; the other is accepted", headers=JSON,
             expect_items=(201, 422)),
        Case("create_metadata_10000_keys", GENERATIONS,
             _raw(_create(upload_id, f'"metadata": {keys}')), 422,
             "metadata is bounded in keys (the body itself is ~150 KB)", headers=JSON,
             expect_code="validation_error"),
    ]  # fmt: skip


# -- body sizes ---------------------------------------------------------------------------


def _padded(text: str, total: int) -> Body:
    """Valid JSON `text` padded with whitespace to `total` bytes: only its size is wrong."""
    data = text.encode()
    return Body(data[:-1], b" ", total - len(data), data[-1:])


def size_cases(upload_id: str) -> list[Case]:
    valid = _create(upload_id)
    fifty = 50 * MB
    junk = Body(b"", b"\x00" * 1024, fifty // 1024)
    return [
        Case("create_json_2mb", GENERATIONS, _padded(valid, 2 * MB), 413,
             "JSON bodies are limited to about 1 MB", headers=JSON),
        Case("create_json_50mb", GENERATIONS, _padded(valid, fifty), 413,
             "refused from Content-Length, before reading", headers=JSON),
        Case("create_json_50mb_chunked", GENERATIONS, _padded(valid, fifty), 413,
             "no Content-Length: refused while streaming", headers=JSON, declare_length=False),
        Case("upload_50mb", UPLOADS, multipart("huge.png", "image/png", junk), 413,
             "uploads are limited to the image limit plus overhead", headers=MULTIPART),
    ]  # fmt: skip


# -- headers ------------------------------------------------------------------------------


def header_cases(upload_id: str) -> list[Case]:
    body = _raw(_create(upload_id))
    long_id = {**JSON, "x-request-id": b"r" * 1024}
    foreign_id = {**JSON, "x-request-id": "req-\u00e9\u2713-\u65e5\u672c".encode()}
    return [
        Case("create_request_id_too_long", GENERATIONS, body, 201,
             "a 1 KB X-Request-Id is not bound into every log line", headers=long_id,
             request_id_replaced=True),
        Case("create_request_id_non_ascii", GENERATIONS, body, 201,
             "a UTF-8 X-Request-Id is replaced, not a 500", headers=foreign_id,
             request_id_replaced=True),
    ]  # fmt: skip


# -- WaveSpeed webhooks -----------------------------------------------------------------------


def _prediction(prediction_id: str) -> dict[str, Any]:
    """A completed prediction as WaveSpeed pushes it, for a prediction no job has."""
    return {"id": prediction_id, "model": "kwaivgi/kling-v2.1-i2v-pro", "status": "completed",
            "outputs": ["https://cdn.example/none.mp4"], "error": "", "input": {}}  # fmt: skip


def _signed(secret: str, webhook_id: str, body: bytes, at: float) -> dict[str, bytes]:
    return {k: v.encode() for k, v in signed_headers(secret, webhook_id, body, at).items()}


def webhook_cases(secret: str, at: float) -> list[Case]:
    prediction_id = "0" * 31 + "1"
    body = json.dumps(_prediction(prediction_id)).encode()
    genuine = _signed(secret, prediction_id, body, at)
    foreign = {**genuine, "webhook-signature": "v3,\u00e9\u00e9\u2713".encode()}
    forged = {**genuine, "webhook-signature": b"v3," + b"0" * 64}
    long_id = "p" * 4096
    long_body = json.dumps(_prediction(long_id)).encode()
    big = _padded(body.decode(), MB)
    return [
        Case("webhook_signature_non_ascii", WEBHOOK, Body(body), 401,
             "a UTF-8 signature header must not crash the comparison", headers=foreign,
             auth=False),
        Case("webhook_signature_forged", WEBHOOK, Body(body), 401,
             "a well-formed signature made without the secret", headers=forged, auth=False),
        Case("webhook_id_too_long", WEBHOOK, Body(long_body), 401,
             "a 4 KB webhook-id, correctly signed, is refused before it is stored",
             headers=_signed(secret, long_id, long_body, at), auth=False),
        Case("webhook_body_1mb", WEBHOOK, big, 413,
             "WaveSpeed's webhook is limited to about 256 KB; this one is signed",
             headers=_signed(secret, prediction_id, big.whole(), at), auth=False),
    ]  # fmt: skip


def main() -> None:
    # Placeholders: the listing shows sizes and expectations, nothing is sent.
    for case in cases(upload_id="UPLOADID", webhook_secret="whsec_example"):  # noqa: S106
        print(f"{case.name:30} {case.path:26} {case.body.length:>10} B -> {case.expect_status}"
              f"{' ' + case.expect_code if case.expect_code else ''}  {case.why}")  # fmt: skip


if __name__ == "__main__":
    main()
