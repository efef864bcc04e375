"""jobs: the Slurm job a moved job left behind

A job the broker moved to another cluster (``broker.service.moves``) leaves its first Slurm job,
cancelled before it ran, in squeue on the old cluster for ``MinJobAge``. The poller must know
that one as the broker's own and not report it as a foreign job; it was recognised by the tag of
a job that had moved, which could not tell it from a copy of the tag, nor cover a move that fell
back to the cluster it came from. These columns name it exactly.

Revision ID: moved_from
Revises: live_job_totals
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "moved_from"
down_revision = "live_job_totals"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("moved_from_cluster", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("moved_from_slurm_job_id", sa.String(length=32), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("moved_from_slurm_job_id")
        batch_op.drop_column("moved_from_cluster")
