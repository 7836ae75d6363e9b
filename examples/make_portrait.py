"""Draws examples/portrait.png: a golden-hour figure against hills, so the demo needs no
downloaded asset. Run `python examples/make_portrait.py` to redraw it."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

WIDTH, HEIGHT = 960, 720


def draw() -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT))
    sky = ImageDraw.Draw(image)
    for y in range(HEIGHT):
        t = y / HEIGHT
        sky.line(
            [(0, y), (WIDTH, y)], fill=(int(250 - 90 * t), int(180 - 110 * t), int(90 + 60 * t))
        )
    draw = ImageDraw.Draw(image)
    draw.ellipse((620, 140, 780, 300), fill=(255, 222, 140))
    for i, color in enumerate([(120, 70, 90), (80, 50, 80), (50, 35, 60)]):
        top = 430 + 60 * i
        draw.polygon([(0, HEIGHT), (0, top), (300, top - 70), (620, top + 10), (WIDTH, top - 40),
                      (WIDTH, HEIGHT)], fill=color)  # fmt: skip
    # A figure: head, hair, shoulders, in silhouette with a warm rim.
    draw.ellipse((380, 250, 560, 450), fill=(235, 180, 140))
    draw.pieslice((360, 220, 580, 470), 180, 360, fill=(60, 35, 30))
    draw.ellipse((300, 470, 640, 820), fill=(40, 60, 90))
    draw.ellipse((430, 330, 450, 350), fill=(40, 30, 30))
    draw.ellipse((490, 330, 510, 350), fill=(40, 30, 30))
    draw.arc((440, 370, 500, 410), 20, 160, fill=(150, 60, 60), width=4)
    return image.filter(ImageFilter.GaussianBlur(1.2))


if __name__ == "__main__":
    draw().save(Path(__file__).with_name("portrait.png"), optimize=True)
