"""jobs: deadline_at, the whole job's deadline, and charged, what WaveSpeed billed

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("deadline_at", sa.DateTime(timezone=True)))
    op.add_column("jobs", sa.Column("charged", sa.Boolean()))
    # What the older rows prove: a completed job was billed, an expired one never sent.
    op.execute("UPDATE jobs SET charged = true WHERE status = 'completed'")
    op.execute("UPDATE jobs SET charged = false WHERE status = 'expired'")


def downgrade() -> None:
    op.drop_column("jobs", "charged")
    op.drop_column("jobs", "deadline_at")
