"""The web pages under ``/ui/``: sign-in, jobs, submit, job, projects, admin and the pool.

Each route is a thin shell over the service layer, exactly as the API's routes are: the
authorization, the validation and the problem messages are the service's and the schemas'.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import secrets
import uuid
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, BackgroundTasks, Depends, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from broker.db.engine import transaction
from broker.errors import BrokerError, Forbidden, LimitExceeded, Unauthenticated
from broker.lifecycle import JobState, is_final
from broker.schemas import (
    JobCreate,
    JobPublic,
    MemberPut,
    ProjectCreate,
    QuotaPut,
    TokenCreate,
    UserCreate,
    UserPatch,
)
from broker.service import identity, pool, projects
from broker.service.clusters import cluster_views
from broker.service.job_reads import JobFilter
from broker.service.oidc import ProviderUnreachable
from broker.service.oidc_login import PENDING_LOGIN_SECONDS, LoginFailed, OidcLogin, PendingLogin
from broker.ui.sessions import (
    COOKIE_PATH,
    LOGIN_CSRF_COOKIE,
    PageSession,
    active_sessions,
    cookie_secure,
    csrf_ok,
    end_session,
    end_user_sessions,
    start_session,
    token_id_of,
)
from broker.ui.web import (
    Post,
    csrf_post,
    redirect,
    render,
    runtime_of,
    signed_in,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/ui", include_in_schema=False)

Page = Annotated[PageSession, Depends(signed_in)]
FormPost = Annotated[Post, Depends(csrf_post)]

STATES = [s.value for s in JobState]
OUTPUT_CHUNK = 65536
FORM_ERROR = "_form"
"""Key of the errors that belong to no single field (shown above the form)."""


# --- sign-in ----------------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Only a path of these pages: never another site (``//evil``) after sign-in."""
    if target and target.startswith("/ui/") and not target.startswith("//"):
        return target
    return "/ui/jobs"


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
def home() -> Response:
    return redirect("/ui/jobs")


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None, error: str = "") -> Response:
    return _login_page(request, _safe_next(next), error)


def _login_page(request: Request, target: str, error: str, status: int = 200) -> Response:
    login_csrf = secrets.token_urlsafe(32)
    state = request.app.state
    response = render(
        request,
        "login.html",
        None,
        status=status,
        next=target,
        error=error,
        csrf=login_csrf,
        # Set by a federated sign-in (OIDC) when one is configured: its start URL and label.
        oidc_url=getattr(state, "ui_oidc_login_url", None),
        oidc_name=getattr(state, "ui_oidc_login_label", "your institution"),
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        login_csrf,
        max_age=3600,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=cookie_secure(request, runtime_of(request)),
    )
    return response


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Token sign-in: the token is checked as the API checks it, then forgotten; the browser
    keeps only a session cookie. The form's CSRF token must match its cookie (double submit)."""
    form = await request.form()
    target = _safe_next(str(form.get("next") or ""))
    if not csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE, ""), str(form.get("csrf_token") or "")):
        return _login_page(request, target, "The sign-in form expired; please try again.", 403)
    token = str(form.get("token") or "").strip()
    runtime = runtime_of(request)
    limiter = request.app.state.rate_limiter
    failures = f"failed-auth:{request.client.host if request.client else '-'}"
    limiter.require_room(failures)

    def check() -> str | None:
        try:
            with transaction(runtime.sessions) as session:
                return identity.authenticate(session, token).name
        except Unauthenticated:
            return None

    from starlette.concurrency import run_in_threadpool

    name = await run_in_threadpool(check)
    if name is None:
        limiter.check(failures)
        return _login_page(request, target, "That token is not valid.", 401)
    token_id = await run_in_threadpool(token_id_of, runtime, token)
    response = redirect(target)
    await run_in_threadpool(
        start_session, response, request, runtime, name, via="token", token_id=token_id
    )
    return response


