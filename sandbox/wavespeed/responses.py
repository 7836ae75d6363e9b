"""Responses the simulator sends on purpose wrong, and byte ranges for the ones it sends right."""

from __future__ import annotations

import re
from collections.abc import Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from sandbox.wavespeed.errors import ApiError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class CutShortResponse(Response):
    """Declares its full `Content-Length`, sends only the first part of the body and stops.

    An ASGI server then has to close the connection mid-body, so the client reads a short
    body: httpx raises `httpx.RemoteProtocolError`, requests a `ChunkedEncodingError`.
    """

    def __init__(
        self,
        content: bytes,
        *,
        media_type: str,
        keep_fraction: float,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(content, status_code=status_code, media_type=media_type, headers=headers)
        self._kept = self.body[: int(len(self.body) * keep_fraction)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send({"type": "http.response.body", "body": self._kept, "more_body": True})


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte span a single-range `Range` header asks for, None for the whole body."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        start, end = max(0, size - int(last)), size - 1
    else:
        start, end = int(first), min(size - 1, int(last)) if last else size - 1
    if start >= size or start > end:
        raise ApiError(
            416,
            f"range {header} not satisfiable for {size} bytes",
            416,
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end
