"""The list of a tenant's jobs, a page at a time, under an opaque cursor, and the filter that
picks them (shared with bulk actions)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from workers.models import Job


@dataclass(frozen=True)
class Cursor:
    """Where a page of the list ended: newest first, so stable while new jobs arrive."""

    created_at: datetime
    job_id: uuid.UUID

    def encode(self) -> str:
        raw = f"{self.created_at.isoformat()}|{self.job_id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created_at, job_id = raw.split("|")
        return cls(datetime.fromisoformat(created_at), uuid.UUID(job_id))


@dataclass(frozen=True)
class JobFilter:
    """Which of a tenant's jobs a list or a bulk action means: any of `statuses` and
    `priorities` (none given: any), created in [`created_after`, `created_before`), with
    these metadata values."""

    statuses: tuple[str, ...] = ()
    priorities: tuple[int, ...] = ()
    created_after: datetime | None = None
    created_before: datetime | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # The broker request that made it (`api.inbox`).
    request_id: str | None = None
    # Any of these error codes (the operators' console; not a bulk action's filter).
    error_codes: tuple[str, ...] = ()

    def where(self) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        if self.statuses:
            conditions.append(Job.status.in_(self.statuses))
        if self.priorities:
            conditions.append(Job.priority.in_(self.priorities))
        if self.created_after:
            conditions.append(Job.created_at >= self.created_after)
        if self.created_before:
            conditions.append(Job.created_at < self.created_before)
        for key, value in self.metadata.items():
            conditions.append(Job.metadata_[key].astext == value)
        if self.request_id is not None:
            conditions.append(Job.request_id == self.request_id)
        if self.error_codes:
            conditions.append(Job.error_code.in_(self.error_codes))
        return conditions

    def to_json(self) -> dict[str, Any]:
        return {
            "status": list(self.statuses), "priority": list(self.priorities),
            "created_after": _iso(self.created_after), "created_before": _iso(self.created_before),
            "metadata": self.metadata,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobFilter:
        return cls(
            statuses=tuple(data.get("status") or ()), priorities=tuple(data.get("priority") or ()),
            created_after=_time(data.get("created_after")),
            created_before=_time(data.get("created_before")),
            metadata=dict(data.get("metadata") or {}),
        )  # fmt: skip


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def page(
    session: Session,
    tenant_id: str | None,
    wanted: JobFilter,
    *,
    limit: int,
    after: Cursor | None = None,
) -> tuple[Sequence[Job], Cursor | None]:
    """One page of a tenant's jobs (every tenant's for None: the operators' console), newest
    first, and the cursor of the next page."""
    query = select(Job).where(*wanted.where())
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    if after:
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(after.created_at, after.job_id))
    rows = session.scalars(
        query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, Cursor(rows[-1].created_at, rows[-1].id) if more else None
