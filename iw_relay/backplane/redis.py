"""The Redis backplane (``--redis URL``): nodes share rooms through one Redis.

Each node keeps two connections (txredisapi, replies parsed by hiredis): one for
commands, one subscribed to the node's own inbox channel. Relayed messages are published
with ``CLIENT REPLY SKIP`` (no reply to read, so no reactor turn of its own) and
confirmed by a ``PING`` (`CONFIRM_AFTER`). Presence goes through Lua
scripts (package data files in ``lua/``) that change the room's member hash and tell the
nodes concerned in one atomic step; relayed messages are published straight to the inbox
of each node that has members of the room, batched per turn (see `shared`).

Key layout (every key expires on its own; no room id, no message body is stored):

- ``iwrelay:r:{h}``    the room's deadline, set by the first join anywhere;
- ``iwrelay:m:{h}``    hash: connection id -> node id, the room's members on every node;
- ``iwrelay:n:{node}`` a node's heartbeat, PX = three heartbeats;
- ``iwrelay:nr:{node}`` set of the room hashes a node has had members in (for the reaper);
- ``iwrelay:nodes:all`` set of node ids, so that exactly one survivor reaps a dead node;
- channel ``iwrelay:i:{node}``: the node's inbox.

With ``--recovery-window`` (see iw_relay.cluster_recovery), also:

- ``iwrelay:h:{h}`` the room's history (a stream of stamped frames, with sender and
  target), ``...:seq``, ``...:epoch``, ``...:bytes``; the stream lives for the window,
  the seq and epoch for a room's lifetime plus the window;
- ``iwrelay:s:{h}:{connection}`` hash: a member's session (generation, joined seq,
  state, node); its TTL is the window while the member is away;
- ``iwrelay:resume-key``: the HMAC key of resume tokens, shared by every node (no TTL:
  a node keeps it for its lifetime; see docs/security.rst).

``h`` is `iw_relay.registry.room_key` (SHA-256 of the room id, 128 bits). The reaper walks
a dead node's rooms, keys it is not handed, so Redis Cluster is not supported.
"""

from __future__ import annotations

import secrets
import time
from importlib.resources import files
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from iw_relay._autobahn import set_tcp_nodelay, write_now
from iw_relay.backplane.shared import (
    HEARTBEATS_TO_DEATH,
    Claimed,
    HistoryLimits,
    Replay,
    SharedBackplane,
    StoreLink,
    StoreUnreachableError,
)
from iw_relay.config import RelayConfig
from iw_relay.recovery import new_epoch

PREFIX = "iwrelay:"
INBOX = PREFIX + "i:"


def _script(name: str) -> str:
    return files("iw_relay.backplane").joinpath("lua", f"{name}.lua").read_text()


SCRIPTS = {name: _script(name)
           for name in ("join", "leave", "expire", "sync", "heartbeat", "reap", "sequence",
                        "session_open", "session_drop", "session_claim", "session_close",
                        "history_since")}
#: The cluster's resume-token key: made once by whichever node asks first.
RESUME_KEY = PREFIX + "resume-key"


def _key(kind: str, name: str) -> str:
    return f"{PREFIX}{kind}:{name}"


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


#: Sent before a PUBLISH: Redis then writes no reply to it (Redis >= 3.2).
REPLY_SKIP = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$4\r\nSKIP\r\n"
PING = b"*1\r\n$4\r\nPING\r\n"
#: Unanswered publishes are confirmed by one PING this long after the first of them.
CONFIRM_AFTER = 0.05


class _Commands(txredisapi.RedisProtocol):
    def publish_unanswered(self, channel: bytes, envelope: bytes) -> None:
        """PUBLISH with no reply: no reply to read means no reactor turn of its own on
        this node and no write by Redis, once per destination node per turn (those were
        a third of a cross-node message's cost). Written at once (`write_now`, behind
        anything buffered), so it keeps its place among the other commands; nothing is
        put on txredisapi's reply queue, whose replies stay in step. `RedisStore`
        confirms publishes with a PING, and bounds those not yet confirmed."""
        if not self.connected:
            raise txredisapi.ConnectionError("Not connected")
        write_now(self.transport, REPLY_SKIP + b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n"
                  b"$%d\r\n%s\r\n" % (len(channel), channel, len(envelope), envelope))

    def ping_lean(self, skip_first: bool = False) -> Deferred[Any]:
        """PING without txredisapi's per-command timer (`RedisStore`'s watchdog watches
        it); with `skip_first`, after a reply-less PING: what checks that Redis takes
        CLIENT REPLY SKIP (its only reply is then this PONG)."""
        write_now(self.transport, (REPLY_SKIP + PING if skip_first else b"") + PING)
        return self.replyQueue.get()

    def connectionMade(self) -> None:
        # Nagle off: with no reply to carry Redis's ACK back, a PUBLISH written while the
        # previous one is unacknowledged would wait for Redis's delayed ACK (40 ms).
        set_tcp_nodelay(self.transport)
        super().connectionMade()

    def connectionLost(self, why: object) -> None:
        super().connectionLost(why)
        self.factory.store._lost(self)


