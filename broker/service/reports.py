"""Usage reports across projects for admins and engineers (``/v1/usage``)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from broker.db.models import JobRecord, ProjectRecord, UserRecord
from broker.errors import ValidationFailed
from broker.lifecycle import JobState
from broker.schemas import UsageReport, UsageRow
from broker.service.identity import Actor
from quotas import gpu_hours

GroupBy = Literal["project", "user", "cluster", "gpu_type"]


def usage(
    session: Session,
    actor: Actor,
    group_by: GroupBy,
    start: datetime | None,
    end: datetime | None,
) -> UsageReport:
    """Charged GPU-hours and job counts of jobs submitted in [start, end), grouped (admins and
    engineers)."""
    actor.require_reader()
    for name, value in (("from", start), ("to", end)):
        if value is not None and value.tzinfo is None:
            raise ValidationFailed(
                f"{name} needs a timezone",
                [{"field": name, "message": "e.g. 2027-01-01T00:00:00Z"}],
            )
    key = {
        "project": ProjectRecord.name,
        "user": UserRecord.name,
        "cluster": JobRecord.cluster,
        "gpu_type": JobRecord.gpu_type,
    }[group_by]
    query = (
        select(
            key,
            func.coalesce(func.sum(JobRecord.charged_gpu_seconds), 0),
            func.count(JobRecord.id),
            func.sum(case((JobRecord.state == JobState.COMPLETED.value, 1), else_=0)),
        )
        .join(ProjectRecord, ProjectRecord.id == JobRecord.project_id)
        .join(UserRecord, UserRecord.id == JobRecord.user_id)
        .group_by(key)
        .order_by(key)
    )
    if start is not None:
        query = query.where(JobRecord.submitted_at >= start)
    if end is not None:
        query = query.where(JobRecord.submitted_at < end)
    rows = [
        UsageRow(key=str(k), gpu_hours=gpu_hours(int(s)), jobs=int(n), jobs_completed=int(c or 0))
        for k, s, n, c in session.execute(query).all()
    ]
    return UsageReport(group_by=group_by, from_=start, to=end, data=rows)


def usage_csv(report: UsageReport) -> str:
    lines = [f"{report.group_by},gpu_hours,jobs,jobs_completed"]
    for row in report.data:
        key = row.key.replace('"', '""')
        lines.append(f'"{key}",{row.gpu_hours},{row.jobs},{row.jobs_completed}')
    return "\r\n".join(lines) + "\r\n"
