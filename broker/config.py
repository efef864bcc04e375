"""The broker's configuration: one TOML file, overridden key by key by ``BROKER_*`` variables.

``load_settings`` reads the file (the path given, or ``$BROKER_CONFIG``), lays the environment
over it (``BROKER_DATABASE__URL`` sets ``database.url``; ``__`` separates the levels), then the
caller's ``overrides`` if any, and validates the result. Every section forbids unknown keys, so
a typo fails at start-up instead of being ignored; a bad configuration raises ``ConfigError``
listing each bad key by its dotted path::

    invalid configuration in /etc/broker/config.toml:
      clusters.alpha.port: Input should be a valid integer, unable to parse string as an integer
      server.hots: Extra inputs are not permitted

``config.example.toml`` at the top of the repository documents every key.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

ENV_PREFIX = "BROKER_"
ENV_NESTED_DELIMITER = "__"
CONFIG_PATH_ENV = "BROKER_CONFIG"
"""Names the configuration file when ``load_settings`` is given no path."""

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Cluster, partition and GPU type names: safe in a URL, a metric label and a Slurm argument."""
_NAME_RE = re.compile(NAME_PATTERN)
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class ConfigError(ValueError):
    """The configuration cannot be used. ``problems`` holds one line per bad key."""

    def __init__(self, summary: str, problems: Sequence[str] = ()) -> None:
        self.summary = summary
        self.problems = tuple(problems)
        super().__init__("\n  ".join([summary, *self.problems]))


class _InvalidKeys(ValueError):
    """Raised by a check across keys of one section; each problem names its key in that section.

    ``load_settings`` turns the keys into full dotted paths; pydantic alone would report the
    section, not the key.
    """

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{key}: {why}" for key, why in self.problems))


def _raise_problems(problems: Sequence[tuple[str, str]]) -> None:
    if problems:
        raise _InvalidKeys(problems)


def _check_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid name: use 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


def _empty_is_none(value: object) -> object:
    return None if value == "" else value


def _expand_user(path: Path | None) -> Path | None:
    return None if path is None else path.expanduser()


Name = Annotated[str, AfterValidator(_check_name)]
Port = Annotated[int, Field(ge=1, le=65535)]
OptionalPath = Annotated[Path | None, BeforeValidator(_empty_is_none), AfterValidator(_expand_user)]
"""A file on the broker's host; an empty string means not set."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    """The HTTP listener."""

    host: str = "127.0.0.1"
    port: Port = 8080
    public_url: str = ""
    """Base URL users reach the broker at, for printed links; empty when unknown."""
    workers: PositiveInt = 1
    """API processes ``broker serve`` starts on this host (more than 1 needs PostgreSQL)."""
    read_threads: PositiveInt = 2
    """Threads per API process for the hot reads (a job, a page of jobs, ``/v1/me``, a token
    look-up): about one per core; more only when the database is far (``broker.api.threads``)."""

    @model_validator(mode="after")
    def _check_public_url(self) -> Self:
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            _raise_problems([("public_url", "must start with http:// or https:// (or be empty)")])
        return self


class DatabaseSettings(_Section):
    """Where jobs, projects and ledgers are kept."""

    url: str = Field(default="sqlite:///./broker.db", repr=False)
    """A SQLAlchemy URL; kept out of ``repr`` because it may hold a password."""
    pool_size: PositiveInt = 10
    echo: bool = False

    @model_validator(mode="after")
    def _check_url(self) -> Self:
        if not re.match(r"^[A-Za-z][A-Za-z0-9+]*://", self.url):
            _raise_problems(
                [
                    (
                        "url",
                        "must be a database URL such as sqlite:///./broker.db "
                        "or postgresql+psycopg://user@host/db",
                    )
                ]
            )
        return self


JwtAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
"""Signature algorithms ``auth.oidc.algorithms`` may pin: public-key ones only. ``none`` and the
HMAC family are never accepted: an HMAC "key" from a JWKS would be a public value anybody has."""
JWT_ALGORITHMS: tuple[str, ...] = get_args(JwtAlgorithm)


def _is_https_or_loopback(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")


class OidcSettings(_Section):
    """Federated sign-in: the site's OpenID Connect provider's JWTs as bearer tokens (API.md,
    "Tokens and federated login")."""

    enabled: bool = False
    """Off: broker tokens only, and the keys below are not used."""
    issuer: str = ""
    """The provider's issuer URL, exactly as its tokens' ``iss`` and its discovery document say
    (https; http only on a loopback address, for development)."""
    audience: str = ""
    """What the provider puts into ``aud`` of tokens meant for the broker."""
    user_claim: str = Field(default="preferred_username", min_length=1)
    """The claim whose value is the broker user's name."""
    unknown_users: Literal["refuse", "create"] = "refuse"
    """A valid token naming a user the broker does not know: 401, or the user is created as a
    researcher without projects (an admin adds them to projects)."""
    algorithms: Annotated[list[JwtAlgorithm], Field(min_length=1)] = ["RS256"]
    """Signature algorithms accepted, pinned; a token signed otherwise is refused."""
    leeway_seconds: float = Field(default=30.0, ge=0, le=300)
    """Clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""
    jwks_refresh_min_seconds: float = Field(default=30.0, ge=0)
    """A token signed with an unknown key id fetches the provider's keys again, at most this
    often (tokens with made-up key ids cannot make the broker hammer the provider)."""
    jwks_max_age_seconds: float = Field(default=600.0, gt=0)
    """Keys are fetched again after this long, so a key the provider removed stops working.
    While the provider cannot be reached, the keys last fetched stay in use."""
    http_timeout_seconds: PositiveFloat = 5.0
    """Timeout of each request to the provider (discovery, keys, token endpoint)."""
    web_client_id: str = ""
    """The web pages' client at the provider (authorization code + PKCE); empty: no web sign-in."""
    web_client_secret: Annotated[SecretStr | None, BeforeValidator(_empty_is_none)] = None
    """That client's secret; unset for a public client."""
    web_login_label: str = ""
    """The provider's name on the sign-in page ("Sign in with ..."); empty: the issuer's host."""
    web_sign_out_at_provider: bool = True
    """Signing out of a page session that began at the provider also ends the session at the
    provider (its ``end_session_endpoint``, back to ``/ui/login``, which must be registered as
    the web client's post-logout redirect URI), so the next "Sign in with ..." on that browser
    asks for the password again. False: the broker's session only."""

    @model_validator(mode="after")
    def _check_urls(self) -> Self:
        if not self.enabled:
            return self
        problems = []
        if not _is_https_or_loopback(self.issuer):
            problems.append(
                ("issuer", "must be an https:// URL (http:// only on 127.0.0.1 or localhost)")
            )
        if not self.audience.strip():
            problems.append(("audience", "must not be empty"))
        _raise_problems(problems)
        return self


