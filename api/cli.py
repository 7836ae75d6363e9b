"""`kling`: run the embedded stack, migrate, and generate videos from the command line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from kling_client import Client, Generation, KlingError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from api import manifests
from api.console.commands import announce, operators_app

if TYPE_CHECKING:
    from workers.sealing import Sealer

app = typer.Typer(
    help="Turn images into cinematic videos with Kling v2.1 I2V Pro.", no_args_is_help=True
)
stack_app = typer.Typer(
    help="The embedded stack: every service on this machine.", no_args_is_help=True
)
tenants_app = typer.Typer(help="Producers that use the API.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of tenants.", no_args_is_help=True)
jobs_app = typer.Typer(help="Operator actions on jobs.", no_args_is_help=True)
quarantine_app = typer.Typer(
    help="Tasks put aside: they kept killing their worker, or were resent past the cap.",
    no_args_is_help=True,
)
secrets_app = typer.Typer(
    help="Tenant signing secrets, sealed at rest with SECRET_KEYS.", no_args_is_help=True
)
bulk_app = typer.Typer(
    help="A tenant's bulk actions, run by the workers: cancel, replay, enable.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")
app.add_typer(jobs_app, name="jobs")
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(secrets_app, name="secrets")
app.add_typer(bulk_app, name="bulk")
app.add_typer(operators_app, name="operators")
console = Console(stderr=True)

DEFAULT_ROOT = Path(".stack")
DEMO_IMAGE = Path(__file__).resolve().parent.parent / "examples" / "portrait.png"
DEMO_PROMPT = (
    "Portrait in golden hour. Gentle breeze, subtle facial motion, soft lens flare, "
    "handheld micro-sway, realistic skin texture, 5 seconds."
)
DEMO_REAL_HINT = (
    "against the real WaveSpeed: WAVESPEED_API_KEY=<your key> INPUT_HOSTING=wavespeed make demo"
)

Root = Annotated[Path, typer.Option(help="Where the stack keeps its data, logs and stack.json")]


@app.command()
def migrate() -> None:
    """Bring the database schema to the latest migration and make sure the bucket exists."""
    from config import Settings
    from config.logging import configure_logging
    from workers.migrate import upgrade
    from workers.runtime import build_storage

    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    upgrade(settings.database_url)
    build_storage(settings).ensure_bucket()


def _sessions() -> Any:
    from config import Settings
    from workers.db import make_engine, make_session_factory

    return make_session_factory(make_engine(Settings().database_url, pool_size=1))


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="a-z, 0-9 and '-'")],
    budget: Annotated[float | None, typer.Option(help="Monthly budget in USD")] = None,
    with_key: Annotated[bool, typer.Option(help="Also create an API key")] = True,
) -> None:
    """Create a tenant (and its first API key); prints them as JSON, the key only this once."""
    from decimal import Decimal

    from workers import tenants
    from workers.db import unit_of_work

    sealer = _sealer()
    with unit_of_work(_sessions()) as session:
        try:
            tenant = tenants.create_tenant(
                session,
                name,
                sealer,
                budget_usd=Decimal(str(budget)) if budget is not None else None,
            )
        except tenants.TenantError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from exc
        out: dict[str, Any] = {"tenant_id": tenant.id, "name": tenant.name}
        out["webhook_secret"] = tenants.webhook_secret(tenant, sealer)
        if with_key:
            key, token = tenants.create_key(session, tenant)
            out.update(key_id=str(key.id), api_key=token)
    typer.echo(json.dumps(out, indent=2))


def _limit(value: str | None) -> int | None:
    """A quota as typed: a whole number, or `none` to clear it."""
    if value is None or value.lower() == "none":
        return None
    if not value.isdigit():
        raise typer.BadParameter(f"{value!r} is not a whole number (or none)")
    return int(value)


Limit = Annotated[str | None, typer.Option(help="A whole number, or none for the default")]


@tenants_app.command("update")
def tenants_update(
    tenant: Annotated[str, typer.Argument(help="Tenant name or id")],
    max_in_flight: Limit = None,
    weight: Limit = None,
    submits_per_minute: Limit = None,
    max_queued: Limit = None,
    retain_days: Limit = None,
    budget: Annotated[
        str | None, typer.Option(help="Monthly budget in USD, or none for no budget")
    ] = None,
    nsfw: Annotated[
        str | None,
        typer.Option(help="deliver: outputs WaveSpeed flags are stored as any; reject: fail"),
    ] = None,
    reply_queues: Annotated[
        str | None,
        typer.Option(help="A glob its broker requests' replies must match (myapp.*), or none"),
    ] = None,
) -> None:
    """Set a tenant's quotas: its share of the gate (in flight, per minute, its weight in
    the round-robin), how many jobs it may have queued, how many days its ended jobs are
    kept, its monthly budget, and the queues its broker requests may reply to."""
    from decimal import Decimal, InvalidOperation

    from workers import tenants
    from workers.db import unit_of_work

    given = {
        "max_in_flight": max_in_flight, "weight": weight,
        "submits_per_minute": submits_per_minute, "max_queued": max_queued,
        "retain_days": retain_days,
    }  # fmt: skip
    changes = {name: _limit(value) for name, value in given.items() if value is not None}
    with unit_of_work(_sessions()) as session:
        owner = _tenant(session, tenant)
        try:
            tenants.update_quotas(session, owner, changes)
        except tenants.TenantError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from exc
        if budget is not None:
            try:
                amount = None if budget.lower() == "none" else Decimal(budget)
            except InvalidOperation as exc:
                raise typer.BadParameter(f"{budget!r} is not an amount (or none)") from exc
            if (amount is not None and not amount.is_finite()) or (amount or 0) < 0:
                raise typer.BadParameter("a budget is an amount of 0 or more")
            owner.monthly_budget_usd = amount
        if nsfw is not None:
            if nsfw not in ("deliver", "reject"):
                raise typer.BadParameter("--nsfw is deliver or reject")
            owner.reject_nsfw = nsfw == "reject"
        if reply_queues is not None:
            try:
                tenants.limit_replies(owner, None if reply_queues == "none" else reply_queues)
            except tenants.TenantError as exc:
                raise typer.BadParameter(str(exc)) from exc
        typer.echo(json.dumps(_shown(session, owner), indent=2, default=str))


@tenants_app.command("purge")
def tenants_purge(
    tenant: Annotated[str, typer.Argument(help="Tenant name or id")],
    yes: Annotated[bool, typer.Option("--yes", help="Really remove everything")] = False,
) -> None:
    """Remove everything of a tenant, for account deletion: its videos, inputs and uploads
    in S3, its predictions at WaveSpeed, its jobs, keys and callbacks. Prints what it
    removed. Refused while a job of it still runs (`kling bulk cancel` it first)."""
    from workers import retention

    if not yes:
        console.print("this removes everything of the tenant for good: add --yes")
        raise typer.Exit(2)
    pipeline = _pipeline()
    with pipeline.sessions() as session:
        owner = _tenant(session, tenant)
    try:
        report = retention.purge(pipeline, owner)
    except retention.StillRunning as exc:
        console.print(f"[red]{exc}: cancel them first[/]")
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"tenant_id": owner.id, **vars(report)}, indent=2))


@tenants_app.command("show")
def tenants_show(tenant: Annotated[str, typer.Argument(help="Tenant name or id")]) -> None:
    """A tenant's quotas, each with what the tenant uses of it now."""
    with _sessions()() as session:
        typer.echo(json.dumps(_shown(session, _tenant(session, tenant)), indent=2, default=str))


