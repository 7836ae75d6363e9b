"""Fetching a task's input image the way WaveSpeed's workers do: bounded in time and size."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httpx

from sandbox.wavespeed.validation import ImageRejected


class FetchFailed(Exception):
    """The image URL could not be read (a 1402 task failure)."""


async def fetch_image(
    http: httpx.AsyncClient, url: str, *, max_bytes: int, timeout_seconds: float
) -> bytes:
    """The bytes at `url`; `FetchFailed` if unreachable, `ImageRejected` if over `max_bytes`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise FetchFailed(f"image URL must be an http(s) URL, got {url[:200]!r}")
    try:
        async with asyncio.timeout(timeout_seconds):
            return await _download(http, url, max_bytes)
    except (httpx.HTTPError, TimeoutError) as exc:
        raise FetchFailed(f"could not download the image: {type(exc).__name__} {exc}") from exc


async def _download(http: httpx.AsyncClient, url: str, max_bytes: int) -> bytes:
    async with http.stream("GET", url, follow_redirects=True) as response:
        if response.status_code != 200:
            raise FetchFailed(f"could not download the image: HTTP {response.status_code}")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise ImageRejected(f"image is {declared} bytes, more than the {max_bytes} byte limit")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            # Stop reading at the limit rather than buffering whatever the server sends.
            if len(body) > max_bytes:
                raise ImageRejected(f"image is more than the {max_bytes} byte limit")
        return bytes(body)
