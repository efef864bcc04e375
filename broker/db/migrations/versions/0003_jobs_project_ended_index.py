"""index jobs by project and end time, for the ledger's per-period charges

A period's use is the part of each finished job's charge that it ran inside the period, read from
the job rows (``broker.service.ledger``): every row that can contribute ended at or after the
period's start, so this index turns the ledger's sums into a range scan of the jobs ended since.
No data changes: charges stay where they were (``charged_gpu_seconds``, ``started_at``,
``ended_at``), so there is nothing to backfill.

Revision ID: w5_ledger_ended
Revises: w3api_cursor_key
Create Date: 2026-11-28 10:00:00
"""

from __future__ import annotations

from alembic import op

revision = "w5_ledger_ended"
down_revision = "w3api_cursor_key"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_project_ended", ["project_id", "ended_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_project_ended")
