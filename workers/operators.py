"""Operators of the console: their tokens, their signed-in sessions, and the audit log of what
they did. Tokens and session ids are random (256 bits) and stored only as their SHA-256, as
tenant keys are; a tenant's key is never looked up here, so it never opens the console."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

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


def audit(session: Session, operator: str, action: str, subject: str | None, **detail: Any) -> None:
    """Record what an operator did, in the caller's transaction: with the change itself
    when the caller makes it."""
    session.add(AuditEntry(operator=operator, action=action, subject=subject, detail=detail))


def recent_audit(session: Session, limit: int = 50) -> Sequence[AuditEntry]:
    return session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)).all()
