"""The hostile-input corpus builds what it claims: sizes, headers, image headers, signatures."""

from __future__ import annotations

import asyncio
import io
import json
import math
import struct
import zlib
from collections.abc import AsyncIterator

import pytest
from PIL import Image
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from bench.hostile import (
    BOUNDARY,
    Case,
    cases,
    header_bomb_png,
    request_kwargs,
    solid_9000_png,
)
from workers.webhook_in import WebhookRejected, sign, verify

SECRET = "whsec_corpus-test-secret"
NOW = 1_800_000_000.0
MB = 1024 * 1024


@pytest.fixture(scope="module")
def corpus() -> dict[str, Case]:
    built = cases(upload_id="Up1oad", webhook_secret=SECRET, now=NOW)
    named = {case.name: case for case in built}
    assert len(named) == len(built)
    return named


def chunks_of(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, each CRC checked."""
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    found, at = [], 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind, data = png[at + 4 : at + 8], png[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", png[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + data), kind
        found.append((kind, data))
        at += 12 + length
    return found


def inflated_size(idat: bytes) -> int:
    """How many bytes the IDAT stream inflates to, a bounded piece at a time."""
    stream, total, pending = zlib.decompressobj(), 0, idat
    while pending:
        total += len(stream.decompress(pending, MB))
        pending = stream.unconsumed_tail
    return total + len(stream.flush())


def test_every_case_expects_a_status_and_says_why(corpus: dict[str, Case]) -> None:
    for case in corpus.values():
        assert case.expect_status in (200, 201, 401, 413, 422), case.name
        assert case.why and case.path.startswith("/v1/"), case.name


def test_the_header_bomb_is_a_few_kb_claiming_20000_squared() -> None:
    png = header_bomb_png()
    kinds = chunks_of(png)
    assert [kind for kind, _ in kinds] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBB", kinds[0][1][:10]) == (20000, 20000, 8, 2)
    assert len(png) < 8 * 1024
    assert inflated_size(kinds[1][1]) == 50 * (1 + 3 * 20000)  # 50 of 20000 rows


def test_the_9000_png_is_about_236_kb_and_complete() -> None:
    png = solid_9000_png()
    assert 230_000 < len(png) < 240_000
    with Image.open(io.BytesIO(png)) as image:  # reads the header only
        assert (image.size, image.mode) == ((9000, 9000), "RGB")
    idat = dict(chunks_of(png))[b"IDAT"]
    assert inflated_size(idat) == 9000 * (1 + 3 * 9000)


def test_uploads_carry_the_image_as_the_multipart_file(corpus: dict[str, Case]) -> None:
    case = corpus["upload_png_header_bomb"]
    assert BOUNDARY.encode() in case.headers["content-type"]

    async def parse() -> tuple[str | None, bytes]:
        async def stream() -> AsyncIterator[bytes]:
            for chunk in case.body.chunks():
                yield chunk

        headers = Headers(raw=[(b"content-type", case.headers["content-type"])])
        form = await MultiPartParser(headers, stream()).parse()
        try:
            upload = form["file"]
            assert isinstance(upload, UploadFile)
            return upload.filename, await upload.read()
        finally:
            await form.close()

    assert asyncio.run(parse()) == ("bomb.png", header_bomb_png())
    assert case.expect_code == "image_too_large"


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("create_metadata_nan", ("metadata", "score")),
        ("create_guidance_infinity", ("guidance_scale",)),
    ],
)
def test_non_finite_numbers_are_sent_as_raw_json_text(
    corpus: dict[str, Case], name: str, where: tuple[str, ...]
) -> None:
    text = corpus[name].body.whole()
    value = json.loads(text)  # Python's json is lenient, as the API's may be
    for key in where:
        value = value[key]
    assert not math.isfinite(value)
    with pytest.raises(ValueError, match="not JSON"):
        json.loads(text, parse_constant=refuse_constant)


def refuse_constant(word: str) -> None:
    raise ValueError(f"{word} is not JSON")


def test_the_batch_has_one_good_item_and_one_with_nan(corpus: dict[str, Case]) -> None:
    case = corpus["batch_item_metadata_nan"]
    items = json.loads(case.body.whole())["items"]
    assert "metadata" not in items[0] and math.isnan(items[1]["metadata"]["score"])
    assert case.expect_items == (201, 422)


def test_metadata_has_ten_thousand_keys_in_a_body_under_the_json_limit(
    corpus: dict[str, Case],
) -> None:
    body = corpus["create_metadata_10000_keys"].body.whole()
    assert len(json.loads(body)["metadata"]) == 10_000 and len(body) < MB


def test_the_2mb_json_is_valid_and_only_too_big(corpus: dict[str, Case]) -> None:
    body = corpus["create_json_2mb"].body.whole()
    assert len(body) == 2 * MB
    assert json.loads(body) == {"upload_id": "Up1oad", "prompt": "slow push-in", "duration": 5}


@pytest.mark.parametrize("name", ["create_json_50mb", "create_json_50mb_chunked", "upload_50mb"])
def test_50mb_bodies_are_streamed_in_small_chunks(corpus: dict[str, Case], name: str) -> None:
    case = corpus[name]
    sizes = [len(chunk) for chunk in case.body.chunks()]
    assert sum(sizes) == case.body.length >= 50 * MB
    assert max(sizes) <= 64 * 1024 + 1024  # never the whole body at once
    with pytest.raises(ValueError):
        case.body.whole()
    headers = request_kwargs(case, "key")["headers"]
    declared = headers.get("content-length")
    assert declared == (str(case.body.length).encode() if case.declare_length else None)


def test_request_id_cases_are_long_or_not_ascii(corpus: dict[str, Case]) -> None:
    long_id = corpus["create_request_id_too_long"].headers["x-request-id"]
    foreign = corpus["create_request_id_non_ascii"].headers["x-request-id"]
    assert len(long_id) >= 1024
    with pytest.raises(UnicodeDecodeError):
        foreign.decode("ascii")
    assert all(corpus[n].request_id_replaced for n in ("create_request_id_too_long",
                                                       "create_request_id_non_ascii"))  # fmt: skip


def _str_headers(case: Case) -> dict[str, str]:
    return {key: value.decode() for key, value in case.headers.items()}


def test_signed_webhooks_verify_so_only_their_size_is_wrong(corpus: dict[str, Case]) -> None:
    long_id = corpus["webhook_id_too_long"]
    headers = _str_headers(long_id)
    signed = sign(SECRET, headers["webhook-id"], headers["webhook-timestamp"], long_id.body.whole())
    assert headers["webhook-signature"] == f"v3,{signed}" and len(headers["webhook-id"]) == 4096
    with pytest.raises(WebhookRejected, match="longer than"):
        verify(SECRET, headers, long_id.body.whole(), now=NOW)
    big = corpus["webhook_body_1mb"]
    assert big.body.length == MB
    assert verify(SECRET, _str_headers(big), big.body.whole(), now=NOW) == "0" * 31 + "1"


def test_bad_webhook_signatures(corpus: dict[str, Case]) -> None:
    forged = corpus["webhook_signature_forged"]
    with pytest.raises(WebhookRejected):
        verify(SECRET, _str_headers(forged), forged.body.whole(), now=NOW)
    foreign = corpus["webhook_signature_non_ascii"].headers["webhook-signature"]
    with pytest.raises(UnicodeDecodeError):
        foreign.decode("ascii")
    for name in ("webhook_signature_forged", "webhook_signature_non_ascii", "webhook_id_too_long"):
        assert corpus[name].expect_status == 401 and not corpus[name].auth


def test_request_kwargs_add_the_key_only_where_the_caller_would(corpus: dict[str, Case]) -> None:
    create = request_kwargs(corpus["create_metadata_nan"], "secret-key")
    webhook = request_kwargs(corpus["webhook_signature_forged"], "secret-key")
    assert create["headers"]["authorization"] == b"Bearer secret-key"
    assert "authorization" not in webhook["headers"]
    assert (create["method"], create["url"]) == ("POST", "/v1/generations")
