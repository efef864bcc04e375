"""admission queue and placement: queued jobs keep their script until released; projects'
queue hold; whether the broker placed a job

Revision ID: arrays_queue
Revises: arrays_tasks
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "arrays_queue"
down_revision = "arrays_tasks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("queue_held", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("queued_script", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("queued_environment", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("queue_reason", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("queue_message", sa.String(length=200), nullable=True))
        batch_op.add_column(
            sa.Column("release_claimed_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("placed", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("moves", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("move_target", sa.String(length=130), nullable=True))
        batch_op.add_column(sa.Column("in_slurm_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("in_slurm_since")
        batch_op.drop_column("move_target")
        batch_op.drop_column("moves")
        batch_op.drop_column("placed")
        batch_op.drop_column("release_claimed_at")
        batch_op.drop_column("queue_message")
        batch_op.drop_column("queue_reason")
        batch_op.drop_column("queued_environment")
        batch_op.drop_column("queued_script")
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_column("queue_held")