def _check_txredisapi() -> None:
    """`_Commands.ping_lean` shares txredisapi's reply queue, `_Subscriber` reads from
    its hiredis reader: fail at import, not on the first message, if a txredisapi
    release renames them."""
    queue = getattr(txredisapi.RedisProtocol(), "replyQueue", None)
    if not (callable(getattr(queue, "get", None)) and hasattr(queue, "waiting")):
        raise ImportError("this txredisapi has no RedisProtocol.replyQueue: "
                          "iw_relay.backplane.redis needs updating")
    subscriber = txredisapi.SubscriberProtocol()
    reader = getattr(subscriber, "_reader", None)
    if not (callable(getattr(reader, "feed", None)) and callable(getattr(reader, "gets", None))
            and callable(getattr(subscriber, "tryConvertData", None))
            and callable(getattr(subscriber, "handleTransactionData", None))):
        raise ImportError("this txredisapi's SubscriberProtocol has no hiredis _reader "
                          "(is hiredis installed?): iw_relay.backplane.redis needs updating")


_check_txredisapi()


class _Subscriber(txredisapi.SubscriberProtocol):
    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        """The inbox's messages straight from hiredis's reader to the store: txredisapi's
        conversions and dispatch cost a fifth of reading one (the inbox's channel is
        ours, its messages bytes); anything else (SUBSCRIBE's answer) takes its path."""
        if not data:
            return
        reader = self._reader
        reader.feed(data)
        received = self.factory.store._received
        while (reply := reader.gets()) is not False:
            if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                received(reply[2])
            else:
                self.replyReceived(self.handleTransactionData(self.tryConvertData(reply)))

    def messageReceived(self, pattern: object, channel: bytes, message: bytes) -> None:
        self.factory.store._received(message)

    def connectionLost(self, why: object) -> None:
        super().connectionLost(why)
        self.factory.store._lost(self)


class _RedisFactory(Factory):
    """Builds txredisapi protocols (bytes in and out) for one of the store's links."""

    isLazy = True
    noisy = False

    def __init__(self, store: RedisStore, protocol_class: type,
                 reply_timeout: float | None) -> None:
        self.store = store
        self.protocol_class = protocol_class
        self.reply_timeout = reply_timeout

    def buildProtocol(self, addr: object) -> txredisapi.BaseRedisProtocol:
        settings = self.store.settings
        protocol = self.protocol_class(
            charset=None, convertNumbers=False, replyTimeout=self.reply_timeout,
            password=settings["password"], dbid=settings["dbid"],
            username=settings["username"],
        )
        protocol.factory = self
        return protocol

    # txredisapi calls these when AUTH or SELECT fails: the connection is dropped and
    # retried with backoff, so an operator sees the error repeated in the log.
    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        self.store._log.error("Redis refused the connection: {why}", why=why)


