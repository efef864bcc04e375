"""The broker's tables. Rows never leave the service layer; the API sees schemas.

Quota amounts are integer weighted GPU-seconds (see ``quotas.types``). A project's ledger is
defined by its job rows (``charged_gpu_seconds`` of finished jobs, ``reserved_gpu_seconds`` of live
ones) and kept as running totals (``LedgerUsedRecord``, ``LedgerLiveRecord``, ``JobTotalRecord``)
that every change to those columns updates in the same transaction, under the project row's lock,
which also serialises admission (see ``broker.service.ledger``, which can recompute and check them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy import text as sql_text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class ClippedString(TypeDecorator[str]):
    """``VARCHAR(length)`` for free text from outside the broker (Slurm, users, errors).

    Text longer than the column is cut to fit, its last character an ellipsis, and NUL characters
    (which PostgreSQL refuses in text) become U+FFFD, so one long Slurm reason or refusal can never
    make a write fail. Only the value sent to the database changes; the column type is unchanged.
    Identifiers (names, keys, tags, lease holders) stay plain ``String``: two clipped values could
    collide, so those are validated where they enter instead.
    """

    impl = String
    cache_ok = True
    ELLIPSIS = "\u2026"

    def __init__(self, length: int) -> None:
        if length < 1:
            raise ValueError("a clipped column needs a length of at least 1")
        super().__init__(length)
        self.length = length

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else clip(value, self.length)


def clip(text: str, length: int) -> str:
    """``text`` fitted into ``length`` characters (see ``ClippedString``)."""
    text = text.replace("\x00", "\ufffd")
    if len(text) <= length:
        return text
    return text[: length - 1] + ClippedString.ELLIPSIS


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON}


class UserRecord(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    email: Mapped[str | None] = mapped_column(ClippedString(254))
    created_at: Mapped[datetime]
    unix_user: Mapped[str | None] = mapped_column(String(32))
    """The Unix account this user's jobs run as on every cluster (None: cannot submit)."""


class TokenRecord(Base):
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(ClippedString(200), default="")
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    """After this the token no longer authenticates (None: it never expires)."""


