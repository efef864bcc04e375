"""The key cache alone (``broker.service.oidc.ProviderKeys``), with a scripted provider and a
clock the test moves: when it fetches, what it keeps while the provider fails. Milliseconds."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from broker.config import OidcSettings
from broker.service.oidc import ProviderKeys

ISSUER = "https://idp.example.org"


def public_jwk(kid: str) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key))
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


class ScriptedProvider:
    def __init__(self, issuer: str = ISSUER) -> None:
        self.issuer = issuer
        self.keys = [public_jwk("k1")]
        self.up = True
        self.requests: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={"issuer": self.issuer, "jwks_uri": f"{ISSUER}/jwks"})
        return httpx.Response(200, json={"keys": self.keys})


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def provider() -> ScriptedProvider:
    return ScriptedProvider()


def cache(provider: ScriptedProvider, clock: Clock) -> ProviderKeys:
    settings = OidcSettings(
        enabled=True,
        issuer=ISSUER,
        audience="b",
        jwks_refresh_min_seconds=30,
        jwks_max_age_seconds=600,
    )
    return ProviderKeys(settings, httpx.Client(transport=httpx.MockTransport(provider)), clock)


def test_unknown_kids_fetch_once_per_throttle_interval(provider: ScriptedProvider) -> None:
    clock = Clock()
    keys = cache(provider, clock)
    assert keys.key("k1") is not None
    assert keys.fetches == 1
    for _ in range(50):
        assert keys.key("forged") is None
    assert keys.fetches == 1  # within 30 s of the last fetch: no new fetch
    provider.keys.append(public_jwk("k2"))
    clock.now += 31
    assert keys.key("k2") is not None  # a rotation is picked up at the next allowed fetch
    assert keys.fetches == 2


def test_keys_are_refetched_after_max_age_and_removed_keys_stop_working(
    provider: ScriptedProvider,
) -> None:
    clock = Clock()
    keys = cache(provider, clock)
    assert keys.key("k1") is not None
    provider.keys = [public_jwk("k2")]
    clock.now += 599
    assert keys.key("k1") is not None  # still cached
    clock.now += 2
    assert keys.key("k1") is None
    assert keys.key("k2") is not None


def test_an_unreachable_provider_leaves_the_cached_keys_in_use(
    provider: ScriptedProvider, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    keys = cache(provider, clock)
    assert keys.key("k1") is not None
    provider.up = False
    for _ in range(3):
        clock.now += 700  # stale each time: every call tries again, and fails
        assert keys.key("k1") is not None
    assert keys.fetches == 4
    assert sum("cannot fetch the OIDC provider's keys" in r.message for r in caplog.records) == 1


def test_a_discovery_document_naming_another_issuer_gives_no_keys() -> None:
    impostor = ScriptedProvider(issuer="https://evil.example.org")
    keys = cache(impostor, Clock())
    assert keys.key("k1") is None
    assert "/jwks" not in impostor.requests
