"""Naming an input image uploaded to WaveSpeed, so that a history lookup finds its attempt."""

from __future__ import annotations

import uuid

import pytest

from workers.models import Job
from workers.pipeline import history_markers, hosted_name, named_url

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


def test_an_s3_url_still_matches_its_attempt_whatever_hosting_is_set_now() -> None:
    job = a_job()
    url = f"https://s3.test/bucket/inputs/{job.id}/attempt-2.png?X-Amz-Signature=abc"
    assert [m for m in (1, 2, 3) if any(k in url for k in history_markers(job, m))] == [2]
