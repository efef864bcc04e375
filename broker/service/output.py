"""A job's output, read on its cluster as the job's own Unix user.

The broker chose the paths at submission (``JobRecord.stdout_path``/``stderr_path``, under the
researcher's private job directory); a client never names a path. Reading goes through
``sudo -n -u <unix_user>``, so Unix permissions decide, as they would for the researcher at a
terminal. Only the job's submitter and admins may read it; anyone else gets 404.
"""

from __future__ import annotations

import logging
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from adapters.errors import AdapterError, TransportError
from broker.config import Settings
from broker.db.models import JobRecord, JobTaskRecord
from broker.errors import ClusterUnavailable, NotFound, ValidationFailed
from broker.lifecycle import is_final
from broker.schemas import JobOutputPublic
from broker.service.clusters import ClusterRegistry
from broker.service.identity import Actor

log = logging.getLogger(__name__)

Stream = Literal["stdout", "stderr"]


class JobOutputReader:
    def __init__(
        self, sessions: sessionmaker[Session], clusters: ClusterRegistry, settings: Settings
    ) -> None:
        self._sessions = sessions
        self._clusters = clusters
        self._settings = settings

    def read(
        self,
        actor: Actor,
        job_id: str,
        stream: Stream,
        offset: int,
        limit: int,
        task: int | None = None,
    ) -> JobOutputPublic:
        """Up to ``limit`` bytes (capped by ``limits.max_output_bytes``) from byte ``offset``."""
        if offset < 0 or limit < 1:
            raise ValidationFailed(
                "offset must be >= 0 and limit >= 1",
                [{"field": "offset" if offset < 0 else "limit", "message": "out of range"}],
            )
        with self._sessions() as session:
            row = session.execute(
                select(
                    JobRecord.user_id,
                    JobRecord.cluster,
                    JobRecord.state,
                    JobRecord.unix_user,
                    JobRecord.stdout_path,
                    JobRecord.stderr_path,
                    JobRecord.array_size,
                ).where(JobRecord.id == job_id)
            ).first()
            if row is None or not (actor.is_admin or row.user_id == actor.user_id):
                raise NotFound(f"job {job_id} does not exist")
            final = is_final(row.state)
            if row.array_size and task is not None and task < row.array_size:
                task_state = session.scalar(
                    select(JobTaskRecord.state).where(
                        JobTaskRecord.job_id == job_id, JobTaskRecord.index == task
                    )
                )
                final = final or (task_state is not None and is_final(task_state))
        if not row.array_size and task is not None:
            raise ValidationFailed(
                f"job {job_id} is not an array: it has no tasks",
                [{"field": "task", "message": "only for array jobs"}],
            )
        if row.array_size and (task is None or task >= row.array_size):
            raise ValidationFailed(
                f"job {job_id} is an array: give the task whose output to read "
                f"(0 to {row.array_size - 1})",
                [{"field": "task", "message": f"0 to {row.array_size - 1}"}],
            )
        path = row.stdout_path if stream == "stdout" else row.stderr_path
        if path is not None and task is not None:
            path = path.replace("%a", str(task))  # each task wrote its own file
        limit = min(limit, self._settings.limits.max_output_bytes)
        if path is None or row.unix_user is None:
            return _chunk(stream, offset, b"", size=0, final=final)
        try:
            chunk = self._clusters.client(row.cluster).read_file(row.unix_user, path, offset, limit)
        except AdapterError as exc:
            if isinstance(exc, TransportError) or exc.transient:
                raise ClusterUnavailable(
                    row.cluster, f"cluster {row.cluster} cannot be reached now; try again"
                ) from exc
            log.warning("output of job %s cannot be read: %s", job_id, exc)
            raise NotFound(f"the {stream} of job {job_id} cannot be read on its cluster") from exc
        if chunk is None:  # not written yet (the job has not started), or never will be
            return _chunk(stream, offset, b"", size=0, final=final)
        return _chunk(stream, offset, chunk.data, size=chunk.size, final=final)


def _chunk(stream: Stream, offset: int, data: bytes, *, size: int, final: bool) -> JobOutputPublic:
    next_offset = offset + len(data)
    return JobOutputPublic(
        stream=stream,
        offset=offset,
        next_offset=next_offset,
        size=size,
        eof=final and next_offset >= size,
        data=data.decode("utf-8", errors="replace"),
    )
