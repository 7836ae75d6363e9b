"""The `kling` CLI for producers, against the running stack found through KLING_API_URL and
KLING_API_KEY alone (no stack.json where it runs)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from api.cli import app
from tests.support import SimulatorAdmin, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PORTRAIT = ROOT / "examples" / "portrait.png"


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory with no embedded stack's stack.json in it."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture
def env(stack_info: dict[str, Any], elsewhere: Path) -> dict[str, str]:
    return {"KLING_API_URL": stack_info["api_url"], "KLING_API_KEY": stack_info["api_key"]}


def kling(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output + result.stderr
    return result


def one_error_line(result: Result) -> str:
    """The single line a refused command prints, after checking that it failed."""
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_producer_generates_follows_and_fetches_a_video(env: dict[str, str]) -> None:
    tag = uuid.uuid4().hex[:8]
    made = ok(kling(env, "generate", str(PORTRAIT), "--prompt", "slow push-in",
                    "--metadata", f"suite:{tag}", "--wait", "--out", "first.mp4"))  # fmt: skip
    job = json.loads(made.stdout)
    assert job["status"] == "completed" and job["metadata"] == {"suite": tag}
    assert f"accepted {job['id']}" in made.stderr and "completed" in made.stderr
    assert Path("first.mp4").stat().st_size == job["video"]["bytes"]

    assert json.loads(ok(kling(env, "status", job["id"])).stdout)["status"] == "completed"
    ok(kling(env, "download", job["id"], "--out", "again/clip.mp4"))
    assert Path("again/clip.mp4").read_bytes() == Path("first.mp4").read_bytes()

    table = ok(kling(env, "list", "--metadata", f"suite:{tag}")).stdout
    assert job["id"] in table and "completed" in table and "slow push-in" in table
    listed = json.loads(ok(kling(env, "list", "--status", "completed", "--json",
                                 "--metadata", f"suite:{tag}")).stdout)  # fmt: skip
    assert [g["id"] for g in listed["data"]] == [job["id"]]
    assert not json.loads(ok(kling(env, "list", "--status", "failed", "--json",
                                   "--metadata", f"suite:{tag}")).stdout)["data"]  # fmt: skip

    history = ok(kling(env, "events", job["id"])).stdout
    assert "storing" in history and "completed" in history
    followed = ok(kling(env, "events", job["id"], "--follow")).stdout.splitlines()
    assert "storing -> completed" in followed[-1]

    again = json.loads(ok(kling(env, "retry", job["id"])).stdout)
    assert again["retry_of"] == job["id"]
    cancelled = json.loads(ok(kling(env, "cancel", again["id"])).stdout)
    assert cancelled["id"] == again["id"]
    waited = kling(env, "wait", again["id"], "--timeout", "120")
    ended = json.loads(waited.stdout)["status"]
    # Cancelled at once, or it finished first: the exit code says which.
    assert (ended, waited.exit_code) in (("cancelled", 1), ("completed", 0))


def test_refusals_are_one_line_with_the_problems_code(
    env: dict[str, str], stack_info: dict[str, Any]
) -> None:
    missing = str(uuid.uuid4())
    line = one_error_line(kling(env, "status", missing))
    assert line.startswith("error: 404 not_found:")
    line = one_error_line(kling(env, "list", "--status", "bogus"))
    assert line.startswith("error: 422 validation_error: status")
    line = one_error_line(kling(env, "generate", "http://169.254.169.254/x.png", "--prompt", "p"))
    assert line.startswith("error: 422 url_not_allowed: image_url")
    stranger = {**env, "KLING_API_KEY": "kl_not-a-key"}
    assert one_error_line(kling(stranger, "list")).startswith("error: 401 unauthorized:")
    line = one_error_line(kling(env, "generate", "no-such.png", "--prompt", "p"))
    assert line.startswith("error: FileNotFoundError")


def test_without_an_api_or_a_stack_it_says_what_to_set(elsewhere: Path) -> None:
    unset = {"KLING_API_URL": "", "KLING_API_KEY": ""}
    line = one_error_line(kling(unset, "list"))
    assert "KLING_API_URL" in line and "kling stack up" in line
    no_key = one_error_line(kling({**unset, "KLING_API_URL": "http://127.0.0.1:9"}, "list"))
    assert "KLING_API_KEY" in no_key


def test_the_installed_command_prints_one_line_and_exits_non_zero(
    env: dict[str, str], elsewhere: Path
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "api.cli", "cancel", str(uuid.uuid4())],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, cwd=elsewhere,
    )  # fmt: skip
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: 404 not_found:")


def test_a_manifest_runs_again_where_it_stopped_and_makes_nothing_twice(
    env: dict[str, str], elsewhere: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    shutil.copy(PORTRAIT, elsewhere / "portrait.png")
    lines = [
        {"image": str(PORTRAIT), "prompt": "pan left", "metadata": {"suite": tag}},
        {"image": "portrait.png", "prompt": "tilt up", "metadata": {"suite": tag},
         "out": "videos/two.mp4"},
        {"image": "portrait.png", "prompt": "", "metadata": {"suite": tag}},
    ]  # fmt: skip
    manifest = elsewhere / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    first = kling(env, "batch", str(manifest))
    assert first.exit_code == 1 and "refused: validation_error" in first.stdout
    state_file = elsewhere / "m.jsonl.state.json"
    state = json.loads(state_file.read_text())
    made = {n: state["items"][n]["job_id"] for n in ("1", "2")}
    assert state["items"]["3"]["problem"]["code"] == "validation_error"

    # As if stopped after line 2's create was sent, before its answer was recorded.
    del state["items"]["2"]["job_id"], state["items"]["2"]["status"]
    state_file.write_text(json.dumps(state))
    second = kling(env, "batch", str(manifest), "--out-dir", "vids")
    assert second.exit_code == 1, second.output  # line 3 stays refused
    state = json.loads(state_file.read_text())
    assert {n: state["items"][n]["job_id"] for n in ("1", "2")} == made
    assert [state["items"][n]["status"] for n in ("1", "2")] == ["completed", "completed"]
    assert (elsewhere / "vids" / "line-1.mp4").stat().st_size > 0
    assert (elsewhere / "videos" / "two.mp4").stat().st_size > 0
    listed = json.loads(ok(kling(env, "list", "--json", "--metadata", f"suite:{tag}")).stdout)
    assert sorted(g["id"] for g in listed["data"]) == sorted(made.values())

    third = kling(env, "batch", str(manifest), "--out-dir", "vids")
    assert third.exit_code == 1 and "wrote" not in third.stderr and "uploaded" not in third.stderr

    manifest.write_text(manifest.read_text().replace("pan left", "pan right"))
    assert "manifest changed" in one_error_line(kling(env, "batch", str(manifest)))


@pytest.fixture
def quick_clips(simulator: SimulatorAdmin) -> Iterator[None]:
    """Placeholder clips in half a second: what is tested is the CLI, and 200 real renders
    would cost the simulator minutes of CPU."""
    with simulator.configured(render_mode="placeholder", inference_seconds=0.5):
        yield


@pytest.mark.usefixtures("quick_clips")
def test_two_hundred_lines_killed_halfway_resume_and_make_each_job_once(
    env: dict[str, str], elsewhere: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    shutil.copy(PORTRAIT, elsewhere / "portrait.png")
    manifest = elsewhere / "m.csv"
    with manifest.open("w", newline="") as out:
        rows = csv.writer(out)
        rows.writerow(["image", "prompt", "duration", "metadata"])
        for n in range(1, 201):
            rows.writerow(
                ["portrait.png", f"shot {n}", "5", json.dumps({"suite": tag, "n": str(n)})]
            )
    state_file = elsewhere / "m.csv.state.json"
    command = [sys.executable, "-m", "api.cli", "batch", "m.csv", "--out", "vids"]
    run_env = {**os.environ, **env}

    first = subprocess.Popen(
        [*command, "--concurrency", "8"], env=run_env, cwd=elsewhere,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: len(created(state_file)) >= 100, timeout=120, interval=0.05)
    finally:
        first.kill()
        first.wait(timeout=30)
    at_kill = json.loads(state_file.read_text())["items"]
    assert first.returncode == -signal.SIGKILL
    assert sum("written" in item for item in at_kill.values()) < 200

    second = subprocess.run(
        command, env=run_env, cwd=elsewhere, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stdout + second.stderr

    # Every line made exactly one job: what the API holds for this run, line by line.
    listed = json.loads(
        ok(kling(env, "list", "--json", "--limit", "100", "--metadata", f"suite:{tag}")).stdout
    )
    jobs = list(iterate_all(env, tag, listed))
    assert sorted(int(job["metadata"]["n"]) for job in jobs) == list(range(1, 201))
    assert {job["id"] for job in jobs} == set(created(state_file).values())
    assert all(job["status"] == "completed" for job in jobs)
    videos = sorted((elsewhere / "vids").iterdir())
    assert len(videos) == 200 and all(v.stat().st_size > 0 for v in videos)

    report = [
        json.loads(row) for row in (elsewhere / "m.csv.report.jsonl").read_text().splitlines()
    ]
    assert [r["line"] for r in report] == list(range(2, 202))  # the header is line 1
    assert {r["status"] for r in report} == {"completed"}
    spent = sum(Decimal(str(r["cost_usd"])) for r in report if r["charged"] == "true")
    assert f"spent ${spent}" in second.stderr


def created(state_file: Path) -> dict[str, str]:
    """Line -> job id, as the state file records them (nothing before it exists)."""
    if not state_file.exists():
        return {}
    items = json.loads(state_file.read_text())["items"]
    return {line: item["job_id"] for line, item in items.items() if "job_id" in item}


def iterate_all(env: dict[str, str], tag: str, page: dict[str, Any]) -> Iterator[dict[str, Any]]:
    while True:
        yield from page["data"]
        if not page["next_cursor"]:
            return
        args = ["list", "--json", "--limit", "100", "--metadata", f"suite:{tag}"]
        page = json.loads(ok(kling(env, *args, "--cursor", page["next_cursor"])).stdout)
