"""Helpers the test modules share: waiting with deadlines, free loopback ports, HTTP
requests to a relay, and the relay's texts as the tests expect them (written out here,
not imported from the code they check).

Test modules import from here and from the other helper modules (clients, members,
relay_process, ...), never from one another; fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate
from twisted.internet.task import deferLater
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

SHUTDOWN_MESSAGE = {"type": "server-shutdown", "message": "Server is shutting down"}
NOT_FOUND_TEXT = b"Impossible Writer Relay - Use WebSocket endpoint: ws://host/room/{roomId}"


# -- waiting, with deadlines ---------------------------------------------------------------


async def within(waiting: Deferred[Any] | Coroutine[Any, Any, Any],
                 seconds: float = 5.0) -> Any:
    """The result of `waiting`, or TimeoutError after `seconds`."""
    if not isinstance(waiting, Deferred):
        waiting = Deferred.fromCoroutine(waiting)
    return await waiting.addTimeout(seconds, reactor)


async def until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll `check` (every 20 ms, up to `timeout`) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


async def until_async(check: Callable[[], Awaitable[bool]], what: str,
                      timeout: float = 10.0) -> None:
    """Poll the asynchronous `check` (every 50 ms, up to `timeout`) until it is true."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)


def now_ms() -> int:
    return int(time.time() * 1000)


# -- ports -----------------------------------------------------------------------------------


def free_port(family: socket.AddressFamily = socket.AF_INET,
              host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for servers that cannot report theirs."""
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# -- HTTP --------------------------------------------------------------------------------------


async def http_get(port: int, path: str, trust: Certificate | None = None,
                   headers: dict[str, list[str]] | None = None,
                   ) -> tuple[int, dict[str, list[str]], bytes]:
    """GET over a fresh, non-persistent connection (no timers left behind); https
    verifying against `trust`. Returns the code, the headers (lower-case names) and the
    body."""
    if trust is None:
        agent = Agent(reactor)
        url = f"http://127.0.0.1:{port}{path}"
    else:
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust))
        url = f"https://127.0.0.1:{port}{path}"
    response = await within(treq.get(url, agent=agent, headers=headers))
    body = await within(treq.content(response))
    received = {k.decode().lower(): [v.decode() for v in vs]
                for k, vs in response.headers.getAllRawHeaders()}
    return response.code, received, body


async def get_json(port: int, path: str, trust: Certificate | None = None) -> dict[str, Any]:
    """GET a JSON document that must answer 200 as application/json."""
    code, headers, body = await http_get(port, path, trust)
    assert code == 200, body
    assert headers["content-type"] == ["application/json"]
    return json.loads(body)
