"""Cluster mode (``--redis URL``): several relay nodes share rooms through Redis.

`ClusterRegistry` is a `RoomRegistry` whose fan-out seam (`join`, `leave`, `broadcast`,
`expire`) also speaks to the other nodes through a `RedisBackplane`; the protocol class
does not know the difference. Members of one room may sit on any node.

Redis holds (every key expires on its own; no room id and no message body is stored):

- ``iwrelay:r:{h}``   the room's deadline (clock seconds), set by the first join anywhere;
- ``iwrelay:m:{h}``   hash: connection id -> node id, the room's members on every node;
- ``iwrelay:n:{node}`` a node's heartbeat, PX = three heartbeats;
- ``iwrelay:nr:{node}`` set of the room hashes a node has had members in (for the reaper);
- ``iwrelay:nodes:all`` set of node ids, so that exactly one survivor reaps a dead node;

where ``h`` is `cluster_hash(room_id)` (SHA-256, 128 bits). Each room has one pub/sub
channel, ``iwrelay:c:{h}``, subscribed by the nodes with a local member in the room. What
travels on it (one letter, the sending node id, then the rest):

- ``m`` + node + relayed message (stamped, framed by the receiving node)
- ``u`` + node + target connection id + a newline + relayed message: a unicast (``to``),
  delivered only by the node that has the target (on the room's channel, so that it
  keeps its order among the sender's other messages)
- ``j`` / ``l`` + node + connection id: a member joined / left (published by the Lua
  script that changed the hash, so every node sees presence in the order Redis applied it)
- ``x`` + node: the room expired (its keys are gone; the others expire it too)

Every node relays to its own members at once and publishes for the others; it drops its
own echoes. A sender's messages go out on one connection, so they reach every node in
order. userCount is this node's view: its members plus the remote members it has been
told of (joins and leaves on the channel, a snapshot of the hash when it first joins).

Faults:
- A node is dead when its heartbeat key has expired; each survivor then tells its own
  members that the dead node's members left, and one of them (SREM on ``nodes:all``) removes
  them from Redis. A node judges others only after it has itself been connected for three
  heartbeats, so that after a Redis restart every node has had time to write itself back.
  A node that finds its own heartbeat key gone (it stalled) writes its members back.
- Redis unreachable: each node relays among its own members, keeps its view (no false
  ``user-left``), counts and logs what it could not send to the other nodes, reconnects
  with backoff, resubscribes and writes its members back (announcing those that joined
  or left meanwhile), then sets its heartbeat.
- Redis slow or stalled: at most ``--redis-queue-size`` commands await a reply; past
  that, messages for other nodes are dropped and counted, never queued without bound.
  A command unanswered for three heartbeats drops the connection (then as above).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from iw_relay import messages
from iw_relay.config import RelayConfig
from iw_relay.registry import Member, Room, RoomRegistry, room_hash

PREFIX = "iwrelay:"
NODE_ID_LENGTH = 16
#: Relayed messages kept for a member whose join Redis has not confirmed yet.
PENDING_FRAMES = 1000
#: A node is dead after this many heartbeats without one.
HEARTBEATS_TO_DEATH = 3
#: Redis keys outlive the room's deadline by this much (the sweep deletes them first).
KEY_SLACK = 3600.0
#: Another node's `x` (expired) is followed if our deadline is this close (clock skew).
EXPIRY_SKEW = 5.0


def cluster_hash(room_id: str) -> str:
    """What Redis keys and channels carry instead of the room id (a secret)."""
    return hashlib.sha256(b"iwrelay-room:" + room_id.encode()).hexdigest()[:32]


def _key(kind: str, name: str) -> str:
    return f"{PREFIX}{kind}:{name}"


# KEYS: room, members, node-rooms, channel. ARGV: node, connection id, deadline if new,
# room key ttl ms, node-rooms ttl ms, room hash. Returns {deadline, members...}.
JOIN = """
local deadline = redis.call('GET', KEYS[1])
if not deadline or redis.call('HLEN', KEYS[2]) == 0 then
  deadline = ARGV[3]
  redis.call('SET', KEYS[1], deadline, 'PX', ARGV[4])
  redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
