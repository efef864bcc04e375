"""The everyday command-line client: ``broker submit``, ``broker jobs``, ``broker project ...``.

It talks to a running broker only through the REST contract (API.md), with the URL from
``--url`` or ``BROKER_URL`` and the bearer token from ``--token`` or ``BROKER_TOKEN``. Output is a
plain table for people; ``--json`` prints the broker's JSON (for scripts). Errors go to stderr as
the problem document's ``title: detail``, followed by its numbers (``requested``, ``remaining``).

Exit codes scripts can rely on:

    0  success
    1  unexpected error (a 5xx other than 502/503/504, a response that is not JSON, a bug)
    2  usage error: bad flags or arguments, unreadable script, malformed --url
    3  not found: 404 (the resource does not exist or the caller may not see it)
    4  refused by policy or quota: 409 quota-exceeded, 409 conflict, 422 limit-exceeded,
       422 idempotency-conflict, 422 submit-rejected (Slurm said no)
    5  invalid input: 422 validation-error (and any other 422), 400, 413 payload-too-large
    6  authentication or permission: 401, 403, or no token given
    7  broker or cluster unavailable, retry later: 503, 502, 504, 429, connection refused, timeout
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import httpx
import typer

from broker.cli.output import fields, json_text, render_value, table

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8080"
SUBMIT_TIMEOUT = 60.0  # sbatch runs over SSH before the broker answers
DEFAULT_TIMEOUT = 30.0
USER_AGENT = "aifactory-broker-cli/1"

# Tests set this to an ``httpx.MockTransport``; ``None`` means real network I/O.
_transport: httpx.BaseTransport | None = None


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    NOT_FOUND = 3
    REFUSED = 4
    INVALID = 5
    AUTH = 6
    UNAVAILABLE = 7


_REFUSED_TYPES = frozenset(
    {"quota-exceeded", "limit-exceeded", "idempotency-conflict", "submit-rejected", "conflict"}
)
# Members of a problem document that are not "numbers" worth echoing on their own line.
_PROBLEM_CORE = frozenset({"type", "title", "status", "detail", "instance", "errors"})


def exit_code_for(status: int, problem_type: str | None) -> ExitCode:
    """The exit code for an HTTP error answer, by problem ``type`` first, then by status."""
    if problem_type in _REFUSED_TYPES:
        return ExitCode.REFUSED
    if status == 404:
        return ExitCode.NOT_FOUND
    if status in (401, 403):
        return ExitCode.AUTH
    if status in (400, 413, 422):
        return ExitCode.INVALID
    if status == 409:
        return ExitCode.REFUSED
    if status in (429, 502, 503, 504):
        return ExitCode.UNAVAILABLE
    return ExitCode.UNEXPECTED


# --- errors --------------------------------------------------------------------------------


class CliError(Exception):
    """A failure to report on stderr and exit with ``exit_code``."""

    exit_code: ExitCode = ExitCode.UNEXPECTED

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def lines(self) -> list[str]:
        return [self.message]


class BrokerUnreachable(CliError):
    """No HTTP answer at all: connection refused, DNS failure, timeout."""

    exit_code = ExitCode.UNAVAILABLE


class BadUrl(CliError):
    exit_code = ExitCode.USAGE


class UnexpectedResponse(CliError):
    """A success status whose body is not the JSON the contract promises."""


class MissingToken(CliError):
    exit_code = ExitCode.AUTH


class ProblemError(CliError):
    """An HTTP error answer, normally an RFC 9457 problem document."""

    def __init__(self, status: int, problem: Mapping[str, Any], retry_after: str | None) -> None:
        self.status = status
        self.problem = dict(problem)
        self.retry_after = retry_after
        problem_type = problem.get("type")
        self.exit_code = exit_code_for(
            status, problem_type if isinstance(problem_type, str) else None
        )
        title = str(problem.get("title") or f"HTTP {status}")
        detail = str(problem.get("detail") or "")
        super().__init__(f"{title}: {detail}" if detail else title)

    @classmethod
    def from_response(cls, response: httpx.Response) -> ProblemError:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # Not the broker speaking (a proxy, a load balancer): show a short excerpt.
            excerpt = " ".join(response.text.split())[:200]
            body = {
                "title": f"HTTP {response.status_code} {response.reason_phrase}".strip(),
                "detail": excerpt,
            }
        return cls(response.status_code, body, response.headers.get("Retry-After"))

    def lines(self) -> list[str]:
        out = [self.message]
        numbers = [(k, v) for k, v in self.problem.items() if k not in _PROBLEM_CORE]
        if numbers:
            out.append("  " + "  ".join(f"{k}: {render_value(v)}" for k, v in numbers))
        errors = self.problem.get("errors")
        if isinstance(errors, list):
            # The broker's detail already names the first few; list only what it left out.
            for error in (e for e in errors if isinstance(e, Mapping)):
                line = f"{error.get('field', '?')}: {error.get('message', '')}"
                if line not in self.message:
                    out.append(f"  {line}")
        if self.retry_after:
            out.append(f"  retry after {self.retry_after} s")
        if self.status == 401:
            out.append("  check --token or BROKER_TOKEN")
        return out


# --- HTTP ----------------------------------------------------------------------------------


class BrokerClient:
    """The broker's REST API over httpx; every failure surfaces as a ``CliError``."""

    def __init__(
        self, url: str, token: str, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.url = url.rstrip("/")
        try:
            self._http = httpx.Client(
                base_url=self.url,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Accept": "application/json",
                    "User-Agent": USER_AGENT,
                },
                timeout=DEFAULT_TIMEOUT,
                transport=transport,
            )
        except httpx.InvalidURL as exc:
            raise BadUrl(f"invalid broker URL {url!r}: {exc}") from exc

    def close(self) -> None:
        self._http.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> httpx.Response:
        """Send one request; raise ``ProblemError`` for any status >= 400."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        started = time.monotonic()
        try:
            response = self._http.request(
                method, path, params=query, json=body, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException as exc:
            raise BrokerUnreachable(
                f"no answer from the broker at {self.url} within {timeout:.0f} s"
            ) from exc
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise BadUrl(f"invalid broker URL {self.url!r}: {exc}") from exc
        except httpx.TransportError as exc:
            raise BrokerUnreachable(f"cannot reach the broker at {self.url}: {exc}") from exc
        log.debug(
            "%s %s -> %d in %.3f s",
            method,
            path,
            response.status_code,
            time.monotonic() - started,
        )
        if response.status_code >= 400:
            raise ProblemError.from_response(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """``call`` and decode the JSON body (``None`` for 204)."""
        response = self.call(method, path, **kwargs)
        return decode(response)


def decode(response: httpx.Response) -> Any:
    if response.status_code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError as exc:
        raise UnexpectedResponse(
            f"the broker answered {response.status_code} with a body that is not JSON"
        ) from exc


def segment(value: str) -> str:
    """A user-supplied name as one path segment: ``a/../b`` must not walk the URL tree."""
    return quote(value, safe="")


@contextmanager
def connect(url: str, token: str | None) -> Iterator[BrokerClient]:
    """A client for the command's body; ``CliError``s become a stderr report and an exit code."""
    try:
        if not token:
            raise MissingToken("no API token: pass --token or set BROKER_TOKEN")
        client = BrokerClient(url, token, transport=_transport)
    except CliError as exc:
        _report(exc)
        raise typer.Exit(exc.exit_code) from None
    try:
        yield client
    except CliError as exc:
        _report(exc)
        raise typer.Exit(exc.exit_code) from None
    finally:
        client.close()


