"""The render engine: a still image and a prompt in, a short H.264 MP4 with a moving camera out.

The camera is read from the prompt the way Kling's prompting guide phrases it (push-in/zoom in,
pull-out/zoom out, pan left/right, tilt up/down, orbit, handheld shake; a gentle push-in when
the prompt names none). `guidance_scale` scales how far the camera travels: low is a natural
drift, high follows the prompt literally. Every frame is a sub-pixel crop of the image resized
to the output size, so the motion is smooth, and the same inputs give the same frames. (Not
always the same bytes: even single-threaded, the x264 in PyAV's wheels sometimes codes the same
pictures differently from one encode to the next.)
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps

DEFAULT_MOVES = ("push_in",)
MAX_ZOOM = 3.0
MAX_OFFSET = 0.25

_MOVE_PATTERNS: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern, re.IGNORECASE)
    for name, pattern in {
        "push_in": r"\b(push(es|ing)?[- ]?in|zoom(s|ing)?[- ]?in|dolly(ing)?[- ]?in|"
        r"mov(e|es|ing) (in )?closer)\b",
        "pull_out": r"\b(pull(s|ing)?[- ]?(out|back|away)|zoom(s|ing)?[- ]?out|"
        r"dolly(ing)?[- ]?(out|back))\b",
        "pan_left": r"\bpan(s|ning)?( to the)?[- ]left\b",
        "pan_right": r"\bpan(s|ning)?( to the)?[- ]right\b",
        "tilt_up": r"\btilt(s|ing)?[- ]up(ward)?s?\b",
        "tilt_down": r"\btilt(s|ing)?[- ]down(ward)?s?\b",
        "orbit": r"\b(orbit(s|ing)?|arc(s|ing)? (shot|around)|circl(e|es|ing) around)\b",
        "handheld": r"\b(hand[- ]?held|camera shake|shaky|micro[- ](sway|shake|jitter))\b",
        "static": r"\b(static|locked[- ]off|still|fixed) (camera|shot)\b",
    }.items()
}
_OPPOSITES = (("push_in", "pull_out"), ("pan_left", "pan_right"), ("tilt_up", "tilt_down"))
_SLOW = re.compile(r"\b(slow(ly)?|gentle|gently|subtle|subtly|soft(ly)?)\b", re.IGNORECASE)
_FAST = re.compile(r"\b(fast|quick(ly)?|rapid(ly)?|swift(ly)?|dramatic|whip)\b", re.IGNORECASE)


def parse_camera_moves(prompt: str) -> tuple[str, ...]:
    """The camera moves a prompt asks for, in the order it names them."""
    hits = sorted(
        (match.start(), name)
        for name, pattern in _MOVE_PATTERNS.items()
        if (match := pattern.search(prompt))
    )
    names = _drop_contradictions([name for _, name in hits])
    if names == ["static"]:
        return ("static",)
    moving = tuple(name for name in names if name != "static")
    return moving or DEFAULT_MOVES


def _drop_contradictions(names: list[str]) -> list[str]:
    """Of two opposite moves (in and out, left and right) keep the one named first."""
    for first, second in _OPPOSITES:
        if first in names and second in names:
            names.remove(second if names.index(first) < names.index(second) else first)
    return names


def motion_strength(prompt: str, guidance_scale: float, duration: int) -> float:
    """How far the camera travels: guidance, the prompt's pace words and clip length together."""
    slow, fast = _SLOW.search(prompt), _FAST.search(prompt)
    pace = 1.0
    if slow and (not fast or slow.start() < fast.start()):
        pace = 0.6
    elif fast:
        pace = 1.5
    literalness = 0.4 + 1.2 * guidance_scale
    return literalness * pace * (duration / 5) ** 0.5


@dataclass(frozen=True)
class CameraPath:
    """Per-frame camera: `zoom` >= 1 over the cover frame, centre offsets `x`/`y` as fractions
    of its width/height (+ right, + down), `squash` <= 1 a horizontal foreshortening."""

    zoom: np.ndarray
    x: np.ndarray
    y: np.ndarray
    squash: np.ndarray


def ease_in_out(t: np.ndarray) -> np.ndarray:
    """Cosine ease: starts and ends at rest, like a camera operator would."""
    return np.asarray(0.5 - 0.5 * np.cos(np.pi * t))


def camera_path(
    moves: Iterable[str], strength: float, n_frames: int, fps: int, seed: int
) -> CameraPath:
    """The camera for every frame, zoomed just enough that the crop never leaves the image."""
    t = np.linspace(0.0, 1.0, n_frames)
    e = ease_in_out(t)
    ones = np.ones(n_frames)
    path = {"zoom": ones.copy(), "x": np.zeros(n_frames), "y": np.zeros(n_frames), "squash": ones}
    for move in moves:
        _apply_move(path, move, e, strength, t * n_frames / fps, seed)
    return _fit_inside(CameraPath(**path))