class AuthSettings(_Section):
    oidc: OidcSettings = Field(default_factory=OidcSettings)
    """``[auth.oidc]``: the site's OpenID provider's JWTs as bearer tokens, where enabled."""
    token_bytes: int = Field(default=32, ge=16, le=1024)
    """Random bytes in each issued API token; 16 (128 bits) is the floor."""
    cursor_secret: Annotated[
        Annotated[SecretStr, Field(min_length=32)] | None, BeforeValidator(_empty_is_none)
    ] = None
    """Key that signs pagination cursors (HMAC-SHA256), the same on every replica. Unset: a
    random key the broker keeps in its database (table ``broker_keys``), shared the same way."""
    token_cache_seconds: float = Field(default=30.0, ge=0)
    """How long a process keeps a resolved token; revocations reach every process at once
    anyway (PostgreSQL ``LISTEN``/``NOTIFY``). 0: look every token up on every request."""


class LimitsSettings(_Section):
    """Caps on what one request may send or ask for."""

    max_body_bytes: PositiveInt = 1_048_576
    max_script_bytes: PositiveInt = 262_144
    max_environment_vars: int = Field(default=64, ge=0)
    max_list_limit: PositiveInt = 500
    default_list_limit: PositiveInt = 50
    requests_per_minute: int = Field(default=600, ge=0)
    """Requests a minute per user (token bucket); 0 turns the limit off."""
    request_burst: PositiveInt = 60
    """Requests a user may send at once before the per-minute rate applies."""
    shared_rate_slice: int = Field(default=0, ge=0)
    """On PostgreSQL: requests of one user a process reserves at a time from the per-minute budget
    shared by every process; 0: a twentieth of ``requests_per_minute``."""
    max_output_bytes: PositiveInt = 1_048_576
    """Most bytes of a job's output one ``GET /v1/jobs/{id}/output`` returns."""
    max_array_size: int = Field(default=1000, ge=1, le=1_000_000)
    """Most tasks of one job array. Keep it at most the clusters' ``MaxArraySize`` (slurm.conf,
    1001 by default: indices up to 1000), or Slurm refuses the sbatch."""

    @model_validator(mode="after")
    def _check_consistent(self) -> Self:
        problems = []
        if self.default_list_limit > self.max_list_limit:
            problems.append(
                ("default_list_limit", f"must not exceed max_list_limit ({self.max_list_limit})")
            )
        if self.max_script_bytes > self.max_body_bytes:
            problems.append(
                (
                    "max_script_bytes",
                    f"must not exceed max_body_bytes ({self.max_body_bytes}): "
                    "the script travels in the request body",
                )
            )
        _raise_problems(problems)
        return self