@router.post("/logout")
def logout(request: Request, post: FormPost) -> Response:
    """End the page session; one that began at the provider ends there too, where configured
    (``auth.oidc.web_sign_out_at_provider``), so that this browser's next sign-in asks again."""
    runtime = runtime_of(request)
    target = "/ui/login"
    login = _oidc_login(request)
    if (
        post.page.via == "oidc"
        and login is not None
        and runtime.settings.auth.oidc.web_sign_out_at_provider
    ):
        target = login.sign_out_url(_public_uri(request, "login_form")) or target
    response = redirect(target)
    end_session(request, response, runtime)
    return response


# --- jobs -------------------------------------------------------------------------------------


def _job_filter(page: PageSession, project: str | None, state: str | None) -> JobFilter:
    return JobFilter(
        project=project or None,
        state=state if state in STATES else None,
        user=page.actor.name if page.actor.role == "researcher" else None,
    )


def _jobs(
    request: Request, page: PageSession, project: str | None, state: str | None, cursor: str | None
) -> Any:
    runtime = runtime_of(request)
    where = _job_filter(page, project, state)
    limit = runtime.settings.limits.default_list_limit
    return runtime.jobs.list(page.actor, where, limit, cursor or None)


def _project_names(request: Request, page: PageSession) -> list[str]:
    with runtime_of(request).sessions() as session:
        return [p.name for p in projects.list_projects(session, page.actor).data]


def _query(**params: str | None) -> str:
    return urlencode({k: v for k, v in params.items() if v})


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(
    request: Request,
    page: Page,
    project: str | None = None,
    state: str | None = None,
    cursor: str | None = None,
) -> Response:
    listing = _jobs(request, page, project, state, cursor)
    return render(
        request,
        "jobs.html",
        page,
        jobs=listing.data,
        projects=_project_names(request, page),
        states=STATES,
        project=project or "",
        state=state or "",
        query=_query(project=project, state=state, cursor=cursor),
        older=_query(project=project, state=state, cursor=listing.next_cursor)
        if listing.next_cursor
        else "",
    )


@router.get("/jobs/rows", response_class=HTMLResponse)
def jobs_rows(
    request: Request,
    page: Page,
    project: str | None = None,
    state: str | None = None,
    cursor: str | None = None,
) -> Response:
    """The table body alone, polled by the jobs page for live states."""
    listing = _jobs(request, page, project, state, cursor)
    query = _query(project=project, state=state, cursor=cursor)
    return render(request, "_job_rows.html", page, jobs=listing.data, query=query)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, page: Page, job_id: str) -> Response:
    runtime = runtime_of(request)
    job = runtime.jobs.get(page.actor, job_id)
    events = runtime.jobs.events(page.actor, job_id).data
    # Output is for the submitter and admins (API.md); others see that it is not theirs to read.
    reads_output = page.actor.is_admin or job.user == page.actor.name
    return render(
        request,
        "job.html",
        page,
        job=job,
        events=events,
        reads_output=reads_output,
        may_cancel=_may_cancel(page, job),
    )


def _may_cancel(page: PageSession, job: JobPublic) -> bool:
    return page.actor.role != "engineer" and not is_final(job.state)


@router.get("/jobs/{job_id}/status", response_class=HTMLResponse)
def job_status(request: Request, page: Page, job_id: str) -> Response:
    """The job's state block and events, polled while the job is live."""
    runtime = runtime_of(request)
    job = runtime.jobs.get(page.actor, job_id)
    events = runtime.jobs.events(page.actor, job_id).data
    return render(
        request,
        "_job_status.html",
        page,
        job=job,
        events=events,
        may_cancel=_may_cancel(page, job),
    )


@router.get("/jobs/{job_id}/output", response_class=HTMLResponse)
def job_output(
    request: Request,
    page: Page,
    job_id: str,
    stream: Literal["stdout", "stderr"] = "stdout",
    offset: int = 0,
) -> Response:
    """A piece of output and, while there is more to come, the element that fetches the next."""
    runtime = runtime_of(request)
    try:
        chunk = runtime.output.read(page.actor, job_id, stream, max(offset, 0), OUTPUT_CHUNK, None)
    except BrokerError as exc:
        if exc.status == 503:  # the cluster does not answer now: try again a little later
            return render(
                request,
                "_output_chunk.html",
                page,
                job_id=job_id,
                stream=stream,
                data="",
                next_offset=offset,
                eof=False,
                delay="5s",
            )
        raise
    more_now = chunk.next_offset < chunk.size
    return render(
        request,
        "_output_chunk.html",
        page,
        job_id=job_id,
        stream=stream,
        data=chunk.data,
        next_offset=chunk.next_offset,
        eof=chunk.eof,
        delay="100ms" if more_now else "2s",
    )


