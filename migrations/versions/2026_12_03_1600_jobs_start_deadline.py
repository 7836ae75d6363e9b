"""jobs: start_deadline_at, past which a job never submitted ends `expired`

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 16:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("start_deadline_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("jobs", "start_deadline_at")
