"""Checks on the bytes that pass through us: input images (Pillow) and output videos (PyAV)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import Image, UnidentifiedImageError

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


def inspect_image(data: bytes, *, max_bytes: int, min_side: int) -> ImageInfo:
    """Open the image for real: jpg/png only, at least min_side on both sides, not truncated."""
    if len(data) > max_bytes:
        raise InvalidMedia("image_too_large", f"image is {len(data)} bytes; at most {max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format or ""
            width, height = image.size
            if kind not in IMAGE_TYPES:
                raise InvalidMedia("image_format", f"image is {kind or 'unknown'}; jpg or png only")
            image.load()  # decodes every byte: a truncated file fails here, not at WaveSpeed
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InvalidMedia("image_unreadable", f"image cannot be decoded: {exc}") from exc
    if min(width, height) < min_side:
        raise InvalidMedia(
            "image_too_small", f"image is {width}x{height}; at least {min_side}x{min_side}"
        )
    content_type, extension = IMAGE_TYPES[kind]
    return ImageInfo(content_type, extension, width, height)


def probe_video(path: Path) -> VideoInfo:
    """Duration, size and codec of an MP4's first video stream."""
    try:
        with av.open(str(path)) as container:
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
