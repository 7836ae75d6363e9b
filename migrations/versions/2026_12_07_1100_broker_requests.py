"""Generation requests over the broker: broker_requests (one per request_id), jobs.request_id
and jobs.reply, replies (events sent as the producer's own tasks), tenants.reply_queues; a
refused request's event has no job

Revision ID: 0016
Revises: 0014
Create Date: 2026-12-07 11:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0016"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("now()")


def upgrade() -> None:
    op.add_column("tenants", sa.Column("reply_queues", sa.String(length=200)))
    op.add_column("jobs", sa.Column("request_id", sa.String(length=255)))
    op.add_column("jobs", sa.Column("reply", postgresql.JSONB(astext_type=sa.Text())))
    op.create_index("ix_jobs_tenant_id_request_id", "jobs", ["tenant_id", "request_id"])
    op.alter_column("tenant_events", "job_id", nullable=True)
    op.alter_column("callback_deliveries", "job_id", nullable=True)
    op.create_table(
        "broker_requests",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.Uuid()),
        sa.Column("problem", postgresql.JSONB(astext_type=sa.Text())),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_broker_requests_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_broker_requests_job_id_jobs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "request_id", name=op.f("pk_broker_requests")),
    )
    op.create_table(
        "replies",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("task", sa.String(length=200), nullable=False),
        sa.Column("queue", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("last_error", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True)),
        sa.ForeignKeyConstraint(
            ["id"],
            ["tenant_events.id"],
            name=op.f("fk_replies_id_tenant_events"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_replies_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replies")),
    )
    op.create_index("ix_replies_status_next", "replies", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_replies_status_next", table_name="replies")
    op.drop_table("replies")
    op.drop_table("broker_requests")
    op.execute("DELETE FROM tenant_events WHERE job_id IS NULL")
    op.alter_column("callback_deliveries", "job_id", nullable=False)
    op.alter_column("tenant_events", "job_id", nullable=False)
    op.drop_index("ix_jobs_tenant_id_request_id", table_name="jobs")
    op.drop_column("jobs", "reply")
    op.drop_column("jobs", "request_id")
    op.drop_column("tenants", "reply_queues")
