"""Everything one broker process holds, built once from the settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from broker.config import Settings
from broker.db.engine import make_engine, make_session_factory
from broker.metrics import BrokerMetrics
from broker.scheduler import PollerSchedule
from broker.service.cluster_identity import ClusterIdentities
from broker.service.clusters import ClusterRegistry
from broker.service.cursors import CursorSigner
from broker.service.job_reads import JobReader
from broker.service.jobs import JobService
from broker.service.moves import Mover
from broker.service.oidc import OidcAuthenticator
from broker.service.output import JobOutputReader
from broker.service.poller import Poller
from broker.service.queue import AdmissionQueue
from broker.service.tokens import IdentityCache


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    clusters: ClusterRegistry
    jobs: JobService
    identities: ClusterIdentities
    output: JobOutputReader
    poller: Poller
    queue: AdmissionQueue
    mover: Mover
    metrics: BrokerMetrics
    cursors: CursorSigner
    tokens: IdentityCache
    job_reads: JobReader
    schedule: PollerSchedule | None = field(default=None)
    oidc: OidcAuthenticator | None = field(default=None)
    """The site's OpenID provider's JWTs as bearer tokens, where ``[auth.oidc]`` is enabled."""

    def start_poller(self) -> None:
        if self.schedule is None:
            self.schedule = PollerSchedule(
                self.sessions, self.poller, self.settings, self.queue, self.mover
            )
            self.schedule.start()

    def close(self) -> None:
        self.tokens.close()
        self.metrics.close()
        if self.schedule is not None:
            self.schedule.shutdown()
            self.schedule = None
        self.clusters.close()
        if self.oidc is not None:
            self.oidc.close()
        self.engine.dispose()


def build_runtime(settings: Settings, *, clusters: ClusterRegistry | None = None) -> Runtime:
    engine = make_engine(
        settings.database.url, pool_size=settings.database.pool_size, echo=settings.database.echo
    )
    sessions = make_session_factory(engine)
    metrics = BrokerMetrics()
    registry = clusters or ClusterRegistry(settings, observer=metrics.command)
    metrics.attach(sessions, settings, registry)
    secret = settings.auth.cursor_secret
    cursors = CursorSigner(sessions, secret.get_secret_value() if secret else None)
    identities = ClusterIdentities(registry, settings)
    reader = JobReader(engine, cursors)
    jobs = JobService(
        sessions,
        registry,
        settings,
        observer=metrics,
        cursors=cursors,
        identities=identities,
        reader=reader,
    )
    queue = AdmissionQueue(sessions, settings, observer=metrics)
    queue.attach(jobs)
    mover = Mover(sessions, registry, settings, identities)
    mover.attach(jobs)
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=sessions,
        clusters=registry,
        jobs=jobs,
        identities=identities,
        output=JobOutputReader(sessions, registry, settings),
        poller=Poller(sessions, registry, settings, observer=metrics),
        queue=queue,
        mover=mover,
        metrics=metrics,
        cursors=cursors,
        oidc=OidcAuthenticator(settings) if settings.auth.oidc.enabled else None,
        job_reads=reader,
        tokens=IdentityCache(
            sessions,
            settings.auth.token_cache_seconds,
            shared=engine.dialect.name != "sqlite",
        ),
    )


def configure_logging(level: str) -> None:
    """Log lines of ``level`` and above to stderr, without the libraries' per-cycle chatter."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("paramiko").setLevel(logging.WARNING)
    if level.lower() != "debug":
        # APScheduler logs every run of the poller's job at INFO: per-cycle chatter that buries
        # what matters (the poller logs its own events: lease taken, jobs settled, outages).
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
