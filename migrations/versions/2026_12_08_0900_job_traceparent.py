"""The W3C traceparent of the request that created a job, for the spans of its later steps

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-08 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable and without a default: adding it rewrites nothing, and jobs made with tracing
    # off (or before this revision) simply have none.
    op.add_column("jobs", sa.Column("traceparent", sa.String(length=55)))


def downgrade() -> None:
    op.drop_column("jobs", "traceparent")
