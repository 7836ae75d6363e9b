"""steps: due times, failures and resends counted, submit misses, store deadlines, outbox
leases, callback attempt leases and circuit breakers, quarantined tasks

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 15:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COUNTERS = {
    "jobs": ("step_failures", "resends", "recover_misses"),
    "outbox": ("attempts",),
    "webhook_deliveries": ("resends",),
}
_TIMES = {
    "jobs": ("last_miss_at", "output_at", "store_deadline_at"),
    "outbox": ("claimed_until",),
    "webhook_deliveries": ("sending_until",),
}


def upgrade() -> None:
    # The poll's next check becomes the due time of whatever step the job is in.
    op.alter_column("jobs", "next_poll_at", new_column_name="due_at")
    op.drop_index("ix_jobs_status_next_poll_at", table_name="jobs")
    op.create_index("ix_jobs_status_due_at", "jobs", ["status", "due_at"], unique=False)
    for table, names in _COUNTERS.items():
        for name in names:
            op.add_column(table, sa.Column(name, sa.Integer(), server_default="0", nullable=False))
    for table, names in _TIMES.items():
        for name in names:
            op.add_column(table, sa.Column(name, sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "webhook_deliveries", sa.Column("host", sa.Text(), server_default="", nullable=False)
    )
    # scheme://host[:port], as `callbacks.host_of` writes it for new rows.
    op.execute(
        "UPDATE webhook_deliveries SET host = substring(url from '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*')"
    )
    op.create_index(
        op.f("ix_webhook_deliveries_host"), "webhook_deliveries", ["host"], unique=False
    )
    # Jobs already storing get the deadline they would have had.
    op.execute(
        "UPDATE jobs SET output_at = updated_at, store_deadline_at = updated_at + interval '1 day'"
        " WHERE status = 'storing'"
    )
    op.create_index(
        op.f("ix_wavespeed_webhooks_received_at"),
        "wavespeed_webhooks",
        ["received_at"],
        unique=False,
    )
    op.create_table(
        "callback_hosts",
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("open_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_success_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("host", name=op.f("pk_callback_hosts")),
    )
    op.create_table(
        "quarantined_tasks",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("subject_id", sa.Uuid(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantined_tasks")),
    )
    op.create_index(
        op.f("ix_quarantined_tasks_subject_id"), "quarantined_tasks", ["subject_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_quarantined_tasks_subject_id"), table_name="quarantined_tasks")
    op.drop_table("quarantined_tasks")
    op.drop_table("callback_hosts")
    op.drop_index(op.f("ix_webhook_deliveries_host"), table_name="webhook_deliveries")
    op.drop_column("webhook_deliveries", "host")
    op.drop_index(op.f("ix_wavespeed_webhooks_received_at"), table_name="wavespeed_webhooks")
    for table, names in _TIMES.items():
        for name in names:
            op.drop_column(table, name)
    for table, names in _COUNTERS.items():
        for name in names:
            op.drop_column(table, name)
    op.drop_index("ix_jobs_status_due_at", table_name="jobs")
    op.alter_column("jobs", "due_at", new_column_name="next_poll_at")
    op.create_index("ix_jobs_status_next_poll_at", "jobs", ["status", "next_poll_at"], unique=False)