class ProjectRecord(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    slurm_accounts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Slurm account per cluster name."""
    created_at: Mapped[datetime]
    ledger_version: Mapped[int] = mapped_column(BigInteger, default=0)
    """Bumped by every ledger change; the UPDATE that bumps it is the admission lock."""
    queue_held: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """An admin held the project's queue: its queued jobs stay queued."""


class MembershipRecord(Base):
    __tablename__ = "memberships"

    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[str] = mapped_column(String(16), default="member")
    created_at: Mapped[datetime]


class QuotaRecord(Base):
    """A project's current quota. One row per project; an update replaces it (and is audited)."""

    __tablename__ = "quotas"

    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    period_start: Mapped[datetime]
    period_end: Mapped[datetime]
    budget_gpu_seconds: Mapped[int] = mapped_column(BigInteger)
    gpu_type_weights: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    max_concurrent_gpus: Mapped[int | None]
    max_concurrent_gpus_per_cluster: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    max_gpus_per_job: Mapped[int | None]
    max_time_limit_minutes: Mapped[int | None]
    max_pending_jobs: Mapped[int | None]
    allowed_clusters: Mapped[list[str] | None] = mapped_column(JSON)
    allowed_partitions: Mapped[list[str] | None] = mapped_column(JSON)
    allowed_gpu_types: Mapped[list[str] | None] = mapped_column(JSON)
    updated_at: Mapped[datetime]


class JobRecord(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key", name="uq_jobs_user_idempotency_key"),
        Index("ix_jobs_project_state", "project_id", "state"),
        Index("ix_jobs_cluster_state", "cluster", "state"),
        Index("ix_jobs_submitted", "submitted_at", "id"),
        Index("ix_jobs_project_submitted", "project_id", "submitted_at"),
        Index("ix_jobs_project_ended", "project_id", "ended_at"),
        Index("ix_jobs_project_state_submitted", "project_id", "state", "submitted_at", "id"),
        Index("ix_jobs_tag", "tag", unique=True),
        Index("ix_jobs_state", "state"),
        # Job arrays only (few): /metrics reads the live ones at every scrape, which through
        # ix_jobs_state alone meant visiting every live job's row to find them.
        Index(
            "ix_jobs_arrays_state",
            "state",
            postgresql_where=sql_text("array_size IS NOT NULL"),
            sqlite_where=sql_text("array_size IS NOT NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(ClippedString(128))
    cluster: Mapped[str] = mapped_column(String(64))
    partition: Mapped[str] = mapped_column(String(64))
    gpu_type: Mapped[str] = mapped_column(String(64))
    account: Mapped[str] = mapped_column(String(64))
    gpus: Mapped[int]
    nodes: Mapped[int]
    time_limit_minutes: Mapped[int]
    cpus_per_gpu: Mapped[int | None]
    mem_per_gpu_gb: Mapped[int | None]
    script_sha256: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    state_reason: Mapped[str | None] = mapped_column(ClippedString(200))
    slurm_job_id: Mapped[str | None] = mapped_column(String(32))
    exit_code: Mapped[int | None]
    submitted_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]
    weight: Mapped[float] = mapped_column(Float)
    reservation_gpu_seconds: Mapped[int] = mapped_column(BigInteger)
    """What admission reserved (kept for reports)."""
    reserved_gpu_seconds: Mapped[int] = mapped_column(BigInteger)
    """What is still held: the reservation while live, 0 once settled."""
    charged_gpu_seconds: Mapped[int | None] = mapped_column(BigInteger)
    alloc_gpus: Mapped[int | None]
    elapsed_s: Mapped[int | None]
    missing_polls: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested_at: Mapped[datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_sha256: Mapped[str] = mapped_column(String(64))
    unix_user: Mapped[str | None] = mapped_column(String(32))
    """Who the job runs as on the cluster (None only for jobs from before identities)."""
    stdout_path: Mapped[str | None] = mapped_column(String(1024))
    """Where the job's output goes on the cluster, set by the broker at submission."""
    stderr_path: Mapped[str | None] = mapped_column(String(1024))
    array_size: Mapped[int | None]
    """For a job array: its number of tasks (indices 0..array_size-1); None for a single job."""
    array_max_parallel: Mapped[int | None]
    queued_script: Mapped[str | None] = mapped_column(Text)
    """The script, kept while the broker may still have to submit it: while ``queued``, and for
    a job it placed, until the job runs (it may move once); cleared then."""
    queued_environment: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    queue_reason: Mapped[str | None] = mapped_column(String(32))
    """While ``queued``: the limit it waits for (API.md: ``concurrent_gpus``, ...)."""
    queue_message: Mapped[str | None] = mapped_column(ClippedString(200))
    release_claimed_at: Mapped[datetime | None]
    """When the queue took the job to submit it (sbatch under way); None while it waits."""
    placed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """The request named no cluster: the broker chose it (and may move the job once)."""
    moves: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    move_target: Mapped[str | None] = mapped_column(String(130))
    """While a move is under way: ``cluster/partition`` it goes to (broker.service.moves)."""
    in_slurm_since: Mapped[datetime | None]
    """When sbatch accepted the job (on its current cluster)."""
    moved_from_cluster: Mapped[str | None] = mapped_column(String(64))
    moved_from_slurm_job_id: Mapped[str | None] = mapped_column(String(32))
    """After a move: the cluster and id of the Slurm job it left there (cancelled before it ran),
    the broker's own and not a foreign job while squeue still shows it."""


class JobTaskRecord(Base):
    """One task of a job array, as last seen in Slurm; a task Slurm has not started has no row."""

    __tablename__ = "job_tasks"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    slurm_job_id: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    """A broker job state (broker.lifecycle), from the task's Slurm state."""
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    exit_code: Mapped[int | None]
    alloc_gpus: Mapped[int | None]
    elapsed_s: Mapped[int | None]
    charged_gpu_seconds: Mapped[int | None] = mapped_column(BigInteger)
    """Set once the task is final by its own sacct record (or given up on)."""


class LedgerUsedRecord(Base):
    """What a project used in its quota's current period, by cluster, GPU type and user: the sum of
    ``quotas.charged_within`` over its finished jobs for that period. ``user_id`` 0 (``gpu_type``
    empty) holds its foreign jobs' charges (``ForeignJobRecord``). Rebuilt when the period changes.
    """

    __tablename__ = "ledger_used"

    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    cluster: Mapped[str] = mapped_column(String(64), primary_key=True)
    gpu_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    used_gpu_seconds: Mapped[int] = mapped_column(BigInteger, default=0)


class LedgerLiveRecord(Base):
    """What a project's live jobs hold on a cluster: reservations and GPUs."""

    __tablename__ = "ledger_live"

    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    cluster: Mapped[str] = mapped_column(String(64), primary_key=True)
    reserved_gpu_seconds: Mapped[int] = mapped_column(BigInteger, default=0)
    live_gpus: Mapped[int] = mapped_column(BigInteger, default=0)


class JobTotalRecord(Base):
    """Totals of a project's finished jobs by cluster, GPU type and final state (for /metrics)."""

    __tablename__ = "job_totals"

    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    cluster: Mapped[str] = mapped_column(String(64), primary_key=True)
    gpu_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    jobs: Mapped[int] = mapped_column(BigInteger, default=0)
    gpus: Mapped[int] = mapped_column(BigInteger, default=0)
    charged_gpu_seconds: Mapped[int] = mapped_column(BigInteger, default=0)
    gpu_seconds: Mapped[int] = mapped_column(BigInteger, default=0)
    """Sum of allocated GPUs x elapsed seconds, as Slurm reported them."""


class JobEventRecord(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime]
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(ClippedString(300))


class AuditRecord(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(ClippedString(200))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ClusterStatusRecord(Base):
    """What the poller last saw of a cluster; read by /v1/clusters, /readyz and /metrics."""

    __tablename__ = "cluster_status"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    up: Mapped[bool] = mapped_column(Boolean, default=False)
    last_poll_at: Mapped[datetime | None]
    last_success_at: Mapped[datetime | None]
    last_poll_duration_s: Mapped[float | None]
    last_error: Mapped[str | None] = mapped_column(ClippedString(500))
    partitions: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)


class ForeignJobRecord(Base):
    """A job in a project's Slurm account that the broker did not submit (e.g. sbatch from inside
    a job): cancelled or only charged, per ``[identity] foreign_jobs``, and charged to the project
    from its sacct record once it ended (``charged_gpu_seconds`` is None until then)."""

    __tablename__ = "foreign_jobs"
    __table_args__ = (
        UniqueConstraint("cluster", "slurm_job_id", name="uq_foreign_jobs_cluster_id"),
        Index("ix_foreign_jobs_project_ended", "project_id", "ended_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cluster: Mapped[str] = mapped_column(String(64))
    slurm_job_id: Mapped[str] = mapped_column(String(32))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    account: Mapped[str] = mapped_column(String(64))
    unix_user: Mapped[str | None] = mapped_column(String(32))
    name: Mapped[str | None] = mapped_column(String(128))
    gpu_type: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16))
    """``cancel`` or ``charge``: what the broker did about it."""
    slurm_state: Mapped[str] = mapped_column(String(32))
    seen_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    alloc_gpus: Mapped[int | None]
    elapsed_s: Mapped[int | None]
    missing_polls: Mapped[int] = mapped_column(Integer, default=0)
    charged_gpu_seconds: Mapped[int | None] = mapped_column(BigInteger)


class LeaseRecord(Base):
    """Named leases: the poller holds ``poller`` so only one process polls at a time."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime]


class BrokerKeyRecord(Base):
    """Random keys every replica shares, created on first use (the cursor HMAC key)."""

    __tablename__ = "broker_keys"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime]


class UiSessionRecord(Base):
    """A signed-in web page (``/ui/``): the cookie holds a random id, this row its SHA-256.

    Deleting the row signs the browser out. ``token_id`` is the broker token a token sign-in
    presented: revoking that token ends the session too. OIDC sign-ins have none.
    """

    __tablename__ = "ui_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_id: Mapped[str | None] = mapped_column(
        ForeignKey("tokens.id", ondelete="CASCADE"), index=True
    )
    via: Mapped[str] = mapped_column(String(16))
    """How the user signed in: ``token`` or ``oidc``."""
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)


class RateBudgetRecord(Base):
    """Requests drawn by one key (a user) from its per-minute budget in one window, shared by every
    API process and replica (``broker.service.ratelimit``)."""

    __tablename__ = "rate_budgets"

    key: Mapped[str] = mapped_column(String(80), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    """Unix time of the window's first second."""
    used: Mapped[int] = mapped_column(Integer)
