"""The parent process: worker processes, the scenarios' steps, server readings.

The parent keeps no connection itself: it hands connection specs to the workers, starts
each step at the same CLOCK_MONOTONIC instant in all of them, reads the server's /proc
figures around the step, and merges what the workers measured into a StepReport.
"""

from __future__ import annotations

import ipaddress
import json
import math
import multiprocessing
import os
import secrets
import socket
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from time import monotonic_ns
from typing import Any, cast
from urllib.parse import urlsplit
from urllib.request import urlopen

from iw_relay.bench import procstat, worker
from iw_relay.bench.stats import (
    ProcessUsage,
    StepReport,
    expected_deliveries,
    latency_summary,
    median,
    saturation,
)

LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")
# The original relay's hard limit is 100 messages/s per connection; stay below it.
FAIR_RATE_LIMIT = 90.0
START_LEAD_S = 0.1  # a step starts this long after the parent hands it out
REPLY_MARGIN_S = 30.0  # how much longer than its own bound a worker may take to reply


class BenchError(Exception):
    """A run that cannot go on: a bad target, a worker failure, the deadline."""


# -- target -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str  # the address to connect to
    port: int
    host_header: str
    base: str  # path prefix before /room/{id}

    def path(self, room: str) -> str:
        return f"{self.base}/room/{room}"

    @property
    def base_url(self) -> str:
        """ws:// URL of the resolved address (so every connection goes to the same one)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}{self.base}"

    def url(self, room: str) -> str:
        return f"{self.base_url}/room/{room}"


def parse_target(url: str) -> Target:
    """A ws:// URL on the loopback interface; BenchError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise BenchError(f"{url!r}: only ws:// URLs are supported")
    host = parts.hostname
    if host not in LOOPBACK_NAMES:
        raise BenchError(
            f"{url!r}: refusing to load a host that is not the loopback interface "
            f"(one of {', '.join(LOOPBACK_NAMES)})"
        )
    try:
        port = parts.port or 80
    except ValueError as problem:
        raise BenchError(f"{url!r}: {problem}") from None
    address = host
    if host == "localhost":
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [str(info[4][0]) for info in infos]
        if not addresses or not all(ipaddress.ip_address(a).is_loopback for a in addresses):
            raise BenchError(f"localhost resolves to {addresses}, not only loopback")
        address = addresses[0]
    header_host = f"[{host}]" if ":" in host else host
    return Target(address, port, f"{header_host}:{port}", parts.path.rstrip("/"))


# -- the generator's processes -------------------------------------------------------


