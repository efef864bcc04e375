"""jobs run as the researcher: users' and jobs' unix_user, jobs' output paths, foreign jobs

Revision ID: w6_identity
Revises: w5_ledger_ended
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "w6_identity"
down_revision = "w5_ledger_ended"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("unix_user", sa.String(length=32), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("unix_user", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("stdout_path", sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column("stderr_path", sa.String(length=1024), nullable=True))
    op.create_table(
        "foreign_jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("cluster", sa.String(length=64), nullable=False),
        sa.Column("slurm_job_id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("account", sa.String(length=64), nullable=False),
        sa.Column("unix_user", sa.String(length=32), nullable=True),
        sa.Column("name", sa.String(length=128), nullable=True),
        sa.Column("gpu_type", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("slurm_state", sa.String(length=32), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("alloc_gpus", sa.Integer(), nullable=True),
        sa.Column("elapsed_s", sa.Integer(), nullable=True),
        sa.Column("missing_polls", sa.Integer(), nullable=False),
        sa.Column("charged_gpu_seconds", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("cluster", "slurm_job_id", name="uq_foreign_jobs_cluster_id"),
    )
    op.create_index(
        "ix_foreign_jobs_project_ended", "foreign_jobs", ["project_id", "ended_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_foreign_jobs_project_ended", table_name="foreign_jobs")
    op.drop_table("foreign_jobs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("stderr_path")
        batch_op.drop_column("stdout_path")
        batch_op.drop_column("unix_user")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("unix_user")
