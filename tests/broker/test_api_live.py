"""Guards that only a real HTTP server shows: chunked bodies over a real socket (uvicorn)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from broker.api.app import create_app
from broker.db.engine import transaction
from broker.service import identity
from tests.broker.harness import Env, build_env

MAX_BODY = 20_000


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Env]:
    environment = build_env(
        f"sqlite:///{tmp_path}/live.db",
        gpu_hours=100.0,
        limits={"max_body_bytes": MAX_BODY, "max_script_bytes": 10_000},
    )
    yield environment
    environment.runtime.close()


@pytest.fixture
def server(env: Env) -> Iterator[tuple[str, int]]:
    """The app served by uvicorn on a free loopback port, in a thread."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(create_app(env.runtime), lifespan="off", log_level="warning")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(
        target=uvicorn_server.run, kwargs={"sockets": [listener]}, daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not uvicorn_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield "127.0.0.1", port
    uvicorn_server.should_exit = True
    thread.join(timeout=10)
    listener.close()


def bearer(env: Env, user: str) -> str:
    with transaction(env.runtime.sessions) as session:
        return identity.issue_token(session, "test", user, "test").token


def read_response(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return int(status_line.split()[1]), headers, body[:length]


def test_chunked_body_over_the_limit_is_413_over_a_real_socket(
    server: tuple[str, int], env: Env
) -> None:
    host, port = server
    token = bearer(env, "alice")
    payload = json.dumps(
        {
            "project": "climate",
            "script": "#!/bin/bash\n" + "#" * (MAX_BODY * 2),
            "gpus": 1,
            "time_limit_minutes": 10,
        }
    ).encode()
    assert len(payload) > MAX_BODY
    request = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    for start in range(0, len(payload), 4096):
        piece = payload[start : start + 4096]
        request += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    request += b"0\r\n\r\n"
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(request)
        status, headers, body = read_response(conn)
    assert "content-length" not in request.split(b"\r\n\r\n")[0].decode().lower()
    assert status == 413, body
    assert headers["content-type"].startswith("application/problem+json")
    problem = json.loads(body)
    assert problem["type"] == "payload-too-large" and problem["limit"] == MAX_BODY
    assert env.slurm["alpha"].submits == 0


def test_chunked_body_within_the_limit_reaches_the_route(server: tuple[str, int], env: Env) -> None:
    host, port = server
    body = json.dumps(
        {"project": "climate", "script": "#!/bin/bash\nsleep 1\n", "gpus": 1,
         "time_limit_minutes": 10, "cluster": "alpha"}
    ).encode()  # fmt: skip

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(body), 16):
            yield body[start : start + 16]

    headers = {
        "Authorization": f"Bearer {bearer(env, 'alice')}",
        "Content-Type": "application/json",
    }
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=10) as client:
        request = client.build_request("POST", "/v1/jobs", content=pieces(), headers=headers)
        assert request.headers.get("transfer-encoding") == "chunked"
        response = client.send(request)
        assert response.status_code == 201, response.text
        too_big = client.post(
            "/v1/jobs",
            content=iter([b"{", b" " * MAX_BODY, b"}"]),
            headers=headers,
        )
    assert too_big.status_code == 413 and too_big.json()["type"] == "payload-too-large"
    assert env.slurm["alpha"].submits == 1