redis.call('SADD', KEYS[3], ARGV[6])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('PUBLISH', KEYS[4], 'j' .. ARGV[1] .. ARGV[2])
return {deadline, redis.call('HGETALL', KEYS[2])}
"""

# KEYS: room, members, channel. ARGV: node, connection id, publish (1/0).
LEAVE = """
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then
  redis.call('HDEL', KEYS[2], ARGV[2])
end
if redis.call('HLEN', KEYS[2]) == 0 then redis.call('DEL', KEYS[1]) end
if ARGV[3] == '1' then redis.call('PUBLISH', KEYS[3], 'l' .. ARGV[1] .. ARGV[2]) end
return 1
"""

# KEYS: room, members, channel. ARGV: node.
EXPIRE = """
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', KEYS[3], 'x' .. ARGV[1])
return 1
"""

# Writes a node's members of one room back after an outage. KEYS: room, members,
# node-rooms, channel. ARGV: node, deadline, room ttl ms, node-rooms ttl ms, room hash,
# number of departed members, departed..., present members...
SYNC = """
local node = ARGV[1]
local departed = tonumber(ARGV[6])
for i = 7, 6 + departed do
  if redis.call('HGET', KEYS[2], ARGV[i]) == node then redis.call('HDEL', KEYS[2], ARGV[i]) end
  redis.call('PUBLISH', KEYS[4], 'l' .. node .. ARGV[i])
end
local present = #ARGV - 6 - departed
local deadline = redis.call('GET', KEYS[1])
if present > 0 then
  if not deadline or redis.call('HLEN', KEYS[2]) == 0 then
    deadline = ARGV[2]
    redis.call('SET', KEYS[1], deadline, 'PX', ARGV[3])
  end
  for i = 7 + departed, #ARGV do
    if redis.call('HSET', KEYS[2], ARGV[i], node) == 1 then
      redis.call('PUBLISH', KEYS[4], 'j' .. node .. ARGV[i])
    end
  end
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  redis.call('SADD', KEYS[3], ARGV[5])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
elseif redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
end
return {deadline or '', redis.call('HGETALL', KEYS[2])}
"""

# KEYS: node key, nodes. ARGV: node, heartbeat ttl ms, nodes ttl ms. Returns 0 when the
# key had expired: the others may have found this node dead and removed its members.
HEARTBEAT = """
local alive = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return alive
"""

# Removes a dead node's members from Redis; only the first caller does it.
# KEYS: nodes. ARGV: prefix, dead node.
REAP = """
if redis.call('SREM', KEYS[1], ARGV[2]) == 0 then return 0 end
local rooms = ARGV[1] .. 'nr:' .. ARGV[2]
for _, h in ipairs(redis.call('SMEMBERS', rooms)) do
  local members = ARGV[1] .. 'm:' .. h
  local all = redis.call('HGETALL', members)
  for i = 1, #all, 2 do
    if all[i + 1] == ARGV[2] then redis.call('HDEL', members, all[i]) end
  end
  if redis.call('HLEN', members) == 0 then redis.call('DEL', ARGV[1] .. 'r:' .. h) end
