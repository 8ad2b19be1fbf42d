"""The node's side of a backplane shared by several nodes, over any `Store`.

A `Store` is where the shared state lives and how envelopes reach a node's inbox: Redis
(iw_relay.backplane.redis) or an in-process bus (iw_relay.backplane.memory). This module
holds what does not depend on which: the connection state machine, the batching of
outgoing messages, heartbeats and the dead-node check, and the repair after an outage.

- Batching: relayed messages are queued per destination node and sent at the end of the
  reactor turn as one envelope (one PUBLISH per destination node per turn). Presence
  scripts flush the queue first, so a member's messages always precede its departure.
- A bounded queue: at most `queue_size` store commands await a reply or, for publishes
  (which have none), a confirmation; past that, messages for other nodes are dropped
  and counted; local relaying never waits.
- Outage: while the store is unreachable, joins are committed at once with what this
  node knows, leaves are remembered, messages for other nodes are counted as dropped.
  Once the store is back the node writes its members back (one script per room),
  learns the others, then says it lives (heartbeat).
- Recovery (``--recovery-window`` in a cluster): relayed messages are not delivered here
  at once but queued per room (`sequence`) and sent at the end of the turn as one
  script per room, which stamps each with the room's next seq, keeps it in the room's
  history and publishes it to every node with members there, this one included; each
  node delivers its members' frames from its inbox, in the order Redis published them.
  While the store is unreachable they are delivered here unstamped.
- Dead nodes: a node whose heartbeat key has expired is dead; every node tells its
  members, one of them removes the dead node's members from the store. A node judges
  others only after being connected itself for three heartbeats.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from automat import MethodicalMachine
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from iw_relay.backplane.base import (
    COMMITTED,
    EXPIRED,
    JOINED,
    LEFT,
    MESSAGE,
    REFUSED,
    SEQUENCED,
    UNICAST,
    BackplaneEvents,
    Codec,
    encode_header,
    encode_message,
    encode_unicast,
)

#: A node is dead after this many heartbeats without one.
HEARTBEATS_TO_DEATH = 3
#: Store keys outlive a room's deadline by this much (the sweep deletes them first).
KEY_SLACK = 3600.0


class StoreLink(Protocol):
    """What a store tells its node."""

    def linked(self) -> None: ...

    def unlinked(self) -> None: ...

    def received(self, envelope: bytes) -> None: ...


class Store(Protocol):
    """Shared state and inboxes. Every command returns a Deferred, or raises
    ConnectionError at once when the store is unreachable."""

    @property
    def in_flight(self) -> int:
        """Commands awaiting a reply, and publishes not yet known to be taken."""

    def connect(self, node: str, link: StoreLink) -> None: ...

    def disconnect(self) -> Deferred[Any]: ...

    def abort(self) -> None:
        """Drop the connection (it will be made again, with backoff)."""

    def join(self, node: str, key: str, connection_id: str, deadline: float, ttl_ms: int,
             max_size: int) -> Deferred[Any]: ...

    def leave(self, node: str, key: str, connection_id: str) -> Deferred[Any]: ...

    def expire(self, node: str, key: str) -> Deferred[Any]: ...

    def sync(self, node: str, key: str, deadline: float, ttl_ms: int, departed: list[str],
             present: list[str]) -> Deferred[tuple[float | None, dict[str, str]]]: ...

    def heartbeat(self, node: str, ttl_ms: int) -> Deferred[bool]: ...

    def alive(self, nodes: list[str]) -> Deferred[list[bool]]: ...

    def reap(self, node: str) -> Deferred[Any]: ...

    def forget(self, node: str) -> Deferred[Any]: ...

    def publish(self, node: str, envelope: bytes) -> None:
        """Sent at once, with no reply; counted in `in_flight` until confirmed."""

    # Connection recovery (iw_relay.cluster_recovery); `key` is the room's hash.

    def sequence(self, node: str, key: str, batch: list[Any],
                 limits: HistoryLimits) -> Deferred[Any]:
        """Stamp, keep and publish (sender, target or "", payload, ...) in one step."""
        ...

    def open_session(self, node: str, key: str, connection_id: str,
                     limits: HistoryLimits) -> Deferred[tuple[str, int]]:
        """A fresh member's session; answers the room's (epoch, last seq)."""
        ...

    def drop_session(self, node: str, key: str, connection_id: str, grace: bool,
                     limits: HistoryLimits) -> Deferred[Any]: ...

    def claim_session(self, node: str, key: str, connection_id: str, generation: int,
                      limits: HistoryLimits) -> Deferred[Claimed | str]:
        """A resume's claim: `Claimed`, or the `RecoveryFailure` value of why not."""
        ...

    def close_session(self, node: str, key: str, connection_id: str) -> Deferred[bool]:
        """An away member's window passed: True when it is gone (no resume moved it from
        `node`, the node it dropped from)."""
        ...

    def history_since(self, key: str, seq: int, epoch: str, connection_id: str,
                      limits: HistoryLimits) -> Deferred[Replay | str]:
        """What `connection_id` is owed after `seq`, or the `RecoveryFailure` value of
        why it cannot all be given."""
        ...

    def resume_key(self, candidate: bytes) -> Deferred[bytes]:
        """The cluster's resume-token key: `candidate` if no node made one before."""
        ...