class RedisStore:
    """Two links to Redis (commands, and the inbox subscription), reconnected with
    backoff; `in_flight` counts the commands awaiting a reply and the publishes not yet
    confirmed."""

    _log = Logger()

    def __init__(self, url: str, reactor: Any, reply_timeout: float) -> None:
        self.settings = redis_settings(url)
        self.commands: _Commands | None = None
        self.subscriber: _Subscriber | None = None
        self._awaiting = 0
        #: Publishes sent on this link, those a PONG confirmed, and the PING's timer.
        self._published = 0
        self._confirmed = 0
        self._confirming = False
        self._confirm_call: Any = None
        self.reply_timeout = reply_timeout
        self._reactor = reactor
        #: Replies received so far, and the timer that checks they keep coming.
        self._answers = 0
        self._watchdog: Any = None
        self._node = ""
        self._link: StoreLink  # set by connect(), before anything calls it
        endpoint = TCP4ClientEndpoint(reactor, self.settings["host"], self.settings["port"],
                                      timeout=5)
        policy = backoffPolicy(initialDelay=0.2, maxDelay=5.0, factor=2.0)
        self._services = [
            ClientService(endpoint, _RedisFactory(self, _Commands, reply_timeout),
                          retryPolicy=policy, clock=reactor, prepareConnection=self._ready),
            ClientService(endpoint, _RedisFactory(self, _Subscriber, None),
                          retryPolicy=policy, clock=reactor, prepareConnection=self._ready),
        ]

    @property
    def in_flight(self) -> int:
        return self._awaiting + self._published - self._confirmed

    @property
    def usable(self) -> bool:
        return self.commands is not None and self.subscriber is not None

    # -- links --------------------------------------------------------------------------

    def connect(self, node: str, link: StoreLink) -> None:
        self._node, self._link = node, link
        for service in self._services:
            service.startService()

    def disconnect(self) -> Deferred[Any]:
        for call in (self._watchdog, self._confirm_call):
            if call is not None and call.active():
                call.cancel()
        self._watchdog = self._confirm_call = None
        return gatherResults([service.stopService() for service in self._services],
                             consumeErrors=True)

    def abort(self) -> None:
        for protocol in (self.commands, self.subscriber):
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abortConnection()

    def _ready(self, protocol: txredisapi.BaseRedisProtocol) -> Deferred[Any]:
        """ClientService's prepareConnection: usable once AUTH and SELECT are done (and,
        for the subscriber, once it listens to the inbox)."""
        # (`protocol` is ClientService's proxy; whenConnected gives the protocol itself.)
        return protocol.whenConnected().addCallback(self._listen).addCallback(self._usable)

    def _listen(self, protocol: txredisapi.BaseRedisProtocol) -> Any:
        if isinstance(protocol, _Commands):
            return protocol.ping_lean(skip_first=True).addCallback(self._skips, protocol)
        return protocol.subscribe(INBOX + self._node).addCallback(lambda _: protocol)

    def _skips(self, reply: Any, protocol: _Commands) -> _Commands | None:
        """Publishes are sent with CLIENT REPLY SKIP: a Redis that does not take it
        (before 3.2, or CLIENT renamed away) would answer them, out of step. None: the
        link is dropped (and made again, with backoff), never usable."""
        if reply not in (b"PONG", "PONG"):
            self._log.error("Redis does not take CLIENT REPLY SKIP ({reply!r}): the "
                            "cluster needs Redis 3.2 or later with CLIENT allowed",
                            reply=reply)
            protocol.transport.abortConnection()
            return None
        return protocol

    def _usable(self, protocol: txredisapi.BaseRedisProtocol | None) -> None:
        if protocol is None or not protocol.connected:
            return
        if isinstance(protocol, _Subscriber):
            self.subscriber = protocol
        else:
            self.commands = protocol
            self._awaiting = self._published = self._confirmed = 0
            self._confirming = False
        if self.usable:
            self._link.linked()

    def _lost(self, protocol: object) -> None:
        was_usable = self.usable
        if protocol is self.commands:
            self.commands = None
        elif protocol is self.subscriber:
            self.subscriber = None
        else:
            return
        if was_usable:
            self._link.unlinked()

    def _received(self, message: bytes) -> None:
        try:
            self._link.received(message)
        except Exception:
            self._log.failure("handling a message from Redis failed")

    # -- commands -----------------------------------------------------------------------

    def _commands(self) -> _Commands:
        commands = self.commands
        if commands is None:
            raise StoreUnreachableError("Redis is not connected")
        return commands

    def _sent(self, commands: _Commands, done: Deferred[Any]) -> Deferred[Any]:
        self._awaiting += 1
        self._watch(commands)
        return done.addBoth(self._answered, commands)

    def _watch(self, commands: _Commands) -> None:
        if self._watchdog is None:
            self._watchdog = self._reactor.callLater(
                self.reply_timeout, self._check_answers, commands, self._answers)

    def _answered(self, result: Any, commands: object) -> Any:
        if commands is self.commands:
            self._awaiting -= 1
            self._answers += 1
        return result

    def _check_answers(self, commands: _Commands, answers: int) -> None:
        """No reply for `reply_timeout` while commands wait: Redis is stalled, drop the
        connection (then handled as an outage). One timer for all commands, since
        publishes have none of their own."""
        self._watchdog = None
        if commands is self.commands and answers == self._answers and self.in_flight:
            self._log.warn("Redis answered nothing for {timeout} s: reconnecting",
                           timeout=self.reply_timeout)
            self.abort()
        elif self.commands is not None and self.in_flight:
            self._watchdog = self._reactor.callLater(
                self.reply_timeout, self._check_answers, self.commands, self._answers)

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        """EVAL (txredisapi sends EVALSHA once the script is known)."""
        commands = self._commands()
        return self._sent(commands, commands.eval(SCRIPTS[script], keys, args))

    def publish(self, node: str, envelope: bytes) -> None:
        commands = self._commands()
        try:
            commands.publish_unanswered((INBOX + node).encode(), envelope)
        except txredisapi.ConnectionError as problem:
            raise StoreUnreachableError(str(problem)) from None
        self._published += 1
        if self._confirm_call is None and not self._confirming:
            self._confirm_call = self._reactor.callLater(CONFIRM_AFTER, self._confirm,
                                                         commands)
        self._watch(commands)

    def _confirm(self, commands: _Commands) -> None:
        """One PING for the publishes sent so far: its PONG says Redis has taken them
        (it answers in order), and is what the watchdog sees of a live Redis."""
        self._confirm_call = None
        if commands is not self.commands or not commands.connected:
            return
        self._confirming = True
        commands.ping_lean().addBoth(self._confirmed_up_to, commands, self._published)

    def _confirmed_up_to(self, reply: Any, commands: _Commands, published: int) -> None:
        if commands is not self.commands:
            return
        self._confirming = False
        if isinstance(reply, Failure):  # the connection is lost: its loss is handled
            return
        self._answers += 1
        self._confirmed = published
        if self._published > published:
            self._confirm_call = self._reactor.callLater(CONFIRM_AFTER, self._confirm,
                                                         commands)

    def join(self, node: str, key: str, connection_id: str, deadline: float, ttl_ms: int,
             max_size: int) -> Deferred[Any]:
        return self._run("join", [_key("r", key), _key("m", key), _key("nr", node)],
                         [node, connection_id, repr(deadline), ttl_ms, ttl_ms, key,
                          max_size, INBOX])

    def leave(self, node: str, key: str, connection_id: str) -> Deferred[Any]:
        return self._run("leave", [_key("r", key), _key("m", key)],
                         [node, connection_id, key, INBOX])

    def expire(self, node: str, key: str) -> Deferred[Any]:
        return self._run("expire", [_key("r", key), _key("m", key)], [node, key, INBOX])

    async def _sync(self, node: str, key: str, deadline: float, ttl_ms: int,
                    departed: list[str], present: list[str]
                    ) -> tuple[float | None, dict[str, str]]:
        found, flat = await self._run(
            "sync", [_key("r", key), _key("m", key), _key("nr", node)],
            [node, repr(deadline), ttl_ms, ttl_ms, key, INBOX, len(departed), *departed,
             *present])
        members = {c.decode(): n.decode() for c, n in zip(flat[::2], flat[1::2], strict=True)}
        return (float(found) if found else None), members

    def sync(self, node: str, key: str, deadline: float, ttl_ms: int, departed: list[str],
             present: list[str]) -> Deferred[tuple[float | None, dict[str, str]]]:
        return Deferred.fromCoroutine(self._sync(node, key, deadline, ttl_ms, departed,
                                                 present))

    def heartbeat(self, node: str, ttl_ms: int) -> Deferred[bool]:
        return self._run("heartbeat", [_key("n", node), _key("nodes", "all")],
                         [node, ttl_ms, ttl_ms * 20]).addCallback(bool)

    def alive(self, nodes: list[str]) -> Deferred[list[bool]]:
        commands = self._commands()
        return self._sent(commands, commands.mget([_key("n", n) for n in nodes])).addCallback(
            lambda beats: [bool(beat) for beat in beats])

    def reap(self, node: str) -> Deferred[Any]:
        return self._run("reap", [_key("nodes", "all")], [PREFIX, node])

    def forget(self, node: str) -> Deferred[Any]:
        commands = self._commands()
        return self._sent(commands, commands.delete(_key("n", node)))


    # -- connection recovery (iw_relay.cluster_recovery) ---------------------------------

    def sequence(self, node: str, key: str, batch: list[Any],
                 limits: HistoryLimits) -> Deferred[Any]:
        return self._run("sequence", [*_history_keys(key), _key("m", key)],
                         [node, INBOX, key, _now_ms(), limits.window_ms,
                          limits.max_messages, limits.max_bytes, new_epoch(),
                          limits.head_ttl_ms, *batch])

    def open_session(self, node: str, key: str, connection_id: str,
                     limits: HistoryLimits) -> Deferred[tuple[str, int]]:
        return self._run("session_open", [*_history_keys(key), _session(key, connection_id)],
                         [new_epoch(), limits.head_ttl_ms, node]).addCallback(
            lambda reply: (reply[0].decode(), int(reply[1])))

    def drop_session(self, node: str, key: str, connection_id: str, grace: bool,
                     limits: HistoryLimits) -> Deferred[Any]:
        return self._run("session_drop", [_session(key, connection_id)],
                         [node, int(grace), limits.window_ms])

    def claim_session(self, node: str, key: str, connection_id: str, generation: int,
                      limits: HistoryLimits) -> Deferred[Claimed | str]:
        def claimed(reply: list[bytes]) -> Claimed | str:
            if reply[0] != b"ok":
                return reply[0].decode()
            flat = reply[4:]
            return Claimed(int(reply[1]), int(reply[2]),
                           float(reply[3]) if reply[3] else None,
                           {c.decode(): n.decode() for c, n in zip(flat[::2], flat[1::2],
                                                                   strict=True)})

        return self._run("session_claim",
                         [_session(key, connection_id), _key("m", key), _key("nr", node),
                          _key("r", key)],
                         [generation, node, key, INBOX, connection_id, limits.head_ttl_ms,
                          limits.head_ttl_ms]).addCallback(claimed)

    def close_session(self, node: str, key: str, connection_id: str) -> Deferred[bool]:
        return self._run("session_close", [_session(key, connection_id)],
                         [node]).addCallback(bool)

    def history_since(self, key: str, seq: int, epoch: str, connection_id: str,
                      limits: HistoryLimits) -> Deferred[Replay | str]:
        cid = connection_id.encode()

        def replay(reply: list[bytes]) -> Replay | str:
            if reply[0] != b"ok":
                return reply[0].decode()
            flat = reply[2:]
            return Replay(int(reply[1]), [
                frame for frame, sender, target in zip(flat[::3], flat[1::3], flat[2::3],
                                                       strict=True)
                if sender != cid and target in (b"", cid)])

        return self._run("history_since", _history_keys(key)[:3],
                         [seq, epoch, _now_ms(), limits.window_ms]).addCallback(replay)

    def resume_key(self, candidate: bytes) -> Deferred[bytes]:
        commands = self._commands()
        done = commands.set(RESUME_KEY, candidate, only_if_not_exists=True)
        return self._sent(commands, done).addCallback(
            lambda _: self._sent(commands, commands.get(RESUME_KEY)))


def _history_keys(key: str) -> list[str]:
    """stream, seq, epoch, bytes of a room's history."""
    base = _key("h", key)
    return [base, f"{base}:seq", f"{base}:epoch", f"{base}:bytes"]


def _session(key: str, connection_id: str) -> str:
    return _key("s", f"{key}:{connection_id}")


def _now_ms() -> int:
    return int(time.time() * 1000)


def redis_backplane(config: RelayConfig, clock: IReactorTime, reactor: Any,
                    node_id: str | None = None) -> SharedBackplane:
    """The backplane for ``--redis``: a `SharedBackplane` over a `RedisStore`."""
    if config.redis is None:
        raise ValueError("the Redis backplane needs --redis")
    dead_after = config.node_heartbeat * HEARTBEATS_TO_DEATH
    node_id = node_id or secrets.token_hex(8)
    return SharedBackplane(
        RedisStore(config.redis, reactor, reply_timeout=dead_after), node_id, clock,
        reactor, heartbeat=config.node_heartbeat, queue_size=config.redis_queue_size,
        max_payload=config.max_message_size, room_expiry=config.room_expiry, name="redis")
