"""token expiry, shared rate-limit budgets, and a list index by project, state and time

``tokens.expires_at``: a token may be issued with an end (NULL: it never expires). ``rate_budgets``:
how many requests each user has drawn from the per-minute budget in one window, shared by every
API process and replica (``broker.service.ratelimit``); rows of past windows are deleted as they
age. ``ix_jobs_project_state_submitted`` serves the researchers' usual list (one project, one
state, newest first) without sorting the project's matching rows.

Revision ID: perfapi_token_expiry
Revises: arrays_queue
Create Date: 2026-11-26 17:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "perfapi_token_expiry"
down_revision = "arrays_queue"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "rate_budgets",
        sa.Column("key", sa.String(length=80), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", "window_start"),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_jobs_project_state_submitted",
            ["project_id", "state", "submitted_at", "id"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_project_state_submitted")
    op.drop_table("rate_budgets")
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.drop_column("expires_at")