@router.get("/jobs/{job_id}/cancel", response_class=HTMLResponse)
def cancel_confirm(request: Request, page: Page, job_id: str) -> Response:
    job = runtime_of(request).jobs.get(page.actor, job_id)
    if page.actor.role == "engineer":
        raise Forbidden("engineers cannot cancel jobs")
    return render(request, "cancel.html", page, job=job)


@router.post("/jobs/{job_id}/cancel")
def cancel(request: Request, post: FormPost, job_id: str) -> Response:
    runtime_of(request).jobs.cancel(post.page.actor, job_id)
    return redirect(f"/ui/jobs/{job_id}")


# --- submit -----------------------------------------------------------------------------------

LIMIT_FIELDS = {
    "gpus_per_job": "gpus",
    "time_limit": "time_limit_minutes",
    "cluster": "cluster",
    "partition": "cluster",
    "gpu_type": "gpu_type",
}
"""Which form field a ``limit-exceeded`` problem belongs to."""


def _submit_choices(request: Request, page: PageSession) -> dict[str, Any]:
    runtime = runtime_of(request)
    clusters = runtime.settings.clusters
    gpu_types = sorted({p.gpu_type for c in clusters.values() for p in c.partitions.values()})
    return {
        "projects": _project_names(request, page),
        "clusters": sorted(clusters),
        "gpu_types": gpu_types,
        "accepts_array": "array" in JobCreate.model_fields,
    }


@router.get("/submit", response_class=HTMLResponse)
def submit_form(request: Request, page: Page, project: str | None = None) -> Response:
    values = {"project": project or "", "gpus": "1", "time_limit_minutes": "60", "name": "job"}
    return _submit_page(request, page, values, {})


def _submit_page(
    request: Request,
    page: PageSession,
    values: dict[str, str],
    errors: dict[str, list[str]],
    status: int = 200,
) -> Response:
    return render(
        request,
        "submit.html",
        page,
        status=status,
        values=values,
        errors=errors,
        idempotency_key=values.get("idempotency_key") or str(uuid.uuid4()),
        **_submit_choices(request, page),
    )


def _integer(text: str) -> int | str:
    """A form's number as the API's JSON number; anything else stays text, so the schema
    refuses it with the message the API gives for a non-number."""
    stripped = text.strip()
    if stripped.lstrip("-").isdigit():
        return int(stripped)
    return stripped


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


@router.post("/submit", response_class=HTMLResponse)
def submit(request: Request, post: FormPost) -> Response:
    page = post.page
    runtime = runtime_of(request)
    fields = ("project", "name", "script", "gpus", "gpu_type", "time_limit_minutes", "cluster")
    values = {name: post.text(name) for name in (*fields, "array_size", "idempotency_key")}
    raw_script = post.form.get("script")
    values["script"] = raw_script.replace("\r\n", "\n") if isinstance(raw_script, str) else ""
    upload = post.form.get("script_file")
    if isinstance(upload, UploadFile) and upload.filename:
        limit = runtime.settings.limits.max_script_bytes
        content = upload.file.read(limit + 1)
        values["script"] = content.decode("utf-8", errors="replace").replace("\r\n", "\n")
    body: dict[str, Any] = {
        "project": values["project"],
        "script": values["script"],
        "gpus": _integer(values["gpus"]),
        "time_limit_minutes": _integer(values["time_limit_minutes"]),
    }
    if values["name"]:
        body["name"] = values["name"]
    for optional in ("gpu_type", "cluster"):
        if values[optional]:
            body[optional] = values[optional]
    if values["array_size"] and "array" in JobCreate.model_fields:
        body["array"] = {"size": _integer(values["array_size"])}
    errors: dict[str, list[str]] = {}
    try:
        job_request = JobCreate.model_validate(body)
    except ValidationError as exc:
        _schema_errors(exc, errors, "array_size")
        return _submit_page(request, page, values, errors, 422)
    key = values["idempotency_key"] or None
    try:
        outcome = runtime.jobs.submit(page.actor, job_request, key)
    except BrokerError as exc:
        _problem_errors(exc, errors, set(fields))
        return _submit_page(request, page, values, errors, exc.status)
    return redirect(f"/ui/jobs/{outcome.job.id}")


