"""A test-only relay with connection recovery, for the browser tests of IWRelaySocket's
resume path until the real registry and protocol call iw_relay.recovery.

It is deliberately small (rooms, stamping, ``to``, the rate limit, presence) and shows
the few calls the registry and the protocol make to `Recovery`. Run as
``python3 -m tests.recovery_relay WINDOW_SECONDS [OVERLAP]``; it prints ``listening on
PORT stats PORT``. OVERLAP > 0 resumes each member from that many seqs further back,
as a cluster node that subscribes before it reads history may: the client must drop
the duplicates.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint

from iw_relay import messages
from iw_relay.ratelimit import TokenBucket
from iw_relay.recovery import Recovery, RecoveryFailure


class Rooms:
    def __init__(self, window: float, overlap: int = 0) -> None:
        self.overlap = overlap
        self.members: dict[str, dict[str, RecoveringProtocol]] = {}
        self.away: dict[str, set[str]] = {}
        self.recovery = Recovery(reactor, window, gone=self.gone)
        self.rate_limited = 0

    def ids(self, room_id: str) -> list[str]:
        return [*self.members.get(room_id, {}), *self.away.get(room_id, set())]

    def send(self, room_id: str, payload: bytes, sender: str | None,
             target: str | None = None) -> None:
        frame = self.recovery.record(room_id, payload, sender, target)
        for cid, member in list(self.members.get(room_id, {}).items()):
            if cid != sender and (target is None or cid == target):
                member.sendMessage(frame)

    def gone(self, room_id: str, cid: str) -> None:
        self.away.get(room_id, set()).discard(cid)
        attached = self.members.get(room_id, {}).pop(cid, None)
        if attached is not None:  # a failed resume replaced it: closed quietly
            attached.replaced = True
            attached.dropConnection(abort=True)
        self.send(room_id, messages.user_left(cid, len(self.ids(room_id))), cid)

    def attach(self, member: RecoveringProtocol, room_id: str, fields: dict,
               frames: list[bytes], fresh: bool) -> None:
        room = self.members.setdefault(room_id, {})
        old = room.get(member.cid)
        if old is not None:  # a takeover: the old connection goes quietly
            old.replaced = True
            old.dropConnection(abort=True)
        self.away.get(room_id, set()).discard(member.cid)
        room[member.cid] = member
        peers = [cid for cid in self.ids(room_id) if cid != member.cid]
        connected = {"type": "connected", "connectionId": member.cid, "roomId": room_id,
                     "userCount": len(peers) + 1, "peers": peers, **fields}
        member.sendMessage(messages.encode(connected))
        for frame in frames:
            member.sendMessage(frame)
        if fresh:
            self.send(room_id, messages.user_joined(member.cid, len(peers) + 1), member.cid)

    def detach(self, member: RecoveringProtocol, code: int | None, by_server: bool) -> None:
        room = self.members.get(member.room_id, {})
        if room.get(member.cid) is not member:
            return
        del room[member.cid]
        if self.recovery.dropped(member.room_id, member.cid, code, by_server):
            self.away.setdefault(member.room_id, set()).add(member.cid)
            return
        self.send(member.room_id, messages.user_left(member.cid,
                                                     len(self.ids(member.room_id))),
                  member.cid)


class RecoveringProtocol(WebSocketServerProtocol):
    rooms: Rooms
    cid = ""
    room_id = ""
    replaced = False

    def onConnect(self, request) -> None:
        parts = urlsplit(request.path)
        self.room_id = parts.path.split("/")[2]
        self.params = {key: values[0] for key, values in request.params.items()}

    def onOpen(self) -> None:
        rooms = self.rooms
        self.limiter = TokenBucket(reactor.seconds())
        token = self.params.get("resume")
        if token is not None:
            since = self.params.get("since")
            if rooms.overlap and since and since.isdigit():
                since = str(max(0, int(since) - rooms.overlap))
            outcome = rooms.recovery.resume(self.room_id, token, since,
                                            self.params.get("epoch"))
            if not isinstance(outcome, RecoveryFailure):
                self.cid = outcome.connection_id
                rooms.attach(self, self.room_id, outcome.fields, outcome.frames, False)
                return
        self.cid = secrets.token_hex(8)
        fields = rooms.recovery.joined(self.room_id, self.cid)
        rooms.attach(self, self.room_id, fields, [], True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not self.limiter.allow(reactor.seconds()):
            self.rooms.rate_limited += 1
            self.sendMessage(messages.rate_limit_error(100, 1.0))
            return
        message = json.loads(payload)  # test-only: lets a peer spoof a server type
        message.pop("seq", None)  # the relay owns seq
        message["connectionId"] = self.cid
        message["timestamp"] = int(time.time() * 1000)
        target = message.get("to") if isinstance(message.get("to"), str) else None
        self.rooms.send(self.room_id, messages.encode(message), self.cid, target)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.cid and not self.replaced:
            closed_code = self.localCloseCode if self.closedByMe else self.remoteCloseCode
            self.rooms.detach(self, closed_code or 1006, self.closedByMe)


def main() -> None:
    window = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
    rooms = Rooms(window, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    factory = WebSocketServerFactory()
    factory.protocol = type("Protocol", (RecoveringProtocol,), {"rooms": rooms})
    factory.setProtocolOptions(allowNullOrigin=True)

    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Stats(Resource):
        isLeaf = True

        def render_GET(self, request) -> bytes:
            snapshot = rooms.recovery.snapshot()
            snapshot["rateLimited"] = rooms.rate_limited
            snapshot["members"] = sum(len(room) for room in rooms.members.values())
            return messages.encode(snapshot)

    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    stats_endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")

    def listening(port) -> None:
        def stats_listening(stats_port) -> None:
            print(f"listening on {port.getHost().port} stats {stats_port.getHost().port}",
                  flush=True)

        stats_endpoint.listen(Site(Stats())).addCallback(stats_listening)

    endpoint.listen(factory).addCallback(listening)
    reactor.run()


if __name__ == "__main__":
    main()
