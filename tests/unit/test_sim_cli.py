"""The simulator's command line: every flag lands in the config, bad values are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from sandbox.wavespeed.__main__ import build_parser, config_from_args, main
from sandbox.wavespeed.config import DEFAULT_API_KEY, DEFAULT_WEBHOOK_SECRET, SimulatorConfig


def _config(*argv: str) -> SimulatorConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_defaults() -> None:
    config = _config()
    assert (config.host, config.port) == ("127.0.0.1", 8090)
    assert (config.api_key, config.webhook_secret) == (DEFAULT_API_KEY, DEFAULT_WEBHOOK_SECRET)
    assert config.webhook_secret.startswith("whsec_")
    assert (config.inference_seconds, config.render_mode) == (2.0, "real")
    assert config.resolution == (480, 270)
    assert config.refund_delay_seconds == 5.0
    assert config.faults.submit_429 == 0.0


def test_every_flag(tmp_path: Path) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"task_fail": {"5003": 0.2}, "seed": 9}))
    config = _config(
        "--port", "9001", "--host", "localhost", "--api-key", "k", "--webhook-secret", "whsec_s",
        "--inference-seconds", "0.5", "--render-mode", "placeholder", "--resolution", "1920x1080",
        "--refund-delay-seconds", "0", "--sync-timeout-seconds", "3", "--render-workers", "4",
        "--faults", f"@{faults}",
    )  # fmt: skip
    assert (config.port, config.host, config.api_key, config.webhook_secret) == (
        9001,
        "localhost",
        "k",
        "whsec_s",
    )
    assert (config.inference_seconds, config.render_mode, config.resolution) == (
        0.5,
        "placeholder",
        (1920, 1080),
    )
    assert (config.refund_delay_seconds, config.sync_timeout_seconds) == (0.0, 3.0)
    assert config.render_workers == 4
    assert (config.faults.task_fail, config.faults.seed) == ({5003: 0.2}, 9)


def test_inline_faults_json() -> None:
    assert _config("--faults", '{"submit_500": 0.1}').faults.submit_500 == 0.1


@pytest.mark.parametrize(
    "argv",
    [
        ["--resolution", "333x180"],
        ["--resolution", "wide"],
        ["--faults", '{"no_such_knob": 1}'],
        ["--faults", "[1, 2]"],
        ["--webhook-secret", "not-prefixed"],
        ["--inference-seconds", "-1"],
    ],
)
def test_bad_values_are_refused(argv: list[str]) -> None:
    with pytest.raises((ValidationError, ValueError)):
        _config(*argv)


def test_main_exits_2_on_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--resolution", "15x15"]) == 2
    assert "invalid simulator settings" in capsys.readouterr().err
