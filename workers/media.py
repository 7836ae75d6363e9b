"""Checks on the bytes that pass through us: input images (Pillow) and output videos (PyAV)."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

# What WaveSpeed accepts, by what the bytes really are (never by name or Content-Type).
IMAGE_TYPES = {"JPEG": ("image/jpeg", "jpg"), "PNG": ("image/png", "png")}


class InvalidMedia(ValueError):
    """Bytes that are not what they must be; `code` is stable, `message` is for humans."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ImageInfo:
    content_type: str
    extension: str
    width: int
    height: int


@dataclass(frozen=True)
class VideoInfo:
    duration: float
    width: int
    height: int
    codec: str
    frames: int


def inspect_image(data: bytes, *, max_bytes: int, min_side: int, max_pixels: int) -> ImageInfo:
    """Open the image for real: jpg/png only, at most `max_pixels` by its header (checked before
    a single pixel is decoded), at least min_side on both sides, not truncated."""
    if len(data) > max_bytes:
        raise InvalidMedia("image_too_large", f"image is {len(data)} bytes; at most {max_bytes}")
    with _header(data) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidMedia(
                "image_too_large",
                f"image is {width}x{height}, {width * height} pixels; at most {max_pixels}",
            )
        if min(width, height) < min_side:
            raise InvalidMedia(
                "image_too_small", f"image is {width}x{height}; at least {min_side}x{min_side}"
            )
        _decode(image)
        content_type, extension = IMAGE_TYPES[image.format or ""]
    return ImageInfo(content_type, extension, width, height)


# Each format we take, read by its own Pillow class: that reads the header and nothing else.
# `Image.open` would also apply Pillow's process-wide bomb limit (a warning from 89 MP, an error
# from 179 MP), a second, global budget that is not ours to set and warns where we refuse.
_READERS: tuple[type[ImageFile.ImageFile], ...] = (
    PngImagePlugin.PngImageFile,
    JpegImagePlugin.JpegImageFile,
)


def _header(data: bytes) -> ImageFile.ImageFile:
    for reader in _READERS:
        try:
            return reader(io.BytesIO(data))
        except (SyntaxError, OSError, ValueError, struct.error):  # not this format, or broken
            continue
    kind = _format_of(data)
    if kind is None:
        raise InvalidMedia("image_unreadable", "image cannot be decoded: not a jpg or png")
    raise InvalidMedia("image_format", f"image is {kind}; jpg or png only")


def _format_of(data: bytes) -> str | None:
    """What Pillow takes bytes that are no jpg/png for (None: nothing), to say so in the
    refusal; they are refused whatever they are, so a bomb of another format needs no budget."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format or "unknown"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "an image of another format"


def _decode(image: ImageFile.ImageFile) -> None:
    """Decode every byte, so that a truncated file fails here, not at WaveSpeed. Memory is the
    pixel budget times the mode's bytes per pixel (4 for RGB, RGBA and CMYK in Pillow); a JPEG
    is decoded at 1/8 scale, which still reads every byte of its entropy-coded data."""
    if image.format == "JPEG":
        image.draft(image.mode, (image.width // 8, image.height // 8))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise InvalidMedia("image_unreadable", f"image cannot be decoded: {exc}") from exc


def probe_video(path: Path) -> VideoInfo:
    """Duration, size and codec of an MP4's first video stream."""
    try:
        with av.open(str(path)) as container:
            # FFmpeg opens an image as a one-frame video: only an MP4 is a clip.
            if "mp4" not in container.format.name.split(","):
                raise InvalidMedia(
                    "video_invalid", f"output is {container.format.name}, not an MP4"
                )
            if not container.streams.video:
                raise InvalidMedia("video_invalid", "output has no video stream")
            stream = container.streams.video[0]
            duration = (
                float(stream.duration * stream.time_base)
                if stream.duration and stream.time_base
                else (container.duration or 0) / 1_000_000
            )
            return VideoInfo(
                duration=round(duration, 3),
                width=stream.codec_context.width,
                height=stream.codec_context.height,
                codec=stream.codec_context.name,
                frames=stream.frames,
            )
    except av.FFmpegError as exc:
        raise InvalidMedia("video_invalid", f"output is not a readable MP4: {exc}") from exc
