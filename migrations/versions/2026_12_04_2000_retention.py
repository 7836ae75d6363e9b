"""jobs.deleted_at (a deleted job's tombstone) and tenants.retain_days

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 20:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("deleted_at", sa.DateTime(timezone=True)))
    op.add_column("tenants", sa.Column("retain_days", sa.Integer()))


def downgrade() -> None:
    op.drop_column("tenants", "retain_days")
    op.drop_column("jobs", "deleted_at")
