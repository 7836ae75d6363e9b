"""A product service using the client library (`pip install clients/python`: httpx and
standardwebhooks only): create a generation with a callback URL, receive and verify the
signed callback, download the video.

    .venv/bin/kling stack up --detach
    .venv/bin/python examples/producer.py [--stack .stack/stack.json] [--out out/producer.mp4]
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kling_client import Client, verify_webhook

IMAGE = Path(__file__).with_name("portrait.png")


def receive_one_callback(secret: str) -> tuple[str, threading.Event, list[dict[str, Any]]]:
    """A callback endpoint on a free local port that verifies what it receives."""
    events: list[dict[str, Any]] = []
    done = threading.Event()

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            events.append(verify_webhook(secret, body, dict(self.headers)))  # raises if forged
            self.send_response(204)
            self.end_headers()
            done.set()

        def log_message(self, *_: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/kling", done, events


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stack", type=Path, default=Path(".stack/stack.json"))
    parser.add_argument("--out", type=Path, default=Path("out/producer.mp4"))
    args = parser.parse_args()
    stack = json.loads(args.stack.read_text())

    url, done, events = receive_one_callback(stack["webhook_secret"])
    with Client(stack["api_url"], stack["api_key"]) as kling:
        job = kling.create(
            upload_id=kling.upload(IMAGE)["upload_id"],
            prompt="Moody night street scene, light rain, camera slow orbit, 5 seconds.",
            duration=5,
            webhook_url=url,
            metadata={"example": "producer"},
        )
        print("created", job["id"], job["status"])
        if not done.wait(120):
            raise SystemExit("no callback within 120 s")
        event = events[0]
        print("callback", event["type"], "verified")
        if event["type"] == "generation.completed":
            size = kling.download(job["id"], args.out)
            print("downloaded", args.out, size, "bytes")


if __name__ == "__main__":
    main()
