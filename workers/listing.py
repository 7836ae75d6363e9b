"""The list of a tenant's jobs, a page at a time, under an opaque cursor."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

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


def page(
    session: Session,
    tenant_id: str,
    *,
    limit: int,
    status: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    metadata: dict[str, str] | None = None,
    after: Cursor | None = None,
) -> tuple[Sequence[Job], Cursor | None]:
    """One page of a tenant's jobs, newest first, and the cursor of the next page."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        query = query.where(Job.status == status)
    if created_after:
        query = query.where(Job.created_at >= created_after)
    if created_before:
        query = query.where(Job.created_at < created_before)
    for key, value in (metadata or {}).items():
        query = query.where(Job.metadata_[key].astext == value)
    if after:
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(after.created_at, after.job_id))
    rows = session.scalars(
        query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, Cursor(rows[-1].created_at, rows[-1].id) if more else None