def _shown(session: Any, tenant: Any) -> dict[str, Any]:
    from config import Settings
    from workers.intake import tenant_usage
    from workers.pipeline import utcnow

    usage = tenant_usage(session, tenant, utcnow(), Settings())
    return {"tenant_id": tenant.id, "name": tenant.name, "quotas": usage}


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Argument(help="Tenant name or id")],
    name: Annotated[str, typer.Option(help="What the key is for")] = "default",
) -> None:
    """Create an API key; the token is printed once and stored only as a hash."""
    from workers import tenants
    from workers.db import unit_of_work

    with unit_of_work(_sessions()) as session:
        key, token = tenants.create_key(session, _tenant(session, tenant), name)
        typer.echo(json.dumps({"key_id": str(key.id), "api_key": token}, indent=2))


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Argument(help="Tenant name or id")] = None,
) -> None:
    """List keys (never their tokens)."""
    from workers import tenants

    with _sessions()() as session:
        owner = _tenant(session, tenant) if tenant else None
        rows = [
            {"key_id": str(k.id), "tenant_id": k.tenant_id, "name": k.name, "prefix": k.prefix,
             "created_at": k.created_at.isoformat(),
             "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None}
            for k in tenants.list_keys(session, owner)
        ]  # fmt: skip
    typer.echo(json.dumps(rows, indent=2))


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id")]) -> None:
    """Revoke a key: requests with it are refused from now on."""
    import uuid

    from workers import tenants
    from workers.db import unit_of_work
    from workers.pipeline import utcnow

    with unit_of_work(_sessions()) as session:
        if not tenants.revoke_key(session, uuid.UUID(key_id), utcnow()):
            console.print("no live key with this id")
            raise typer.Exit(1)
    console.print("revoked")


def _pipeline() -> Any:
    from config import Settings
    from workers.celery_app import create_celery
    from workers.runtime import build_pipeline

    settings = Settings()
    return build_pipeline(settings, create_celery(settings), pool_size=1)


@jobs_app.command("restore")
def jobs_restore(
    job_ids: Annotated[list[str] | None, typer.Argument(help="Jobs to store again")] = None,
    all_failed: Annotated[bool, typer.Option("--all", help="Every job whose store failed")] = False,
) -> None:
    """Store again the paid-for videos of jobs whose store failed (storage_failed, or
    output_expired while WaveSpeed may still keep them), with a fresh deadline."""
    import uuid

    from sqlalchemy import select

    from workers.errors import ErrorCode
    from workers.models import Job

    pipeline = _pipeline()
    ids = [uuid.UUID(j) for j in job_ids or []]
    if all_failed:
        with pipeline.sessions() as session:
            ids += session.scalars(
                select(Job.id).where(
                    Job.status == "failed",
                    Job.error_code.in_([ErrorCode.STORAGE_FAILED, ErrorCode.OUTPUT_EXPIRED]),
                )
            ).all()
    restored = [str(job_id) for job_id in ids if pipeline.restore(job_id)]
    typer.echo(json.dumps({"restored": restored, "not_restorable": len(ids) - len(restored)}))


@quarantine_app.command("list")
def quarantine_list() -> None:
    """What waits for an operator, oldest first."""
    from workers import quarantine

    with _sessions()() as session:
        rows = [
            {"id": q.id, "task": q.task, "subject_id": str(q.subject_id), "reason": q.reason,
             "deliveries": q.deliveries, "at": q.created_at.isoformat()}
            for q in quarantine.active(session)
        ]  # fmt: skip
    typer.echo(json.dumps(rows, indent=2))


@quarantine_app.command("release")
def quarantine_release(entry_id: Annotated[int, typer.Argument(help="Its id in the list")]) -> None:
    """Let a put-aside task run again, and send it now."""
    import redis

    from config import Settings
    from workers import poison, quarantine
    from workers.db import unit_of_work
    from workers.pipeline import utcnow

    pipeline = _pipeline()
    with unit_of_work(pipeline.sessions) as session:
        entry = quarantine.release(session, entry_id, utcnow())
    if entry is None:
        console.print("nothing put aside with this id")
        raise typer.Exit(1)
    redis.Redis.from_url(Settings().redis_url).delete(poison.key(entry.task, str(entry.subject_id)))
    pipeline.dispatch(entry.task, entry.subject_id)
    console.print(f"released; {entry.task} sent for {entry.subject_id}")


Many = Annotated[list[str] | None, typer.Option(help="Repeatable")]
Since = Annotated[str | None, typer.Option(help="RFC 3339 time with its offset")]
MaxItems = Annotated[int, typer.Option(help="At most this many")]
Wait = Annotated[bool, typer.Option(help="Wait for the workers to finish it")]


@bulk_app.command("cancel")
def bulk_cancel(
    tenant: Annotated[str, typer.Argument(help="Tenant name or id")],
    status: Many = None,
    priority: Many = None,
    metadata: Annotated[list[str] | None, typer.Option(help="key:value, repeatable")] = None,
    created_after: Since = None,
    created_before: Since = None,
    max_items: MaxItems = 1000,
    wait: Wait = True,
) -> None:
    """Cancel the tenant's live jobs that match, as POST /v1/generations/cancel does."""
    from api.schemas import BulkCancel
    from workers import bulk

    pairs = [pair.partition(":") for pair in metadata or []]
    body = _bulk_body(
        BulkCancel, status=status or [], priority=priority or [],
        metadata={key: value for key, _, value in pairs}, created_after=created_after,
        created_before=created_before, max_items=max_items,
    )  # fmt: skip
    _run_bulk(tenant, bulk.CANCEL, body.filter(), body.max_items, wait)


@bulk_app.command("replay")
def bulk_replay(
    tenant: Annotated[str, typer.Argument(help="Tenant name or id")],
    status: Many = None,
    event: Many = None,
    created_after: Since = None,
    created_before: Since = None,
    max_items: MaxItems = 1000,
    wait: Wait = True,
) -> None:
    """Send the tenant's matching callbacks again, as POST /v1/webhook-deliveries/replay."""
    from api.schemas import BulkReplay
    from workers import bulk

    body = _bulk_body(
        BulkReplay, status=status or ["exhausted"], event=event or [],
        created_after=created_after, created_before=created_before, max_items=max_items,
    )  # fmt: skip
    _run_bulk(tenant, bulk.REPLAY, body.filter(), body.max_items, wait)


@bulk_app.command("enable")
def bulk_enable(
    tenant: Annotated[str, typer.Argument(help="Tenant name or id")],
    url: Annotated[str, typer.Argument(help="The callback URL that answered 410")],
    wait: Wait = True,
) -> None:
    """Deliver to a URL that answered 410 again, as POST /v1/webhook-endpoints/enable."""
    from api.schemas import EndpointEnable
    from workers import bulk

    body = _bulk_body(EndpointEnable, url=url)
    _run_bulk(tenant, bulk.ENABLE, {"url": str(body.url)}, bulk.MAX_ITEMS, wait)


@bulk_app.command("show")
def bulk_show(action_id: Annotated[str, typer.Argument(help="The action's id")]) -> None:
    """A bulk action and what it matched and did."""
    import uuid

    from api.schemas import BulkActionOut
    from workers import bulk

    with _sessions()() as session:
        action = bulk.get(session, None, uuid.UUID(action_id))
        if action is None:
            console.print("no bulk action with this id")
            raise typer.Exit(1)
        typer.echo(BulkActionOut.of(action).model_dump_json(indent=2))


def _bulk_body(schema: Any, **fields: Any) -> Any:
    """The options checked by the API's own rules, refused as the API would refuse them."""
    from pydantic import ValidationError

    try:
        return schema.model_validate(fields)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            console.print(f"[red]{where}: {error['msg']}[/]")
        raise typer.Exit(2) from exc


def _run_bulk(tenant: str, kind: str, filter_: dict[str, Any], max_items: int, wait: bool) -> None:
    import time

    from api.schemas import BulkActionOut
    from workers import bulk

    pipeline = _pipeline()
    with pipeline.sessions() as session:
        owner = _tenant(session, tenant)
    with pipeline.work() as work:
        action = bulk.create(work, owner.id, kind, filter_, max_items)
    deadline = time.monotonic() + 600
    while wait and action.status == bulk.ActionStatus.PENDING and time.monotonic() < deadline:
        time.sleep(0.5)
        with pipeline.sessions() as session:
            action = session.get_one(type(action), action.id)
    typer.echo(BulkActionOut.of(action).model_dump_json(indent=2))


@secrets_app.command("rotate")
def secrets_rotate() -> None:
    """Seal every stored signing secret again with the first key of SECRET_KEYS.

    Run it once every process has the new key list; then the old key can be dropped. Safe
    to run twice and while the API and workers run: each batch of tenants is locked while
    it is rewritten, and rows already under the first key are left alone."""
    from workers import tenants
    from workers.db import unit_of_work
    from workers.sealing import SealingError

    sealer, sessions = _sealer(), _sessions()
    rewritten: int = 0
    after: str | None = ""
    try:
        while after is not None:
            with unit_of_work(sessions) as session:
                count, after = tenants.reseal_secrets(session, sealer, after)
            rewritten += count
    except SealingError as exc:
        console.print(f"[red]{exc}[/] ({rewritten} rewritten before it)")
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"rewritten": rewritten}))


