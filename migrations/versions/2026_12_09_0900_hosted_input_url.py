"""The URL WaveSpeed stored the current submit attempt's input image under
(INPUT_HOSTING=wavespeed), recorded before the POST, for a history lookup to match

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-09 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable and without a default: adding it rewrites nothing; jobs whose input is hosted
    # in S3 (or submitted before this revision) have none.
    op.add_column("jobs", sa.Column("hosted_input_url", sa.Text()))


def downgrade() -> None:
    op.drop_column("jobs", "hosted_input_url")
