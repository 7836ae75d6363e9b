"""tenants: quotas of their own (max_in_flight, weight, submits_per_minute, max_queued)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 19:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("max_in_flight", sa.Integer()))
    op.add_column(
        "tenants", sa.Column("weight", sa.SmallInteger(), server_default="1", nullable=False)
    )
    # A weight of 0 would give a tenant no turn, and divide the gate's turns by zero.
    op.create_check_constraint(op.f("ck_tenants_weight_positive"), "tenants", "weight >= 1")
    op.add_column("tenants", sa.Column("submits_per_minute", sa.Integer()))
    op.add_column("tenants", sa.Column("max_queued", sa.Integer()))
    # A tenant's queued jobs are counted at every create once it has a `max_queued`.
    op.create_index("ix_jobs_tenant_id_status", "jobs", ["tenant_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_id_status", table_name="jobs")
    op.drop_column("tenants", "max_queued")
    op.drop_column("tenants", "submits_per_minute")
    op.drop_constraint(op.f("ck_tenants_weight_positive"), "tenants", type_="check")
    op.drop_column("tenants", "weight")
    op.drop_column("tenants", "max_in_flight")