def _sealer() -> Sealer:
    from config import Settings
    from workers.sealing import Sealer, SealingError

    try:
        sealer = Sealer.from_settings(Settings())
        sealer.check()
    except SealingError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    return sealer


def _tenant(session: Any, name_or_id: str) -> Any:
    from workers import tenants

    try:
        return tenants.find_tenant(session, name_or_id)
    except tenants.TenantError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc


@stack_app.command("up")
def stack_up(
    root: Root = DEFAULT_ROOT,
    detach: Annotated[bool, typer.Option(help="Start in the background and return")] = False,
    concurrency: Annotated[int, typer.Option(help="Worker processes")] = 2,
) -> None:
    """Start PostgreSQL, Redis, S3, the simulator, the API, a worker and beat."""
    if detach:
        _detach(root, concurrency)
        return
    from sandbox.stack import Stack

    stack = Stack(root.resolve(), worker_concurrency=concurrency, real_wavespeed=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        info = stack.up()
        console.print_json(json.dumps({k: v for k, v in info.items() if k != "pids"}))
        console.print("[green]stack is up[/]; Ctrl-C stops it")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping the stack…")
    finally:
        stack.down()


def _detach(root: Path, concurrency: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "stack.json").unlink(missing_ok=True)
    argv = [sys.executable, "-m", "api.cli", "stack", "up", "--root", str(root)]
    argv += ["--concurrency", str(concurrency)]
    with (root / "stack.log").open("ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (root / "stack.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            console.print((root / "stack.log").read_text(errors="replace")[-3000:])
            raise typer.Exit(1)
        time.sleep(0.5)
    console.print(f"[green]stack is up[/] (pid {process.pid}); `kling stack down` stops it")


@stack_app.command("down")
def stack_down(root: Root = DEFAULT_ROOT) -> None:
    """Stop a stack started with `kling stack up --detach`."""
    info = _read_stack(root)
    os.kill(int(info["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + 60
    while (root / "stack.json").exists() and time.monotonic() < deadline:
        time.sleep(0.3)
    console.print("stack stopped")


@stack_app.command("status")
def stack_status(root: Root = DEFAULT_ROOT) -> None:
    """Print where the running stack's services are."""
    typer.echo(json.dumps(_read_stack(root), indent=2))


def _read_stack(root: Path) -> dict[str, Any]:
    path = root / "stack.json"
    if not path.exists():
        console.print(f"no stack is running under {root} (start one with `kling stack up`)")
        raise typer.Exit(1)
    return dict(json.loads(path.read_text()))


# -- the API of any deployment, through kling_client ----------------------------------------

ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--api-url", envvar="KLING_API_URL", show_envvar=True,
        help="The API's base URL (default: the embedded stack's, from ROOT/stack.json)",
    ),
]  # fmt: skip
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="KLING_API_KEY", show_envvar=True, show_default=False,
        help="A tenant's API key (default: the embedded stack's)",
    ),
]  # fmt: skip
JobId = Annotated[str, typer.Argument(help="The generation's id")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]


def _connection(api_url: str | None, api_key: str | None, root: Path) -> tuple[str, str]:
    """The API to call: the one given (options or environment), else the embedded stack's."""
    if api_url:
        if not api_key:
            _fail("no API key: set KLING_API_KEY or pass --api-key")
        return api_url, str(api_key)
    path = root / "stack.json"
    if not path.exists():
        _fail(
            "no API: set KLING_API_URL and KLING_API_KEY (or pass --api-url and --api-key), "
            "or start the embedded stack with `kling stack up`"
        )
    info = json.loads(path.read_text())
    return str(info["api_url"]), api_key or str(info["api_key"])


def _fail(message: str) -> NoReturn:
    # Soft-wrapped: one line whatever the terminal's width; the message's own brackets are
    # text, not markup.
    console.print(Text.assemble(("error: ", "red"), message), soft_wrap=True)
    raise typer.Exit(1)


@contextmanager
def _api(api_url: str | None, api_key: str | None, root: Path = DEFAULT_ROOT) -> Iterator[Client]:
    """A client of the chosen API; any refusal or failure ends the command with one line
    that names the problem's code (the traceback helps nobody who typed a command)."""
    url, key = _connection(api_url, api_key, root)
    try:
        with Client(url, key) as client:
            yield client
    except KlingError as exc:
        status = f"{exc.status} " if exc.status else ""
        _fail(f"{status}{exc.code}: {exc.detail}")
    except TimeoutError as exc:
        _fail(f"timeout: {exc}")
    except OSError as exc:  # a file to upload or write
        _fail(f"{type(exc).__name__}: {exc}")


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def _print_ended(job: Generation) -> None:
    """The job's record; exit 1 unless it completed (or has not ended)."""
    _print_json(job)
    if job["status"] in manifests.ENDED_BADLY:
        raise typer.Exit(1)


def _pairs(values: list[str] | None, option: str) -> dict[str, str]:
    pairs = {}
    for value in values or []:
        key, sep, rest = value.partition(":")
        if not sep or not key:
            raise typer.BadParameter(f"{value!r} is not key:value", param_hint=option)
        pairs[key] = rest
    return pairs


@app.command()
def generate(
    image: Annotated[str, typer.Argument(help="A local jpg/png, or an http(s) URL")],
    prompt: Annotated[str, typer.Option(help="Motion and camera, like a director's brief")],
    negative_prompt: Annotated[str | None, typer.Option(help="What to avoid")] = None,
    guidance_scale: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.5,
    duration: Annotated[int, typer.Option(help="5 or 10 seconds")] = 5,
    priority: Annotated[str, typer.Option(help="high, normal or low: the gate's order")] = "normal",
    wait: Annotated[bool, typer.Option(help="Wait for the video and print progress")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Where to write the MP4 (implies --wait)")
    ] = None,
    root: Root = DEFAULT_ROOT,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
    metadata: Annotated[list[str] | None, typer.Option(help="key:value, repeatable")] = None,
    webhook_url: Annotated[str | None, typer.Option(help="Where to send callbacks")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Running the command again answers the same job")
    ] = None,
) -> None:
    """Animate IMAGE; prints the job record as JSON."""
    body: dict[str, Any] = {
        "prompt": prompt, "guidance_scale": guidance_scale, "duration": duration,
        "priority": priority, "metadata": _pairs(metadata, "--metadata"),
    }  # fmt: skip
    if negative_prompt:
        body["negative_prompt"] = negative_prompt
    if webhook_url:
        body["webhook_url"] = webhook_url
    with _api(api_url, api_key, root) as client:
        if image.startswith(("http://", "https://")):
            body["image_url"] = image
        else:
            body["upload_id"] = client.upload(Path(image))["upload_id"]
        job = client.create(idempotency_key=idempotency_key, **body)
        console.print(f"accepted [bold]{job['id']}[/]")
        if wait or out:
            job = _wait(client, job["id"], out)
    _print_ended(job)


@app.command()
def status(
    job_id: JobId, root: Root = DEFAULT_ROOT, api_url: ApiUrl = None, api_key: ApiKey = None
) -> None:
    """Print a generation's record as JSON."""
    with _api(api_url, api_key, root) as client:
        _print_json(client.get(job_id))


@app.command("wait")
def wait_for_job(
    job_id: JobId,
    out: Annotated[Path | None, typer.Option(help="Also write the MP4 here")] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds")] = 1800,
    root: Root = DEFAULT_ROOT,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Wait until a generation has ended; prints its record as JSON (exit 1 unless it
    completed) and, on the way, each state it reaches."""
    with _api(api_url, api_key, root) as client:
        job = _wait(client, job_id, out, timeout)
    _print_ended(job)


@app.command()
def download(
    job_id: JobId,
    out: Annotated[Path, typer.Option(help="Where to write the MP4")],
    root: Root = DEFAULT_ROOT,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Write a completed generation's MP4 to OUT."""
    with _api(api_url, api_key, root) as client:
        size = client.download(job_id, out)
    console.print(f"wrote {out} ({size} bytes)")


@app.command()
def cancel(
    job_id: JobId, root: Root = DEFAULT_ROOT, api_url: ApiUrl = None, api_key: ApiKey = None
) -> None:
    """Cancel a generation (one at WaveSpeed has its prediction deleted); prints its record."""
    with _api(api_url, api_key, root) as client:
        _print_json(client.cancel(job_id))


@app.command()
def retry(
    job_id: Annotated[str, typer.Argument(help="A finished job's id")],
    root: Root = DEFAULT_ROOT,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Running the command again answers the same job")
    ] = None,
) -> None:
    """Make a finished job again, with the same inputs; prints the new job record as JSON."""
    with _api(api_url, api_key, root) as client:
        _print_json(client.retry(job_id, idempotency_key=idempotency_key))


@app.command()
def events(
    job_id: JobId,
    follow: Annotated[
        bool, typer.Option(help="Print each state change as it happens, until the job ends")
    ] = False,
    as_json: AsJson = False,
    root: Root = DEFAULT_ROOT,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """A generation's state history and callback attempts, as a table."""
    with _api(api_url, api_key, root) as client:
        if follow:
            for change in client.stream(job_id):
                line = {k: v for k, v in change.items() if k != "generation"}
                typer.echo(json.dumps(line) if as_json else _change_line(line))
            return
        history = client.history(job_id)
    if as_json:
        _print_json(history)
        return
    table = Table("at", "from", "to", "reason", title=f"generation {job_id}")
    for event in history["events"]:
        table.add_row(event["at"], event["from_state"] or "", event["to_state"],
                      event["reason"] or "")  # fmt: skip
    _stdout().print(table)
    if history["deliveries"]:
        deliveries = Table("event", "url", "status", "attempts", title="callbacks")
        for d in history["deliveries"]:
            deliveries.add_row(d["event"], d["url"], d["status"], str(len(d["attempts"])))
        _stdout().print(deliveries)


def _change_line(change: dict[str, Any]) -> str:
    reason = f"  ({change['reason']})" if change.get("reason") else ""
    return f"{change['at']}  {change['from'] or '-'} -> {change['to']}{reason}"


@app.command("list")
def list_generations(
    status: Annotated[
        str | None, typer.Option(help="queued, processing, completed, failed, ...")
    ] = None,
    created_after: Since = None,
    created_before: Since = None,
    metadata: Annotated[list[str] | None, typer.Option(help="key:value, repeatable")] = None,
    request_id: Annotated[str | None, typer.Option(help="The broker request that made it")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first (1 to 100)")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Where the previous page ended")] = None,
    as_json: AsJson = False,
    root: Root = DEFAULT_ROOT,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Your generations, newest first, with the API's filters."""
    with _api(api_url, api_key, root) as client:
        page = client.list(
            status=status, created_after=created_after, created_before=created_before,
            metadata=_pairs(metadata, "--metadata"), request_id=request_id, limit=limit,
            cursor=cursor,
        )  # fmt: skip
    if as_json:
        _print_json(page)
        return
    table = Table("id", "status", "created", "duration", "cost", "prompt / error")
    for job in page["data"]:
        error, inputs = job.get("error"), job.get("input") or {}
        table.add_row(
            job["id"], job["status"], job["created_at"][:19], f"{inputs.get('duration', '?')}s",
            "" if job.get("cost_usd") is None else f"${job['cost_usd']}",
            error["code"] if error else inputs.get("prompt") or "",
        )  # fmt: skip
    _stdout().print(table)
    if page["next_cursor"]:
        console.print(f"more: --cursor {page['next_cursor']}", highlight=False)


@app.command("batch")
def batch_run(
    manifest: Annotated[
        Path,
        typer.Argument(
            help="One create a line: JSON Lines, or CSV (.csv) with a header; `image` a path "
            "or URL, `out` where its video goes"
        ),
    ],
    state: Annotated[
        Path | None, typer.Option(help="Where progress is kept (default: MANIFEST.state.json)")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for every job to end")] = False,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "--out-dir",
            help="Write each video here as line-N.mp4 as it finishes (implies --wait)",
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="One JSON line per manifest line (default: MANIFEST.report.jsonl)"),
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, max=32, help="Uploads (and reads) under way at once")
    ] = 4,
    root: Root = DEFAULT_ROOT,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Create a generation for every line of MANIFEST; run it again to resume where it
    stopped (nothing is created twice). Shows progress and spend, ends with a table of what
    each line became and a JSON Lines report; exits 1 if a line was refused, failed, or is
    still to be sent."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    base = manifest.resolve().parent
    try:
        lines, digest = manifests.read(manifest)
        progress = manifests.State.load(
            state or manifest.with_name(manifest.name + ".state.json"), digest
        )
        # Before anything is sent: the run's id is in every line's Idempotency-Key, so a run
        # stopped during its first call must find the same id when it is run again.
        progress.save()
    except (OSError, manifests.ManifestError) as exc:
        _fail(str(exc))
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[figures]}"), console=console,
    )  # fmt: skip
    task = bar.add_task("batch", total=len(lines), figures="")

    def shown(phase: str) -> Callable[[], None]:
        def update() -> None:
            now = manifests.tally(lines, progress)
            figures = (
                f"queued {now.queued} · processing {now.processing} · completed "
                f"{now.completed} · failed {now.failed} · spent ${now.spent}"
            )
            bar.update(task, description=phase, completed=now.ended, figures=figures)

        return update

    try:
        with bar, _api(api_url, api_key, root) as client:
            say = bar.console.print
            manifests.upload_images(client, lines, progress, base, say, concurrency)
            later = manifests.create_jobs(client, lines, progress, shown("creating"))
            if wait or out_dir:
                manifests.follow(
                    client, lines, progress, out_dir, base, say, shown("waiting"), concurrency
                )
            shown("done")()
    finally:
        manifests.write_report(
            lines, progress, report or manifest.with_name(manifest.name + ".report.jsonl")
        )
    _summary(lines, progress, later)


