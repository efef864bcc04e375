"""``[auth.oidc]``: what the configuration accepts, and what it refuses at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import ConfigError, load_settings
from broker.service.oidc import looks_like_jwt

CLUSTER = """
[clusters.alpha]
transport = "local"
default_partition = "gpu"
[clusters.alpha.partitions.gpu]
gpu_type = "h100"
"""


def problems(tmp_path: Path, oidc: str) -> tuple[str, ...]:
    path = tmp_path / "config.toml"
    path.write_text(f"[auth.oidc]\n{oidc}\n{CLUSTER}", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return caught.value.problems


def test_off_by_default_and_nothing_else_is_required(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CLUSTER, encoding="utf-8")
    assert load_settings(path).auth.oidc.enabled is False


def test_enabled_needs_an_issuer_over_https_and_an_audience(tmp_path: Path) -> None:
    assert problems(tmp_path, "enabled = true") == (
        "auth.oidc.issuer: must be an https:// URL (http:// only on 127.0.0.1 or localhost)",
        "auth.oidc.audience: must not be empty",
    )
    plain = 'enabled = true\nissuer = "http://idp.example.org"\naudience = "b"'
    assert problems(tmp_path, plain) == (
        "auth.oidc.issuer: must be an https:// URL (http:// only on 127.0.0.1 or localhost)",
    )


@pytest.mark.parametrize("algorithm", ["none", "HS256", "RS1"])
def test_only_public_key_algorithms_can_be_pinned(tmp_path: Path, algorithm: str) -> None:
    text = f'enabled = true\nissuer = "https://idp"\naudience = "b"\nalgorithms = ["{algorithm}"]'
    (problem,) = problems(tmp_path, text)
    assert problem.startswith("auth.oidc.algorithms[0]: Input should be 'RS256'")


def test_the_environment_can_turn_it_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CLUSTER, encoding="utf-8")
    monkeypatch.setenv("BROKER_AUTH__OIDC__ENABLED", "true")
    monkeypatch.setenv("BROKER_AUTH__OIDC__ISSUER", "http://127.0.0.1:9400")
    monkeypatch.setenv("BROKER_AUTH__OIDC__AUDIENCE", "urn:aifactory:broker")
    oidc = load_settings(path).auth.oidc
    assert (oidc.enabled, oidc.issuer, oidc.algorithms) == (
        True,
        "http://127.0.0.1:9400",
        ["RS256"],
    )


def test_only_jwt_shaped_bearer_values_go_to_the_provider_check() -> None:
    assert looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln")
    assert not looks_like_jwt("brk_abc.def.ghi")  # a broker token stays a broker token
    assert not looks_like_jwt("brk_" + "x" * 43)
    assert not looks_like_jwt("a.b")
