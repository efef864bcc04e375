"""Configuration: the example file loads, the environment overrides it, bad keys are named."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from broker.config import (
    ClusterSettings,
    ConfigError,
    PartitionSettings,
    Settings,
    environment_for,
    load_settings,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"

MINIMAL = """
[clusters.alpha]
host = "login.alpha.example.org"
user = "svc-broker"
private_key = "/etc/broker/ssh/id_ed25519"
known_hosts = "/etc/broker/ssh/known_hosts"
default_partition = "gpu"

[clusters.alpha.partitions.gpu]
gpu_type = "h100"
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BROKER_* variable of the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.upper().startswith("BROKER_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert str(caught.value).startswith(f"invalid configuration in {tmp_path / 'config.toml'}:")
    return caught.value.problems


# --- the example file ---------------------------------------------------------------------------


def test_the_example_file_loads_with_the_documented_values() -> None:
    settings = load_settings(EXAMPLE)

    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8080
    assert settings.database.url == "sqlite:///./broker.db"
    assert settings.limits.max_list_limit == 500
    assert settings.poller.interval_seconds == 10
    assert list(settings.clusters) == ["alpha"]
    alpha = settings.clusters["alpha"]
    assert alpha.transport == "ssh"
    assert alpha.port == 22
    assert alpha.private_key == Path("/etc/broker/ssh/id_ed25519")
    assert alpha.default_partition == "gpu"
    assert alpha.gpu_type_of("gpu") == "h100"
    assert alpha.name == "alpha"
    assert alpha.slurm_name == "alpha"
    assert settings.default_cluster == "alpha"


def _keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _keys(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _flatten(table: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_the_example_file_shows_every_key() -> None:
    shown = set(_flatten(tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))))
    expected = {key for key in _keys(Settings) if key != "clusters"}
    expected |= {f"clusters.alpha.{key}" for key in _keys(ClusterSettings) if key != "partitions"}
    expected |= {f"clusters.alpha.partitions.gpu.{key}" for key in _keys(PartitionSettings)}

    assert shown == expected


def test_every_key_of_the_example_file_is_explained_by_a_comment() -> None:
    previous = ""
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        is_key = "=" in line and not line.startswith(("#", "["))
        if is_key:
            assert previous.startswith("#") or "#" in line, f"no comment explains: {line}"
        if line.strip():
            previous = line if not is_key else previous


# --- where the configuration comes from ---------------------------------------------------------


def test_the_path_can_come_from_broker_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_CONFIG", str(write(tmp_path, MINIMAL)))

    settings = load_settings(None)

    assert settings.clusters["alpha"].host == "login.alpha.example.org"


def test_defaults_fill_every_key_the_file_leaves_out(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL))

    assert settings.server.port == 8080
    assert settings.auth.token_bytes == 32
    assert settings.poller.lease_seconds == 30
    assert settings.clusters["alpha"].command_timeout_seconds == 30


def test_environment_variables_override_the_file_key_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, MINIMAL + "\n[database]\nurl = 'sqlite:///file.db'\npool_size = 3\n")
    monkeypatch.setenv("BROKER_DATABASE__URL", "postgresql+psycopg://broker@db/broker")
    monkeypatch.setenv("BROKER_CLUSTERS__ALPHA__PORT", "2222")
    monkeypatch.setenv("broker_server__port", "9090")

    settings = load_settings(path)

    assert settings.database.url == "postgresql+psycopg://broker@db/broker"
    assert settings.database.pool_size == 3  # the file's sibling key is kept
    assert settings.server.port == 9090
    alpha = settings.clusters["alpha"]
    assert alpha.port == 2222
    assert alpha.host == "login.alpha.example.org"
    assert alpha.gpu_type_of("gpu") == "h100"