@dataclass(frozen=True)
class HistoryLimits:
    """Connection recovery's bounds, as the store takes them."""

    window_ms: int
    max_messages: int
    max_bytes: int
    #: How long a room's seq, epoch and a present member's session live (a room's
    #: lifetime plus the window).
    head_ttl_ms: int


@dataclass(frozen=True)
class Claimed:
    generation: int
    joined_seq: int
    deadline: float | None
    members: dict[str, str]  # the room's other members: connection id -> node


@dataclass(frozen=True)
class Replay:
    last_seq: int  # the room's last seq when asked: live frames up to it are replayed
    frames: list[bytes]  # in seq order


class StoreUnreachableError(ConnectionError):
    pass


@dataclass
class SharedStats:
    crossNodeDropped: int = 0  # messages that could not be sent to the other nodes
    messagesFromOtherNodes: int = 0
    redisReconnects: int = 0  # connections after the first one
    deadNodesSeen: int = 0
    badEnvelopes: int = 0


class SharedBackplane:
    """A `Backplane` for several nodes; `name` is what /health reports it under."""

    _log = Logger()
    _machine = MethodicalMachine()
    shared = True

    def __init__(self, store: Store, node_id: str, clock: IReactorTime, reactor: Any,
                 heartbeat: float, queue_size: int, max_payload: int,
                 room_expiry: float, name: str = "redis") -> None:
        self.store = store
        self.node_id = node_id
        self.name = name
        self.clock = clock
        self._reactor = reactor
        self.heartbeat_interval = heartbeat
        self.dead_after = heartbeat * HEARTBEATS_TO_DEATH
        self.queue_size = queue_size
        self._ttl_ms = int((room_expiry + KEY_SLACK) * 1000)
        self.codec = Codec(max_payload)
        self.stats = SharedStats()
        self.state = "disconnected"  # a mirror of the machine's state, for reports only
        self._events: BackplaneEvents  # set by attach(), before anything calls it
        self._header = encode_header(node_id)
        self._outbox: dict[str, list[bytes]] = {}
        self._outbox_messages = 0
        #: Recovery in a cluster: room key -> (sender, target or "", payload, ...) to
        #: sequence at the end of the turn; `history` is set by whoever sequences.
        self._sequenced: dict[str, list[Any]] = {}
        self.history: HistoryLimits | None = None
        self._flush_call: Any = None
        self._joining: set[tuple[str, str]] = set()
        #: Members that left while the store was unreachable: room key -> connection ids.
        self._departed: dict[str, set[str]] = {}
        self._dirty = False
        self._generation = 0
        self._ever_connected = False
        self._connected_at: float | None = None
        self._outage_dropped = 0
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock

    # -- the state machine -------------------------------------------------------------

    @_machine.state(initial=True)
    def _disconnected(self) -> None:
        "No usable link to the store: relay among this node's members only."

    @_machine.state()
    def _syncing(self) -> None:
        "Linked: writing this node's members back and learning the others'."

    @_machine.state()
    def _connected(self) -> None:
        "In the cluster."

    @_machine.state()
    def _stopped(self) -> None:
        "Stopped for good."

    @_machine.input()
    def linked(self) -> None:
        "Both links to the store are usable."

    @_machine.input()
    def unlinked(self) -> None:
        "A link to the store was lost."

    @_machine.input()
    def _synced(self, generation: int) -> None:
        "A resynchronisation finished."

    @_machine.input()
    def _sync_failed(self, generation: int, problem: str) -> None:
        "A resynchronisation failed."

    @_machine.input()
    def _found_stale(self) -> None:
        """Our own heartbeat had expired (the others may have removed our members), or a
        join or leave failed: the store must be told again."""

    @_machine.input()
    def _stop(self) -> None:
        "The node is stopping."

    @_machine.output()
    def _start_sync(self) -> None:
        self.state = "syncing"
        self._generation += 1
        Deferred.fromCoroutine(self._resync(self._generation))

    @_machine.output()
    def _enter_connected(self, generation: int) -> None:
        self.state = "connected"
        self._connected_at = self.clock.seconds()
        if self._ever_connected:
            self.stats.redisReconnects += 1
            self._log.info(
                "reconnected to the other nodes as node {node}; {dropped} messages could "
                "not reach the other nodes while it was unreachable", node=self.node_id,
                dropped=self._outage_dropped)
        else:
            self._log.info("connected to the other nodes as node {node}", node=self.node_id)
        self._ever_connected = True
        self._outage_dropped = 0

    @_machine.output()
    def _enter_disconnected(self) -> None:
        self._generation += 1
        was_connected = self.state == "connected"
        self.state = "disconnected"
        self._connected_at = None
        if was_connected:
            self._outage_dropped = 0
            self._log.warn("lost the connection to the other nodes: relaying to this "
                           "node's members only until it is back")
        self._commit_waiting_joins()

    @_machine.output()
    def _report_failure(self, generation: int, problem: str) -> None:
        self._log.warn("resynchronising failed ({problem}); retrying", problem=problem)
        self.state = "disconnected"
        self.store.abort()  # reconnecting (with backoff) brings us back to syncing

    @_machine.output()
    def _enter_stopped(self) -> None:
        self._generation += 1
        self.state = "stopped"
        self._commit_waiting_joins()

    _disconnected.upon(linked, enter=_syncing, outputs=[_start_sync])
    _disconnected.upon(unlinked, enter=_disconnected, outputs=[])
    _disconnected.upon(_synced, enter=_disconnected, outputs=[])
    _disconnected.upon(_sync_failed, enter=_disconnected, outputs=[])
    _disconnected.upon(_found_stale, enter=_disconnected, outputs=[])
    _syncing.upon(_synced, enter=_connected, outputs=[_enter_connected])
    _syncing.upon(_sync_failed, enter=_disconnected, outputs=[_report_failure])
    _syncing.upon(unlinked, enter=_disconnected, outputs=[_enter_disconnected])
    _syncing.upon(linked, enter=_syncing, outputs=[])
    _syncing.upon(_found_stale, enter=_syncing, outputs=[])
    _connected.upon(unlinked, enter=_disconnected, outputs=[_enter_disconnected])
    _connected.upon(_found_stale, enter=_syncing, outputs=[_start_sync])
    _connected.upon(linked, enter=_connected, outputs=[])
    _connected.upon(_synced, enter=_connected, outputs=[])
    _connected.upon(_sync_failed, enter=_connected, outputs=[])
    for _state in (_disconnected, _syncing, _connected):
        _state.upon(_stop, enter=_stopped, outputs=[_enter_stopped])
    for _input in (linked, unlinked, _synced, _sync_failed, _found_stale, _stop):
        _stopped.upon(_input, enter=_stopped, outputs=[])
    del _state, _input

    # -- Backplane ----------------------------------------------------------------------

    def attach(self, events: BackplaneEvents) -> None:
        self._events = events

    def start(self) -> None:
        self.store.connect(self.node_id, self)
        self._heartbeat.start(self.heartbeat_interval, now=False)

    async def _stop_async(self) -> None:
        if self._heartbeat.running:
            self._heartbeat.stop()
        self._flush()
        if self.state == "connected":
            # Leaving at once beats being found dead three heartbeats later.
            try:
                await self.store.forget(self.node_id)
            except Exception:
                pass
        self._stop()
        await self.store.disconnect()

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop_async())

    def status(self) -> dict[str, Any]:
        return {
            self.name: "connected" if self.state == "connected" else "disconnected",
            "connected": self.state == "connected",
            "node": self.node_id,
            **self.stats.__dict__,
        }

    @property
    def full(self) -> bool:
        return self.store.in_flight >= self.queue_size

    def join(self, key: str, connection_id: str, deadline: float, max_size: int) -> None:
        if self.state == "connected" and not self.full:
            self._flush()
            try:
                done = self.store.join(self.node_id, key, connection_id, deadline,
                                       self._ttl_ms, max_size)
            except ConnectionError:
                pass
            else:
                self._joining.add((key, connection_id))
                done.addErrback(self._join_failed, key, connection_id)
                return
        self._dirty = True  # the resynchronisation writes it
        self._events.join_committed(key, connection_id, None, None)

    def _join_failed(self, failure: Any, key: str, connection_id: str) -> None:
        if (key, connection_id) in self._joining:
            self._log.warn("joining through the store failed ({problem}): will resync",
                           problem=failure.getErrorMessage())
            self._joining.discard((key, connection_id))
            self._dirty = True
            self._events.join_committed(key, connection_id, None, None)
            self._found_stale()  # connected: resynchronise now, not at the next outage

    def _commit_waiting_joins(self) -> None:
        """Joins the store will not answer now: committed with what this node knows."""
        waiting, self._joining = self._joining, set()
        for key, connection_id in sorted(waiting):
            self._dirty = True
            self._events.join_committed(key, connection_id, None, None)

    def leave(self, key: str, connection_id: str) -> None:
        self._joining.discard((key, connection_id))
        if self.state == "connected":
            self._flush()
            try:
                self.store.leave(self.node_id, key, connection_id).addErrback(
                    self._leave_failed, key, connection_id)
                return
            except ConnectionError:
                pass
        self._leave_failed(None, key, connection_id)

    def _leave_failed(self, failure: Any, key: str, connection_id: str) -> None:
        self._departed.setdefault(key, set()).add(connection_id)
        self._dirty = True
        if failure is not None:
            self._found_stale()

    def expire(self, key: str) -> None:
        if self.state == "connected":
            self._flush()
            try:
                self.store.expire(self.node_id, key).addErrback(lambda failure: None)
            except ConnectionError:
                pass

    # -- outgoing messages, batched per destination node --------------------------------

    def publish(self, key: str, nodes: Iterable[str], payload: bytes) -> None:
        if self.state != "connected":
            self._not_sent(1)
            return
        entry = encode_message(key.encode(), payload)
        outbox = self._outbox
        for node in nodes:
            queued = outbox.get(node)
            if queued is None:
                outbox[node] = [entry]
            else:
                queued.append(entry)
        self._outbox_messages += 1
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def unicast(self, key: str, node: str, target: str, payload: bytes) -> None:
        if self.state != "connected":
            self._not_sent(1)
            return
        self._outbox.setdefault(node, []).append(encode_unicast(key.encode(), target, payload))
        self._outbox_messages += 1
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def sequence(self, key: str, sender: str, target: str | None, payload: bytes) -> None:
        """A relayed message to stamp with its room's seq (recovery in a cluster): every
        member gets it back through its node's inbox, this node's included."""
        queued = self._sequenced.get(key)
        if queued is None:
            self._sequenced[key] = [sender, target or "", payload]
        else:
            queued += (sender, target or "", payload)
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush_sequenced(self) -> None:
        """One sequencing script per room; unstamped, here only, when the store cannot
        take them (their recipients elsewhere miss them, counted)."""
        batches, self._sequenced = self._sequenced, {}
        if self.state == "connected" and not self.full and self.history is not None:
            try:
                for key, batch in batches.items():
                    self.store.sequence(self.node_id, key, batch, self.history).addErrback(
                        lambda failure: None)  # the connection's loss is handled there
                return
            except ConnectionError:
                pass
        self._not_sent(sum(len(batch) for batch in batches.values()) // 3)
        for key, batch in batches.items():
            for at in range(0, len(batch), 3):
                self._events.remote_sequenced(key, 0, *batch[at:at + 3])

    def _flush(self) -> None:
        """One envelope per destination node for everything queued this turn."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._sequenced:
            self._flush_sequenced()
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        messages, self._outbox_messages = self._outbox_messages, 0
        if self.state != "connected" or self.full:
            self._not_sent(messages)
            return
        try:
            for node, entries in outbox.items():
                self.store.publish(node, self._header + b"".join(entries))
        except ConnectionError:
            self._not_sent(messages)

    def _not_sent(self, count: int) -> None:
        self.stats.crossNodeDropped += count
        first = self._outage_dropped == 0
        self._outage_dropped += count
        if first:
            self._log.warn("messages cannot reach the other nodes ({why}); relaying to "
                           "this node's members only, counting the rest",
                           why="the store is too slow" if self.state == "connected"
                           else "the store is unreachable")

    # -- incoming -----------------------------------------------------------------------

    def received(self, envelope: bytes) -> None:
        """An envelope from our inbox: checked by the codec, then told to the registry."""
        events = self._events
        before = self.codec.dropped_total
        sender, entries = self.codec.decode(envelope)
        bad = self.codec.dropped_total - before
        if bad:
            self.stats.badEnvelopes += bad
            self._log.warn("dropped {count} malformed entries from the other nodes",
                           count=bad)
        for entry in entries:
            kind = entry.kind
            try:
                if kind == MESSAGE:
                    self.stats.messagesFromOtherNodes += 1
                    events.remote_message(entry.key, entry.payload)
                elif kind == SEQUENCED:
                    if sender != self.node_id:
                        self.stats.messagesFromOtherNodes += 1
                    events.remote_sequenced(entry.key, entry.seq, entry.connection_id,
                                            entry.target, entry.payload)
                elif kind == UNICAST:
                    self.stats.messagesFromOtherNodes += 1
                    events.remote_unicast(entry.key, entry.connection_id, entry.payload)
                elif kind == JOINED and sender != self.node_id:
                    events.remote_joined(entry.key, entry.connection_id, sender)
                elif kind == LEFT:
                    events.remote_left(entry.key, entry.connection_id)
                elif kind == EXPIRED:
                    events.remote_expired(entry.key)
                elif kind in (COMMITTED, REFUSED) and sender == self.node_id:
                    if (entry.key, entry.connection_id) not in self._joining:
                        continue
                    self._joining.discard((entry.key, entry.connection_id))
                    if kind == REFUSED:
                        events.join_refused(entry.key, entry.connection_id)
                    else:
                        events.join_committed(entry.key, entry.connection_id,
                                              entry.deadline, entry.members)
            except Exception:
                self._log.failure("handling a message from the other nodes failed")

    # -- outage repair ------------------------------------------------------------------

    async def _resync(self, generation: int) -> None:
        """Write our members back, learn the others', then say we live."""
        try:
            self._dirty = True
            while self._dirty:
                self._dirty = False
                await self._sync_rooms()
            await self.store.heartbeat(self.node_id, int(self.dead_after * 1000))
        except Exception as problem:
            if generation == self._generation:  # else a newer link has its own
                self._sync_failed(generation, str(problem) or type(problem).__name__)
            return
        if generation == self._generation:
            self._synced(generation)

    async def _sync_rooms(self) -> None:
        events = self._events
        rooms = events.begin_sync()
        stale: list[tuple[str, str, str]] = []
        for key in set(rooms) | set(self._departed):
            deadline, present = rooms.get(key, (self.clock.seconds(), []))
            departed = sorted(self._departed.pop(key, ()))
            present = [c for c in present if c not in departed]
            found, members = await self.store.sync(self.node_id, key, deadline,
                                                   self._ttl_ms, departed, present)
            if key in rooms:
                stale.extend((key, c, n) for c, n in events.reconcile(key, found, members))
        if stale:
            # Gone from the store: left while we could not hear it, if their node has
            # written itself back (its heartbeat is set last); else the dead-node check.
            nodes = sorted({node for _, _, node in stale})
            beats = await self.store.alive(nodes)
            living = {node for node, beat in zip(nodes, beats, strict=True) if beat}
            for key, connection_id, node in stale:
                if node in living:
                    events.remote_left(key, connection_id)

    # -- heartbeat and dead nodes -------------------------------------------------------

    def _beat(self) -> Deferred[None] | None:
        if self.state != "connected" or self.full:
            return None
        return Deferred.fromCoroutine(self._beat_and_check()).addErrback(self._beat_failed)

    def _beat_failed(self, failure: Any) -> None:
        self._log.info("heartbeat failed: {problem}", problem=failure.getErrorMessage())

    async def _beat_and_check(self) -> None:
        alive = await self.store.heartbeat(self.node_id, int(self.dead_after * 1000))
        if self._connected_at is None or self.state != "connected":
            return
        if not alive:
            self._log.warn("this node's heartbeat had expired: writing its members back")
            self._found_stale()
            return
        if self.clock.seconds() - self._connected_at < self.dead_after:
            return  # after an outage, give every node time to write itself back
        nodes = sorted(self._events.remote_nodes())
        if not nodes:
            return
        beats = await self.store.alive(nodes)
        for node, beat in zip(nodes, beats, strict=True):
            if not beat and self.state == "connected":
                self.stats.deadNodesSeen += 1
                self._log.warn("node {node} is dead: its members leave", node=node)
                self._events.node_died(node)
                try:
                    self.store.reap(node).addErrback(lambda failure: None)
                except ConnectionError:
                    pass  # another node, or the keys' own expiry, cleans up
