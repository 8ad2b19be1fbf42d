"""Several nodes in one process on a shared fake bus, for fast, deterministic tests.

`MemoryBus` plays Redis: the same state (deadlines, member hashes, heartbeats with
expiry on a Clock), the same atomic presence steps as the Lua scripts, and one inbox per
node. Every reply and every inbox delivery is a `callLater(0)` on the bus's clock, in the
order Redis would send them, so `clock.advance(0)` runs a whole exchange. Tests can cut
a node off (`cut`), bring it back (`restore`), or lose every key (`wipe`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from iw_relay.backplane.base import (
    encode_committed,
    encode_header,
    encode_presence,
    encode_sequenced,
)
from iw_relay.backplane.shared import (
    Claimed,
    HistoryLimits,
    Replay,
    SharedBackplane,
    StoreLink,
    StoreUnreachableError,
)
from iw_relay.config import RelayConfig
from iw_relay.recovery import RecoveryFailure, RoomHistory


class _Session:
    """A member's session as the Redis hash keeps it; `expires` plays the key's TTL."""

    def __init__(self, joined_seq: int, node: str, expires: float) -> None:
        self.generation = 0
        self.joined_seq = joined_seq
        self.away = False
        self.node = node
        self.expires = expires


class MemoryBus:
    """The shared store of N `MemoryStore` nodes."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock if clock is not None else Clock()
        self.deadlines: dict[str, tuple[float, float]] = {}  # key -> (deadline, expires)
        self.members: dict[str, dict[str, str]] = {}
        self.node_rooms: dict[str, set[str]] = {}
        self.beats: dict[str, float] = {}  # node -> when its heartbeat expires
        self.nodes: set[str] = set()
        self.stores: dict[str, MemoryStore] = {}
        #: (destination node, envelope) of every publish, for tests to count and read.
        self.published: list[tuple[str, bytes]] = []
        #: Connection recovery: room histories, sessions ((room key, connection) ->),
        #: the resume-token key.
        self.histories: dict[str, RoomHistory] = {}
        self.sessions: dict[tuple[str, str], _Session] = {}
        self.resume_key: bytes | None = None

    def settle(self) -> None:
        """Run every reply and delivery due now (and those they cause)."""
        self.clock.advance(0)

    def wipe(self) -> None:
        """Every key is lost (a Redis restart without persistence)."""
        self.deadlines.clear()
        self.members.clear()
        self.node_rooms.clear()
        self.beats.clear()
        self.nodes.clear()
        self.histories.clear()
        self.sessions.clear()

    def cut(self, node: str) -> None:
        self.stores[node]._go_down()

    def restore(self, node: str) -> None:
        self.stores[node]._go_up()

    def inject(self, node: str, envelope: bytes) -> None:
        """An envelope from anyone with access to the store, in `node`'s inbox."""
        self._send(node, envelope)

    def _send(self, node: str, envelope: bytes) -> None:
        self.published.append((node, envelope))
        store = self.stores.get(node)
        if store is not None and store.up:
            generation = store.generation
            self.clock.callLater(0, store._deliver, generation, envelope)

    def _deadline(self, key: str) -> float | None:
        found = self.deadlines.get(key)
        if found is None or found[1] <= self.clock.seconds():
            self.deadlines.pop(key, None)
            return None
        return found[0]

    def _history(self, key: str, limits: HistoryLimits) -> RoomHistory:
        history = self.histories.get(key)
        if history is None:
            history = self.histories[key] = RoomHistory(
                limits.window_ms / 1000, limits.max_messages, limits.max_bytes)
        return history

    def _session(self, key: str, connection_id: str) -> _Session | None:
        session = self.sessions.get((key, connection_id))
        if session is not None and session.expires <= self.clock.seconds():
            del self.sessions[(key, connection_id)]
            return None
        return session

    def _room_nodes(self, key: str, but: str) -> list[str]:
        return sorted({n for n in self.members.get(key, {}).values() if n != but})


