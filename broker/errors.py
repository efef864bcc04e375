"""Errors of the broker's service layer, and the HTTP status each maps to.

    BrokerError                         500 internal
    +-- ValidationFailed                422 validation-error    malformed or out-of-range input
    +-- LimitExceeded                   422 limit-exceeded      a static project limit is broken
    +-- QuotaExceeded                   409 quota-exceeded      budget, concurrency or pending limit
    +-- IdempotencyConflict             422 idempotency-conflict
    +-- NotFound (LookupError)          404 not-found           unknown or invisible resource
    +-- Unauthenticated                 401 unauthenticated
    +-- Forbidden (PermissionError)     403 forbidden
    +-- Conflict                        409 conflict            e.g. creating a project that exists
    +-- PayloadTooLarge                 413 payload-too-large
    +-- SubmitRejected                  422 submit-rejected     sbatch refused the job
    +-- NoClusterIdentity               422 no-cluster-identity no Unix account to run the job as
    +-- ClusterUnavailable              503 cluster-unavailable Retry-After; nothing reserved
    +-- RateLimited                     429 rate-limited        Retry-After

The API turns these into RFC 9457 problem documents in exactly one place (``broker.api.problems``).
Each error carries the extra members of its problem document in ``extra``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class BrokerError(Exception):
    """Base of the service layer's errors."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, **extra: Any) -> None:
        self.detail = detail
        self.extra: dict[str, Any] = extra
        super().__init__(detail)


class ValidationFailed(BrokerError):
    status = 422
    type = "validation-error"
    title = "Invalid request"

    def __init__(self, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail, errors=errors or [])


class LimitExceeded(BrokerError):
    status = 422
    type = "limit-exceeded"
    title = "A project limit is exceeded"


class QuotaExceeded(BrokerError):
    status = 409
    type = "quota-exceeded"
    title = "The project's quota cannot take this job"


class IdempotencyConflict(BrokerError):
    status = 422
    type = "idempotency-conflict"
    title = "Idempotency-Key reused with a different request"


class NotFound(BrokerError, LookupError):
    status = 404
    type = "not-found"
    title = "Not found"


class Unauthenticated(BrokerError):
    status = 401
    type = "unauthenticated"
    title = "Missing or invalid credentials"


class Forbidden(BrokerError, PermissionError):
    status = 403
    type = "forbidden"
    title = "Not allowed"


class Conflict(BrokerError):
    status = 409
    type = "conflict"
    title = "Conflict"


class PayloadTooLarge(BrokerError):
    status = 413
    type = "payload-too-large"
    title = "Payload too large"


class SubmitRejected(BrokerError):
    status = 422
    type = "submit-rejected"
    title = "Slurm refused the job"


class NoClusterIdentity(BrokerError):
    status = 422
    type = "no-cluster-identity"
    title = "No Unix account to run the job as on this cluster"

    def __init__(self, cluster: str, detail: str) -> None:
        super().__init__(detail, cluster=cluster)


class ClusterUnavailable(BrokerError):
    status = 503
    type = "cluster-unavailable"
    title = "Cluster unavailable"

    def __init__(self, cluster: str, detail: str, retry_after: int = 30) -> None:
        self.retry_after = retry_after
        super().__init__(detail, cluster=cluster)


class RateLimited(BrokerError):
    status = 429
    type = "rate-limited"
    title = "Too many requests"

    def __init__(self, detail: str, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(detail)
