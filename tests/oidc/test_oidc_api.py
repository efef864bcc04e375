"""The API with the real local OpenID provider's tokens (API.md, "Tokens and federated login").

Every token here comes from the provider's own flows (the device flow through its pages, client
credentials); forged ones are real tokens changed the way an attacker would.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.db.engine import transaction
from broker.service import identity
from tests.broker.harness import Env, build_env
from tests.oidc_provider import (
    OTHER_AUDIENCE,
    Provider,
    device_token,
    provider_settings,
    robot_token,
)

JOB = {
    "project": "climate",
    "cluster": "alpha",
    "script": "#!/bin/bash\nhostname\n",
    "gpus": 1,
    "time_limit_minutes": 10,
}


def broker_for(tmp_path: Path, provider: Provider, **oidc: Any) -> Env:
    limits = oidc.pop("limits", None)
    return build_env(
        f"sqlite:///{tmp_path}/broker.db",
        limits=limits,
        auth={"oidc": provider_settings(provider, **oidc)},
    )


@pytest.fixture
def env(tmp_path: Path, provider: Provider) -> Iterator[Env]:
    environment = broker_for(tmp_path, provider)
    yield environment
    environment.runtime.close()


@pytest.fixture
def api(env: Env) -> Iterator[TestClient]:
    with TestClient(create_app(env.runtime)) as client:
        yield client


def access_token(provider: Provider, user: str, **kwargs: Any) -> str:
    token: str = device_token(provider, user, **kwargs)["access_token"]
    return token


def call(api: TestClient, token: str, method: str = "GET", path: str = "/v1/me", **kw: Any) -> Any:
    return api.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kw)


def refused(api: TestClient, token: str) -> str:
    """The detail of the 401 the broker answers ``token`` with."""
    response = call(api, token)
    assert response.status_code == 401, response.text
    assert response.json()["type"] == "unauthenticated"
    detail: str = response.json()["detail"]
    return detail


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_a_provider_token_works_on_every_kind_of_endpoint(
    api: TestClient, provider: Provider
) -> None:
    token = access_token(provider, "alice")
    me = call(api, token)
    assert me.status_code == 200
    assert me.json() == {"name": "alice", "role": "researcher", "projects": ["climate"]}
    submitted = call(api, token, "POST", "/v1/jobs", json=JOB)
    assert submitted.status_code == 201, submitted.text
    assert submitted.json()["user"] == "alice"
    listed = call(api, token, "GET", "/v1/jobs")
    assert [job["id"] for job in listed.json()["data"]] == [submitted.json()["id"]]
    assert call(api, token, "GET", "/v1/projects/climate/usage").status_code == 200
    # Who may do what comes from the broker's own records, not from the token.
    assert call(api, token, "GET", "/v1/projects/other").status_code == 404
    assert call(api, token, "GET", "/v1/users").status_code == 403


def test_broker_tokens_keep_working_next_to_provider_tokens(api: TestClient, env: Env) -> None:
    with transaction(env.runtime.sessions) as session:
        token = identity.issue_token(session, "test", "bob", "script").token
    assert call(api, token).json()["name"] == "bob"


def test_an_expired_token_is_refused(api: TestClient, provider: Provider) -> None:
    # broker-tests-short's tokens live OIDC_SHORT_TTL = 2 s (conftest); the broker's leeway is 0.
    token = access_token(provider, "alice", client_id="broker-tests-short")
    expires = jwt.decode(token, options={"verify_signature": False})["exp"]
    assert call(api, token).status_code == 200
    time.sleep(max(0.0, expires - time.time()) + 1.1)
    assert refused(api, token) == "invalid token: expired"


def test_a_token_for_another_audience_is_refused(api: TestClient, provider: Provider) -> None:
    token = access_token(provider, "alice", resource=OTHER_AUDIENCE)
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == OTHER_AUDIENCE
    assert refused(api, token) == "invalid token: not meant for this broker (aud)"


def test_a_token_of_another_issuer_signed_with_a_known_key_is_refused(
    api: TestClient, provider: Provider, tmp_path: Path
) -> None:
    # Another provider publishing the same keys under another issuer name: the signature
    # verifies, only iss tells the tokens apart.
    other = Provider.start(tmp_path / "other", OIDC_KEYS_FILE=str(provider.state_dir / "jwks.json"))
    try:
        token = access_token(other, "alice")
    finally:
        other.stop()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == other.issuer != provider.issuer
    assert jwt.get_unverified_header(token)["kid"] in provider.key_ids()
    assert refused(api, token) == "invalid token: issued by another provider (iss)"


def test_a_token_signed_by_a_key_the_provider_does_not_publish_is_refused(
    api: TestClient, provider: Provider, env: Env, tmp_path: Path
) -> None:
    assert call(api, access_token(provider, "alice")).status_code == 200
    # The same issuer name, the same claims, but its own keys: what an attacker with a key of
    # their own would sign.
    rogue = Provider.start(tmp_path / "rogue", OIDC_ISSUER=provider.issuer)
    try:
        token = access_token(rogue, "alice")
    finally:
        rogue.stop()
    kid = jwt.get_unverified_header(token)["kid"]
    assert kid not in provider.key_ids()
    fetches = env.runtime.oidc.verifier.keys.fetches  # type: ignore[union-attr]
    assert (
        refused(api, token)
        == f"invalid token: signing key {kid!r} is not one of the identity provider's"
    )
    # The unknown key id made the broker look again (the provider may have rotated), once.
    assert env.runtime.oidc.verifier.keys.fetches == fetches + 1  # type: ignore[union-attr]


def test_unknown_key_ids_refetch_the_keys_at_most_once_per_throttle_interval(
    tmp_path: Path, provider: Provider
) -> None:
    env = broker_for(tmp_path, provider, jwks_refresh_min_seconds=60)
    try:
        with TestClient(create_app(env.runtime)) as api:
            token = access_token(provider, "alice")
            assert call(api, token).status_code == 200
            keys = env.runtime.oidc.verifier.keys  # type: ignore[union-attr]
            _header, payload, signature = token.split(".")
            fetches = keys.fetches
            for n in range(20):
                made_up = b64({"alg": "RS256", "typ": "at+jwt", "kid": f"made-up-{n}"})
                assert "is not one of the identity provider's" in refused(
                    api, f"{made_up}.{payload}.{signature}"
                )
            assert keys.fetches - fetches <= 1
            assert call(api, token).status_code == 200
    finally:
        env.runtime.close()


def test_alg_none_and_hmac_with_the_public_key_are_refused(
    api: TestClient, provider: Provider
) -> None:
    token = access_token(provider, "alice")
    header = jwt.get_unverified_header(token)
    _, payload, _ = token.split(".")
    unsigned = f"{b64({**header, 'alg': 'none'})}.{payload}."
    assert refused(api, unsigned) == "invalid token: signature algorithm 'none' is not accepted"
    # The classic confusion: "HMAC-signed" with the provider's public key as the secret.
    signing_input = f"{b64({**header, 'alg': 'HS256'})}.{payload}"
    secret = provider_public_pem(provider, header["kid"])
    digest = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"
    assert refused(api, forged) == "invalid token: signature algorithm 'HS256' is not accepted"


def provider_public_pem(provider: Provider, kid: str) -> bytes:
    published = httpx.get(f"{provider.url}/jwks").json()["keys"]
    key = jwt.PyJWK(next(k for k in published if k["kid"] == kid))
    pem: bytes = key.key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


def test_a_token_whose_claims_were_changed_is_refused(api: TestClient, provider: Provider) -> None:
    token = access_token(provider, "alice")
    header, _payload, signature = token.split(".")
    claims = jwt.decode(token, options={"verify_signature": False})
    tampered = f"{header}.{b64({**claims, 'preferred_username': 'root'})}.{signature}"
    assert refused(api, tampered) == "invalid token: bad signature"


def test_a_machine_token_names_no_user_and_is_refused(api: TestClient, provider: Provider) -> None:
    token = robot_token(provider)
    assert "preferred_username" not in jwt.decode(token, options={"verify_signature": False})
    assert refused(api, token) == "the token names no broker user (no preferred_username claim)"


def test_an_unknown_user_is_refused_by_default(api: TestClient, provider: Provider) -> None:
    # The provider's "admin" is no user of this broker (its admin is "root").
    assert refused(api, access_token(provider, "admin")) == (
        "user admin is not known to the broker; ask an admin"
    )


def test_an_unknown_user_is_created_as_a_researcher_without_projects_when_configured(
    tmp_path: Path, provider: Provider
) -> None:
    env = broker_for(tmp_path, provider, unknown_users="create")
    try:
        with TestClient(create_app(env.runtime)) as api:
            token = access_token(provider, "admin")
            # Not an admin of the broker for being "admin" at the provider.
            assert call(api, token).json() == {
                "name": "admin",
                "role": "researcher",
                "projects": [],
            }
            assert call(api, token).status_code == 200  # the second request finds the user
            assert call(api, token, "GET", "/v1/users").status_code == 403
            assert call(api, token, "POST", "/v1/jobs", json=JOB).status_code == 404
            with transaction(env.runtime.sessions) as session:
                root = identity.authenticate(
                    session, identity.issue_token(session, "test", "root", "t").token
                )
                user = identity.get_user(session, root, "admin")
            assert user.email == "admin@example.org"
    finally:
        env.runtime.close()


def test_concurrent_first_sign_ins_create_the_user_once(
    tmp_path: Path, provider: Provider, database_url: str
) -> None:
    env = build_env(
        database_url, auth={"oidc": provider_settings(provider, unknown_users="create")}
    )
    try:
        oidc = env.runtime.oidc
        assert oidc is not None
        token = access_token(provider, "admin")
        with ThreadPoolExecutor(4) as pool:
            actors = list(
                pool.map(lambda _: oidc.authenticate(env.runtime.sessions, token), range(4))
            )
        assert {(a.name, a.role, a.user_id) for a in actors} == {
            ("admin", "researcher", actors[0].user_id)
        }
    finally:
        env.runtime.close()


def test_bad_provider_tokens_draw_on_the_same_rate_limit_as_bad_broker_tokens(
    tmp_path: Path, provider: Provider
) -> None:
    env = broker_for(tmp_path, provider, limits={"requests_per_minute": 6, "request_burst": 3})
    try:
        with TestClient(create_app(env.runtime)) as api:
            token = access_token(provider, "alice", resource=OTHER_AUDIENCE)
            statuses = [call(api, token).status_code for _ in range(3)]
            statuses += [call(api, "brk_not-a-token").status_code]
            assert statuses == [401, 401, 401, 429]
    finally:
        env.runtime.close()


def test_key_rotation_at_the_provider_while_the_broker_runs(tmp_path: Path) -> None:
    provider = Provider.start(tmp_path / "rotating")
    env = broker_for(tmp_path, provider, jwks_max_age_seconds=1.5)
    try:
        with TestClient(create_app(env.runtime)) as api:
            first_kid = provider.key_ids()[0]
            old = access_token(provider, "alice")
            assert call(api, old).status_code == 200

            published = provider.rotate_keys()
            assert published[1] == first_kid and published[0] != first_kid
            new = access_token(provider, "alice")
            assert jwt.get_unverified_header(new)["kid"] == published[0]
            # The new key is fetched on sight of its kid: no restart of the broker. (Once the
            # refresh throttle, jwks_refresh_min_seconds 0.2 here, allows a fetch: the token
            # above can come back from the provider sooner than that after the first fetch.)
            time.sleep(0.3)
            answer = call(api, new)
            assert answer.status_code == 200, answer.text
            # The old key is still published: tokens it signed stay valid until they expire.
            assert call(api, old).status_code == 200

            assert provider.retire_old_keys() == [published[0]]
            time.sleep(2.0)  # past jwks_max_age_seconds: the next request fetches the keys
            assert refused(api, old) == (
                f"invalid token: signing key {first_kid!r} is not one of the identity provider's"
            )
            assert call(api, new).status_code == 200
    finally:
        env.runtime.close()
        provider.stop()


def test_keys_fetched_before_keep_working_while_the_provider_is_down(tmp_path: Path) -> None:
    provider = Provider.start(tmp_path / "flaky")
    env = broker_for(tmp_path, provider, jwks_max_age_seconds=0.5)
    try:
        with TestClient(create_app(env.runtime)) as api:
            token = access_token(provider, "alice")
            assert call(api, token).status_code == 200
            provider.stop()
            time.sleep(1.0)  # the keys are due for a refresh, which fails
            assert call(api, token).status_code == 200
            assert call(api, token).status_code == 200
    finally:
        env.runtime.close()
        provider.stop()
