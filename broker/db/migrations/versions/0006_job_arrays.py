"""job arrays: the array a job was asked as, and one row per task Slurm has started

Revision ID: arrays_tasks
Revises: ui_sessions
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "arrays_tasks"
down_revision = "ui_sessions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("array_size", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("array_max_parallel", sa.Integer(), nullable=True))
    op.create_table(
        "job_tasks",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("slurm_job_id", sa.String(length=32), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("alloc_gpus", sa.Integer(), nullable=True),
        sa.Column("elapsed_s", sa.Integer(), nullable=True),
        sa.Column("charged_gpu_seconds", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "index"),
    )


def downgrade() -> None:
    op.drop_table("job_tasks")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("array_max_parallel")
        batch_op.drop_column("array_size")
