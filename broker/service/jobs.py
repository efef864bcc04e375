"""Submitting, reading and cancelling jobs.

Submission is two transactions around one sbatch: (1) validate, decide and reserve under the
project's ledger lock, and record the job as ``submitting`` with its tag; (2) after sbatch, record
the Slurm id (``pending``), or release the reservation (``submit_failed``), or keep it while the
reconciler finds the job by its tag (``submit_unknown``). sbatch never runs inside a transaction,
and a lost answer is never retried blindly.

This is the one exception to the API's unit-of-work convention (``broker.api.deps``: a route
passes a ``SessionDep``/``TransactionDep`` to the service): because Slurm is called between
database writes, ``JobService`` opens its own short transactions, and routes hand it only the
actor and the request. Authorization is still here, in the service layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Select, Table, bindparam, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from adapters.errors import AdapterError, CommandFailed, SlurmUnavailable, TransportError
from adapters.slurm.types import JobSpec
from broker import failpoints
from broker.clock import utcnow
from broker.config import Settings
from broker.db.engine import transaction
from broker.db.models import (
    JobEventRecord,
    JobRecord,
    JobTaskRecord,
    ProjectRecord,
    QuotaRecord,
    UserRecord,
)
from broker.errors import (
    BrokerError,
    ClusterUnavailable,
    Forbidden,
    IdempotencyConflict,
    LimitExceeded,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    SubmitRejected,
    ValidationFailed,
)
from broker.lifecycle import JobState, is_final
from broker.schemas import (
    JobCreate,
    JobEventPublic,
    JobEventsPublic,
    JobPublic,
    JobsPublic,
    ProjectCreate,
    ProjectPublic,
    TaskPublic,
    TasksPublic,
    TaskSummaryPublic,
)
from broker.service import arrays, ledger, placement, queue, transitions
from broker.service.cluster_identity import ClusterIdentities
from broker.service.clusters import ClusterRegistry
from broker.service.cursors import CursorSigner
from broker.service.identity import Actor
from broker.service.job_reads import JOB_VIEW_COLUMNS, JobFilter, JobReader, job_view
from broker.service.observer import BrokerObserver, NullObserver
from broker.service.projects import create_project, locked_for_admission
from broker.service.queue import Waiting
from quotas import (
    QUEUEABLE,
    JobRequest,
    Violation,
    decide,
    gpu_hours,
    reservation_gpu_seconds,
    weight_for,
)

log = logging.getLogger(__name__)

SBATCH_MARGIN_SECONDS = 2.0
"""Kept free between the end of a submitter's sbatch (its timeout at the latest) and the moment
the reconciler may look for the job by its tag (``poller.stale_submitting_seconds`` after the
job was admitted or claimed): the answer's way back and the database write that records it."""
MIN_SBATCH_SECONDS = 1.0
"""Less time than this left in that window: sbatch is not started (the job stays queued, or the
client is told to retry), rather than started to be cut off."""


@dataclass(frozen=True, slots=True)
class SubmitOutcome:
    job: JobPublic
    created: bool
    """False when an Idempotency-Key replayed an earlier submission."""


