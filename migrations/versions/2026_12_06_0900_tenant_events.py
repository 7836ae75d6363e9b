"""tenant_events: the tenant's feed of every event, which callbacks deliver; a NOTIFY on every
state change of a job, which waiters (long-poll, SSE) wake on

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 09:00:00.000000

Each existing callback delivery becomes the event it carried, under the same id (so the
`webhook-id` a producer has seen names its event in the feed), and its payload moves there.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Wakes the API's waiters on a job (`api.waiters`); notes in the history (from = to) do not.
NOTIFY_FUNCTION = """
CREATE FUNCTION notify_job_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('job_state', NEW.job_id::text);
    RETURN NULL;
END
$$
"""
NOTIFY_TRIGGER = """
CREATE TRIGGER job_events_notify AFTER INSERT ON job_events FOR EACH ROW
WHEN (NEW.from_state IS DISTINCT FROM NEW.to_state)
EXECUTE FUNCTION notify_job_state()
"""


def upgrade() -> None:
    op.create_table(
        "tenant_events",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column(
            "txid",
            sa.BigInteger(),
            server_default=sa.text("(pg_current_xact_id()::text::bigint)"),
            nullable=False,
        ),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_tenant_events_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_tenant_events_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenant_events")),
    )
    op.create_index(
        "ix_tenant_events_feed", "tenant_events", ["tenant_id", "txid", "seq"], unique=False
    )
    op.create_index(op.f("ix_tenant_events_job_id"), "tenant_events", ["job_id"])
    op.execute(
        "INSERT INTO tenant_events (id, tenant_id, job_id, type, payload, created_at) "
        "SELECT id, tenant_id, job_id, event, payload, created_at FROM callback_deliveries "
        "ORDER BY created_at, id"
    )
    op.drop_column("callback_deliveries", "payload")
    op.create_foreign_key(
        op.f("fk_callback_deliveries_id_tenant_events"), "callback_deliveries",
        "tenant_events", ["id"], ["id"], ondelete="CASCADE",
    )  # fmt: skip
    op.execute(NOTIFY_FUNCTION)
    op.execute(NOTIFY_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER job_events_notify ON job_events")
    op.execute("DROP FUNCTION notify_job_state()")
    op.drop_constraint(
        op.f("fk_callback_deliveries_id_tenant_events"), "callback_deliveries", type_="foreignkey"
    )
    op.add_column(
        "callback_deliveries",
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.execute(
        "UPDATE callback_deliveries d SET payload = e.payload FROM tenant_events e "
        "WHERE e.id = d.id"
    )
    op.alter_column("callback_deliveries", "payload", nullable=False)
    op.drop_index(op.f("ix_tenant_events_job_id"), table_name="tenant_events")
    op.drop_index("ix_tenant_events_feed", table_name="tenant_events")
    op.drop_table("tenant_events")