def _summary(lines: list[manifests.Line], progress: manifests.State, later: int) -> None:
    """The table of what each line became, and the exit status it makes."""
    table = Table("line", "job", "status", "cost")
    bad = later
    for line in lines:
        item = progress.of(line)
        problem = item.get("problem")
        shown = f"refused: {problem.get('code')}" if problem else item.get("status", "to send")
        if item.get("error"):
            shown += f": {item['error']}"
        bad += bool(problem) or item.get("status") in manifests.ENDED_BADLY
        cost = "" if item.get("cost_usd") is None else f"${item['cost_usd']}"
        table.add_row(str(line.number), item.get("job_id", ""), shown, cost)
    _stdout().print(table)
    console.print(f"spent ${manifests.tally(lines, progress).spent}", highlight=False)
    if bad:
        raise typer.Exit(1)


def _stdout() -> Console:
    # Wide enough for whole ids when the output is not a terminal (a pipe, a file).
    return Console(width=None if sys.stdout.isatty() else 160)


def _wait(client: Client, job_id: str, out: Path | None, timeout: float = 1800) -> Any:
    started = time.monotonic()

    def progress(current: Generation) -> None:
        console.print(f"  {time.monotonic() - started:6.1f}s  {current['status']}")

    job = client.wait(job_id, timeout=timeout, on_change=progress)
    if out and job["status"] == "completed":
        size = client.download(job["id"], out)
        console.print(f"wrote {out} ({size} bytes)")
    return job


