"""The client package as a producer installs it: a wheel built from `clients/python`, put
in a fresh virtualenv with nothing but its own dependencies, calling the running stack."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SERVER_PACKAGES = ("celery", "sqlalchemy", "boto3", "botocore", "av", "fastapi", "psycopg")

# Run by the fresh virtualenv's Python: the package works there, on its own.
PRODUCER = """
import asyncio, importlib.util, json, pathlib, sys, uuid
import kling_client, kling_client.celery
from kling_client import AsyncClient, Client, NotFound

with Client() as kling:  # KLING_API_URL, KLING_API_KEY
    secret = kling.webhook_secret()["secret"]
    try:
        kling.get(str(uuid.uuid4()))
        missing = None
    except NotFound as exc:
        missing = exc.code

async def listed() -> list:
    async with AsyncClient() as kling:
        return (await kling.list(limit=1))["data"]

print(json.dumps({
    "secret": secret, "listed": asyncio.run(listed()), "missing": missing,
    "typed": (pathlib.Path(kling_client.__file__).parent / "py.typed").exists(),
    "loaded": sorted(m for m in ("celery", "sqlalchemy", "boto3", "av") if m in sys.modules),
    "importable": sorted(
        m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None
    ),
}))
"""


def run(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_wheel_installs_alone_and_calls_the_api(
    tmp_path: Path, stack_info: dict[str, Any]
) -> None:
    # Built from a copy: setuptools leaves build/ and egg-info behind in its source.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT / "clients" / "python", source, ignore=shutil.ignore_patterns("*.egg-info")
    )
    dist, wheels = tmp_path / "dist", tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
        "--wheel-dir", dist, source)  # fmt: skip
    (wheel,) = dist.glob("kling_client-*.whl")
    # Its dependencies' wheels (pip's cache makes this quick after the first run); the
    # install itself then reads nothing but this folder.
    run(sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest",
        wheels, wheel)  # fmt: skip
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    # None of this machine's pip settings (extra indexes, find-links) reach the install.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    clean["PIP_CONFIG_FILE"] = os.devnull
    run(venv / "bin" / "pip", "install", "--quiet", "--no-index", "--find-links", wheels, wheel,
        env=clean)  # fmt: skip

    installed = {
        p["name"].lower()
        for p in json.loads(run(venv / "bin" / "pip", "list", "--format=json", env=clean))
    }
    assert {"kling-client", "httpx", "standardwebhooks"} <= installed
    assert not installed & set(SERVER_PACKAGES)
    env = {**clean, "KLING_API_URL": stack_info["api_url"], "KLING_API_KEY": stack_info["api_key"]}
    found = json.loads(run(venv / "bin" / "python", "-c", PRODUCER, *SERVER_PACKAGES, env=env))
    assert found == {
        "secret": stack_info["webhook_secret"], "listed": found["listed"],
        "missing": "not_found", "typed": True, "loaded": [], "importable": [],
    }  # fmt: skip
    assert isinstance(found["listed"], list)
