"""`python -m sandbox.wavespeed`: run the WaveSpeed simulator in the foreground.

python -m sandbox.wavespeed --port 8090 [--host 127.0.0.1] [--api-key sim-key]
    [--webhook-secret whsec_...] [--inference-seconds 2] [--render-mode real|placeholder|full_size]
    [--resolution 480x270] [--refund-delay-seconds 5] [--faults JSON|@file.json]
    [--sync-timeout-seconds 60] [--render-workers 2] [--log-level info]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, get_args

import structlog
import uvicorn
from pydantic import ValidationError

from sandbox.wavespeed.app import create_app
from sandbox.wavespeed.config import (
    DEFAULT_API_KEY,
    DEFAULT_WEBHOOK_SECRET,
    RenderMode,
    SimulatorConfig,
)
from sandbox.wavespeed.faults import FaultProfile
from sandbox.wavespeed.server import uvicorn_config


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags; each maps onto one `SimulatorConfig` field."""
    parser = argparse.ArgumentParser(prog="python -m sandbox.wavespeed", description=__doc__)
    parser.add_argument("--port", type=int, default=8090, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--webhook-secret", default=DEFAULT_WEBHOOK_SECRET)
    parser.add_argument("--inference-seconds", type=float, default=2.0)
    parser.add_argument("--render-mode", choices=get_args(RenderMode), default="real")
    parser.add_argument("--resolution", default="480x270", help="WIDTHxHEIGHT, both even")
    parser.add_argument("--refund-delay-seconds", type=float, default=5.0)
    parser.add_argument(
        "--allowed-durations", default="5,10", help="clip lengths a submit may ask for: 5,10"
    )
    parser.add_argument("--sync-timeout-seconds", type=float, default=60.0)
    parser.add_argument("--render-workers", type=int, default=2)
    parser.add_argument("--faults", default=None, help="fault profile JSON, or @path to a file")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Turn parsed flags into the validated config (raises `ValidationError` on bad values)."""
    return SimulatorConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        webhook_secret=args.webhook_secret,
        inference_seconds=args.inference_seconds,
        render_mode=args.render_mode,
        resolution=args.resolution,
        refund_delay_seconds=args.refund_delay_seconds,
        allowed_durations=tuple(int(d) for d in args.allowed_durations.split(",") if d.strip()),
        sync_timeout_seconds=args.sync_timeout_seconds,
        render_workers=args.render_workers,
        faults=FaultProfile.model_validate(_load_faults(args.faults)),
    )


def _load_faults(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    loaded = json.loads(text)
    if not isinstance(loaded, dict):
        raise ValueError("--faults must be a JSON object")
    return loaded


def configure_logging(level: str) -> None:
    """Plain console logs for a stand-in run by hand or by the stack."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    logging.basicConfig(level=numeric, format="%(message)s", stream=sys.stderr)
    # httpx logs every image fetch and webhook at INFO; the simulator logs what matters itself.
    logging.getLogger("httpx").setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Parse flags, build the app and serve until interrupted."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"invalid simulator settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    server = uvicorn.Server(
        uvicorn_config(create_app(config), config.host, config.port, args.log_level)
    )
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
