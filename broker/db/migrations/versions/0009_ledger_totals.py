"""the ledger's running totals: ledger_used, ledger_live, job_totals; jobs indexed by state

A project's ledger was summed from its job rows at every admission, usage read and scrape. These
tables keep the same sums, updated in the transaction of every change (``broker.service.ledger``):
what each project used in its quota's current period by cluster, GPU type and user (user 0: its
foreign jobs), what its live jobs hold by cluster, and its finished jobs' totals by state. They are
filled here from the existing rows with the same arithmetic (``quotas.charged_within``). The state
index serves the queries over live jobs only (the poller's, the live part of /metrics).

Revision ID: ledger_totals
Revises: perfapi_token_expiry
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from quotas import charged_within

revision = "ledger_totals"
down_revision = "perfapi_token_expiry"
branch_labels = None
depends_on = None

LIVE = ("queued", "submitting", "submit_unknown", "pending", "running")
FOREIGN_USER = 0


def upgrade() -> None:
    op.create_table(
        "ledger_used",
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("cluster", sa.String(length=64), nullable=False),
        sa.Column("gpu_type", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("used_gpu_seconds", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("project_id", "cluster", "gpu_type", "user_id"),
    )
    op.create_table(
        "ledger_live",
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("cluster", sa.String(length=64), nullable=False),
        sa.Column("reserved_gpu_seconds", sa.BigInteger(), nullable=False),
        sa.Column("live_gpus", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("project_id", "cluster"),
    )
    op.create_table(
        "job_totals",
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("cluster", sa.String(length=64), nullable=False),
        sa.Column("gpu_type", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("jobs", sa.BigInteger(), nullable=False),
        sa.Column("gpus", sa.BigInteger(), nullable=False),
        sa.Column("charged_gpu_seconds", sa.BigInteger(), nullable=False),
        sa.Column("gpu_seconds", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("project_id", "cluster", "gpu_type", "state"),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_state", ["state"], unique=False)
    _backfill(op.get_bind())


def _backfill(bind: sa.Connection) -> None:
    meta = sa.MetaData()
    jobs = sa.Table("jobs", meta, autoload_with=bind)
    foreign = sa.Table("foreign_jobs", meta, autoload_with=bind)
    quotas = sa.Table("quotas", meta, autoload_with=bind)
    used_t = sa.Table("ledger_used", meta, autoload_with=bind)
    live_t = sa.Table("ledger_live", meta, autoload_with=bind)
    totals_t = sa.Table("job_totals", meta, autoload_with=bind)
    j, f = jobs.c, foreign.c

    used: dict[tuple[int, str, str, int], int] = defaultdict(int)
    for project_id, start, end in bind.execute(
        sa.select(quotas.c.project_id, quotas.c.period_start, quotas.c.period_end)
    ):
        start, end = _aware(start), _aware(end)
        # Every job with a part in [start, end) ended at or after start (ix_jobs_project_ended).
        for cluster, gpu_type, user_id, charge, started, ended in bind.execute(
            sa.select(
                j.cluster, j.gpu_type, j.user_id, j.charged_gpu_seconds, j.started_at, j.ended_at
            ).where(
                j.project_id == project_id,
                j.charged_gpu_seconds > 0,
                j.ended_at >= start,
            )
        ):
            part = charged_within(charge, _maybe(started), _aware(ended), start, end)
            if part:
                used[(project_id, cluster, gpu_type, user_id)] += part
        for cluster, charge, ended in bind.execute(
            sa.select(f.cluster, f.charged_gpu_seconds, f.ended_at).where(
                f.project_id == project_id,
                f.charged_gpu_seconds > 0,
                f.ended_at >= start,
            )
        ):
            if _aware(ended) < end:
                used[(project_id, cluster, "", FOREIGN_USER)] += int(charge)
    rows = [
        {"project_id": p, "cluster": c, "gpu_type": g, "user_id": u, "used_gpu_seconds": s}
        for (p, c, g, u), s in used.items()
        if s
    ]
    if rows:
        bind.execute(used_t.insert(), rows)

    live = [
        {"project_id": p, "cluster": c, "reserved_gpu_seconds": int(r or 0), "live_gpus": int(g)}
        for p, c, r, g in bind.execute(
            sa.select(
                j.project_id,
                j.cluster,
                sa.func.sum(j.reserved_gpu_seconds),
                # GPUs against the concurrency limits: an array's tasks that may run together;
                # none for a job waiting in the broker's queue (broker.service.ledger.held_gpus)
                sa.func.sum(
                    sa.case(
                        (j.state == "queued", 0),
                        else_=j.gpus * sa.func.coalesce(j.array_max_parallel, j.array_size, 1),
                    )
                ),
            )
            .where(j.state.in_(LIVE))
            .group_by(j.project_id, j.cluster)
        )
    ]
    if live:
        bind.execute(live_t.insert(), live)

    finished = [
        {
            "project_id": p,
            "cluster": c,
            "gpu_type": g,
            "state": s,
            "jobs": int(n),
            "gpus": int(gpus or 0),
            "charged_gpu_seconds": int(charged or 0),
            "gpu_seconds": int(gpu_seconds or 0),
        }
        for p, c, g, s, n, gpus, charged, gpu_seconds in bind.execute(
            sa.select(
                j.project_id,
                j.cluster,
                j.gpu_type,
                j.state,
                sa.func.count(),
                sa.func.sum(j.gpus),
                sa.func.sum(j.charged_gpu_seconds),
                sa.func.sum(j.alloc_gpus * j.elapsed_s),
            )
            .where(j.state.not_in(LIVE))
            .group_by(j.project_id, j.cluster, j.gpu_type, j.state)
        )
    ]
    if finished:
        bind.execute(totals_t.insert(), finished)


def _aware(value: datetime | str) -> datetime:
    """A stored time as an aware UTC datetime (SQLite hands back naive values or text)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _maybe(value: datetime | str | None) -> datetime | None:
    return None if value is None else _aware(value)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_state")
    op.drop_table("job_totals")
    op.drop_table("ledger_live")
    op.drop_table("ledger_used")
