"""SQLAlchemy models: jobs, their event history, and the outbox of messages to publish."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB, datetime: DateTime(timezone=True)}


class Tenant(Base):
    """A producer: its jobs, keys, uploads and callbacks are its own and nobody else's."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    monthly_budget_usd: Mapped[Decimal | None] = mapped_column(Numeric(12, 4))
    # Quotas at the admission gate (`kling tenants update`); NULL: the deployment's default
    # (`TENANT_MAX_IN_FLIGHT`, no rate of its own, no queue limit). The gate's round-robin
    # gives a tenant `weight` jobs per turn.
    max_in_flight: Mapped[int | None] = mapped_column(Integer)
    weight: Mapped[int] = mapped_column(SmallInteger, default=1, server_default="1")
    submits_per_minute: Mapped[int | None] = mapped_column(Integer)
    # More queued jobs than this and a create is refused, 429 `queue_full`.
    max_queued: Mapped[int | None] = mapped_column(Integer)
    # Its ended jobs are deleted (`workers.retention`) this many days after they ended.
    retain_days: Mapped[int | None] = mapped_column(Integer)
    # Takes no output WaveSpeed flags as NSFW: such a job fails `content_moderated`.
    reject_nsfw: Mapped[bool] = mapped_column(default=False, server_default="false")
    # The queues its broker requests may ask replies on (a glob, e.g. `myapp.*`); NULL: any
    # queue but the product's own (`api.inbox`).
    reply_queues: Mapped[str | None] = mapped_column(String(200))
    # Standard Webhooks signing secrets, sealed (`workers.sealing`): ciphertext, never the
    # secret itself; `workers.tenants` opens them. The previous one stays valid for a while
    # after a rotation so receivers can switch without dropping a callback.
    sealed_webhook_secret: Mapped[str] = mapped_column(Text)
    sealed_previous_webhook_secret: Mapped[str | None] = mapped_column(Text)
    previous_secret_expires_at: Mapped[datetime | None]

    __table_args__ = (CheckConstraint("weight >= 1", name="weight_positive"),)