def request_fingerprint(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def violation_error(violation: Violation, detail: str) -> BrokerError:
    numbers = {
        key: value
        for key, value in (
            ("requested", violation.requested),
            ("allowed", violation.allowed),
            ("used", violation.used),
            ("reserved", violation.reserved),
            ("remaining", violation.remaining),
        )
        if value is not None
    }
    if violation.is_static:
        return LimitExceeded(detail, limit=violation.limit.value, **numbers)
    return QuotaExceeded(detail, limit=violation.limit.value, **numbers)


def _describe(v: Violation) -> str:
    match v.limit.value:
        case "gpu_hours":
            return (
                f"the job needs {v.requested} GPU-hours but the project has {v.remaining} left "
                f"({v.used} used, {v.reserved} reserved)"
            )
        case "concurrent_gpus":
            return f"{v.requested} more GPUs would exceed the concurrent limit of {v.allowed}"
        case "pending_jobs":
            return f"the project already has the most pending jobs allowed ({v.allowed})"
        case _:
            return f"{v.limit.value} {v.requested} is not allowed (allowed: {v.allowed})"


def job_public(
    job: JobRecord,
    project: str,
    user: str,
    tasks: TaskSummaryPublic | None = None,
    position: int | None = None,
) -> JobPublic:
    """The API's view of a job (``job_reads.job_view``, shared with the lean reads)."""
    return job_view(job, project, user, tasks, position)


def _publics(session: Session, rows: Sequence[tuple[JobRecord, str, str]]) -> list[JobPublic]:
    """Jobs as the API shows them, with their task summaries and queue positions (a query each
    for the arrays and the queued jobs among them, none for the others)."""
    jobs = [job for job, _, _ in rows]
    summaries = arrays.summaries(session, jobs)
    places = queue.positions(session, jobs)
    return [
        job_public(job, project, user, summaries.get(job.id), places.get(job.id))
        for job, project, user in rows
    ]


def _with_names() -> Select[JobRecord, str, str]:
    return (
        select(JobRecord, ProjectRecord.name, UserRecord.name)
        .join(ProjectRecord, ProjectRecord.id == JobRecord.project_id)
        .join(UserRecord, UserRecord.id == JobRecord.user_id)
    )


TASK_CURSOR_KIND = "tasks"


def _sbatch_spec(
    job: JobRecord, script: str, environment: dict[str, str], user_name: str
) -> JobSpec:
    """What sbatch is given for an admitted job (built in the admission transaction, or when the
    queue releases it)."""
    return JobSpec(
        script=script,
        account=job.account,
        partition=job.partition,
        gpus=job.gpus,
        gpu_type=job.gpu_type,
        time_limit_minutes=job.time_limit_minutes,
        tag=job.tag,
        name=job.name,
        nodes=job.nodes,
        cpus_per_gpu=job.cpus_per_gpu,
        mem_per_gpu_gb=job.mem_per_gpu_gb,
        environment=environment,
        comment=f"user={user_name}",
        run_as=job.unix_user,
        workdir=posixpath.dirname(job.stdout_path) if job.stdout_path else None,
        stdout_path=job.stdout_path,
        stderr_path=job.stderr_path,
        array_size=job.array_size,
        array_max_parallel=job.array_max_parallel,
    )


class JobService:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        clusters: ClusterRegistry,
        settings: Settings,
        observer: BrokerObserver | None = None,
        cursors: CursorSigner | None = None,
        identities: ClusterIdentities | None = None,
        reader: JobReader | None = None,
    ) -> None:
        self._sessions = sessions
        secret = settings.auth.cursor_secret
        self._cursors = cursors or CursorSigner(
            sessions, secret.get_secret_value() if secret else None
        )
        self._clusters = clusters
        self._settings = settings
        self._observer: BrokerObserver = observer or NullObserver()
        self._identities = identities or ClusterIdentities(clusters, settings)
        bind = sessions.kw["bind"]
        self._engine: Engine = bind
        self._reader = reader or JobReader(bind, self._cursors)

    # --- reading ---------------------------------------------------------------------------

    def _visible_job(
        self, session: Session, actor: Actor, job_id: str
    ) -> tuple[JobRecord, str, str]:
        row = session.execute(_with_names().where(JobRecord.id == job_id)).first()
        if row is None:
            raise NotFound(f"job {job_id} does not exist")
        job, project, user = row
        if not (actor.reads_everything or job.project_id in actor.project_ids):
            raise NotFound(f"job {job_id} does not exist")
        return job, project, user

    def get(self, actor: Actor, job_id: str) -> JobPublic:
        """A job the actor may see (404 otherwise), read as the API reads it."""
        return self._reader.get(actor, job_id)

    def tasks(self, actor: Actor, job_id: str, limit: int, cursor: str | None) -> TasksPublic:
        """An array's tasks in index order, each as Slurm last showed it; tasks Slurm has not
        started are listed as pending (no Slurm id of their own yet)."""
        after = -1
        if cursor:
            (encoded,) = self._cursors.decode(TASK_CURSOR_KIND, cursor, 1)
            if not encoded.isdigit():
                raise ValidationFailed("bad cursor", [{"field": "cursor", "message": "bad"}])
            after = int(encoded)
        with self._sessions() as session:
            job, _, _ = self._visible_job(session, actor, job_id)
            size = job.array_size or 0
            rows = {
                row.index: row
                for row in session.scalars(
                    select(JobTaskRecord)
                    .where(JobTaskRecord.job_id == job_id, JobTaskRecord.index > after)
                    .order_by(JobTaskRecord.index)
                    .limit(limit + 1)
                )
            }
            final = is_final(job.state)
        page: list[TaskPublic] = []
        index = after + 1
        while index < size and len(page) < limit + 1:
            row = rows.get(index)
            if row is not None:
                page.append(arrays.task_public(row))
            else:  # not started (yet): no row
                page.append(arrays.unstarted_task(index, cancelled=final))
            index += 1
        next_cursor = None
        if len(page) > limit:
            page = page[:limit]
            next_cursor = self._cursors.encode(TASK_CURSOR_KIND, str(page[-1].index))
        return TasksPublic(data=page, next_cursor=next_cursor)

    def events(self, actor: Actor, job_id: str) -> JobEventsPublic:
        with self._sessions() as session:
            self._visible_job(session, actor, job_id)
            rows = session.scalars(
                select(JobEventRecord)
                .where(JobEventRecord.job_id == job_id)
                .order_by(JobEventRecord.id)
            )
            return JobEventsPublic(
                data=[
                    JobEventPublic(
                        at=e.at, from_state=e.from_state, to_state=e.to_state, reason=e.reason
                    )
                    for e in rows
                ]
            )

    def list(self, actor: Actor, where: JobFilter, limit: int, cursor: str | None) -> JobsPublic:
        """Newest first, the actor's projects only, as the API lists them."""
        return self._reader.list(actor, where, limit, cursor)

    # --- submitting ------------------------------------------------------------------------

    def submit(self, actor: Actor, body: JobCreate, idempotency_key: str | None) -> SubmitOutcome:
        """Admit and submit; see the module docstring. Reports every outcome to the observer."""
        started = time.monotonic()
        # A label from user input must stay bounded: only configured cluster names pass.
        label = body.cluster if body.cluster in self._settings.clusters else "none"
        try:
            outcome = self._submit(actor, body, idempotency_key)
        except BrokerError as exc:
            limit = exc.extra.get("limit")
            self._observer.submission(
                label,
                _OUTCOMES.get(type(exc), "invalid"),
                limit if isinstance(limit, str) else None,
                time.monotonic() - started,
            )
            raise
        if not outcome.created:
            result = "replayed"
        elif outcome.job.state == JobState.SUBMIT_UNKNOWN.value:
            result = "unknown"
        else:
            result = "accepted"
        self._observer.submission(outcome.job.cluster, result, None, time.monotonic() - started)
        return outcome

    def _submit(
        self,
        actor: Actor,
        body: JobCreate,
        idempotency_key: str | None,
        *,
        again: bool = True,
    ) -> SubmitOutcome:
        limits = self._settings.limits
        if len(body.script.encode()) > limits.max_script_bytes:
            raise PayloadTooLarge(
                f"the script is larger than {limits.max_script_bytes} bytes",
                limit=limits.max_script_bytes,
            )
        if len(body.environment) > limits.max_environment_vars:
            raise ValidationFailed(
                f"at most {limits.max_environment_vars} environment variables",
                [{"field": "environment", "message": "too many variables"}],
            )
        if body.array is not None and body.array.size > limits.max_array_size:
            raise ValidationFailed(
                f"an array may have at most {limits.max_array_size} tasks",
                [{"field": "array.size", "message": f"at most {limits.max_array_size}"}],
            )
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
            raise ValidationFailed(
                "Idempotency-Key must be 1 to 200 characters",
                [{"field": "Idempotency-Key", "message": "1 to 200 characters"}],
            )
        fingerprint = request_fingerprint(body)
        try:
            while True:
                try:
                    with transaction(self._sessions) as session:
                        job, replayed = self._admit(
                            session, actor, body, idempotency_key, fingerprint
                        )
                        job_id, cluster_name, since = job.id, job.cluster, job.submitted_at
                        spec = _sbatch_spec(job, body.script, dict(body.environment), actor.name)
                        placed = job.placed
                        queued = (
                            job_public(job, body.project, actor.name)
                            if job.state == JobState.QUEUED.value
                            else None
                        )
                    break
                except _Unprepared as first_time:
                    # Before anything is reserved (the transaction above rolled back): the
                    # researcher's Unix account must be usable there. Once per user, cluster and
                    # process (prepare remembers success or raises); then admission again.
                    self._identities.prepare(first_time.cluster, actor.unix_user)
        except IntegrityError:
            # The key is unique per user, but admission locks only the project: the same key
            # sent at once for two projects meets here, at the unique constraint. The winner
            # has committed by now (the loser's insert waited for it); answer as if it had
            # been seen first.
            if idempotency_key is None:
                raise
            with self._sessions() as session:
                earlier = _by_idempotency_key(session, actor.user_id, idempotency_key)
                if earlier is None:
                    raise
                job_id, earlier_sha256 = earlier.id, earlier.request_sha256
            _check_replay(job_id, earlier_sha256, fingerprint)
            replayed = True
        if replayed:
            earlier_job = self._await_submitted(actor, job_id)
            if earlier_job.state == JobState.SUBMIT_FAILED.value and again:
                # The request this one repeats never reached Slurm and gave its key back while
                # this one waited: this retry is a new submission under the same key (once).
                return self._submit(actor, body, idempotency_key, again=False)
            return SubmitOutcome(earlier_job, created=False)
        if placed:
            self._observer.placement(cluster_name, "placed")
        if queued is not None:
            log.info("job %s queued: %s", job_id, queued.queue.message if queued.queue else "")
            return SubmitOutcome(queued, created=True)
        submitted = self._run_sbatch(
            job_id, cluster_name, spec, body.project, actor.name, since=since
        )
        return SubmitOutcome(submitted, created=True)

    def _admit(
        self,
        session: Session,
        actor: Actor,
        body: JobCreate,
        idempotency_key: str | None,
        fingerprint: str,
    ) -> tuple[JobRecord, bool]:
        """Admission under the project's ledger lock; ``_Unprepared`` when the researcher's
        directory on the chosen cluster is not known to exist yet (nothing written then)."""
        # Nothing is written through the session here: the statements of admission run on its
        # connection, without the ORM's bookkeeping per statement (about half their CPU). The
        # ledger lock comes first, so the project and quota read are those it protects.
        connection = session.connection()
        project, quota = locked_for_admission(connection, actor, body.project)
        self._require_submitter(actor, project)
        cluster_name, partition, gpu_type, placed_why = self._placement(
            session, project, quota, body
        )
        directory = self._identities.prepared(cluster_name, actor.unix_user)
        if directory is None:
            raise _Unprepared(cluster_name)
        account = project.slurm_accounts.get(cluster_name)
        if account is None:
            raise LimitExceeded(
                f"project {project.name} has no Slurm account on cluster {cluster_name}",
                limit="cluster",
                requested=cluster_name,
                allowed=sorted(project.slurm_accounts),
            )
        if idempotency_key is not None:
            earlier = _by_idempotency_key(session, actor.user_id, idempotency_key)
            if earlier is not None:
                _check_replay(earlier.id, earlier.request_sha256, fingerprint)
                return earlier, True
        now = utcnow()
        array = body.array
        request = JobRequest(
            cluster=cluster_name,
            partition=partition,
            gpu_type=gpu_type,
            gpus=body.gpus,
            time_limit_minutes=body.time_limit_minutes,
            tasks=array.size if array else 1,
            parallel_tasks=(array.max_parallel or array.size) if array else 1,
        )
        self._check_period(quota, request, now)
        assert quota is not None
        policy = ledger.policy_of(quota)
        snapshot = ledger.snapshot(connection, project.id, quota)
        decision = decide(request, policy, snapshot)
        waits: Waiting | None = None
        reservation = decision.reserve_gpu_seconds
        if self._settings.queue.enabled:
            waits = queue.admission_wait(session, project, snapshot, decision)
        if not decision.admitted and waits is None:
            violations = decision.violations
            if self._settings.queue.enabled:
                # What refuses it is what it could not wait for: name that first.
                violations = tuple(sorted(violations, key=lambda v: v.limit in QUEUEABLE))
            first = violations[0]
            raise violation_error(first, "; ".join(_describe(v) for v in violations))
        if waits is not None:
            reservation = request.tasks * reservation_gpu_seconds(
                request.gpus, request.time_limit_minutes, weight_for(policy, gpu_type)
            )
        job_id = str(uuid.uuid4())
        job = JobRecord(
            id=job_id,
            tag=f"brk-{job_id}",
            project_id=project.id,
            user_id=actor.user_id,
            name=body.name,
            cluster=cluster_name,
            partition=partition,
            gpu_type=gpu_type,
            account=account,
            gpus=body.gpus,
            nodes=body.nodes,
            time_limit_minutes=body.time_limit_minutes,
            cpus_per_gpu=body.cpus_per_gpu,
            mem_per_gpu_gb=body.mem_per_gpu_gb,
            script_sha256=hashlib.sha256(body.script.encode()).hexdigest(),
            state=JobState.SUBMITTING.value,
            submitted_at=now,
            updated_at=now,
            weight=weight_for(policy, gpu_type),
            reservation_gpu_seconds=reservation,
            reserved_gpu_seconds=reservation,
            missing_polls=0,
            idempotency_key=idempotency_key,
            request_sha256=fingerprint,
            unix_user=actor.unix_user,
            # An array's tasks each write their own files: %a is the task index.
            stdout_path=f"{directory}/{job_id}{'.%a' if array else ''}.out",
            stderr_path=f"{directory}/{job_id}{'.%a' if array else ''}.err",
            array_size=array.size if array else None,
            array_max_parallel=array.max_parallel if array else None,
        )
        reason = f"submitted by {actor.name}"
        if placed_why is not None:
            job.placed = True
            reason = f"{reason}; {placed_why}"
            if self._movable(job):
                job.queued_script = body.script
                job.queued_environment = dict(body.environment)
        if waits is not None:
            job.state = JobState.QUEUED.value
            job.queued_script = body.script
            job.queued_environment = dict(body.environment)
            job.queue_reason = waits.reason
            job.queue_message = waits.message
            reason = f"{reason}; queued: {waits.message}"
        # Written without the ORM's unit of work (a quarter of admission's CPU went to its
        # flush): ``job`` stays a plain, transient object this request reads from.
        connection.execute(_INSERT_JOB, _row_of(job))
        ledger.admitted(connection, job)
        connection.execute(_RECORD_EVENT, _event(job_id, now, None, job.state, reason))
        return job, False

    def _movable(self, job: JobRecord) -> bool:
        """A job the broker placed may move once (not an array: its tasks start one by one)."""
        return (
            self._settings.placement.moves
            and bool(job.placed)
            and not job.moves
            and not job.array_size
        )

    @staticmethod
    def _require_submitter(actor: Actor, project: ProjectRecord) -> None:
        if not (actor.is_admin or (actor.role == "researcher" and project.id in actor.project_ids)):
            raise Forbidden(f"{actor.role}s cannot submit jobs")

    def _placement(
        self, session: Session, project: ProjectRecord, quota: QuotaRecord | None, body: JobCreate
    ) -> tuple[str, str, str, str | None]:
        """Cluster, partition and GPU type of a request, with the defaults filled in, and why the
        broker chose the cluster when the request named none (``broker.service.placement``)."""
        cluster_name = body.cluster
        if cluster_name is None:
            chosen = placement.choose(
                session,
                self._settings,
                project,
                quota,
                partition=body.partition,
                gpu_type=body.gpu_type,
            )
            if chosen is not None:
                return chosen.cluster, chosen.partition, chosen.gpu_type, chosen.why
            if project.slurm_accounts:
                raise ValidationFailed(
                    "no cluster the project may use offers "
                    + (f"{body.gpu_type} GPUs" if body.gpu_type else "the requested partition"),
                    [
                        {
                            "field": "gpu_type" if body.gpu_type else "partition",
                            "message": "not offered",
                        }
                    ],
                )
            # A project without any Slurm account: the configured default names the cluster it
            # is refused on (limit "cluster"), or the only configured cluster does.
            cluster_name = self._settings.defaults.cluster or self._clusters.names[0]
        cluster = self._clusters.config(cluster_name)
        partition = body.partition or cluster.default_partition
        if partition not in cluster.partitions:
            raise ValidationFailed(
                f"cluster {cluster_name} has no partition {partition}",
                [
                    {
                        "field": "partition",
                        "message": "one of " + ", ".join(sorted(cluster.partitions)),
                    }
                ],
            )
        gpu_type = cluster.gpu_type_of(partition)
        if body.gpu_type is not None and body.gpu_type != gpu_type:
            raise ValidationFailed(
                f"partition {partition} on {cluster_name} has {gpu_type} GPUs, not {body.gpu_type}",
                [{"field": "gpu_type", "message": f"{partition} offers {gpu_type}"}],
            )
        return cluster_name, partition, gpu_type, None

    @staticmethod
    def _check_period(quota: QuotaRecord | None, request: JobRequest, now: datetime) -> None:
        requested = gpu_hours(request.gpus * request.time_limit_minutes * 60)
        if quota is None:
            raise QuotaExceeded(
                "the project has no GPU-hour quota yet; an admin must set one",
                limit="gpu_hours",
                requested=requested,
                used=0.0,
                reserved=0.0,
                remaining=0.0,
            )
        if not quota.period_start <= now < quota.period_end:
            raise QuotaExceeded(
                f"no allocation period is open now (the quota runs from "
                f"{quota.period_start.isoformat()} to {quota.period_end.isoformat()})",
                limit="gpu_hours",
                requested=requested,
                used=0.0,
                reserved=0.0,
                remaining=0.0,
            )

    def create_project(self, actor: Actor, body: ProjectCreate) -> ProjectPublic:
        """Create a project (admins), then its Slurm accounts, outside the transaction."""
        with transaction(self._sessions) as session:
            created = create_project(session, actor, body, set(self._clusters.names))
        self.prepare_accounts(created.slurm_accounts)
        return created

    def prepare_accounts(self, slurm_accounts: dict[str, str]) -> None:
        """Create a new project's Slurm accounts where the broker manages them (best effort:
        a cluster that is down now gets its account at the project's first submission)."""
        for cluster_name, account in slurm_accounts.items():
            try:
                self._identities.ensure_account(cluster_name, account)
            except AdapterError as exc:
                log.warning("account %s on %s not created yet: %s", account, cluster_name, exc)

    def _run_sbatch(
        self,
        job_id: str,
        cluster_name: str,
        spec: JobSpec,
        project: str,
        user_name: str,
        *,
        since: datetime,
        claimed: datetime | None = None,
    ) -> JobPublic:
        """sbatch for a job this process holds: ``submitting`` since ``since`` (a direct
        submission), or ``queued`` and claimed at ``claimed`` (= ``since``) by a queue pass.

        The reconciler takes over a job whose submitter seems gone once
        ``poller.stale_submitting_seconds`` have passed since then. A live submitter must be done
        before that, or the two would race: the reconciler finds no job by the tag while sbatch
        is still under way, gives the job up (or queues it again), and a second Slurm job follows.
        So sbatch gets only the time left in that window (``_sbatch_budget``); a submitter that
        finds its job taken over all the same cancels the Slurm job it made (``_recorded``).
        """
        try:
            self._identities.ensure_account(cluster_name, spec.account)
            if spec.run_as is not None:
                self._identities.ensure_association(cluster_name, spec.account, spec.run_as)
            budget = self._sbatch_budget(since)
            if budget is None:
                raise _TooLate(f"over {self._stale_seconds():g} s since the job was admitted")
            slurm_job_id = self._clusters.client(cluster_name).submit(spec, timeout=budget)
            failpoints.hit("after_sbatch")
        except AdapterError as exc:
            return self._after_failed_sbatch(job_id, cluster_name, exc, claimed)
        except ValueError as exc:
            self._release(job_id, JobState.SUBMIT_FAILED, f"refused before sbatch: {exc}")
            raise ValidationFailed(str(exc), [{"field": "body", "message": str(exc)}]) from exc
        public = self._recorded(job_id, slurm_job_id, project, user_name, claimed)
        if public is None:
            self._cancel_orphan(job_id, cluster_name, slurm_job_id, spec.run_as)
            if claimed is None:  # given up by the reconciler, its key free: the client retries
                raise ClusterUnavailable(
                    cluster_name,
                    f"cluster {cluster_name} answered too late; nothing was submitted or reserved",
                )
            return self._public(job_id)
        log.info("job %s submitted to %s as %s", job_id, cluster_name, slurm_job_id)
        return public

    def _stale_seconds(self) -> float:
        return self._settings.poller.stale_submitting_seconds

    def _sbatch_budget(self, since: datetime) -> float | None:
        """Seconds sbatch may take so that it ends before the reconciler may look for the job,
        or None when too little is left to start it."""
        elapsed = (utcnow() - since).total_seconds()
        left = self._stale_seconds() - SBATCH_MARGIN_SECONDS - elapsed
        return left if left >= MIN_SBATCH_SECONDS else None

    def _recorded(
        self,
        job_id: str,
        slurm_job_id: str,
        project: str,
        user_name: str,
        claimed: datetime | None,
    ) -> JobPublic | None:
        """Record sbatch's answer; None if the job is no longer this submitter's (the reconciler
        gave it up or queued it again meanwhile): the Slurm job just made is then an orphan."""
        if claimed is None:
            public = self._recorded_directly(job_id, slurm_job_id, project, user_name)
            if public is not None:
                return public
        with transaction(self._sessions) as session:
            job = session.get_one(JobRecord, job_id)
            if job.slurm_job_id == slurm_job_id:  # the reconciler attached it by its tag already
                return job_public(job, project, user_name)
            ours = job.slurm_job_id is None and (
                job.state == JobState.SUBMITTING.value
                if claimed is None
                else job.state == JobState.QUEUED.value and job.release_claimed_at == claimed
            )
            if not ours:
                return None
            transitions.move(
                session,
                job,
                JobState.PENDING,
                f"sbatch accepted as {slurm_job_id}",
                slurm_job_id=slurm_job_id,
            )
            job.in_slurm_since = utcnow()
            kept = (job.queued_script, job.queued_environment)
            queue.clear(job)
            if self._movable(job):  # it may have to be submitted again elsewhere, once
                job.queued_script, job.queued_environment = kept
            # The caller's project and name are the job's: no second read to answer.
            return job_public(job, project, user_name)

    def _recorded_directly(
        self, job_id: str, slurm_job_id: str, project: str, user_name: str
    ) -> JobPublic | None:
        """The common case of ``_recorded``, in two statements without the ORM: a direct
        submission still ``submitting``, with no Slurm id and no script kept for a move. The
        UPDATE's condition is the check, so nothing can change between reading and writing;
        None when it matches nothing (the general path then decides)."""
        now = utcnow()
        with self._engine.begin() as connection:
            row = connection.execute(
                _RECORD_PENDING,
                {
                    "job_id": job_id,
                    "slurm_job_id": slurm_job_id,
                    "now": now,
                    "submitting": JobState.SUBMITTING.value,
                    "pending": JobState.PENDING.value,
                },
            ).first()
            if row is None:
                return None
            ledger.regrouped(
                connection,
                row.gpus,
                ledger.Group(row.project_id, row.cluster, row.gpu_type, JobState.SUBMITTING.value),
                ledger.Group(row.project_id, row.cluster, row.gpu_type, row.state),
            )
            connection.execute(
                _RECORD_EVENT,
                _event(
                    job_id,
                    now,
                    JobState.SUBMITTING.value,
                    JobState.PENDING.value,
                    f"sbatch accepted as {slurm_job_id}",
                ),
            )
        return job_view(row, project, user_name)

    def _cancel_orphan(
        self, job_id: str, cluster_name: str, slurm_job_id: str, run_as: str | None
    ) -> None:
        log.error(
            "job %s: sbatch on %s answered %s after the job was taken over; cancelling that "
            "Slurm job so that it is never run twice",
            job_id,
            cluster_name,
            slurm_job_id,
        )
        try:
            self._clusters.client(cluster_name).cancel(slurm_job_id, as_user=run_as)
        except AdapterError as exc:
            log.error(
                "job %s: could not cancel orphan Slurm job %s on %s: %s",
                job_id,
                slurm_job_id,
                cluster_name,
                exc,
            )

    def submit_released(self, job_id: str) -> JobPublic | None:
        """sbatch for a job the queue released (``broker.service.queue``): the same path as a
        direct submission (its tag, ``submit_unknown`` when the answer is lost). A cluster that
        cannot be reached leaves the job queued, to be released again; None then."""
        with self._sessions() as session:
            row = session.execute(_with_names().where(JobRecord.id == job_id)).first()
            if row is None:
                return None
            job, project, user_name = row
            if job.state != JobState.QUEUED.value or job.release_claimed_at is None:
                return None  # cancelled meanwhile, or not this releaser's
            spec = _sbatch_spec(
                job, job.queued_script or "", dict(job.queued_environment or {}), user_name
            )
            cluster_name, claimed = job.cluster, job.release_claimed_at
        try:
            return self._run_sbatch(
                job_id, cluster_name, spec, project, user_name, since=claimed, claimed=claimed
            )
        except BrokerError as exc:  # refused by Slurm: settled submit_failed, reservation back
            log.warning("queued job %s could not be submitted: %s", job_id, exc)
            return self._public(job_id)

    def submit_moved(self, job_id: str) -> str | None:
        """sbatch on its new cluster for a job being moved (``broker.service.moves``), whose
        first Slurm job is confirmed gone; it carries the same tag. Returns the new Slurm id.

        A lost answer leaves the claim: the reconciler finds the job by its tag (or lets it be
        submitted again). A cluster that cannot be reached leaves it to be tried next cycle; a
        refusal ends it ``submit_failed`` with its reservation back.
        """
        with self._sessions() as session:
            row = session.execute(_with_names().where(JobRecord.id == job_id)).first()
            if row is None:
                return None
            job, _, user_name = row
            if job.state != JobState.PENDING.value or job.slurm_job_id is not None:
                return None
            cancelled = job.cancel_requested_at is not None
            spec = _sbatch_spec(
                job, job.queued_script or "", dict(job.queued_environment or {}), user_name
            )
            cluster_name, claimed = job.cluster, job.release_claimed_at
        if cancelled:  # cancelled between its two Slurm jobs: none is live, none is made
            self._release(job_id, JobState.CANCELLED, "cancelled while moving")
            return None
        try:
            self._identities.ensure_account(cluster_name, spec.account)
            if spec.run_as is not None:
                self._identities.ensure_association(cluster_name, spec.account, spec.run_as)
            # As for a release: sbatch ends before the reconciler may look for the job.
            budget = None if claimed is None else self._sbatch_budget(claimed)
            if budget is None:
                raise _TooLate("too late to submit the move")
            slurm_job_id = self._clusters.client(cluster_name).submit(spec, timeout=budget)
        except AdapterError as exc:
            if exc.may_have_run:
                log.warning("job %s: sbatch on %s lost its answer; looking by tag", job_id, exc)
                return None
            if isinstance(exc, TransportError | SlurmUnavailable) or exc.transient:
                self._unclaim_moved(job_id, claimed)
                log.warning(
                    "job %s: %s unavailable for its move; next cycle: %s", job_id, cluster_name, exc
                )
                return None
            reason = _slurm_reason(exc)
            self._release(
                job_id, JobState.SUBMIT_FAILED, f"sbatch on {cluster_name} refused: {reason}"
            )
            return None
        except ValueError as exc:
            self._release(job_id, JobState.SUBMIT_FAILED, f"refused before sbatch: {exc}")
            return None
        with transaction(self._sessions) as session:
            job = session.get_one(JobRecord, job_id)
            attached = job.slurm_job_id  # the reconciler's, when it found this one by the tag
            ours = attached is None and job.release_claimed_at == claimed
            if ours:
                now = utcnow()
                session.add(
                    JobEventRecord(
                        job_id=job_id,
                        at=now,
                        from_state=job.state,
                        to_state=job.state,
                        reason=f"sbatch on {cluster_name} accepted as {slurm_job_id}",
                    )
                )
                job.slurm_job_id = slurm_job_id
                job.in_slurm_since = now
                job.release_claimed_at = None
                job.updated_at = now
        if not ours:
            if attached != slurm_job_id:
                self._cancel_orphan(job_id, cluster_name, slurm_job_id, spec.run_as)
            return None
        self._observer.placement(cluster_name, "moved")
        log.info("job %s moved: submitted to %s as %s", job_id, cluster_name, slurm_job_id)
        return slurm_job_id

    def _unclaim_moved(self, job_id: str, claimed: datetime | None) -> None:
        with transaction(self._sessions) as session:
            job = session.get_one(JobRecord, job_id)
            if (
                job.slurm_job_id is None
                and not is_final(job.state)
                and job.release_claimed_at == claimed
            ):
                job.release_claimed_at = None

    def _after_failed_sbatch(
        self, job_id: str, cluster_name: str, exc: AdapterError, claimed: datetime | None
    ) -> JobPublic:
        if (
            not exc.may_have_run
            and (isinstance(exc, TransportError | SlurmUnavailable) or exc.transient)
            and self._unclaim(job_id, claimed)
        ):
            log.warning("queued job %s stays queued: %s unavailable: %s", job_id, cluster_name, exc)
            return self._public(job_id)
        if exc.may_have_run:
            log.warning("sbatch outcome for job %s unknown (%s); reconciler will look", job_id, exc)
            with transaction(self._sessions) as session:
                job = session.get_one(JobRecord, job_id)
                if claimed is None or job.release_claimed_at == claimed:
                    transitions.move(
                        session, job, JobState.SUBMIT_UNKNOWN, "sbatch answer lost; looking by tag"
                    )
            return self._public(job_id)
        log.warning("sbatch for job %s failed: %s", job_id, exc)
        if isinstance(exc, TransportError | SlurmUnavailable) or exc.transient:
            slow = isinstance(exc, _TooLate)
            self._release(
                job_id,
                JobState.SUBMIT_FAILED,
                "cluster too slow" if slow else "cluster unavailable",
            )
            state = "is too slow to answer" if slow else "cannot be reached"
            raise ClusterUnavailable(
                cluster_name,
                f"cluster {cluster_name} {state} now; nothing was submitted or reserved",
            ) from exc
        reason = _slurm_reason(exc)
        self._release(job_id, JobState.SUBMIT_FAILED, f"sbatch refused: {reason}")
        raise SubmitRejected(f"Slurm refused the job: {reason}", cluster=cluster_name) from exc

    def _unclaim(self, job_id: str, claimed: datetime | None) -> bool:
        """Give a released queued job back to the queue (nothing reached Slurm); False if the job
        is not a queued one. A claim the reconciler or another pass holds now is left alone."""
        with transaction(self._sessions) as session:
            job = session.get_one(JobRecord, job_id)
            if job.state != JobState.QUEUED.value:
                return False
            if job.release_claimed_at == claimed:
                job.release_claimed_at = None
            return True

    def _release(self, job_id: str, final: JobState, reason: str) -> None:
        """End a job that never reached Slurm: nothing charged, the key free for a retry."""
        with transaction(self._sessions) as session:
            job = session.get_one(JobRecord, job_id)
            transitions.settle(session, job, final, charge_gpu_seconds=0, reason=reason)
            job.idempotency_key = None

    def _public_in(self, session: Session, job_id: str) -> JobPublic:
        job, project, user = session.execute(_with_names().where(JobRecord.id == job_id)).one()
        return _publics(session, [(job, project, user)])[0]

    def _public(self, job_id: str) -> JobPublic:
        with self._sessions() as session:
            return self._public_in(session, job_id)

    def _await_submitted(self, actor: Actor, job_id: str) -> JobPublic:
        """A replay waits for the first request's sbatch to finish, then returns its job."""
        deadline = time.monotonic() + self._settings_timeout()
        while True:
            job = self.get(actor, job_id)
            if job.state != JobState.SUBMITTING.value or time.monotonic() > deadline:
                return job
            time.sleep(0.1)

    def _settings_timeout(self) -> float:
        return max(c.command_timeout_seconds for c in self._settings.clusters.values()) + 5

    # --- cancelling ------------------------------------------------------------------------

    def cancel(self, actor: Actor, job_id: str) -> tuple[JobPublic, bool]:
        """Request cancellation. Returns (job, accepted); accepted is False for a final job."""
        with transaction(self._sessions) as session:
            job, _, _ = self._visible_job(session, actor, job_id)
            if actor.role == "engineer":
                raise Forbidden(f"{actor.role}s cannot cancel jobs")
            if is_final(job.state):
                return self._public(job_id), False
            if job.state == JobState.QUEUED.value:
                # The queue claims jobs under this lock: either it has (sbatch under way; the
                # cancel below reaches the Slurm job) or it never will.
                ledger.lock_project(session, job.project_id)
                session.refresh(job)
                if job.state == JobState.QUEUED.value and job.release_claimed_at is None:
                    # Nothing is in Slurm: it ends here, its reservation back at once.
                    transitions.settle(
                        session,
                        job,
                        JobState.CANCELLED,
                        charge_gpu_seconds=0,
                        lock=False,
                        reason=f"cancelled by {actor.name} while queued",
                        cancel_requested_at=utcnow(),
                    )
                    queue.clear(job)
                    session.flush()
                    return self._public_in(session, job_id), True
            if job.cancel_requested_at is None:
                session.execute(
                    update(JobRecord)
                    .where(JobRecord.id == job_id)
                    .values(cancel_requested_at=utcnow())
                )
            slurm_job_id, cluster_name, unix_user = job.slurm_job_id, job.cluster, job.unix_user
        if slurm_job_id is not None:
            try:
                self._clusters.client(cluster_name).cancel(slurm_job_id, as_user=unix_user)
            except AdapterError as exc:
                log.warning(
                    "scancel of %s on %s failed, poller retries: %s",
                    slurm_job_id,
                    cluster_name,
                    exc,
                )
        return self._public(job_id), True