def test_an_environment_override_reaches_a_cluster_table_named_in_capitals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, MINIMAL.replace("clusters.alpha", "clusters.Alpha"))
    monkeypatch.setenv("BROKER_CLUSTERS__ALPHA__USER", "svc-other")

    settings = load_settings(path)

    assert list(settings.clusters) == ["Alpha"]
    assert settings.clusters["Alpha"].user == "svc-other"


def test_overrides_change_only_the_keys_they_name(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[poller]\ninterval_seconds = 20\nlease_seconds = 60\n")

    settings = load_settings(
        path,
        overrides={
            "poller": {"interval_seconds": 1, "lease_seconds": 5},
            "database": {"url": "postgresql+psycopg://broker@db/broker"},
            "clusters": {"alpha": {"port": 2222}},
        },
    )

    assert settings.poller.interval_seconds == 1
    assert settings.poller.lease_seconds == 5
    assert settings.poller.missing_polls_before_unknown == 3  # not named: the default stays
    assert settings.database.url == "postgresql+psycopg://broker@db/broker"
    alpha = settings.clusters["alpha"]
    assert (alpha.port, alpha.host, alpha.user) == (2222, "login.alpha.example.org", "svc-broker")
    assert "BROKER_DATABASE__URL" not in os.environ  # nothing leaks into the process


def test_overrides_win_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_SERVER__PORT", "9090")
    monkeypatch.setenv("BROKER_SERVER__HOST", "0.0.0.0")

    settings = load_settings(write(tmp_path, MINIMAL), overrides={"server": {"port": 7070}})

    assert (settings.server.port, settings.server.host) == (7070, "0.0.0.0")


def test_bad_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            write(tmp_path, MINIMAL),
            overrides={
                "poller": {"interval_seconds": 5, "lease_seconds": 2},
                "server": {"hots": 1},
            },
        )

    assert sorted(caught.value.problems) == [
        "poller.lease_seconds: must be longer than interval_seconds (5)",
        "server.hots: Extra inputs are not permitted",
    ]


def test_an_override_cannot_reach_pydantic_settings_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="_env_file: Extra inputs are not permitted"):
        load_settings(write(tmp_path, MINIMAL), overrides={"_env_file": "/etc/passwd"})