def _report(exc: CliError) -> None:
    for line in exc.lines():
        typer.echo(line, err=True)


# --- argument helpers ----------------------------------------------------------------------

T = TypeVar("T")


def parse_pairs(values: list[str] | None, option: str, convert: Callable[[str], T]) -> dict[str, T]:
    """``["K=V", ...]`` from a repeatable option as a dict; a bad item is a usage error."""
    result: dict[str, T] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        try:
            result[key] = convert(raw)
        except ValueError:
            raise typer.BadParameter(
                f"{raw!r} is not a valid value for {key}", param_hint=option
            ) from None
    return result


_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")


def timestamp(value: str | None) -> str | None:
    """A bare date means midnight UTC; anything else goes to the broker as typed."""
    if value is not None and _DATE_ONLY.fullmatch(value):
        return f"{value}T00:00:00Z"
    return value


def read_script(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}", param_hint="SCRIPT") from None


def print_json(data: Any) -> None:
    if data is not None:
        typer.echo(json_text(data))


def print_table(headers: list[str], rows: list[list[Any]], empty: str) -> None:
    typer.echo(table(headers, rows) if rows else empty)


def fetch_pages(
    api: BrokerClient, path: str, params: dict[str, Any], follow: bool
) -> dict[str, Any]:
    """One page, or with ``follow`` every page after it, as one ``{"data", "next_cursor"}``."""
    page: dict[str, Any] = api.json("GET", path, params=params)
    if not follow:
        return page
    data = list(page.get("data", []))
    seen: set[str] = set()
    cursor = page.get("next_cursor")
    while cursor and cursor not in seen:
        seen.add(cursor)
        page = api.json("GET", path, params={**params, "cursor": cursor})
        data.extend(page.get("data", []))
        cursor = page.get("next_cursor")
    return {"data": data, "next_cursor": None}


