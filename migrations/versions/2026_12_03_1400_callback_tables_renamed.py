"""callback tables renamed: "webhook" is WaveSpeed's word for what it sends us, "callback" ours
for what we send producers

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 14:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (old, new) names, in the order they are renamed on the way up.
_TABLES = [("webhook_deliveries", "callback_deliveries"), ("webhook_attempts", "callback_attempts")]
_INDEXES = [
    ("ix_webhook_deliveries_job_id", "ix_callback_deliveries_job_id"),
    ("ix_webhook_deliveries_tenant_id", "ix_callback_deliveries_tenant_id"),
    ("ix_webhook_deliveries_host", "ix_callback_deliveries_host"),
    ("ix_webhook_deliveries_status_next", "ix_callback_deliveries_status_next"),
    ("ix_webhook_attempts_delivery_id", "ix_callback_attempts_delivery_id"),
]
# Primary keys are renamed through their indexes; foreign keys as constraints.
_KEYS = [
    ("pk_webhook_deliveries", "pk_callback_deliveries"),
    ("pk_webhook_attempts", "pk_callback_attempts"),
]
_FOREIGN = [
    (
        "callback_deliveries",
        "fk_webhook_deliveries_job_id_jobs",
        "fk_callback_deliveries_job_id_jobs",
    ),
    (
        "callback_deliveries",
        "fk_webhook_deliveries_tenant_id_tenants",
        "fk_callback_deliveries_tenant_id_tenants",
    ),
    (
        "callback_attempts",
        "fk_webhook_attempts_delivery_id_webhook_deliveries",
        "fk_callback_attempts_delivery_id_callback_deliveries",
    ),
]


def _rename(down: bool) -> None:
    def pick(old: str, new: str) -> tuple[str, str]:
        return (new, old) if down else (old, new)

    if down:  # the constraints first: they are named on the renamed tables
        for table, old, new in _FOREIGN:
            source, target = pick(old, new)
            op.execute(f'ALTER TABLE {table} RENAME CONSTRAINT "{source}" TO "{target}"')
    for old, new in _TABLES:
        source, target = pick(old, new)
        op.rename_table(source, target)
    for old, new in _INDEXES + _KEYS:
        source, target = pick(old, new)
        op.execute(f'ALTER INDEX "{source}" RENAME TO "{target}"')
    source, target = pick("webhook_attempts_id_seq", "callback_attempts_id_seq")
    op.execute(f'ALTER SEQUENCE "{source}" RENAME TO "{target}"')
    if not down:
        for table, old, new in _FOREIGN:
            op.execute(f'ALTER TABLE {table} RENAME CONSTRAINT "{old}" TO "{new}"')


def upgrade() -> None:
    _rename(down=False)


def downgrade() -> None:
    _rename(down=True)