class MemoryStore:
    """One node's connection to a `MemoryBus` (a `Store`)."""

    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        self.in_flight = 0
        self.up = False
        self.generation = 0
        self.node = ""
        self._link: StoreLink  # set by connect(), before anything calls it

    # -- links --------------------------------------------------------------------------

    def connect(self, node: str, link: StoreLink) -> None:
        self.node, self._link = node, link
        self.bus.stores[node] = self
        self._go_up()

    def disconnect(self) -> Deferred[Any]:
        self.up = False
        self.generation += 1
        self.bus.stores.pop(self.node, None)
        done: Deferred[Any] = Deferred()
        done.callback(None)
        return done

    def abort(self) -> None:
        self._go_down()
        self.bus.clock.callLater(0.2, self._go_up)  # reconnecting, as ClientService would

    def _go_up(self) -> None:
        if self.up or self.bus.stores.get(self.node) is not self:
            return
        self.up = True
        self.generation += 1
        self.in_flight = 0
        self.bus.clock.callLater(0, self._announce, self.generation)

    def _announce(self, generation: int) -> None:
        if self.up and generation == self.generation:
            self._link.linked()

    def _go_down(self) -> None:
        if not self.up:
            return
        self.up = False
        self.generation += 1
        self._link.unlinked()

    def _deliver(self, generation: int, envelope: bytes) -> None:
        if self.up and generation == self.generation:
            self._link.received(envelope)

    def _reply(self, result: Any) -> Deferred[Any]:
        """The answer, one turn later, unless the link drops meanwhile."""
        if not self.up:
            return fail(StoreUnreachableError("the bus is not connected"))
        self.in_flight += 1
        done: Deferred[Any] = Deferred()
        generation = self.generation

        def answer() -> None:
            if generation != self.generation:
                done.errback(StoreUnreachableError("connection lost"))
                return
            self.in_flight -= 1
            done.callback(result)

        self.bus.clock.callLater(0, answer)
        return done

    def _check(self) -> None:
        if not self.up:
            raise StoreUnreachableError("the bus is not connected")

    # -- commands (what the Lua scripts do, in Python) ------------------------------------

    def publish(self, node: str, envelope: bytes) -> None:
        self._check()
        self.bus._send(node, envelope)
        self._reply(1).addErrback(lambda failure: None)  # counted until the next turn

    def join(self, node: str, key: str, connection_id: str, deadline: float, ttl_ms: int,
             max_size: int) -> Deferred[Any]:
        self._check()
        bus = self.bus
        header = encode_header(node)
        members = bus.members.setdefault(key, {})
        if max_size and len(members) >= max_size:
            bus._send(node, header + encode_presence(b"f", key, connection_id))
            return self._reply(0)
        found = bus._deadline(key)
        if found is None or not members:
            found = deadline
            bus.deadlines[key] = (deadline, bus.clock.seconds() + ttl_ms / 1000)
            members.clear()
        snapshot = dict(members)
        members[connection_id] = node
        bus.node_rooms.setdefault(node, set()).add(key)
        for other in bus._room_nodes(key, node):
            bus._send(other, header + encode_presence(b"j", key, connection_id))
        bus._send(node, header + encode_committed(key, connection_id, found, snapshot))
        return self._reply(1)

    def leave(self, node: str, key: str, connection_id: str) -> Deferred[Any]:
        self._check()
        bus = self.bus
        members = bus.members.get(key, {})
        if members.get(connection_id) == node:
            del members[connection_id]
        if not members:
            bus.deadlines.pop(key, None)
            bus.members.pop(key, None)
        for other in bus._room_nodes(key, node):
            bus._send(other, encode_header(node) + encode_presence(b"l", key, connection_id))
        return self._reply(1)

    def expire(self, node: str, key: str) -> Deferred[Any]:
        self._check()
        bus = self.bus
        others = bus._room_nodes(key, node)
        bus.deadlines.pop(key, None)
        bus.members.pop(key, None)
        for other in others:
            bus._send(other, encode_header(node) + encode_presence(b"x", key))
        return self._reply(1)

    def sync(self, node: str, key: str, deadline: float, ttl_ms: int, departed: list[str],
             present: list[str]) -> Deferred[tuple[float | None, dict[str, str]]]:
        self._check()
        bus = self.bus
        members = bus.members.setdefault(key, {})
        changes = []
        for connection_id in departed:
            if members.get(connection_id) == node:
                del members[connection_id]
            changes.append(encode_presence(b"l", key, connection_id))
        found = bus._deadline(key)
        if present:
            if found is None or not members:
                found = deadline
                bus.deadlines[key] = (deadline, bus.clock.seconds() + ttl_ms / 1000)
            for connection_id in present:
                members[connection_id] = node
                changes.append(encode_presence(b"j", key, connection_id))
            bus.node_rooms.setdefault(node, set()).add(key)
        elif not members:
            bus.deadlines.pop(key, None)
        if changes:
            for other in bus._room_nodes(key, node):
                bus._send(other, encode_header(node) + b"".join(changes))
        snapshot = dict(members)
        if not members:
            bus.members.pop(key, None)
        return self._reply((found, snapshot))

    def heartbeat(self, node: str, ttl_ms: int) -> Deferred[bool]:
        self._check()
        bus = self.bus
        alive = bus.beats.get(node, 0) > bus.clock.seconds()
        bus.beats[node] = bus.clock.seconds() + ttl_ms / 1000
        bus.nodes.add(node)
        return self._reply(alive)

    def alive(self, nodes: list[str]) -> Deferred[list[bool]]:
        self._check()
        now = self.bus.clock.seconds()
        return self._reply([self.bus.beats.get(n, 0) > now for n in nodes])

    def reap(self, node: str) -> Deferred[Any]:
        self._check()
        bus = self.bus
        if node not in bus.nodes or bus.beats.get(node, 0) > bus.clock.seconds():
            return self._reply(0)
        bus.nodes.discard(node)
        for key in bus.node_rooms.pop(node, set()):
            members = bus.members.get(key, {})
            for connection_id in [c for c, n in members.items() if n == node]:
                del members[connection_id]
            if not members:
                bus.members.pop(key, None)
                bus.deadlines.pop(key, None)
        return self._reply(1)

    def forget(self, node: str) -> Deferred[Any]:
        self._check()
        self.bus.beats.pop(node, None)
        return self._reply(1)


    # -- connection recovery: what session_*.lua, sequence.lua, history_since.lua do -----

    def sequence(self, node: str, key: str, batch: list[Any],
                 limits: HistoryLimits) -> Deferred[Any]:
        self._check()
        bus = self.bus
        history = bus._history(key, limits)
        members = bus.members.get(key, {})
        envelopes: dict[str, list[bytes]] = {n: [] for n in dict.fromkeys(members.values())}
        now = bus.clock.seconds()
        for at in range(0, len(batch), 3):
            sender, target, payload = batch[at:at + 3]
            entry = history.append(payload, sender, target or None, now)
            encoded = encode_sequenced(key, entry.seq, sender, target, entry.frame)
            for other in envelopes if not target else [members.get(target)]:
                if other in envelopes:
                    envelopes[other].append(encoded)
        for other, entries in envelopes.items():
            if entries:
                bus._send(other, encode_header(node) + b"".join(entries))
        return self._reply(history.last_seq)

    def open_session(self, node: str, key: str, connection_id: str,
                     limits: HistoryLimits) -> Deferred[tuple[str, int]]:
        self._check()
        bus = self.bus
        history = bus._history(key, limits)
        bus.sessions[(key, connection_id)] = _Session(
            history.last_seq, node, bus.clock.seconds() + limits.head_ttl_ms / 1000)
        return self._reply((history.epoch, history.last_seq))

    def drop_session(self, node: str, key: str, connection_id: str, grace: bool,
                     limits: HistoryLimits) -> Deferred[Any]:
        self._check()
        session = self.bus._session(key, connection_id)
        if session is not None and session.node == node:
            if grace:
                session.away = True
                session.expires = self.bus.clock.seconds() + limits.window_ms / 1000
            else:
                del self.bus.sessions[(key, connection_id)]
        return self._reply(None)

    def claim_session(self, node: str, key: str, connection_id: str, generation: int,
                      limits: HistoryLimits) -> Deferred[Claimed | str]:
        self._check()
        bus = self.bus
        session = bus._session(key, connection_id)
        if session is None:
            return self._reply(RecoveryFailure.SESSION_ENDED.value)
        if session.generation != generation:
            return self._reply(RecoveryFailure.TOKEN_REUSED.value)
        session.generation += 1
        session.away, session.node = False, node
        session.expires = bus.clock.seconds() + limits.head_ttl_ms / 1000
        members = bus.members.setdefault(key, {})
        before = {c: n for c, n in members.items() if c != connection_id}
        told = bus._room_nodes(key, node)
        members[connection_id] = node
        bus.node_rooms.setdefault(node, set()).add(key)
        for other in told:
            bus._send(other, encode_header(node) + encode_presence(b"j", key, connection_id))
        return self._reply(Claimed(session.generation, session.joined_seq,
                                   bus._deadline(key), before))

    def close_session(self, node: str, key: str, connection_id: str) -> Deferred[bool]:
        self._check()
        session = self.bus._session(key, connection_id)
        if session is None:
            return self._reply(True)
        if session.node != node:
            return self._reply(False)
        del self.bus.sessions[(key, connection_id)]
        return self._reply(True)

    def history_since(self, key: str, seq: int, epoch: str, connection_id: str,
                      limits: HistoryLimits) -> Deferred[Replay | str]:
        self._check()
        history = self.bus.histories.get(key)
        if history is None:
            return self._reply(RecoveryFailure.EPOCH_CHANGED.value)
        frames = history.since(seq, epoch, connection_id, self.bus.clock.seconds())
        if isinstance(frames, RecoveryFailure):
            return self._reply(frames.value)
        return self._reply(Replay(history.last_seq, frames))

    def resume_key(self, candidate: bytes) -> Deferred[bytes]:
        self._check()
        if self.bus.resume_key is None:
            self.bus.resume_key = candidate
        return self._reply(self.bus.resume_key)


def memory_backplane(bus: MemoryBus, config: RelayConfig, node_id: str) -> SharedBackplane:
    """A node on `bus`; its time (heartbeats, batching) is the bus's clock."""
    return SharedBackplane(
        MemoryStore(bus), node_id, bus.clock, bus.clock, heartbeat=config.node_heartbeat,
        queue_size=config.redis_queue_size, max_payload=config.max_message_size,
        room_expiry=config.room_expiry, name="memory")