class PollerSettings(_Section):
    """The loop that follows jobs in Slurm; one replica holds its lease at a time."""

    enabled: bool = True
    interval_seconds: float = Field(default=10.0, ge=1)
    missing_polls_before_unknown: PositiveInt = 3
    submit_unknown_grace_seconds: PositiveFloat = 120.0
    """A job no Slurm job carries the tag of this long after its last change (``submit_unknown``,
    or ``submitting`` with its submitter gone) is given up: ``submit_failed``, key free; a queue
    or move claim whose submitter is gone is given back this long after it was taken. Keep it
    above the longest an sbatch left on the login node may still take (Slurm's MessageTimeout
    times a few)."""
    stale_submitting_seconds: float = Field(default=120.0, ge=5)
    """A job still ``submitting`` (or a queue claim still unsubmitted) this long after it was
    admitted (claimed) lost its submitter (a crash between sbatch and the database): the
    reconciler looks for it by its tag. A live submitter gives sbatch only what is left of this
    window, less 2 s, so that the two never race; keep it above the longest sbatch, or slow
    submissions are answered 503 (nothing submitted) or 202 (``submit_unknown``)."""
    lease_seconds: PositiveFloat = 30.0
    accounting_lookback_hours: PositiveInt = 48
    drift_check_seconds: PositiveFloat = 600.0
    """How often the poller compares recent charges with sacct (broker_ledger_drift_gpu_seconds)."""

    @model_validator(mode="after")
    def _check_lease_outlives_a_cycle(self) -> Self:
        # A lease shorter than a cycle expires mid-cycle and lets a second replica poll too.
        if self.lease_seconds <= self.interval_seconds:
            _raise_problems(
                [
                    (
                        "lease_seconds",
                        f"must be longer than interval_seconds ({self.interval_seconds:g})",
                    )
                ]
            )
        return self


class QueueSettings(_Section):
    """The broker's admission queue (API.md, "Queueing in the broker")."""

    enabled: bool = True
    """A job that fits the budget but not a concurrency or pending-job limit is queued (202);
    off: refused at once with 409, as before the queue existed."""
    starvation_seconds: PositiveFloat = 1800.0
    """A queued job may be passed by later, smaller jobs that fit; once it has waited this long,
    nothing passes it any more (so large jobs are not starved by a stream of small ones)."""


class PlacementSettings(_Section):
    """Where a job that names no cluster goes, and when it moves (API.md, "Placement")."""

    move_after_seconds: PositiveFloat = 120.0
    """A job the broker placed that waits in Slurm for resources longer than this is moved, once,
    to a cluster with idle GPUs of a type the project may use."""
    moves: bool = True


class IdentitySettings(_Section):
    """Who jobs run as on the clusters (API.md, "Identity on the clusters")."""

    unix_user_defaults_to_name: bool = False
    """A user created without ``unix_user`` gets their broker name as Unix account."""
    service_accounts: list[str] = Field(default_factory=list)
    """Unix accounts jobs never run as, besides root and every cluster's login ``user``."""
    foreign_jobs: Literal["cancel", "charge"] = "cancel"
    """Jobs in a project's Slurm account that the broker did not submit: cancelled within one poll
    cycle and charged for what they used, or only charged."""


class UiSettings(_Section):
    """The web pages under ``/ui/``: how long a sign-in lasts and how its cookie is sent."""

    session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    """A page session ends this long after sign-in (sign-out ends it at once)."""
    secure_cookie: bool = False
    """Send the session cookie with ``Secure`` even when the request reached the broker over plain
    HTTP (set it behind a proxy that terminates TLS); an https request always gets it."""


class DefaultsSettings(_Section):
    cluster: str = ""
    """The cluster of a request that names none and whose project names none; empty: no default."""


class PartitionSettings(_Section):
    gpu_type: Name
    """The GPU type of the partition's nodes, as quota weights and limits name it (``h100``)."""


