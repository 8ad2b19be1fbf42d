"""A load generator worker: one process, one event loop, many relay connections.

The parent (`runner.Generator`) sends commands over a multiprocessing pipe, one at a
time; every command gets exactly one reply (a dict), ``{"error": ...}`` if it failed.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import traceback
from collections import Counter
from multiprocessing.connection import Connection
from time import monotonic_ns
from typing import Any

from iw_relay.bench.wsclient import (
    CONNECT_ERRORS,
    BenchClient,
    Tally,
    describe_failure,
    open_client,
)

TICK_S = 0.002  # how often a sending worker tops its senders up to the target rate
# The sending loop is behind (the generator is a bottleneck) when a tick comes this late.
LAG_GAP_MS = 50.0


def bench_message(step: int, pad: bytes) -> bytes:
    """The payload a sender sends: its send time in ns of CLOCK_MONOTONIC (the same clock
    for every process of the machine) and the step it belongs to."""
    return b'{"type":"bench","s":%d,"t":%d%s}' % (step, monotonic_ns(), pad)


def padding(size: int) -> bytes:
    return b',"p":"' + b"x" * size + b'"' if size > 0 else b""


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind in ("uvloop", "auto"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def main(conn: Connection, index: int, loop_kind: str) -> None:
    """Process entry point."""
    loop = new_loop(loop_kind)
    asyncio.set_event_loop(loop)
    worker = Worker(conn, index)
    try:
        loop.run_until_complete(worker.serve())
    finally:
        loop.close()


class Worker:
    def __init__(self, conn: Connection, index: int) -> None:
        self.conn = conn
        self.index = index
        self.tally = Tally()
        self.clients: list[BenchClient] = []

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue[Any] = asyncio.Queue()

        def read_commands() -> None:
            """A thread doing blocking reads: a large command arrives in several pieces,
            and an event loop's reader would find the pipe non-blocking mid-message."""
            while True:
                try:
                    command = self.conn.recv()
                except (EOFError, OSError):  # the parent went away
                    command = {"op": "exit"}
                loop.call_soon_threadsafe(commands.put_nowait, command)
                if command.get("op") == "exit":
                    return

        threading.Thread(target=read_commands, name="commands", daemon=True).start()
        while True:
            command = await commands.get()
            op = command.pop("op")
            if op == "exit":
                for client in self.clients:
                    client.abort()
                self._reply({"ok": True})
                return
            try:
                reply = await getattr(self, f"op_{op}")(**command)
            except Exception as problem:  # reported to the parent, which stops the run
                reply = {"error": f"{type(problem).__name__}: {problem}",
                         "traceback": traceback.format_exc()}
            self._reply(reply)

    def _reply(self, reply: dict[str, Any]) -> None:
        try:
            self.conn.send(reply)
        except (BrokenPipeError, OSError):
            sys.exit(0)

    async def op_ping(self) -> dict[str, Any]:
        return {"pid": os.getpid()}

    # -- connections ----------------------------------------------------------------

    async def _open(self, url: str, host_header: str, room: str, room_size: int,
                    sender: bool) -> BenchClient:
        tally = self.tally
        return await open_client(
            url, host_header, lambda: BenchClient(tally, room, room_size, sender))

    async def op_connect(self, specs: list[tuple[str, str, str, int, bool]], inflight: int,
                         timeout: float) -> dict[str, Any]:
        """Open one connection per spec (url, Host header, room, room size, sender), at
        most `inflight` handshakes at a time; time each from TCP connect to
        ``connected``. Failures are counted by reason (HTTP status, close code...)."""
        latencies: list[int] = []
        problems: Counter[str] = Counter()
        opened: list[BenchClient] = []
        waiting = iter(specs)

        async def lane() -> None:
            """One handshake after another; `inflight` lanes share the specs."""
            for spec in waiting:
                started = monotonic_ns()
                try:
                    async with asyncio.timeout(timeout):
                        client = await self._open(*spec)
                except CONNECT_ERRORS as problem:
                    problems[describe_failure(problem)] += 1
                    continue
                latencies.append(monotonic_ns() - started)
                opened.append(client)

        # The cyclic collector would walk every client held, again and again, while the
        # handshakes create objects (a tenth of the generator's CPU in a connect step):
        # it waits until the step is over. What a step allocates is bounded by its specs.
        gc.disable()
        started = monotonic_ns()
        try:
            await asyncio.gather(*(lane() for _ in range(min(max(1, inflight), len(specs)))))
        finally:
            elapsed = (monotonic_ns() - started) / 1e9
            gc.enable()
        self.clients.extend(opened)
        return {"connected": len(opened), "failed": sum(problems.values()),
                "problems": dict(problems), "elapsed_s": elapsed, "latencies": latencies}

    async def op_settle(self, timeout: float) -> dict[str, Any]:
        """Wait until every connection has heard its room is full (``userCount``), so
        the join notices are all out of the way before a step."""
        deadline = monotonic_ns() + int(timeout * 1e9)
        while True:
            pending = sum(1 for c in self.clients if c.user_count < c.room_size)
            if not pending or monotonic_ns() >= deadline:
                return {"settled": not pending, "pending": pending}
            await asyncio.sleep(0.01)

    async def op_close(self, timeout: float) -> dict[str, Any]:
        """Close every connection (closing handshake); abort those still open at the end."""
        clients, self.clients = self.clients, []
        for client in clients:
            client.close()
        waiting = [client.closed for client in clients if not client.closed.done()]
        aborted = 0
        if waiting:
            _, still = await asyncio.wait(waiting, timeout=timeout)
            if still:
                for client in clients:
                    if not client.closed.done():
                        client.abort()
                        aborted += 1
                await asyncio.wait(still, timeout=1.0)
        return {"closed": len(clients) - aborted, "aborted": aborted}

    # -- a sending step -------------------------------------------------------------

    async def op_step(self, step: int, rate: float, duration: float, start_ns: int,
                      pad: int) -> dict[str, Any]:
        """Send `rate` messages/s from every sender for `duration` seconds from
        `start_ns`, round-robin, topped up every TICK_S."""
        self.tally.reset(step)
        for client in self.clients:
            client.sent = 0
            client.received = 0
        senders = [c for c in self.clients if c.sender]
        delay = (start_ns - monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        extra = padding(pad)
        count = len(senders)
        total = int(rate * count * duration)
        per_ns = rate * count / 1e9
        begin = monotonic_ns()
        end = begin + int(duration * 1e9)
        sent = 0
        cursor = 0
        max_gap = 0
        last = begin
        while count:
            now = monotonic_ns()
            max_gap = max(max_gap, now - last)
            last = now
            due = total if now >= end else min(total, int(per_ns * (now - begin)))
            for _ in range(due - sent):
                client = senders[cursor]
                cursor += 1
                if cursor == count:
                    cursor = 0
                client.send(b'{"type":"bench","s":%d,"t":%d%s}' % (step, monotonic_ns(), extra))
                client.sent += 1
            sent = due
            if now >= end:
                break
            await asyncio.sleep(min(TICK_S, (end - now) / 1e9))
        overrun_ms = (monotonic_ns() - end) / 1e6 if count else 0.0
        if not count and end > monotonic_ns():
            await asyncio.sleep((end - monotonic_ns()) / 1e9)
        by_room: dict[str, int] = {}
        for client in senders:
            by_room[client.room] = by_room.get(client.room, 0) + client.sent
        max_gap_ms = max_gap / 1e6
        return {"sent": sent, "sent_by_room": by_room, "max_gap_ms": max_gap_ms,
                "overrun_ms": overrun_ms,
                "lagging": max_gap_ms > LAG_GAP_MS or overrun_ms > LAG_GAP_MS}

    async def op_drain(self, sent_by_room: dict[str, int], timeout: float) -> dict[str, Any]:
        """Wait (at most `timeout`) until every connection got every message its room's
        other members sent in the step; report counts and latencies."""
        waits: list[asyncio.Future[None]] = []
        expected = 0
        for client in self.clients:
            want = sent_by_room.get(client.room, 0) - client.sent
            expected += want
            if client.received < want and not client.closed.done():
                waits.append(client.wait_received(want))
        if waits:
            _, still = await asyncio.wait(waits, timeout=timeout)
            for waiter in still:
                waiter.cancel()
        return self._tally_reply(expected)

    def _tally_reply(self, expected: int) -> dict[str, Any]:
        tally = self.tally
        return {"expected": expected, "received": tally.received, "stale": tally.stale,
                "errors": tally.errors, "closed_unexpectedly": tally.closed_unexpectedly,
                "latencies": tally.latencies.tobytes()}

    # -- soak -----------------------------------------------------------------------

    async def op_soak(self, url: str, host_header: str, prefix: str, step: int,
                      cycles: int, concurrency: int, messages: int, pad: int,
                      timeout: float) -> dict[str, Any]:
        """`cycles` times, with `concurrency` at once: two connections join a fresh room,
        each sends `messages` bench messages, each waits for the other's, both leave."""
        self.tally.reset(step)
        extra = padding(pad)
        gate = asyncio.Semaphore(max(1, concurrency))
        problems: Counter[str] = Counter()
        done = 0
        connect_latencies: list[int] = []

        async def cycle(number: int) -> None:
            nonlocal done
            room = f"{prefix}-{self.index}-{step}-{number}"
            room_url = f"{url}/room/{room}"
            pair: list[BenchClient] = []
            async with gate:
                try:
                    async with asyncio.timeout(timeout):
                        for _ in range(2):
                            started = monotonic_ns()
                            pair.append(await self._open(room_url, host_header, room, 2,
                                                         True))
                            connect_latencies.append(monotonic_ns() - started)
                        for _ in range(messages):
                            for client in pair:
                                client.send(bench_message(step, extra))
                                client.sent += 1
                        await asyncio.gather(*(c.wait_received(messages) for c in pair))
                        for client in pair:
                            client.close()
                        await asyncio.gather(*(c.closed for c in pair))
                    done += 1
                except CONNECT_ERRORS as problem:
                    problems[describe_failure(problem)] += 1
                    for client in pair:
                        client.abort()

        await asyncio.gather(*(cycle(number) for number in range(cycles)))
        reply = self._tally_reply(2 * messages * cycles)
        reply.update(done=done, failed=sum(problems.values()), problems=dict(problems),
                     sent=2 * messages * cycles, connect_latencies=connect_latencies)
        return reply