class ApiKey(Base):
    """A bearer token of a tenant, stored only as its SHA-256 (tokens are random, 256 bits)."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    revoked_at: Mapped[datetime | None]


class Upload(Base):
    """An image a tenant uploaded, validated, waiting to be used by `upload_id`."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(Text)
    content_type: Mapped[str] = mapped_column(String(32))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Job(Base):
    """One generation request and everything learned while carrying it out."""

    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)

    # Inputs, as the producer sent them, plus the copy of the image WaveSpeed is given.
    image_url: Mapped[str | None] = mapped_column(Text)
    input_key: Mapped[str] = mapped_column(Text)
    # INPUT_HOSTING=wavespeed: the download URL WaveSpeed gave the current submit attempt's
    # upload, recorded before its POST, so a history lookup knows the prediction by it
    # whatever WaveSpeed does with the name we put in its fragment (`pipeline.named_url`).
    hosted_input_url: Mapped[str | None] = mapped_column(Text)
    input_content_type: Mapped[str] = mapped_column(String(32))
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    guidance_scale: Mapped[float]
    duration: Mapped[int] = mapped_column(Integer)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[str]] = mapped_column(JSONB, default=list)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    # The gate's order: 0 high, 1 normal, 2 low (`workers.admission.PRIORITIES`).
    priority: Mapped[int] = mapped_column(SmallInteger, default=1, server_default="1")
    # Not submitted by then, the job ends `expired` (`Pipeline.expire_due`).
    start_deadline_at: Mapped[datetime | None]
    # Not completed by then, the job stops: its prediction is deleted at WaveSpeed and it
    # fails `deadline_exceeded` (`Pipeline.expire_due`).
    deadline_at: Mapped[datetime | None]
    # A request over the broker (`api.inbox`): its id, and the producer's task to send each
    # of `events` to (`{"task", "queue", "events"}`; `workers.replies`).
    request_id: Mapped[str | None] = mapped_column(String(255))
    reply: Mapped[dict[str, Any] | None]
    # The trace of the request that created the job (W3C traceparent, version 00: 55
    # characters); the spans of its later steps join it (`config.tracing`). None: untraced.
    traceparent: Mapped[str | None] = mapped_column(String(55))
    # The job this one was made again from (`POST /v1/generations/{id}/retry`).
    retry_of: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), index=True
    )

    # Admission: a queued job waits for the gate to admit it, and not before `not_before`
    # when it is waiting out a retry backoff.
    admitted_at: Mapped[datetime | None]
    not_before: Mapped[datetime | None]
    # Set while a queued job has no submit message on its way (its message found it waiting
    # for the gate, or a retry put it back): the gate sends one only to such jobs, since an
    # unparked job's own message is still coming and will claim it.
    parked_at: Mapped[datetime | None]

    # WaveSpeed side.
    prediction_id: Mapped[str | None] = mapped_column(String(64), index=True)
    submit_attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_submit_at: Mapped[datetime | None]
    submitted_at: Mapped[datetime | None]
    # When the job's current step is next due: the next poll of a processing job, the next
    # history lookup of an unanswered submit, the next try (or the end of the lease of a
    # running try) of a store. The reconciler resends the step's message once it is overdue.
    due_at: Mapped[datetime | None]
    # Failures in a row of the current step (history lookups, polls WaveSpeed refused, store
    # tries), and how often the reconciler resent it; both start again at every transition.
    step_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # History lookups of the current submit attempt that did not find it, and when the last
    # one ran: two misses far enough apart prove the POST never arrived.
    recover_misses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_miss_at: Mapped[datetime | None]
    # Bumped by every poll; a poll message carrying an older value belongs to a dead chain.
    poll_seq: Mapped[int] = mapped_column(Integer, default=0)
    inference_ms: Mapped[int | None] = mapped_column(Integer)
    # WaveSpeed's `has_nsfw_contents` for the outputs: true where it flagged one.
    nsfw: Mapped[list[bool | None] | None] = mapped_column(JSONB)
    output_url: Mapped[str | None] = mapped_column(Text)
    # When WaveSpeed reported the output (it keeps outputs 7 days), and until when a store
    # that keeps failing is tried again.
    output_at: Mapped[datetime | None]
    store_deadline_at: Mapped[datetime | None]

    # The stored video.
    s3_bucket: Mapped[str | None] = mapped_column(Text)
    s3_key: Mapped[str | None] = mapped_column(Text)
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    video_duration: Mapped[float | None]
    video_width: Mapped[int | None] = mapped_column(Integer)
    video_height: Mapped[int | None] = mapped_column(Integer)
    video_codec: Mapped[str | None] = mapped_column(String(32))

    cost_usd: Mapped[Decimal | None] = mapped_column(Numeric(10, 4))
    # Whether WaveSpeed charged for it, settled when the job ends; NULL: not known
    # (`workers.charges`). A terminal job with a `due_at` still has its prediction to delete.
    charged: Mapped[bool | None]
    completed_at: Mapped[datetime | None]
    # Deleted (`workers.retention`): a tombstone, its inputs and video gone, its facts kept.
    deleted_at: Mapped[datetime | None]
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)

    # Server defaults (created_at) come back with the INSERT, so a job just created can be
    # answered from memory, without another round trip that a failing database could refuse.
    __mapper_args__ = {"eager_defaults": True}
    __table_args__ = (
        Index("ix_jobs_status_due_at", "status", "due_at"),
        Index("ix_jobs_last_submit_at", "last_submit_at"),
        Index("ix_jobs_tenant_id_status", "tenant_id", "status"),
        Index("ix_jobs_tenant_id_request_id", "tenant_id", "request_id"),
        # Spend since a date: a tenant's budget check, and every tenant's in the console.
        Index("ix_jobs_tenant_id_created_at", "tenant_id", "created_at"),
        Index("ix_jobs_created_at", "created_at"),
    )


class JobEvent(Base):
    """One state transition of a job: the history a job can be read back and timed from."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    # Indexed for the console's charts, which count recent transitions across every job.
    at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)


class OutboxMessage(Base):
    """A task message committed with the change that calls for it, published after commit."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    published_at: Mapped[datetime | None]
    # A relay that took the row publishes it before this; then another relay may try again.
    claimed_until: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        Index(
            "ix_outbox_unpublished",
            "created_at",
            postgresql_where=text("published_at IS NULL"),
        ),
    )


class WaveSpeedWebhook(Base):
    """Webhook ids WaveSpeed already delivered: it retries and duplicates them."""

    __tablename__ = "wavespeed_webhooks"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)


class IdempotencyKey(Base):
    """An `Idempotency-Key` a tenant used, the request it came with, and the job it made."""

    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class TenantEvent(Base):
    """An event of a tenant's feed (`GET /v1/events`): what its callback carries, recorded
    for every job whether or not it has a callback URL. Its id is the `webhook-id`.

    The feed is ordered by the writing transaction's id, then `seq`: a transaction still
    open holds back every event from one that started after it, so a reader paging with
    a cursor never skips an event that commits late (`workers.feed`)."""

    __tablename__ = "tenant_events"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    seq: Mapped[int] = mapped_column(BigInteger, Identity())
    txid: Mapped[int] = mapped_column(
        BigInteger, server_default=text("(pg_current_xact_id()::text::bigint)")
    )
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # None for a broker request refused before it became a job (`generation.refused`).
    job_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    type: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())

    __table_args__ = (Index("ix_tenant_events_feed", "tenant_id", "txid", "seq"),)