class ClusterSettings(_Section):
    """One Slurm cluster, reached over SSH, or by subprocess from the broker on its login node."""

    host: str = ""
    port: Port = 22
    user: str = ""
    private_key: OptionalPath = None
    known_hosts: OptionalPath = None
    transport: Literal["ssh", "local"] = "ssh"
    slurm_bin_dir: str = "/usr/bin"
    """Where sbatch, squeue, sacct and scancel are on the cluster; empty: found on the PATH."""
    slurm_conf: str = ""
    """``SLURM_CONF`` for the commands; empty: Slurm's default."""
    slurm_cluster_name: str = ""
    """Slurm's name for the cluster; empty: the table name."""
    default_partition: str
    manage_accounts: bool = False
    parent_account: str = ""
    """With ``manage_accounts``: the Slurm account the service account coordinates, under which
    projects' accounts are created (empty: Slurm's root, which needs a Slurm administrator)."""
    output_dir: str = "/home/{unix_user}/.broker/jobs"
    """Each job's working directory and output files, per researcher; ``{unix_user}`` and
    ``{cluster}`` are filled in. Created as the researcher, mode 0700."""
    connect_timeout_seconds: PositiveFloat = 10.0
    command_timeout_seconds: PositiveFloat = 30.0
    max_sessions: PositiveInt = 8
    partitions: dict[Name, PartitionSettings] = Field(default_factory=dict)

    _name: str = PrivateAttr(default="")

    @property
    def name(self) -> str:
        """The cluster's table name in the configuration (empty for a stand-alone instance)."""
        return self._name

    @property
    def slurm_name(self) -> str:
        """The name Slurm knows the cluster by (``--clusters``, sacct's ``Cluster``)."""
        return self.slurm_cluster_name or self._name

    def gpu_type_of(self, partition: str) -> str:
        """The GPU type of ``partition``; ``KeyError`` if the cluster has no such partition."""
        try:
            return self.partitions[partition].gpu_type
        except KeyError:
            raise KeyError(f"cluster {self._name!r} has no partition {partition!r}") from None

    @model_validator(mode="after")
    def _check_cluster(self) -> Self:
        problems = []
        if not self.partitions:
            problems.append(("partitions", "at least one partition is required"))
        elif self.default_partition not in self.partitions:
            known = ", ".join(sorted(self.partitions))
            problems.append(
                (
                    "default_partition",
                    f"{self.default_partition!r} is not one of this cluster's partitions ({known})",
                )
            )
        if self.transport == "ssh":
            required = {
                "host": self.host,
                "user": self.user,
                "private_key": self.private_key,
                "known_hosts": self.known_hosts,
            }
            problems.extend(
                (key, "is required for the ssh transport")
                for key, value in required.items()
                if not value
            )
        if self.slurm_cluster_name and not _NAME_RE.fullmatch(self.slurm_cluster_name):
            problems.append(("slurm_cluster_name", f"must match {NAME_PATTERN}"))
        try:
            example = self.output_dir.format(unix_user="alice", cluster="alpha")
        except (KeyError, IndexError, ValueError):
            example = ""
        if not example.startswith("/") or "{unix_user}" not in self.output_dir:
            problems.append(
                (
                    "output_dir",
                    "must be an absolute path with {unix_user} (and optionally {cluster}) in it",
                )
            )
        _raise_problems(problems)
        return self