class Generator:
    """`count` worker processes (spawned: no inherited reactor or loop), each with its
    own event loop. Commands go to all of them at once; `collect` gathers the replies."""

    def __init__(self, count: int, loop_kind: str = "auto") -> None:
        context = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes: list[Any] = []
        try:
            for index in range(count):
                parent_end, child_end = context.Pipe()
                process = context.Process(target=worker.main, name=f"iwrelay-bench-{index}",
                                          args=(child_end, index, loop_kind), daemon=True)
                process.start()
                child_end.close()
                self.conns.append(parent_end)
                self.processes.append(process)
            self.broadcast({"op": "ping"}, 60.0)  # started, modules imported
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        return len(self.conns)

    def send(self, commands: Sequence[dict[str, Any]]) -> None:
        for conn, command in zip(self.conns, commands, strict=True):
            conn.send(command)

    def collect(self, timeout: float) -> list[dict[str, Any]]:
        replies: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        index_of = {id(conn): index for index, conn in enumerate(self.conns)}
        while len(replies) < len(self.conns):
            pending = [c for i, c in enumerate(self.conns) if i not in replies]
            left = deadline - time.monotonic()
            # wait() returns some of the objects it was given: here, connections.
            ready = cast("list[Connection]", wait(pending, timeout=max(0.0, left))
                         ) if left > 0 else []
            if not ready:
                raise BenchError(f"{len(pending)} worker(s) did not answer in {timeout:.0f}s")
            for conn in ready:
                try:
                    reply = conn.recv()
                except EOFError:
                    raise BenchError("a worker process died") from None
                if "error" in reply:
                    raise BenchError(f"worker failed: {reply['error']}\n"
                                     f"{reply.get('traceback', '')}")
                replies[index_of[id(conn)]] = reply
        return [replies[index] for index in range(len(self.conns))]

    def call(self, commands: Sequence[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        self.send(commands)
        return self.collect(timeout)

    def broadcast(self, command: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        return self.call([dict(command) for _ in self.conns], timeout)

    def cpu_seconds(self) -> float:
        """CPU time of the generator: the workers and this process."""
        total = time.process_time()
        for process in self.processes:
            try:
                total += procstat.cpu_seconds(process.pid)
            except (OSError, ValueError):
                pass
        return total

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send({"op": "exit"})
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for process in self.processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(2)
        for conn in self.conns:
            conn.close()


# -- one run ------------------------------------------------------------------------


PLACEMENTS = ("room", "spread")


@dataclass
class Settings:
    """What every scenario shares (see cli.py for the meaning of each).

    Several targets are nodes of one cluster: `placement` ``room`` puts all of a room's
    members on one node (rooms round-robin over the nodes), ``spread`` spreads each
    room's members over all nodes. The CPU of every process in `server_pids` is summed.
    """

    targets: list[Target]
    workers: int = 1
    loop: str = "auto"
    server_pids: list[int] = field(default_factory=list)
    placement: str = "room"
    duration: float = 5.0
    max_steps: int = 10
    deadline: float = 600.0
    drain_timeout: float = 3.0
    connect_timeout: float = 30.0
    inflight: int = 200
    pad: int = 0
    keep_going: bool = False
    warmup: float = 0.0

    @property
    def target(self) -> Target:
        """The first (often the only) target."""
        return self.targets[0]


@dataclass
class Result:
    steps: list[StepReport] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Member:
    room: str
    room_size: int
    sender: bool
    node: int = 0  # index of the target (relay node) this member connects to


def failure_line(failed: int, total: int, problems: dict[str, int]) -> str:
    """One line saying how many connections failed and why, commonest reason first."""
    reasons = ", ".join(f"{reason} x{count}" for reason, count in
                        sorted(problems.items(), key=lambda item: (-item[1], item[0])))
    return f"REFUSED: {failed} of {total} connections failed: {reasons or 'no reason given'}"


class Run:
    """A generator, a server to read, a deadline, and where step reports go."""

    def __init__(self, settings: Settings, report: Callable[[StepReport], None]) -> None:
        self.settings = settings
        self.report = report
        self.started = time.monotonic()
        self.tag = secrets.token_hex(3)
        self.generator: Generator | None = None
        self.step_number = 0

    @contextmanager
    def running(self) -> Iterator[Run]:
        self.generator = Generator(self.settings.workers, self.settings.loop)
        try:
            yield self
        finally:
            self.generator.close()

    @property
    def gen(self) -> Generator:
        assert self.generator is not None
        return self.generator

    def left(self) -> float:
        return self.settings.deadline - (time.monotonic() - self.started)

    def bounded(self, wanted: float) -> float:
        """`wanted` seconds, or what is left before the deadline if less."""
        left = self.left()
        if left <= 0:
            raise BenchError(f"overall deadline of {self.settings.deadline:g}s reached")
        return min(wanted, left)

    def server_sample(self) -> list[procstat.Sample] | None:
        """One reading of every server process (None when no PID was given)."""
        if not self.settings.server_pids:
            return None
        samples = []
        for pid in self.settings.server_pids:
            try:
                samples.append(procstat.Sample.of(pid))
            except (OSError, ValueError) as problem:
                raise BenchError(f"cannot read the server process {pid}: {problem}") from None
        return samples

    def usage(self, before: list[procstat.Sample] | None,
              after: list[procstat.Sample] | None) -> ProcessUsage | None:
        """The servers' CPU summed over every PID, and their RSS summed."""
        if before is None or after is None:
            return None
        return ProcessUsage(
            sum(a.cpu_s - b.cpu_s for a, b in zip(after, before, strict=True)),
            max(a.at for a in after) - min(b.at for b in before),
            sum(a.rss or 0 for a in after), sum(b.rss or 0 for b in before))

    def per_server(self, before: list[procstat.Sample] | None,
                   after: list[procstat.Sample] | None) -> list[dict[str, Any]]:
        """Each server's own CPU and RSS over a step (shown when there are several)."""
        if before is None or after is None or len(before) < 2:
            return []
        return [{"pid": pid, "cpu_s": round(a.cpu_s - b.cpu_s, 4),
                 "cpu_percent": round(100 * (a.cpu_s - b.cpu_s) / (a.at - b.at), 1)
                 if a.at > b.at else None, "rss_bytes": a.rss}
                for pid, b, a in zip(self.settings.server_pids, before, after, strict=True)]

    def measure_servers(self, step: StepReport, before: list[procstat.Sample] | None,
                        after: list[procstat.Sample] | None) -> None:
        step.server = self.usage(before, after)
        servers = self.per_server(before, after)
        if servers:
            step.extra["servers"] = servers

    def generator_usage(self, cpu_before: float, at_before: float) -> ProcessUsage:
        return ProcessUsage(self.gen.cpu_seconds() - cpu_before, time.monotonic() - at_before)

    def next_step(self) -> int:
        self.step_number += 1
        return self.step_number

    # -- connections ----------------------------------------------------------------

    def room_name(self, number: int) -> str:
        return f"bench-{self.tag}-{number}"

    def connect(self, members: Sequence[Member], inflight: int | None = None
                ) -> dict[str, Any]:
        """Open a connection per member (to its node), spread over the workers
        round-robin. `problems` counts the failures by reason."""
        settings = self.settings
        targets = settings.targets
        workers = self.gen.size
        inflight = settings.inflight if inflight is None else inflight
        specs: list[list[tuple[str, str, str, int, bool]]] = [[] for _ in range(workers)]
        for index, member in enumerate(members):
            target = targets[member.node]
            specs[index % workers].append(
                (target.url(member.room), target.host_header, member.room,
                 member.room_size, member.sender))
        timeout = self.bounded(settings.connect_timeout)
        replies = self.gen.call([
            {"op": "connect", "specs": spec, "inflight": math.ceil(inflight / workers),
             "timeout": timeout}
            for spec in specs
        ], timeout + REPLY_MARGIN_S)
        latencies = [value for reply in replies for value in reply["latencies"]]
        problems: dict[str, int] = {}
        for reply in replies:
            for reason, count in reply["problems"].items():
                problems[reason] = problems.get(reason, 0) + count
        return {
            "connected": sum(r["connected"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "problems": problems,
            "elapsed_s": max(r["elapsed_s"] for r in replies),
            "latencies": latencies,
        }

    def settle(self, timeout: float = 30.0) -> bool:
        timeout = self.bounded(timeout)
        replies = self.gen.broadcast({"op": "settle", "timeout": timeout},
                                     timeout + REPLY_MARGIN_S)
        return all(reply["settled"] for reply in replies)

    def close_all(self, timeout: float = 10.0) -> dict[str, int]:
        replies = self.gen.broadcast({"op": "close", "timeout": timeout},
                                     timeout + REPLY_MARGIN_S)
        return {"closed": sum(r["closed"] for r in replies),
                "aborted": sum(r["aborted"] for r in replies)}

    # -- a sending step -------------------------------------------------------------

    def sending_step(self, scenario: str, members: Sequence[Member], rate: float,
                     duration: float | None = None) -> StepReport:
        settings = self.settings
        duration = settings.duration if duration is None else duration
        self.bounded(duration + settings.drain_timeout)  # enough time left to start?
        number = self.next_step()
        start_ns = monotonic_ns() + int(START_LEAD_S * 1e9)
        self.gen.send([{"op": "step", "step": number, "rate": rate, "duration": duration,
                        "start_ns": start_ns, "pad": settings.pad}
                       for _ in range(self.gen.size)])
        time.sleep(max(0.0, (start_ns - monotonic_ns()) / 1e9))
        server_before = self.server_sample()
        gen_cpu, gen_at = self.gen.cpu_seconds(), time.monotonic()
        sent_replies = self.gen.collect(duration + START_LEAD_S + REPLY_MARGIN_S)
        sent_by_room: dict[str, int] = {}
        for reply in sent_replies:
            for room, count in reply["sent_by_room"].items():
                sent_by_room[room] = sent_by_room.get(room, 0) + count
        drained = self.gen.broadcast(
            {"op": "drain", "sent_by_room": sent_by_room, "timeout": settings.drain_timeout},
            settings.drain_timeout + REPLY_MARGIN_S,
        )
        server_after = self.server_sample()
        generator = self.generator_usage(gen_cpu, gen_at)
        room_sizes = {m.room: m.room_size for m in members}
        latencies = array("q")
        for reply in drained:
            latencies.frombytes(reply["latencies"])
        rooms = {m.room for m in members}
        report = StepReport(
            scenario=scenario, step=number, duration_s=duration,
            connections=len(members), rooms=len(rooms),
            senders=sum(1 for m in members if m.sender), rate_per_sender=rate,
            sent=sum(r["sent"] for r in sent_replies),
            expected=expected_deliveries(sent_by_room, room_sizes),
            delivered=sum(r["received"] for r in drained),
            stale=sum(r["stale"] for r in drained),
            errors=sum(r["errors"] for r in drained),
            failures=sum(r["closed_unexpectedly"] for r in drained),
            latency_ms=latency_summary(latencies), generator=generator,
            generator_lagging=any(r["lagging"] for r in sent_replies),
        )
        self.measure_servers(report, server_before, server_after)
        report.extra["send_max_gap_ms"] = round(max(r["max_gap_ms"] for r in sent_replies), 2)
        return report


# -- scenarios ----------------------------------------------------------------------


def place(placement: str, nodes: int, room_number: int, position: int) -> int:
    """The node of a room's `position`-th member: ``room`` keeps a room on one node
    (rooms round-robin over the nodes); ``spread`` deals a room's members over all the
    nodes (the first member of each room on a different node, so nodes load evenly)."""
    if placement == "room":
        return room_number % nodes
    if placement == "spread":
        return (room_number + position) % nodes
    raise BenchError(f"unknown placement {placement!r} (one of {', '.join(PLACEMENTS)})")


def room_members(run: Run, clients: int, rooms: int, senders_per_room: int | None
                 ) -> list[Member]:
    """`clients` members spread evenly over `rooms` rooms; the first `senders_per_room`
    of each room send (all of them when None); each member placed on a node."""
    if rooms < 1 or clients < rooms:
        raise BenchError(f"{clients} clients cannot fill {rooms} rooms")
    sizes = [clients // rooms + (1 if r < clients % rooms else 0) for r in range(rooms)]
    nodes = len(run.settings.targets)
    placement = run.settings.placement
    members: list[Member] = []
    for number, size in enumerate(sizes):
        room = run.room_name(number)
        senders = size if senders_per_room is None else min(size, senders_per_room)
        members.extend(Member(room, size, position < senders,
                              place(placement, nodes, number, position))
                       for position in range(size))
    return members


def rate_schedule(rates: Sequence[float] | None, start: float, factor: float, step: float,
                  max_rate: float, max_steps: int) -> list[float]:
    """Per-sender rates: the explicit list, else start, start*factor (or +step)... up to
    max_rate (which is always the last one if the ramp passes it), at most max_steps."""
    if rates:
        return list(rates)[:max_steps]
    schedule: list[float] = []
    rate = start
    while len(schedule) < max_steps:
        if rate >= max_rate:
            schedule.append(max_rate)
            break
        schedule.append(round(rate, 3))
        rate = rate * factor if step <= 0 else rate + step
    return schedule


def deliveries_per_message(members: Sequence[Member]) -> int:
    """Deliveries per round of one message from every sender."""
    return sum(m.room_size - 1 for m in members if m.sender)


def run_rooms(settings: Settings, report: Callable[[StepReport], None], scenario: str,
              clients: int, rooms: int, senders_per_room: int | None,
              rates: Sequence[float] | None = None,
              target_deliveries: Sequence[float] | None = None,
              ramp: tuple[float, float, float, float] = (5.0, 1.5, 0.0, FAIR_RATE_LIMIT),
              ) -> Result:
    """fanout and bigroom: join, settle, then steps of rising rate until saturation."""
    run = Run(settings, report)
    result = Result()
    with run.running():
        members = room_members(run, clients, rooms, senders_per_room)
        per_round = deliveries_per_message(members)
        if target_deliveries:
            rates = [round(target / per_round, 4) for target in target_deliveries]
        schedule = rate_schedule(rates, *ramp, settings.max_steps)
        joined = run.connect(members)
        if joined["failed"]:
            run.close_all()
            result.summary = {
                "kind": "summary", "scenario": scenario, "clients": clients,
                "rooms": rooms, "stopped": "connections failed",
                "refused": joined["problems"], "failed": joined["failed"],
                "refusal": failure_line(joined["failed"], len(members), joined["problems"]),
                "saturation": None, "steps": 0,
            }
            return result
        settled = run.settle()
        stopped = "all steps done"
        if settings.warmup > 0 and schedule and run.left() > settings.warmup + 10:
            # Not reported: caches, JITs and socket buffers warm up at the first rate.
            run.sending_step(scenario, members, schedule[0], settings.warmup)
        for rate in schedule:
            if run.left() < settings.duration + settings.drain_timeout:
                stopped = "overall deadline"
                break
            step = run.sending_step(scenario, members, rate)
            step.extra["settled"] = settled
            result.steps.append(step)
            report(step)
            if settings.keep_going:
                continue
            if not step.ok:
                stopped = "saturated"
                if step.generator_lagging:
                    stopped += " (the generator lagged too: it may be the bottleneck)"
                break
            if step.generator_lagging:
                stopped = "the generator could not keep up (it is the bottleneck)"
                break
        run.close_all()
    best = saturation(result.steps)
    result.summary = {
        "kind": "summary", "scenario": scenario, "clients": clients, "rooms": rooms,
        "senders": sum(1 for m in members if m.sender), "deliveries_per_round": per_round,
        "stopped": stopped, "steps": len(result.steps),
        "saturation": None if best is None else {
            "step": best.step, "rate_per_sender": best.rate_per_sender,
            "offered_msgs_per_s": round(best.offered_per_s, 1),
            "delivered_per_s": round(best.delivered_per_s, 1),
            "p99_ms": _maybe_round(best.latency_ms.get("p99"), 3),
            "server_cpu_us_per_delivery": _maybe_round(best.server_cpu_us_per_unit),
            "reached": stopped.startswith("saturated"),
        },
    }
    return result


def run_idle(settings: Settings, report: Callable[[StepReport], None], clients: int,
             rooms: int, hold: float) -> Result:
    """Hold `clients` connections over `rooms` rooms, added in `max_steps` equal parts;
    after each part the server's RSS growth over its reading before the first one,
    divided by the connections held, is the memory per idle connection."""
    run = Run(settings, report)
    result = Result()
    with run.running():
        members = room_members(run, clients, rooms, None)
        members = [Member(m.room, m.room_size, False, m.node) for m in members]
        baseline = run.server_sample()
        baseline_rss = sum(s.rss or 0 for s in baseline) if baseline else None
        parts = max(1, min(settings.max_steps, clients))
        held = 0
        previous_rss = baseline_rss
        for part in range(parts):
            chunk = members[part * clients // parts:(part + 1) * clients // parts]
            number = run.next_step()
            server_before = run.server_sample()
            gen_cpu, gen_at = run.gen.cpu_seconds(), time.monotonic()
            joined = run.connect(chunk)
            connect_after = run.server_sample()
            held += joined["connected"]
            settled = run.settle() if part == parts - 1 else True
            if hold > 0:
                time.sleep(run.bounded(hold))
            after = run.server_sample()
            step = StepReport(
                scenario="idle", step=number, duration_s=joined["elapsed_s"],
                connections=held, rooms=len({m.room for m in members[:held]}),
                failures=joined["failed"], latency_ms=latency_summary(joined["latencies"]),
                generator=run.generator_usage(gen_cpu, gen_at),
                unit="connection", units=joined["connected"],
            )
            run.measure_servers(step, server_before, connect_after)
            step.latency_bound = False
            step.extra.update(
                conns_per_s=round(joined["connected"] / joined["elapsed_s"], 1)
                if joined["elapsed_s"] else None,
                settled=settled, problems=joined["problems"],
            )
            if joined["failed"]:
                step.extra["refusal"] = failure_line(joined["failed"], len(chunk),
                                                     joined["problems"])
            if (baseline_rss is not None and after is not None
                    and previous_rss is not None):
                rss = sum(sample.rss or 0 for sample in after)
                step.server.rss_bytes = rss  # type: ignore[union-attr]
                step.extra.update(
                    rss_baseline_bytes=baseline_rss, rss_bytes=rss,
                    bytes_per_connection=round((rss - baseline_rss) / held)
                    if held else None,
                    step_bytes_per_connection=round(
                        (rss - previous_rss) / joined["connected"])
                    if joined["connected"] else None,
                )
                previous_rss = rss
            result.steps.append(step)
            report(step)
        run.close_all()
    last = result.steps[-1] if result.steps else None
    result.summary = {
        "kind": "summary", "scenario": "idle", "clients": clients, "rooms": rooms,
        "connections_held": last.connections if last else 0,
        "bytes_per_connection": last.extra.get("bytes_per_connection") if last else None,
        "rss_baseline_bytes": baseline_rss,
        "rss_bytes": last.extra.get("rss_bytes") if last else None,
        "failed": sum(s.failures for s in result.steps),
    }
    _add_refusals(result, clients)
    return result


def run_connect(settings: Settings, report: Callable[[StepReport], None], clients: int,
                rooms: int, inflight: int) -> Result:
    """`max_steps` rounds of: open `clients` connections with `inflight` handshakes in
    flight (connections/s, handshake-to-``connected`` latency), then close them all."""
    run = Run(settings, report)
    result = Result()
    with run.running():
        for _ in range(settings.max_steps):
            if run.left() < 1:
                break
            members = room_members(run, clients, rooms, None)
            number = run.next_step()
            server_before = run.server_sample()
            gen_cpu, gen_at = run.gen.cpu_seconds(), time.monotonic()
            joined = run.connect(members, inflight)
            server_after = run.server_sample()
            generator = run.generator_usage(gen_cpu, gen_at)
            closing_started = time.monotonic()
            closed = run.close_all()
            step = StepReport(
                scenario="connect", step=number, duration_s=joined["elapsed_s"],
                connections=joined["connected"], rooms=rooms, failures=joined["failed"],
                latency_ms=latency_summary(joined["latencies"]),
                generator=generator, unit="connection", units=joined["connected"],
            )
            run.measure_servers(step, server_before, server_after)
            if joined["failed"]:
                step.extra["refusal"] = failure_line(joined["failed"], clients,
                                                     joined["problems"])
            step.latency_bound = False
            step.extra.update(
                inflight=inflight,
                conns_per_s=round(joined["connected"] / joined["elapsed_s"], 1)
                if joined["elapsed_s"] else None,
                close_s=round(time.monotonic() - closing_started, 3),
                aborted_on_close=closed["aborted"], problems=joined["problems"],
            )
            result.steps.append(step)
            report(step)
            run.tag = secrets.token_hex(3)  # fresh rooms for the next round
    rates = [s.extra["conns_per_s"] for s in result.steps if s.extra.get("conns_per_s")]
    result.summary = {
        "kind": "summary", "scenario": "connect", "clients": clients, "rooms": rooms,
        "inflight": inflight, "steps": len(result.steps),
        "median_conns_per_s": _maybe_round(median(rates)),
        "server_cpu_us_per_connection": _maybe_round(median(
            [s.server_cpu_us_per_unit for s in result.steps
             if s.server_cpu_us_per_unit is not None])),
        "failed": sum(s.failures for s in result.steps),
    }
    _add_refusals(result, clients * len(result.steps))
    return result


REGISTRY_SIZES = ("currentRooms", "currentConnections", "openWebSockets", "trackedAddresses")


def registry_sizes(targets: Sequence[Target]) -> dict[str, int] | None:
    """The relays' own counts of what they hold, from their /stats, summed over the
    nodes (None if one is unreadable).

    After a soak every one of them must be back to zero: anything left is a leak.
    """
    sizes: dict[str, int] = {}
    for target in targets:
        host = f"[{target.host}]" if ":" in target.host else target.host
        try:
            with urlopen(f"http://{host}:{target.port}{target.base}/stats",
                         timeout=5) as reply:
                stats = json.load(reply)
        except (OSError, ValueError):
            return None
        for name in REGISTRY_SIZES:
            if isinstance(stats.get(name), int):
                sizes[name] = sizes.get(name, 0) + stats[name]
    return sizes


def run_soak(settings: Settings, report: Callable[[StepReport], None], cycles: int,
             concurrency: int, messages: int, cycle_timeout: float) -> Result:
    """`cycles` connect/join/send/leave cycles in `max_steps` parts; a growing server RSS
    from part to part is a leak."""
    run = Run(settings, report)
    result = Result()
    targets = settings.targets
    sizes_before = registry_sizes(targets)
    with run.running():
        parts = max(1, min(settings.max_steps, cycles))
        workers = run.gen.size
        for part in range(parts):
            count = (part + 1) * cycles // parts - part * cycles // parts
            if run.left() < 1:
                break
            number = run.next_step()
            shares = [count // workers + (1 if w < count % workers else 0)
                      for w in range(workers)]
            server_before = run.server_sample()
            gen_cpu, gen_at = run.gen.cpu_seconds(), time.monotonic()
            started = time.monotonic()
            timeout = run.bounded(cycle_timeout * max(1, math.ceil(count / concurrency)))
            # Pairs go to the nodes in turn (a worker's share to one node per part).
            replies = run.gen.call([
                {"op": "soak", "url": targets[(index + part) % len(targets)].base_url,
                 "host_header": targets[(index + part) % len(targets)].host_header,
                 "prefix": f"soak-{run.tag}", "step": number, "cycles": share,
                 "concurrency": math.ceil(concurrency / workers), "messages": messages,
                 "pad": settings.pad, "timeout": cycle_timeout}
                for index, share in enumerate(shares)
            ], timeout + REPLY_MARGIN_S)
            elapsed = time.monotonic() - started
            server_after = run.server_sample()
            latencies = array("q")
            for reply in replies:
                latencies.frombytes(reply["latencies"])
            done = sum(r["done"] for r in replies)
            step = StepReport(
                scenario="soak", step=number, duration_s=elapsed,
                connections=2 * count, rooms=count, senders=2 * count,
                sent=sum(r["sent"] for r in replies),
                expected=sum(r["expected"] for r in replies),
                delivered=sum(r["received"] for r in replies),
                stale=sum(r["stale"] for r in replies),
                errors=sum(r["errors"] for r in replies),
                failures=sum(r["failed"] for r in replies)
                + sum(r["closed_unexpectedly"] for r in replies),
                latency_ms=latency_summary(latencies),
                generator=run.generator_usage(gen_cpu, gen_at), unit="cycle", units=done,
            )
            run.measure_servers(step, server_before, server_after)
            problems: dict[str, int] = {}
            for reply in replies:
                for reason, problem_count in reply["problems"].items():
                    problems[reason] = problems.get(reason, 0) + problem_count
            step.extra.update(
                cycles=done, cycles_per_s=round(done / elapsed, 1) if elapsed else None,
                connect_ms=latency_summary(
                    [v for r in replies for v in r["connect_latencies"]]),
                problems=problems,
            )
            if problems:
                step.extra["refusal"] = failure_line(sum(problems.values()), count,
                                                     problems)
            result.steps.append(step)
            report(step)
    rss = [s.server.rss_bytes for s in result.steps if s.server and s.server.rss_bytes]
    first = result.steps[0].server if result.steps else None
    if rss and first is not None and first.rss_start_bytes:
        rss.insert(0, first.rss_start_bytes)  # before the first cycle
    result.summary = {
        "kind": "summary", "scenario": "soak", "cycles": sum(
            s.extra["cycles"] for s in result.steps),
        "failures": sum(s.failures for s in result.steps),
        "loss": sum(s.loss for s in result.steps),
        "rss_first_bytes": rss[0] if rss else None,
        "rss_last_bytes": rss[-1] if rss else None,
        "rss_growth_bytes": rss[-1] - rss[0] if rss else None,
        "registry_before": sizes_before,
        "registry_after": registry_sizes(targets),
    }
    _add_refusals(result, 2 * sum(s.rooms for s in result.steps))
    return result


def _add_refusals(result: Result, attempted: int) -> None:
    """Every step's failures by reason, summed into the summary (first in its report)."""
    refused: dict[str, int] = {}
    for step in result.steps:
        for reason, count in step.extra.get("problems", {}).items():
            refused[reason] = refused.get(reason, 0) + count
    if refused:
        result.summary["refused"] = refused
        result.summary["refusal"] = failure_line(sum(refused.values()), attempted, refused)


def _maybe_round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def pin(cpus: Sequence[int]) -> None:
    """Pin this process (and so the workers it spawns afterwards) to `cpus`."""
    os.sched_setaffinity(0, set(cpus))
