"""The real local OpenID provider, started once for the tests of this directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.oidc_provider import Provider


@pytest.fixture(scope="session")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    """deploy/oidc/up.sh on a free port with its own state directory; down.sh at the end."""
    started = Provider.start(tmp_path_factory.mktemp("oidc"), OIDC_SHORT_TTL="2")
    yield started
    started.stop()
