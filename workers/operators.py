"""Operators of the console: their tokens, their signed-in sessions, and the audit log of what
they did. Tokens and session ids are random (256 bits) and stored only as their SHA-256, as
tenant keys are; a tenant's key is never looked up here, so it never opens the console."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from workers.db import unit_of_work
from workers.models import AuditEntry, Operator, OperatorSession

SESSION_TTL = timedelta(hours=12)
# Tells an operator token from a tenant key at a glance (and in a leaked-secrets scan).
TOKEN_PREFIX = "kop_"  # noqa: S105


class OperatorError(Exception):
    """An operator that cannot be made or found as asked."""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(session: Session, name: str) -> tuple[Operator, str]:
    """A new operator and its token: the token is answered this once and stored as a hash."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", name):
        raise OperatorError("operator names are 1-63 of a-z, 0-9, '.', '_' and '-'")
    if session.scalar(select(Operator).where(Operator.name == name)) is not None:
        raise OperatorError(f"operator {name!r} exists")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    operator = Operator(name=name, token_hash=_hash(token))
    session.add(operator)
    session.flush()
    return operator, token


def disable(session: Session, name: str, now: datetime) -> bool:
    """Disable an operator and end its sessions; False when there is no such live operator."""
    found = session.scalar(
        update(Operator)
        .where(Operator.name == name, Operator.disabled_at.is_(None))
        .values(disabled_at=now)
        .returning(Operator.id)
    )
    if found is None:
        return False
    session.execute(delete(OperatorSession).where(OperatorSession.operator_id == found))
    return True


def authenticate(session: Session, token: str) -> Operator | None:
    """The live operator whose token this is, or None (a tenant key is never one)."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    return session.scalar(
        select(Operator).where(Operator.token_hash == _hash(token), Operator.disabled_at.is_(None))
    )


@dataclass(frozen=True)
class SignedIn:
    """A session as the console sees it: who, and the CSRF token its actions must carry."""

    operator: str
    csrf: str


def start_session(session: Session, operator: Operator, now: datetime) -> tuple[str, str]:
    """A new session for `operator`: answers the cookie's value and the session's CSRF token.
    Expired sessions are swept here, so the table holds only live ones."""
    session.execute(delete(OperatorSession).where(OperatorSession.expires_at < now))
    sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    session.add(
        OperatorSession(
            id_hash=_hash(sid), operator_id=operator.id, csrf=csrf, expires_at=now + SESSION_TTL
        )
    )
    return sid, csrf


def signed_in(session: Session, sid: str, now: datetime) -> SignedIn | None:
    """The live session of this cookie value, of an operator still enabled, or None."""
    row = session.execute(
        select(Operator.name, OperatorSession.csrf)
        .join(Operator, Operator.id == OperatorSession.operator_id)
        .where(
            OperatorSession.id_hash == _hash(sid),
            OperatorSession.expires_at > now,
            Operator.disabled_at.is_(None),
        )
    ).first()
    return SignedIn(row.name, row.csrf) if row else None


def csrf_ok(expected: str, sent: str | None) -> bool:
    return bool(sent) and hmac.compare_digest(expected.encode(), (sent or "").encode())


def end_session(session: Session, sid: str) -> None:
    session.execute(delete(OperatorSession).where(OperatorSession.id_hash == _hash(sid)))


def audit(
    session: Session, operator: str, action: str, subject: str | None, **detail: Any
) -> AuditEntry:
    """Record what an operator did, in the caller's transaction: with the change itself
    when the caller makes it."""
    entry = AuditEntry(operator=operator, action=action, subject=subject, detail=detail)
    session.add(entry)
    return entry


@contextmanager
def audited(
    sessions: sessionmaker[Session], operator: str, action: str, subject: str
) -> Iterator[dict[str, Any]]:
    """Audit an action that commits on its own (the pipeline's cancel, restore, retry): the
    entry is committed before the block runs, so nothing is done that is not on record, then
    completed with what the block put in the dict it is given (how it turned out), or with
    the error that stopped it. An entry still `pending` is an action whose process died."""
    with unit_of_work(sessions) as session:
        entry = audit(session, operator, action, subject, pending=True)
        session.flush()
        entry_id = entry.id
    outcome: dict[str, Any] = {}
    try:
        yield outcome
    except Exception as exc:
        outcome["failed"] = type(exc).__name__
        with contextlib.suppress(SQLAlchemyError):  # the block's own error is the one to see
            _complete(sessions, entry_id, outcome)
        raise
    _complete(sessions, entry_id, outcome)


def _complete(sessions: sessionmaker[Session], entry_id: int, outcome: dict[str, Any]) -> None:
    with unit_of_work(sessions) as session:
        session.execute(update(AuditEntry).where(AuditEntry.id == entry_id).values(detail=outcome))


def recent_audit(session: Session, limit: int = 50) -> Sequence[AuditEntry]:
    return session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)).all()