def _schema_errors(exc: ValidationError, errors: dict[str, list[str]], array_field: str) -> None:
    """The schema's messages (the API's ``errors``), each by the field it is about."""
    for err in exc.errors():
        loc = err.get("loc", ())
        field = str(loc[0]) if loc else FORM_ERROR
        if field == "array":
            field = array_field
        errors.setdefault(field, []).append(str(err.get("msg", "")))


def _problem_errors(exc: BrokerError, errors: dict[str, list[str]], fields: set[str]) -> None:
    """A problem document from the service, by the field it names (else above the form)."""
    message = f"{exc.type}: {exc.detail}"
    if isinstance(exc, LimitExceeded):
        field = LIMIT_FIELDS.get(str(exc.extra.get("limit")), FORM_ERROR)
        errors.setdefault(field, []).append(message)
        return
    if exc.type == "no-cluster-identity":
        errors.setdefault("cluster", []).append(message)
        return
    if exc.type == "payload-too-large":
        errors.setdefault("script", []).append(message)
        return
    named = False
    for item in exc.extra.get("errors", []) or []:
        field = str(item.get("field", ""))
        if field in fields:
            errors.setdefault(field, []).append(str(item.get("message", "")))
            named = True
    if not named:
        errors.setdefault(FORM_ERROR, []).append(message)


# --- projects ---------------------------------------------------------------------------------


@router.get("/projects", response_class=HTMLResponse)
def projects_page(request: Request, page: Page) -> Response:
    with runtime_of(request).sessions() as session:
        listing = projects.list_projects(session, page.actor).data
        usages = {p.name: projects.usage(session, page.actor, p.name) for p in listing}
    return render(request, "projects.html", page, projects=listing, usages=usages)


@router.get("/projects/{name}", response_class=HTMLResponse)
def project_page(request: Request, page: Page, name: str) -> Response:
    runtime = runtime_of(request)
    with runtime.sessions() as session:
        project = projects.get_project(session, page.actor, name)
        usage = projects.usage(session, page.actor, name)
    recent = runtime.jobs.list(page.actor, JobFilter(project=name), 20, None).data
    return render(request, "project.html", page, project=project, usage=usage, jobs=recent)


@router.get("/projects/{name}/usage", response_class=HTMLResponse)
def project_usage_fragment(request: Request, page: Page, name: str) -> Response:
    """The budget block alone, polled by the project page."""
    with runtime_of(request).sessions() as session:
        usage = projects.usage(session, page.actor, name)
    return render(request, "_budget.html", page, usage=usage, poll=True)


CSV_COLUMNS = (
    "id", "name", "user", "state", "cluster", "partition", "gpu_type", "gpus", "nodes",
    "time_limit_minutes", "submitted_at", "started_at", "ended_at", "exit_code",
    "reserved_gpu_hours", "charged_gpu_hours",
)  # fmt: skip


