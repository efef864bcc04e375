"""Health, readiness, metrics, clusters, reports and the audit log."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from broker.api.deps import CurrentActor, RuntimeDep, SessionDep
from broker.api.problems import problem
from broker.schemas import AuditPage, ClustersPublic, Ready, ReadyCluster, UsageReport, rfc3339
from broker.service import audit, reports
from broker.service.clusters import cluster_views

router = APIRouter()


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """The process is alive. Answered on the event loop itself: a burst of submissions that
    holds every worker thread (each waits for its sbatch) must not make a live broker look dead
    to its supervisor."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], response_model=Ready)
def readyz(session: SessionDep, runtime: RuntimeDep) -> Response:
    """200 when the database answers, with each cluster's state from the last poll."""
    try:
        session.execute(text("SELECT 1"))
        views = cluster_views(session, runtime.clusters.names)
    except Exception:
        return problem(503, "not-ready", "Not ready", "the database does not answer")
    body = Ready(
        status="ok",
        database="ok",
        clusters=[
            ReadyCluster(name=c.name, up=c.up, last_poll_at=c.last_poll_at) for c in views.data
        ],
    )
    return Response(body.model_dump_json(), media_type="application/json")


@router.get("/metrics", tags=["health"], include_in_schema=True)
def metrics(request: Request) -> Response:
    """Prometheus text format, from what the broker already holds (no SSH)."""
    return Response(
        generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST
    )


@router.get("/v1/clusters", tags=["clusters"], response_model=ClustersPublic)
def clusters(actor: CurrentActor, session: SessionDep, runtime: RuntimeDep) -> ClustersPublic:
    """Capacity from the broker's last poll: no SSH on the request path."""
    return cluster_views(session, runtime.clusters.names)


@router.get("/v1/usage", tags=["reports"], response_model=UsageReport)
def usage_report(
    request: Request,
    actor: CurrentActor,
    session: SessionDep,
    from_: Annotated[datetime | None, Query(alias="from")] = None,
    to: datetime | None = None,
    group_by: Literal["project", "user", "cluster", "gpu_type"] = "project",
) -> Response:
    """GPU-hours and job counts per group; ``Accept: text/csv`` for CSV."""
    report = reports.usage(session, actor, group_by, from_, to)
    if "text/csv" in request.headers.get("accept", ""):
        return Response(reports.usage_csv(report), media_type="text/csv")
    payload = report.model_dump(mode="json", by_alias=True)
    payload["from"] = rfc3339(from_) if from_ else None
    return Response(json.dumps(payload), media_type="application/json")


@router.get("/v1/audit", tags=["reports"], response_model=AuditPage)
def audit_log(
    actor: CurrentActor,
    session: SessionDep,
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> AuditPage:
    return audit.page(session, actor, runtime.cursors, limit, cursor)
