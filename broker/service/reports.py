"""Usage reports across projects for admins and engineers (``/v1/usage``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import SQLColumnExpression, case, func, select
from sqlalchemy.orm import Session

from broker.db.models import JobRecord, ProjectRecord, UserRecord
from broker.errors import ValidationFailed
from broker.lifecycle import JobState
from broker.schemas import UsageReport, UsageRow
from broker.service import ledger
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
    """GPU-hours charged in [start, end) and counts of the jobs submitted in it, grouped (admins
    and engineers).

    GPU-hours are what jobs ran inside the window, as the quota ledger counts a period (a job that
    ran across ``start`` or ``end`` contributes only its part inside), so a report over a quota's
    period agrees with the project's usage.
    """
    actor.require_reader()
    for name, value in (("from", start), ("to", end)):
        if value is not None and value.tzinfo is None:
            raise ValidationFailed(
                f"{name} needs a timezone",
                [{"field": name, "message": "e.g. 2027-01-01T00:00:00Z"}],
            )
    job_key: SQLColumnExpression[Any] = {
        "project": JobRecord.project_id,
        "user": JobRecord.user_id,
        "cluster": JobRecord.cluster,
        "gpu_type": JobRecord.gpu_type,
    }[group_by]
    counts_query = select(
        job_key,
        func.count(JobRecord.id),
        func.sum(case((JobRecord.state == JobState.COMPLETED.value, 1), else_=0)),
    ).group_by(job_key)
    if start is not None:
        counts_query = counts_query.where(JobRecord.submitted_at >= start)
    if end is not None:
        counts_query = counts_query.where(JobRecord.submitted_at < end)
    counts = {k: (int(n), int(c or 0)) for k, n, c in session.execute(counts_query).all()}
    charged = {k: s for (k,), s in ledger.charges_within(session, [job_key], start, end).items()}
    names = _names(session, group_by, set(counts) | set(charged))
    rows = sorted(
        (
            UsageRow(
                key=names.get(k, str(k)),
                gpu_hours=gpu_hours(charged.get(k, 0)),
                jobs=counts.get(k, (0, 0))[0],
                jobs_completed=counts.get(k, (0, 0))[1],
            )
            for k in set(counts) | set(charged)
        ),
        key=lambda row: row.key,
    )
    return UsageReport(group_by=group_by, from_=start, to=end, data=rows)


def _names(session: Session, group_by: GroupBy, keys: set[Any]) -> dict[Any, str]:
    """Display names of grouped ids (projects and users are grouped by id, shown by name)."""
    if group_by == "project":
        table: type[ProjectRecord] | type[UserRecord] = ProjectRecord
    elif group_by == "user":
        table = UserRecord
    else:
        return {k: str(k) for k in keys}
    names: dict[Any, str] = {}
    for row_id, name in session.execute(select(table.id, table.name).where(table.id.in_(keys))):
        names[row_id] = name
    return names


def usage_csv(report: UsageReport) -> str:
    lines = [f"{report.group_by},gpu_hours,jobs,jobs_completed"]
    for row in report.data:
        key = row.key.replace('"', '""')
        lines.append(f'"{key}",{row.gpu_hours},{row.jobs},{row.jobs_completed}')
    return "\r\n".join(lines) + "\r\n"