def test_environment_for_gives_the_variables_a_separate_broker_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = {
        "poller": {"enabled": False, "interval_seconds": 2},
        "clusters": {"alpha": {"port": 2}},
    }
    variables = environment_for(overrides)
    assert variables == {
        "BROKER_POLLER__ENABLED": "false",
        "BROKER_POLLER__INTERVAL_SECONDS": "2",
        "BROKER_CLUSTERS__ALPHA__PORT": "2",
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    path = write(tmp_path, MINIMAL)
    assert load_settings(path) == load_settings(path, overrides=overrides)


def test_a_bad_environment_value_names_the_key_and_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_CLUSTERS__ALPHA__PORT", "twenty-two")

    (problem,) = problems_of(tmp_path, MINIMAL)

    assert problem.startswith("clusters.alpha.port: Input should be a valid integer")
    assert problem.endswith("(from BROKER_CLUSTERS__ALPHA__PORT)")


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "config.toml"

    with pytest.raises(ConfigError, match=f"not found: {re.escape(str(missing))}$"):
        load_settings(missing)


def test_no_path_and_no_broker_config_is_an_error() -> None:
    with pytest.raises(ConfigError, match="BROKER_CONFIG"):
        load_settings(None)


def test_a_file_that_is_not_toml_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 1\n")

    with pytest.raises(ConfigError, match=f"{re.escape(str(path))} is not valid TOML"):
        load_settings(path)


# --- bad keys -----------------------------------------------------------------------------------


def test_a_value_of_the_wrong_type_names_its_dotted_key(tmp_path: Path) -> None:
    text = MINIMAL.replace('default_partition = "gpu"', 'default_partition = "gpu"\nport = "ssh"')

    assert problems_of(tmp_path, text) == (
        "clusters.alpha.port: Input should be a valid integer, "
        "unable to parse string as an integer",
    )


def test_an_unknown_key_is_refused_not_ignored(tmp_path: Path) -> None:
    text = MINIMAL + "\n[server]\nhots = '0.0.0.0'\n\n[metrics]\nenabled = true\n"

    assert set(problems_of(tmp_path, text)) == {
        "server.hots: Extra inputs are not permitted",
        "metrics: Extra inputs are not permitted",
    }


def test_every_bad_key_is_listed_at_once(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + "\n[server]\nport = 0\n\n[poller]\ninterval_seconds = 0.5\n[auth]\ntoken_bytes = 8\n"
    )

    problems = problems_of(tmp_path, text)

    assert [problem.split(":")[0] for problem in problems] == [
        "server.port",
        "auth.token_bytes",
        "poller.interval_seconds",
    ]


@pytest.mark.parametrize("port", ["0", "65536", "-22"])
def test_a_port_must_be_between_1_and_65535(tmp_path: Path, port: str) -> None:
    text = MINIMAL.replace('default_partition = "gpu"', f'default_partition = "gpu"\nport = {port}')

    (problem,) = problems_of(tmp_path, text)

    assert problem.startswith("clusters.alpha.port: Input should be")


@pytest.mark.parametrize("key", ["connect_timeout_seconds", "command_timeout_seconds"])
def test_timeouts_must_be_positive(tmp_path: Path, key: str) -> None:
    text = MINIMAL.replace('default_partition = "gpu"', f'default_partition = "gpu"\n{key} = 0')

    assert problems_of(tmp_path, text) == (f"clusters.alpha.{key}: Input should be greater than 0",)


def test_a_default_partition_must_be_one_of_the_clusters_partitions(tmp_path: Path) -> None:
    text = MINIMAL.replace('default_partition = "gpu"', 'default_partition = "cpu"')

    assert problems_of(tmp_path, text) == (
        "clusters.alpha.default_partition: 'cpu' is not one of this cluster's partitions (gpu)",
    )


def test_a_cluster_needs_a_partition(tmp_path: Path) -> None:
    text = MINIMAL.split("[clusters.alpha.partitions.gpu]")[0]

    assert problems_of(tmp_path, text) == (
        "clusters.alpha.partitions: at least one partition is required",
    )


def test_at_least_one_cluster_is_required(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "[server]\nport = 8080\n") == (
        "clusters: at least one is required: add a [clusters.NAME] table",
    )


def test_the_default_cluster_must_be_configured(tmp_path: Path) -> None:
    text = MINIMAL + '\n[defaults]\ncluster = "beta"\n'

    assert problems_of(tmp_path, text) == (
        "defaults.cluster: 'beta' is not a configured cluster (alpha)",
    )


def test_cluster_and_partition_names_are_checked(tmp_path: Path) -> None:
    text = MINIMAL.replace("[clusters.alpha]", '[clusters."alpha one"]').replace(
        "[clusters.alpha.partitions.gpu]", '[clusters."alpha one".partitions."-gpu"]'
    )

    problems = problems_of(tmp_path, text)

    assert sorted(problem.split(": ")[0] for problem in problems) == [
        'clusters."alpha one"',
        'clusters."alpha one".partitions.-gpu',
    ]
    assert all("is not a valid name" in problem for problem in problems)


def test_the_ssh_transport_needs_a_key_and_known_hosts(tmp_path: Path) -> None:
    text = "\n".join(
        line for line in MINIMAL.splitlines() if not line.startswith(("private_key", "known_hosts"))
    )

    assert problems_of(tmp_path, text) == (
        "clusters.alpha.private_key: is required for the ssh transport",
        "clusters.alpha.known_hosts: is required for the ssh transport",
    )


def test_the_local_transport_needs_no_ssh_keys(tmp_path: Path) -> None:
    text = """
[clusters.beta]
transport = "local"
slurm_conf = "/etc/slurm/slurm.conf"
slurm_cluster_name = "beta-slurm"
default_partition = "a100"

[clusters.beta.partitions.a100]
gpu_type = "a100"
"""
    beta = load_settings(write(tmp_path, text)).clusters["beta"]

    assert beta.transport == "local"
    assert beta.private_key is None
    assert beta.slurm_name == "beta-slurm"
    assert beta.name == "beta"


def test_an_unknown_transport_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'default_partition = "gpu"', 'default_partition = "gpu"\ntransport = "rsh"'
    )

    assert problems_of(tmp_path, text) == (
        "clusters.alpha.transport: Input should be 'ssh' or 'local'",
    )