_JOBS = cast(Table, JobRecord.__table__)
_INSERT_JOB = insert(_JOBS)
_JOB_COLUMNS = frozenset(column.key for column in _JOBS.columns)


def _row_of(job: JobRecord) -> dict[str, Any]:
    """The columns set on a new job object, as the jobs table's INSERT takes them (the table's
    defaults fill the others)."""
    return {key: value for key, value in vars(job).items() if key in _JOB_COLUMNS}


_RECORD_PENDING = (
    update(JobRecord)
    .where(
        JobRecord.id == bindparam("job_id"),
        JobRecord.state == bindparam("submitting"),
        JobRecord.slurm_job_id.is_(None),
        JobRecord.queued_script.is_(None),
    )
    .values(
        state=bindparam("pending"),
        slurm_job_id=bindparam("slurm_job_id"),
        in_slurm_since=bindparam("now"),
        updated_at=bindparam("now"),
    )
    .returning(*JOB_VIEW_COLUMNS)
)
"""``submitting`` -> ``pending`` with sbatch's id, for ``JobService._recorded_directly``: the
columns the answer shows come back with it. A job whose script is kept (one that may move) is
left to the general path, which keeps it."""

_RECORD_EVENT = insert(JobEventRecord).inline()  # no RETURNING of the new id: nothing reads it
"""A job's event, written without the unit of work; its values come from ``_event``."""


