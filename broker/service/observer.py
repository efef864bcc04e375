"""What the service layer reports as it works, for metrics. Calls come after the change commits."""

from __future__ import annotations

from typing import Protocol


class BrokerObserver(Protocol):
    def submission(self, cluster: str, outcome: str, limit: str | None, seconds: float) -> None:
        """A POST /v1/jobs ended. ``outcome``: accepted, replayed, rejected_quota,
        rejected_policy, invalid, cluster_unavailable, slurm_rejected, unknown (sbatch answer lost).
        ``limit`` names the quota or policy limit for rejections; ``seconds`` runs from the
        request to the Slurm id."""

    def job_started(self, cluster: str, gpu_type: str, wait_seconds: float) -> None:
        """A job was first seen running, ``wait_seconds`` after it was submitted."""

    def job_lost(self, cluster: str) -> None:
        """A followed job was settled ``unknown``: neither squeue nor sacct knows it any more."""

    def queue_released(self, cluster: str, waited_seconds: float) -> None:
        """A queued job went to Slurm after ``waited_seconds`` in the broker's queue."""

    def placement(self, cluster: str, outcome: str) -> None:
        """The broker chose ``cluster`` for a job that named none (``placed``) or moved a waiting
        job there (``moved``)."""

    def foreign_job(self, cluster: str, action: str) -> None:
        """A job the broker did not submit was found in a project's account (``cancel`` or
        ``charge``: what the broker did about it)."""

    def poll(self, cluster: str, ok: bool, seconds: float, status_commands: int) -> None:
        """One poll cycle of one cluster ended."""

    def ledger_drift(self, cluster: str, project: str, seconds: int) -> None:
        """Charged GPU-seconds of the broker minus what sacct implies, over recent finished jobs."""


class NullObserver:
    """Observes nothing (tests, tools)."""

    def submission(self, cluster: str, outcome: str, limit: str | None, seconds: float) -> None:
        return None

    def job_started(self, cluster: str, gpu_type: str, wait_seconds: float) -> None:
        return None

    def job_lost(self, cluster: str) -> None:
        return None

    def queue_released(self, cluster: str, waited_seconds: float) -> None:
        return None

    def placement(self, cluster: str, outcome: str) -> None:
        return None

    def foreign_job(self, cluster: str, action: str) -> None:
        return None

    def poll(self, cluster: str, ok: bool, seconds: float, status_commands: int) -> None:
        return None

    def ledger_drift(self, cluster: str, project: str, seconds: int) -> None:
        return None
