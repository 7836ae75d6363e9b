"""Jobs indexed by creation time, for spend since a date: a tenant's budget check at every
create (tenant, then time) and the console's spend of every tenant (time alone)

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-09 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_jobs_created_at": ["created_at"],
    "ix_jobs_tenant_id_created_at": ["tenant_id", "created_at"],
}

INVALID = sa.text(
    "SELECT 1 FROM pg_index JOIN pg_class ON pg_class.oid = pg_index.indexrelid "
    "WHERE pg_class.relname = :name AND NOT pg_index.indisvalid"
)


def upgrade() -> None:
    # Built concurrently, outside the migration's transaction, so creates go on meanwhile
    # (the revisions before this one are committed first). A build that was interrupted
    # leaves an invalid index of the name behind: it is dropped and built again.
    bind = op.get_bind()
    with op.get_context().autocommit_block():
        for name, columns in INDEXES.items():
            if bind.execute(INVALID, {"name": name}).first():
                op.drop_index(name, "jobs", postgresql_concurrently=True)
            op.create_index(name, "jobs", columns, postgresql_concurrently=True, if_not_exists=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name in INDEXES:
            op.drop_index(name, "jobs", postgresql_concurrently=True, if_exists=True)
