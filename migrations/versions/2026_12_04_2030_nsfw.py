"""jobs.nsfw (WaveSpeed's has_nsfw_contents) and tenants.reject_nsfw

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 20:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("nsfw", postgresql.JSONB(astext_type=sa.Text())))
    op.add_column(
        "tenants",
        sa.Column("reject_nsfw", sa.Boolean(), server_default="false", nullable=False),
    )


def downgrade() -> None:
    op.drop_column("tenants", "reject_nsfw")
    op.drop_column("jobs", "nsfw")
