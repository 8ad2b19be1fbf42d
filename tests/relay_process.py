"""A real `twistd -n iwrelay` (or `twist`, or a .tac) subprocess, for the end-to-end tests.

The subprocesses import the checkout (PYTHONPATH), not an installed copy, and the relay's
environment variables of the calling shell are removed so that only the test's own apply.
The `spawn` fixture (conftest.py) kills whatever is still running at teardown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater

from tests.clients import RelayClient
from tests.helpers import http_get, until, until_async, within

CHECKOUT = Path(__file__).resolve().parent.parent
_BIN = Path(sys.executable).parent


def script(name: str) -> str:
    """The console script installed next to this Python (a pyenv shim would be slower)."""
    beside = _BIN / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"the {name} script is not installed"
    return found


# `python -m twisted.scripts.twistd` does nothing (that module has no __main__ block), so
# the tests run the script a user types.
TWISTD = script("twistd")
LOOPBACK = "tcp:0:interface=127.0.0.1"
LISTENING = re.compile(r"(\(TLS\) )?starting on (\d+)")
_RELAY_VARIABLES = re.compile(r"^(IWRELAY_\w*|PORT|LOG_LEVEL|NODE_ENV)$")


def relay_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the relay's variables, importing the checkout."""
    env = {k: v for k, v in os.environ.items() if not _RELAY_VARIABLES.match(k)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def _default_sigint() -> None:
    # A shell's background job ignores SIGINT and children inherit that; the SIGINT test
    # needs the process to see it as a user at a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class RelayProcess:
    """A twistd (or twist) subprocess whose stdout and stderr go to files."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], workdir: Path,
                 name: str) -> None:
        self.argv = list(argv)
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                cwd=workdir, preexec_fn=_default_sigint,
            )
        self.ports: list[int] = []
        self.tls_ports: list[int] = []

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def port(self) -> int:
        return self.ports[0]

    def _check_running(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(
                f"{self.argv} exited with {self.process.returncode}\n"
                f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
            )

    async def wait_listening(self, count: int = 1) -> RelayProcess:
        """Wait for `count` "starting on N" log lines; record the plain and TLS ports."""

        def listening() -> list[tuple[str, str]] | None:
            self._check_running()
            found = LISTENING.findall(self.stdout)
            return found if len(found) >= count else None

        found = await until(listening, f"{count} listening port(s) of {self.argv}", 15)
        self.ports = [int(port) for tls, port in found if not tls]
        self.tls_ports = [int(port) for tls, port in found if tls]
        return self

    async def wait_serving(self, port: int) -> RelayProcess:
        """Poll GET /health on `port` until it answers 200."""
        deadline = time.monotonic() + 15
        while True:
            self._check_running()
            try:
                code: int | None
                code, _, _ = await http_get(port, "/health")
            except ConnectionRefusedError:
                code = None
            if code == 200:
                self.ports = [port]
                return self
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.argv} never served /health on {port}")
            await deferLater(reactor, 0.05, lambda: None)

    async def wait_exit(self, timeout: float = 10.0) -> int:
        await until(lambda: self.process.poll() is not None, f"{self.argv} to exit", timeout)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


Spawn = Callable[..., RelayProcess]


async def start_relay(spawn: Spawn, *options: str,
                      env: dict[str, str] | None = None, listening: int = 1) -> RelayProcess:
    """`twistd -n --pidfile= iwrelay OPTIONS`, once it listens."""
    process = spawn([TWISTD, "-n", "--pidfile=", "iwrelay", *options], env)
    return await process.wait_listening(listening)


async def stop_relay(process: RelayProcess, clients: Sequence[RelayClient] = (),
                     sig: int = signal.SIGTERM) -> int:
    """Signal the relay; every open client must be closed with 1001; returns the exit code."""
    process.process.send_signal(sig)
    for client in clients:
        if client.close_code is None:
            code, reason = await within(client.closed, 10)
            assert (code, reason) == (1001, "Server shutting down")
    return await process.wait_exit()


def assert_exited_by(returncode: int, sig: int, process: RelayProcess,
                     logs_info: bool = True, plugin: bool = True) -> None:
    """twistd stops cleanly on SIGTERM/SIGINT. The plugin exits 0 (it replaces Twisted's
    handlers); an application of one's own (.tac) keeps Twisted's, which re-raise the
    signal on the process after the clean stop."""
    output = process.stdout + process.stderr
    if plugin:
        assert returncode == 0, output
        assert f"received {signal.Signals(sig).name}: shutting down" in output or not logs_info
    else:
        assert returncode == -sig, output
    if logs_info:
        assert "Server Shut Down." in output
    assert "Traceback" not in output


# -- cluster nodes ---------------------------------------------------------------------------


async def start_nodes(spawn: Spawn, url: str, count: int,
                      *options: str) -> list[RelayProcess]:
    """`count` relays sharing rooms through the Redis at `url`, once each is healthy."""
    nodes = [await start_relay(spawn, "--port", LOOPBACK, "--redis", url, *options)
             for _ in range(count)]
    for node in nodes:
        await until_health(node.port, 200)
    return nodes


async def health(port: int) -> tuple[int, dict[str, Any]]:
    code, _, body = await http_get(port, "/health")
    return code, json.loads(body)


async def until_health(port: int, code: int, timeout: float = 15.0) -> dict[str, Any]:
    """Poll /health until it answers `code`; its last body."""
    found: dict[str, Any] = {}

    async def check() -> bool:
        got, body = await health(port)
        found.update(body)
        return got == code

    await until_async(check, f"/health on {port} to answer {code}", timeout)
    return found


async def stats(port: int) -> dict[str, Any]:
    code, _, body = await http_get(port, "/stats")
    assert code == 200
    return json.loads(body)
