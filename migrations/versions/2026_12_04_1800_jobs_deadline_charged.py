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
    # What the older rows prove, by the rule of `workers.charges`: an output was billed; an
    # expired job, or an ended one that never got a prediction (and was not stopped while a
    # submit was on its way), was not; a prediction failed at WaveSpeed was refunded.
    op.execute(
        """
        UPDATE jobs SET charged = CASE
            WHEN output_url IS NOT NULL OR status = 'completed' THEN true
            WHEN status = 'expired' THEN false
            WHEN error_code IN ('invalid_input', 'image_unreachable', 'content_moderated',
                                'generation_failed', 'upstream_unavailable') THEN false
            WHEN prediction_id IS NULL
                 AND error_code NOT IN ('submit_unconfirmed', 'quarantined', 'cancelled')
                THEN false
        END
        WHERE status IN ('completed', 'failed', 'cancelled', 'expired')
        """
    )


def downgrade() -> None:
    op.drop_column("jobs", "charged")
    op.drop_column("jobs", "deadline_at")
