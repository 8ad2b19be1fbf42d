"""What a member is sent: one write per reactor turn, a bounded backlog, slow consumers.

- Frames for a member are gathered during a reactor turn and written together at its
  end (`TurnFlusher`): one write per member however many messages reached it.
- Except in a turn with one ready socket (the lean dispatch's `TurnState.single`; one
  room of 200: each message arrives in a turn of its own), where nothing else can add
  a frame for a member: a relayed frame then goes straight to each member with nothing
  queued (`RelayServerFactory.write_through` for a fan-out, `deliver` for one member),
  and is queued behind what is, as in any other turn. Only the turn's first message:
  the rest of a burst that arrived in the same read is gathered (two writes per member
  at most, not one per message).
- The member is the producer registered on its own transport: Twisted pauses it when
  the socket's buffer passes 64 KiB (the peer is not reading). While paused, frames
  wait in a backlog; a backlog over --max-send-buffer makes the member a slow consumer
  (the protocol closes it with 1013), so one stalled reader never makes the server
  buffer without bound. Everything sent to a member goes through here: relayed
  messages, replies to it, and pongs.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from iw_relay._autobahn import STATE_CLOSED, end_of_turn, write_now


class TurnFlusher:
    """Writes what members queued, once, at the end of the current reactor turn."""

    _log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._run_after_turn = end_of_turn(clock)
        #: The members with frames to write this turn (Outbox.enqueue adds to it).
        self.dirty: list[Outbox] = []

    def flush_later(self) -> None:
        """Called by the first member added to `dirty` this turn."""
        self._run_after_turn(self._flush)

    def _flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for member in dirty:
            try:
                member.flush_outbox()
            except Exception:
                self._log.failure("sending to {connection_id} failed",
                                  connection_id=getattr(member, "connection_id", ""))


_PAUSED: tuple[()] = ()


@implementer(IPushProducer)
class Outbox:
    """Mixed into the protocol (no object of its own per connection: memory counts).

    The protocol provides `transport`, Autobahn's `state` (nothing is written once it
    is STATE_CLOSED), `factory.flusher` (the TurnFlusher its factory's connections
    share: read on every send, and Python 3.11 reads an instance's attribute faster
    than its class's), `max_send_buffer` (a class attribute) and `slow_consumer()`.
    """

    transport: Any
    state: int
    factory: Any
    max_send_buffer: int
    _paused = False
    #: Frames waiting for the end of this reactor turn; _PAUSED while the peer is not
    #: reading (so that enqueue, once per delivery, reads one attribute, not two).
    _outbox: list[bytes] | tuple[()] | None = None
    _backlog: list[bytes] | None = None
    _backlog_bytes = 0

    def slow_consumer(self) -> None:
        raise NotImplementedError

    def watch_send_buffer(self) -> None:
        """Become the transport's producer (under twisted.web's WebSocketResource the
        HTTP channel still is)."""
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)

    def enqueue(self, data: bytes) -> None:
        """Send `data` after everything queued before it, within the backlog limit."""
        outbox = self._outbox
        if outbox is None:
            self._outbox = [data]
            # TurnFlusher.flush_later's bookkeeping, inlined: once per delivery.
            flusher = self.factory.flusher
            dirty = flusher.dirty
            if not dirty:
                flusher.flush_later()
            dirty.append(self)
            return
        if isinstance(outbox, list):
            outbox.append(data)
            return
        if self._backlog is None:  # already over the limit: the member is closing
            return
        self._backlog.append(data)
        self._backlog_bytes += len(data)
        if self._backlog_bytes > self.max_send_buffer:
            self._backlog, self._backlog_bytes = None, 0
            self.slow_consumer()

    def flush_outbox(self) -> None:
        """Write this turn's frames in one go (plain TCP: straight to the socket)."""
        outbox = self._outbox
        if outbox:  # not None, not _PAUSED: this turn's frames
            self._outbox = None
            if self.state != STATE_CLOSED:
                write_now(self.transport,
                          outbox[0] if len(outbox) == 1 else b"".join(outbox))

    # -- IPushProducer: Twisted tells us when the peer's socket buffer is full ----------

    def pauseProducing(self) -> None:
        """The peer's socket buffer is full (called again on every write while it is)."""
        if not self._paused:
            self._paused = True
            pending, self._outbox = self._outbox, _PAUSED
            # Frames not written yet wait in the backlog, before what follows them.
            self._backlog = list(pending) if pending else []
            self._backlog_bytes = sum(map(len, self._backlog))

    def resumeProducing(self) -> None:
        self._paused = False
        if self._outbox is _PAUSED:
            self._outbox = None
        backlog, self._backlog, self._backlog_bytes = self._backlog, None, 0
        if backlog and self.state != STATE_CLOSED:
            self.transport.write(b"".join(backlog))

    def stopProducing(self) -> None:
        self._backlog, self._backlog_bytes = None, 0

