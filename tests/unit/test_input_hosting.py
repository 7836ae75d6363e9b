"""Naming an input image uploaded to WaveSpeed, so that a history lookup finds its attempt."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from api.cli import DEMO_REAL_HINT
from config.settings import settings_from
from sandbox.stack import Stack, real_wavespeed_env
from workers.models import Job
from workers.pipeline import history_markers, hosted_name, named_url, webhook_for

# How WaveSpeed's CDN names an upload: the account, the kind, the time and 8 random letters.
CDN = "https://d1q70pf5vjeyhc.cloudfront.net/media/92d2d4ca66f84793adcb20742b15d262/images"


def a_job() -> Job:
    job_id = uuid.uuid4()
    return Job(id=job_id, input_key=f"inputs/{job_id}.png")


def test_the_uploaded_name_is_the_job_and_the_attempt() -> None:
    job = a_job()
    assert hosted_name(job, 3) == f"{job.id}-3.png"


def test_a_url_that_does_not_keep_the_name_carries_it_in_a_fragment() -> None:
    url = f"{CDN}/1764761316371833793_r5ZX531Z.png"
    assert named_url(url, "j-1.png") == f"{url}#/j-1.png"
    # A fragment of its own is replaced: a fetch never sends it anyway.
    assert named_url(f"{url}#x", "j-1.png") == f"{url}#/j-1.png"


def test_a_url_that_keeps_the_name_is_left_alone() -> None:
    url = "https://cdn.example/media/abc/j-1.png?sig=1"
    assert named_url(url, "j-1.png") == url


@pytest.mark.parametrize("keeps_name", [True, False])
def test_each_attempts_uploaded_url_matches_its_own_markers_only(keeps_name: bool) -> None:
    job, other = a_job(), a_job()
    # 1 and 10 share a prefix: the marker must not take one for the other.
    attempts = (1, 2, 10)
    for n in attempts:
        name = hosted_name(job, n)
        stored = f"{CDN}/{name}" if keeps_name else f"{CDN}/1764761316371833793_r5ZX531Z.png"
        url = named_url(stored, name)
        found = [m for m in attempts if any(k in url for k in history_markers(job, m))]
        assert found == [n]
        assert not any(k in url for k in history_markers(other, n))


def test_the_recorded_upload_url_finds_only_the_current_attempt_even_without_its_name() -> None:
    """WaveSpeed may keep a prediction's image URL without the fragment that names it."""
    job = a_job()
    stored = f"{CDN}/1764761316371833793_r5ZX531Z.png"
    job.hosted_input_url, job.submit_attempts = stored, 2
    assert [m for m in (1, 2, 3) if any(k in stored for k in history_markers(job, m))] == [2]
    other = a_job()
    other.hosted_input_url, other.submit_attempts = f"{CDN}/1764761316371833793_Q0aLk2Tt.png", 2
    assert not any(k in stored for k in history_markers(other, 2))


def test_an_s3_url_still_matches_its_attempt_whatever_hosting_is_set_now() -> None:
    job = a_job()
    url = f"https://s3.test/bucket/inputs/{job.id}/attempt-2.png?X-Amz-Signature=abc"
    assert [m for m in (1, 2, 3) if any(k in url for k in history_markers(job, m))] == [2]


# Every other service given, so that deciding WaveSpeed's starts nothing.
SERVICES = {
    "DATABASE_URL": "postgresql+psycopg://u@db:5432/kling",
    "REDIS_URL": "redis://cache:6379/0",
    "S3_ENDPOINT_URL": "http://s3:9000",
    "SECRET_KEYS": "[]",
}


def test_a_real_key_alone_sends_the_stack_to_wavespeed_with_inputs_uploaded_there(
    tmp_path: Path,
) -> None:
    stack = Stack(
        tmp_path, environ={**SERVICES, "WAVESPEED_API_KEY": "ws-real"}, real_wavespeed=True
    )
    env = stack._service_env()
    assert stack.simulator is None and stack.services == []
    settings = settings_from(env)
    assert settings.wavespeed_base_url == "https://api.wavespeed.ai"
    assert settings.wavespeed_api_key.get_secret_value() == "ws-real"
    assert settings.input_hosting == "wavespeed"
    # The simulator's pace is not the real service's: its tier and timeouts apply.
    assert settings.max_in_flight == 2 and settings.submit_time_limit_seconds == 90
    assert settings.poll_first_delay_seconds == {5: 90.0, 10: 180.0}


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WAVESPEED_API_KEY": "ws-real"}, "https://api.wavespeed.ai wavespeed"),
        ({"WAVESPEED_API_KEY": "ws-real", "INPUT_HOSTING": "s3"}, "https://api.wavespeed.ai s3"),
        ({"WAVESPEED_API_KEY": "ws-real", "WAVESPEED_BASE_URL": "http://sim:1"}, None),
        ({"WAVESPEED_API_KEY": "sim-key"}, None),
        ({"WAVESPEED_API_KEY": ""}, None),
        ({}, None),
    ],
)
def test_only_a_real_key_without_a_base_url_chooses_the_real_service(
    environ: dict[str, str], expected: str | None
) -> None:
    real = real_wavespeed_env(environ)
    if expected is None:
        assert real is None
        return
    assert real is not None
    env = {**real, **environ}  # as the stack layers them: what is set wins
    assert f"{env['WAVESPEED_BASE_URL']} {env['INPUT_HOSTING']}" == expected


def test_the_demo_ends_with_how_to_run_it_against_the_real_service() -> None:
    assert DEMO_REAL_HINT == (
        "against the real WaveSpeed: WAVESPEED_API_KEY=<your key> INPUT_HOSTING=wavespeed make demo"
    )


@pytest.mark.parametrize(
    ("public", "wavespeed", "asked"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8090", True),  # the simulator
        ("http://localhost:8000", "http://[::1]:8090", True),
        ("https://kling.example.com", "https://api.wavespeed.ai", True),  # production
        ("http://127.0.0.1:8000", "https://api.wavespeed.ai", False),  # a laptop, for real
        ("http://localhost:8000", "https://api.wavespeed.ai", False),
    ],
)
def test_a_webhook_is_asked_for_only_where_wavespeed_can_deliver_it(
    public: str, wavespeed: str, asked: bool
) -> None:
    settings = settings_from({"PUBLIC_BASE_URL": public, "WAVESPEED_BASE_URL": wavespeed})
    expected = f"{public}/v1/wavespeed/webhook" if asked else None
    assert webhook_for(settings) == expected
