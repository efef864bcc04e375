"""jobs run as the researcher: users' and jobs' unix_user, jobs' output paths

Revision ID: w6_identity
Revises: w3api_cursor_key
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "w6_identity"
down_revision = "w3api_cursor_key"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("unix_user", sa.String(length=32), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("unix_user", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("stdout_path", sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column("stderr_path", sa.String(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("stderr_path")
        batch_op.drop_column("stdout_path")
        batch_op.drop_column("unix_user")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("unix_user")
