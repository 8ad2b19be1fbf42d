"""Fixtures shared by the tests: no test may log an unhandled failure or leave timers;
the relay in memory or on a loopback port; and the processes (relays, Redis, coturn) a
test starts, each stopped at teardown."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from twisted.logger import globalLogPublisher

from tests.clients import MemoryRelay
from tests.redis_process import RedisServer
from tests.relay_process import RelayProcess, Spawn, relay_environment
from tests.turn_process import TurnServer


class LoggedFailures:
    """Failures logged during a test; a test that expects some takes them with `take()`."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        if "log_failure" in event:
            self.events.append(event)

    def take(self) -> list[dict]:
        taken, self.events = self.events, []
        return taken


@pytest.fixture(autouse=True)
def logged_failures():
    failures = LoggedFailures()
    globalLogPublisher.addObserver(failures)
    yield failures
    gc.collect()  # Deferreds that failed unhandled log when they are collected
    globalLogPublisher.removeObserver(failures)
    problems = [f"{e['log_failure'].getTraceback()}" for e in failures.events]
    assert not problems, "unhandled failures were logged:\n" + "\n".join(problems)


def _is_txaio_bucket(call) -> bool:
    """Autobahn batches its timers in txaio buckets; cancelling a timer leaves its bucket's
    DelayedCall to fire empty. Those are the library's, not a leak of ours."""
    return getattr(call.func, "__name__", "") == "_notify_bucket"


@pytest.fixture(autouse=True)
def no_pending_reactor_calls():
    from twisted.internet import reactor

    before = set(reactor.getDelayedCalls())
    yield
    left = [call for call in reactor.getDelayedCalls()
            if call not in before and call.active() and not _is_txaio_bucket(call)]
    described = [str(call) for call in left]
    for call in left:
        call.cancel()
    assert not left, f"test left timers on the reactor: {described}"


@pytest.fixture
def relay():
    """The relay over in-memory transports, time driven by a Clock."""
    memory = MemoryRelay()
    yield memory
    memory.close()


@pytest.fixture
def make_relay():
    made: list[MemoryRelay] = []

    def make(config=None, **kwargs) -> MemoryRelay:
        memory = MemoryRelay(config, **kwargs)
        made.append(memory)
        return memory

    yield make
    for memory in made:
        memory.close()


@pytest.fixture
def serve():
    """serve(config) -> Deferred (RelayService, port): the relay's front door on a free
    loopback port."""
    import pytest_twisted
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from iw_relay.service import RelayService

    running = []

    def start(config):
        service = RelayService(config, listen=False)
        service.startService()
        listening = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            service.front_door)

        def started(port):
            running.append((service, port))
            return service, port.getHost().port

        return listening.addCallback(started)

    yield start
    for service, port in running:
        pytest_twisted.blockon(port.stopListening())
        pytest_twisted.blockon(service.stopService())


# -- processes ---------------------------------------------------------------------------------


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """spawn(argv, env=None) -> RelayProcess; every process is killed at teardown."""
    started: list[RelayProcess] = []

    def start(argv: Sequence[str], env: dict[str, str] | None = None) -> RelayProcess:
        process = RelayProcess(argv, relay_environment(env), tmp_path, f"p{len(started)}")
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (skipped without one, see redis_process)."""
    server = RedisServer(tmp_path).start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.resume()
    server.kill()


@pytest.fixture
def turn_server(tmp_path: Path) -> Iterator[TurnServer]:
    """A coturn of the test's own (skipped without one, see turn_process)."""
    server = TurnServer(tmp_path).start()
    yield server
    server.stop()
