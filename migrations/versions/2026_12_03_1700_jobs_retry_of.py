"""jobs: retry_of, the job a retry was made from

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 17:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("retry_of", sa.Uuid()))
    op.create_foreign_key(
        op.f("fk_jobs_retry_of_jobs"), "jobs", "jobs", ["retry_of"], ["id"], ondelete="SET NULL"
    )
    op.create_index(op.f("ix_jobs_retry_of"), "jobs", ["retry_of"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_jobs_retry_of"), table_name="jobs")
    op.drop_constraint(op.f("fk_jobs_retry_of_jobs"), "jobs", type_="foreignkey")
    op.drop_column("jobs", "retry_of")
