"""A throw-away coturn `turnserver` for the TURN tests: loopback only, a free port, a temp
config with the TURN REST API (``use-auth-secret``), killed at teardown.

Without the coturn binaries the tests that need them are skipped, unless
IWRELAY_REQUIRE_TURN is set (CI sets it), in which case they fail.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

STUN_BINDING_REQUEST = 0x0001
STUN_BINDING_SUCCESS = 0x0101
STUN_MAGIC_COOKIE = 0x2112A442


def turn_binaries() -> tuple[str, str]:
    found = shutil.which("turnserver"), shutil.which("turnutils_uclient")
    if None in found:
        if os.environ.get("IWRELAY_REQUIRE_TURN"):
            pytest.fail("IWRELAY_REQUIRE_TURN is set but coturn's turnserver and "
                        "turnutils_uclient are missing")
        pytest.skip("coturn is not installed (apt-get install coturn); "
                    "set IWRELAY_REQUIRE_TURN=1 to make this a failure")
    return found  # type: ignore[return-value]


def free_port() -> int:
    """A port free for both UDP and TCP a moment ago (coturn listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def stun_binding(port: int, timeout: float = 0.2) -> bool:
    """True when a STUN server answers a Binding request on 127.0.0.1:port (UDP)."""
    transaction = secrets.token_bytes(12)
    request = struct.pack("!HHI", STUN_BINDING_REQUEST, 0, STUN_MAGIC_COOKIE) + transaction
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.sendto(request, ("127.0.0.1", port))
            answer = probe.recv(2048)
        except OSError:
            return False
    return (len(answer) >= 20 and struct.unpack("!H", answer[:2])[0] == STUN_BINDING_SUCCESS
            and answer[8:20] == transaction)


class TurnServer:
    def __init__(self, workdir: Path) -> None:
        self.turnserver, self.uclient = turn_binaries()
        self.workdir = workdir
        self.port = free_port()
        self.secret = secrets.token_hex(16)
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    @property
    def stun_uri(self) -> str:
        return f"stun:127.0.0.1:{self.port}"

    def start(self) -> TurnServer:
        config = self.workdir / "turnserver.conf"
        config.write_text("\n".join([
            "listening-ip=127.0.0.1", "relay-ip=127.0.0.1", f"listening-port={self.port}",
            "use-auth-secret", f"static-auth-secret={self.secret}", "realm=test",
            "no-tls", "no-dtls", "no-cli", "allow-loopback-peers", "fingerprint",
            "no-multicast-peers", "simple-log", "log-file=stdout",
            f"pidfile={self.workdir / 'turnserver.pid'}",
            f"userdb={self.workdir / 'turndb.sqlite'}",
            "",
        ]))
        self.log_path = self.workdir / "turnserver.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [self.turnserver, "-c", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        while not stun_binding(self.port):  # each probe waits at most 0.2 s for an answer
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"turnserver did not start:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def allocate(self, username: str, credential: str) -> subprocess.CompletedProcess:
        """turnutils_uclient allocates a relay with these credentials, and sends a few
        packets through it to a second allocation of its own (-y), all on loopback."""
        return subprocess.run(
            [self.uclient, "-y", "-c", "-n", "2", "-z", "5", "-m", "1",
             "-p", str(self.port), "-u", username, "-w", credential,
             "-L", "127.0.0.1", "-e", "127.0.0.1", "127.0.0.1"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
            check=False,
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
