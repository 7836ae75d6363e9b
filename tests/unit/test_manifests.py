"""`kling batch`'s manifest reading, and the figures its progress bar and report show."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api import manifests
from api.cli import app
from sandbox.processes import free_port


def test_a_csv_line_becomes_the_create_a_json_line_would(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text(
        "image,prompt,guidance_scale,duration,metadata,negative_prompt\n"
        'a.png,pan left,0.7,10,"{""shoot"": ""42""}",\n'
        "\n"
        "https://example.com/b.png,tilt up,,,,blur\n"
    )
    lines, _ = manifests.read(csv)
    assert [(line.number, line.fields) for line in lines] == [
        (2, {"image": "a.png", "prompt": "pan left", "guidance_scale": 0.7, "duration": 10,
             "metadata": {"shoot": "42"}}),
        (4, {"image": "https://example.com/b.png", "prompt": "tilt up", "negative_prompt": "blur"}),
    ]  # fmt: skip
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps(lines[0].fields) + "\n")
    assert manifests.read(jsonl)[0][0].fields == lines[0].fields


@pytest.mark.parametrize(
    ("name", "body", "says"),
    [
        ("m.csv", b"image,duration\na.png,five\n", "line 2, column duration"),
        ("m.csv", b"image,prompt\na.png,p,extra\n", "line 2 has more cells"),
        ("m.csv", b'image,metadata\na.png,{"a":\n', "line 2, column metadata"),
        ("m.jsonl", b'{"image": "a.png"}\n[1]\n', "line 2 is not a JSON object"),
        ("m.jsonl", b"\xff\xfe", "not UTF-8"),
    ],
)
def test_a_manifest_that_cannot_be_read_names_its_line(
    tmp_path: Path, name: str, body: bytes, says: str
) -> None:
    path = tmp_path / name
    path.write_bytes(body)
    with pytest.raises(manifests.ManifestError, match=says):
        manifests.read(path)


def test_the_tally_counts_each_line_once_and_spend_only_where_charged(tmp_path: Path) -> None:
    lines = [manifests.Line(n, {}) for n in range(1, 8)]
    state = manifests.State(tmp_path / "s.json", "x")
    state.items = {
        "1": {"job_id": "a", "status": "queued"},
        "2": {"job_id": "b", "status": "storing", "cost_usd": "0.45", "charged": "unknown"},
        "3": {"job_id": "c", "status": "completed", "cost_usd": "0.45", "charged": "true"},
        "4": {"job_id": "d", "status": "failed", "cost_usd": "0.45", "charged": "false"},
        "5": {"problem": {"code": "validation_error"}},
        "6": {"job_id": "f", "status": "expired"},
    }
    now = manifests.tally(lines, state)
    assert (now.queued, now.processing, now.completed, now.failed) == (1, 1, 1, 3)
    assert (now.ended, now.spent) == (4, Decimal("0.90"))

    report = tmp_path / "r.jsonl"
    manifests.write_report(lines, state, report)
    rows = [json.loads(row) for row in report.read_text().splitlines()]
    assert [row["status"] for row in rows] == [
        "queued", "storing", "completed", "failed", "refused", "expired", "not_sent",
    ]  # fmt: skip
    assert rows[4]["error"] == "validation_error"


def test_a_run_stopped_in_its_first_call_keeps_its_keys_for_the_next(tmp_path: Path) -> None:
    # URLs only, so nothing is uploaded: the first thing sent is the batch create, and an
    # API that never answers stops the run there.
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "https://example.com/a.png", "prompt": "p"}) + "\n")
    closed = f"http://127.0.0.1:{free_port()}"
    runs = []
    for _ in range(2):
        result = CliRunner().invoke(
            app, ["batch", str(manifest), "--api-url", closed, "--api-key", "k"]
        )
        assert result.exit_code == 1 and "Traceback" not in result.output
        runs.append(json.loads((tmp_path / "m.jsonl.state.json").read_text())["run"])
    assert runs[0] == runs[1]
