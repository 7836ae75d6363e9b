"""The operators' console in a real browser (Debian's Chromium, driven by Playwright) against
the embedded stack: sign in, find a failed job by its error code, replay its callback, watch
a video load, cancel a queued job; a tenant's key opens nothing. Each page is saved as a
screenshot under out/console/."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import func, update

from config.settings import settings_from
from sandbox.receiver import Receiver, serve
from sandbox.stack import Stack
from tests.support import SimulatorAdmin, wait_for
from workers import operators, tenants
from workers.db import make_engine, make_session_factory, unit_of_work
from workers.models import Job
from workers.sealing import Sealer

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "out" / "console"
PROMPT = "slow push-in, hair moving in the wind"


@dataclass
class Producer:
    tenant_id: str
    token: str
    api: httpx.Client
    upload_id: str

    def create(self, **body: Any) -> dict[str, Any]:
        answer = self.api.post(
            "/v1/generations", json={"upload_id": self.upload_id, "prompt": PROMPT, **body}
        )
        assert answer.status_code == 201, answer.text
        return dict(answer.json())

    def wait(self, job_id: str, *statuses: str) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.api.get(f"/v1/generations/{job_id}").json()
            return job if job["status"] in statuses else None

        return dict(wait_for(reached, timeout=90, interval=0.3))


@pytest.fixture(scope="module")
def sessions(stack: Stack) -> Iterator[Any]:
    engine = make_engine(stack.env["DATABASE_URL"], pool_size=2)
    yield make_session_factory(engine)
    engine.dispose()


def new_producer(stack: Stack, sessions: Any, portrait: bytes, **quotas: int) -> Producer:
    sealer = Sealer.from_settings(settings_from(stack.env))
    with unit_of_work(sessions) as session:
        tenant = tenants.create_tenant(session, f"c-{uuid.uuid4().hex[:10]}", sealer)
        tenants.update_quotas(session, tenant, dict(quotas))
        _, token = tenants.create_key(session, tenant)
    api = httpx.Client(
        base_url=stack.info["api_url"], headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    upload = api.post("/v1/uploads", files={"file": ("p.png", portrait, "image/png")})
    assert upload.status_code == 201, upload.text
    return Producer(tenant.id, token, api, upload.json()["upload_id"])


@dataclass
class Jobs:
    """The jobs the tests look at, made once for the module."""

    failed: dict[str, Any]
    completed: dict[str, Any]
    queued: dict[str, Any]
    receiver: Receiver
    gone: Receiver  # answers 410: its URL is disabled
    producer: Producer  # of the failed jobs
    holder: Producer  # of the completed and the queued job


@pytest.fixture(scope="module")
def jobs(stack: Stack, sessions: Any, portrait: bytes) -> Iterator[Jobs]:
    simulator = SimulatorAdmin(stack.env["WAVESPEED_BASE_URL"])
    failing = new_producer(stack, sessions, portrait)
    # One submit a minute: its second job waits in the queue while the first completes.
    slow = new_producer(stack, sessions, portrait, submits_per_minute=1)
    with serve(Receiver()) as receiver, serve(Receiver(lambda _: 410)) as gone:
        try:
            simulator.set_faults(task_fail={1403: 1.0})
            failed = failing.create(webhook_url=receiver.url, metadata={"campaign": "spring"})
            told_gone = failing.create(webhook_url=gone.url)
            failed = failing.wait(failed["id"], "failed")
            failing.wait(told_gone["id"], "failed")
        finally:
            simulator.reset_faults()
            simulator.close()
        completed = slow.create()
        slow.wait(completed["id"], "submitting", "processing", "storing", "completed")
        queued = slow.create(prompt="waits for the gate")
        assert slow.api.get(f"/v1/generations/{queued['id']}").json()["status"] == "queued"
        completed = slow.wait(completed["id"], "completed")
        yield Jobs(failed, completed, queued, receiver, gone, failing, slow)
    failing.api.close()
    slow.api.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make .browser` installs Debian's chromium")
    with sync_playwright() as playwright:
        # The sandbox needs user namespaces, which a root CI container does not give.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def operator_token(sessions: Any) -> str:
    with unit_of_work(sessions) as session:
        _, token = operators.create(session, f"op-{uuid.uuid4().hex[:8]}")
    return token


@pytest.fixture(scope="module")
def page(browser: Browser, stack: Stack, operator_token: str) -> Iterator[Page]:
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    context = browser.new_context(
        base_url=stack.info["api_url"], viewport={"width": 1280, "height": 900}
    )
    signed_in = context.new_page()
    signed_in.set_default_timeout(30_000)
    signed_in.goto("/console")
    expect(signed_in).to_have_url(f"{stack.info['api_url']}/console/login")
    signed_in.get_by_label("Operator token").fill(operator_token)
    signed_in.get_by_role("button", name="Sign in").click()
    expect(signed_in.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    yield signed_in
    context.close()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_a_tenant_key_never_opens_the_console(
    stack: Stack, browser: Browser, jobs: Jobs, page: Page
) -> None:
    base = stack.info["api_url"]
    bearer = {"Authorization": f"Bearer {jobs.producer.token}"}
    with httpx.Client(base_url=base, timeout=30) as http:
        assert http.get("/console", headers=bearer).status_code == 303
        assert http.get("/console/jobs", headers=bearer).headers["location"] == "/console/login"
        refused = http.post("/console/login", data={"token": jobs.producer.token})
        assert refused.status_code == 401 and "set-cookie" not in refused.headers
        # An action without a session does nothing, whatever key comes with it.
        cancel = http.post(
            f"/console/jobs/{jobs.queued['id']}/cancel", headers=bearer, data={"csrf": "x"}
        )
        assert cancel.status_code == 401
    context = browser.new_context(base_url=base)
    other = context.new_page()
    other.goto("/console/login")
    other.get_by_label("Operator token").fill(jobs.producer.token)
    other.get_by_role("button", name="Sign in").click()
    expect(other.get_by_role("alert")).to_contain_text("Tenant API keys do not open")
    shot(other, "login")
    context.close()
    shot(page, "overview")


def test_the_session_cookie_is_httponly_and_strict(page: Page) -> None:
    cookie = next(c for c in page.context.cookies() if c["name"] == "kling_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"


def test_a_failed_job_is_found_by_its_error_code_and_its_callback_replayed(
    page: Page, jobs: Jobs
) -> None:
    code = jobs.failed["error"]["code"]
    page.goto("/console/failures")
    expect(page.get_by_role("link", name=code)).to_be_visible()
    shot(page, "failures")
    page.get_by_role("link", name="Jobs", exact=True).click()
    page.get_by_label("Error code").fill(code)
    page.get_by_label("Tenant").fill(jobs.producer.tenant_id)
    page.get_by_label("Metadata").fill("campaign:spring")
    page.get_by_label("Status").select_option("failed")
    page.get_by_role("button", name="Filter").click()
    link = page.locator(f"a[href='/console/jobs/{jobs.failed['id']}']")
    expect(link).to_have_count(1)
    shot(page, "jobs")
    link.click()
    expect(page.get_by_text(code).first).to_be_visible()
    # The failed event's callback reached the receiver once; a replay makes a second attempt.
    delivery = page.locator("#callbacks .card", has_text="generation.failed")
    attempts = delivery.locator("tr.attempt")
    expect(attempts).to_have_count(1)
    before = len(jobs.receiver.received)
    delivery.get_by_role("button", name="Replay this callback").click()
    expect(
        page.locator("#callbacks .card", has_text="generation.failed").locator("tr.attempt")
    ).to_have_count(2)
    assert len(jobs.receiver.received) > before
    shot(page, "job-failed")


def test_a_completed_job_plays_its_video(page: Page, jobs: Jobs) -> None:
    page.goto(f"/console/jobs/{jobs.completed['id']}")
    video = page.locator("video#video")
    expect(video).to_be_visible()
    # HAVE_METADATA or more: the browser fetched the MP4 from S3 and understood it.
    page.wait_for_function("document.querySelector('video#video').readyState >= 1")
    assert page.evaluate("document.querySelector('video#video').duration") > 4
    expect(page.get_by_role("img", name="The job's input image")).to_be_visible()
    expect(page.get_by_text(jobs.completed["prediction_id"], exact=True)).to_be_visible()
    shot(page, "job")


def test_a_queued_job_is_cancelled_and_the_action_audited(page: Page, jobs: Jobs) -> None:
    page.goto(f"/console/jobs/{jobs.queued['id']}")
    expect(page.locator(".state").first).to_have_text("queued")
    page.get_by_role("button", name="Cancel job").click()
    expect(page.get_by_role("status")).to_have_text("The job is cancelled.")
    expect(page.locator(".state").first).to_have_text("cancelled")
    assert jobs.holder.api.get(f"/v1/generations/{jobs.queued['id']}").json()["status"] == (
        "cancelled"
    )
    page.get_by_role("link", name="Audit log").click()
    expect(page.get_by_text("job.cancel")).to_be_visible()
    expect(page.get_by_text("callback.replay")).to_be_visible()
    shot(page, "audit")
    page.get_by_role("link", name="Tenants", exact=True).click()
    shot(page, "tenants")


def test_a_callback_url_disabled_by_a_410_is_re_enabled(page: Page, jobs: Jobs) -> None:
    tenant = f"/console/tenants/{jobs.producer.tenant_id}"
    wait_for(lambda: jobs.gone.received, timeout=30)

    def row_of(url: str) -> Any:
        return page.get_by_role("row").filter(has_text=url)

    def disabled() -> bool:
        page.goto(tenant)  # the worker records the 410 a moment after the receiver answers it
        return "disabled" in (row_of(jobs.gone.url).inner_text() or "")

    wait_for(disabled, timeout=30, interval=0.5)
    expect(row_of(jobs.receiver.url)).to_contain_text("healthy")
    shot(page, "tenant")
    row_of(jobs.gone.url).get_by_role("button", name="Re-enable").click()
    expect(page.get_by_role("status")).to_have_text("The callback URL takes deliveries again.")

    def enabled() -> bool:
        page.goto(tenant)  # a worker runs the tenant's bulk action
        return "disabled" not in row_of(jobs.gone.url).inner_text()

    wait_for(enabled, timeout=30, interval=0.5)


def test_a_forged_action_without_the_csrf_token_is_refused(page: Page, jobs: Jobs) -> None:
    answer = page.request.post(
        f"/console/jobs/{jobs.completed['id']}/restore", form={"csrf": "forged"}
    )
    assert answer.status == 403


def test_a_narrow_window_and_a_keyboard_are_enough(page: Page, jobs: Jobs) -> None:
    page.set_viewport_size({"width": 375, "height": 800})
    try:
        for path in ("/console", "/console/jobs", f"/console/jobs/{jobs.failed['id']}"):
            page.goto(path)
            # Wide tables scroll inside their own box; the page itself never does.
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path
        shot(page, "job-narrow")
        page.goto("/console/jobs")
        page.keyboard.press("Tab")
        expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
        page.keyboard.press("Tab")
        expect(page.get_by_role("link", name="Overview")).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    finally:
        page.set_viewport_size({"width": 1280, "height": 900})


def test_a_retry_sent_twice_from_the_same_form_makes_one_job(page: Page, jobs: Jobs) -> None:
    page.goto(f"/console/jobs/{jobs.failed['id']}")
    form = page.locator(f"form[action='/console/jobs/{jobs.failed['id']}/retry']")
    fields = {name: form.locator(f"input[name={name}]").input_value() for name in ("csrf", "nonce")}
    sent = [
        page.request.post(form.get_attribute("action") or "", form=fields, max_redirects=0)
        for _ in range(2)
    ]
    assert [answer.status for answer in sent] == [303, 303]
    first, again = (answer.headers["location"] for answer in sent)
    assert first == again and first.endswith("?done=retried")
    new_id = first.split("/")[-1].split("?")[0]
    made = jobs.producer.api.get(f"/v1/generations/{new_id}").json()
    assert made["retry_of"] == jobs.failed["id"]
    page.goto(first)
    expect(page.get_by_role("status")).to_have_text("A new job was made with the same inputs.")


def test_a_failed_store_is_restored(page: Page, jobs: Jobs, sessions: Any, stack: Stack) -> None:
    simulator = SimulatorAdmin(stack.env["WAVESPEED_BASE_URL"])
    try:
        simulator.set_faults(output_truncate=1.0)  # the CDN cuts every download short
        job = jobs.producer.create()
        jobs.producer.wait(job["id"], "storing")
        with unit_of_work(sessions) as session:  # its deadline passes while it keeps failing
            session.execute(
                update(Job)
                .where(Job.id == uuid.UUID(job["id"]))
                .values(store_deadline_at=func.now())
            )
        failed = jobs.producer.wait(job["id"], "failed")
        assert failed["error"]["code"] == "storage_failed"
    finally:
        simulator.reset_faults()
        simulator.close()
    page.goto(f"/console/jobs/{job['id']}")
    page.get_by_role("button", name="Restore the failed store").click()
    expect(page.get_by_role("status")).to_have_text("The store is restarted.")
    assert jobs.producer.wait(job["id"], "completed")["video"]
