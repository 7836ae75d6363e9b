"""Tenants, their API keys and their webhook signing secrets.

Signing secrets are stored sealed; they are opened only here, for the few callers that need
them: signing a callback, showing the secret to its tenant, printing a new tenant's once.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from workers.models import ApiKey, Tenant
from workers.sealing import Sealer, SealingError

KEY_PREFIX = "kl_"


class TenantError(ValueError):
    """A tenant or key operation that cannot be done as asked."""


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def hash_key(token: str) -> str:
    # The tokens carry 256 random bits, so a fast hash is as safe as a slow one here.
    return hashlib.sha256(token.encode()).hexdigest()


def create_tenant(
    session: Session, name: str, sealer: Sealer, *, budget_usd: Decimal | None = None
) -> Tenant:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", name):
        raise TenantError("tenant names are 1-63 of a-z, 0-9 and '-', starting alphanumeric")
    if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise TenantError(f"tenant {name!r} exists")
    tenant = Tenant(
        id=f"ten_{uuid.uuid4().hex[:20]}",
        name=name,
        monthly_budget_usd=budget_usd,
        sealed_webhook_secret=sealer.seal(new_webhook_secret()),
    )
    session.add(tenant)
    session.flush()
    return tenant


def find_tenant(session: Session, name_or_id: str) -> Tenant:
    tenant = session.scalar(
        select(Tenant).where((Tenant.name == name_or_id) | (Tenant.id == name_or_id))
    )
    if tenant is None:
        raise TenantError(f"no tenant {name_or_id!r}")
    return tenant


def create_key(session: Session, tenant: Tenant, name: str = "default") -> tuple[ApiKey, str]:
    """A new key; the token is answered once and only its hash is kept."""
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(tenant_id=tenant.id, name=name, prefix=token[:10], key_hash=hash_key(token))
    session.add(key)
    session.flush()
    return key, token


def list_keys(session: Session, tenant: Tenant | None = None) -> Sequence[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at)
    if tenant is not None:
        query = query.where(ApiKey.tenant_id == tenant.id)
    return session.scalars(query).all()


def revoke_key(session: Session, key_id: uuid.UUID, now: datetime) -> bool:
    row = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now)
        .returning(ApiKey.id)
    ).first()
    return row is not None


def authenticate(session: Session, token: str) -> Tenant | None:
    """The tenant a live key belongs to, or None."""
    return session.scalar(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(token), ApiKey.revoked_at.is_(None))
    )


def webhook_secret(tenant: Tenant, sealer: Sealer) -> str:
    """The tenant's current signing secret, opened."""
    return sealer.unseal(tenant.sealed_webhook_secret)


def rotate_secret(
    session: Session, tenant: Tenant, sealer: Sealer, now: datetime, overlap: timedelta
) -> str:
    """Make a new signing secret; the old one keeps signing alongside it for `overlap`."""
    # Locked, so that a concurrent rotation or `reseal_secrets` cannot write back a value
    # read before this one (a lost secret, or one left under a key about to be dropped).
    # NO KEY UPDATE: jobs referencing the tenant keep being inserted meanwhile.
    session.refresh(tenant, with_for_update={"key_share": True})
    current = tenant.sealed_webhook_secret
    tenant.sealed_previous_webhook_secret = sealer.reseal(current) or current
    tenant.previous_secret_expires_at = now + overlap
    secret = new_webhook_secret()
    tenant.sealed_webhook_secret = sealer.seal(secret)
    session.flush()
    return secret


def signing_secrets(tenant: Tenant, sealer: Sealer, now: datetime) -> list[str]:
    """Secrets to sign with now: the current one, and the previous one during its overlap."""
    current = [webhook_secret(tenant, sealer)]
    previous = tenant.sealed_previous_webhook_secret
    expires = tenant.previous_secret_expires_at
    if previous and expires and expires > now:
        current.append(sealer.unseal(previous))
    return current


def reseal_secrets(
    session: Session, sealer: Sealer, after: str = "", limit: int = 200
) -> tuple[int, str | None]:
    """Seal again with the first key the secrets of up to `limit` tenants whose id sorts after
    `after`. Answers how many tenants were rewritten and the id to continue after (None once
    every tenant was seen). Rows already under the first key are left as they are, so a
    second run rewrites nothing."""
    found = session.scalars(
        select(Tenant)
        .where(Tenant.id > after)
        .order_by(Tenant.id)
        .limit(limit)
        .with_for_update(key_share=True)
    ).all()
    rewritten = sum(_reseal(tenant, sealer) for tenant in found)
    session.flush()
    return rewritten, found[-1].id if len(found) == limit else None


def _reseal(tenant: Tenant, sealer: Sealer) -> bool:
    previous = tenant.sealed_previous_webhook_secret
    try:
        current = sealer.reseal(tenant.sealed_webhook_secret)
        previous = sealer.reseal(previous) if previous else None
    except SealingError as exc:
        raise SealingError(f"tenant {tenant.id}: {exc}") from None
    if current:
        tenant.sealed_webhook_secret = current
    if previous:
        tenant.sealed_previous_webhook_secret = previous
    return bool(current or previous)


# -- quotas -------------------------------------------------------------------------------

QUOTAS = ("max_in_flight", "weight", "submits_per_minute", "max_queued", "retain_days")
# A weight is a share of the gate's turns: past this, one tenant would take whole passes.
MAX_WEIGHT = 100
MAX_QUOTA = 1_000_000_000


def update_quotas(session: Session, tenant: Tenant, changes: dict[str, int | None]) -> Tenant:
    """Set the tenant's quotas. None clears one, so the deployment's default applies (a
    weight of 1). Every value is a whole number from 1 up."""
    for name, value in changes.items():
        if name not in QUOTAS:
            raise TenantError(f"{name} is not a quota (one of {', '.join(QUOTAS)})")
        if name == "weight" and value is None:
            value = 1
        top = MAX_WEIGHT if name == "weight" else MAX_QUOTA
        if value is not None and not 1 <= value <= top:
            raise TenantError(f"{name} must be a whole number from 1 to {top}")
        setattr(tenant, name, value)
    session.flush()
    return tenant


# A reply-queue glob: queue-name characters and the glob's own.
REPLY_QUEUES = re.compile(r"[A-Za-z0-9_.:*?\[\]-]{1,200}")


def limit_replies(tenant: Tenant, pattern: str | None) -> None:
    """Let the tenant's broker requests reply only to queues matching `pattern` (a glob,
    `myapp.*`); None: to any queue but the product's own."""
    if pattern is not None and not REPLY_QUEUES.fullmatch(pattern):
        raise TenantError("reply queues are a glob of letters, digits, _ . : - * ? [ ]")
    tenant.reply_queues = pattern