def _cell(value: Any) -> str:
    """A CSV cell a spreadsheet shows as text: no formula from a job's name or reason."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


@router.get("/projects/{name}/jobs.csv")
def project_csv(request: Request, page: Page, name: str) -> Response:
    """Every job of the project the caller may see, newest first, as CSV."""
    runtime = runtime_of(request)
    with runtime.sessions() as session:
        projects.get_project(session, page.actor, name)  # 404 for the invisible
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    cursor: str | None = None
    page_size = runtime.settings.limits.max_list_limit
    while True:
        listing = runtime.jobs.list(page.actor, JobFilter(project=name), page_size, cursor)
        for job in listing.data:
            row = job.model_dump(mode="json")
            writer.writerow([_cell(row.get(column)) for column in CSV_COLUMNS])
        cursor = listing.next_cursor
        if cursor is None:
            break
    headers = {"content-disposition": f'attachment; filename="{name}-jobs.csv"'}
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)


# --- engineer ---------------------------------------------------------------------------------


@router.get("/engineer", response_class=HTMLResponse)
def engineer_page(request: Request, page: Page) -> Response:
    runtime = runtime_of(request)
    with runtime.sessions() as session:
        depth = pool.queue_depth(session, page.actor)  # admins and engineers (403 otherwise)
        clusters = cluster_views(session, runtime.clusters.names).data
    return render(request, "engineer.html", page, clusters=clusters, depth=depth)


# --- admin ------------------------------------------------------------------------------------


def _validated(model: type[BaseModel], data: dict[str, Any], errors: dict[str, list[str]]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        _schema_errors(exc, errors, "array_size")
        return None


@router.get("/admin", response_class=HTMLResponse)
def admin_page(request: Request, page: Page) -> Response:
    return _admin_page(request, page, {}, {})


def _admin_page(
    request: Request,
    page: PageSession,
    values: dict[str, str],
    errors: dict[str, list[str]],
    status: int = 200,
    notice: str = "",
) -> Response:
    runtime = runtime_of(request)
    with runtime.sessions() as session:
        users = identity.list_users(session, page.actor).data  # admins only (403 otherwise)
        listing = projects.list_projects(session, page.actor).data
    return render(
        request,
        "admin.html",
        page,
        status=status,
        users=users,
        projects=listing,
        clusters=sorted(runtime.settings.clusters),
        values=values,
        errors=errors,
        notice=notice,
    )


@router.post("/admin/projects", response_class=HTMLResponse)
def admin_create_project(request: Request, post: FormPost) -> Response:
    runtime = runtime_of(request)
    values = {k: post.text(k) for k in ("project_name", "description")}
    accounts = {}
    for cluster in runtime.settings.clusters:
        account = post.text(f"account_{cluster}")
        values[f"account_{cluster}"] = account
        if account:
            accounts[cluster] = account
    errors: dict[str, list[str]] = {}
    data = {"name": values["project_name"], "description": values["description"]}
    body = _validated(ProjectCreate, {**data, "slurm_accounts": accounts}, errors)
    if body is None:
        errors = {("project_name" if k == "name" else k): v for k, v in errors.items()}
        return _admin_page(request, post.page, values, errors, 422)
    try:
        runtime.jobs.create_project(post.page.actor, body)
    except BrokerError as exc:
        errors[FORM_ERROR] = [f"{exc.type}: {exc.detail}"]
        return _admin_page(request, post.page, values, errors, exc.status)
    return redirect(f"/ui/admin/projects/{body.name}")


@router.post("/admin/users", response_class=HTMLResponse)
def admin_create_user(request: Request, post: FormPost) -> Response:
    runtime = runtime_of(request)
    values = {k: post.text(k) for k in ("user_name", "role", "email", "unix_user")}
    data: dict[str, Any] = {"name": values["user_name"], "role": values["role"]}
    for key in ("email", "unix_user"):
        if values[key]:
            data[key] = values[key]
    errors: dict[str, list[str]] = {}
    body = _validated(UserCreate, data, errors)
    if body is None:
        errors = {("user_name" if k == "name" else k): v for k, v in errors.items()}
        return _admin_page(request, post.page, values, errors, 422)
    try:
        with transaction(runtime.sessions) as session:
            identity.create_user(session, post.page.actor, body, runtime.settings)
    except BrokerError as exc:
        errors[FORM_ERROR] = [f"{exc.type}: {exc.detail}"]
        return _admin_page(request, post.page, values, errors, exc.status)
    return redirect(f"/ui/admin/users/{body.name}")


QUOTA_INT_FIELDS = (
    "max_concurrent_gpus",
    "max_gpus_per_job",
    "max_time_limit_minutes",
    "max_pending_jobs",
)
QUOTA_LIST_FIELDS = ("allowed_clusters", "allowed_partitions", "allowed_gpu_types")
QUOTA_MAP_FIELDS = ("gpu_type_weights", "max_concurrent_gpus_per_cluster")


def _quota_values(project: Any) -> dict[str, str]:
    """The form's text of the current quota (empty where there is no limit)."""
    quota = project.quota
    if quota is None:
        return {}
    data = quota.model_dump(mode="json")
    values = {
        "period_start": data["period_start"][:10],
        "period_end": data["period_end"][:10],
        "gpu_hours": f"{quota.gpu_hours:g}",
    }
    for key in QUOTA_INT_FIELDS:
        values[key] = "" if data[key] is None else str(data[key])
    for key in QUOTA_LIST_FIELDS:
        values[key] = "" if data[key] is None else ", ".join(data[key])
    for key in QUOTA_MAP_FIELDS:
        values[key] = ", ".join(f"{k}={v:g}" for k, v in data[key].items())
    return values


