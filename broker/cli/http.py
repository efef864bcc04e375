"""The broker's REST API over httpx, as the client commands use it (API.md is the contract)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx

from broker.cli.errors import BadUrl, BrokerUnreachable, ProblemError, UnexpectedResponse

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
USER_AGENT = "aifactory-broker-cli/1"

# Tests set this to an ``httpx.MockTransport``; ``None`` means real network I/O.
_transport: httpx.BaseTransport | None = None


class BrokerClient:
    """The broker's REST API; every failure surfaces as a ``CliError``."""

    def __init__(
        self, url: str, token: str, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.url = url.rstrip("/")
        try:
            self._http = httpx.Client(
                base_url=self.url,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Accept": "application/json",
                    "User-Agent": USER_AGENT,
                },
                timeout=DEFAULT_TIMEOUT,
                transport=transport,
            )
        except httpx.InvalidURL as exc:
            raise BadUrl(f"invalid broker URL {url!r}: {exc}") from exc

    def close(self) -> None:
        self._http.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> httpx.Response:
        """Send one request; raise ``ProblemError`` for any status >= 400."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        started = time.monotonic()
        try:
            response = self._http.request(
                method, path, params=query, json=body, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException as exc:
            raise BrokerUnreachable(
                f"no answer from the broker at {self.url} within {timeout:.0f} s"
            ) from exc
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise BadUrl(f"invalid broker URL {self.url!r}: {exc}") from exc
        except httpx.TransportError as exc:
            raise BrokerUnreachable(f"cannot reach the broker at {self.url}: {exc}") from exc
        log.debug(
            "%s %s -> %d in %.3f s",
            method,
            path,
            response.status_code,
            time.monotonic() - started,
        )
        if response.status_code >= 400:
            raise ProblemError.from_response(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """``call`` and decode the JSON body (``None`` for 204)."""
        response = self.call(method, path, **kwargs)
        return decode(response)

    def pages(self, path: str, params: dict[str, Any], follow: bool) -> dict[str, Any]:
        """One page, or with ``follow`` every page after it, as one ``{"data", "next_cursor"}``."""
        page: dict[str, Any] = self.json("GET", path, params=params)
        if not follow:
            return page
        data = list(page.get("data", []))
        seen: set[str] = set()
        cursor = page.get("next_cursor")
        while cursor and cursor not in seen:
            seen.add(cursor)
            page = self.json("GET", path, params={**params, "cursor": cursor})
            data.extend(page.get("data", []))
            cursor = page.get("next_cursor")
        return {"data": data, "next_cursor": None}


def decode(response: httpx.Response) -> Any:
    """The JSON body of a success (``None`` for 204 or an empty body)."""
    if response.status_code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError as exc:
        raise UnexpectedResponse(
            f"the broker answered {response.status_code} with a body that is not JSON"
        ) from exc


def segment(value: str) -> str:
    """A user-supplied name as one path segment: ``a/../b`` must not walk the URL tree."""
    return quote(value, safe="")
