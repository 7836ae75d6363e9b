"""`python -m sandbox.wavespeed`, the way the embedded stack starts the simulator."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from sandbox.wavespeed.config import MODEL_ID

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _cli(*flags: str) -> list[str]:
    return [sys.executable, "-m", "sandbox.wavespeed", *flags]


@pytest.fixture
def running_cli() -> Iterator[str]:
    port = _free_port()
    flags = [
        "--port", str(port), "--api-key", "cli-key", "--webhook-secret", "whsec_cli",
        "--inference-seconds", "0", "--render-mode", "placeholder", "--resolution", "320x180",
        "--refund-delay-seconds", "1", "--log-level", "warning",
        "--faults", json.dumps({"submit_429": 1.0}),
    ]  # fmt: skip
    process = subprocess.Popen(_cli(*flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, process)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()


def _wait_healthy(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, "simulator exited"
        try:
            if httpx.get(f"{base}/_sim/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError("simulator did not become healthy")


def test_flags_reach_the_running_simulator(running_cli: str) -> None:
    with httpx.Client(base_url=running_cli, headers={"Authorization": "Bearer cli-key"}) as http:
        config = http.get("/_sim/config").json()
        assert (config["render_mode"], config["resolution"]) == ("placeholder", [320, 180])
        assert (config["inference_seconds"], config["refund_delay_seconds"]) == (0.0, 1.0)
        assert http.get("/_sim/faults").json()["submit_429"] == 1.0
        secret = http.get("/api/v3/webhook/secret").json()["data"]["secret"]
        assert secret == "whsec_cli"
        refused = http.post(f"/api/v3/{MODEL_ID}", json={"image": "http://x/a.png", "prompt": "p"})
        assert refused.status_code == 429
        assert (
            http.get("/api/v3/balance", headers={"Authorization": "Bearer sim-key"}).status_code
            == 401
        )


def test_bad_flags_exit_with_status_2() -> None:
    argv = _cli("--port", "0", "--faults", '{"no_such_knob": 1}')
    finished = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    assert finished.returncode == 2
    assert b"invalid simulator settings" in finished.stderr