def test_cross_key_limits_are_checked(tmp_path: Path) -> None:
    text = MINIMAL + "\n[limits]\ndefault_list_limit = 600\n[poller]\nlease_seconds = 10\n"

    assert problems_of(tmp_path, text) == (
        "limits.default_list_limit: must not exceed max_list_limit (500)",
        "poller.lease_seconds: must be longer than interval_seconds (10)",
    )


def test_a_top_level_key_spelt_like_a_pydantic_settings_option_is_unknown(tmp_path: Path) -> None:
    assert problems_of(
        tmp_path, MINIMAL.replace("[clusters.alpha]", '_env_prefix = "X"\n[clusters.alpha]')
    ) == ("_env_prefix: Extra inputs are not permitted",)


def test_a_bad_configuration_does_not_echo_values(tmp_path: Path) -> None:
    text = (
        MINIMAL + '\n[database]\nurl = "postgresql://broker:hunter2@db/broker"\npool_size = "x"\n'
    )

    (problem,) = problems_of(tmp_path, text)

    assert problem.startswith("database.pool_size:")
    assert "hunter2" not in problem


# --- the loaded settings ------------------------------------------------------------------------


def test_gpu_type_of_an_unknown_partition_is_a_key_error(tmp_path: Path) -> None:
    alpha = load_settings(write(tmp_path, MINIMAL)).clusters["alpha"]

    with pytest.raises(KeyError, match="no partition 'cpu'"):
        alpha.gpu_type_of("cpu")


def test_settings_built_directly_take_only_their_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BROKER_SERVER__PORT", "9090")
    alpha = ClusterSettings(
        transport="local",
        default_partition="gpu",
        partitions={"gpu": PartitionSettings(gpu_type="h100")},
    )

    settings = Settings(clusters={"alpha": alpha})

    assert settings.server.port == 8080
    assert settings.clusters["alpha"].name == "alpha"


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL))

    with pytest.raises(ValidationError):
        settings.server.port = 1  # type: ignore[misc]


def test_the_database_url_stays_out_of_repr(tmp_path: Path) -> None:
    text = MINIMAL + '\n[database]\nurl = "postgresql+psycopg://broker:hunter2@db/broker"\n'

    settings = load_settings(write(tmp_path, text))

    assert "hunter2" not in repr(settings)


def test_with_several_clusters_and_no_default_there_is_no_default_cluster(tmp_path: Path) -> None:
    second = MINIMAL.replace("clusters.alpha", "clusters.beta")

    settings = load_settings(write(tmp_path, MINIMAL + second))

    assert sorted(settings.clusters) == ["alpha", "beta"]
    assert settings.default_cluster is None


@pytest.mark.parametrize(
    "output_dir", ["relative/{unix_user}", "/home/shared/jobs", "/home/{user}/jobs", "/x/{0}"]
)
def test_output_dir_must_be_absolute_and_per_user(tmp_path: Path, output_dir: str) -> None:
    """Every researcher's output in one directory would let them read each other's."""
    cluster = {
        "transport": "local",
        "default_partition": "gpu",
        "partitions": {"gpu": {"gpu_type": "h100"}},
        "output_dir": output_dir,
    }
    with pytest.raises(ValidationError, match="output_dir"):
        Settings.model_validate({"clusters": {"alpha": cluster}})
