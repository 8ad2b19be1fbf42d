"""Room ids are secrets and bodies are private: a full scenario at debug level, logged in
both formats, with every HTTP response kept, must show neither anywhere."""

import io
import json

import pytest_twisted
from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.web.client import HTTPConnectionPool

from iw_relay import logs
from iw_relay.config import RelayConfig
from tests.clients import connect, join

ROOM = "SecretRoom-7f3a9c"
BODY = "BODY-c0ffee-private"


async def http(port, path, responses):
    import treq

    response = await treq.get(f"http://127.0.0.1:{port}{path}",
                              pool=HTTPConnectionPool(reactor, persistent=False))
    responses.append(f"{response.code} {dict(response.headers.getAllRawHeaders())} "
                     f"{await response.text()}")


@pytest_twisted.ensureDeferred
async def test_no_room_id_and_no_body_in_any_log_line_or_response(serve):
    text, jsonl = io.StringIO(), io.StringIO()
    observers = [logs.make_observer(RelayConfig(log_level="debug", log_format=fmt), out)
                 for fmt, out in (("text", text), ("json", jsonl))]
    for observer in observers:
        globalLogPublisher.addObserver(observer)
    responses = []
    try:
        config = RelayConfig(ping_interval=0, rate_limit=3, flood_windows=1, max_room_size=3,
                             max_message_size=4096, allowed_origins=("https://ok.example",))
        service, port = await serve(config)
        a = await join(reactor, port, ROOM)
        b = await join(reactor, port, ROOM)
        c = await connect(reactor, port, f"/?room={ROOM}")
        full = await connect(reactor, port, f"/room/{ROOM}")   # room full: error + 1008
        await full.closed
        a.send_json({"type": "op", "text": BODY})
        a.sendMessage(f"not json {BODY}".encode())
        a.sendMessage(json.dumps({"kind": BODY}).encode())
        await a.wait_for(4)
        b.send_json({"type": BODY})
        b.send_json({"type": "op", "pad": BODY * 400})        # too big: 1009
        await b.closed
        for _ in range(6):
            c.send_json({"type": "op", "flood": BODY})        # over the limit: 1008
        await c.closed
        refused = await connect(reactor, port, f"/room/{ROOM}.bad")
        await refused.closed
        for path in ("/health", "/stats", f"/room/{ROOM}", f"/?room={ROOM}", f"/{BODY}"):
            await http(port, path, responses)
        a.sendClose(1000)
        await a.closed
    finally:
        for observer in observers:
            globalLogPublisher.removeObserver(observer)
    logged = text.getvalue() + jsonl.getvalue()
    assert "joined room" in text.getvalue()          # the scenario was logged...
    for refusal in ("room is full", "Invalid room ID format"):  # (first in its second)
        assert f"refused 1 connection(s): {refusal}" in text.getvalue(), refusal
    assert all(json.loads(line) for line in jsonl.getvalue().splitlines())
    everything = logged + "\n".join(responses)
    assert ROOM not in everything                    # ...and never said what it must not
    assert ROOM.lower() not in everything.lower()
    assert BODY not in everything
    assert service.registry.stats.connectionsTotal == 3

