"""``iwrelay-bench efficiency``: what coordinating through Redis costs a cluster.

For every run and every setup, fresh servers on free loopback ports: a redis-server
without persistence when the setup has Redis, then one or two ``twistd -n iwrelay``
nodes (``--redis`` when it has). The fanout load runs at a fixed rate with the setup's
placement, the CPU of every server process (the nodes and redis-server) is read from
/proc and summed, and every server is stopped. The four setups (docs/scaling.rst):

- ``one``: one node, no Redis (the reference);
- ``two``: two nodes, no Redis, each room wholly on one node;
- ``redis-room``: two nodes and Redis, each room wholly on one node;
- ``redis-split``: two nodes and Redis, each room's members spread over both.

Efficiency = CPU per delivery of ``two`` / CPU per delivery of a Redis setup, per run;
the table gives medians and the spread (lowest-highest). Loopback only; bounded by
``--deadline``; every process started is stopped before it returns.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.request import urlopen

from iw_relay.bench import runner
from iw_relay.bench.cli import EFFICIENCY_SETUPS
from iw_relay.bench.compare import (
    Server,
    chosen,
    free_port,
    machine_state,
    measured_step,
    relay_command,
    relay_root,
    sigterm_as_interrupt,
)
from iw_relay.bench.stats import StepReport, median


@dataclass(frozen=True)
class Setup:
    name: str
    label: str
    nodes: int
    redis: bool
    placement: str


SETUPS = (
    Setup("one", "one node, no Redis (reference)", 1, False, "room"),
    Setup("two", "two nodes, no Redis, rooms on one node", 2, False, "room"),
    Setup("redis-room", "two nodes + Redis, rooms on one node", 2, True, "room"),
    Setup("redis-split", "two nodes + Redis, rooms split over both", 2, True, "spread"),
)
BY_NAME = {setup.name: setup for setup in SETUPS}
assert tuple(BY_NAME) == EFFICIENCY_SETUPS
#: (label, numerator setup, denominator setup): a ratio of CPU per delivery.
EFFICIENCIES = (
    ("efficiency, rooms on one node (target 0.9)", "two", "redis-room"),
    ("efficiency, rooms split (target 0.6)", "two", "redis-split"),
    ("reference: one node instead (two nodes / one node)", "two", "one"),
)


class RedisServer(Server):
    """A redis-server on 127.0.0.1:`port`, no persistence, ready once it answers PING."""

    def ready(self) -> bool:
        return self.command(b"PING") == b"+PONG"

    def command(self, line: bytes) -> bytes | None:
        """One inline command on a fresh connection: the whole reply, or None."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
                conn.sendall(line + b"\r\n")
                reply = conn.recv(65536)
                while reply.startswith(b"$") and not reply.endswith(b"\r\n\r\n"):
                    more = conn.recv(65536)
                    if not more:
                        break
                    reply += more
                return reply.rstrip(b"\r\n")
        except OSError:
            return None

    def publishes(self) -> int | None:
        """PUBLISH commands served so far (INFO commandstats)."""
        reply = self.command(b"INFO commandstats") or b""
        for line in reply.splitlines():
            if line.startswith(b"cmdstat_publish:"):
                return int(line.split(b"calls=")[1].split(b",")[0])
        return 0 if reply else None


@dataclass
class Measurement:
    setup: str
    run: int
    values: dict[str, float | None] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _from_other_nodes(port: int) -> int:
    """A node's messagesFromOtherNodes (/stats), 0 without a backplane."""
    with urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as reply:
        return int(json.load(reply).get("cluster", {}).get("messagesFromOtherNodes", 0))


class Plan:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.started = time.monotonic()
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(relay_root()), *filter(None, [self.env.get("PYTHONPATH")])])

    def left(self) -> float:
        return self.args.deadline - (time.monotonic() - self.started)

    @contextmanager
    def servers(self, setup: Setup) -> Iterator[tuple[RedisServer | None, list[Server]]]:
        started: list[Server] = []
        try:
            redis = None
            extra = list(self.args.relay_arg)
            if setup.redis:
                port = free_port()
                redis = RedisServer(
                    "redis-server", [self.args.redis_server, "--port", str(port), "--bind",
                                     "127.0.0.1", "--save", "", "--appendonly", "no"],
                    dict(os.environ), port, None, self.workdir)
                started.append(redis)
                redis.wait_ready()
                extra += ["--redis", f"redis://127.0.0.1:{port}/0"]
            nodes = []
            for _ in range(setup.nodes):
                port = free_port()
                node = Server("node", relay_command(port, extra), self.env, port, None,
                              self.workdir)
                started.append(node)
                nodes.append(node)
            for node in nodes:
                node.wait_ready()
            yield redis, nodes
        finally:
            for server in reversed(started):
                server.stop()

    def measure(self, setup: Setup, run: int) -> Measurement:
        args = self.args
        found = Measurement(setup.name, run)
        with self.servers(setup) as (redis, nodes):
            pids = [node.pid for node in nodes] + ([redis.pid] if redis else [])
            found.pids = pids
            settings = runner.Settings(
                targets=[runner.parse_target(node.url) for node in nodes],
                workers=args.workers, server_pids=pids, placement=setup.placement,
                duration=args.duration, warmup=args.warmup, max_steps=1,
                deadline=min(300.0, max(self.left(), 1.0)), drain_timeout=5.0,
                connect_timeout=60)
            result = runner.run_rooms(settings, _ignore, "fanout", args.clients, args.rooms,
                                      None, target_deliveries=[args.deliveries])
            step = measured_step(result, found.values, found.notes)
            if step is None:
                return found
            found.values["redis_us_per_delivery"] = _redis_share(step, redis)
            if redis is not None:
                publishes = redis.publishes()
                relayed = sum(_from_other_nodes(node.port) for node in nodes)
                found.values["publish_per_s"] = (
                    None if publishes is None else publishes / (args.warmup + args.duration))
                found.values["messages_per_publish"] = (
                    relayed / publishes if publishes else None)
        return found