def _apply_move(
    path: dict[str, np.ndarray], move: str, e: np.ndarray, a: float, seconds: np.ndarray, seed: int
) -> None:
    if move == "push_in":
        path["zoom"] = path["zoom"] * (1 + 0.30 * a * e)
    elif move == "pull_out":
        path["zoom"] = path["zoom"] * (1 + 0.30 * a * (1 - e))
    elif move in ("pan_left", "pan_right"):
        direction = -1 if move == "pan_left" else 1
        path["x"] = path["x"] + direction * min(0.08 * a, 0.2) * (2 * e - 1)
    elif move in ("tilt_up", "tilt_down"):
        direction = -1 if move == "tilt_up" else 1
        path["y"] = path["y"] + direction * min(0.06 * a, 0.2) * (2 * e - 1)
    elif move == "orbit":
        _apply_orbit(path, e, a)
    elif move == "handheld":
        path["x"] = path["x"] + 0.006 * a * _shake(seconds, seed)
        path["y"] = path["y"] + 0.005 * a * _shake(seconds, seed + 1)


def _apply_orbit(path: dict[str, np.ndarray], e: np.ndarray, a: float) -> None:
    # A flat image cannot show parallax, so an arc is suggested: sideways travel, a slight
    # rise and approach at mid-arc, and the foreshortening of seeing the scene at an angle.
    angle = np.pi * (e - 0.5)
    path["x"] = path["x"] + min(0.1 * a, 0.2) * np.sin(angle)
    path["y"] = path["y"] - 0.015 * a * np.cos(angle)
    path["zoom"] = path["zoom"] * (1 + 0.06 * a * np.sin(np.pi * e))
    path["squash"] = path["squash"] * (1 - min(0.05 * a, 0.15) * np.sin(np.pi * e))


def _shake(seconds: np.ndarray, seed: int) -> np.ndarray:
    """Smooth pseudo-random sway in [-1, 1]: a few incommensurate sines with seeded phases."""
    phases = np.random.default_rng(seed).uniform(0, 2 * np.pi, 3)
    waves = [
        np.sin(2 * np.pi * hz * seconds + phase)
        for hz, phase in zip((0.7, 1.3, 2.3), phases, strict=True)
    ]
    return np.asarray(sum(waves)) / 3


def _fit_inside(path: CameraPath) -> CameraPath:
    # Offsets within a quarter of the frame need at most ~2.4x zoom, so capping the zoom at
    # MAX_ZOOM never lets the crop leave the image.
    x, y = np.clip(path.x, -MAX_OFFSET, MAX_OFFSET), np.clip(path.y, -MAX_OFFSET, MAX_OFFSET)
    needed_x = 1 / (path.squash * (1 - 2 * np.abs(x)))
    needed_y = 1 / (1 - 2 * np.abs(y))
    base = max(1.0, float(np.max(needed_x / path.zoom)), float(np.max(needed_y / path.zoom)))
    zoom = np.minimum(path.zoom * base, MAX_ZOOM)
    return CameraPath(zoom=zoom, x=x, y=y, squash=path.squash)


def render_video(
    image_bytes: bytes,
    prompt: str,
    guidance_scale: float,
    duration: int,
    *,
    width: int,
    height: int,
    fps: int = 24,
) -> bytes:
    """An MP4 (H.264, yuv420p) of exactly `duration * fps` frames animating the image."""
    n_frames = duration * fps
    strength = motion_strength(prompt, guidance_scale, duration)
    seed = _seed(image_bytes, prompt, guidance_scale, duration)
    path = camera_path(parse_camera_moves(prompt), strength, n_frames, fps, seed)
    source = prepare_source(image_bytes, width, height, float(path.zoom.max()))
    frames = (_frame(source, path, i, (width, height)) for i in range(n_frames))
    preset = "veryfast" if width * height <= 1280 * 720 else "superfast"
    return encode_h264(frames, width, height, fps, preset=preset)


def _seed(image_bytes: bytes, prompt: str, guidance_scale: float, duration: int) -> int:
    digest = hashlib.sha256(image_bytes)
    digest.update(f"\0{prompt}\0{guidance_scale!r}\0{duration}".encode())
    return int.from_bytes(digest.digest()[:4], "big")


def prepare_source(image_bytes: bytes, width: int, height: int, max_zoom: float) -> Image.Image:
    """The image's centred output-aspect region ("cover" crop), sized so the most zoomed-in
    frame still samples it at least one source pixel per output pixel."""
    encoded = Image.open(io.BytesIO(image_bytes))
    target = (round(width * max_zoom), round(height * max_zoom))
    # JPEG can decode at 1/2, 1/4 or 1/8 scale: far cheaper than decoding a 4000 px photo fully.
    encoded.draft("RGB", (target[0], target[1]))
    upright = ImageOps.exif_transpose(encoded).convert("RGB")
    return ImageOps.fit(upright, target, method=Image.Resampling.BICUBIC)


