"""``broker login`` / ``whoami`` / ``logout`` end to end: the real CLI (a subprocess), the real
provider's device flow (signed in through its pages), a real broker over HTTP (uvicorn)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from broker.api.app import create_app
from tests.broker.harness import Env, build_env
from tests.oidc_provider import REPO, Browser, Provider, provider_settings


@pytest.fixture
def env(tmp_path: Path, provider: Provider) -> Iterator[Env]:
    environment = build_env(
        f"sqlite:///{tmp_path}/broker.db", auth={"oidc": provider_settings(provider)}
    )
    yield environment
    environment.runtime.close()


@pytest.fixture
def broker_url(env: Env) -> Iterator[str]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(env.runtime), lifespan="off", log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    listener.close()


def cli_env(config_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return {**env, "XDG_CONFIG_HOME": str(config_home), "PYTHONPATH": str(REPO)}


CLI = [sys.executable, "-c", "from broker.cli import main; main()"]


def broker_cli(config_home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        env=cli_env(config_home),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def login(config_home: Path, url: str, provider: Provider, user: str) -> tuple[int, str, str]:
    """Run ``broker login`` and sign in as ``user`` at the link it prints, like a person."""
    process = subprocess.Popen(
        [*CLI, "--url", url, "login", "--issuer", provider.issuer],
        env=cli_env(config_home),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    first = process.stderr.readline()
    assert first.startswith("To sign in, open "), first
    link = first.removeprefix("To sign in, open ").strip()
    browser = Browser(provider)
    try:
        browser.approve_device(link, user)
    finally:
        browser.close()
    out, err = process.communicate(timeout=60)
    return process.returncode, out, first + err


def test_login_keeps_the_token_0600_and_later_commands_use_it(
    tmp_path: Path, broker_url: str, provider: Provider
) -> None:
    home = tmp_path / "config"
    code, out, err = login(home, broker_url, provider, "alice")
    assert code == 0, err
    assert f"Signed in to {broker_url} as alice (researcher)" in out

    stored = home / "aifactory-broker" / "credentials.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o700

    whoami = broker_cli(home, "--url", broker_url, "whoami")
    assert whoami.returncode == 0, whoami.stderr
    lines = dict(line.split(None, 1) for line in whoami.stdout.splitlines())
    assert lines["name"].strip() == "alice"
    assert lines["projects"].strip() == "climate"
    assert provider.issuer in lines["token"]
    assert "(in 10 min)" in lines["token_expires"] or "(in 9 min)" in lines["token_expires"]

    # Any other command uses the kept token too.
    jobs = broker_cli(home, "--url", broker_url, "--json", "jobs")
    assert jobs.returncode == 0, jobs.stderr

    # The kept token belongs to that broker URL only.
    elsewhere = broker_cli(home, "--url", "http://127.0.0.1:9/", "whoami")
    assert elsewhere.returncode == 6
    assert "broker login" in elsewhere.stderr

    logout = broker_cli(home, "--url", broker_url, "logout")
    assert logout.returncode == 0
    after = broker_cli(home, "--url", broker_url, "whoami")
    assert after.returncode == 6
    assert "no API token" in after.stderr


def test_login_as_someone_the_broker_does_not_know_keeps_nothing(
    tmp_path: Path, broker_url: str, provider: Provider
) -> None:
    home = tmp_path / "config"
    code, _, err = login(home, broker_url, provider, "admin")
    assert code == 6
    assert "the broker refuses you" in err and "user admin is not known" in err
    assert not (home / "aifactory-broker" / "credentials.json").exists()


def test_an_expired_sign_in_asks_to_sign_in_again_without_calling_the_broker(
    tmp_path: Path,
) -> None:
    home = tmp_path / "config"
    url = "http://127.0.0.1:9"  # nothing listens: a request would exit 7, not 6
    saved = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, time; from broker.cli import credentials as c; "
            "c.save(sys.argv[1], c.StoredToken('a.b.c', 'https://idp', 'broker-cli', time.time()))",
            url,
        ],
        env=cli_env(home),
        cwd=REPO,
        check=True,
    )
    assert saved.returncode == 0
    result = broker_cli(home, "--url", url, "jobs")
    assert result.returncode == 6
    assert "your sign-in at https://idp has expired: run broker login again" in result.stderr