class CallbackDelivery(Base):
    """The event of the same id, for a producer's callback URL; the id is the `webhook-id` of
    every attempt."""

    __tablename__ = "callback_deliveries"

    id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenant_events.id", ondelete="CASCADE"), primary_key=True
    )
    # None for the refusal of a broker request, which never became a job.
    job_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(Text)
    # scheme://host:port of `url`: what per-host limits and the circuit breaker count by.
    host: Mapped[str] = mapped_column(Text, default="", server_default="", index=True)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    claimed_at: Mapped[datetime | None]  # last sent to the queue by a reconciler sweep
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # An attempt is being made until then (its POST runs outside any transaction): another
    # message for the delivery waits, and a worker that died mid-attempt is retried after it.
    sending_until: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    delivered_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_callback_deliveries_status_next", "status", "next_attempt_at"),)


class BrokerRequest(Base):
    """A generation request that came over the broker (`api.inbox`), once per `request_id`:
    the job it made, or the problem it was refused with. A redelivered or re-sent message
    finds it and makes nothing."""

    __tablename__ = "broker_requests"

    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    request_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    problem: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Reply(Base):
    """The event of the same id, to be sent as a task of the producer's (`workers.replies`):
    published at least once, its id in the message as its `webhook-id`."""

    __tablename__ = "replies"

    id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenant_events.id", ondelete="CASCADE"), primary_key=True
    )
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    task: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    sent_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_replies_status_next", "status", "next_attempt_at"),)


class CallbackAttempt(Base):
    """One POST of a delivery and what came of it."""

    __tablename__ = "callback_attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("callback_deliveries.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(server_default=func.now())
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer)


class CallbackHost(Base):
    """A producer's callback host (scheme, host and port) and its circuit breaker: after
    failures in a row nothing is sent to it until `open_until`, then one attempt probes it."""

    __tablename__ = "callback_hosts"

    host: Mapped[str] = mapped_column(Text, primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    open_until: Mapped[datetime | None]
    last_failure_at: Mapped[datetime | None]
    last_success_at: Mapped[datetime | None]


class QuarantinedTask(Base):
    """A task put aside for an operator: it killed its worker again and again, or the
    reconciler resent it past its cap. Nothing runs it until it is released."""

    __tablename__ = "quarantined_tasks"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(String(64))
    # The job or delivery the task was for.
    subject_id: Mapped[uuid.UUID] = mapped_column(index=True)
    reason: Mapped[str] = mapped_column(Text)
    deliveries: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    released_at: Mapped[datetime | None]


class BulkAction(Base):
    """A tenant's bulk action (`workers.bulk`): what it is, how far it got, what it did."""

    __tablename__ = "bulk_actions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    filter: Mapped[dict[str, Any]]
    max_items: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    matched: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Where the next batch starts (the last item's created_at and id); NULL before the first.
    cursor: Mapped[str | None] = mapped_column(Text)
    # A worker is on it until then; past it (the worker died) the reconciler sends it again.
    lease_until: Mapped[datetime | None]
    # Which worker's lease it is: a worker whose lease ran out records nothing more.
    lease_id: Mapped[uuid.UUID | None]
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
    finished_at: Mapped[datetime | None]

    # Its server defaults come back with the INSERT, so it can be answered once committed.
    __mapper_args__ = {"eager_defaults": True}
    __table_args__ = (Index("ix_bulk_actions_status_updated_at", "status", "updated_at"),)


class Operator(Base):
    """A person who runs the service (`kling operators create`): signs in to the console with
    a token stored only as its SHA-256. Operators are not tenants and no tenant key is one."""

    __tablename__ = "operators"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    disabled_at: Mapped[datetime | None]


class OperatorSession(Base):
    """A signed-in console session: the cookie's value only as its SHA-256, and the CSRF token
    every action of the session must carry."""

    __tablename__ = "operator_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    operator_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("operators.id", ondelete="CASCADE"), index=True
    )
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(index=True)


class AuditEntry(Base):
    """One thing an operator did: who, what (an action and its subject), when, and how it
    turned out."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # The name, not a key: the entry outlives the operator's row.
    operator: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str | None] = mapped_column(String(255))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)