def _redis_share(step: StepReport, redis: RedisServer | None) -> float | None:
    """redis-server's own CPU per delivery."""
    if redis is None or not step.delivered:
        return None
    for server in step.extra.get("servers", []):
        if server["pid"] == redis.pid:
            return float(server["cpu_s"]) * 1e6 / step.delivered
    return None


def _ignore(_: StepReport) -> None:
    pass


@contextmanager
def _locked(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- the table ------------------------------------------------------------------------


def _spread(values: Sequence[float], digits: int) -> str:
    if not values:
        return "-"
    mid = median(values)
    assert mid is not None
    return f"{mid:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def per_setup(measurements: Sequence[Measurement], key: str) -> dict[str, dict[int, float]]:
    """setup -> run -> value of `key`, leaving out runs without it."""
    found: dict[str, dict[int, float]] = {}
    for m in measurements:
        value = m.values.get(key)
        if value is not None:
            found.setdefault(m.setup, {})[m.run] = value
    return found


def efficiencies(measurements: Sequence[Measurement]) -> dict[str, list[float]]:
    """Each efficiency's value in every run that measured both of its setups."""
    cpu = per_setup(measurements, "cpu_us_per_delivery")
    found: dict[str, list[float]] = {}
    for label, over, under in EFFICIENCIES:
        runs = sorted(set(cpu.get(over, {})) & set(cpu.get(under, {})))
        values = [cpu[over][r] / cpu[under][r] for r in runs if cpu[under][r]]
        if values:
            found[label] = values
    return found


def table(measurements: Sequence[Measurement], setups: Sequence[str]
          ) -> tuple[str, dict[str, Any]]:
    """The table as text, and its figures (medians and every run's values)."""
    cpu = per_setup(measurements, "cpu_us_per_delivery")
    p99 = per_setup(measurements, "p99_ms")
    redis = per_setup(measurements, "redis_us_per_delivery")
    publish = per_setup(measurements, "publish_per_s")
    batch = per_setup(measurements, "messages_per_publish")
    header = ("setup", "CPU us/delivery", "p99 ms", "redis-server us/delivery",
              "PUBLISH/s", "messages/PUBLISH")
    lines: list[tuple[str, ...]] = []
    figures: dict[str, Any] = {"setups": {}, "efficiencies": {}}
    for name in setups:
        column = [list(found.get(name, {}).values())
                  for found in (cpu, p99, redis, publish, batch)]
        lines.append((BY_NAME[name].label, _spread(column[0], 2), _spread(column[1], 1),
                      _spread(column[2], 2), _spread(column[3], 0), _spread(column[4], 1)))
        figures["setups"][name] = {"cpu_us_per_delivery": column[0], "p99_ms": column[1],
                                   "cpu_us_per_delivery_median": median(column[0]),
                                   "p99_ms_median": median(column[1])}
    for label, values in efficiencies(measurements).items():
        lines.append((label, _spread(values, 2), "", "", "", ""))
        figures["efficiencies"][label] = {"values": values, "median": median(values)}
    widths = [max(len(row[i]) for row in (header, *lines)) for i in range(len(header))]
    rule = "  ".join("=" * width for width in widths)
    text = [rule, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), rule]
    text += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in lines]
    text.append(rule)
    return "\n".join(text), figures


# -- the command ----------------------------------------------------------------------


def check(args: argparse.Namespace) -> list[str]:
    """The setups to run; BenchError for what cannot work."""
    setups = chosen("--setups", args.setups, EFFICIENCY_SETUPS, args.runs)
    if any(BY_NAME[s].redis for s in setups) and not shutil.which(args.redis_server):
        raise runner.BenchError(f"--redis-server {args.redis_server}: not found")
    return setups


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> runner.Result:
    """Every setup `args.runs` times on fresh servers; print the table on `out`."""
    setups = check(args)
    measurements: list[Measurement] = []
    load_before = machine_state()
    with sigterm_as_interrupt(), \
            tempfile.TemporaryDirectory(prefix="iwrelay-efficiency-") as workdir:
        plan = Plan(args, Path(workdir))
        for number in range(1, args.runs + 1):
            # Rotate who goes first, so that no setup always meets a warmer machine.
            shift = (number - 1) % len(setups)
            for name in setups[shift:] + setups[:shift]:
                if plan.left() < 30:
                    raise runner.BenchError(f"--deadline {args.deadline:g}s reached")
                with _locked(args.lock):
                    found = plan.measure(BY_NAME[name], number)
                    state = machine_state()
                measurements.append(found)
                print(f"run {number} {name}: "
                      + ", ".join(f"{k} {v:.4g}" for k, v in found.values.items()
                                  if v is not None)
                      + "".join(f" [{n}]" for n in found.notes) + f"  ({state})",
                      file=err, flush=True)
    text, figures = table(measurements, setups)
    print(f"cluster efficiency: {args.runs} run(s) of fresh servers per setup, "
          f"{args.clients} clients in {args.rooms} rooms, {args.deliveries:,.0f} "
          f"deliveries/s, {args.duration:g} s after {args.warmup:g} s of warm-up", file=out)
    print(f"machine: before {load_before}; after {machine_state()}", file=out)
    print(text, file=out)
    for m in measurements:
        for note in m.notes:
            print(f"note: run {m.run} {m.setup}: {note}", file=out)
    summary = {"kind": "summary", "scenario": "efficiency", **figures,
               "runs": [m.__dict__ for m in measurements]}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return runner.Result(summary=summary)