def more_hint(page: Mapping[str, Any]) -> None:
    if page.get("next_cursor"):
        typer.echo(f"more: --cursor {page['next_cursor']} or --all", err=True)


# --- shared options ------------------------------------------------------------------------

UrlOption = Annotated[
    str, typer.Option("--url", envvar="BROKER_URL", help="Broker base URL.", show_envvar=True)
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", envvar="BROKER_TOKEN", help="API token (required).", show_envvar=True),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the broker's JSON as is.")]
LimitOption = Annotated[int | None, typer.Option("--limit", help="Page size.")]
CursorOption = Annotated[str | None, typer.Option("--cursor", help="Start at this page cursor.")]
AllOption = Annotated[bool, typer.Option("--all", help="Follow next_cursor to the last page.")]


# --- jobs ----------------------------------------------------------------------------------

_JOB_SUMMARY = (
    "id",
    "slurm_job_id",
    "state",
    "reserved_gpu_hours",
    "project",
    "cluster",
    "partition",
    "gpu_type",
    "gpus",
    "time_limit_minutes",
)
_JOB_HEADERS = [
    "ID",
    "PROJECT",
    "USER",
    "NAME",
    "CLUSTER",
    "GPU TYPE",
    "GPUS",
    "STATE",
    "SLURM ID",
    "SUBMITTED",
]


def _job_row(job: Mapping[str, Any]) -> list[Any]:
    keys = (
        "id",
        "project",
        "user",
        "name",
        "cluster",
        "gpu_type",
        "gpus",
        "state",
        "slurm_job_id",
        "submitted_at",
    )
    return [job.get(key) for key in keys]


