"""A throw-away redis-server for the cluster tests: its own free port on 127.0.0.1, no
persistence, killed at teardown. The system's Redis (if any) is never touched.

Without a redis-server binary the tests that need one are skipped, unless
IWRELAY_REQUIRE_REDIS is set (CI sets it), in which case they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import free_port


def redis_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if found is None:
        if os.environ.get("IWRELAY_REQUIRE_REDIS"):
            pytest.fail("IWRELAY_REQUIRE_REDIS is set but there is no redis-server binary")
        pytest.skip("no redis-server binary (apt-get install redis-server); "
                    "set IWRELAY_REQUIRE_REDIS=1 to make this a failure")
    return found


class RedisServer:
    """One redis-server process; `restart()` keeps the port (and loses every key)."""

    def __init__(self, workdir: Path, *options: str) -> None:
        self.binary = redis_binary()
        self.options = list(options)
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.starts += 1
        log = open(self.workdir / f"redis-{self.port}-{self.starts}.log", "wb")
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.options],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        while self.command("PING") != "+PONG":
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server on {self.port} did not start")
            time.sleep(0.02)  # a blocking wait for the server's own start, nothing else
        return self

    def command(self, *words: str) -> str | None:
        """One inline command over a fresh socket; the first reply line, or None."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
                conn.sendall(" ".join(words).encode() + b"\r\n")
                return conn.recv(65536).split(b"\r\n", 1)[0].decode()
        except OSError:
            return None

    def keys(self) -> list[str]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
            conn.sendall(b"KEYS *\r\n")
            data = b""
            while not data.endswith(b"\r\n") or data.count(b"\r\n") < 1 + 2 * int(
                    data.split(b"\r\n", 1)[0][1:] or 0):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        lines = data.split(b"\r\n")
        return [line.decode() for line in lines[2::2] if line]

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()