def _event(
    job_id: str, at: datetime, from_state: str | None, to_state: str, reason: str
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "at": at,
        "from_state": from_state,
        "to_state": to_state,
        "reason": reason,
    }


_OUTCOMES: dict[type[BrokerError], str] = {
    QuotaExceeded: "rejected_quota",
    LimitExceeded: "rejected_policy",
    ClusterUnavailable: "cluster_unavailable",
    SubmitRejected: "slurm_rejected",
}


class _TooLate(AdapterError):
    """sbatch was not started: too little was left of the time its submitter has before the
    reconciler may take the job over (``JobService._sbatch_budget``). Nothing reached Slurm."""

    transient = True


class _Unprepared(Exception):
    """Admission stops before any write: the researcher's directory on ``cluster`` is not
    prepared in this process yet (``ClusterIdentities.prepare`` runs SSH commands, which never
    happen inside a transaction)."""

    def __init__(self, cluster: str) -> None:
        super().__init__(cluster)
        self.cluster = cluster


def _by_idempotency_key(session: Session, user_id: int, key: str) -> JobRecord | None:
    return session.scalar(
        select(JobRecord).where(JobRecord.user_id == user_id, JobRecord.idempotency_key == key)
    )


def _check_replay(job_id: str, earlier_sha256: str, fingerprint: str) -> None:
    """A reused key must come with the same request, or it is a conflict."""
    if earlier_sha256 != fingerprint:
        raise IdempotencyConflict(
            "this Idempotency-Key was used with a different request", job_id=job_id
        )


def _slurm_reason(exc: AdapterError) -> str:
    """Slurm's own one-line reason, as the adapter read it from stderr (never the raw stderr)."""
    reason = exc.reason if isinstance(exc, CommandFailed) else None
    return (reason or "sbatch failed")[:200]
