"""Pointing a client at a proxy: the upstream a service URL names, and the URL rewritten to
the proxy's address with everything else (scheme, user, path, query) kept."""

from __future__ import annotations

import urllib.parse

DEFAULT_PORTS = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379, "postgresql": 5432}


def upstream_of(url: str) -> tuple[str, int]:
    """The (host, port) a service URL connects to, default ports filled in."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]  # postgresql+psycopg
    port = parts.port or DEFAULT_PORTS.get(scheme)
    if not parts.hostname or port is None:
        raise ValueError(f"no host and port in {url!r}")
    return parts.hostname, port


def rewrite(url: str, host: str, port: int) -> str:
    """`url` pointing at host:port instead."""
    parts = urllib.parse.urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