end
redis.call('DEL', rooms)
return 1
"""


@dataclass(eq=False)
class ClusterRoom(Room):
    key: str = ""
    #: Members on other nodes: connection id -> node id.
    remote: dict[str, str] = field(default_factory=dict)
    #: Local members whose join Redis has not confirmed: relayed frames kept for them.
    pending: dict[Member, list[Any]] = field(default_factory=dict)
    #: False until this node has a snapshot of the room's members from Redis.
    synced: bool = False
    #: Presence events received before the snapshot, applied after it.
    early_events: list[tuple[bytes, str, str]] = field(default_factory=list)
    expired: bool = False

    def count(self) -> int:
        return len(self.members) - len(self.pending) + len(self.remote)


@dataclass
class ClusterStats:
    crossNodeDropped: int = 0  # messages that could not be sent to the other nodes
    messagesFromOtherNodes: int = 0
    redisReconnects: int = 0
    deadNodesSeen: int = 0


def redis_settings(url: str) -> dict[str, Any]:
    """Where and how to connect, from a URL that config.parse_redis_url accepted."""
    parts = urlsplit(url)
    db = parts.path.strip("/")
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 6379,
        "dbid": int(db) if db else None,
        "password": unquote(parts.password) if parts.password else None,
        "username": unquote(parts.username) if parts.username else None,
    }


class _Commands(txredisapi.RedisProtocol):
    def connectionLost(self, why: object) -> None:
        super().connectionLost(why)
        self.factory.backplane._lost(self)


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern: object, channel: bytes, message: bytes) -> None:
        self.factory.backplane._received(channel, message)

    def connectionLost(self, why: object) -> None:
        super().connectionLost(why)
        self.factory.backplane._lost(self)


class _RedisFactory(Factory):
    """Builds txredisapi protocols (bytes in and out) for one of the backplane's links."""

    isLazy = True
    noisy = False

    def __init__(self, backplane: RedisBackplane, protocol_class: type,
                 settings: dict[str, Any], reply_timeout: float | None) -> None:
        self.backplane = backplane
        self.protocol_class = protocol_class
        self.settings = settings
        self.reply_timeout = reply_timeout

    def buildProtocol(self, addr: object) -> txredisapi.BaseRedisProtocol:
        protocol = self.protocol_class(
            charset=None, convertNumbers=False, replyTimeout=self.reply_timeout,
            password=self.settings["password"],
            dbid=self.settings["dbid"], username=self.settings["username"],
        )
        protocol.factory = self
        return protocol

    # txredisapi calls these when AUTH or SELECT fails: the connection is dropped and
    # retried with backoff, so an operator sees the error repeated in the log.
    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        self.backplane._log.error("Redis refused the connection: {why}", why=why)