def _frame(source: Image.Image, path: CameraPath, i: int, size: tuple[int, int]) -> Image.Image:
    full_w, full_h = source.size
    crop_w = full_w / (path.zoom[i] * path.squash[i])
    crop_h = full_h / path.zoom[i]
    centre_x = full_w * (0.5 + path.x[i])
    centre_y = full_h * (0.5 + path.y[i])
    # Clamped only against rounding error: the path already keeps the crop inside.
    box = (
        max(0.0, float(centre_x - crop_w / 2)),
        max(0.0, float(centre_y - crop_h / 2)),
        min(float(full_w), float(centre_x + crop_w / 2)),
        min(float(full_h), float(centre_y + crop_h / 2)),
    )
    return source.resize(size, Image.Resampling.BILINEAR, box=box)


def encode_h264(
    frames: Iterable[Image.Image | np.ndarray],
    width: int,
    height: int,
    fps: int,
    *,
    preset: str = "veryfast",
    bit_rate: int | None = None,
) -> bytes:
    """Encode frames (RGB images, or yuv420p planes as one array) as a faststart MP4, at
    constant quality or, given `bit_rate`, at that average."""
    with tempfile.TemporaryDirectory(prefix="wavespeed-sim-") as tmp:
        # faststart rewrites the file to put the index first, which needs a real seekable file.
        target = Path(tmp) / "out.mp4"
        with av.open(str(target), "w", format="mp4", options={"movflags": "+faststart"}) as out:
            # One thread, asked of x264 itself (PyAV's `thread_count` alone no longer reaches
            # it): a threaded x264 also decides differently from run to run, and uses the cores
            # the simulator's event loop needs.
            options = {"preset": preset, "g": str(2 * fps), "threads": "1"}
            if bit_rate is None:
                options["crf"] = "23"
            stream = out.add_stream("libx264", rate=fps, options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if bit_rate is not None:
                stream.bit_rate = bit_rate
            for index, picture in enumerate(frames):
                frame = (
                    av.VideoFrame.from_image(picture)
                    if isinstance(picture, Image.Image)
                    else av.VideoFrame.from_ndarray(picture, format="yuv420p")
                )
                frame.pts, frame.time_base = index, Fraction(1, fps)
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        return target.read_bytes()


@functools.lru_cache(maxsize=8)
def placeholder_video(duration: int, *, fps: int = 24, size: int = 64) -> bytes:
    """A tiny valid MP4 of the right length (a flat grey square), made once per duration."""
    grey = Image.new("RGB", (size, size), (128, 128, 128))
    return encode_h264((grey for _ in range(duration * fps)), size, size, fps, preset="ultrafast")


# What Kling v2.1 Pro delivers: 1080p at 24 fps, about 5 to 8 MB for 5 s.
FULL_SIZE = (1920, 1080)
FULL_SIZE_BIT_RATE = 8_000_000


@dataclass(frozen=True)
class Video:
    """An output as the simulator keeps it: `shared` bytes, which many outputs may hold by
    reference (one 1080p encode backs them all), then bytes of its own; `sha256` of both."""

    shared: bytes
    own: bytes
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> Video:
        return cls(data, b"", hashlib.sha256(data).hexdigest())

    @property
    def size(self) -> int:
        return len(self.shared) + len(self.own)

    def read(self) -> bytes:
        return self.shared + self.own if self.own else self.shared


def full_size_video(duration: int, tag: str, *, fps: int = 24) -> Video:
    """A 1920x1080 H.264 MP4 as large as a real output, distinct for each `tag` (the
    prediction id) at the cost of a few bytes: one encode per duration is shared, and a
    top-level `free` box after it, which every MP4 reader skips, carries the tag."""
    shared, digest = _full_size_encode(duration, fps)
    label = tag.encode()
    own = struct.pack(">I", 8 + len(label)) + b"free" + label
    hasher = digest.copy()
    hasher.update(own)
    return Video(shared, own, hasher.hexdigest())


@functools.lru_cache(maxsize=8)
def _full_size_encode(duration: int, fps: int) -> tuple[bytes, hashlib._Hash]:
    # Moving noise is as hard to compress as detail gets: the encoder spends the whole bit
    # rate, so the size is a real clip's while the encode takes about a second.
    width, height = FULL_SIZE
    noise = np.random.default_rng(0).integers(0, 256, (height * 3 // 2, width), dtype=np.uint8)
    frames = (np.roll(noise, 7 * i, axis=1) for i in range(duration * fps))
    data = encode_h264(frames, width, height, fps, preset="ultrafast", bit_rate=FULL_SIZE_BIT_RATE)
    return data, hashlib.sha256(data)
