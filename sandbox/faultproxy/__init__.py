"""Controllable TCP fault proxies: one loopback port in front of one upstream, switched at run
time between `up`, `refuse`, `blackhole` and `latency`, with a reset-after-N-bytes rule.

    with ProxyThread() as host:
        redis = host.add("redis", ("127.0.0.1", 6379))
        client = Redis(port=redis.port)
        redis.set_mode("blackhole")   # clients hang until their own timeouts
        redis.set_mode("up")          # stalled connections are reset; new ones flow

`proxy` is the proxy itself, `control` the JSON commands and the handle, `hosts` where the
loop runs (a thread here, or `python -m sandbox.faultproxy` as a process of its own), `urls`
how a service URL is pointed at a proxy.
"""

from sandbox.faultproxy.control import ProxyHandle
from sandbox.faultproxy.hosts import ProxyHost, ProxyProcess, ProxyThread
from sandbox.faultproxy.proxy import DIRECTIONS, MODES, FaultProxy, ProxyError
from sandbox.faultproxy.urls import rewrite, upstream_of

__all__ = [
    "DIRECTIONS",
    "MODES",
    "FaultProxy",
    "ProxyError",
    "ProxyHandle",
    "ProxyHost",
    "ProxyProcess",
    "ProxyThread",
    "rewrite",
    "upstream_of",
]