def submit(
    script: Annotated[
        str, typer.Argument(metavar="SCRIPT", help="Batch script file, or - for stdin.")
    ],
    project: Annotated[str, typer.Option("--project", help="Project to charge.")],
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs in total.")],
    time_limit: Annotated[int, typer.Option("--time", help="Time limit in minutes.")],
    cluster: Annotated[str | None, typer.Option("--cluster")] = None,
    partition: Annotated[str | None, typer.Option("--partition")] = None,
    gpu_type: Annotated[str | None, typer.Option("--gpu-type")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Job name.")] = None,
    nodes: Annotated[int | None, typer.Option("--nodes")] = None,
    cpus_per_gpu: Annotated[int | None, typer.Option("--cpus-per-gpu")] = None,
    mem_per_gpu_gb: Annotated[int | None, typer.Option("--mem-per-gpu-gb")] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="K=V for the job's environment; repeatable.")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="Retry-safe key; one is generated if omitted."),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a batch script as a GPU job; the broker admits it against the project's quota."""
    body: dict[str, Any] = {
        "project": project,
        "script": read_script(script),
        "gpus": gpus,
        "time_limit_minutes": time_limit,
    }
    optional = {
        "name": name,
        "cluster": cluster,
        "partition": partition,
        "gpu_type": gpu_type,
        "nodes": nodes,
        "cpus_per_gpu": cpus_per_gpu,
        "mem_per_gpu_gb": mem_per_gpu_gb,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    environment = parse_pairs(env, "--env", str)
    if environment:
        body["environment"] = environment
    # Always send a key, so a submit whose answer was lost can be retried without a second job.
    key = idempotency_key or str(uuid.uuid4())
    with connect(url, token) as api:
        try:
            response = api.call(
                "POST",
                "/v1/jobs",
                body=body,
                headers={"Idempotency-Key": key},
                timeout=SUBMIT_TIMEOUT,
            )
        except BrokerUnreachable as exc:
            raise BrokerUnreachable(
                f"{exc.message}\n  the job may have been submitted: retry with"
                f" --idempotency-key {key} to avoid a duplicate"
            ) from exc
        job = decode(response)
    if as_json:
        print_json(job)
        return
    typer.echo(fields((label, job.get(label)) for label in _JOB_SUMMARY))
    if response.headers.get("Idempotent-Replayed") == "true":
        typer.echo("(an earlier submission with this idempotency key; no new job)", err=True)
    if job.get("state") == "submit_unknown":
        typer.echo("sbatch's answer was lost; the broker is finding the job in Slurm", err=True)


def jobs(
    project: Annotated[str | None, typer.Option("--project")] = None,
    state: Annotated[str | None, typer.Option("--state")] = None,
    cluster: Annotated[str | None, typer.Option("--cluster")] = None,
    user: Annotated[str | None, typer.Option("--user")] = None,
    limit: LimitOption = None,
    cursor: CursorOption = None,
    follow: AllOption = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    params = {
        "project": project,
        "state": state,
        "cluster": cluster,
        "user": user,
        "limit": limit,
        "cursor": cursor,
    }
    with connect(url, token) as api:
        page = fetch_pages(api, "/v1/jobs", params, follow)
    if as_json:
        print_json(page)
        return
    print_table(_JOB_HEADERS, [_job_row(job) for job in page["data"]], "No jobs.")
    more_hint(page)


def job(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one job."""
    with connect(url, token) as api:
        data = api.json("GET", f"/v1/jobs/{segment(job_id)}")
    if as_json:
        print_json(data)
    else:
        typer.echo(fields(data.items()))


def job_events(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a job's state transitions."""
    with connect(url, token) as api:
        data = api.json("GET", f"/v1/jobs/{segment(job_id)}/events")
    if as_json:
        print_json(data)
        return
    rows = [
        [e.get("at"), e.get("from_state"), e.get("to_state"), e.get("reason")] for e in data["data"]
    ]
    print_table(["AT", "FROM", "TO", "REASON"], rows, "No events.")


def cancel(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a job; cancelling a job that already ended is success."""
    with connect(url, token) as api:
        response = api.call("DELETE", f"/v1/jobs/{segment(job_id)}")
        data = decode(response)
    if as_json:
        print_json(data)
    elif response.status_code == 202:
        typer.echo(f"Cancellation requested for job {data['id']} (state: {data['state']}).")
    else:
        typer.echo(f"Job {data['id']} had already ended (state: {data['state']}).")


def usage(
    project: Annotated[str, typer.Argument(metavar="PROJECT")],
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a project's GPU-hour budget, use and reservations in the current period."""
    with connect(url, token) as api:
        data = api.json("GET", f"/v1/projects/{segment(project)}/usage")
    if as_json:
        print_json(data)
        return
    typer.echo(fields((k, v) for k, v in data.items() if not isinstance(v, Mapping)))
    for key, breakdown in data.items():
        if isinstance(breakdown, Mapping) and breakdown:
            label = key.removeprefix("by_").replace("_", " ").upper()
            typer.echo("")
            typer.echo(table([label, "GPU-HOURS"], [[k, v] for k, v in breakdown.items()]))


def clusters(
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show each cluster's partitions and free GPUs from the broker's last poll."""
    with connect(url, token) as api:
        data = api.json("GET", "/v1/clusters")
    if as_json:
        print_json(data)
        return
    rows: list[list[Any]] = []
    for c in data["data"]:
        head = [c.get("name"), c.get("up"), c.get("last_poll_at")]
        for p in c.get("partitions") or [{}]:
            rows.append(
                [
                    *head,
                    p.get("name"),
                    p.get("gpu_type"),
                    p.get("gpus_total"),
                    p.get("gpus_allocated"),
                    p.get("gpus_idle"),
                    p.get("nodes_total"),
                    p.get("nodes_down"),
                ]
            )
    headers = [
        "CLUSTER",
        "UP",
        "LAST POLL",
        "PARTITION",
        "GPU TYPE",
        "GPUS",
        "ALLOCATED",
        "IDLE",
        "NODES",
        "DOWN",
    ]
    print_table(headers, rows, "No clusters.")


def whoami(
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the token's user, role and projects."""
    with connect(url, token) as api:
        data = api.json("GET", "/v1/me")
    if as_json:
        print_json(data)
    else:
        typer.echo(fields(data.items()))


def audit(
    limit: LimitOption = None,
    cursor: CursorOption = None,
    follow: AllOption = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show who changed which project, quota, member, user or token, and when."""
    with connect(url, token) as api:
        page = fetch_pages(api, "/v1/audit", {"limit": limit, "cursor": cursor}, follow)
    if as_json:
        print_json(page)
        return
    rows = [
        [
            e.get("at"),
            e.get("actor"),
            e.get("action"),
            f"{e.get('target_type')}:{e.get('target')}",
            e.get("details"),
        ]
        for e in page["data"]
    ]
    print_table(["AT", "ACTOR", "ACTION", "TARGET", "DETAILS"], rows, "No audit entries.")
    more_hint(page)


# --- projects ------------------------------------------------------------------------------

project_app = typer.Typer(help="Projects, their members and quotas.", no_args_is_help=True)


def _show_project(data: Mapping[str, Any]) -> None:
    typer.echo(
        fields((k, data.get(k)) for k in ("name", "description", "slurm_accounts", "created_at"))
    )
    members = data.get("members") or {}
    typer.echo("")
    print_table(["MEMBER", "ROLE"], [[u, r] for u, r in members.items()], "No members.")
    typer.echo("")
    quota = data.get("quota")
    typer.echo("Quota:\n" + fields(quota.items()) if quota else "No quota.")


@project_app.command("create")
def project_create(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    account: Annotated[
        list[str] | None,
        typer.Option(
            "--account", help="CLUSTER=ACCOUNT: the Slurm account per cluster; repeatable."
        ),
    ] = None,
    description: Annotated[str | None, typer.Option("--description")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a project."""
    body: dict[str, Any] = {"name": name, "slurm_accounts": parse_pairs(account, "--account", str)}
    if description is not None:
        body["description"] = description
    with connect(url, token) as api:
        data = api.json("POST", "/v1/projects", body=body)
    if as_json:
        print_json(data)
    else:
        _show_project(data)


@project_app.command("list")
def project_list(
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the projects you may see."""
    with connect(url, token) as api:
        data = api.json("GET", "/v1/projects")
    if as_json:
        print_json(data)
        return
    rows = []
    for p in data["data"]:
        quota = p.get("quota") or {}
        rows.append(
            [
                p.get("name"),
                p.get("slurm_accounts"),
                len(p.get("members") or {}),
                quota.get("gpu_hours"),
                quota.get("period_start"),
                quota.get("period_end"),
            ]
        )
    headers = ["NAME", "ACCOUNTS", "MEMBERS", "GPU-HOURS", "PERIOD START", "PERIOD END"]
    print_table(headers, rows, "No projects.")


@project_app.command("show")
def project_show(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a project with its members and quota."""
    with connect(url, token) as api:
        data = api.json("GET", f"/v1/projects/{segment(name)}")
    if as_json:
        print_json(data)
    else:
        _show_project(data)


@project_app.command("add-member")
def project_add_member(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    user: Annotated[str, typer.Argument(metavar="USER")],
    role: Annotated[str, typer.Option("--role")] = "member",
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add a user to a project, or change their role in it."""
    with connect(url, token) as api:
        data = api.json(
            "PUT", f"/v1/projects/{segment(name)}/members/{segment(user)}", body={"role": role}
        )
    if as_json:
        print_json(data)
    else:
        typer.echo(f"{data['user']} is {data['role']} of {data['project']}.")


@project_app.command("remove-member")
def project_remove_member(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    user: Annotated[str, typer.Argument(metavar="USER")],
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove a user from a project."""
    with connect(url, token) as api:
        data = api.json("DELETE", f"/v1/projects/{segment(name)}/members/{segment(user)}")
    if as_json:
        print_json(data)
    else:
        typer.echo(f"Removed {user} from {name}.")


@project_app.command("set-quota")
def project_set_quota(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    gpu_hours: Annotated[float, typer.Option("--gpu-hours", help="GPU-hour budget.")],
    start: Annotated[
        str, typer.Option("--start", help="Period start, RFC 3339 or a date (midnight UTC).")
    ],
    end: Annotated[
        str, typer.Option("--end", help="Period end, RFC 3339 or a date (midnight UTC).")
    ],
    weight: Annotated[
        list[str] | None, typer.Option("--weight", help="TYPE=W GPU-hour weight; repeatable.")
    ] = None,
    max_concurrent_gpus: Annotated[int | None, typer.Option("--max-concurrent-gpus")] = None,
    max_gpus_per_job: Annotated[int | None, typer.Option("--max-gpus-per-job")] = None,
    max_time_limit: Annotated[int | None, typer.Option("--max-time-limit", help="Minutes.")] = None,
    max_pending_jobs: Annotated[int | None, typer.Option("--max-pending-jobs")] = None,
    allow_cluster: Annotated[list[str] | None, typer.Option("--allow-cluster")] = None,
    allow_partition: Annotated[list[str] | None, typer.Option("--allow-partition")] = None,
    allow_gpu_type: Annotated[list[str] | None, typer.Option("--allow-gpu-type")] = None,
    max_concurrent_gpus_on: Annotated[
        list[str] | None,
        typer.Option("--max-concurrent-gpus-on", help="CLUSTER=N; repeatable."),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Replace a project's quota. Every limit not given here becomes "no limit"."""
    body: dict[str, Any] = {
        "period_start": timestamp(start),
        "period_end": timestamp(end),
        "gpu_hours": gpu_hours,
        "gpu_type_weights": parse_pairs(weight, "--weight", float),
        "max_concurrent_gpus_per_cluster": parse_pairs(
            max_concurrent_gpus_on, "--max-concurrent-gpus-on", int
        ),
    }
    optional = {
        "max_concurrent_gpus": max_concurrent_gpus,
        "max_gpus_per_job": max_gpus_per_job,
        "max_time_limit_minutes": max_time_limit,
        "max_pending_jobs": max_pending_jobs,
        "allowed_clusters": allow_cluster or None,
        "allowed_partitions": allow_partition or None,
        "allowed_gpu_types": allow_gpu_type or None,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    with connect(url, token) as api:
        data = api.json("PUT", f"/v1/projects/{segment(name)}/quota", body=body)
    if as_json:
        print_json(data)
    else:
        typer.echo(fields(data.items()))


# --- users and tokens ----------------------------------------------------------------------

user_app = typer.Typer(help="Users and their API tokens.", no_args_is_help=True)


@user_app.command("create")
def user_create(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    role: Annotated[str, typer.Option("--role", help="researcher, engineer or admin.")],
    email: Annotated[str | None, typer.Option("--email")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a user."""
    body: dict[str, Any] = {"name": name, "role": role}
    if email is not None:
        body["email"] = email
    with connect(url, token) as api:
        data = api.json("POST", "/v1/users", body=body)
    if as_json:
        print_json(data)
    else:
        typer.echo(fields(data.items()))


@user_app.command("list")
def user_list(
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List users."""
    with connect(url, token) as api:
        data = api.json("GET", "/v1/users")
    if as_json:
        print_json(data)
        return
    rows = [
        [u.get("name"), u.get("role"), u.get("email"), u.get("projects"), u.get("created_at")]
        for u in data["data"]
    ]
    print_table(["NAME", "ROLE", "EMAIL", "PROJECTS", "CREATED"], rows, "No users.")


@user_app.command("token")
def user_token(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    description: Annotated[str | None, typer.Option("--description")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Issue an API token for a user; it is printed this once and never again."""
    body = {} if description is None else {"description": description}
    with connect(url, token) as api:
        data = api.json("POST", f"/v1/users/{segment(name)}/tokens", body=body)
    if as_json:
        print_json(data)
        return
    typer.echo(fields((k, data.get(k)) for k in ("id", "description", "created_at", "token")))
    typer.echo("Store the token now: the broker keeps only its hash.", err=True)


@user_app.command("tokens")
def user_tokens(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List a user's tokens (never the secrets)."""
    with connect(url, token) as api:
        data = api.json("GET", f"/v1/users/{segment(name)}/tokens")
    if as_json:
        print_json(data)
        return
    rows = [
        [
            t.get("id"),
            t.get("description"),
            t.get("created_at"),
            t.get("last_used_at"),
            t.get("revoked"),
        ]
        for t in data["data"]
    ]
    print_table(["ID", "DESCRIPTION", "CREATED", "LAST USED", "REVOKED"], rows, "No tokens.")


@user_app.command("revoke")
def user_revoke(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    token_id: Annotated[str, typer.Argument(metavar="TOKEN_ID")],
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revoke a token; it stops working at once."""
    with connect(url, token) as api:
        data = api.json("DELETE", f"/v1/users/{segment(name)}/tokens/{segment(token_id)}")
    if as_json:
        print_json(data)
    else:
        typer.echo(f"Revoked token {token_id} of {name}.")


# --- reports -------------------------------------------------------------------------------

report_app = typer.Typer(help="Usage reports (admins and engineers).", no_args_is_help=True)


class GroupBy(StrEnum):
    project = "project"
    user = "user"
    cluster = "cluster"
    gpu_type = "gpu_type"


@report_app.command("usage")
def report_usage(
    since: Annotated[
        str | None, typer.Option("--from", help="Start, RFC 3339 or a date (midnight UTC).")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--to", help="End, RFC 3339 or a date (midnight UTC).")
    ] = None,
    group_by: Annotated[GroupBy, typer.Option("--group-by")] = GroupBy.project,
    csv: Annotated[bool, typer.Option("--csv", help="Print the broker's CSV.")] = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """GPU-hours and job counts per project, user, cluster or GPU type."""
    if csv and as_json:
        raise typer.BadParameter("choose one of --csv and --json", param_hint="--csv")
    params = {"from": timestamp(since), "to": timestamp(until), "group_by": group_by.value}
    with connect(url, token) as api:
        if csv:
            response = api.call("GET", "/v1/usage", params=params, headers={"Accept": "text/csv"})
            typer.echo(response.text, nl=not response.text.endswith("\n"))
            return
        data = api.json("GET", "/v1/usage", params=params)
    if as_json:
        print_json(data)
        return
    rows = [
        [r.get("key"), r.get("gpu_hours"), r.get("jobs"), r.get("jobs_completed")]
        for r in data["data"]
    ]
    headers = [group_by.value.replace("_", " ").upper(), "GPU-HOURS", "JOBS", "COMPLETED"]
    print_table(headers, rows, "No usage in this period.")


# --- wiring --------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add the client commands and the ``project``, ``user``, ``report`` groups to ``app``."""
    for name, command in (
        ("submit", submit),
        ("jobs", jobs),
        ("job", job),
        ("job-events", job_events),
        ("cancel", cancel),
        ("usage", usage),
        ("clusters", clusters),
        ("whoami", whoami),
        ("audit", audit),
    ):
        app.command(name)(command)
    app.add_typer(project_app, name="project")
    app.add_typer(user_app, name="user")
    app.add_typer(report_app, name="report")
