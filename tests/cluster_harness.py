"""The cluster as it is deployed, for end-to-end tests: a redis-server, `twistd -n
iwrelay --redis` nodes, and Debian's haproxy with conf/haproxy.cfg in front of them, all
on loopback ports of their own.

Synchronous (the browser tests drive Playwright's synchronous API): every wait polls a
condition up to a deadline. A node can be killed (SIGKILL), stopped (SIGTERM, its
graceful drain) and started again on the same port, which HAProxy keeps as its server.
Without haproxy or redis-server the tests are skipped, unless IWRELAY_REQUIRE_HAPROXY or
IWRELAY_REQUIRE_REDIS is set (CI sets both), in which case they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.helpers import free_port
from tests.redis_process import RedisServer
from tests.relay_process import CHECKOUT, LISTENING, TWISTD, RelayProcess, relay_environment

CONF = CHECKOUT / "conf"
T = TypeVar("T")


def poll(check: Callable[[], T], what: str, timeout: float = 15.0) -> T:
    """`check()` every 50 ms until it returns something true, for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        time.sleep(0.05)  # between two polls of the condition, bounded by the deadline
    return result


def get(port: int, path: str) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path: the status and body; 0 if nothing answered."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def binary(name: str, env: str) -> str:
    """The system's `name` binary; skip without it (fail if `env` is set)."""
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
    if found is None:
        if os.environ.get(env):
            pytest.fail(f"{env} is set but there is no {name} binary")
        pytest.skip(f"no {name} binary (apt-get install {name}); set {env}=1 to make "
                    "this a failure")
    return found


def haproxy_config(workdir: Path, port: int, nodes: Sequence[int]) -> Path:
    """conf/haproxy.cfg as shipped, listening on `port`, with `nodes` as its servers and
    an admin socket in `workdir`."""
    text = (CONF / "haproxy.cfg").read_text()
    text = re.sub(r"(?m)^    bind \S+$", f"    bind 127.0.0.1:{port}", text)
    text = re.sub(r"(?m)^    server .*\n", "", text)
    text += "".join(f"    server node{i} 127.0.0.1:{p} check\n" for i, p in enumerate(nodes))
    text = re.sub(r"(?m)^    maxconn \d+$", "    maxconn 2000", text)  # the test's FD limit
    text = text.replace("global\n", f"global\n    stats socket {workdir}/admin.sock\n", 1)
    path = workdir / "haproxy.cfg"
    path.write_text(text)
    return path


class HAProxy:
    """Debian's haproxy with conf/haproxy.cfg in front of the node ports `nodes`
    (named node0, node1, ... in that order)."""

    def __init__(self, workdir: Path, nodes: Sequence[int]) -> None:
        exe = binary("haproxy", "IWRELAY_REQUIRE_HAPROXY")
        self.admin = workdir / "admin.sock"
        self.port = free_port()
        config = haproxy_config(workdir, self.port, nodes)
        with open(workdir / "haproxy.log", "wb") as log:
            self.process = subprocess.Popen([exe, "-db", "-f", str(config)],
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)

    def states(self) -> dict[str, str]:
        """node name -> UP / DOWN / ... (HAProxy's own view, from its admin socket)."""
        if not self.admin.exists():
            return {}
        with socket.socket(socket.AF_UNIX) as admin:
            admin.settimeout(2)
            admin.connect(str(self.admin))
            admin.sendall(b"show stat\n")
            data = b""
            while chunk := admin.recv(65536):
                data += chunk
        states = {}
        for line in data.decode().splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == "relay_nodes" and fields[1].startswith("node"):
                states[fields[1]] = fields[17]
        return states

    def wait_until(self, wanted: Callable[[dict[str, str]], bool], what: str,
                   timeout: float = 20.0) -> None:
        poll(lambda: wanted(self.states()), what, timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


class Node:
    """One `twistd -n iwrelay` on loopback; `start()` again reuses its port."""

    def __init__(self, workdir: Path, name: str, options: Sequence[str]) -> None:
        self.workdir = workdir
        self.name = name
        self.options = list(options)
        self.port = 0
        self.runs: list[RelayProcess] = []

    @property
    def process(self) -> RelayProcess:
        return self.runs[-1]

    def start(self) -> Node:
        """Start (again) and wait until /health answers 200."""
        argv = [TWISTD, "-n", "--pidfile=", "iwrelay",
                "--port", f"tcp:{self.port}:interface=127.0.0.1", *self.options]
        run = RelayProcess(argv, relay_environment(), self.workdir,
                           f"{self.name}-{len(self.runs)}")
        self.runs.append(run)

        def listening() -> list[tuple[str, str]]:
            run._check_running()
            return LISTENING.findall(run.stdout)

        self.port = int(poll(listening, f"{self.name} listening")[0][1])
        poll(lambda: self.health() == 200, f"{self.name} healthy")
        return self

    def health(self) -> int:
        return get(self.port, "/health")[0]

    def stats(self) -> dict[str, Any]:
        code, body = get(self.port, "/stats")
        assert code == 200, (self.name, code)
        return json.loads(body)

    def alive(self) -> bool:
        return bool(self.runs) and self.process.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the node dies without a word to anyone."""
        self.process.kill()

    def stop(self) -> int:
        """SIGTERM (the graceful drain); its exit code once it has exited."""
        self.process.process.send_signal(signal.SIGTERM)
        self.process.process.wait(30)
        return self.process.process.returncode


class Cluster:
    """A redis-server, `size` nodes sharing it, and HAProxy in front, every node UP."""

    def __init__(self, workdir: Path, *options: str, size: int = 3) -> None:
        binary("haproxy", "IWRELAY_REQUIRE_HAPROXY")  # skip before starting anything
        self.redis = RedisServer(workdir)
        self.haproxy: HAProxy | None = None
        self.nodes: list[Node] = []
        try:
            self.redis.start()
            self.nodes = [Node(workdir, f"node{i}", ["--redis", self.redis.url, *options])
                          .start() for i in range(size)]
            self.haproxy = HAProxy(workdir, [node.port for node in self.nodes])
            self.haproxy.wait_until(self._all_up, "every node UP in HAProxy")
        except BaseException:
            self.close()
            raise

    def _all_up(self, states: dict[str, str]) -> bool:
        return states == {node.name: "UP" for node in self.nodes}

    @property
    def front(self) -> HAProxy:
        assert self.haproxy is not None
        return self.haproxy

    def url(self, path: str) -> str:
        """A WebSocket URL through HAProxy."""
        return f"ws://127.0.0.1:{self.front.port}{path}"

    def connections(self) -> list[int]:
        """currentConnections of each node, 0 for a node that is not running."""
        return [node.stats()["currentConnections"] if node.alive() else 0
                for node in self.nodes]

    def wait_out_of_rotation(self, node: Node) -> None:
        # "UP 1/2" (one failed check) is still in the rotation.
        self.front.wait_until(lambda states: states.get(node.name, "").startswith("DOWN"),
                              f"{node.name} out of HAProxy's rotation")

    def restart(self, node: Node) -> None:
        """Start a stopped node again on its port; return once HAProxy has it UP."""
        node.start()
        self.front.wait_until(self._all_up, f"{node.name} back UP in HAProxy")

    def close(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for node in self.nodes:
            for run in node.runs:
                run.kill()
        self.redis.kill()
