"""schemathesis against our own OpenAPI document: no generated input makes the API answer
5xx, and every answer has a documented status, content type and schema.

It runs schemathesis' own runner (`st run`) against the stack's API: its coverage, fuzzing and
stateful phases are what find the edge cases (NUL bytes, broken multipart, surrogates)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    ]
)


@pytest.mark.timeout(600)
def test_no_input_breaks_the_api(stack_info: dict[str, Any]) -> None:
    st = Path(sys.executable).with_name("st")
    run = subprocess.run(
        [str(st), "run", f"{stack_info['api_url']}/openapi.json",
         "-H", f"Authorization: Bearer {stack_info['api_key']}",
         "-c", CHECKS, "-n", "30", "--seed", "1", "--request-timeout", "30", "--no-color"],
        capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:]
    assert "passed" in run.stdout
