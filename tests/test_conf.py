"""The deployment files in conf/: the systemd unit, its environment file and the nginx
example; and the TLS notes of docs/operations.rst."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

from iw_relay.config import LIST_OPTIONS, OPTION_PARSERS, OPTIONS, env_name, parse_duration
from iw_relay.tap import Options

CONF = Path(__file__).resolve().parent.parent / "conf"
UNIT = CONF / "iwrelay.service"
ENV_FILE = CONF / "iwrelay.env"
TWISTD_PATH = "/usr/local/bin/twistd"


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value given (systemd allows a key several times)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: no continuation lines, please"
        if line.startswith("["):
            assert line.endswith("]"), f"line {number}: {line!r}"
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"line {number}: a setting before any [section]"
        key, equals, value = line.partition("=")
        assert equals and re.fullmatch(r"[A-Za-z]+", key.strip()), f"line {number}: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def read_environment_file(text: str) -> dict[str, str]:
    """VARIABLE=value lines as systemd's EnvironmentFile= reads the ones this file uses:
    comments, bare values, and double-quoted values that keep their backslashes."""
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        name, equals, value = line.partition("=")
        assert equals and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), line
        if value.startswith('"'):
            assert value.endswith('"') and '"' not in value[1:-1], line
            value = value[1:-1]
        else:
            assert not re.search(r"[\s\\'\"]", value), f"quote this value: {line}"
        found[name] = value
    return found


def the(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}= must be set once, not {values}"
    return values[0]


def test_unit_has_the_required_settings():
    unit = read_unit(UNIT)
    assert set(unit) == {"Unit", "Service", "Install"}
    assert the(unit, "Service", "ExecStart") == f"{TWISTD_PATH} --nodaemon --pidfile= iwrelay"
    assert the(unit, "Service", "EnvironmentFile") == "/etc/iwrelay/iwrelay.env"
    assert the(unit, "Service", "User") == "iwrelay"
    assert the(unit, "Service", "DynamicUser") == "yes"
    assert the(unit, "Service", "Restart") == "on-failure"
    assert the(unit, "Service", "LimitNOFILE") == "65536"
    assert the(unit, "Service", "KillSignal") == "SIGTERM"
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("PrivateTmp", "yes"), ("ProtectHome", "yes")]:
        assert the(unit, "Service", key) == value, key
    assert "CAP_NET_BIND_SERVICE" in the(unit, "Service", "AmbientCapabilities").split()
    assert the(unit, "Service", "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert the(unit, "Install", "WantedBy") == "multi-user.target"
    assert "network-online.target" in the(unit, "Unit", "After")


def test_stop_timeout_is_above_the_relay_shutdown_wait():
    """systemd must not SIGKILL the relay while it is still closing its members."""
    unit = read_unit(UNIT)
    stop = parse_duration(the(unit, "Service", "TimeoutStopSec"))
    settings = {**{"IWRELAY_SHUTDOWN_TIMEOUT": "10s", "IWRELAY_DRAIN_TIMEOUT": "0s"},
                **read_environment_file(ENV_FILE.read_text())}
    waits = parse_duration(settings["IWRELAY_SHUTDOWN_TIMEOUT"]) + parse_duration(
        settings["IWRELAY_DRAIN_TIMEOUT"])
    # ...plus the 2 s a closing peer has to answer, and some slack.
    assert stop >= waits + 5, (stop, waits)


def test_environment_file_is_valid_for_the_relay():
    settings = read_environment_file(ENV_FILE.read_text())
    assert set(settings) <= {env_name(option) for option in
                             [*OPTION_PARSERS, *LIST_OPTIONS, "port"]}
    assert settings["IWRELAY_PORT"] == "tcp:3000:interface=127.0.0.1"
    options = Options(environ=settings)
    options.parseOptions([])
    assert options.config.ports == ("tcp:3000:interface=127.0.0.1",)


def test_environment_file_documents_every_option():
    text = ENV_FILE.read_text()
    for option in [*OPTION_PARSERS, *LIST_OPTIONS, "port"]:
        assert re.search(rf"^#?{env_name(option)}=", text, re.MULTILINE), option


def test_environment_file_shows_the_tables_defaults():
    """Its commented value of each setting with a default is the option table's."""
    text = ENV_FILE.read_text()
    for option in OPTIONS:
        if option.kind == "value" and option.default is not None:
            shown = re.findall(rf"^#{option.env}=(.*)$", text, re.MULTILINE)
            assert shown == [option.default], option.env


def test_every_commented_example_is_valid(tmp_path):
    """Uncommented one at a time, each example line is accepted by the relay; examples
    naming the unit's credential files are checked with stand-in files."""
    examples = re.findall(r"^#(IWRELAY_\w+=.*)$", ENV_FILE.read_text(), re.MULTILINE)
    assert len(examples) >= 20
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    ca = trustme.CA()
    server = ca.issue_cert("relay.example.org")
    server.private_key_pem.write_to_path(str(credentials / "privkey.pem"))
    server.cert_chain_pems[0].write_to_path(str(credentials / "cert.pem"))
    ca.cert_pem.write_to_path(str(credentials / "chain.pem"))
    (credentials / "auth-secret").write_text("a secret of at least thirty-two bytes, really\n")
    (credentials / "turn-secret").write_text("the TURN server's static-auth-secret\n")
    # TURN URIs and the TURN secret are only valid together: each is checked with the other.
    companions = {
        "IWRELAY_TURN_URI": "IWRELAY_TURN_SECRET_FILE=/run/credentials/iwrelay.service/"
                            "turn-secret",
        "IWRELAY_TURN_SECRET": "IWRELAY_TURN_URI=turn:127.0.0.1:3478",
    }
    for example in examples:
        companion = companions.get(example.split("=", 1)[0].removesuffix("_FILE"))
        if companion is not None:
            example += "\n" + companion
        example = example.replace("/run/credentials/iwrelay.service", str(credentials))
        settings = read_environment_file(example)
        options = Options(environ=settings)
        options.parseOptions([])  # a UsageError fails the test, naming the option


