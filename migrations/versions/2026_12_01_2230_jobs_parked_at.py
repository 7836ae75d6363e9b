"""jobs.parked_at: queued jobs with no submit message on its way

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 22:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True))
    # Jobs queued before this revision may have had their message used up already: park them,
    # so the gate sends them a message when it admits them (a spare message is harmless).
    op.execute("UPDATE jobs SET parked_at = now() WHERE status = 'queued' AND admitted_at IS NULL")


def downgrade() -> None:
    op.drop_column("jobs", "parked_at")
