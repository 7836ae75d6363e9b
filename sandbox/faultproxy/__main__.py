"""`python -m sandbox.faultproxy`: run fault proxies in a process of their own.

python -m sandbox.faultproxy [--control-port 0] [--ready-file PATH] [--proxy NAME=HOST:PORT ...]

Prints (and writes to `--ready-file`, atomically) `{"control_port": N, "proxies": {name: port}}`
once listening. Drive it with JSON lines on the control port (see `sandbox.faultproxy.control`):

    echo '{"op": "set_mode", "name": "redis", "mode": "blackhole"}' | nc 127.0.0.1 N
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
from pathlib import Path

from sandbox.faultproxy.control import Registry, serve_control


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sandbox.faultproxy", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="where the control channel listens")
    parser.add_argument("--control-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--ready-file", type=Path, default=None)
    parser.add_argument("--proxy", action="append", default=[], metavar="NAME=HOST:PORT")
    return parser


def raise_file_limit() -> None:
    """Two descriptors per proxied connection: take every one the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(args: argparse.Namespace) -> None:
    registry = Registry()
    control = await serve_control(registry, args.host, args.control_port)
    proxies = {}
    for spec in args.proxy:
        name, _, target = spec.partition("=")
        host, _, port = target.rpartition(":")
        command = {"op": "add", "name": name, "host": host, "port": int(port)}
        proxies[name] = await registry.execute(command)
    ready = {"control_port": control.sockets[0].getsockname()[1], "proxies": proxies}
    print(json.dumps(ready), flush=True)
    if args.ready_file is not None:
        partial = args.ready_file.with_suffix(".partial")
        partial.write_text(json.dumps(ready))
        os.replace(partial, args.ready_file)
    async with control:
        await control.serve_forever()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_file_limit()
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