def test_tls_notes_and_proxy_example():
    tls = (CONF.parent / "docs" / "operations.rst").read_text()
    assert "extraCertChain=chain.pem" in tls and "LoadCredential=" in tls
    assert "subjectAltName" in tls
    proxy = (CONF / "nginx-proxy.conf").read_text()
    for directive in ("proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;",
                      "proxy_set_header Connection $connection_upgrade;",
                      "proxy_pass http://iwrelay;", "server 127.0.0.1:3000;"):
        assert directive in proxy, directive
    # nginx drops a proxied connection idle for proxy_read_timeout: it must outlast the
    # relay's 30 s ping interval.
    read_timeout = re.search(r"proxy_read_timeout (\d+s);", proxy).group(1)
    assert parse_duration(read_timeout) > 30
    assert proxy.count("{") == proxy.count("}")


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    # verify checks that ExecStart's program exists: point it at this machine's twistd,
    # the one line that differs between hosts.
    twistd = Path(sys.executable).parent / "twistd"
    assert twistd.exists()
    text = UNIT.read_text()
    assert f"ExecStart={TWISTD_PATH} " in text
    unit = tmp_path / "iwrelay.service"
    unit.write_text(text.replace(f"ExecStart={TWISTD_PATH}", f"ExecStart={twistd}"))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=120, check=False)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if "iwrelay" in line]
    assert done.returncode == 0, done.stdout + done.stderr
    # verify only warns (exit code 0) about unknown keys or bad values: none allowed.
    assert complaints == [], "\n".join(complaints)


def test_nginx_example_logs_no_room_id(tmp_path):
    """Both server blocks of the nginx example, run by a real nginx on loopback: requests
    carrying room ids in their path and query are logged without them."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    import socket
    import ssl
    import urllib.error
    import urllib.request

    def free_port() -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    ca = trustme.CA()
    server = ca.issue_cert("relay.example.org", "127.0.0.1")
    server.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    plain, secure, upstream = free_port(), free_port(), free_port()
    site = (CONF / "nginx-proxy.conf").read_text()
    for old, new in [
        ("listen 80;", f"listen 127.0.0.1:{plain};"), ("listen [::]:80;", ""),
        ("listen 443 ssl;", f"listen 127.0.0.1:{secure} ssl;"), ("listen [::]:443 ssl;", ""),
        ("server 127.0.0.1:3000;", f"server 127.0.0.1:{upstream};"),
        ("/etc/letsencrypt/live/relay.example.org/fullchain.pem", str(tmp_path / "cert.pem")),
        ("/etc/letsencrypt/live/relay.example.org/privkey.pem", str(tmp_path / "key.pem")),
        ("/var/log/nginx/", f"{tmp_path}/"), ("/var/www/letsencrypt", str(tmp_path)),
    ]:
        assert old in site, old
        site = site.replace(old, new)
    (tmp_path / "site.conf").write_text(site)
    temp = " ".join(f"{kind}_temp_path {tmp_path}/{kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;\n"
        # nginx's default log, where a server block sets none, kept in tmp_path too.
        f"events {{}}\nhttp {{ {temp} access_log {tmp_path}/default.log; "
        f"include {tmp_path}/site.conf; }}\n")
    process = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                                "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        codes = []
        context = ssl.create_default_context()
        ca.configure_trust(context)
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context),
            type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                 {"redirect_request": lambda *args: None}))
        for url in (f"http://127.0.0.1:{plain}/room/SecretRoomOne?room=SecretRoomTwo",
                    f"https://127.0.0.1:{secure}/room/SecretRoomThree"):
            deadline = time.monotonic() + 10
            while True:
                request = urllib.request.Request(url, headers={"Host": "relay.example.org"})
                try:
                    codes.append(opener.open(request, timeout=5).status)
                    break
                except urllib.error.HTTPError as answer:
                    codes.append(answer.code)
                    break
                except urllib.error.URLError as problem:
                    if not isinstance(problem.reason, ConnectionRefusedError):
                        raise
                    assert process.poll() is None, process.stderr.read().decode()
                    assert time.monotonic() < deadline, f"nginx did not answer: {problem}"
                    time.sleep(0.05)  # polling for nginx's port, bounded by the deadline
        assert codes == [301, 502]  # to https; no relay behind it in this test
    finally:
        process.terminate()
        process.wait(10)
    log = (tmp_path / "iwrelay.access.log").read_text()
    assert len(log.splitlines()) == 2, log
    assert "SecretRoom" not in log
    assert "SecretRoom" not in "".join(p.read_text(errors="replace") for p in tmp_path.glob(
        "*.log") if p.name != "error.log")
