"""jobs: a partial index of job arrays by state

``/metrics`` reads the live job arrays at every scrape (``broker.metrics.queue_state``). Through
``ix_jobs_state`` that meant fetching every live job's row to keep the few arrays: about 100 ms
with 60,000 live jobs among 1,000,000. This index holds the arrays only.

Revision ID: arrays_state_index
Revises: ledger_totals
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "arrays_state_index"
down_revision = "ledger_totals"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_jobs_arrays_state",
            ["state"],
            unique=False,
            postgresql_where=sa.text("array_size IS NOT NULL"),
            sqlite_where=sa.text("array_size IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_arrays_state")