def _admin_project_page(
    request: Request,
    page: PageSession,
    name: str,
    values: dict[str, str] | None = None,
    errors: dict[str, list[str]] | None = None,
    status: int = 200,
    notice: str = "",
) -> Response:
    page.actor.require_admin()
    runtime = runtime_of(request)
    with runtime.sessions() as session:
        project = projects.get_project(session, page.actor, name)
        users = [u.name for u in identity.list_users(session, page.actor).data]
    return render(
        request,
        "admin_project.html",
        page,
        status=status,
        project=project,
        users=users,
        values=values if values is not None else _quota_values(project),
        errors=errors or {},
        notice=notice,
    )


@router.get("/admin/projects/{name}", response_class=HTMLResponse)
def admin_project(request: Request, page: Page, name: str) -> Response:
    return _admin_project_page(request, page, name)


def _split_map(text: str, errors: dict[str, list[str]], field: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            errors.setdefault(field, []).append(f"{item!r}: write name=value")
            continue
        number = value.strip()
        out[key.strip()] = (
            _integer(number) if field == "max_concurrent_gpus_per_cluster" else _number(number)
        )
    return out


def _period(day: str) -> str:
    """A date from the form is midnight UTC; a full timestamp is taken as written."""
    return f"{day}T00:00:00Z" if len(day) == 10 else day


@router.post("/admin/projects/{name}/quota", response_class=HTMLResponse)
def admin_put_quota(request: Request, post: FormPost, name: str) -> Response:
    keys = (
        "period_start",
        "period_end",
        "gpu_hours",
        *QUOTA_INT_FIELDS,
        *QUOTA_LIST_FIELDS,
        *QUOTA_MAP_FIELDS,
    )
    values = {key: post.text(key) for key in keys}
    errors: dict[str, list[str]] = {}
    data: dict[str, Any] = {
        "period_start": _period(values["period_start"]),
        "period_end": _period(values["period_end"]),
        "gpu_hours": _number(values["gpu_hours"]),
    }
    for key in QUOTA_INT_FIELDS:
        if values[key]:
            data[key] = _integer(values[key])
    for key in QUOTA_LIST_FIELDS:
        if values[key]:
            data[key] = [v.strip() for v in values[key].split(",") if v.strip()]
    for key in QUOTA_MAP_FIELDS:
        data[key] = _split_map(values[key], errors, key)
    body = _validated(QuotaPut, data, errors)
    if body is None or errors:
        return _admin_project_page(request, post.page, name, values, errors, 422)
    runtime = runtime_of(request)
    try:
        with transaction(runtime.sessions) as session:
            projects.put_quota(session, post.page.actor, name, body)
    except BrokerError as exc:
        if exc.status in (403, 404):
            raise
        errors[FORM_ERROR] = [f"{exc.type}: {exc.detail}"]
        return _admin_project_page(request, post.page, name, values, errors, exc.status)
    return _admin_project_page(request, post.page, name, notice="Quota saved.")


@router.post("/admin/projects/{name}/members", response_class=HTMLResponse)
def admin_put_member(
    request: Request, post: FormPost, name: str, background: BackgroundTasks
) -> Response:
    runtime = runtime_of(request)
    user = post.text("member")
    errors: dict[str, list[str]] = {}
    body = _validated(MemberPut, {"role": post.text("member_role") or "member"}, errors)
    if body is None:
        return _admin_project_page(
            request, post.page, name, None, {"member": errors.get("role", [])}, 422
        )
    try:
        with transaction(runtime.sessions) as session:
            projects.put_member(session, post.page.actor, name, user, body)
            grant = projects.member_identity(session, name, user)
    except BrokerError as exc:
        if exc.status == 403 or (exc.status == 404 and "project" in exc.detail):
            raise
        errors["member"] = [f"{exc.type}: {exc.detail}"]
        return _admin_project_page(request, post.page, name, None, errors, exc.status)
    background.add_task(runtime.identities.grant, *grant)
    return redirect(f"/ui/admin/projects/{name}")


@router.post("/admin/projects/{name}/members/{user}/remove")
def admin_remove_member(
    request: Request, post: FormPost, name: str, user: str, background: BackgroundTasks
) -> Response:
    runtime = runtime_of(request)
    with transaction(runtime.sessions) as session:
        projects.remove_member(session, post.page.actor, name, user)
        revoke = projects.member_identity(session, name, user)
    background.add_task(runtime.identities.revoke, *revoke)
    return redirect(f"/ui/admin/projects/{name}")


def _admin_user_page(
    request: Request,
    page: PageSession,
    name: str,
    errors: dict[str, list[str]] | None = None,
    status: int = 200,
    issued: Any = None,
) -> Response:
    runtime = runtime_of(request)
    with runtime.sessions() as session:
        user = identity.get_user(session, page.actor, name)  # admins only
        tokens = identity.list_tokens(session, page.actor, name).data
    return render(
        request,
        "admin_user.html",
        page,
        status=status,
        user=user,
        tokens=tokens,
        web_sessions=active_sessions(runtime, page.actor, name),
        errors=errors or {},
        issued=issued,
    )


@router.get("/admin/users/{name}", response_class=HTMLResponse)
def admin_user(request: Request, page: Page, name: str) -> Response:
    return _admin_user_page(request, page, name)


@router.post("/admin/users/{name}/tokens", response_class=HTMLResponse)
def admin_issue_token(request: Request, post: FormPost, name: str) -> Response:
    runtime = runtime_of(request)
    errors: dict[str, list[str]] = {}
    body = _validated(TokenCreate, {"description": post.text("description")}, errors)
    if body is None:
        return _admin_user_page(request, post.page, name, errors, 422)
    with transaction(runtime.sessions) as session:
        issued = identity.issue_token(
            session, post.page.actor, name, body.description, runtime.settings.auth.token_bytes
        )
    # Shown in this answer only, as the API does; the page is not cached (no-store).
    return _admin_user_page(request, post.page, name, issued=issued)


@router.post("/admin/users/{name}/tokens/{token_id}/revoke")
def admin_revoke_token(request: Request, post: FormPost, name: str, token_id: str) -> Response:
    with transaction(runtime_of(request).sessions) as session:
        identity.revoke_token(session, post.page.actor, name, token_id)
    return redirect(f"/ui/admin/users/{name}")


@router.post("/admin/users/{name}/sessions/end")
def admin_end_sessions(request: Request, post: FormPost, name: str) -> Response:
    end_user_sessions(runtime_of(request), post.page.actor, name)
    if name == post.page.actor.name:
        return redirect("/ui/login")
    return redirect(f"/ui/admin/users/{name}")


@router.post("/admin/users/{name}/unix-user", response_class=HTMLResponse)
def admin_set_unix_user(
    request: Request, post: FormPost, name: str, background: BackgroundTasks
) -> Response:
    runtime = runtime_of(request)
    errors: dict[str, list[str]] = {}
    body = _validated(UserPatch, {"unix_user": post.text("unix_user") or None}, errors)
    if body is None:
        return _admin_user_page(request, post.page, name, errors, 422)
    try:
        with transaction(runtime.sessions) as session:
            change = identity.patch_user(session, post.page.actor, name, body, runtime.settings)
    except BrokerError as exc:
        if exc.status in (403, 404):
            raise
        errors["unix_user"] = [f"{exc.type}: {exc.detail}"]
        return _admin_user_page(request, post.page, name, errors, exc.status)
    if change.old_unix_user != change.new_unix_user:
        for accounts in change.project_accounts:
            background.add_task(runtime.identities.revoke, accounts, change.old_unix_user)
            background.add_task(runtime.identities.grant, accounts, change.new_unix_user)
    return redirect(f"/ui/admin/users/{name}")


# --- federated sign-in (OIDC authorization code + PKCE) -------------------------------------

OIDC_PENDING_COOKIE = "broker_ui_oidc"
"""The sign-in in progress (state, nonce, PKCE verifier, the page asked for): HttpOnly, only
sent to ``/ui/auth/``, SameSite=Lax so that it comes back with the provider's redirect, and
deleted by the callback (one use)."""
OIDC_COOKIE_PATH = f"{COOKIE_PATH}/auth"


def _oidc_login(request: Request) -> OidcLogin | None:
    """The web client at the provider, where ``[auth.oidc]`` is enabled with a web client."""
    runtime = runtime_of(request)
    if runtime.oidc is None or not runtime.settings.auth.oidc.web_client_id:
        return None
    login: OidcLogin | None = getattr(request.app.state, "ui_oidc_client", None)
    if login is None:
        login = OidcLogin(runtime.oidc)
        request.app.state.ui_oidc_client = login
    return login


def _oidc_failed(request: Request, target: str, why: str, status: int = 400) -> Response:
    """The sign-in page with the reason, and no sign-in left in progress."""
    log.warning("web sign-in with the provider refused: %s", why)
    response = _login_page(request, target, f"Sign-in failed: {why}.", status)
    response.delete_cookie(OIDC_PENDING_COOKIE, path=OIDC_COOKIE_PATH)
    return response


def _public_uri(request: Request, route: str) -> str:
    """A page's absolute URI as registered at the provider: under ``server.public_url`` where
    set (a broker behind a TLS proxy), else as this browser reached the broker."""
    public = runtime_of(request).settings.server.public_url
    if public:
        return f"{public.rstrip('/')}{request.app.url_path_for(route)}"
    return str(request.url_for(route))


@router.get("/auth/login")
def oidc_begin(request: Request, next: str | None = None) -> Response:
    """Send the browser to the provider's login page (authorization code + PKCE)."""
    target = _safe_next(next)
    login = _oidc_login(request)
    if login is None:
        return _oidc_failed(request, target, "sign-in with a provider is not set up here", 404)
    try:
        url, pending = login.begin(_public_uri(request, "oidc_callback"))
    except (LoginFailed, ProviderUnreachable) as exc:
        return _oidc_failed(request, target, str(exc), 502)
    kept = json.dumps(dict(pending.to_dict(), next=target)).encode()
    response = redirect(url)
    response.set_cookie(
        OIDC_PENDING_COOKIE,
        base64.urlsafe_b64encode(kept).decode("ascii"),
        max_age=PENDING_LOGIN_SECONDS,
        path=OIDC_COOKIE_PATH,
        httponly=True,
        samesite="lax",
        secure=cookie_secure(request, runtime_of(request)),
    )
    return response


@router.get("/auth/callback", name="oidc_callback")
def oidc_callback(request: Request) -> Response:
    """The provider's redirect back: its state must be this browser's sign-in in progress."""
    login = _oidc_login(request)
    if login is None:
        return _oidc_failed(request, "/ui/jobs", "sign-in with a provider is not set up here", 404)
    try:
        kept = json.loads(base64.urlsafe_b64decode(request.cookies[OIDC_PENDING_COOKIE]))
        pending = PendingLogin.from_dict(kept)
        target = _safe_next(str(kept.get("next") or ""))
    except (KeyError, ValueError, TypeError, AttributeError):
        return _oidc_failed(request, "/ui/jobs", "the sign-in was not started in this browser")
    runtime = runtime_of(request)
    try:
        signed = login.finish(pending, dict(request.query_params))
        actor = login.actor(runtime.sessions, signed)
    except ProviderUnreachable as exc:
        return _oidc_failed(request, target, str(exc), 502)
    except Unauthenticated as exc:  # LoginFailed, an invalid ID token, an unknown user
        return _oidc_failed(request, target, exc.detail or "the provider's answer is not valid")
    response = redirect(target)
    start_session(response, request, runtime, actor.name, via="oidc")
    log.info("web sign-in of %s through the provider", actor.name)
    response.delete_cookie(OIDC_PENDING_COOKIE, path=OIDC_COOKIE_PATH)
    return response
