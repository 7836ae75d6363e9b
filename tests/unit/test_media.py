from pathlib import Path

import av
import numpy as np
import pytest

from tests.support import image_bytes
from workers.media import InvalidMedia, inspect_image, probe_video

LIMITS = {"max_bytes": 10 * 1024 * 1024, "min_side": 300}


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
        inspect_image(image_bytes(400, 400), max_bytes=100, min_side=300)
    assert caught.value.code == "image_too_large"


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
