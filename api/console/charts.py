"""Charts drawn on the server as SVG: no script, readable without one, printable, and each
carries a text alternative (`<title>`, `<desc>`) for screen readers."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from markupsafe import Markup

# Colours with at least 4.5:1 contrast on white, told apart by more than hue (the legend
# names them, and failures are drawn below the axis).
DONE = "#1b6e3a"
FAILED = "#b3261e"
INK = "#1f2328"


def throughput(points: Sequence[tuple[datetime, int, int]], label: str) -> Markup:
    """Completions (up) and failures (down) per minute, one bar pair per minute."""
    width, height, pad = 720, 180, 28
    middle = height / 2
    top = max([1, *(max(c, f) for _, c, f in points)])
    step = (width - 2 * pad) / max(1, len(points))
    scale = (middle - pad / 2) / top
    bars = []
    for i, (_, completed, failed) in enumerate(points):
        x = pad + i * step
        if completed:
            h = completed * scale
            bars.append(_rect(x, middle - h, step, h, DONE))
        if failed:
            bars.append(_rect(x, middle, step, failed * scale, FAILED))
    total_done = sum(c for _, c, _ in points)
    total_failed = sum(f for _, _, f in points)
    first = points[0][0].strftime("%H:%M") if points else ""
    last = points[-1][0].strftime("%H:%M") if points else ""
    desc = (
        f"{total_done} completions and {total_failed} failures between {first} and {last} UTC; "
        f"busiest minute: {top}."
    )
    return Markup(
        '<svg class="chart" viewBox="0 0 {w} {h}" role="img" '
        'aria-labelledby="chart-title chart-desc" preserveAspectRatio="none">'
        '<title id="chart-title">{label}</title><desc id="chart-desc">{desc}</desc>'
        '<line x1="{pad}" y1="{mid}" x2="{right}" y2="{mid}" stroke="{ink}"/>{bars}'
        '<text x="{pad}" y="{bottom}" fill="{ink}" font-size="12">{first}</text>'
        '<text x="{right}" y="{bottom}" fill="{ink}" font-size="12" text-anchor="end">'
        "{last} UTC</text>"
        '<text x="{pad}" y="14" fill="{ink}" font-size="12">max {top}/min</text></svg>'
    ).format(
        w=width, h=height, label=label, desc=desc, pad=pad, mid=middle, right=width - pad,
        ink=INK, bars=Markup("").join(bars), bottom=height - 4, first=first, last=last, top=top,
    )  # fmt: skip


def bars(values: Sequence[int], label: str) -> Markup:
    """A small bar chart (a failure code's count per hour)."""
    width, height = 240, 36
    top = max([1, *values])
    step = width / max(1, len(values))
    drawn = Markup("").join(
        _rect(i * step, height - v * height / top, step, v * height / top, FAILED)
        for i, v in enumerate(values)
        if v
    )
    return Markup(
        '<svg class="spark" viewBox="0 0 {w} {h}" role="img" aria-label="{label}" '
        'preserveAspectRatio="none"><line x1="0" y1="{h}" x2="{w}" y2="{h}" stroke="{ink}"/>'
        "{drawn}</svg>"
    ).format(w=width, h=height, label=label, ink=INK, drawn=drawn)


def _rect(x: float, y: float, w: float, h: float, fill: str) -> Markup:
    # A hair narrower than the step, so neighbouring bars stay apart.
    return Markup('<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="{}"/>').format(
        x, y, max(w - 0.5, 0.5), h, fill
    )