class RedisBackplane:
    """Two links to Redis (commands, and pub/sub), reconnected with backoff."""

    _log = Logger()

    def __init__(self, registry: ClusterRegistry, url: str, reactor: Any,
                 queue_size: int, reply_timeout: float) -> None:
        self.registry = registry
        self.queue_size = queue_size
        self.settings = redis_settings(url)
        self.commands: _Commands | None = None
        self.subscriber: _Subscriber | None = None
        self.in_flight = 0
        self._subscribed: set[str] = set()
        endpoint = TCP4ClientEndpoint(reactor, self.settings["host"], self.settings["port"],
                                      timeout=5)
        policy = backoffPolicy(initialDelay=0.2, maxDelay=5.0, factor=2.0)
        self._services = [
            ClientService(endpoint,
                          _RedisFactory(self, _Commands, self.settings, reply_timeout),
                          retryPolicy=policy, clock=reactor,
                          prepareConnection=self._ready),
            ClientService(endpoint, _RedisFactory(self, _Subscriber, self.settings, None),
                          retryPolicy=policy, clock=reactor,
                          prepareConnection=self._ready),
        ]

    @property
    def linked(self) -> bool:
        return self.commands is not None and self.subscriber is not None

    def start(self) -> None:
        for service in self._services:
            service.startService()

    def stop(self) -> Deferred[Any]:
        return gatherResults([service.stopService() for service in self._services],
                             consumeErrors=True)

    def _ready(self, protocol: txredisapi.BaseRedisProtocol) -> Deferred[Any]:
        """ClientService's prepareConnection: usable once AUTH and SELECT are done."""
        return protocol.whenConnected().addCallback(self._usable)

    def _usable(self, protocol: txredisapi.BaseRedisProtocol) -> None:
        if not protocol.connected:
            return
        if isinstance(protocol, _Subscriber):
            self.subscriber = protocol
            self._subscribed = set()
        else:
            self.commands = protocol
            self.in_flight = 0
        if self.linked:
            self.registry._linked()

    def _lost(self, protocol: object) -> None:
        was_linked = self.linked
        if protocol is self.commands:
            self.commands = None
        elif protocol is self.subscriber:
            self.subscriber = None
            self._subscribed = set()
        else:
            return
        if was_linked:
            self.registry._unlinked()

    def _received(self, channel: bytes, message: bytes) -> None:
        try:
            self.registry._received(channel[len(PREFIX) + 2:].decode(), message)
        except Exception:
            self._log.failure("handling a message from Redis failed")

    # -- commands -----------------------------------------------------------------------

    @property
    def full(self) -> bool:
        return self.in_flight >= self.queue_size

    def run(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        """EVAL (txredisapi sends EVALSHA once the script is known)."""
        commands = self.commands
        if commands is None:
            raise txredisapi.ConnectionError("Not connected")
        done = commands.eval(script, keys, args)
        self.in_flight += 1
        return done.addBoth(self._answered, commands)

    def publish(self, channel: str, message: bytes) -> bool:
        """Fire and forget; False when it could not even be queued."""
        commands = self.commands
        if commands is None or self.full:
            return False
        try:
            done = commands.publish(channel, message)
        except txredisapi.ConnectionError:
            return False
        self.in_flight += 1
        done.addBoth(self._answered, commands)
        done.addErrback(lambda failure: None)  # the connection's loss is handled there
        return True

    def _answered(self, result: Any, commands: object) -> Any:
        if commands is self.commands:
            self.in_flight -= 1
        return result

    def subscribe(self, key: str) -> Deferred[Any]:
        subscriber = self.subscriber
        if subscriber is None:
            raise txredisapi.ConnectionError("Not connected")
        if key in self._subscribed:
            return succeed(None)
        self._subscribed.add(key)
        return subscriber.subscribe(_key("c", key))

    def unsubscribe(self, key: str) -> None:
        subscriber = self.subscriber
        if subscriber is not None and key in self._subscribed:
            self._subscribed.discard(key)
            subscriber.unsubscribe(_key("c", key)).addErrback(lambda failure: None)

    def mget(self, keys: list[str]) -> Deferred[Any]:
        commands = self.commands
        if commands is None:
            raise txredisapi.ConnectionError("Not connected")
        done = commands.mget(keys)
        self.in_flight += 1
        return done.addBoth(self._answered, commands)


class ClusterRegistry(RoomRegistry):
    """RoomRegistry whose rooms span every node connected to the same Redis."""

    _log = Logger()

    def __init__(
        self,
        config: RelayConfig,
        clock: IReactorTime,
        prepare: Callable[[bytes], Any] = lambda payload: payload,
        wall_clock: Callable[[], float] = time.time,
        reactor: Any = None,
        node_id: str | None = None,
    ) -> None:
        super().__init__(config, clock, prepare, wall_clock)
        if reactor is None:
            from twisted.internet import reactor
        self.node_id = node_id or secrets.token_hex(NODE_ID_LENGTH // 2)
        self._node = self.node_id.encode()
        self.cluster_stats = ClusterStats()
        self._by_key: dict[str, ClusterRoom] = {}
        #: Members that left while Redis was unreachable: room hash -> connection ids.
        self._departed: dict[str, set[str]] = {}
        self.dead_after = config.node_heartbeat * HEARTBEATS_TO_DEATH
        self.backplane = RedisBackplane(self, config.redis, reactor, config.redis_queue_size,
                                        reply_timeout=self.dead_after)
        self.state = "disconnected"  # then "syncing", "connected"
        self._connected_at: float | None = None
        self._outage_dropped = 0
        self._resync_again = False
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock

    # -- service ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.backplane.start()
        self._heartbeat.start(self.config.node_heartbeat, now=False)

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = Deferred()
        super().stopService().addBoth(
            lambda _: Deferred.fromCoroutine(self._disconnect())).chainDeferred(stopped)
        return stopped

    async def _disconnect(self) -> None:
        if self._heartbeat.running:
            self._heartbeat.stop()
        if self.state == "connected":
            # Leaving at once beats being found dead three heartbeats later.
            try:
                await self.backplane.commands.delete(_key("n", self.node_id))
            except Exception:
                pass
        await self.backplane.stop()

    def cluster_status(self) -> dict[str, Any]:
        return {
            "redis": "connected" if self.state == "connected" else "disconnected",
            "node": self.node_id,
            **self.cluster_stats.__dict__,
        }

    # -- membership ------------------------------------------------------------------

    def join(self, member: Member, room_id: str) -> Room:
        room = self.rooms.get(room_id)
        if room is None:
            room = ClusterRoom(room_id, self.clock.seconds() + self.config.room_expiry,
                               key=cluster_hash(room_id))
            self.rooms[room_id] = room
            self._by_key[room.key] = room
            self._log.debug("room {room} created", room=room_hash(room_id))
        room.members[member.connection_id] = member
        self._room_of[member] = room
        self.stats.connectionsTotal += 1
        if self.state != "connected":
            self._resync_again = True
            self._welcome(member, room)
            return room
        room.pending[member] = []
        Deferred.fromCoroutine(self._join_cluster(member, room))
        return room

    async def _join_cluster(self, member: Member, room: ClusterRoom) -> None:
        try:
            if room.key not in self.backplane._subscribed:
                await self.backplane.subscribe(room.key)
            if self._room_of.get(member) is not room:
                return  # left before we got here; leave() did the rest
            deadline, members = await self.backplane.run(
                JOIN,
                [_key("r", room.key), _key("m", room.key), _key("nr", self.node_id),
                 _key("c", room.key)],
                [self.node_id, member.connection_id,
                 repr(self.clock.seconds() + self.config.room_expiry),
                 int((self.config.room_expiry + KEY_SLACK) * 1000),
                 int((self.config.room_expiry + KEY_SLACK) * 1000), room.key],
            )
        except Exception as problem:
            if self._room_of.get(member) is room and member in room.pending:
                self._log.warn("joining through Redis failed ({problem}): will resync",
                               problem=str(problem))
                self._resync_again = True
                self._welcome(member, room)
            return
        if self._room_of.get(member) is not room or member not in room.pending:
            return
        room.expires_at = float(deadline)
        if not room.synced:
            self._apply_snapshot(room, members)
        self._welcome(member, room)

    def _apply_snapshot(self, room: ClusterRoom, flat: list[bytes]) -> None:
        """The room's members from Redis, then the events that came while it was asked."""
        room.remote = {
            connection.decode(): node.decode()
            for connection, node in zip(flat[::2], flat[1::2], strict=True)
            if node != self._node
        }
        room.synced = True
        early, room.early_events = room.early_events, []
        for kind, node, connection in early:
            if kind == b"j":
                room.remote[connection] = node
            else:
                room.remote.pop(connection, None)

    def _welcome(self, member: Member, room: ClusterRoom) -> None:
        """`connected` for the joiner, `user-joined` for the others here, kept frames."""
        kept = room.pending.pop(member, None)
        count = room.count()
        self._log.info(
            "{connection_id} joined room {room} ({count} members)",
            connection_id=member.connection_id, room=room_hash(room.room_id), count=count,
        )
        peers = [c for c, m in room.members.items()
                 if m is not member and m not in room.pending]
        peers.extend(room.remote)
        member.deliver(self.prepare(messages.connected(member.connection_id, room.room_id,
                                                       count, peers)))
        for frame in kept or ():
            member.deliver(frame)
        self._tell(room, messages.user_joined(member.connection_id, count), member)

    def leave(self, member: Member, close_code: int | None = None) -> None:
        room = self._room_of.pop(member, None)
        if room is None:
            return
        self.closes[close_code or 1006] += 1
        del room.members[member.connection_id]
        was_pending = room.pending.pop(member, None) is not None
        self.stats.disconnectionsTotal += 1
        count = room.count()
        self._log.info(
            "{connection_id} left room {room} ({count} members)",
            connection_id=member.connection_id, room=room_hash(room.room_id), count=count,
        )
        if not was_pending and not room.expired:
            self._tell(room, messages.user_left(member.connection_id, count), None)
        if not room.members:
            if self.rooms.get(room.room_id) is room:
                del self.rooms[room.room_id]
            if self._by_key.get(room.key) is room:
                del self._by_key[room.key]
                self.backplane.unsubscribe(room.key)
        if not room.expired:
            self._leave_cluster(room.key, member.connection_id)
        if not self._room_of:
            emptied, self._emptied = self._emptied, []
            for waiting in emptied:
                waiting.callback(None)

    def _leave_cluster(self, key: str, connection_id: str) -> None:
        if self.state == "connected":
            try:
                self.backplane.run(
                    LEAVE, [_key("r", key), _key("m", key), _key("c", key)],
                    [self.node_id, connection_id, 1],
                ).addErrback(self._leave_failed, key, connection_id)
                return
            except txredisapi.ConnectionError:
                pass
        self._departed.setdefault(key, set()).add(connection_id)
        self._resync_again = True

    def _leave_failed(self, failure: Any, key: str, connection_id: str) -> None:
        self._departed.setdefault(key, set()).add(connection_id)
        self._resync_again = True

    def room_size(self, room_id: str) -> int:
        room = self.rooms.get(room_id)
        return room.count() + len(room.pending) if room is not None else 0

    # -- relaying --------------------------------------------------------------------

    def broadcast(self, sender: Member, payload: bytes) -> None:
        room = self._room_of.get(sender)
        if room is None:
            return
        self.stats.messagesRelayed += 1
        started = perf_counter()
        self._fan_out(room, payload, sender)
        if self.state != "connected" or not self.backplane.publish(
                _key("c", room.key), b"m" + self._node + payload):
            self._not_sent()
        self.relay_seconds.observe(perf_counter() - started)

    def unicast(self, sender: Member, target: str, payload: bytes) -> bool:
        """To one member of the room: here, or published with its target for the node
        that has it (the others drop it); False when the room has no such other member."""
        room = self._room_of.get(sender)
        if room is None:
            return True
        member = room.members.get(target)
        if member is sender or (member is None and target not in room.remote):
            return False
        self.stats.messagesRelayed += 1
        started = perf_counter()
        if member is not None:
            self._deliver_here(room, member, self.prepare(payload))
        elif self.state != "connected" or not self.backplane.publish(
                _key("c", room.key), b"u" + self._node + target.encode() + b"\n" + payload):
            self._not_sent()
        self.relay_seconds.observe(perf_counter() - started)
        return True

    def _deliver_here(self, room: ClusterRoom, member: Member, frame: Any) -> None:
        """One frame to one member here; kept for it while its join is unconfirmed."""
        kept = room.pending.get(member) if room.pending else None
        if kept is not None:
            if len(kept) < PENDING_FRAMES:
                kept.append(frame)
            return
        self._deliver_one(member, frame)

    def _not_sent(self) -> None:
        self.cluster_stats.crossNodeDropped += 1
        self._outage_dropped += 1
        if self._outage_dropped == 1:
            self._log.warn("messages cannot reach the other nodes (Redis {state}); "
                           "relaying to this node's members only, counting the rest",
                           state="is too slow" if self.state == "connected" else "unreachable")

    def _fan_out(self, room: ClusterRoom, payload: bytes, exclude: Member | None) -> None:
        """Relayed messages: to every other member here; kept for those still joining."""
        frame = None
        pending = room.pending
        for member in list(room.members.values()):
            if member is exclude:
                continue
            if frame is None:
                frame = self.prepare(payload)
            kept = pending.get(member) if pending else None
            if kept is not None:
                if len(kept) < PENDING_FRAMES:
                    kept.append(frame)
                continue
            self._deliver_one(member, frame)

    def _tell(self, room: ClusterRoom, payload: bytes, exclude: Member | None) -> None:
        """Presence: to the members here that have had their `connected`."""
        frame = None
        for member in list(room.members.values()):
            if member is exclude or member in room.pending:
                continue
            if frame is None:
                frame = self.prepare(payload)
            with self._log.failuresHandled("delivery to {connection_id} failed",
                                           connection_id=member.connection_id):
                member.deliver(frame)

    # -- what other nodes say ------------------------------------------------------------

    def _received(self, key: str, message: bytes) -> None:
        kind = message[:1]
        node = message[1:1 + NODE_ID_LENGTH]
        if node == self._node:
            return  # our own echo: our members had it (or their presence) already
        room = self._by_key.get(key)
        if room is None:
            return
        if kind == b"m":
            self.cluster_stats.messagesFromOtherNodes += 1
            self._fan_out(room, message[1 + NODE_ID_LENGTH:], None)
        elif kind == b"u":
            target, _, payload = message[1 + NODE_ID_LENGTH:].partition(b"\n")
            member = room.members.get(target.decode())
            if member is not None:
                self.cluster_stats.messagesFromOtherNodes += 1
                self._deliver_here(room, member, self.prepare(payload))
        elif kind in (b"j", b"l"):
            connection_id = message[1 + NODE_ID_LENGTH:].decode()
            self._presence(room, kind, node.decode(), connection_id)
        elif kind == b"x":
            if room.expires_at <= self.clock.seconds() + EXPIRY_SKEW:
                self._expire_here(room)

    def _presence(self, room: ClusterRoom, kind: bytes, node: str, connection_id: str) -> None:
        if not room.synced and room.pending:
            room.early_events.append((kind, node, connection_id))
            return
        if kind == b"j":
            if connection_id in room.remote:
                return
            room.remote[connection_id] = node
            self._tell(room, messages.user_joined(connection_id, room.count()), None)
        else:
            if room.remote.pop(connection_id, None) is None:
                return
            if room.expired or room.expires_at <= self.clock.seconds():
                return  # the room is expiring: its members get room-expired instead
            self._tell(room, messages.user_left(connection_id, room.count()), None)

    # -- expiry ----------------------------------------------------------------------

    def expire(self, room: Room) -> None:
        """Expire here and tell the other nodes (their members share the deadline)."""
        if isinstance(room, ClusterRoom) and not room.expired and self.state == "connected":
            try:
                self.backplane.run(
                    EXPIRE, [_key("r", room.key), _key("m", room.key), _key("c", room.key)],
                    [self.node_id],
                ).addErrback(lambda failure: None)
            except txredisapi.ConnectionError:
                pass
        self._expire_here(room)

    def _expire_here(self, room: Room) -> None:
        if isinstance(room, ClusterRoom):
            if room.expired:
                return
            room.expired = True
            room.remote.clear()
            for member in list(room.pending):
                self._welcome(member, room)  # so that it can be told the room expired
            if self._by_key.get(room.key) is room:
                del self._by_key[room.key]
                self.backplane.unsubscribe(room.key)
        super().expire(room)

    # -- the link to Redis -------------------------------------------------------------

    def _unlinked(self) -> None:
        if self.state == "disconnected":
            return
        self.state = "disconnected"
        self._connected_at = None
        self._outage_dropped = 0
        self._log.warn("lost the connection to Redis: relaying to this node's members "
                       "only until it is back")
        for room in list(self._by_key.values()):
            room.synced = True
            room.early_events = []
            for member in list(room.pending):
                self._welcome(member, room)

    def _linked(self) -> None:
        if self.state != "disconnected":
            return
        self.state = "syncing"
        Deferred.fromCoroutine(self._resync())

    async def _resync(self) -> None:
        """Resubscribe, write our members back, learn the others', then say we live."""
        try:
            self._resync_again = True
            while self._resync_again:
                self._resync_again = False
                await self._sync_rooms()
            await self._beat_now()
        except Exception as problem:
            if self.state == "syncing":
                self.state = "disconnected"
                self._log.warn("resynchronising with Redis failed ({problem}); retrying",
                               problem=str(problem))
                # Drop the link: reconnecting brings us back here, with backoff.
                for link in (self.backplane.commands, self.backplane.subscriber):
                    if link is not None and link.transport is not None:
                        link.transport.abortConnection()
            return
        if self.state != "syncing":
            return
        self.state = "connected"
        self._connected_at = self.clock.seconds()
        self.cluster_stats.redisReconnects += 1
        self._log.info(
            "connected to Redis as node {node}; {dropped} messages could not reach the "
            "other nodes while it was unreachable", node=self.node_id,
            dropped=self._outage_dropped,
        )
        self._outage_dropped = 0

    async def _sync_rooms(self) -> None:
        backplane = self.backplane
        for key in list(self._by_key):
            await backplane.subscribe(key)
        stale: list[tuple[ClusterRoom, str, str]] = []
        ttl = int((self.config.room_expiry + KEY_SLACK) * 1000)
        for key in set(self._by_key) | set(self._departed):
            room = self._by_key.get(key)
            departed = sorted(self._departed.pop(key, ()))
            present = [c for c in (room.members if room else ()) if c not in departed]
            deadline = room.expires_at if room else self.clock.seconds()
            found, flat = await backplane.run(
                SYNC, [_key("r", key), _key("m", key), _key("nr", self.node_id),
                       _key("c", key)],
                [self.node_id, repr(deadline), ttl, ttl, key, len(departed), *departed,
                 *present],
            )
            if room is None or self._by_key.get(key) is not room:
                continue
            if found:
                room.expires_at = float(found)
            in_redis = {c.decode(): n.decode() for c, n in zip(flat[::2], flat[1::2],
                                                               strict=True)}
            for connection_id, node in in_redis.items():
                if node != self.node_id and connection_id not in room.remote:
                    room.remote[connection_id] = node
                    self._tell(room, messages.user_joined(connection_id, room.count()), None)
            stale.extend((room, c, n) for c, n in room.remote.items() if c not in in_redis)
            room.synced = True
        if stale:
            # Gone from Redis: left while we could not hear it, if their node has written
            # itself back (its heartbeat is set last); else the dead-node check decides.
            nodes = sorted({node for _, _, node in stale})
            alive = await backplane.mget([_key("n", node) for node in nodes])
            living = {node for node, beat in zip(nodes, alive, strict=True) if beat}
            for room, connection_id, node in stale:
                if node in living and room.remote.pop(connection_id, None) is not None:
                    self._tell(room, messages.user_left(connection_id, room.count()), None)

    # -- heartbeat and dead nodes ------------------------------------------------------

    def _beat(self) -> Deferred[None] | None:
        if self.state != "connected" or self.backplane.full:
            return None
        return Deferred.fromCoroutine(self._beat_and_check()).addErrback(
            self._beat_failed)

    def _beat_failed(self, failure: Any) -> None:
        self._log.info("heartbeat failed: {problem}", problem=failure.getErrorMessage())

    def _beat_now(self) -> Deferred[Any]:
        ttl = int(self.dead_after * 1000)
        return self.backplane.run(HEARTBEAT, [_key("n", self.node_id), _key("nodes", "all")],
                                  [self.node_id, ttl, ttl * 20])

    async def _beat_and_check(self) -> None:
        alive = await self._beat_now()
        if self._connected_at is None or self.state != "connected":
            return
        if not alive:
            # Silent too long (a stall): the others may have removed our members.
            self._log.warn("this node's heartbeat had expired: writing its members back")
            self.state = "syncing"
            await self._resync()
            return
        if self.clock.seconds() - self._connected_at < self.dead_after:
            return  # after a Redis restart, give every node time to write itself back
        nodes = sorted({node for room in self._by_key.values() for node in room.remote.values()})
        if not nodes:
            return
        beats = await self.backplane.mget([_key("n", node) for node in nodes])
        for node, beat in zip(nodes, beats, strict=True):
            if not beat and self.state == "connected":
                self.node_died(node)

    def node_died(self, node: str) -> None:
        """Another node stopped beating: its members left (told here, removed in Redis)."""
        self.cluster_stats.deadNodesSeen += 1
        self._log.warn("node {node} is dead: its members leave", node=node)
        for room in list(self._by_key.values()):
            for connection_id in [c for c, n in room.remote.items() if n == node]:
                del room.remote[connection_id]
                if not room.expired:
                    self._tell(room, messages.user_left(connection_id, room.count()), None)
        try:
            self.backplane.run(REAP, [_key("nodes", "all")], [PREFIX, node]).addErrback(
                lambda failure: None)
        except txredisapi.ConnectionError:
            pass  # another node, or the keys' own expiry, cleans Redis up