class Settings(BaseSettings):
    """Everything the broker reads at start-up. Build it with ``load_settings``.

    ``load_settings`` is the one place the environment is read: constructed directly (in tests),
    ``Settings`` takes its arguments and nothing else.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    poller: PollerSettings = Field(default_factory=PollerSettings)
    defaults: DefaultsSettings = Field(default_factory=DefaultsSettings)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    ui: UiSettings = Field(default_factory=UiSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    placement: PlacementSettings = Field(default_factory=PlacementSettings)
    clusters: dict[Name, ClusterSettings] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings lays the environment over the file itself, so that a variable can
        # override one key of a table the file defines (pydantic-settings would rank init
        # arguments, i.e. the file, above the environment).
        return (init_settings,)

    @property
    def default_cluster(self) -> str | None:
        """``defaults.cluster``, else the only cluster when there is just one, else ``None``."""
        if self.defaults.cluster:
            return self.defaults.cluster
        if len(self.clusters) == 1:
            return next(iter(self.clusters))
        return None

    @model_validator(mode="after")
    def _check_settings(self) -> Self:
        problems = []
        if not self.clusters:
            problems.append(("clusters", "at least one is required: add a [clusters.NAME] table"))
        if self.defaults.cluster and self.defaults.cluster not in self.clusters:
            known = ", ".join(sorted(self.clusters)) or "none"
            problems.append(
                (
                    "defaults.cluster",
                    f"{self.defaults.cluster!r} is not a configured cluster ({known})",
                )
            )
        _raise_problems(problems)
        for name, cluster in self.clusters.items():
            # A copy, so that a ClusterSettings passed in by a caller is never renamed under it.
            named = cluster.model_copy()
            named._name = name
            self.clusters[name] = named
        return self


def load_settings(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Read the configuration file, apply ``BROKER_*`` variables, then ``overrides``, and validate.

    ``path`` defaults to ``$BROKER_CONFIG``. ``overrides`` is a nested mapping laid over the file
    table by table, like the environment (``{"poller": {"interval_seconds": 1}}`` changes that key
    only); it is for programs that configure a broker of their own (tests, benchmarks) without
    touching the process environment. Raises ``ConfigError`` when the file is missing or
    unreadable, is not TOML, or holds (with the environment and the overrides) any bad key.
    """
    config_path = _config_path(path)
    file_values = _read_toml(config_path)
    # BaseSettings.__init__ takes options such as _env_file as keyword arguments: a top-level
    # key spelt like one must fail as unknown, not configure pydantic-settings.
    hidden = sorted(key for key in [*file_values, *(overrides or {})] if key.startswith("_"))
    if hidden:
        raise ConfigError(
            f"invalid configuration in {config_path}:",
            [f"{_dotted((key,))}: Extra inputs are not permitted" for key in hidden],
        )
    try:
        env_values = EnvSettingsSource(Settings)()
    except SettingsError as exc:
        raise ConfigError(f"invalid {ENV_PREFIX}* environment variable: {exc}") from None
    values = _overlay(file_values, env_values)
    if overrides:
        values = _overlay(values, overrides)
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        # Not chained: pydantic's own message echoes the bad values, which may be secrets.
        raise ConfigError(
            f"invalid configuration in {config_path}:", list(_describe_all(exc.errors()))
        ) from None


def environment_for(overrides: Mapping[str, Any]) -> dict[str, str]:
    """The ``BROKER_*`` variables that apply ``overrides`` (as ``load_settings`` takes them) to
    a broker started as a separate process: ``{"poller": {"enabled": False}}`` gives
    ``{"BROKER_POLLER__ENABLED": "false"}``."""
    variables: dict[str, str] = {}

    def walk(prefix: str, table: Mapping[str, Any]) -> None:
        for key, value in table.items():
            name = f"{prefix}{ENV_NESTED_DELIMITER}{key}" if prefix else key
            if isinstance(value, Mapping):
                walk(name, value)
            elif isinstance(value, bool):
                variables[(ENV_PREFIX + name).upper()] = "true" if value else "false"
            else:
                variables[(ENV_PREFIX + name).upper()] = str(value)

    walk("", overrides)
    return variables


def _config_path(path: str | Path | None) -> Path:
    chosen = path if path is not None else os.environ.get(CONFIG_PATH_ENV, "")
    if not chosen:
        raise ConfigError(f"no configuration file given: pass its path or set {CONFIG_PATH_ENV}")
    return Path(chosen).expanduser()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None


def _overlay(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it, table by table.

    Environment variable names are case-insensitive, so pydantic-settings lower-cases them; a key
    from the environment replaces the file's key that differs only in case (``[clusters.Alpha]``).
    """
    merged = dict(base)
    for key, value in override.items():
        target = next((existing for existing in merged if existing.lower() == key.lower()), key)
        current = merged.get(target)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[target] = _overlay(current, value)
        else:
            merged[target] = value
    return merged


def _describe_all(errors: Sequence[ErrorDetails]) -> Iterator[str]:
    for error in errors:
        loc = tuple(part for part in error["loc"] if part != "[key]")
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _InvalidKeys):
            for key, why in cause.problems:
                yield _describe((*loc, *key.split(".")), why)
        elif isinstance(cause, ValueError):
            yield _describe(loc, str(cause))
        else:
            yield _describe(loc, error["msg"])


def _describe(loc: tuple[str | int, ...], why: str) -> str:
    line = f"{_dotted(loc)}: {why}"
    env_name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(part) for part in loc)
    if any(name.upper() == env_name.upper() for name in os.environ):
        line += f" (from {env_name.upper()})"
    return line


def _dotted(loc: tuple[str | int, ...]) -> str:
    """A TOML dotted key: ``clusters.alpha.port``, quoting parts that need it."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        key = part if _BARE_KEY_RE.fullmatch(part) else json.dumps(part)
        text = f"{text}.{key}" if text else key
    return text or "(top level)"
