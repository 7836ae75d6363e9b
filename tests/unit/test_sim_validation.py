"""Every rule of the model's input table, the history filters and the image checks."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

import pytest
from PIL import Image

from sandbox.wavespeed.validation import (
    ImageRejected,
    InputError,
    inspect_image,
    parse_history_query,
    price_usd,
    validate_input,
)

IMAGE = "https://example.com/a.png"


def _body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"image": IMAGE, "prompt": "slow push-in"}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def test_minimal_input_gets_defaults() -> None:
    assert validate_input(_body()) == {
        "image": IMAGE,
        "prompt": "slow push-in",
        "guidance_scale": 0.5,
        "duration": 5,
    }


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"duration": 10}, {"duration": 10}),
        ({"duration": "5"}, {"duration": 5}),
        ({"duration": "10"}, {"duration": 10}),
        ({"duration": 10.0}, {"duration": 10}),
        ({"duration": None}, {"duration": 5}),
        ({"guidance_scale": 0}, {"guidance_scale": 0.0}),
        ({"guidance_scale": 1}, {"guidance_scale": 1.0}),
        ({"guidance_scale": 0.25}, {"guidance_scale": 0.25}),
        ({"negative_prompt": "blur"}, {"negative_prompt": "blur"}),
        ({"prompt": "x" * 2500}, {"prompt": "x" * 2500}),
        ({"enable_sync_mode": True}, {}),
        ({"seed": 3}, {}),
    ],
)
def test_accepted_inputs(overrides: dict[str, Any], expected: dict[str, Any]) -> None:
    normalised = validate_input(_body(**overrides))
    assert expected.items() <= normalised.items()
    assert "enable_sync_mode" not in normalised and "seed" not in normalised


@pytest.mark.parametrize(
    ("overrides", "field", "code"),
    [
        ({"prompt": ...}, "prompt", 1400),
        ({"prompt": None}, "prompt", 1400),
        ({"prompt": ""}, "prompt", 1400),
        ({"prompt": 5}, "prompt", 1401),
        ({"prompt": "x" * 2501}, "prompt", 1401),
        ({"image": ...}, "image", 1400),
        ({"image": ""}, "image", 1400),
        ({"image": ["a"]}, "image", 1401),
        ({"negative_prompt": 1}, "negative_prompt", 1401),
        ({"guidance_scale": -0.01}, "guidance_scale", 1401),
        ({"guidance_scale": 1.01}, "guidance_scale", 1401),
        ({"guidance_scale": "0.5"}, "guidance_scale", 1401),
        ({"guidance_scale": True}, "guidance_scale", 1401),
        ({"guidance_scale": float("nan")}, "guidance_scale", 1401),
        ({"duration": 7}, "duration", 1401),
        ({"duration": "15"}, "duration", 1401),
        ({"duration": 5.5}, "duration", 1401),
        ({"duration": True}, "duration", 1401),
        ({"enable_sync_mode": "yes"}, "enable_sync_mode", 1401),
    ],
)
def test_rejected_inputs_name_the_field(overrides: dict[str, Any], field: str, code: int) -> None:
    with pytest.raises(InputError) as caught:
        validate_input(_body(**overrides))
    assert caught.value.field == field
    assert caught.value.code == code
    assert field in caught.value.message


def test_price_follows_duration() -> None:
    assert price_usd(5) == 0.45
    assert price_usd(10) == 0.90


def test_history_query_parses_filters() -> None:
    query = parse_history_query(
        {
            "page": 2,
            "page_size": 100,
            "model": "kwaivgi/kling-v2.1-i2v-pro",
            "status": "failed",
            "created_after": "2025-01-01T00:00:00Z",
            "created_before": "2025-01-02T00:00:00+00:00",
        }
    )
    assert (query.page, query.page_size, query.status) == (2, 100, "failed")
    assert query.created_after == datetime(2025, 1, 1, tzinfo=UTC)
    assert query.created_before == datetime(2025, 1, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"page_size": 10}, "page"),
        ({"page": 1}, "page_size"),
        ({"page": 0, "page_size": 10}, "page"),
        ({"page": 1, "page_size": 101}, "page_size"),
        ({"page": 1, "page_size": 0}, "page_size"),
        ({"page": "1", "page_size": 10}, "page"),
        ({"page": 1, "page_size": 10, "status": "done"}, "status"),
        ({"page": 1, "page_size": 10, "created_after": "yesterday"}, "created_after"),
        ({"page": 1, "page_size": 10, "model": 3}, "model"),
    ],
)
def test_bad_history_queries(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_history_query(body)
    assert caught.value.field == field


def _image(size: tuple[int, int], image_format: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (90, 90, 90)).save(out, format=image_format)
    return out.getvalue()


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_jpg_and_png_of_300px_pass(image_format: str) -> None:
    info = inspect_image(_image((300, 300), image_format), 10 * 1024 * 1024)
    assert (info.format, info.width, info.height) == (image_format, 300, 300)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_image((299, 400), "PNG"), "smaller than 300x300"),
        (_image((400, 299), "JPEG"), "smaller than 300x300"),
        (_image((320, 320), "GIF"), "not supported"),
        (_image((320, 320), "WEBP"), "not supported"),
        (b"<html>not an image</html>", "could not be decoded"),
        (_image((320, 320), "PNG")[:60], "could not be decoded"),
    ],
)
def test_images_the_model_refuses(data: bytes, reason: str) -> None:
    with pytest.raises(ImageRejected, match=reason):
        inspect_image(data, 10 * 1024 * 1024)


def test_images_over_the_byte_limit_are_refused() -> None:
    data = _image((320, 320), "PNG")
    with pytest.raises(ImageRejected, match="byte limit"):
        inspect_image(data, len(data) - 1)


def test_the_simulator_allows_the_durations_it_is_told() -> None:
    body = {"image": "https://example.com/a.png", "prompt": "p", "duration": "15"}
    assert validate_input(body, (5, 10, 15))["duration"] == 15
    with pytest.raises(InputError, match="one of 5, 10, got '15'"):
        validate_input(body)
