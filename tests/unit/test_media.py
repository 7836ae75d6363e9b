import io
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tests.support import image_bytes, png_claiming
from workers.media import InvalidMedia, inspect_image, probe_video

LIMITS = {"max_bytes": 10 * 1024 * 1024, "min_side": 300, "max_pixels": 50 * 1024 * 1024}


def test_png_and_jpeg_are_accepted_by_their_bytes() -> None:
    png = inspect_image(image_bytes(640, 480, "PNG"), **LIMITS)
    jpg = inspect_image(image_bytes(300, 300, "JPEG"), **LIMITS)
    assert (png.content_type, png.extension, png.width, png.height) == (
        "image/png",
        "png",
        640,
        480,
    )
    assert (jpg.content_type, jpg.width) == ("image/jpeg", 300)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (image_bytes(299, 600), "image_too_small"),
        (image_bytes(400, 400, "GIF"), "image_format"),
        (image_bytes(400, 400, "WEBP"), "image_format"),
        (b"<html>not an image</html>", "image_unreadable"),
        (image_bytes(400, 400, "JPEG")[:600], "image_unreadable"),
    ],
)
def test_bad_images_are_refused_with_a_stable_code(data: bytes, code: str) -> None:
    with pytest.raises(InvalidMedia) as caught:
        inspect_image(data, **LIMITS)
    assert caught.value.code == code


def test_oversized_image_is_refused_before_decoding() -> None:
    with pytest.raises(InvalidMedia) as caught:
        inspect_image(image_bytes(400, 400), **{**LIMITS, "max_bytes": 100})
    assert caught.value.code == "image_too_large"


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (9000, 9000), (7300, 7300)])
def test_a_header_over_the_pixel_budget_is_refused_before_decoding(width: int, height: int) -> None:
    # 20000x20000 is past Pillow's own error limit, 9000x9000 past its warning (an error under
    # pytest), 7300x7300 past ours only: all refused the same way, by our budget.
    with pytest.raises(InvalidMedia) as caught:
        inspect_image(png_claiming(width, height), **LIMITS)
    assert caught.value.code == "image_too_large"
    assert f"{width}x{height}" in caught.value.message


def test_an_image_within_the_budget_is_decoded_to_its_end() -> None:
    # The claimed 2000x2000 is within budget, so the pixel data is read, and is not there.
    with pytest.raises(InvalidMedia) as caught:
        inspect_image(png_claiming(2000, 2000), **LIMITS)
    assert caught.value.code == "image_unreadable"


def test_a_multi_picture_jpeg_from_a_phone_is_a_jpeg() -> None:
    # Phones save depth maps and previews as MPO: a JPEG with more JPEGs after it.
    buffer = io.BytesIO()
    first, preview = Image.new("RGB", (400, 300), (9, 9, 9)), Image.new("RGB", (400, 300))
    first.save(buffer, format="MPO", save_all=True, append_images=[preview])
    info = inspect_image(buffer.getvalue(), **LIMITS)
    assert (info.content_type, info.width) == ("image/jpeg", 400)


def test_the_budget_is_ours_not_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert inspect_image(image_bytes(640, 480), **LIMITS).width == 640
    assert inspect_image(image_bytes(640, 480, "JPEG"), **LIMITS).width == 640
    with pytest.raises(InvalidMedia) as caught:
        inspect_image(image_bytes(640, 480, "GIF"), **LIMITS)
    assert caught.value.code == "image_format"


def test_probe_reads_duration_size_and_codec(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(48):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    info = probe_video(path)
    assert (info.width, info.height, info.codec, info.frames) == (64, 48, "h264", 48)
    assert info.duration == pytest.approx(2.0, abs=0.05)


def test_probe_refuses_what_is_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "x.mp4"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(InvalidMedia):
        probe_video(path)


def test_probe_refuses_an_image_which_ffmpeg_would_read_as_a_one_frame_video(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.mp4"
    path.write_bytes(image_bytes(640, 480, "PNG"))
    with pytest.raises(InvalidMedia, match="not an MP4"):
        probe_video(path)
