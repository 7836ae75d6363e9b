"""Decoding memory is bounded by the pixel budget: the peak RSS of a fresh process that checks
an image, measured by Linux's VmHWM (getrusage's ru_maxrss would carry over the peak of the
forking test process), with loose bounds and never wall-clock time.

`python -m tests.unit.test_image_memory` prints the same figures at the default budget."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from config import Settings
from tests.support import png_claiming

MB = 1024 * 1024

# Reads the file first, so that the growth of the peak is the check's alone.
_MEASURE = """
import sys
from workers.media import InvalidMedia, inspect_image
def peak_kb():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0])
data = open(sys.argv[1], "rb").read()
before = peak_kb()
try:
    inspect_image(data, max_bytes=len(data), min_side=300, max_pixels=int(sys.argv[2]))
    outcome = "accepted"
except InvalidMedia as exc:
    outcome = exc.code
grown = peak_kb() - before
print(outcome, grown * 1024)
"""


def peak_growth(image: Path, max_pixels: int) -> tuple[str, int]:
    """What the check answered, and by how many bytes it raised the process's peak RSS."""
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(image), str(max_pixels)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    outcome, grown = run.stdout.split()
    return outcome, int(grown)


def write(folder: Path, name: str, width: int, height: int, fmt: str) -> Path:
    path = folder / name
    Image.new("RGB", (width, height), (200, 120, 60)).save(path, format=fmt)
    return path


def test_decoding_the_largest_allowed_image_stays_within_its_bound(tmp_path: Path) -> None:
    budget = 4000 * 4000  # RGB: 4 bytes a pixel in Pillow, 64 MB
    outcome, grown = peak_growth(write(tmp_path, "a.png", 4000, 4000, "PNG"), budget)
    assert outcome == "accepted"
    assert 2 * budget < grown < 4 * budget + 32 * MB  # decoded for real, and no more than that


def test_a_jpeg_is_decoded_at_an_eighth_of_its_scale(tmp_path: Path) -> None:
    budget = 4000 * 4000
    outcome, grown = peak_growth(write(tmp_path, "a.jpg", 4000, 4000, "JPEG"), budget)
    assert outcome == "accepted"
    assert grown < 16 * MB


def test_a_bomb_is_refused_without_its_memory(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(20000, 20000))  # 1.6 GB if it were decoded
    outcome, grown = peak_growth(bomb, 4000 * 4000)
    assert outcome == "image_too_large"
    assert grown < 16 * MB


def main() -> None:
    budget = Settings().image_max_pixels
    side = int(budget**0.5)
    with tempfile.TemporaryDirectory() as folder:
        cases = [
            (write(Path(folder), "max.png", side, side, "PNG"), f"PNG {side}x{side}"),
            (write(Path(folder), "max.jpg", side, side, "JPEG"), f"JPEG {side}x{side}"),
            (Path(folder) / "bomb.png", "PNG claiming 20000x20000"),
        ]
        cases[2][0].write_bytes(png_claiming(20000, 20000))
        for path, label in cases:
            outcome, grown = peak_growth(path, budget)
            size = path.stat().st_size
            print(f"{label:28} {size:>10} bytes  {outcome:16} peak RSS +{grown / MB:.1f} MB")


if __name__ == "__main__":
    main()
