"""/ice-servers: TURN REST API credentials, checked by a real coturn on loopback; and the
options that turn it (and /demo) on."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time

import pytest
import pytest_twisted
from twisted.python import usage

from iw_relay.config import RelayConfig
from iw_relay.ice import ice_servers, turn_credentials
from iw_relay.tap import Options
from tests.helpers import http_get

TURN = "turn:turn.example.org:3478?transport=udp"
TURN_TCP = "turns:turn.example.org:5349?transport=tcp"
STUN = "stun:stun.example.org:3478"


def test_credentials_follow_the_turn_rest_api_scheme():
    username, credential = turn_credentials(b"north", "alice", 1_700_000_000)
    assert username == "1700000000:alice"
    assert credential == "Cd/49soE35ICqcJF/bCTn8Z4OyE="  # base64(HMAC-SHA1(secret, username))
    expected = hmac.new(b"north", b"1700000000:alice", hashlib.sha1).digest()
    assert base64.b64decode(credential) == expected


def test_ice_servers_body():
    config = RelayConfig(turn_secret=b"s", turn_uris=(TURN, TURN_TCP), stun_uris=(STUN,),
                         turn_ttl=600)
    body = ice_servers(config, 1_700_000_000.7, "u1")
    assert body == {"ttl": 600, "iceServers": [
        {"urls": [TURN, TURN_TCP], "username": "1700000600:u1",
         "credential": turn_credentials(b"s", "u1", 1_700_000_600)[1]},
        {"urls": [STUN]},
    ]}
    assert ice_servers(RelayConfig(stun_uris=(STUN,)), 0, "u") == {
        "ttl": 3600, "iceServers": [{"urls": [STUN]}]}


@pytest_twisted.ensureDeferred
async def test_ice_servers_over_http(serve):
    config = RelayConfig(ping_interval=0, turn_secret=b"shared", turn_uris=(TURN,),
                         stun_uris=(STUN,), turn_ttl=900,
                         allowed_origins=("https://editor.example.org",))
    _service, port = await serve(config)
    before = int(time.time())
    code, headers, body = await http_get(port, "/ice-servers")
    assert code == 200
    assert headers["content-type"] == ["application/json"]
    assert headers["cache-control"] == ["no-store"]
    answer = json.loads(body)
    assert answer["ttl"] == 900
    turn, stun = answer["iceServers"]
    assert turn["urls"] == [TURN] and stun == {"urls": [STUN]}
    expiry, user = turn["username"].split(":")
    assert before + 900 <= int(expiry) <= int(time.time()) + 900 and len(user) == 16
    assert turn["credential"] == turn_credentials(b"shared", user, int(expiry))[1]
    _, _, again = await http_get(port, "/ice-servers")
    assert json.loads(again)["iceServers"][0]["username"] != turn["username"]  # fresh user

    _, headers, _ = await http_get(port, "/ice-servers",
                                   headers={"Origin": ["https://editor.example.org"]})
    assert headers["access-control-allow-origin"] == ["https://editor.example.org"]
    code, _, body = await http_get(port, "/ice-servers",
                                   headers={"Origin": ["https://evil.example"]})
    assert code == 403 and b"shared" not in body and b"credential" not in body


@pytest_twisted.ensureDeferred
async def test_ice_servers_and_demo_are_off_by_default(serve):
    _service, port = await serve(RelayConfig(ping_interval=0))
    for path in ("/ice-servers", "/demo", "/demo/"):
        code, _, body = await http_get(port, path)
        assert code == 404, path
        assert body.startswith(b"Impossible Writer Relay")


@pytest_twisted.ensureDeferred
async def test_demo_page_is_served_with_demo(serve):
    _service, port = await serve(RelayConfig(ping_interval=0, demo=True))
    for path in ("/demo", "/demo/", "/demo?x=1"):
        code, headers, body = await http_get(port, path)
        assert code == 200, path
        assert headers["content-type"] == ["text/html; charset=utf-8"]
        policy = headers["content-security-policy"][0]
        assert "default-src 'none'" in policy and "connect-src 'self';" in policy
        assert b"RTCPeerConnection" in body and b'id="text"' in body
    for path in ("/demo/x", "/demo/index.html", "/ice-servers"):
        code, _, _ = await http_get(port, path)
        assert code == 404, path


# -- options -------------------------------------------------------------------------

def parse(args, environ=None):
    options = Options(environ=environ or {})
    options.parseOptions(args)
    return options.config


def test_webrtc_options(tmp_path):
    secret_file = tmp_path / "turn-secret"
    secret_file.write_text("from a file\n")
    config = parse(["--turn-secret-file", str(secret_file), "--turn-uri", TURN,
                    "--turn-uri", TURN_TCP, "--stun-uri", STUN, "--turn-ttl", "10m",
                    "--demo"])
    assert config.turn_secret == b"from a file"
    assert config.turn_uris == (TURN, TURN_TCP) and config.stun_uris == (STUN,)
    assert config.turn_ttl == 600 and config.demo is True
    assert "from a file" not in repr(config)  # never in a log line
    default = parse([])
    assert (default.turn_secret, default.turn_uris, default.stun_uris, default.demo) == (
        None, (), (), False)
    assert default.turn_ttl == 3600


def test_webrtc_options_from_the_environment():
    config = parse([], {"IWRELAY_TURN_SECRET": "s", "IWRELAY_TURN_URI": f"{TURN} {TURN_TCP}",
                        "IWRELAY_STUN_URI": STUN, "IWRELAY_TURN_TTL": "30s",
                        "IWRELAY_DEMO": "1"})
    assert (config.turn_secret, config.turn_uris, config.stun_uris) == (
        b"s", (TURN, TURN_TCP), (STUN,))
    assert config.turn_ttl == 30 and config.demo is True
    assert parse([], {"IWRELAY_DEMO": "off"}).demo is False


@pytest.mark.parametrize(("args", "environ", "named"), [
    (["--turn-uri", TURN], {}, "--turn-secret"),
    (["--turn-secret", "s"], {}, "--turn-uri"),
    (["--turn-secret", "s", "--turn-uri", "http://x"], {}, "--turn-uri"),
    (["--turn-secret", "s", "--turn-uri", STUN], {}, "--turn-uri"),
    (["--stun-uri", TURN], {}, "--stun-uri"),
    (["--stun-uri", "stun:"], {}, "--stun-uri"),
    (["--turn-ttl", "0"], {}, "--turn-ttl"),
    (["--turn-secret", "a", "--turn-secret-file", "/dev/null", "--turn-uri", TURN], {},
     "not both"),
    ([], {"IWRELAY_DEMO": "maybe"}, "IWRELAY_DEMO"),
])
def test_bad_webrtc_options(args, environ, named):
    with pytest.raises(usage.UsageError, match=named):
        parse(args, environ)


# -- a real coturn -------------------------------------------------------------------

def refused(result) -> bool:
    return result.returncode != 0 and "Cannot complete Allocation" in result.stdout


def allocated(result) -> bool:
    return (result.returncode == 0 and "tot_recv_msgs=" in result.stdout
            and "Cannot complete Allocation" not in result.stdout)


@pytest_twisted.ensureDeferred
async def test_coturn_accepts_the_relays_credentials_and_refuses_others(
        serve, turn_server):
    server = turn_server
    config = RelayConfig(ping_interval=0, turn_secret=server.secret.encode(),
                         turn_uris=(server.uri,), stun_uris=(server.stun_uri,), turn_ttl=300)
    _service, port = await serve(config)
    _, _, body = await http_get(port, "/ice-servers")
    turn = json.loads(body)["iceServers"][0]
    assert turn["urls"] == [server.uri]

    good = server.allocate(turn["username"], turn["credential"])
    assert allocated(good), good.stdout + good.stderr
    # Expired: made by the relay with the right secret, an hour and more ago.
    old = ice_servers(config, time.time() - 3600 - 10, "old")["iceServers"][0]
    assert int(old["username"].split(":")[0]) < time.time()
    assert refused(server.allocate(old["username"], old["credential"]))
    # Forged: a relay with another secret; and a username whose expiry was moved.
    forged = ice_servers(dataclasses.replace(config, turn_secret=b"guessed"), time.time(), "f")
    forged_turn = forged["iceServers"][0]
    assert refused(server.allocate(forged_turn["username"], forged_turn["credential"]))
    expiry, user = turn["username"].split(":")
    assert refused(server.allocate(f"{int(expiry) + 86400}:{user}", turn["credential"]))
    # The same good credentials still work: the refusals above were about them, not coturn.
    assert allocated(server.allocate(turn["username"], turn["credential"]))
