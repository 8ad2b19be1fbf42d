"""The .tac examples in tap/, run as a user would: `twistd -ny tap/....tac`, in a
subprocess, with real clients over loopback."""

from __future__ import annotations

import signal
import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.clients import connect, join
from tests.helpers import NOT_FOUND_TEXT, SHUTDOWN_MESSAGE, get_json, http_get, within
from tests.relay_process import (
    CHECKOUT,
    LOOPBACK,
    TWISTD,
    assert_exited_by,
    relay_environment,
    stop_relay,
)

TAP = CHECKOUT / "tap"


def run_tac(spawn, name: str, env: dict[str, str]):
    return spawn([TWISTD, "-n", "--pidfile=", "-y", str(TAP / name)], env)


@pytest_twisted.ensureDeferred
async def test_application_adopts_the_relay(spawn):
    room = "AdoptedRoomK4"
    relay = await run_tac(spawn, "iwrelay.tac", {"IWRELAY_PORT": LOOPBACK}).wait_listening()
    port = relay.port
    assert "Loading" in relay.stdout and "iwrelay.tac" in relay.stdout

    alice = await join(reactor, port, room)
    bob = await connect(reactor, port, f"/?room={room}")
    await within(bob.wait_for(1))
    assert bob.received[0]["userCount"] == 2
    alice.send_json({"type": "op", "text": "hello"})
    relayed = (await within(bob.wait_for(2)))[1]
    assert relayed["text"] == "hello"
    assert relayed["connectionId"] == alice.received[0]["connectionId"]
    health = await get_json(port, "/health")
    assert (health["status"], health["rooms"], health["connections"]) == ("healthy", 1, 2)
    assert (await get_json(port, "/stats"))["messagesRelayed"] == 1
    refused = await connect(reactor, port, "/room/")
    assert (await within(refused.closed))[0] == 1008

    # The application's stop is the relay's: goodbye, 1001, exit.
    returncode = await stop_relay(relay, [alice, bob])
    assert_exited_by(returncode, signal.SIGTERM, relay, plugin=False)
    for member in (alice, bob):
        assert member.received[-1] == SHUTDOWN_MESSAGE
    assert room not in relay.stdout + relay.stderr


@pytest_twisted.ensureDeferred
async def test_relay_mounted_under_an_application_site(spawn):
    room = "MountedRoomQ7"
    env = {"APP_PORT": LOOPBACK, "IWRELAY_ROOM_EXPIRY": "2s",
           "IWRELAY_CLEANUP_INTERVAL": "100ms"}
    app = await run_tac(spawn, "mounted.tac", env).wait_listening()
    port = app.port

    # The application's own pages, next to the relay's.
    code, headers, body = await http_get(port, "/")
    assert code == 200 and b"My app's own page." in body
    assert headers["content-type"] == ["text/html; charset=utf-8"]
    code, _, body = await http_get(port, "/elsewhere")
    assert code == 404 and body != NOT_FOUND_TEXT  # the application's 404, not the relay's
    health = await get_json(port, "/relay/health")
    assert (health["status"], health["connections"]) == ("healthy", 0)
    assert (await get_json(port, "/relay/stats"))["connectionsTotal"] == 0
    assert (await http_get(port, "/relay/nothing"))[::2] == (404, NOT_FOUND_TEXT)
    # The relay answers under /relay only.
    try:
        stray = await within(connect(reactor, port, "/room/stray"))
    except ConnectionError:
        stray = None
    assert stray is None, "a WebSocket outside /relay was accepted"

    # Path form under the mount, and the query form on the mount point with and without
    # its trailing slash: all one room.
    alice = await connect(reactor, port, f"/relay/room/{room}")
    members = [alice]
    for path in (f"/relay?room={room}", f"/relay/?room={room}", f"/relay/room/{room}/x"):
        members.append(await connect(reactor, port, path))
    for count, member in enumerate(members, 1):
        connected = (await within(member.wait_for(1)))[0]
        assert (connected["roomId"], connected["userCount"]) == (room, count)
    alice.send_json({"type": "op", "n": 1})
    for number, member in enumerate(members[1:], 1):
        # connected, user-joined for each later member, then the op
        await within(member.wait_for(1 + (len(members) - 1 - number) + 1))
        assert [op["n"] for op in member.messages_of("op")] == [1]
    health = await get_json(port, "/relay/health")
    assert (health["rooms"], health["connections"]) == (1, 4)

    # The expiry sweep runs: the room ends 2 s after its creation.
    for member in members:
        assert await within(member.closed) == (1000, "Room expired after 2 seconds")
        assert member.messages_of("room-expired") == [
            {"type": "room-expired", "message": "Room expired after 2 seconds"}]
    health = await get_json(port, "/relay/health")
    assert (health["rooms"], health["connections"]) == (0, 0)

    # ...and so does the shutdown.
    late = await connect(reactor, port, "/relay/room/LateRoom")
    await within(late.wait_for(1))
    returncode = await stop_relay(app, [late])
    assert_exited_by(returncode, signal.SIGTERM, app, plugin=False)
    assert late.received[-1] == SHUTDOWN_MESSAGE

    # The application logs its own requests, not the relay's (their paths hold room ids).
    output = app.stdout + app.stderr
    assert '"GET / HTTP/1.1" 200' in output and '"GET /elsewhere HTTP/1.1" 404' in output
    assert "/relay" not in output
    assert room not in output and "LateRoom" not in output


TACS = {"iwrelay.tac": ("IWRELAY_PORT", "/room/"), "mounted.tac": ("APP_PORT", "/relay/room/")}


@pytest.mark.parametrize("tac", sorted(TACS))
@pytest_twisted.ensureDeferred
async def test_both_applications_read_every_setting_from_the_environment(spawn, tac):
    """The .tac files read the environment as `twistd iwrelay` does, not only the port."""
    port_variable, rooms = TACS[tac]
    env = {port_variable: LOOPBACK, "IWRELAY_MAX_ROOM_SIZE": "1",
           "IWRELAY_RATE_LIMIT": "1", "IWRELAY_RATE_WINDOW": "1m", "NODE_ENV": "production"}
    app = await run_tac(spawn, tac, env).wait_listening()
    alice = await connect(reactor, app.port, rooms + "TacSettings")
    await within(alice.wait_for(1))
    bob = await connect(reactor, app.port, rooms + "TacSettings")
    assert (await within(bob.closed))[0] == 1008
    assert bob.messages_of("error")[0]["code"] == "ROOM_FULL"      # IWRELAY_MAX_ROOM_SIZE
    alice.send_json({"type": "op"})
    alice.send_json({"type": "op"})
    errors = await within(alice.wait_for(2))
    assert errors[1]["code"] == "RATE_LIMIT_EXCEEDED"               # IWRELAY_RATE_LIMIT
    returncode = await stop_relay(app, [alice])
    assert_exited_by(returncode, signal.SIGTERM, app, plugin=False)


@pytest.mark.parametrize("tac", sorted(TACS))
def test_both_applications_name_a_bad_variable(tmp_path, tac):
    port_variable, _ = TACS[tac]
    finished = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "-y", str(TAP / tac)],
        env=relay_environment({port_variable: LOOPBACK, "IWRELAY_ROOM_EXPIRY": "soon"}),
        cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False)
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0, output
    assert "IWRELAY_ROOM_EXPIRY: 'soon' is not a duration" in output