@app.command()
def demo(
    out: Annotated[Path, typer.Option()] = Path("out/demo.mp4"),
    root: Root = DEFAULT_ROOT,
) -> None:
    """Animate the example portrait end to end on the embedded stack, into OUT."""
    from sandbox.stack import Stack

    started = time.monotonic()
    running = (root / "stack.json").exists()
    if not running:
        # The demo starts from nothing every time, like a fresh machine.
        shutil.rmtree(root / "demo", ignore_errors=True)
    stack = None if running else Stack((root / "demo").resolve(), real_wavespeed=True)
    if stack is not None:
        console.print("starting the embedded stack…")
        stack.up()
    demo_root = root if running else root / "demo"
    try:
        info = _read_stack(demo_root)
        announce(info["api_url"], info["database_url"])
        generate(
            str(DEMO_IMAGE), DEMO_PROMPT, "blur, distort, low quality", 0.5, 5, wait=True,
            out=out, root=demo_root,
        )  # fmt: skip
    finally:
        if stack is not None:
            stack.down()
    console.print(f"demo done in {time.monotonic() - started:.1f}s")
    # Plain echo: the console would wrap it at 80 columns when not on a terminal.
    typer.echo(DEMO_REAL_HINT, err=True)


if __name__ == "__main__":
    app()
